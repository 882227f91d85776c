#!/usr/bin/env python3
"""Decode latency of onnxpipe's optimize levels against the anchors, on this CPU, in one run.

For each model (random weights, built from a config): GPT-2 small (124M) and a ~100M Llama (hidden 768, 12 layers,
12 heads / 4 KV heads, vocab 32000):

  ours-export      onnxpipe export, unoptimized graph
  ours-L1/L2/L3    onnxpipe optimize --level 1/2/3
  optimum          Optimum's exporter + ORTOptimizer (optimization level 2), run in a separate venv (it pins
                   transformers 4.57.6) through a subprocess; the ONNX it writes is timed here with the same driver
  torch-eager      transformers' own model with its KV cache

Every ONNX candidate runs in ORT with graph optimizations on (ORT_ENABLE_ALL), the same thread count, IO binding
with the KV cache kept as ORT values, batch 1, a 128-token prompt, then greedy decode steps; the number is the
median decode-step time. Run it under the shared lock so benchmarks do not overlap:

    flock /tmp/onnxpipe-bench.lock python3 scripts/bench_optimize.py --append docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = {
    "gpt2-124m": ("gpt2", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                               bos_token_id=50256, eos_token_id=50256)),
    "llama-100m": ("llama", dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
}

OPTIMUM_SCRIPT = r"""
import sys
from optimum.onnxruntime import ORTModelForCausalLM, ORTOptimizer
from optimum.onnxruntime.configuration import OptimizationConfig
src, out_plain, out_opt = sys.argv[1:4]
model = ORTModelForCausalLM.from_pretrained(src, export=True, use_cache=True)
model.save_pretrained(out_plain)
optimizer = ORTOptimizer.from_pretrained(model)
optimizer.optimize(save_dir=out_opt, optimization_config=OptimizationConfig(optimization_level=2, optimize_for_gpu=False))
print("optimum ok")
"""


def build_hf(name: str, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    model.save_pretrained(out)
    return out


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_ort(path: Path, prompt: int, steps: int, threads: int, vocab: int, repeats: int) -> tuple[float, list[int]]:
    """Median decode-step milliseconds, and the greedy tokens of the last repeat (to compare candidates)."""
    import onnxruntime as ort

    sess = ort_session(path, threads)
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    past_names = [n for n in inputs if n.startswith("past_key_values")]
    present_names = [n.replace("past_key_values", "present") for n in past_names]
    assert all(n in outputs for n in present_names), (past_names, outputs)
    kv_shape = {i.name: i.shape for i in sess.get_inputs() if i.name in past_names}
    dtype = np.float16 if "float16" in sess.get_inputs()[inputs.index(past_names[0])].type else np.float32
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(0, vocab, size=(1, prompt), dtype=np.int64)
    per_step: list[float] = []
    tokens: list[int] = []
    for _ in range(repeats):
        binding = sess.io_binding()
        past = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_shape[n][1], 0, kv_shape[n][3]), dtype))
                for n in past_names}
        ids, length, tokens = prompt_ids, prompt, []
        for step in range(steps + 1):
            seq = ids.shape[1]
            feed = {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64),
                    "position_ids": np.arange(length - seq, length, dtype=np.int64)[None, :]}
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for n in inputs:
                if n in feed:
                    binding.bind_cpu_input(n, feed[n])
                else:
                    binding.bind_ortvalue_input(n, past[n])
            for n in outputs:
                binding.bind_output(n)
            start = time.perf_counter()
            sess.run_with_iobinding(binding)
            values = binding.get_outputs()
            logits = values[outputs.index("logits")].numpy()
            elapsed = time.perf_counter() - start
            if step > 0:
                per_step.append(elapsed)
            past = {p: values[outputs.index(q)] for p, q in zip(past_names, present_names)}
            nxt = int(logits[0, -1].argmax())
            tokens.append(nxt)
            ids, length = np.array([[nxt]], np.int64), length + 1
    return 1000 * statistics.median(per_step), tokens


def time_torch(hf_dir: Path, prompt: int, steps: int, threads: int, vocab: int, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="sdpa").eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=(1, prompt), dtype=np.int64))
    per_step = []
    with torch.inference_mode():
        for _ in range(repeats):
            cache = DynamicCache()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                start = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                per_step.append(time.perf_counter() - start)
    return 1000 * statistics.median(per_step)


def run_optimum(venv_python: Path, hf_dir: Path, work: Path) -> Path | None:
    plain, opt = work / "optimum-export", work / "optimum-opt"
    work.mkdir(parents=True, exist_ok=True)
    script = work / "optimum_anchor.py"
    script.write_text(OPTIMUM_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run([str(venv_python), str(script), str(hf_dir), str(plain), str(opt)], capture_output=True,
                          text=True, env=env, timeout=3000)
    if proc.returncode != 0 or not (opt / "model_optimized.onnx").exists() and not list(opt.glob("*.onnx")):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  optimum failed: {' | '.join(tail)}", flush=True)
        return None
    onnx_files = sorted(opt.glob("*.onnx"))
    return onnx_files[0]


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--levels", default="1,2,3")
    ap.add_argument("--optimum-python", default="/tmp/venv-optimum/bin/python",
                    help="python of a venv with optimum-onnx (it pins transformers 4.57.6); '' to skip")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager anchor")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    ap.add_argument("--append", default=None, help="append the results table to this markdown file")
    args = ap.parse_args()

    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import optimize_model

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-optimize-"))
    work.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.levels.split(",") if x]
    results: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    try:
        for name in args.models.split(","):
            print(f"== {name}", flush=True)
            vocab = MODELS[name][1]["vocab_size"]
            hf = build_hf(name, work / f"{name}-hf")
            row: dict[str, float] = {}
            exported = work / f"{name}-export"
            export_decoder(hf, exported, verify=False, force=True)
            candidates = {"ours-export": exported / "model.onnx"}
            for level in levels:
                out = work / f"{name}-L{level}"
                t0 = time.perf_counter()
                result = optimize_model(exported, out, level=level, force=True)
                fused = {p.name: p.fused for p in result.passes if p.fused}
                print(f"  optimized L{level} in {time.perf_counter() - t0:.0f}s: final rel err "
                      f"{result.check.rel_err:.2g}; {json.dumps(fused)}", flush=True)
                candidates[f"ours-L{level}"] = out / "model.onnx"
            if args.optimum_python:
                t0 = time.perf_counter()
                opt = run_optimum(Path(args.optimum_python), hf, work / f"{name}-optimum")
                if opt is not None:
                    candidates["optimum"] = opt
                    print(f"  optimum export + ORTOptimizer in {time.perf_counter() - t0:.0f}s", flush=True)
                else:
                    notes.append(f"{name}: Optimum's export/optimize failed; no Optimum anchor")
            reference_tokens = None
            for label, path in candidates.items():
                ms, tokens = time_ort(path, args.prompt, args.steps, args.threads, vocab, args.repeats)
                same = "" if reference_tokens is None else (" (tokens match ours-export)" if tokens == reference_tokens
                                                            else " (tokens DIFFER from ours-export)")
                reference_tokens = reference_tokens or tokens
                row[label] = ms
                print(f"  {label:<12} {ms:7.2f} ms/token{same}", flush=True)
            if not args.no_torch:
                row["torch-eager"] = time_torch(hf, args.prompt, args.steps, args.threads, vocab, args.repeats)
                print(f"  {'torch-eager':<12} {row['torch-eager']:7.2f} ms/token", flush=True)
            results[name] = row
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    table = format_table(results, args, notes)
    print()
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + table + "\n")


def format_table(results: dict[str, dict[str, float]], args: argparse.Namespace, notes: list[str]) -> str:
    anchors = ("optimum", "torch-eager")
    lines = [
        f"### optimize: decode latency ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- device: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; other processes may have shared "
        "these cores during the run",
        f"- versions: {json.dumps(versions())}; Optimum anchor: optimum-onnx in a separate venv "
        "(transformers 4.57.6, same onnxruntime), ORTOptimizer optimization_level=2",
        f"- command: `flock /tmp/onnxpipe-bench.lock python3 scripts/bench_optimize.py {' '.join(sys.argv[1:])}`",
        f"- batch 1, prompt {args.prompt}, {args.steps} greedy decode steps x {args.repeats}; median decode-step ms; "
        "ONNX candidates in ORT (ORT_ENABLE_ALL, IO binding, KV kept as ORT values); random weights",
        "",
    ]
    cols = sorted({c for row in results.values() for c in row}, key=lambda c: (c in anchors, c))
    lines.append("| model | " + " | ".join(cols) + " | L3 vs best anchor |")
    lines.append("| --- | " + " | ".join("---:" for _ in cols) + " | ---: |")
    for name, row in results.items():
        best = min((row[a] for a in anchors if a in row), default=None)
        ratio = f"{best / row['ours-L3']:.2f}x faster" if best and "ours-L3" in row and row["ours-L3"] <= best else (
            f"{row['ours-L3'] / best:.2f}x slower" if best and "ours-L3" in row else "n/a")
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" if c in row else "-" for c in cols) + f" | {ratio} |")
    lines += [f"- note: {n}" for n in notes]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
