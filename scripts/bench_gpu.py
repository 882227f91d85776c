#!/usr/bin/env python3
"""GPU decode speed, side by side on one random-weight model: PyTorch eager ``generate``, transformers with a
static cache + torch.compile, ONNX Runtime GenAI (its model builder on the same HF directory; with and without
CUDA graphs) and onnxpipe (export -> optimize level 3 -> runtime).

    python3 scripts/bench_gpu.py --out $OUT                        # on the GPU machine: Llama-3.2-1B shape, fp16
    python scripts/bench_gpu.py --device cpu --tiny --out /tmp/b   # smoke test here: tiny config, fp32
    python scripts/bench_gpu.py --render OUT/bench_gpu.json --write-docs docs/benchmarks.md

One process (this one) orchestrates; every anchor runs in a child process of its own, so its GPU memory is its own
(peak read per process through NVML) and a child that overruns the budget is killed without losing the others.
Builds (onnxpipe export + optimize, GenAI's builder) run in the background on their own CPU cores while the
PyTorch anchors run on the GPU. Every result is printed and written to OUT/bench_gpu.json as soon as it exists;
when the time budget (--budget-s) is spent the remaining rows are skipped and said so.
This file is the command line and the orchestration; the model and its builds are in bench_gpu_builds.py, the
timed rows (one child each) in bench_gpu_anchors.py, the floors and the table in bench_gpu_report.py.

Timing, the same for every anchor: a row's prompt is B x 128 random token ids, greedy, 128 new tokens, no early
stop. prefill ms = start of the call until the first new token is on the host; decode ms = time between the first
and the last new token / 127 (each step ends with its token ids on the host); tokens/s = B x 128 / the whole call.
One warm-up call, then --repeats timed calls; the table shows the median.
Floors: decode step >= (weight bytes + KV bytes read at the mean length) / measured device copy bandwidth;
prefill >= max(bytes / bandwidth, 2 x params x tokens / measured fp16 matmul rate).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the pieces below live beside this file

from bench_gpu_anchors import ANCHORS, CHILDREN, LABELS, PRIORITY, _read_json  # noqa: E402
from bench_gpu_builds import RESULT, SHAPES  # noqa: E402
from bench_gpu_report import render, versions, write_docs  # noqa: E402


# ----------------------------------------------------------------------------------------------- orchestration
class MemoryWatch:
    """Peak device memory per process id, read through NVML every 50 ms (falls back to the device's total in use,
    less what was in use at the start, when NVML lists no processes)."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nv = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.peak: dict[int, int] = {}
        self.total_peak = 0
        self.method = "nvml per process"
        self._stop = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while not self._stop:
            try:
                for p in self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if p.usedGpuMemory:
                        self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.usedGpuMemory)
                self.total_peak = max(self.total_peak, self.nv.nvmlDeviceGetMemoryInfo(self.handle).used - self.baseline)
            except Exception:  # a process that ends between the listing and the read
                pass
            time.sleep(0.05)

    def reset_total(self):
        self.total_peak = 0

    def of(self, pid: int) -> tuple[int, str]:
        if pid in self.peak:
            return self.peak[pid], "nvml per process"
        return self.total_peak, "nvml device total less idle"


class Child:
    """A child process whose stdout lines are collected by a thread; results are lines starting with RESULT."""

    def __init__(self, name: str, spec: dict, log, cores: set[int] | None):
        self.name = name
        path = Path(spec["work"]) / f"spec-{name}.json"
        path.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        pre = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", name, "--spec", str(path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True, preexec_fn=pre)
        self.results: queue.Queue = queue.Queue()
        self.tail: list[str] = []
        self._log = log
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                self.results.put(json.loads(line[len(RESULT):]))
            else:
                self._log(f"[{self.name}] {line.rstrip()}")
                self.tail = (self.tail + [line.rstrip()])[-5:]
        self.results.put(None)

    def next(self, deadline: float):
        """The next result, None when the child has ended, or "timeout" at the deadline (the child is killed)."""
        try:
            return self.results.get(timeout=max(deadline - time.time(), 0.01))
        except queue.Empty:
            self.kill()
            return "timeout"

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group: the child and what it started
            self.proc.wait()

    def error(self) -> str:
        self.proc.wait()
        return f"exit {self.proc.returncode}: " + " | ".join(self.tail[-2:])


def main_orchestrate(args) -> int:
    t0 = time.time()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "int4_tokens.json").unlink(missing_ok=True)  # this run's plain int4 tokens only (kernels' agreement)
    logf = (out / "bench_gpu.log").open("a")

    def log(msg: str):
        logf.write(msg + "\n")
        logf.flush()
        if args.verbose:
            print(msg, flush=True)

    cuda = args.device == "cuda"
    shape = "tiny" if args.tiny else args.shape
    spec = {"device": args.device, "shape": shape, "dtype": "fp16" if cuda else "fp32",
            "torch_dtype": "float16" if cuda else "float32", "vocab": SHAPES[shape]["vocab_size"],
            "prompt": args.prompt, "new": args.new_tokens, "repeats": args.repeats, "agree_steps": min(args.agree_steps, args.new_tokens),
            "profile_steps": args.profile_steps,
            "work": str(work), "hf": str(work / "hf"), "exported": str(work / "exported"),
            "optimized": str(work / "optimized"), "genai": str(work / "genai"), "int4": str(work / "int4"),
            "genai_int4": str(work / "genai-int4"), "target": args.target or ("cuda" if cuda else "cpu"),
            "provider": "cuda" if cuda else "cpu", "genai_precision": "fp16" if cuda else "fp32",
            "genai_ep": "cuda" if cuda else "cpu", "reference_tokens": str(work / "torch_tokens.json"),
            "reuse": args.reuse}
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": " ".join(sys.argv),
           "shape": shape, "dtype": spec["dtype"], "prompt": args.prompt, "new_tokens": args.new_tokens,
           "repeats": args.repeats, "budget_s": args.budget_s, "versions": versions(), "rows": [], "skipped": [],
           "builds": {}, "notes": []}

    def save():
        res["elapsed_s"] = round(time.time() - t0, 1)
        (out / "bench_gpu.json").write_text(json.dumps(res, indent=1))
        (out / "bench_gpu.md").write_text(render(res))

    mem = None
    if cuda:
        try:
            mem = MemoryWatch()
        except Exception as e:  # no NVML: the table says so rather than guessing
            res["notes"].append(f"no peak memory: NVML unavailable ({type(e).__name__}: {e})")
    ncpu = os.cpu_count() or 1
    bench_cores = set(range(min(6, ncpu))) if ncpu >= 12 else None
    build_cores = set(range(6, ncpu)) if ncpu >= 12 else None
    if bench_cores:
        res["notes"].append(f"benchmarks pinned to cores {min(bench_cores)}-{max(bench_cores)}, builds to "
                            f"{min(build_cores)}-{max(build_cores)} (they overlap in time)")

    child = Child("setup", spec, log, None)
    r = child.next(deadline)
    if not isinstance(r, dict):
        res["skipped"].append({"what": "everything", "why": f"setup failed: {child.error() if r is None else r}"})
        save()
        print(render(res))
        return 1
    res["setup"] = r
    print(f"setup: {r['params'] / 1e6:.1f}M params, {r['weight_bytes'] / 1e9:.2f} GB weights, copy "
          f"{r['copy_bw_GBs']:.0f} GB/s, matmul {r.get('matmul_TFLOPs') or 0:.0f} TFLOP/s ({r['build_s']} s)", flush=True)
    save()

    builds = {"onnxpipe": Child("build_onnxpipe", spec, log, build_cores)}
    if ("genai" in args.anchors or "genai_graph" in args.anchors) and (cuda or args.genai_cpu):
        builds["genai"] = Child("build_genai", spec, log, build_cores)
    if {"onnxpipe_int4_graph", "onnxpipe_int4_graph_fpa", "onnxpipe_int4_graph_kernels",
        "onnxpipe_int4_graph_kernels_nohead", "onnxpipe_int4_graph_kernels_noqkv",
        "onnxpipe_int4_graph_kernels_nofuse", "onnxpipe_int4_graph_kernels_hgemv",
        "onnxpipe_int4_graph_pairs"} & set(args.anchors):
        builds["onnxpipe_int4"] = Child("build_onnxpipe_int4", spec, log, build_cores)
    if {"genai_int4", "genai_int4_graph", "genai_int4_graph_fpa"} & set(args.anchors) and (cuda or args.genai_cpu):
        builds["genai_int4"] = Child("build_genai_int4", spec, log, build_cores)
    build_state: dict[str, str | None] = {}  # None: ready; str: why not

    def build_done(name: str, block: bool) -> bool:
        """Read what the build has reported; True once it finished (ready or failed: see build_state)."""
        if name in build_state:
            return True
        c = builds.get(name)
        if c is None:
            build_state[name] = "not requested"
            return True
        want = {"onnxpipe": "optimize", "genai": "genai", "onnxpipe_int4": "onnxpipe_int4",
                "genai_int4": "genai_int4"}[name]
        while True:
            if block:
                r = c.next(deadline - args.reserve_s)
            else:
                try:
                    r = c.results.get_nowait()
                except queue.Empty:
                    return False
            if r == "timeout":
                build_state[name] = "build did not finish within the time budget"
            elif r is None:
                build_state[name] = f"build failed ({c.error()})"
            else:
                res["builds"][r["stage"]] = r
                print(f"build {r['stage']}: {r.get('seconds', '')} s {r.get('error', '')}", flush=True)
                save()
                if "error" in r:
                    build_state[name] = f"build failed: {r['error']}"
                elif r["stage"] == want:
                    build_state[name] = None
            if name in build_state:
                return True

    needs = {"onnxpipe": "onnxpipe", "onnxpipe_fullhead": "onnxpipe", "onnxpipe_graph": "onnxpipe", "onnxpipe_graph_hostfed": "onnxpipe", "onnxpipe_graph_xqa": "onnxpipe",
             "onnxpipe_int4_graph": "onnxpipe_int4", "genai_int4": "genai_int4", "genai_int4_graph": "genai_int4",
             "onnxpipe_int4_graph_fpa": "onnxpipe_int4", "genai_int4_graph_fpa": "genai_int4",
             "onnxpipe_int4_graph_kernels": "onnxpipe_int4", "onnxpipe_int4_graph_kernels_nohead": "onnxpipe_int4",
             "onnxpipe_int4_graph_kernels_noqkv": "onnxpipe_int4", "onnxpipe_int4_graph_kernels_nofuse": "onnxpipe_int4",
             "onnxpipe_int4_graph_kernels_hgemv": "onnxpipe_int4", "onnxpipe_int4_graph_pairs": "onnxpipe_int4",
             "onnxpipe_graph_kernels": "onnxpipe", "onnxpipe_graph_kernels_linear": "onnxpipe",
             "onnxpipe_profile": "onnxpipe", "genai": "genai",
             "genai_graph": "genai"}
    small = [b for b in args.batches if b <= 8]
    large = [b for b in args.batches if b > 8]
    order = sorted(args.anchors, key=PRIORITY.index)
    plan = [(a, [1] if a in ("genai_graph", "genai_int4_graph", "genai_int4_graph_fpa") else small) for a in order]
    if "onnxpipe" in args.anchors and args.profile_steps > 1:
        plan.append(("onnxpipe_profile", [1]))
    plan += [(a, large) for a in order if a not in ("genai_graph", "genai_int4_graph", "genai_int4_graph_fpa")]
    for graphs in ("genai_graph", "genai_int4_graph", "genai_int4_graph_fpa"):  # GenAI captures CUDA graphs only at batch 1
        if graphs in args.anchors:
            res["skipped"] += [{"what": f"{ANCHORS[graphs]} b{b}", "why": "GenAI's CUDA graphs are for batch 1"}
                               for b in args.batches if b != 1]
    plan = [(a, bs) for a, bs in plan if bs]
    while plan:
        # the first row in priority order whose model is built; when every left row waits on a build, wait
        ready = [item for item in plan if item[0] not in needs or build_done(needs[item[0]], block=False)]
        anchor, batches = ready[0] if ready else plan[0]
        plan.remove((anchor, batches))
        if anchor.startswith("genai") and not cuda and not args.genai_cpu:
            res["skipped"].append({"what": f"{LABELS[anchor]} b{batches}", "why": "cpu run without --genai-cpu"})
            continue
        why = None
        if anchor in needs:
            build_done(needs[anchor], block=True)
            why = build_state[needs[anchor]]
        if why is None and time.time() > deadline - args.reserve_s:
            why = "time budget spent"
        if why is not None:
            res["skipped"].append({"what": f"{LABELS[anchor]} b{batches}", "why": why})
            print(f"skip {anchor} {batches}: {why}", flush=True)
            save()
            continue
        if mem:
            mem.reset_total()
        started = time.time()
        c = Child(anchor, dict(spec, batches=batches), log, bench_cores)
        # one slow anchor (a long compile) must not eat the rows after it: each child gets a cap of its own
        child_deadline = min(deadline, time.time() + args.cap_s * (2 if anchor == "torch_compile" else 1))
        done = set()
        while True:
            r = c.next(child_deadline)
            if r == "timeout" or r is None:
                left = [b for b in batches if b not in done]
                if left:
                    why = (f"time budget spent (killed after {time.time() - started:.0f} s)" if r == "timeout"
                           else f"failed: {c.error()}")
                    res["skipped"].append({"what": f"{LABELS[anchor]} b{left}", "why": why})
                    print(f"skip {anchor} {left}: {why}", flush=True)
                break
            done.add(r["batch"])
            if r["kind"] == "profile":
                res["profile"] = r
                print(f"profile b1: model_run {r['model_run_ms']} ms/step, kernels {r['kernel_ms_total']} ms: "
                      + ", ".join(f"{k} {v}" for k, v in list(r["kernel_ms_by_op"].items())[:6]), flush=True)
                save()
                continue
            row = {"anchor": anchor, **{k: v for k, v in r.items() if k not in ("kind", "tokens", "gaps")}}
            if mem:
                row["peak_mem_MB"], row["mem_method"] = (round(x / 2**20) if isinstance(x, int) else x for x in mem.of(c.proc.pid))
            if anchor == "torch_eager" and r.get("tokens"):
                ref = _read_json(spec["reference_tokens"]) or {}
                ref[str(r["batch"])] = r["tokens"]
                if r.get("gaps"):
                    ref[f"gaps{r['batch']}"] = r["gaps"]
                Path(spec["reference_tokens"]).write_text(json.dumps(ref))
            res["rows"].append(row)
            print(f"{anchor} b{r['batch']}: prefill {r['prefill_ms']:.2f} ms, decode {r['decode_ms']:.3f} ms/step, "
                  f"{r['tok_s']:.0f} tok/s, peak {row.get('peak_mem_MB', '-')} MB", flush=True)
            save()
        c.kill()
    for c in builds.values():
        c.kill()
    save()
    print()
    print(render(res))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama config instead of the 1B shape")
    ap.add_argument("--shape", default="llama-1b", choices=[k for k in SHAPES if k != "tiny"])
    ap.add_argument("--target", choices=["cpu", "cuda"], help="optimize's target (default: the device's)")
    ap.add_argument("--batches", default="1,8,32")
    opt_in = ("onnxpipe_graph_xqa", "onnxpipe_int4_graph_fpa", "genai_int4_graph_fpa", "onnxpipe_int4_graph_kernels",
              "onnxpipe_int4_graph_kernels_nohead", "onnxpipe_int4_graph_kernels_noqkv", "onnxpipe_int4_graph_kernels_nofuse",
              "onnxpipe_int4_graph_kernels_hgemv", "onnxpipe_int4_graph_pairs", "onnxpipe_graph_kernels",
              "onnxpipe_graph_kernels_linear")
    ap.add_argument("--anchors", default=",".join(a for a in ANCHORS if a not in opt_in),
                    help="default: all but " + ", ".join(opt_in) + " (XQA, runs 7-8: level with the default kernel; "
                         "the fpA_intB ones: opt-in kernels; the *_kernels* ones, _pairs and onnxpipe_graph_kernels: "
                         "onnxpipe's own kernels, built at first use with nvcc: everywhere, all but the LM head, all but "
                         "the packed qkv, gate/up apart, every call the half2 GEMV form, only the gate/up pairs (as one "
                         "MatMulNBits), fp16 pairs, fp16 pairs and every MatMul as Linear)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--agree-steps", type=int, default=64)
    ap.add_argument("--profile-steps", type=int, default=32, help="decode steps of the ORT-profiled run; 0: none")
    ap.add_argument("--budget-s", type=float, default=500, help="stop starting rows after this; kill what overruns")
    ap.add_argument("--cap-s", type=float, default=110, help="most seconds one anchor's child may run (compile: twice)")
    ap.add_argument("--reserve-s", type=float, default=25, help="leave this much of the budget unstarted")
    ap.add_argument("--genai-cpu", action="store_true", help="run the GenAI rows on the CPU too (smoke test)")
    ap.add_argument("--out", default="out/bench_gpu")
    ap.add_argument("--work", default="/tmp/onnxpipe_bench_gpu")
    ap.add_argument("--reuse", action="store_true",
                    help="take --work's checkpoint (hf/) and builds (optimized/, int4/, genai/, genai-int4/) where "
                         "they exist, e.g. the 8B ones scripts/measure_scale.py built and timed")
    ap.add_argument("--verbose", action="store_true", help="echo the children's logs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--render", help="print the table of a bench_gpu.json")
    ap.add_argument("--write-docs", help="with --render: put the table into this markdown file's GPU decode section")
    args = ap.parse_args()
    if args.child:
        CHILDREN[args.child](json.loads(Path(args.spec).read_text()))
        return 0
    if args.render:
        res = json.loads(Path(args.render).read_text())
        print(render(res))
        if args.write_docs:
            write_docs(res, Path(args.write_docs))
        return 0
    args.batches = [int(b) for b in args.batches.split(",")]
    args.anchors = [a for a in args.anchors.split(",") if a]
    unknown = set(args.anchors) - set(ANCHORS)
    if unknown:
        ap.error(f"unknown anchors {sorted(unknown)}; known: {', '.join(ANCHORS)}")
    return main_orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
