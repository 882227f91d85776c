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


class OrtDecoder:
    """One ONNX candidate: an ORT session driven with IO binding, the KV cache kept as ORT values."""

    def __init__(self, path: Path, threads: int):
        self.sess = ort_session(path, threads)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values")]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        assert all(n in self.outputs for n in self.present_names), (self.past_names, self.outputs)
        meta = {i.name: i for i in self.sess.get_inputs()}
        self.kv_shape = {n: meta[n].shape for n in self.past_names}
        self.dtype = np.float16 if "float16" in meta[self.past_names[0]].type else np.float32

    def decode(self, prompt_ids: np.ndarray, steps: int) -> tuple[list[float], list[int]]:
        """Prefill then ``steps`` greedy steps: (seconds of each decode step, the tokens)."""
        import onnxruntime as ort

        binding = self.sess.io_binding()
        past = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, s[1], 0, s[3]), self.dtype))
                for n, s in self.kv_shape.items()}
        ids, length = prompt_ids, prompt_ids.shape[1]
        times, tokens = [], []
        for step in range(steps + 1):
            seq = ids.shape[1]
            feed = {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64),
                    "position_ids": np.arange(length - seq, length, dtype=np.int64)[None, :]}
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for n in self.inputs:
                if n in feed:
                    binding.bind_cpu_input(n, feed[n])
                else:
                    binding.bind_ortvalue_input(n, past[n])
            for n in self.outputs:
                binding.bind_output(n)
            start = time.perf_counter()
            self.sess.run_with_iobinding(binding)
            values = binding.get_outputs()
            logits = values[self.outputs.index("logits")].numpy()
            if step > 0:
                times.append(time.perf_counter() - start)
            past = {p: values[self.outputs.index(q)] for p, q in zip(self.past_names, self.present_names)}
            tokens.append(int(logits[0, -1].argmax()))
            ids, length = np.array([[tokens[-1]]], np.int64), length + 1
        return times, tokens


class TorchDecoder:
    """transformers' own model, eager, with its KV cache: the PyTorch anchor."""

    def __init__(self, hf_dir: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="sdpa").eval()

    def decode(self, prompt_ids: np.ndarray, steps: int) -> tuple[list[float], list[int]]:
        import torch
        from transformers import DynamicCache

        times, tokens = [], []
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(prompt_ids), past_key_values=DynamicCache(), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
            for _ in range(steps):
                start = time.perf_counter()
                out = self.model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - start)
                tokens.append(int(nxt))
        return times, tokens


def measure(decoders: dict[str, object], prompt_ids: np.ndarray, steps: int, rounds: int
            ) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Round-robin over the candidates, one decode run each per round, so that load from other processes on the
    machine falls on all of them alike; per candidate, the median of its per-round median step times."""
    per_round: dict[str, list[float]] = {name: [] for name in decoders}
    tokens: dict[str, list[int]] = {}
    for name, dec in decoders.items():  # warm-up, not timed
        dec.decode(prompt_ids, 2)
    for _ in range(rounds):
        for name, dec in decoders.items():
            time.sleep(0.2)  # let the previous candidate's spinning pool threads go idle
            times, tokens[name] = dec.decode(prompt_ids, steps)
            per_round[name].append(statistics.median(times))
    return {name: 1000 * statistics.median(v) for name, v in per_round.items()}, tokens


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
    ap.add_argument("--repeats", type=int, default=5, help="rounds over all candidates")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--levels", default="1,2,3")
    ap.add_argument("--optimum-python", default="/tmp/venv-optimum/bin/python",
                    help="python of a venv with optimum-onnx (it pins transformers 4.57.6); '' to skip")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager anchor")
    ap.add_argument("--work", default=None,
                    help="working directory, kept; models already built there are reused (default: a temporary one)")
    ap.add_argument("--append", default=None, help="append the results table to this markdown file")
    args = ap.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-optimize-"))
    work.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.levels.split(",") if x]
    results: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    try:
        for name in args.models.split(","):
            print(f"== {name}", flush=True)
            vocab = MODELS[name][1]["vocab_size"]
            candidates, hf = build_candidates(name, work, levels, args, notes)
            decoders: dict[str, object] = {label: OrtDecoder(path, args.threads) for label, path in candidates.items()}
            if not args.no_torch:
                decoders["torch-eager"] = TorchDecoder(hf, args.threads)
            prompt_ids = np.random.default_rng(0).integers(0, vocab, size=(1, args.prompt), dtype=np.int64)
            row, tokens = measure(decoders, prompt_ids, args.steps, args.repeats)
            for label, ms in row.items():
                same = "" if label == "ours-export" else (
                    " (greedy tokens match ours-export)" if tokens[label] == tokens["ours-export"]
                    else " (greedy tokens DIFFER from ours-export)")
                print(f"  {label:<12} {ms:7.2f} ms/token{same}", flush=True)
            results[name] = row
            del decoders
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    table = format_table(results, args, notes)
    print()
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + table + "\n")


def build_candidates(name: str, work: Path, levels: list[int], args: argparse.Namespace, notes: list[str]
                     ) -> tuple[dict[str, Path], Path]:
    """The HF model, our export and levels, and Optimum's model; kept artifacts under --work are reused."""
    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import optimize_model

    hf = work / f"{name}-hf"
    if not (hf / "config.json").exists():
        build_hf(name, hf)
    exported = work / f"{name}-export"
    if not (exported / "onnxpipe.json").exists():
        export_decoder(hf, exported, verify=False, force=True)
    candidates = {"ours-export": exported / "model.onnx"}
    for level in levels:
        out = work / f"{name}-L{level}"
        if not (out / "onnxpipe.json").exists():
            t0 = time.perf_counter()
            result = optimize_model(exported, out, level=level, force=True)
            fused = {p.name: {k: v for k, v in p.fused.items() if isinstance(v, str)} for p in result.passes
                     if any(isinstance(v, str) for v in p.fused.values())}
            print(f"  optimized L{level} in {time.perf_counter() - t0:.0f}s: final rel err "
                  f"{result.check.rel_err:.2g}; {json.dumps(fused)}", flush=True)
        candidates[f"ours-L{level}"] = out / "model.onnx"
    if args.optimum_python:
        existing = sorted((work / f"{name}-optimum" / "optimum-opt").glob("*.onnx"))
        opt = existing[0] if existing else run_optimum(Path(args.optimum_python), hf, work / f"{name}-optimum")
        if opt is not None:
            candidates["optimum"] = opt
        else:
            notes.append(f"{name}: Optimum's export/optimize failed; no Optimum anchor")
    return candidates, hf


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
        f"- batch 1, prompt {args.prompt}, {args.steps} greedy decode steps; {args.repeats} rounds over all candidates "
        "in turn (so load from other processes falls on all alike); ms/token = median over rounds of each round's "
        "median decode step; ONNX candidates in ORT (ORT_ENABLE_ALL, IO binding, KV kept as ORT values); "
        "random weights",
        "",
    ]
    order = ["ours-export", "ours-L1", "ours-L2", "ours-L3", *anchors]
    cols = sorted({c for row in results.values() for c in row}, key=lambda c: order.index(c) if c in order else 99)
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
