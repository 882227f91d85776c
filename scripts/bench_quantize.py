"""Every quantization mode on the trained reference models, against fp32 and against Optimum, in one run.

    flock /tmp/onnxpipe-bench.lock python3 scripts/bench_quantize.py            # writes docs/quantization.md
    python3 scripts/bench_quantize.py --models models/gpt2-stdlib --eval-tokens 8192 --out /tmp/q.md --json /tmp/q.json

For each model: export fp32 (onnxpipe export), then one quantized directory per row (onnxpipe's quantize_model,
which measures perplexity on the eval text, top-1 agreement and KL against the fp32 model, and sizes), then the
CPU decode latency of every row, measured in interleaved rounds so that a noisy neighbour hurts all rows alike.
Optimum's ORTQuantizer (dynamic int8, avx512_vnni config, per channel) runs in its own virtual environment
(it pins transformers 4.57.6) on the very same exported model.onnx; its result is scored by the same code.
Full results go to --json (benchmarks/results/quantization.json unless told).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
OPTIMUM_VENV = Path("/tmp/venv-optimum-q")
NOTES_MARKER = "## What the numbers say"


@dataclass
class Row:
    name: str
    mode: str | None  # None: the fp32 baseline; "optimum": Optimum's ORTQuantizer
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


ROWS = [
    Row("fp32 (export)", None),
    Row("dynamic int8 (default: activation scale per token or per tensor, chosen per layer)", "dynamic"),
    Row("dynamic int8, per-token activation scales everywhere", "dynamic", {"activations": "token"}),
    Row("dynamic int8, per-tensor activation scales everywhere", "dynamic", {"activations": "tensor"}),
    Row("dynamic int8, LM head + embeddings left fp32", "dynamic", {"lm_head": "fp32", "embeddings": "fp32"}),
    Row("dynamic int8 + SmoothQuant 0.5", "dynamic", {"smoothquant": 0.5}),
    Row("static int8 minmax, per-channel", "static", {"method": "minmax", "per_channel": True}),
    Row("static int8 minmax, per-channel + SmoothQuant 0.5", "static", {"method": "minmax", "per_channel": True, "smoothquant": 0.5}),
    Row("static int8 minmax, per-channel + SmoothQuant auto (alpha per smoothing group)", "static", {"method": "minmax", "per_channel": True, "smoothquant": "auto"}),
    Row("static int8 entropy, per-channel", "static", {"method": "entropy", "per_channel": True}),
    Row("static int8 minmax, per-channel, 32 widest-range layers fp32", "static", {"method": "minmax", "per_channel": True, "static_float_layers": 32}),
    Row("static int8 percentile, per-channel", "static", {"method": "percentile", "per_channel": True}),
    Row("static int8 percentile, per-channel + SmoothQuant 0.5", "static", {"method": "percentile", "per_channel": True, "smoothquant": 0.5}),
    Row("static int8 percentile, per-channel + SmoothQuant auto (alpha per smoothing group)", "static", {"method": "percentile", "per_channel": True, "smoothquant": "auto"}),
    Row("int4 RTN, block 32", "int4", {"algo": "rtn", "block_size": 32}),
    Row("int4 HQQ, block 32", "int4", {"algo": "hqq", "block_size": 32}),
    Row("int4 GPTQ, block 32", "int4", {"algo": "gptq", "block_size": 32}),
    Row("int4 RTN, block 32, float zero points", "int4", {"algo": "rtn", "block_size": 32, "float_zero_points": True}),
    Row("int4 GPTQ, block 32, float zero points", "int4", {"algo": "gptq", "block_size": 32, "float_zero_points": True}),
    Row("int4 RTN, block 128", "int4", {"algo": "rtn", "block_size": 128}),
    Row("int4 GPTQ, block 128", "int4", {"algo": "gptq", "block_size": 128}),
    Row("int4 RTN, per channel", "int4", {"algo": "rtn", "block_size": 0}),
    Row("int4 GPTQ, per channel", "int4", {"algo": "gptq", "block_size": 0}),
    Row("int4 RTN, block 32, LM head int4 too", "int4", {"algo": "rtn", "block_size": 32, "lm_head": "int4"}),
    Row("fp16 (GPU path; CPU timing only for the record)", "fp16"),
    Row("Optimum ORTQuantizer dynamic int8 (avx512_vnni, per-channel)", "optimum"),
]


PLANTED_ROWS = [
    Row("planted outliers: static int8 minmax, per-channel", "static", {"method": "minmax", "per_channel": True}),
    Row("planted outliers: static int8 minmax, per-channel + SmoothQuant 0.5", "static", {"method": "minmax", "per_channel": True, "smoothquant": 0.5}),
    Row("planted outliers: static int8 minmax, per-channel + SmoothQuant auto (alpha per smoothing group)", "static", {"method": "minmax", "per_channel": True, "smoothquant": "auto"}),
    Row("planted outliers: dynamic int8 (default, per layer)", "dynamic"),
    Row("planted outliers: dynamic int8, per-tensor activation scales everywhere", "dynamic", {"activations": "tensor"}),
    Row("planted outliers: dynamic int8 + SmoothQuant 0.5", "dynamic", {"smoothquant": 0.5}),
]
PLANT_FACTOR, PLANT_CHANNELS = 40.0, 2


# the table reports each option set's quality; the gate that `quantize` applies would stop the failing rows
NO_GATE = dict(max_ppl_increase=1e9, min_greedy_agreement=0.0)


def plant(base: Path, out: Path) -> tuple[Path, int]:
    """A copy of the fp32 model with outlier channels planted (smoothquant.plant_outliers): same float function."""
    import onnx

    from onnxpipe.artifact import ModelDir, copy_sidecar_files, derive_manifest, save_onnx, write_manifest
    from onnxpipe.quant.graph import expose_weights
    from onnxpipe.quant.smoothquant import plant_outliers

    md = ModelDir.open(base)
    proto = onnx.load(str(md.model_path))
    plan = expose_weights(proto, md.manifest.graph["logits"])
    groups = plant_outliers(proto, plan.linears, PLANT_FACTOR, PLANT_CHANNELS)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_onnx(proto, out)
    copy_sidecar_files(base, out)
    manifest = derive_manifest(md.manifest)
    manifest.steps.append({"stage": "plant-outliers", "params": {"factor": PLANT_FACTOR, "channels": PLANT_CHANNELS, "groups": groups}})
    write_manifest(out, manifest)
    return out, groups


def export_fp32(hf_dir: Path, out: Path) -> Path:
    from onnxpipe.export import export_decoder

    export_decoder(hf_dir, out, force=True)  # always: a cached export could be of older weights
    return out


def optimum_quantize(src: Path, out: Path) -> tuple[Path | None, str]:
    """Optimum's ORTQuantizer on src/model.onnx, in its venv; returns (model directory, versions) or (None, why)."""
    py = OPTIMUM_VENV / "bin" / "python"
    if not py.is_file():
        return None, f"no Optimum venv at {OPTIMUM_VENV} (python3 -m venv {OPTIMUM_VENV}; pip install optimum-onnx onnxruntime)"
    work = out.with_name(out.name + "-raw")
    shutil.rmtree(work, ignore_errors=True)
    code = (
        "import sys, json, optimum, onnxruntime, transformers\n"
        "from importlib.metadata import version\n"
        "from optimum.onnxruntime import ORTQuantizer\n"
        "from optimum.onnxruntime.configuration import AutoQuantizationConfig\n"
        "q = ORTQuantizer.from_pretrained(sys.argv[1], file_name='model.onnx')\n"
        "q.quantize(save_dir=sys.argv[2], quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))\n"
        "print(json.dumps({'optimum-onnx': version('optimum-onnx'), 'onnxruntime': onnxruntime.__version__, "
        "'transformers': transformers.__version__}))\n"
    )
    proc = subprocess.run([str(py), "-c", code, str(src), str(work)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"Optimum failed: {tail[:200]}"
    produced = next(work.glob("*.onnx"))
    from onnxpipe.artifact import ModelDir, copy_sidecar_files, derive_manifest, write_manifest

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy2(produced, out / "model.onnx")
    copy_sidecar_files(src, out)
    manifest = derive_manifest(ModelDir.open(src).manifest)
    manifest.steps.append({"stage": "optimum-ortquantizer", "params": {"config": "avx512_vnni dynamic per_channel"}})
    write_manifest(out, manifest)
    return out, proc.stdout.strip().splitlines()[-1]


def decode_latency_ms(session: Any, manifest: Any, prompt: Any, steps: int) -> list[float]:
    """Per-token times (ms) of greedy decode steps after a prefill of ``prompt``, numpy I/O through ort_step_fn."""
    import numpy as np

    from onnxpipe.parity import empty_past, ort_step_fn, position_ids_for

    step = ort_step_fn(session, manifest)
    dtypes = {t["name"]: t["dtype"] for t in manifest.graph["inputs"]}
    past = empty_past(manifest, 1, np.dtype(dtypes[manifest.past_names(0)[0]]))
    ids = prompt[None, :].astype(np.int64)
    mask = np.ones_like(ids)
    logits, past = step(ids, mask, position_ids_for(mask, ids.shape[1]), past)
    times = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        t0 = time.perf_counter()
        logits, past = step(nxt, mask, position_ids_for(mask, 1), past)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_latencies(dirs: dict[str, Path], prompt: Any, steps: int, rounds: int, threads: int) -> dict[str, dict[str, float]]:
    import onnxruntime as ort

    from onnxpipe.artifact import ModelDir

    sessions = {}
    for name, d in dirs.items():
        md = ModelDir.open(d)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sessions[name] = (ort.InferenceSession(str(md.model_path), so, providers=["CPUExecutionProvider"]), md.manifest)
    times: dict[str, list[float]] = {n: [] for n in dirs}
    for name, (sess, man) in sessions.items():  # warm-up
        decode_latency_ms(sess, man, prompt, 4)
    for _ in range(rounds):  # interleaved: every row once per round
        for name, (sess, man) in sessions.items():
            times[name].extend(decode_latency_ms(sess, man, prompt, steps))
    return {n: {"median_ms": statistics.median(t), "p10_ms": sorted(t)[len(t) // 10], "samples": len(t)}
            for n, t in times.items()}


def bench_model(hf_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from onnxpipe.artifact import ModelDir
    from onnxpipe.quant import quantize_model
    from onnxpipe.quant.calibration import CalibrationConfig
    from onnxpipe.quant.quality import default_context, quality_report
    from onnxpipe.quant.text import load_tokenizer, read_documents, tokenize_documents

    name = hf_dir.name
    base = export_fp32(hf_dir, work / name)
    src = ModelDir.open(base)
    results: dict[str, Any] = {"model": name, "rows": []}
    dirs: dict[str, Path] = {}
    calib = CalibrationConfig(max_samples=args.calib_samples, prefill_len=args.calib_seq_len)
    for row in ROWS:
        if args.only and not any(s in row.name for s in args.only):
            continue
        out = work / f"{name}-{_slug(row.name)}"
        entry: dict[str, Any] = {"row": row.name, "mode": row.mode, "options": row.options}
        t0 = time.perf_counter()
        try:
            if row.mode is None:
                dirs[row.name] = base
                entry["quality"] = None
            elif row.mode == "optimum":
                made, info = optimum_quantize(base, out)
                entry["optimum"] = info
                if made is None:
                    entry["error"] = info
                else:
                    tokenizer = load_tokenizer(base)
                    ids = tokenize_documents(tokenizer, read_documents(args.eval, "eval"), args.eval_tokens)
                    q = quality_report(src.model_path, made / "model.onnx", src.manifest, ModelDir.open(made).manifest,
                                       ids, default_context(src.manifest), str(args.eval))
                    entry["quality"] = q.to_json()
                    dirs[row.name] = made
            else:
                res = quantize_model(base, out, row.mode, force=True, eval_file=args.eval, max_eval_tokens=args.eval_tokens, **NO_GATE,
                                     calibration=args.calibration, calib=calib, log=lambda m: print(f"    {m}", file=sys.stderr),
                                     **row.options)
                entry["quality"] = res.step["quality"]
                entry["details"] = {k: v for k, v in res.step["details"].items() if k not in ("ops_before",)}
                dirs[row.name] = out
        except Exception as e:  # a row that fails is reported as failed, the others still run
            entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        q = entry.get("quality")
        print(f"  {row.name}: " + (entry.get("error") or (f"ppl {q['ppl_after']:.3f} ({q['ppl_change_pct']:+.2f}%), top-1 "
              f"{q['top1_agreement']:.1%}, KL {q['mean_kl']:.2e}" if q else "baseline")), file=sys.stderr)
        results["rows"].append(entry)
    if not args.only or any("planted" in o for o in args.only):
        planted, groups = plant(base, work / f"{name}-planted")
        results["planted_groups"] = groups
        for row in PLANTED_ROWS:
            entry = {"row": row.name, "mode": row.mode, "options": row.options, "planted": True}
            try:
                res = quantize_model(planted, work / f"{name}-{_slug(row.name)}", row.mode, force=True, eval_file=args.eval,
                                     max_eval_tokens=args.eval_tokens, **NO_GATE, calibration=args.calibration, calib=calib,
                                     log=lambda m: print(f"    {m}", file=sys.stderr), **row.options)
                entry["quality"] = res.step["quality"]
                entry["details"] = {k: v for k, v in res.step["details"].items() if k not in ("ops_before",)}
            except Exception as e:  # reported in the table, the rest still runs
                entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            q = entry.get("quality")
            print(f"  {row.name}: " + (entry.get("error") or f"ppl {q['ppl_after']:.3f} ({q['ppl_change_pct']:+.2f}%), "
                  f"KL {q['mean_kl']:.2e}"), file=sys.stderr)
            results["rows"].append(entry)
    ids = tokenize_documents(load_tokenizer(base), read_documents(args.eval, "eval"), args.prompt_tokens)
    print(f"  decode latency: {len(dirs)} models x {args.rounds} rounds x {args.decode_steps} steps, "
          f"{args.threads} thread(s)...", file=sys.stderr)
    lat = measure_latencies(dirs, np.asarray(ids), args.decode_steps, args.rounds, args.threads)
    for entry in results["rows"]:
        entry["latency"] = lat.get(entry["row"])
    results["fp32_ppl"] = next((e["quality"]["ppl_before"] for e in results["rows"] if e.get("quality")), None)
    return results


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]


def render(all_results: list[dict[str, Any]], args: argparse.Namespace, env: dict[str, Any]) -> str:
    lines = [
        "# Quantization: size, perplexity, agreement and CPU decode speed of every mode",
        "",
        f"Measured by `scripts/bench_quantize.py` on {env['date']} in one run ({env['seconds']:.0f} s), on {env['cpu']} "
        f"({env['cores']} cores, **shared with other engineers' jobs while it ran**; the benchmark held "
        "`/tmp/onnxpipe-bench.lock`, which only keeps other benchmarks out). Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
        "",
        f"Command: `{env['command']}`",
        "",
        f"- Perplexity on the first {args.eval_tokens or 'all'} tokens of `{_rel(args.eval)}` (non-overlapping windows of the "
        "model's context, each a prefill; the same tokens for every row), via ONNX Runtime CPU. \"top-1\" is the share "
        "of those positions where the row's argmax equals fp32's; KL is the mean KL(fp32 || row) in nats.",
        f"- Calibration (static, GPTQ): `{_rel(args.calibration)}`, {args.calib_samples} samples of {args.calib_seq_len} prefill "
        "tokens + 4 decode steps (static) / the prefills (GPTQ), spread over the file.",
        f"- Decode: ms per generated token, batch 1, after a {args.prompt_tokens}-token prompt, {args.decode_steps} greedy steps "
        f"x {args.rounds} interleaved rounds, median (p10 in the JSON); ORT CPU EP, {args.threads} intra-op thread(s), "
        "numpy I/O (the KV cache is copied in and out on every step, the same for every row). \"speed\" = fp32 ms / row ms.",
        "- Size: bytes of model.onnx (+ external data). The graph itself (node names, shapes, torch's metadata) is a fixed "
        "~0.3 MB that quantization does not shrink, a sizeable share at this scale. Unless a row says otherwise, the "
        "LM head and the token embedding are one 8-bit per-row table (shared: both models tie them).",
        "",
    ]
    for res in all_results:
        base_ms = next((e["latency"]["median_ms"] for e in res["rows"] if e["mode"] is None and e.get("latency")), None)
        lines += [f"## {res['model']}", "", f"fp32 perplexity: {res['fp32_ppl']:.3f}" if res.get("fp32_ppl") else "", "",
                  "| row | size MB | size vs fp32 | ppl | ppl change | top-1 | mean KL | decode ms/token | speed vs fp32 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        planted_header = False
        for e in res["rows"]:
            q, lat = e.get("quality"), e.get("latency")
            if e.get("planted") and not planted_header:
                planted_header = True
                lines.append(f"| *below: the fp32 model with outlier channels planted (x{PLANT_FACTOR:g} on {PLANT_CHANNELS} "
                             f"channels of each of {res.get('planted_groups')} norm outputs, weights divided to match: the "
                             "same float function); changes are against that model* | | | | | | | | |")
            ms = f"{lat['median_ms']:.3f}" if lat else "–"
            speed = f"{base_ms / lat['median_ms']:.2f}x" if lat and base_ms else "–"
            if e.get("error"):
                lines.append(f"| {e['row']} | – | – | – | – | – | – | – | failed: {e['error']} |")
            elif q is None:
                first = next((x["quality"] for x in res["rows"] if x.get("quality")), None)
                size = f"{first['size_before'] / 1e6:.2f}" if first else "–"
                lines.append(f"| {e['row']} | {size} | 1.00 | {res.get('fp32_ppl') or 0:.3f} | – | – | – | {ms} | 1.00x |")
            else:
                lines.append(f"| {e['row']} | {q['size_after'] / 1e6:.2f} | {q['size_ratio']:.2f} | {q['ppl_after']:.3f} | "
                             f"{q['ppl_change_pct']:+.2f}% | {q['top1_agreement']:.1%} | {q['mean_kl']:.2e} | {ms} | {speed} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, default=[REPO / "models" / "gpt2-stdlib", REPO / "models" / "llama-stdlib"])
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench-quantize")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "quantization.md")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "quantization.json",
                        help="the full results (default: benchmarks/results/quantization.json)")
    parser.add_argument("--eval", type=Path, default=REPO / "data" / "eval.txt")
    parser.add_argument("--calibration", type=Path, default=REPO / "data" / "calibration.txt")
    parser.add_argument("--eval-tokens", type=int, default=None, help="score only the first N eval tokens (default: quantize's own, 8,192)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="run only rows whose name contains one of these strings")
    args = parser.parse_args()
    import onnx
    import onnxruntime

    import onnxpipe

    start = time.time()  # wall clock: this VM's monotonic clock was seen to lag the wall clock under load
    all_results = []
    for hf_dir in args.models:
        print(f"{hf_dir}:", file=sys.stderr)
        all_results.append(bench_model(hf_dir, args.work, args))
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": time.time() - start,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {"onnxpipe": onnxpipe.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
        "command": "flock /tmp/onnxpipe-bench.lock python3 scripts/bench_quantize.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"env": env, "results": all_results}, indent=1, default=str))
    notes = ""
    if args.out.is_file() and NOTES_MARKER in args.out.read_text():  # the hand-written reading of a run is kept
        notes = args.out.read_text()[args.out.read_text().index(NOTES_MARKER):]
    args.out.write_text(render(all_results, args, env) + ("\n" + notes if notes else ""))
    print(args.out.read_text())
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
