"""Scoring throughput: `onnxpipe score` (ONNX Runtime) against plain transformers on the same texts, same run.

    flock /tmp/onnxpipe-bench.lock python3 scripts/bench_score.py models/gpt2-stdlib --texts 2000
    python3 scripts/bench_score.py --device cuda --out OUT        # the GPU machine: fp16, int4, int8 rows
    python3 scripts/bench_score.py --device cpu --tiny            # the same code path in a minute on a CPU

The texts are the first N pieces of data/eval.txt's paragraphs (1, 2, 3, 6 or 12 lines each, in turn), written as a JSONL of {"id", "text"} records. The ONNX side is the library's `score()` on an fp32 export of the
model directory (exported once into --work). The transformers side does the same work: the same token ids (BOS +
text), the same windows, the same length-bucketed batches with the same token budget, left-padded, fp32,
`torch.no_grad()`, log-softmax and gather. Both run with the same number of threads. tokens/s counts scored tokens
over wall time (model load excluded; for onnxpipe the time includes reading, tokenizing and writing the output).
Per-record log-likelihoods of both sides are compared as a check.

--device cpu|cuda builds its own model instead: random weights of a real shape (--shape; --tiny for a 2-layer
one), from a transformers config, with the tokenizer of a reference model under models/. With onnxpipe's CLI
(in parallel where the inputs allow) it exports fp16 and fp32, optimizes the fp16 export (level 3, --target the
device, unchecked: the score comparison below is the check), and quantizes the fp32 export to int4 (RTN) and
dynamic int8. Then each engine scores the same texts in a process of its own, one after another, timed
--repeats times (the last is reported): transformers fp32 (the reference for the loglik differences) and fp16
(the anchor for the speed ratio) on the device, and `onnxpipe score` on the fp16 graph (the optimized one, or
the exported one when onnxruntime does not load it: said in the row), the int4 and the int8 graph. Before
timing, one profiled batch shows which execution provider runs each node; a quantized graph whose quantized
ops would run on the CPU EP of a GPU run is not run ("no CUDA kernel"). Peak GPU memory comes from NVML when
pynvml is importable. Writes OUT/bench_score.json and OUT/bench_score.md and prints the table last; stops
starting new work after --budget-s seconds. Refuses in one line when --device cuda has no CUDA to use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


PIECE_LINES = (1, 2, 3, 6, 12)  # lines per text, in turn: a spread of lengths for the length bucketing


def cut_texts(path: Path, n: int) -> list[str]:
    """Paragraphs (blank-line separated) cut into pieces of 1, 2, 3, 6, 12, 1, ... lines: 2,125 texts from eval.txt."""
    text = path.read_text(encoding="utf-8").replace("<|endoftext|>", "\n\n")
    pieces, turn = [], 0
    for para in (b.strip("\n") for b in text.split("\n\n")):
        lines = para.split("\n")
        i = 0
        while i < len(lines) and para.strip():
            k = PIECE_LINES[turn % len(PIECE_LINES)]
            turn += 1
            piece = "\n".join(lines[i:i + k])
            i += k
            if piece.strip():
                pieces.append(piece)
    if len(pieces) < n:
        raise SystemExit(f"{path} gives only {len(pieces)} texts; ask for fewer --texts")
    return pieces[:n]


def export_once(hf_dir: Path, work: Path) -> Path:
    from onnxpipe.artifact import ModelDir

    out = work / f"{hf_dir.name}-onnx"
    try:
        ModelDir.open(out)
        return out
    except Exception:
        shutil.rmtree(out, ignore_errors=True)
    from onnxpipe.export import export_decoder

    export_decoder(hf_dir, out, dtype="fp32")
    return out


def run_onnxpipe(onnx_dir: Path, records: Path, work: Path, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    from onnxpipe.score import ScoreConfig, score

    out = work / "scores.jsonl"
    cfg = ScoreConfig(provider="cpu", threads=args.threads, batch_tokens=args.batch_tokens, force=True,
                      progress=False, chunk_records=args.chunk_records)
    t0 = time.perf_counter()
    summary = score(onnx_dir, records, out, cfg, log=lambda m: None)
    wall = time.perf_counter() - t0  # includes opening the session
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {"seconds": summary.seconds, "wall_with_load": wall, "tokens": summary.tokens,
            "padding": summary.padding_fraction, "provider": summary.provider}, rows


def run_transformers(hf_dir: Path, onnx_dir: Path, texts: list[str], args: argparse.Namespace, device: str = "cpu",
                     dtype: str = "fp32") -> tuple[dict, list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    if device == "cpu":
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, TORCH_DTYPES[dtype])).to(device).eval()
    res, loglik, _counts = transformers_loglik(model, onnx_dir, texts, args.batch_tokens, device)
    return res, loglik


TORCH_DTYPES = {"fp32": "float32", "fp16": "float16"}


def transformers_loglik(model, onnx_dir: Path, texts: list[str], batch_tokens: int, device: str
                        ) -> tuple[dict, list[float], list[int]]:
    """The same work as `onnxpipe score` in transformers: the same token ids, windows and length-bucketed
    left-padded batches; log-softmax in fp32 over the scored rows, on the model's device. Timed from tokenizing
    to the last result on the host (a CUDA run is synchronized by that copy)."""
    import numpy as np
    import torch

    from onnxpipe.artifact import ModelDir
    from onnxpipe.score.batching import cut_windows, plan_batches
    from onnxpipe.score.encoding import Encoder
    from onnxpipe.score.records import Record

    md = ModelDir.open(onnx_dir)
    context = int(md.manifest.model["max_position_embeddings"])
    stride = context // 2
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    items = Encoder(md).items([Record(i, str(i), text=t) for i, t in enumerate(texts)])
    windows = [(k, it.tokens[b:e], f - b) for k, it in enumerate(items) for b, e, f in
               cut_windows(len(it.tokens), context, stride, it.score_from)]
    loglik = torch.zeros(len(items), dtype=torch.float64, device=device)
    counts = np.zeros(len(items), np.int64)
    with torch.no_grad():
        for batch in plan_batches([len(w[1]) for w in windows], batch_tokens, 0.2):
            width = max(len(windows[i][1]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                seq = windows[i][1]
                ids[r, width - len(seq):] = torch.tensor(seq)
                mask[r, width - len(seq):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)).logits
            rows, cols, targets, owner = [], [], [], []
            for r, i in enumerate(batch):  # the logit at p predicts the token at p + 1; gather only scored rows
                k, seq, first = windows[i]
                t = np.arange(first, len(seq))
                rows.append(np.full(len(t), r))
                cols.append(width - len(seq) + t - 1)
                targets.append(np.asarray(seq)[t])
                owner.append(np.full(len(t), k))
                counts[k] += len(t)
            rows, cols, targets, owner = (torch.from_numpy(np.concatenate(a)).to(device)
                                          for a in (rows, cols, targets, owner))
            logprobs = torch.log_softmax(logits[rows, cols].float(), dim=-1)
            picked = logprobs.gather(-1, targets[:, None]).squeeze(-1).double()
            loglik.index_add_(0, owner, picked)
    out = loglik.cpu().tolist()
    return {"seconds": time.perf_counter() - t0, "tokens": int(counts.sum())}, out, counts.tolist()


def versions() -> str:
    import onnxruntime
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}"


# ---- --device cpu|cuda: a random-weight model of a real shape, its onnxpipe variants and transformers, one run ----

# family, config, tokenizer files (copied from models/NAME; ids < 4096, so the model's larger vocabulary is only
# a wider softmax), default text count. Random weights with initializer_range 0.1, as tests/gpu/conftest.py
# uses, so that logits are not near-uniform and the loglik comparison can see an error.
SHAPES = {
    "llama-150m": ("llama", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024), "llama-stdlib"),
    "gpt2-small": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024), "gpt2-stdlib"),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=8192, max_position_embeddings=128), "llama-stdlib"),
}
# ops that carry a quantized model's weights: on a GPU run, one of these on the CPU EP means the row is not a GPU row
QUANT_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
             "QLinearMatMul", "MatMulNBits", "GatherBlockQuantized"}
CHILD_LIMIT_S = 120.0  # one engine's process: load, placement check, --repeats timed runs
FP16_FACTOR = 2.0  # onnxpipe fp16 passes if its worst per-token error is within 2x transformers fp16's (+1e-3)


def refuse_device(device: str) -> str | None:
    """One line saying why this machine cannot run --device cuda, or None."""
    if device != "cuda":
        return None
    try:
        import torch
    except ImportError:
        return "--device cuda needs torch with CUDA; torch is not importable"
    if not torch.cuda.is_available():
        return f"--device cuda needs a CUDA GPU, but torch {torch.__version__} sees none (torch.cuda.is_available() is False)"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"--device cuda needs onnxruntime-gpu; the onnxruntime {ort.__version__} imported from "
                f"{Path(ort.__file__).parent} lists only {', '.join(ort.get_available_providers())}")
    return None


def build_hf(shape: str, work: Path) -> Path:
    """A random-weight Hugging Face directory of SHAPES[shape] (seed 0, fp32 weights), built once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    family, dims, tokenizer = SHAPES[shape]
    hf = work / f"hf-{shape}"
    if (hf / "config.json").is_file():
        return hf
    tmp = work / f".hf-{shape}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, **dims, initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "models" / tokenizer / name, tmp / name)
    tmp.rename(hf)
    return hf


@dataclass
class Build:
    """One onnxpipe CLI call that writes a model directory (kept for the next run when it completed)."""

    name: str
    out: Path
    argv: list[str]
    needs: str | None = None
    seconds: float | None = None
    error: str | None = None
    reused: bool = False
    stderr: str = ""

    def run(self, deadline: float) -> None:
        from onnxpipe.artifact import ModelDir

        try:
            ModelDir.open(self.out)
            self.reused, self.seconds = True, 0.0
            return
        except Exception:
            shutil.rmtree(self.out, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "onnxpipe", *self.argv], capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()), cwd=REPO)
            self.stderr = proc.stderr[-50_000:]
            if proc.returncode != 0:
                lines = [x for x in proc.stderr.splitlines() if x.strip()]
                self.error = f"exit {proc.returncode}: {lines[-1][:300] if lines else 'no message'}"
        except subprocess.TimeoutExpired:
            self.error = "stopped: out of the time budget"
        self.seconds = time.perf_counter() - t0


def run_builds(builds: list[Build], deadline: float, log) -> None:
    """Every build whose input is ready, in parallel (the exports, then what reads them)."""
    from concurrent.futures import ThreadPoolExecutor

    by_name = {b.name: b for b in builds}
    left = list(builds)
    with ThreadPoolExecutor(max_workers=len(builds)) as pool:
        while left:
            ready = [b for b in left if b.needs is None or by_name[b.needs].seconds is not None]
            for b in ready:
                if b.needs and by_name[b.needs].error:
                    b.error, b.seconds = f"not built: {b.needs} failed", 0.0
            futures = [pool.submit(b.run, deadline) for b in ready if b.error is None]
            for f in futures:
                f.result()
            for b in ready:
                left.remove(b)
                log(f"build {b.name}: " + (b.error or ("reused" if b.reused else f"{b.seconds:.1f}s")))


class GpuMemory:
    """Peak GPU memory of a child process through NVML (pynvml), polled every 20 ms: the process's own figure when
    NVML lists its pid, else the device's used memory less what was used before it started. None without pynvml."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self.nv = None

    def watch(self, proc: subprocess.Popen) -> dict | None:
        if self.nv is None:
            proc.wait()
            return None
        import threading

        nv, h = self.nv, self.handle
        base = nv.nvmlDeviceGetMemoryInfo(h).used
        peak = {"process": 0, "device": 0}

        def poll() -> None:
            while proc.poll() is None:
                try:
                    for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                        if p.pid == proc.pid and p.usedGpuMemory:
                            peak["process"] = max(peak["process"], p.usedGpuMemory)
                    peak["device"] = max(peak["device"], nv.nvmlDeviceGetMemoryInfo(h).used - base)
                except Exception:
                    pass
                time.sleep(0.02)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        proc.wait()
        t.join()
        if peak["process"]:
            return {"MB": round(peak["process"] / 2**20), "how": "NVML, the process (CUDA context included)"}
        return {"MB": round(peak["device"] / 2**20), "how": "NVML, device used less before (CUDA context included)"}


def run_child(spec: dict, work: Path, deadline: float, gpu: GpuMemory | None) -> dict:
    """One scoring side in a fresh process (its own GPU memory, no torch/ORT arenas shared); its result JSON."""
    name = spec["name"]
    if time.monotonic() > deadline - 5:
        return {"name": name, "not_run": "out of the time budget"}
    spec_path, result_path = work / f"child-{name}.json", work / f"result-{name}.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    log_path = work / f"child-{name}.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
        limit = min(deadline - time.monotonic(), CHILD_LIMIT_S)  # a hung child does not take the whole budget
        timer = __import__("threading").Timer(max(1.0, limit), proc.kill)
        timer.start()
        mem = gpu.watch(proc) if gpu is not None else (proc.wait(), None)[1]
        timer.cancel()
    if not result_path.is_file():
        tail = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
        why = f"killed after {limit:.0f}s (time budget)" if proc.returncode in (-9, 137) else \
            f"failed (exit {proc.returncode}): {tail[-1][:300] if tail else 'no output'}"
        return {"name": name, "not_run": why}
    res = json.loads(result_path.read_text())
    if mem is not None:
        res["gpu_memory"] = mem
    return res


def child_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    res = child_torch(spec) if spec["engine"] == "transformers" else child_onnxpipe(spec)
    import resource

    res["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    Path(spec["result"]).write_text(json.dumps(res))
    return 0


def child_torch(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    device = spec["device"]
    if device == "cpu":
        torch.set_num_threads(spec["threads"])
    texts = [json.loads(x)["text"] for x in Path(spec["records"]).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=getattr(torch, TORCH_DTYPES[spec["dtype"]]))
    model = model.to(device).eval()
    runs = []
    for _ in range(spec["repeats"]):  # the first run also pays for cuBLAS/cuDNN set-up on a GPU
        res, loglik, counts = transformers_loglik(model, Path(spec["encoder_dir"]), texts, spec["batch_tokens"], device)
        runs.append(res["seconds"])
    out = {"name": spec["name"], "seconds": runs[-1], "runs_seconds": runs, "tokens": res["tokens"], "loglik": loglik,
           "counts": counts, "provider": f"torch {device} ({spec['dtype']}, {model.config._attn_implementation})"}
    if device == "cuda" and spec["dtype"] == "fp32":
        out["provider"] += f", TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    if device == "cuda":
        out["torch_max_allocated_MB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def placement(model_dir: Path, provider: str, threads: int | None, work: Path) -> tuple[dict, str]:
    """Which execution provider runs each node (one profiled batch): {provider: {op: nodes}}, and the provider
    summary. Raises OnnxpipeError when the graph does not load on the provider."""
    import onnxruntime as ort

    from onnxpipe.artifact import ModelDir
    from onnxpipe.runtime.providers import create_session
    from onnxpipe.score.scorer import WindowScorer, gpu_session_options

    md = ModelDir.open(model_dir)
    so = gpu_session_options(provider) or ort.SessionOptions()  # the graph optimization level score() uses
    so.enable_profiling = True
    so.profile_file_prefix = str(work / f"placement-{model_dir.name}")
    session, choice = create_session(md.model_path, provider, threads=threads, session_options=so,
                                     graph_inputs=md.manifest.graph["inputs"], announce=lambda _m: None)
    scorer = WindowScorer(session, md.manifest, choice.summary())
    scorer.score([(np.arange(2, 34) % 200, 1), (np.arange(7, 20) % 200, 1)])
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    nodes: dict[str, dict[str, set]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args and e.get("name", "").endswith("_kernel_time"):
            nodes.setdefault(args["provider"], {}).setdefault(args.get("op_name", "?"), set()).add(e["name"])
    return {p: {op: len(v) for op, v in sorted(ops.items())} for p, ops in nodes.items()}, choice.summary()


def graph_form(model_dir: Path) -> str:
    """What the manifest says about the graph: fused attention, padding side, dtype."""
    m = json.loads((model_dir / "onnxpipe.json").read_text())
    fused = [p.get("details", p.get("fused", {})).get("attention blocks fused") for s in m.get("steps", [])
             for p in s.get("passes", []) if p.get("name") == "attention" and p.get("status") == "kept"]
    g = m.get("graph", {})
    return ", ".join(x for x in (f"attention fused {fused[-1]}" if fused and fused[-1] else "attention unfused",
                                 f"{g.get('padding_side', 'left')}-padded", g.get("dtype")) if x)


def child_onnxpipe(spec: dict) -> dict:
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.score import ScoreConfig, score

    work, provider = Path(spec["work"]), spec["provider"]
    threads = spec["threads"] if provider == "cpu" else None
    tried: list[str] = []
    for label, model_dir in spec["candidates"]:  # e.g. the optimized graph, then the exported one
        try:
            nodes, summary = placement(Path(model_dir), provider, threads, work)
            break
        except Exception as e:  # onnxpipe's one-line error, or onnxruntime's own when the first batch fails
            text = str(e).split(": ", 1)[-1] if isinstance(e, OnnxpipeError) else f"{type(e).__name__}: {e}"
            tried.append(f"{label}: {text.strip().splitlines()[0][:240] if text.strip() else type(e).__name__}")
    else:
        return {"name": spec["name"], "not_run": "no graph loaded: " + " | ".join(tried)}
    res = {"name": spec["name"], "graph": label, "model_dir": model_dir, "fallbacks": tried, "nodes": nodes,
           "provider": summary, "form": graph_form(Path(model_dir))}
    on_cpu = nodes.get("CPUExecutionProvider", {})
    if provider != "cpu":
        heavy = {op: n for op, n in on_cpu.items() if op in QUANT_OPS}
        if heavy:
            res["not_run"] = ("no CUDA kernel: " + ", ".join(f"{op} x{n}" for op, n in heavy.items())
                              + f" placed on the CPU EP by onnxruntime (of {sum(map(sum, map(dict.values, nodes.values())))} nodes)")
            return res
    runs, messages = [], []
    for r in range(spec["repeats"]):
        out = work / f"scores-{spec['name']}.jsonl"
        cfg = ScoreConfig(provider=provider, threads=threads, batch_tokens=spec["batch_tokens"], force=True,
                          progress=False, chunk_records=spec["chunk_records"], head=spec.get("head", "auto"))
        t0 = time.perf_counter()
        summary = score(model_dir, spec["records"], out, cfg, log=messages.append)
        runs.append({"seconds": summary.seconds, "wall_with_load": time.perf_counter() - t0})
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    res.update(seconds=runs[-1]["seconds"], runs=runs, tokens=summary.tokens, padding=summary.padding_fraction,
               loglik=[r["loglik"] for r in rows], counts=[r["tokens"] for r in rows], provider=summary.provider,
               messages=sorted(set(messages)))
    return res


def compare(res: dict, ref: dict) -> dict:
    """Per-record loglik against the reference (transformers fp32): worst record, worst per token, corpus ppl."""
    if "loglik" not in res or "loglik" not in ref:
        return {}
    if res["counts"] != ref["counts"]:
        return {"error": "scored token counts differ from the reference"}
    diffs = [abs(a - b) for a, b in zip(res["loglik"], ref["loglik"])]
    per_token = [d / n for d, n in zip(diffs, res["counts"])]
    tokens = sum(res["counts"])
    ppl, ref_ppl = math.exp(-sum(res["loglik"]) / tokens), math.exp(-sum(ref["loglik"]) / tokens)
    return {"max_abs_diff": max(diffs), "max_per_token": max(per_token), "mean_per_token": sum(diffs) / tokens,
            "ppl": ppl, "ppl_change_pct": 100 * (ppl / ref_ppl - 1)}


def main_device(args: argparse.Namespace) -> int:
    why = refuse_device(args.device)
    if why:
        print(f"bench_score: {why}", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    shape = "tiny" if args.tiny else args.shape
    n_texts = args.texts or (200 if args.tiny else 2000)
    batch_tokens = args.batch_tokens or (16384 if args.device == "cuda" else 4096)
    work = args.work / f"{args.device}-{shape}"
    out_dir = args.out or work
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    texts = cut_texts(args.text, n_texts)
    records = work / "texts.jsonl"
    records.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    hf = build_hf(shape, work)
    log(f"model {shape} at {hf}; {n_texts} texts")
    target = args.optimize_target or ("cuda" if args.device == "cuda" else "cpu")
    eval_tokens = ["--eval-tokens", "1024"]
    builds = [
        Build("export-fp16", work / "fp16", ["export", str(hf), "-o", str(work / "fp16"), "--dtype", "fp16", "--no-verify"]),
        Build("export-fp32", work / "fp32", ["export", str(hf), "-o", str(work / "fp32"), "--no-verify"]),
        Build("optimize-fp16", work / "fp16-opt", ["optimize", str(work / "fp16"), "-o", str(work / "fp16-opt"),
                                                   "--level", "3", "--target", target, "--skip-verify"], "export-fp16"),
        Build("int4-rtn", work / "int4", ["quantize", str(work / "fp32"), "-o", str(work / "int4"), "--mode", "int4",
                                          "--algo", "rtn", *eval_tokens], "export-fp32"),
        Build("int8-dynamic", work / "int8", ["quantize", str(work / "fp32"), "-o", str(work / "int8"),
                                              "--mode", "dynamic", *eval_tokens], "export-fp32"),
    ]
    run_builds(builds, deadline - 90, log)  # leave the scoring its share of the budget
    built = {b.name: b for b in builds}
    encoder_dir = next((b.out for b in builds[:2] if not b.error), None)
    if encoder_dir is None:
        print(f"bench_score: both exports failed: {builds[0].error} / {builds[1].error}", file=sys.stderr)
        return 1

    gpu = GpuMemory() if args.device == "cuda" else None
    common = {"device": args.device, "records": str(records), "batch_tokens": batch_tokens,
              "chunk_records": args.chunk_records, "threads": args.threads, "repeats": args.repeats, "work": str(work)}
    ort_provider = "cuda" if args.device == "cuda" else "cpu"
    specs = [
        {"name": "transformers-fp32", "engine": "transformers", "dtype": "fp32", "hf": str(hf), "encoder_dir": str(encoder_dir)},
        {"name": "transformers-fp16", "engine": "transformers", "dtype": "fp16", "hf": str(hf), "encoder_dir": str(encoder_dir)},
        {"name": "onnxpipe-fp16", "engine": "onnxpipe", "provider": ort_provider, "builds": ["optimize-fp16", "export-fp16"],
         "candidates": [[f"optimize L3 (target {target})", str(work / "fp16-opt")], ["export (unfused)", str(work / "fp16")]]},
        {"name": "onnxpipe-int4", "engine": "onnxpipe", "provider": ort_provider, "builds": ["int4-rtn"],
         "candidates": [["int4 RTN of the fp32 export", str(work / "int4")]]},
        {"name": "onnxpipe-int8", "engine": "onnxpipe", "provider": ort_provider, "builds": ["int8-dynamic"],
         "candidates": [["dynamic int8 of the fp32 export", str(work / "int8")]]},
        # the fp16 row again with the log-softmax in numpy on the host (the logits cross the bus): what the
        # device head saves; one timed run, last, so the time budget drops it first
        {"name": "onnxpipe-fp16-host-head", "engine": "onnxpipe", "provider": ort_provider, "head": "host",
         "repeats": 1, "builds": ["optimize-fp16", "export-fp16"],
         "candidates": [[f"optimize L3 (target {target})", str(work / "fp16-opt")], ["export (unfused)", str(work / "fp16")]]},
    ]
    results = {}
    for spec in specs:
        missing = [built[b].error for b in spec.get("builds", [])]
        dropped = [f"{c[0]}: {built[b].name} {built[b].error}" for c, b in zip(spec.get("candidates", []),
                                                                          spec.get("builds", [])) if built[b].error]
        spec["candidates"] = [c for c, b in zip(spec.get("candidates", []), spec.get("builds", [])) if not built[b].error]
        if spec["engine"] == "onnxpipe" and not spec["candidates"]:
            results[spec["name"]] = {"name": spec["name"], "not_run": "; ".join(m for m in missing if m)}
        else:
            results[spec["name"]] = run_child({**common, **spec}, work, deadline, gpu)
            crashed = results[spec["name"]].get("not_run", "").startswith("failed")
            if crashed and len(spec["candidates"]) > 1:  # onnxruntime died loading the first graph: try the next
                why = f"{spec['candidates'][0][0]}: the process {results[spec['name']]['not_run']}"
                results[spec["name"]] = run_child({**common, **spec, "candidates": spec["candidates"][1:]}, work,
                                                  deadline, gpu)
                results[spec["name"]].setdefault("fallbacks", []).insert(0, why)
        r = results[spec["name"]]
        if dropped and "not_run" not in r:
            r["fallbacks"] = dropped + r.get("fallbacks", [])
        log(f"{spec['name']}: " + (r.get("not_run") or f"{r['tokens']} tokens in {r['seconds']:.2f}s"))

    report = device_report(args, shape, texts, batch_tokens, builds, results, time.monotonic() - t_start,
                           count_params(hf))
    logs = out_dir / "logs"  # what each build and engine process said, for a run that cannot be repeated soon
    logs.mkdir(exist_ok=True)
    for b in builds:
        (logs / f"build-{b.name}.log").write_text(b.stderr)
    for spec in specs:
        if (work / f"child-{spec['name']}.log").is_file():
            shutil.copy(work / f"child-{spec['name']}.log", logs / f"{spec['name']}.log")
    (out_dir / "bench_score.json").write_text(json.dumps(report["json"], indent=1))
    (out_dir / "bench_score.md").write_text(report["markdown"])
    print(report["markdown"])
    return 0


ROW_LABELS = {
    "transformers-fp32": "transformers fp32 (reference)",
    "transformers-fp16": "transformers fp16",
    "onnxpipe-fp16": "onnxpipe score fp16",
    "onnxpipe-int4": "onnxpipe score int4 (RTN, block 32; fp32 activations)",
    "onnxpipe-int8": "onnxpipe score int8 (dynamic)",
    "onnxpipe-fp16-host-head": "onnxpipe score fp16, log-softmax in numpy (host)",
}


def device_report(args, shape: str, texts: list[str], batch_tokens: int, builds: list, results: dict,
                  wall: float, params: int) -> dict:
    ref, anchor = results["transformers-fp32"], results["transformers-fp16"]
    anchor_tps = anchor["tokens"] / anchor["seconds"] if "seconds" in anchor else None
    yard = compare(anchor, ref).get("max_per_token")
    lines = [f"# bench_score --device {args.device}: model {shape} ({SHAPES[shape][0]}, {params / 1e6:.1f}M params, random weights), "
             f"{len(texts)} texts, batch budget {batch_tokens} slots, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"# {device_name(args.device)}; {versions()}; wall {wall:.0f}s",
             "",
             "| engine | graph | seconds | scored tokens/s | vs transformers fp16 | max abs dloglik/record | "
             "max dloglik/token | corpus ppl (vs fp32) | check | peak memory MB | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows_json = {}
    for name, r in results.items():
        cmp = compare(r, ref) if name != "transformers-fp32" else {}
        check = ""
        if name == "transformers-fp32":
            check = "reference"
        elif name.startswith("onnxpipe-fp16") and cmp.get("max_per_token") is not None and yard is not None:
            limit = FP16_FACTOR * yard + 1e-3
            check = f"{'pass' if cmp['max_per_token'] <= limit else 'FAIL'} (<= {limit:.2e}/token)"
        elif name == "transformers-fp16" and cmp:
            check = "yardstick"
        elif cmp:
            check = "quality (no tolerance)"
        rows_json[name] = {k: v for k, v in r.items() if k not in ("loglik", "counts")} | {"vs_fp32": cmp, "check": check}
        if "not_run" in r:
            lines.append(f"| {ROW_LABELS[name]} | {r.get('graph', '')} | | | | | | | | | not run: {r['not_run']} |")
            continue
        tps = r["tokens"] / r["seconds"]
        mem = r.get("gpu_memory", {}).get("MB") if args.device == "cuda" else r.get("peak_rss_MB")
        if args.device == "cuda" and "torch_max_allocated_MB" in r:
            mem = f"{mem} (torch allocated {r['torch_max_allocated_MB']})"
        notes = []
        if r.get("fallbacks"):
            notes.append("fell back from " + "; ".join(r["fallbacks"]))
        if "nodes" not in r:
            notes.append(r.get("provider", ""))
        else:
            cpu = r["nodes"].get("CPUExecutionProvider", {})
            total = sum(sum(v.values()) for v in r["nodes"].values())
            if args.device == "cuda" and not total:
                notes.append("node placement not seen (no node events in onnxruntime's profile)")
            elif args.device == "cuda":
                top = sorted(cpu.items(), key=lambda kv: (kv[0] not in QUANT_OPS, -kv[1]))  # all ops in the JSON
                notes.append(f"{sum(cpu.values())}/{total} nodes on the CPU EP"
                             + (f" ({', '.join(f'{k} x{v}' for k, v in top[:6])}{', ...' if len(top) > 6 else ''})"
                                if cpu else ""))
            notes.append(r["provider"].split(" [")[0])
            notes.append(r.get("form", ""))
        lines.append(
            f"| {ROW_LABELS[name]} | {r.get('graph', '-')} | {r['seconds']:.2f} | {tps:,.0f} | "
            f"{f'{tps / anchor_tps:.2f}x' if anchor_tps else '-'} | "
            f"{cmp.get('max_abs_diff', 0):.2e} | {cmp.get('max_per_token', 0):.2e} | "
            f"{cmp.get('ppl', math.exp(-sum(r['loglik']) / r['tokens'])):.2f} ({cmp.get('ppl_change_pct', 0):+.2f}%) | "
            f"{check} | {mem if mem is not None else '-'} | {'; '.join(notes)} |")
    lines += ["",
              "- Builds: " + "; ".join(f"{b.name} " + (b.error or ("reused" if b.reused else f"{b.seconds:.1f}s"))
                                       for b in builds),
              f"- seconds: scoring wall time of the last of {args.repeats} run(s) per engine (1 for the host-head row), "
              "model load excluded "
              "(onnxpipe: reading, tokenizing, scoring, writing the output; transformers: tokenizing and scoring); "
              "each engine in its own process, one after another.",
              "- peak memory: " + ("per engine process, " + next((r["gpu_memory"]["how"] for r in results.values()
                                                                   if "gpu_memory" in r), "no NVML (pynvml not importable)")
                                   + "; torch's own max_memory_allocated in brackets" if args.device == "cuda" else
                                   "the engine process's peak RSS"),
              "- dloglik: |loglik - transformers fp32's| per record (natural log, the record's sum), and the same "
              "divided by the record's scored tokens. fp16 check: onnxpipe fp16's worst per-token error within "
              f"{FP16_FACTOR:g}x transformers fp16's own (the yardstick row) + 1e-3. The weights are random "
              "(initializer_range 0.1: confident, mostly wrong predictions), so the int4/int8 perplexity changes say "
              "nothing about quantization quality (docs/quantization.md measures that on trained models); they "
              "show the graphs ran and how far they moved.",
              ]
    return {"markdown": "\n".join(lines) + "\n",
            "json": {"device": args.device, "device_name": device_name(args.device), "shape": shape,
                     "config": SHAPES[shape][1], "params": params, "texts": len(texts), "batch_tokens": batch_tokens,
                     "versions": versions(), "wall_s": wall, "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
                     "builds": [{"name": b.name, "seconds": b.seconds, "error": b.error, "reused": b.reused,
                                 "argv": b.argv} for b in builds],
                     "rows": rows_json}}


def count_params(hf: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child_main(Path(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_model_dir", type=Path, nargs="?", default=None,
                   help="a trained HF model to score on the CPU (default models/gpt2-stdlib); not with --device")
    p.add_argument("--onnx-dir", type=Path, default=None, help="an onnxpipe export of the model (default: export it)")
    p.add_argument("--text", type=Path, default=REPO / "data" / "eval.txt")
    p.add_argument("--texts", type=int, default=None, help="default 2000 (200 with --tiny)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=None, help="default 4096 (16384 with --device cuda)")
    p.add_argument("--chunk-records", type=int, default=512)
    p.add_argument("--work", type=Path, default=Path("/tmp/onnxpipe-bench-score"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    g = p.add_argument_group("device mode: a random-weight model, its fp16/int4/int8 variants and transformers")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None)
    g.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="llama-150m")
    g.add_argument("--tiny", action="store_true", help="a 2-layer model and 200 texts: a smoke test of the code path")
    g.add_argument("--repeats", type=int, default=2, help="timed runs per engine; the last is reported")
    g.add_argument("--budget-s", type=float, default=230.0, help="stop starting work after this many seconds")
    g.add_argument("--out", type=Path, default=None, help="where bench_score.json and bench_score.md go")
    g.add_argument("--optimize-target", choices=("cpu", "cuda"), default=None,
                   help="optimize --target for the fp16 graph (default: the device)")
    args = p.parse_args()
    if args.device is not None:
        if args.hf_model_dir is not None or args.onnx_dir is not None:
            p.error("--device builds its own model: drop HF_MODEL_DIR / --onnx-dir")
        return main_device(args)
    return main_model_dir(args)


def main_model_dir(args: argparse.Namespace) -> int:
    args.hf_model_dir = args.hf_model_dir or REPO / "models" / "gpt2-stdlib"
    args.texts = args.texts or 2000
    args.batch_tokens = args.batch_tokens or 4096

    args.work.mkdir(parents=True, exist_ok=True)
    texts = cut_texts(args.text, args.texts)
    records = args.work / "texts.jsonl"
    records.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    onnx_dir = args.onnx_dir or export_once(args.hf_model_dir, args.work)

    ours, rows = run_onnxpipe(onnx_dir, records, args.work, args)
    ref, ref_loglik = run_transformers(args.hf_model_dir, onnx_dir, texts, args)
    assert ours["tokens"] == ref["tokens"], (ours["tokens"], ref["tokens"])
    diff = max(abs(r["loglik"] - x) for r, x in zip(rows, ref_loglik))
    chars = sum(len(t) for t in texts)
    ours_tps, ref_tps = ours["tokens"] / ours["seconds"], ref["tokens"] / ref["seconds"]

    print(f"# {len(texts)} texts ({chars} chars, {ours['tokens']} scored tokens) from {args.text.name}; "
          f"model {args.hf_model_dir.name}; {args.threads} threads; batch budget {args.batch_tokens} tokens")
    print(f"# {platform.processor() or platform.machine()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {versions()}")
    print("| engine | seconds | scored tokens/s | records/s | vs transformers |")
    print("|---|---|---|---|---|")
    print(f"| transformers (fp32, batched, no_grad) | {ref['seconds']:.2f} | {ref_tps:,.0f} | "
          f"{len(texts) / ref['seconds']:,.1f} | 1.00x |")
    print(f"| onnxpipe score (ORT CPU, fp32) | {ours['seconds']:.2f} | {ours_tps:,.0f} | "
          f"{len(texts) / ours['seconds']:,.1f} | {ours_tps / ref_tps:.2f}x |")
    print(f"# padding {ours['padding']:.1%} of batch slots; max |loglik diff| per record vs transformers {diff:.2e}; "
          f"onnxpipe wall incl. session load {ours['wall_with_load']:.2f}s")
    if args.json:
        args.json.write_text(json.dumps({"onnxpipe": ours, "transformers": ref, "max_abs_loglik_diff": diff,
                                         "texts": len(texts), "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
