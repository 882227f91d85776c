"""Where greedy agreement with PyTorch fp16 is lost: teacher-forced logits of several builds of one model, each
against PyTorch fp32 (the same weights) and against PyTorch fp16's own greedy tokens.

Runs after ``scripts/bench_gpu.py`` on the same machine and reads its work directory (``hf/``, ``exported/``,
``optimized/``, ``genai/``). For each batch size: PyTorch fp16 ``generate`` gives the reference tokens and its
cached logits; then, fed those same tokens, it collects the logits of PyTorch fp16 in one full forward (no cache),
PyTorch fp32, onnxpipe's exported graph, onnxpipe's optimized graph and GenAI's model (if present). Prints, per
build, the share of positions whose argmax equals PyTorch fp16's tokens and fp32's argmax, and its logit error
against fp32: if onnxpipe's distance to fp32 is PyTorch fp16's own, the disagreement is two fp16 roundings of
near-ties, not a defect of the graph.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/agreement_diag.py --work /tmp/onnxpipe_bench_gpu --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def torch_builds(hf: str, ids, steps: int, device: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """PyTorch fp16 greedy tokens [B, steps] and the logits [B, steps, V] of its cached run, its full forward and
    fp32's full forward over the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device != "cpu" else torch.float32
    x = torch.tensor(ids, device=device)
    out = {}
    m = AutoModelForCausalLM.from_pretrained(hf, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    with torch.no_grad():
        g = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, min_new_tokens=steps,
                       do_sample=False, output_logits=True, return_dict_in_generate=True)
        prompt = x.shape[1]
        tokens = g.sequences[:, prompt:].cpu().numpy()
        out["torch_fp16_cached"] = torch.stack(g.logits, 1).float().cpu().numpy()
        seq = g.sequences[:, :prompt + steps - 1]
        full = m(seq, attention_mask=torch.ones_like(seq)).logits[:, prompt - 1:]
        out["torch_fp16_full_forward"] = full.float().cpu().numpy()
        del m, full
        torch.cuda.empty_cache() if device != "cpu" else None
        m32 = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="sdpa").to(device).eval()
        out["torch_fp32"] = m32(seq, attention_mask=torch.ones_like(seq)).logits[:, prompt - 1:].float().cpu().numpy()
        del m32
        torch.cuda.empty_cache() if device != "cpu" else None
    return tokens, out


def onnxpipe_logits(model_dir: str, provider: str, ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Teacher-forced: our prefill over the prompts, then one decode step per reference token; logits each step."""
    from onnxpipe.runtime.generate import load

    lm = load(model_dir, provider)
    steps = tokens.shape[1]
    cfg = lm._config({"max_new_tokens": steps, "stop_token_ids": []})
    rows = lm._rows([list(map(int, r)) for r in ids], cfg)
    mask, _, cache, out = lm.prefill(rows, ids.shape[1] + steps, "logits")
    got = [np.asarray(out, np.float32).reshape(len(ids), -1)]
    for k in range(1, steps):
        mask, out = lm.decode_step(tokens[:, k - 1], mask, cache, "logits")
        got.append(np.asarray(out, np.float32).reshape(len(ids), -1))
    return np.stack(got, 1)


def genai_logits(model_dir: str, ids: np.ndarray, tokens: np.ndarray, device: str) -> np.ndarray:
    """GenAI's generator takes appended tokens more than once only at batch 1: a larger batch goes row by row."""
    if len(ids) > 1:
        return np.concatenate([genai_logits(model_dir, ids[i:i + 1], tokens[i:i + 1], device) for i in range(len(ids))])
    import onnxruntime_genai as og

    cfg = og.Config(model_dir)
    cfg.clear_providers()
    if device != "cpu":
        cfg.append_provider("cuda")
    model = og.Model(cfg)
    params = og.GeneratorParams(model)
    steps = tokens.shape[1]
    params.set_search_options(max_length=ids.shape[1] + steps, batch_size=len(ids))
    gen = og.Generator(model, params)

    def logits():
        x = gen.get_logits()
        x = x.as_numpy() if hasattr(x, "as_numpy") else x
        return np.asarray(x, np.float32).reshape(len(ids), -1)

    gen.append_tokens(np.ascontiguousarray(ids, np.int32))
    got = [logits()]
    for k in range(1, steps):
        gen.append_tokens(np.ascontiguousarray(tokens[:, k - 1:k], np.int32))
        got.append(logits())
    return np.stack(got, 1)


def build(hf: Path, work: Path, device: str, int4: bool = False) -> None:
    """Export (fp16 on the GPU) and optimize an HF directory into work/exported and work/optimized; with int4, also
    quantize the optimized graph as bench_gpu.py's int4 rows do (symmetric RTN, block 32, LM head included)."""
    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import optimize_model, pipeline

    target = "cuda" if device == "cuda" else "cpu"
    if target == "cuda":  # as bench_gpu.py: the kernel-registry query crashes on the device's onnxruntime-gpu
        pipeline.supported_ops = lambda target: None
    export_decoder(hf, work / "exported", dtype="fp16" if device == "cuda" else "fp32", verify=False, force=True)
    optimize_model(work / "exported", work / "optimized", level=3, target=target, verify=False, force=True)
    from bench_gpu_builds import child_build_genai, child_build_onnxpipe_int4  # the same builds as bench_gpu.py's rows

    if int4:
        child_build_onnxpipe_int4({"optimized": str(work / "optimized"), "int4": str(work / "int4")})
    if device == "cuda":  # GenAI's model builder on the same directory (skipped where GenAI is not installed)
        child_build_genai({"hf": str(hf), "genai": str(work / "genai"), "genai_precision": "fp16", "genai_ep": "cuda"})


def text_prompts(hf: Path, text: Path, batch: int, prompt: int) -> np.ndarray:
    """Rows of ``prompt`` tokens of a text file, spread over it (tokenized with the model's own tokenizer)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(hf)(text.read_text(errors="replace"))["input_ids"]
    if len(ids) < batch * prompt:
        raise SystemExit(f"{text}: {len(ids)} tokens, fewer than {batch} x {prompt}")
    step = len(ids) // batch
    return np.array([ids[i * step:i * step + prompt] for i in range(batch)], np.int64)


def margins(x: np.ndarray) -> np.ndarray:
    top2 = np.sort(np.partition(x, -2, axis=-1)[..., -2:], axis=-1)
    return top2[..., 1] - top2[..., 0]


def compare(tokens: np.ndarray, logits: dict[str, np.ndarray]) -> dict:
    ref32 = logits["torch_fp32"]
    arg32 = ref32.argmax(-1)
    m32 = margins(ref32)
    res = {"positions": int(tokens.size),
           "fp32_margin_median": round(float(np.median(m32)), 4),
           "fp32_margin_below": {str(t): round(float((m32 < t).mean()), 4) for t in (0.02, 0.05, 0.1, 0.2)},
           "torch_fp16_equals_fp32_argmax": round(float((tokens == arg32).mean()), 4),
           "builds": {}}
    args = {k: v.argmax(-1) for k, v in logits.items()}
    for name, x in logits.items():
        d = np.abs(x - ref32)
        miss = args[name] != tokens
        res["builds"][name] = {
            "agree_torch_fp16_tokens": round(float((~miss).mean()), 4),
            "agree_fp32_argmax": round(float((args[name] == arg32).mean()), 4),
            "vs_fp32_max_abs": round(float(d.max()), 4),
            "vs_fp32_mean_abs": round(float(d.mean()), 5),
            "vs_fp32_rms": round(float(np.sqrt((d ** 2).mean())), 5),
            "fp32_margin_at_misses_median": round(float(np.median(m32[miss])), 4) if miss.any() else None,
        }
    names = list(logits)
    res["pairwise_argmax_agreement"] = {a: {b: round(float((args[a] == args[b]).mean()), 4) for b in names}
                                        for a in names}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/onnxpipe_bench_gpu")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--hf", default=None, help="an HF model directory (default: WORK/hf, bench_gpu.py's model)")
    ap.add_argument("--build", action="store_true", help="export and optimize it into WORK first")
    ap.add_argument("--text", default=None, help="prompts from this text file instead of random token ids")
    ap.add_argument("--int4", action="store_true", help="with --build: an int4 build too (WORK/int4)")
    args = ap.parse_args()
    from bench_gpu_anchors import prompts

    work = Path(args.work)
    hf = Path(args.hf) if args.hf else work / "hf"
    if args.build:
        build(hf, work, args.device, args.int4)
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    provider = "cuda" if args.device == "cuda" else "cpu"
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "work": str(work), "hf": str(hf),
              "text": args.text, "genai_rows": "batch 1, row by row, when the batch is larger", "steps": args.steps,
              "prompt": args.prompt, "batches": {}}
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = (text_prompts(hf, Path(args.text), batch, args.prompt) if args.text
               else np.asarray(prompts({"vocab": vocab, "prompt": args.prompt}, batch)))
        t = time.perf_counter()
        tokens, logits = torch_builds(str(hf), ids, args.steps, args.device)
        errors = {}
        for name, d in (("onnxpipe_exported", work / "exported"), ("onnxpipe_optimized", work / "optimized"),
                        ("onnxpipe_int4", work / "int4")):
            if (d / "onnxpipe.json").is_file():
                try:
                    logits[name] = onnxpipe_logits(str(d), provider, ids, tokens)
                except Exception as e:  # report and go on: the other builds still say something
                    errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
        if (work / "genai" / "genai_config.json").is_file():
            try:
                logits["genai"] = genai_logits(str(work / "genai"), ids, tokens, args.device)
            except Exception as e:
                errors["genai"] = f"{type(e).__name__}: {str(e)[:300]}"
        res = compare(tokens, logits)
        res["errors"] = errors
        res["seconds"] = round(time.perf_counter() - t, 1)
        report["batches"][str(batch)] = res
        print(f"batch {batch}: {res['positions']} positions; fp32 top-1 margin median {res['fp32_margin_median']}, "
              f"below 0.05/0.1/0.2: {res['fp32_margin_below']['0.05']:.1%}/{res['fp32_margin_below']['0.1']:.1%}/"
              f"{res['fp32_margin_below']['0.2']:.1%}", flush=True)
        print(f"  {'build':26s} {'=torch16 tokens':>16s} {'=fp32 argmax':>13s} {'max|d| vs fp32':>15s} "
              f"{'rms vs fp32':>12s} {'fp32 margin at misses':>22s}")
        for name, b in res["builds"].items():
            print(f"  {name:26s} {b['agree_torch_fp16_tokens']:16.1%} {b['agree_fp32_argmax']:13.1%} "
                  f"{b['vs_fp32_max_abs']:15.4f} {b['vs_fp32_rms']:12.5f} {str(b['fp32_margin_at_misses_median']):>22s}")
        for name, e in errors.items():
            print(f"  {name}: failed: {e}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "agreement_diag.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
