"""The server's own cost per decode step, measured on the CPU against a stand-in for a GPU's step.

On a GPU a decode step of the slot layout is one CUDA-graph replay (~1.7 ms at batch 32 for the 1B shape on an
H100) during which the scheduler's thread waits in onnxruntime with the GIL released; what the server adds around it
(the scheduler's Python per step, the event loop writing the streams, the GIL they share) decides how close served
tokens/s get to the offline batch. This script measures that part on the CPU:

- the real server stack: ``create_app`` (Starlette on uvicorn, uvloop), the slot layout's scheduler through the
  session's CUDA-graph slot path (its fixed buffers, replays with a graph id, the step tail that feeds greedy steps
  on the "device", the overlap of a step's rows with the next step), real streaming HTTP clients on loopback in a
  process of their own (``load_test.level``);
- over a stand-in device (``PacedRuns``): a tiny random Llama (2 layers, width 64, a word-level tokenizer, as
  ``load_test.py --build-1b`` makes its model; fp32 on the CPU EP, ~0.3 ms a 32-row step on the 2-core machine)
  whose every run takes at least a GPU's time: a replay of the decode graph (``gpu_graph_id`` >= 0) ``--step-ms``, any
  other run (a prefill into a row, outside the graph) ``--prefill-ms``, the rest slept with ``time.sleep`` (which
  releases the GIL, as onnxruntime's CUDA run does; with ``--sleep precise``, the default, on threads whose timer
  slack is 1 ns, so that a sleep ends within ~40 us of its time here rather than ~90). The tokens are the tiny
  model's own, so they are deterministic.

The offline figure is the same stand-in's: a batch of ``streams`` prompts read in one prefill run, then
``max_tokens - 1`` decode steps, per request a client sends (``offline``). served / offline is the ratio a GPU run
measures (scripts/load_test.py's "served / offline"). Where the served run's time went (``breakdown``): the device
time its runs needed (more than offline's: one prefill run per request rather than one per batch, and the steps
whose rows were not full), and the rest, the server's own: the scheduler's Python between runs, the time a run's
thread waited past its end to run Python again (the sleep's overshoot, measured idle first, and the GIL), and the
loop between iterations; the CPU seconds of each thread of the server (``/proc``) and of the client process.

    nice -n 10 python scripts/serve_overhead.py --workdir /tmp/serve-overhead --json /tmp/serve-overhead/run.json

The machine running it matters: on 2 cores the client process competes with the server's threads (a GPU host has
16); its CPU seconds are printed so that this can be judged. The run is bounded (``--budget-s``, at most 120 s):
repeats that would start after it are left out and said so, a client run still going when it ends is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

MAX_BUDGET_S = 120.0  # the whole run, at most
PR_SET_TIMERSLACK = 29  # linux/prctl.h
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True)


# ---- the stand-in device ----
@dataclass(frozen=True)
class DeviceCost:
    """What a run costs on the device the stand-in plays: a decode step (a CUDA-graph replay of every row, the same
    whoever is in it), and a prefill run (outside the graph: a fixed part, its kernel launches, and a part per token
    it reads). The defaults are the H100's with the 1B shape (runs 25/26, docs/serve.md): a quiet decode step of 32
    rows 1.7 ms; one 128-token prompt's prefill run 2.3 ms; offline generate's batch of 32 such prompts at 18,244
    tokens/s, i.e. 224.5 ms for 128 tokens, 127 steps of them 216 ms, so ~8.6 ms for its [32, 128] prefill: 2.1 ms
    fixed and 1.6 us a token."""

    step_s: float = 0.0017
    prefill_s: float = 0.0021
    prefill_token_s: float = 1.6e-6

    def __post_init__(self) -> None:
        for name, low, high in (("step_s", 0.0, 1.0), ("prefill_s", 0.0, 1.0), ("prefill_token_s", None, 1e-3)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high
            if not ok or (value <= low if low is not None else value < 0):
                span = f"({low}, {high}]" if low is not None else f"[0, {high}]"
                raise ValueError(f"{name} must be in {span} seconds, got {value!r}")

    def prefill(self, tokens: int) -> float:
        """A prefill run of ``tokens`` tokens (all its rows' together)."""
        return self.prefill_s + self.prefill_token_s * tokens

    def offline(self, streams: int, new_tokens: int, requests_per_client: int = 1,
                prompt_tokens: int = 128) -> dict[str, float]:
        """The stand-in's offline batch: ``streams`` prompts of ``prompt_tokens`` read in one prefill run (it gives
        each row its first token), then ``new_tokens - 1`` decode steps of every row; once per request a client
        sends."""
        for name, value in (("streams", streams), ("new_tokens", new_tokens),
                            ("requests_per_client", requests_per_client), ("prompt_tokens", prompt_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        seconds = requests_per_client * (self.prefill(streams * prompt_tokens) + (new_tokens - 1) * self.step_s)
        tokens = streams * new_tokens * requests_per_client
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "prefill_runs": requests_per_client, "steps": requests_per_client * (new_tokens - 1)}


@dataclass
class Run:
    kind: str  # "step" (a replay of the decode graph) or "prefill" (any other run)
    start: float  # perf_counter seconds
    inner_s: float  # the tiny model's own run (CPU, GIL released)
    inner_cpu_s: float  # of it, the thread's CPU seconds
    device_s: float  # what the run stands for: max(cost, inner_s)
    late_s: float  # from the run's end (start + device_s) until its thread ran Python again


class PacedRuns:
    """Stands in for the InferenceSession of a GPU: each ``run_with_iobinding`` runs the wrapped session (the tiny
    model's tokens) and then sleeps until the device's cost has passed since the call began (``DeviceCost``: a
    replay of a graph id >= 0 is a decode step, any other run a prefill). ``runs`` records each. Everything else is
    the wrapped session's."""

    def __init__(self, inner: Any, cost: DeviceCost, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep, new_thread: Callable[[], Any] | None = None):
        self._inner, self.cost, self._clock, self._sleep = inner, cost, clock, sleep
        self.runs: list[Run] = []
        # called once on each thread that runs, before its first run (``precise_timers``: its sleeps end on time)
        self._new_thread, self._threads = new_thread, set()

    def io_binding(self) -> "TokenCount":
        return TokenCount(self._inner.io_binding())

    def run_with_iobinding(self, io: Any, run_options: Any = None) -> None:
        gid = int(run_options.get_run_config_entry("gpu_graph_id") or -1) if run_options is not None else -1
        kind = "step" if gid >= 0 else "prefill"
        tokens = getattr(io, "tokens", 0)
        if self._new_thread is not None and threading.get_ident() not in self._threads:
            self._threads.add(threading.get_ident())
            self._new_thread()
        start, cpu = self._clock(), time.thread_time()
        self._inner.run_with_iobinding(getattr(io, "inner", io), run_options)
        inner, cpu = self._clock() - start, time.thread_time() - cpu
        device = max(self.cost.step_s if kind == "step" else self.cost.prefill(tokens), inner)
        if device > inner:
            self._sleep(device - inner)
        self.runs.append(Run(kind, start, inner, cpu, device, max(self._clock() - (start + device), 0.0)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class TokenCount:
    """An IOBinding that remembers how many tokens its run reads (the ``input_ids`` bound from the host: a prefill's;
    a decode step's are the graph slot's, bound once)."""

    def __init__(self, inner: Any):
        self.inner, self.tokens = inner, 0

    def bind_cpu_input(self, name: str, array: Any) -> None:
        if name == "input_ids":
            self.tokens = int(np.size(array))
        self.inner.bind_cpu_input(name, array)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def precise_timers() -> bool:
    """Ask Linux for 1 ns of timer slack on the calling thread (prctl PR_SET_TIMERSLACK): by default a sleep of
    this thread may end up to 50 us late so that the kernel can group wakeups, which a GPU's wait (a spin) does not
    do; False where it cannot be asked (not Linux)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stand_in(model_dir: Path, cost: DeviceCost, precise: bool = True) -> tuple[Any, PacedRuns]:
    """The model directory (a CUDA form: ``optimize --target cuda``) on the CPU EP, one thread, through the session's
    CUDA-graph slot path with the step tail (what a GPU server runs, minus the GPU), its runs paced by ``cost``."""
    from onnxpipe.runtime.generate import LanguageModel
    from onnxpipe.runtime.session import DecoderSession
    from onnxpipe.tokenizer import Tokenizer

    s = DecoderSession(model_dir, "cpu", threads=1, feed_back=True, last_position=True)
    if not (s.shares_buffer and s.fed):
        raise SystemExit(f"{model_dir}: not a shared-buffer graph with the step tail (optimize --target cuda)")
    s.cuda_graph = True  # decode steps through the session's graph slot (replays by graph id), as on a GPU
    paced = PacedRuns(s.session, cost, new_thread=precise_timers if precise else None)
    s.session = paced
    return LanguageModel(s, Tokenizer.from_dir(model_dir)), paced


def sleep_overshoot(seconds: float, times: int = 200) -> float:
    """time.sleep's own lateness here (median, seconds) for a sleep of ``seconds``, with nothing else running."""
    late = []
    for _ in range(times):
        t = time.perf_counter()
        time.sleep(seconds)
        late.append(time.perf_counter() - t - seconds)
    return float(np.median(late))


# ---- where the time went ----
def thread_cpu(threads: dict[str, Any]) -> dict[str, float]:
    """CPU seconds (user + system) each of ``threads`` (name: a running threading.Thread) has used so far, read from
    its own CPU clock; a thread not started yet has used none."""
    out = {}
    for name, thread in threads.items():
        try:
            out[name] = time.clock_gettime(time.pthread_getcpuclockid(thread.ident)) if thread.ident else 0.0
        except (OSError, TypeError):  # it ended meanwhile
            out[name] = 0.0
    return out


def breakdown(runs: list[Run], trace: list[tuple[float, int, float, float, int]], window: tuple[float, float],
              offline_s: float) -> dict[str, float]:
    """Where the served run's ``window`` (perf_counter start, end) went, from the stand-in's ``runs`` and the
    scheduler's ``trace`` (start, prompt tokens, prefill s, decode step s, rows) that began in it: the device time
    its runs stood for (decode steps, prefills), the time their threads waited past a run's end (``late``), the
    scheduler's iterations (busy) against the loop between them, and the server's own time (the window less the
    device time). ``schedule``: offline's device time over the served run's (what the schedule alone allows)."""
    lo, hi = window
    inside = [r for r in runs if lo <= r.start < hi]
    steps = [r for r in inside if r.kind == "step"]
    prefills = [r for r in inside if r.kind == "prefill"]
    its = [t for t in trace if lo <= t[0] < hi]
    # the host's serial time: from a run's end (its thread running Python again) to the next run's start
    ordered = sorted(inside, key=lambda r: r.start)
    gaps = [b.start - (a.start + a.device_s + a.late_s) for a, b in zip(ordered, ordered[1:])]
    wall = hi - lo
    device = sum(r.device_s for r in inside)
    busy = sum(t[2] + t[3] for t in its)
    return {"wall_s": wall, "steps": len(steps), "prefill_runs": len(prefills),
            "device_step_s": sum(r.device_s for r in steps), "device_prefill_s": sum(r.device_s for r in prefills),
            "device_s": device, "inner_s": sum(r.inner_s for r in inside), "inner_cpu_s": sum(r.inner_cpu_s for r in inside),
            "late_s": sum(r.late_s for r in inside),
            "late_step_p50_ms": 1e3 * float(np.median([r.late_s for r in steps])) if steps else float("nan"),
            "between_runs_s": sum(gaps), "between_runs_p50_ms": 1e3 * float(np.median(gaps)) if gaps else float("nan"),
            "late_mean_ms": 1e3 * float(np.mean([r.late_s for r in inside])) if inside else float("nan"),
            "iterations": len(its), "busy_s": busy, "between_iterations_s": max(wall - busy, 0.0),
            "server_own_s": wall - device,
            "server_own_per_step_ms": 1e3 * (wall - device) / max(len(steps), 1),
            "schedule": offline_s / device if device else float("nan"),
            "overhead": device / wall if wall else float("nan")}


# ---- the measurement ----
def measure(lm: Any, paced: PacedRuns, args: argparse.Namespace, prompts: list[list[int]], left_s: float,
            offline: dict[str, float]) -> dict[str, Any] | None:
    """One served run: a server of ``streams`` rows, the clients in a process of their own; None if it outlasted
    ``left_s`` (stopped)."""
    from load_test import in_client_process, level, server_gaps  # beside this file

    from onnxpipe.serve.app import ServerThread, create_app

    app = create_app(lm, "model", max_batch=args.streams, max_queue=256, prefill_chunk="auto",
                     max_length=args.prompt_tokens + args.max_tokens, prefill_group=args.prefill_group)
    sched = app.state.scheduler
    trace: list[tuple[float, int, float, float, int]] = []
    sched.trace = trace  # every iteration kept
    app.state.stream_times = written = []  # each stream's write times
    paced.runs = []
    with ServerThread(app, host="127.0.0.1") as server:
        threads = {"scheduler": sched._thread, "event loop": server.thread}
        before = thread_cpu(threads)
        row = in_client_process(left_s, level, server.url, args.streams, prompts, args.max_tokens, args.client)
        rows = getattr(sched._rows_thread, "thread", None)  # the rows worker's
        if rows is None:  # an older serve/: a thread pool's thread, made at its first use
            rows = next(iter(list(getattr(sched._rows_thread, "_threads", ()))), None)
        if rows is not None:
            threads["rows"] = rows
        after = thread_cpu(threads)
    if row is None:
        return None
    cpu = {name: after[name] - before.get(name, 0.0) for name in threads}
    cpu["client process"] = row["client_cpu_s"]
    parts = breakdown(paced.runs, trace, (row["start"], row["end"]), offline["seconds"])
    steps = max(parts["steps"], 1)
    gaps = server_gaps(written, row["start"], row["end"])  # as the server wrote them
    return {**{k: row[k] for k in ("requests", "tokens", "wall_s", "tokens_per_s", "ttft_p50_ms", "itl_p50_ms",
                                   "itl_p99_ms", "server_stats")},
            "server_itl_p50_ms": 1e3 * float(np.percentile(gaps, 50)) if gaps else float("nan"),
            "server_itl_p99_ms": 1e3 * float(np.percentile(gaps, 99)) if gaps else float("nan"),
            "served_over_offline": row["tokens_per_s"] / offline["tokens_per_s"], "breakdown": parts, "cpu_s": cpu,
            "per_step_us": {"scheduler python": 1e6 * (cpu["scheduler"] - sum(r.inner_cpu_s for r in paced.runs)) / steps,
                            "rows thread": 1e6 * cpu.get("rows", 0.0) / steps,
                            "event loop": 1e6 * cpu["event loop"] / steps,
                            "client process": 1e6 * cpu["client process"] / steps}}


# ---- the model ----
def build_tiny(workdir: Path) -> Path:
    """The tiny random Llama (``TINY``, fp32, a word-level tokenizer) exported and optimized for the CUDA form in
    ``workdir``, each stage in a child process and skipped where its output is already there."""
    hf, exported, optimized = workdir / "hf", workdir / "exported", workdir / "cuda"
    onnxpipe = [sys.executable, "-m", "onnxpipe"]
    stages = [(hf / "config.json", [sys.executable, __file__, "--build-child", str(hf)]),
              (exported / "onnxpipe.json", onnxpipe + ["export", str(hf), "-o", str(exported), "--no-verify", "--force"]),
              (optimized / "onnxpipe.json", onnxpipe + ["optimize", str(exported), "-o", str(optimized), "--level", "3",
                                                        "--target", "cuda", "--skip-verify", "--force"])]
    for done, cmd in stages:
        if not done.is_file():
            subprocess.run(cmd, check=True, timeout=300)
    return optimized


def write_checkpoint(out: Path) -> None:
    """``TINY`` with seeded random weights (norms 1, the rest normal(0, 0.1): greedy tokens not near ties) and a
    word-level tokenizer over its vocabulary, written beside ``out`` and moved into place."""
    import shutil

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = AutoConfig.for_model("llama", **TINY, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    gen = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.1, generator=gen)
    model.save_pretrained(tmp)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY["vocab_size"])}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t3", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(tmp)
    tmp.rename(out)


# ---- the run ----
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a CUDA-form model directory [the tiny model, built]")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/serve-overhead"), help="where the tiny model is built")
    p.add_argument("--step-ms", type=float, default=DeviceCost.step_s * 1e3, help="a decode step on the device")
    p.add_argument("--prefill-ms", type=float, default=DeviceCost.prefill_s * 1e3,
                   help="a prefill run on the device: its fixed part")
    p.add_argument("--prefill-token-us", type=float, default=DeviceCost.prefill_token_s * 1e6,
                   help="a prefill run on the device: its part per token read")
    p.add_argument("--streams", type=int, default=32, help="concurrent streaming clients, and the server's rows")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prefill-group", type=int, default=None, help="the server's --prefill-group [its default]")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="load_test.py's clients: raw (HTTP on asyncio streams, a few us a chunk) or httpx (its lines "
                        "through its layers: at 32 streams it falls behind the server)")
    p.add_argument("--sleep", choices=("precise", "plain"), default="precise",
                   help="the stand-in's wait: precise (its threads' timer slack 1 ns, as a GPU's wait that spins "
                        "ends on time) or plain (Linux's default slack: each run ends ~50 us late, counted as "
                        "the server's own time, as in the figures measured before this option)")
    p.add_argument("--repeats", type=int, default=3, help="served runs, each on a server of its own")
    p.add_argument("--budget-s", type=float, default=100.0, help=f"bound on the whole run (at most {MAX_BUDGET_S:.0f})")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--build-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        check_bounds(args)
    except ValueError as e:
        p.error(str(e))
    return args


def check_bounds(args: argparse.Namespace) -> None:
    """A bounded run: the budget at most MAX_BUDGET_S, the workload small enough that its offline time is a small
    share of it (ValueError naming the option otherwise)."""
    if not 1 <= args.budget_s <= MAX_BUDGET_S:
        raise ValueError(f"--budget-s must be 1..{MAX_BUDGET_S:.0f}, got {args.budget_s}")
    for name, low, high in (("streams", 1, 64), ("prompt_tokens", 1, 256), ("max_tokens", 2, 256),
                            ("requests_per_client", 1, 8), ("repeats", 1, 10)):
        value = getattr(args, name)
        if not low <= value <= high:
            raise ValueError(f"--{name.replace('_', '-')} must be {low}..{high}, got {value}")
    if args.prefill_group is not None and not 1 <= args.prefill_group <= args.streams:
        raise ValueError(f"--prefill-group must be 1..--streams ({args.streams}), got {args.prefill_group}")
    cost = DeviceCost(args.step_ms / 1e3, args.prefill_ms / 1e3, args.prefill_token_us / 1e6)  # ValueError: out of range
    offline = cost.offline(args.streams, args.max_tokens, args.requests_per_client, args.prompt_tokens)["seconds"]
    if offline * args.repeats * 20 > args.budget_s:  # a served run takes a few times offline's on 2 cores
        raise ValueError(f"{args.repeats} repeats of {offline:.2f} s of device time each do not fit --budget-s "
                         f"{args.budget_s:.0f} with room for the server's own time (20x): fewer tokens or repeats")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_child:  # the checkpoint, in a process of its own (torch)
        write_checkpoint(args.build_child)
        return 0
    end = time.monotonic() + args.budget_s
    cost = DeviceCost(args.step_ms / 1e3, args.prefill_ms / 1e3, args.prefill_token_us / 1e6)
    model = args.model or build_tiny(args.workdir)
    lm, paced = stand_in(model, cost, precise=args.sleep == "precise")
    plain = sleep_overshoot(cost.step_s - 0.0003)
    overshoot = sleep_overshoot(cost.step_s - 0.0003) if args.sleep == "precise" and precise_timers() else plain
    offline = cost.offline(args.streams, args.max_tokens, args.requests_per_client, args.prompt_tokens)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, lm.session.vocab_size, (args.streams * args.requests_per_client,
                                                      args.prompt_tokens)).tolist()
    runs, skipped = [], []
    for i in range(args.repeats):
        left = end - time.monotonic()
        row = measure(lm, paced, args, prompts, left, offline) if left > 5 else None
        if row is None:
            skipped.append(f"repeat {i + 1}" + (" (stopped at the budget)" if left > 5 else ""))
            break
        runs.append(row)
        print(f"repeat {i + 1}: {row['tokens_per_s']:.0f} tok/s, {row['served_over_offline']:.0%} of offline",
              file=sys.stderr)
    import onnxpipe

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": str(model), "cost": asdict(cost),
              "onnxpipe": str(Path(onnxpipe.__file__).parent),
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "sleep_overshoot_ms": 1e3 * overshoot,
              "sleep_overshoot_plain_ms": 1e3 * plain,
              "offline": offline, "runs": runs, "skipped": skipped,
              "args": {k: str(v) for k, v in vars(args).items()}}
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".partial")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.json)
    return 0 if runs else 1


def print_report(report: dict[str, Any]) -> None:
    c, off, runs = report["cost"], report["offline"], report["runs"]
    print(f"stand-in device: decode step {1e3 * c['step_s']:.2f} ms, prefill run {1e3 * c['prefill_s']:.2f} ms + "
          f"{1e6 * c['prefill_token_s']:.2f} us a token; "
          f"{report['cpus']} CPUs, load average {report['load_average'][0]:.1f}; time.sleep's own overshoot "
          f"{report['sleep_overshoot_ms']:.3f} ms ({report['args'].get('sleep', 'plain')}; plain: "
          f"{report.get('sleep_overshoot_plain_ms', float('nan')):.3f} ms)")
    print(f"offline (the stand-in's batch): {off['tokens']} tokens in {off['seconds']:.3f} s = "
          f"{off['tokens_per_s']:.0f} tok/s")
    if not runs:
        print("no served run finished: " + ", ".join(report["skipped"]))
        return
    print("\n| run | tokens/s | served / offline | offline / served device time | device / wall | decode steps "
          "(overlapped) | prefill runs | server's own ms a step | between runs p50 ms | late ms a step p50 | "
          "inter-token p50 / p99 ms, as written | as read |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(runs, 1):
        b, st = r["breakdown"], r["server_stats"]
        print(f"| {i} | {r['tokens_per_s']:.0f} | {r['served_over_offline']:.0%} | {b['schedule']:.0%} | "
              f"{b['overhead']:.0%} | {b['steps']} ({st.get('overlapped_steps', 0)}) | {b['prefill_runs']} | "
              f"{b['server_own_per_step_ms']:.3f} | {b['between_runs_p50_ms']:.3f} | {b['late_step_p50_ms']:.3f} | "
              f"{r.get('server_itl_p50_ms', float('nan')):.2f} / {r.get('server_itl_p99_ms', float('nan')):.2f} | "
              f"{r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f} |")
    ratio = statistics.median(r["served_over_offline"] for r in runs)
    print(f"\nserved / offline, median of {len(runs)}: {ratio:.0%}")
    print("\nCPU per decode step (us), by thread, and where the wall went (s):\n")
    print("| run | scheduler (Python) | rows thread | event loop | client process | wall | device | late | "
          "between iterations |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(runs, 1):
        u, b = r["per_step_us"], r["breakdown"]
        print(f"| {i} | {u['scheduler python']:.0f} | {u['rows thread']:.0f} | {u['event loop']:.0f} | "
              f"{u['client process']:.0f} | {b['wall_s']:.3f} | {b['device_s']:.3f} | {b['late_s']:.3f} | "
              f"{b['between_iterations_s']:.3f} |")
    if report["skipped"]:
        print("\nleft out: " + ", ".join(report["skipped"]))


if __name__ == "__main__":
    sys.exit(main())
