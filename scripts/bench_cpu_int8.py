"""GPT-2 small (124M) on the CPU at batch 1: PyTorch eager fp32, ONNX Runtime fp32 (onnxpipe optimize --level 3),
ORT's quantize_dynamic (what Optimum's dynamic int8 runs) and onnxpipe quantize --mode dynamic, in one run.

    nice -n 0 python3 scripts/bench_cpu_int8.py --json benchmarks/results/bench_cpu_int8.json
    python3 scripts/bench_cpu_int8.py --profile        # + ORT's per-op totals of a decode step, per ONNX row

The model is transformers' GPT2Config() (12 layers, hidden 768, 12 heads, vocab 50257, 1024 positions: GPT-2
small's sizes) with seeded random weights; no hub is reachable here, and models/ holds no trained model of that
size. The tokenizer is gpt2-stdlib's (its ids are a subset of the vocabulary), so the eval text is real text, but
with GPT-2's own initialisation (initializer_range 0.02) the logits are near-uniform: perplexity ~5.9e4 of a 50257
vocabulary, where a 2% change says little. Top-1 agreement and mean KL against PyTorch fp32 are printed beside it;
for perplexity on a trained model, run the same rows on one with --hf (e.g. models/gpt2-stdlib, 1.35M parameters:
its speed says nothing, its perplexity does). (At initializer_range 0.1, as bench_score.py's random models, this
model's perplexity is 3.5e6, worse than uniform: a random model's perplexity is no measure either way.)

Built once under --work (reused when present): the HF directory, `export` (parity-checked), `optimize --level 3`,
ORT's `quantize_dynamic(per_channel=True, reduce_range=False, weight_type=QInt8, op_types_to_quantize=["MatMul"])`
on the optimized graph with the tied LM head's Transpose folded into a weight, as Optimum's export has it (Optimum's
avx512_vnni dynamic config makes the same call; it turns Gemm into MatMul itself), and `quantize --mode dynamic` on it
(the default: per-token activation scales, the LM head 8-bit per vocabulary row). --variant NAME=OPTIONS adds
quantize_model rows (e.g. `tensor=activations=tensor` or `head32=lm_head=fp32,embeddings=fp32`). One more row is a
proposal for quantize --mode dynamic, built here and not by onnxpipe: every linear layer as one MatMulNBits with
8-bit weights per block of 128 and accuracy_level 4, whose CPU kernel quantizes activations per block of each row
inside the op (batch-independent, as onnxpipe's per-token form, which takes seven standard ops per layer).

Decode: ms per generated token at batch 1 after a --prompt-token prompt, --new-tokens greedy tokens, the median
step of each run, median over --rounds interleaved rounds (every row once per round, so a busy neighbour slows all
rows alike). The ONNX rows run through onnxpipe's runtime (DecoderSession + onnxpipe.runtime.bench, --threads
intra-op threads; with --spinning both, each ONNX row twice: ORT's intra-op threads spinning between ops, its
default and what onnxpipe's runtime runs, and sleeping, which a machine shared with other work may prefer);
PyTorch runs transformers' model with its DynamicCache under torch.set_num_threads(--threads).
Perplexity: the first --eval-tokens tokens of data/eval.txt in windows of --context, each a prefill.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FROM = REPO / "models" / "gpt2-stdlib"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
NBITS_BLOCK = 128
SPIN_OFF = ", spinning off"
NBITS_ROW = f"MatMulNBits 8-bit, block {NBITS_BLOCK}, accuracy level 4 (proposed)"
ORT_ROWS = ("ORT fp32 (optimize --level 3)", "ORT quantize_dynamic (Optimum's int8)", "onnxpipe quantize --mode dynamic")


def build(work: Path, variants: dict[str, dict[str, Any]], log=print, hf_dir: Path | None = None) -> dict[str, Path]:
    """The HF directory (GPT-2 small, random, unless ``hf_dir``) and every ONNX row's model directory under ``work``
    (each made once, then reused)."""
    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import optimize_model
    from onnxpipe.quant import quantize_model

    work.mkdir(parents=True, exist_ok=True)
    hf, exported, optimized = hf_dir or work / "hf", work / "exported", work / "optimized"
    if not (hf / "config.json").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).eval().save_pretrained(hf)
        for name in TOKENIZER_FILES:
            shutil.copy2(TOKENIZER_FROM / name, hf / name)
    steps = [("export", exported, lambda: export_decoder(hf, exported)),
             ("optimize --level 3", optimized, lambda: optimize_model(exported, optimized, level=3, log=log))]
    steps.append(("quantize_dynamic", work / "ort-int8", lambda: ort_quantize_dynamic(optimized, work / "ort-int8")))
    steps.append(("quantize --mode dynamic", work / "int8", lambda: quantize_model(optimized, work / "int8", "dynamic",
                                                                               log=log)))
    steps.append(("MatMulNBits 8-bit", work / "nbits8", lambda: matmulnbits8(optimized, work / "nbits8", NBITS_BLOCK)))
    for name, options in variants.items():
        out = work / f"int8-{name}"
        steps.append((f"quantize --mode dynamic {options}", out,
                      lambda out=out, options=options: quantize_model(optimized, out, "dynamic", log=log, **options)))
    for what, out, make in steps:
        if not (out / "onnxpipe.json").is_file():
            t = time.perf_counter()
            log(f"{what} -> {out} ...")
            make()
            log(f"{what}: {time.perf_counter() - t:.0f} s")
    rows = dict(zip(ORT_ROWS, (optimized, work / "ort-int8", work / "int8")))
    rows.update({f"onnxpipe dynamic, {name}": work / f"int8-{name}" for name in variants})
    rows[NBITS_ROW] = work / "nbits8"
    return {"hf": hf, **rows}


def fold_constant_transposes(model: Any) -> int:
    """Transpose(initializer) -> a transposed initializer (the tied LM head reads the token table through one):
    quantize_dynamic and MatMulNBitsQuantizer quantize only a MatMul whose weight is an initializer, and Optimum's
    own export gives GPT-2's head its weight as one."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keep, folded = [], 0
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next(a.ints for a in node.attribute if a.name == "perm")
            array = np.transpose(numpy_helper.to_array(inits[node.input[0]]), perm).copy()
            model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            folded += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return folded


def gemm_to_matmul(model: Any) -> int:
    """Gemm(A, W, bias) -> MatMul(A, W) + Add(bias): MatMulNBitsQuantizer takes MatMul nodes only."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, count = [], 0
    for n in model.graph.node:
        if n.op_type != "Gemm":
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise SystemExit(f"{n.name}: Gemm with {attrs} is not a plain linear layer")
        if attrs.get("transB", 0):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[n.input[1]]).T.copy(), n.input[1]))
        biased = len(n.input) > 2 and n.input[2]
        product = n.output[0] + "/MatMul" if biased else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], n.input[1]], [product], name=n.name + "/MatMul"))
        if biased:
            nodes.append(helper.make_node("Add", [product, n.input[2]], [n.output[0]], name=n.name + "/Add"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def matmulnbits8(src: Path, out: Path, block: int) -> None:
    """Every linear layer (the LM head too) as one MatMulNBits, 8-bit symmetric weights per block of ``block``
    along K, accuracy_level 4: onnxruntime's CPU kernel quantizes the activations to int8 per block of each row
    inside the op (no scale depends on another row), so one op does what the per-token form does in seven."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from onnxpipe.artifact import ModelDir, copy_sidecar_files, derive_manifest, write_manifest

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src_md = ModelDir.open(src)
    model = onnx.load(src_md.model_path)
    fold_constant_transposes(model)
    gemm_to_matmul(model)
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=False)
    copy_sidecar_files(src, tmp)
    manifest = derive_manifest(src_md.manifest)
    manifest.steps.append({"stage": "matmulnbits8", "params": {"bits": 8, "block_size": block, "symmetric": True,
                                                                "accuracy_level": 4}})
    write_manifest(tmp, manifest)
    tmp.rename(out)


def ort_quantize_dynamic(src: Path, out: Path) -> None:
    """onnxruntime.quantization.quantize_dynamic on src's model.onnx, as Optimum's ORTQuantizer calls it with
    AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True); a model directory beside it. The tied
    head's Transpose is folded first, so that the LM head is quantized as it is from Optimum's export."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxpipe.artifact import ModelDir, copy_sidecar_files, derive_manifest, write_manifest

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src_md = ModelDir.open(src)
    model = onnx.load(src_md.model_path)
    fold_constant_transposes(model)
    onnx.save(model, tmp / "folded.onnx")
    quantize_dynamic(tmp / "folded.onnx", tmp / "model.onnx", per_channel=True, reduce_range=False,
                     weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     use_external_data_format=False)
    (tmp / "folded.onnx").unlink()
    copy_sidecar_files(src, tmp)
    manifest = derive_manifest(src_md.manifest)
    manifest.steps.append({"stage": "ort-quantize-dynamic", "params": {
        "per_channel": True, "reduce_range": False, "weight_type": "QInt8", "op_types_to_quantize": ["MatMul"]}})
    write_manifest(tmp, manifest)
    tmp.rename(out)


# ---- decode speed ----

def session_options(threads: int, spinning: bool, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def ort_model(model_dir: Path, threads: int, spinning: bool) -> Any:
    from onnxpipe.runtime.generate import LanguageModel
    from onnxpipe.runtime.session import DecoderSession

    s = DecoderSession(model_dir, "cpu", threads=threads, session_options=session_options(threads, spinning),
                       announce=lambda m: None)
    return LanguageModel(s, None)


class TorchDecoder:
    """transformers' model, greedy with its KV cache: the per-step times of one generation."""

    def __init__(self, hf: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()

    def decode_ms(self, prompt: list[int], new_tokens: int) -> float:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.tensor([prompt]), use_cache=True)
            past, stamps = out.past_key_values, []
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            stamps.append(time.perf_counter())
            for _ in range(new_tokens - 1):
                out = self.model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                stamps.append(time.perf_counter())
        return float(np.median(np.diff(stamps))) * 1e3


def measure_decode(rows: dict[str, Any], prompt_tokens: int, new_tokens: int, rounds: int, log=print) -> dict[str, list[float]]:
    from onnxpipe.runtime.bench import bench

    prompt = np.random.default_rng(0).integers(0, 4096, prompt_tokens).tolist()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(rounds + 1):  # round 0 is a warm-up for every row
        for name, runner in rows.items():
            if isinstance(runner, TorchDecoder):
                ms = runner.decode_ms(prompt, new_tokens)
            else:
                ms = bench(runner, [1], prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=1)[0].decode_ms
            if r:
                times[name].append(ms)
        if r:
            log(f"round {r}: " + ", ".join(f"{n.split(' (')[0]} {t[-1]:.2f}" for n, t in times.items()))
    return times


# ---- quality ----

def eval_tokens(hf: Path, n: int) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    ids = tok.encode((REPO / "data" / "eval.txt").read_text(encoding="utf-8")).ids
    if len(ids) < n:
        raise SystemExit(f"data/eval.txt has {len(ids)} tokens, fewer than --eval-tokens {n}")
    return np.asarray(ids[:n], dtype=np.int64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def measure_quality(hf: Path, dirs: dict[str, Path], ids: np.ndarray, context: int, threads: int) -> dict[str, dict]:
    """Perplexity of every row on the same windows, and top-1 agreement / mean KL against PyTorch fp32's logits."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from onnxpipe.artifact import ModelDir
    from onnxpipe.parity import empty_past, ort_step_fn

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    steps = {}
    for name, d in dirs.items():
        md = ModelDir.open(d)
        sess = ort.InferenceSession(str(md.model_path), session_options(threads, True), providers=["CPUExecutionProvider"])
        steps[name] = (ort_step_fn(sess, md.manifest), empty_past(md.manifest, 1, np.dtype(np.float32)))
    acc = {name: collections.Counter() for name in ["PyTorch eager fp32", *dirs]}
    for start in range(0, len(ids) - context + 1, context):
        window = ids[start:start + context][None]
        targets = window[0, 1:]
        with torch.inference_mode():
            ref = log_softmax(model(torch.from_numpy(window)).logits[0, :-1].numpy())
        logits = {"PyTorch eager fp32": ref}
        mask = np.ones_like(window)
        for name, (step, past) in steps.items():
            logits[name] = log_softmax(step(window, mask, np.arange(context)[None], past)[0][0, :-1])
        for name, lp in logits.items():
            a = acc[name]
            a["nll"] += float(-lp[np.arange(len(targets)), targets].sum())
            a["n"] += len(targets)
            a["top1"] += int((lp.argmax(-1) == ref.argmax(-1)).sum())
            a["kl"] += float((np.exp(ref) * (ref - lp)).sum())
    return {name: {"ppl": float(np.exp(a["nll"] / a["n"])), "top1": a["top1"] / a["n"], "mean_kl": a["kl"] / a["n"],
                   "tokens": a["n"]} for name, a in acc.items()}


def batch_dependence(dirs: dict[str, Path], vocab: int, width: int = 64, threads: int = 1) -> dict[str, float]:
    """max |logit| change of one row's prefill between it alone and it beside three other rows: 0 where no
    activation scale is shared across rows (per token, MatMulNBits' per-row blocks), not 0 for one per tensor."""
    import onnxruntime as ort

    from onnxpipe.artifact import ModelDir
    from onnxpipe.parity import empty_past, ort_step_fn

    ids = np.random.default_rng(0).integers(0, vocab, (4, width))
    positions = np.tile(np.arange(width), (4, 1))
    out = {}
    for name, d in dirs.items():
        md = ModelDir.open(d)
        step = ort_step_fn(ort.InferenceSession(str(md.model_path), session_options(threads, False),
                                                providers=["CPUExecutionProvider"]), md.manifest)
        alone, batched = (step(ids[:n], np.ones_like(ids[:n]), positions[:n],
                               empty_past(md.manifest, n, np.dtype(np.float32)))[0][0] for n in (1, 4))
        out[name] = float(np.abs(alone - batched).max())
    return out


# ---- where the time goes ----

def profile_ops(model_dir: Path, prompt_tokens: int, new_tokens: int, threads: int, spinning: bool, out: Path) -> dict:
    """ORT's profiler over one greedy generation through the runtime; the kernel time of the decode steps (the
    prefill's run left out) summed by op type, in ms per step."""
    from onnxpipe.runtime.generate import LanguageModel
    from onnxpipe.runtime.session import DecoderSession

    out.mkdir(parents=True, exist_ok=True)
    so = session_options(threads, spinning, str(out / model_dir.name))
    s = DecoderSession(model_dir, "cpu", threads=threads, session_options=so, announce=lambda m: None)
    prompt = np.random.default_rng(0).integers(0, 4096, prompt_tokens).tolist()
    LanguageModel(s, None).generate([prompt], max_new_tokens=new_tokens, stop_token_ids=[])
    events = json.loads(Path(s.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    decode = runs[1:]  # the first run is the prefill
    totals: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            if any(a <= e["ts"] <= b for a, b in decode):
                totals[e["args"]["op_name"]] += e["dur"]
    steps = max(len(decode), 1)
    run_ms = sum(b - a for a, b in decode) / steps / 1e3
    return {"run_ms_per_step": run_ms, "steps": steps,
            "ops_ms_per_step": {op: us / steps / 1e3 for op, us in totals.most_common()}}


# ---- report ----

def render(decode: dict[str, list[float]], quality: dict[str, dict], env: dict[str, Any]) -> str:
    base_name = "ORT fp32 (optimize --level 3)"
    base = statistics.median(decode.get(base_name) or decode[base_name + SPIN_OFF])
    lines = [f"{env['model']}, batch 1, {env['prompt_tokens']}-token prompt, {env['new_tokens']} new "
             f"tokens, {env['threads']} threads, {env['rounds']} rounds; {env['date']}; load average before "
             f"{env['load_before']}, after {env['load_after']}",
             "",
             "| row | decode ms/token (median) | min-max over rounds | vs ORT fp32 | perplexity | ppl change | top-1 vs fp32 | mean KL |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ref = quality.get("PyTorch eager fp32", {}).get("ppl")
    for name, t in decode.items():
        q = quality.get(name.removesuffix(SPIN_OFF), {})
        med = statistics.median(t)
        ppl = f"{q['ppl']:.3f}" if q else "–"
        change = f"{(q['ppl'] / ref - 1) * 100:+.3f}%" if q and ref else "–"
        top1 = f"{q['top1']:.1%}" if q else "–"
        kl = f"{q['mean_kl']:.2e}" if q else "–"
        lines.append(f"| {name} | {med:.2f} | {min(t):.2f}-{max(t):.2f} | {base / med:.2f}x | {ppl} | {change} | {top1} | {kl} |")
    return "\n".join(lines)


def render_profile(profiles: dict[str, dict], top: int = 8) -> str:
    lines = ["", "ORT kernel time per decode step by op type (ms; profiler on, so slower than the table):"]
    for name, p in profiles.items():
        ops = ", ".join(f"{op} {ms:.2f}" for op, ms in list(p["ops_ms_per_step"].items())[:top])
        lines.append(f"- {name}: run {p['run_ms_per_step']:.2f} ms/step; {ops}")
    return "\n".join(lines)


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, opts = spec.partition("=")
    if not name or not opts:
        raise argparse.ArgumentTypeError(f"--variant {spec!r}: expected NAME=key=value[,key=value]")
    options: dict[str, Any] = {}
    for item in opts.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--variant {spec!r}: {item!r} is not key=value")
        options[key] = value
    return name, options


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="where the models are built (default /tmp/onnxpipe-bench-cpu-int8[-NAME of --hf])")
    parser.add_argument("--hf", type=Path, default=None,
                        help="a GPT-2-family HF directory instead of random GPT-2 small (e.g. models/gpt2-stdlib)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spinning", choices=["on", "off", "both"], default="both",
                        help="ORT's intra-op threads spin between ops (on: ORT's default, what onnxpipe's runtime "
                             "does) or sleep (off); both: every ONNX row timed both ways")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--variant", action="append", type=parse_variant, default=[],
                        help="NAME=key=value,...: one more onnxpipe dynamic row with these quantize_model options")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--batch-check", action="store_true",
                        help="only: each ONNX row's batch dependence (one row alone vs beside three others)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also ORT's per-op decode totals of every ONNX row")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    work = args.work or Path("/tmp/onnxpipe-bench-cpu-int8" + (f"-{args.hf.resolve().name}" if args.hf else ""))
    dirs = build(work, dict(args.variant), log, args.hf)
    if args.build_only:
        return 0
    import onnxruntime
    import torch
    import transformers

    onnx_dirs = {k: v for k, v in dirs.items() if k != "hf"}
    if args.batch_check:
        for name, delta in batch_dependence(onnx_dirs, 4096).items():
            print(f"{name}: max |logit change| of a row alone vs in a batch of 4: {delta:.3e}")
        return 0
    spinning = args.spinning != "off"  # the profiles' setting
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": _cpu_name(), "cores": os.cpu_count(),
        "model": f"{args.hf} (trained)" if args.hf else "GPT-2 small (124M, random weights)",
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "threads": args.threads, "spinning": args.spinning,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "command": "python3 scripts/bench_cpu_int8.py " + " ".join(sys.argv[1:]),
    }
    runners: dict[str, Any] = {"PyTorch eager fp32": TorchDecoder(dirs["hf"], args.threads)}
    for name, d in onnx_dirs.items():
        if args.spinning != "off":
            runners[name] = ort_model(d, args.threads, True)
        if args.spinning != "on":
            runners[name + SPIN_OFF] = ort_model(d, args.threads, False)
    decode = measure_decode(runners, args.prompt_tokens, args.new_tokens, args.rounds, log)
    del runners
    quality = {} if args.skip_quality else measure_quality(dirs["hf"], onnx_dirs,
                                                             eval_tokens(dirs["hf"], args.eval_tokens),
                                                             args.context, args.threads)
    profiles = {name: profile_ops(d, args.prompt_tokens, args.new_tokens, args.threads, spinning,
                                  work / "profiles") for name, d in onnx_dirs.items()} if args.profile else {}
    env["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    table = render(decode, quality, env) + (render_profile(profiles) if profiles else "")
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "decode_ms": decode, "quality": quality, "profiles": profiles,
                                         "table": table}, indent=1))
    return 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
