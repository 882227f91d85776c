"""scripts/load_test.py with the serving loop's decode steps timed in parts: where a step's time goes in the server.

    python scripts/serve_step_parts.py /tmp/serve-1b/cuda --provider auto --cuda-graph --concurrency '' \
        --long-prompts 4 --long-prompt-tokens 4096 --streams 32 --stream-tokens 2048 --chunks 16 \
        --prefill-group 8 --chunk-graphs on --chunk-lane on --budget-s 120 --json $OUT/serve.json

Every argument is load_test.py's. In this process (the server's), each decode step of the slot scheduler
(``SlotScheduler._decode_step``) is timed, and inside it: the time before its call into the CUDA graphs (``pre``),
that call (``step_lane``, ``step_fed``, or ``fed_step`` where the session launches fed steps ahead, and
``land`` where a step launched ahead is read before a change), and within it the uploads, onnxruntime's run (``run_graph``) and the
read-back; the wait for the rows thread (``settle``) and a prompt's join. The rows thread's processing of each step
is timed on that thread, and each prefill run outside the steps (``RowPrefill.run``, ``run_chunk``, ``run_group``).
Printed after load_test's tables: p50, p99 and mean (ms) of each part over the steps of at least --streams rows,
lane steps (a chunk in the step's run) apart from the others, and with --json each level's timed window split into
decode steps, prefill runs (by kind) and the rest (the loop between them, admission, waiting for requests), the
garbage collector's runs by generation and the prefill runs over 3x their kind's p50 with the collection inside them;
every step's parts, the prefill runs and the collections go to ``<--json>.steps.json``. Wrapping costs a few microseconds a call. On the CPU no step goes through the CUDA graphs:
there ``pre``, ``step_*``, the uploads and the read-back are absent.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

_local = threading.local()  # the step being timed on this thread: its parts
STEPS: list[dict[str, Any]] = []
PROCESSED: list[float] = []  # the rows thread's _process, seconds each
# the prefill runs outside the decode steps (RowPrefill.run / run_chunk / run_group): (start, seconds, kind, tokens)
PREFILLS: list[tuple[float, float, str, int]] = []
# the garbage collector's runs in this process: (start, seconds, generation); a full collection walks every object
# the process holds (onnxruntime, numpy, the tokenizer's libraries: ~10^6), tens of ms where a step is 1.7
GCS: list[tuple[float, float, int]] = []
_clock = time.perf_counter


def _timed(owner: Any, name: str, key: str) -> None:
    """``owner.name`` wrapped: its seconds added to the current step's ``key`` (the first call into the graphs
    also marks ``pre``, the step's time before it)."""
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        parts = getattr(_local, "parts", None)
        began = _clock()
        if parts is not None and key in ("step_lane", "step_fed") and "pre" not in parts:
            parts["pre"] = began - parts["_began"]
        try:
            return inner(*args, **kwargs)
        finally:
            if parts is not None:
                parts[key] = parts.get(key, 0.0) + _clock() - began

    setattr(owner, name, wrapper)


def install() -> None:
    """The wrappers, on the classes (every scheduler and session of this process), and the collector's callback."""
    import gc

    from onnxpipe.runtime import cuda_graphs, session
    from onnxpipe.serve import row_prefill, slots

    gc_began: list[float] = []

    def collected(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_began[:] = [_clock()]
        elif gc_began:
            GCS.append((gc_began[0], _clock() - gc_began[0], info["generation"]))
            gc_began.clear()

    gc.callbacks.append(collected)

    step = slots.SlotScheduler._decode_step

    def decode_step(self: Any) -> None:
        began = _clock()
        parts: dict[str, Any] = {"lane": self._lane is not None, "overlapped": self._pending is not None,
                                 "rows": len(self._running), "_began": began, "at": began}
        _local.parts = parts
        try:
            step(self)
        finally:
            parts["total"] = _clock() - parts.pop("_began")
            _local.parts = None
            STEPS.append(parts)

    process = slots.SlotScheduler._process

    def processed(self: Any, running: Any, out: Any) -> Any:
        began = _clock()
        try:
            return process(self, running, out)
        finally:
            PROCESSED.append(_clock() - began)

    def prefill_timed(name: str) -> None:
        inner = getattr(row_prefill.RowPrefill, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(_local, "in_prefill", False):  # a run inside another (run_chunk's uncaptured run): counted once
                return inner(self, *args, **kwargs)
            began, _local.in_prefill = _clock(), True
            try:
                return inner(self, *args, **kwargs)
            finally:
                _local.in_prefill = False
                tokens = sum(map(len, args[1])) if name == "run_group" else len(args[1])
                PREFILLS.append((began, _clock() - began, name, tokens))

        setattr(row_prefill.RowPrefill, name, wrapper)

    for name in ("run", "run_chunk", "run_group"):
        prefill_timed(name)
    slots.SlotScheduler._decode_step = decode_step  # type: ignore[method-assign]
    slots.SlotScheduler._process = processed  # type: ignore[method-assign]
    _timed(slots.SlotScheduler, "_settle", "settle")
    _timed(slots.SlotScheduler, "_join", "join")
    _timed(slots.SlotScheduler, "_fed_step", "fed_step")  # a fed step launched (or launched ahead) and read
    _timed(slots.SlotScheduler, "_land", "land")  # a step launched ahead, read and processed before a change
    _timed(cuda_graphs, "_upload", "upload")
    _timed(cuda_graphs.CudaGraphs, "_upload_step", "upload_step")
    _timed(cuda_graphs.CudaGraphs, "_next_ids", "next_ids")
    _timed(cuda_graphs.CudaGraphs, "step_lane", "step_lane")
    _timed(cuda_graphs.CudaGraphs, "step_fed", "step_fed")
    _timed(session.DecoderSession, "_run_graph", "run_graph")


def summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """p50, p99 and mean ms of each part over ``steps`` (a part a step did not have counts 0)."""
    out: dict[str, Any] = {"steps": len(steps)}
    for key in sorted({k for s in steps for k, v in s.items() if isinstance(v, float) and k != "at"}):
        ms = np.array([s.get(key, 0.0) for s in steps]) * 1e3
        out[key] = [round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3),
                    round(float(ms.mean()), 3)]
    return out


def timeline(start: float, end: float) -> dict[str, Any]:
    """Where the server's thread spent the window [start, end] (perf_counter seconds, the load test's timed window of
    one level): in decode steps, in prefill runs outside them (by kind: seconds, runs, tokens), and the rest (the
    loop's Python between them, admission, and waiting for requests), all in seconds."""
    steps = [s for s in STEPS if start <= s["at"] < end]
    runs = [r for r in PREFILLS if start <= r[0] < end]
    by_kind: dict[str, list[float]] = {}
    for _, seconds, kind, tokens in runs:
        entry = by_kind.setdefault(kind, [0.0, 0, 0])
        entry[0] += seconds
        entry[1] += 1
        entry[2] += tokens
    step_s, prefill_s = sum(s["total"] for s in steps), sum(r[1] for r in runs)
    # a run's milliseconds by kind, [p50, max]: whether a window's prefill time is every run a little slower or a
    # few runs much slower (group runs of the same size took 0.11-0.22 s a window in run 50)
    run_ms = {kind: [round(float(np.percentile(ms, 50)), 2), round(float(max(ms)), 2)] for kind in sorted(by_kind)
              for ms in [[r[1] * 1e3 for r in runs if r[2] == kind]]}
    # the collector's runs in the window by generation ([runs, total ms, max ms]), and the prefill runs over 3x their
    # kind's p50 with the collection that ran inside them, if any (ms): whether the slow runs are the collector's
    gcs = [g for g in GCS if start <= g[0] < end]
    by_gen = {str(gen): [len(ms), round(sum(ms), 2), round(max(ms), 2)] for gen in sorted({g[2] for g in gcs})
              for ms in [[g[1] * 1e3 for g in gcs if g[2] == gen]]}
    slow = [[round(r[1] * 1e3, 2), r[2], r[3],
             round(sum(g[1] for g in gcs if r[0] <= g[0] < r[0] + r[1]) * 1e3, 2)]
            for r in runs if r[1] * 1e3 > 3 * run_ms[r[2]][0]]
    return {"window_s": round(end - start, 4), "decode_steps": len(steps), "decode_s": round(step_s, 4),
            "prefill_s": round(prefill_s, 4),
            "prefill_by_kind": {k: [round(v[0], 4), v[1], v[2]] for k, v in sorted(by_kind.items())},
            "prefill_run_ms": run_ms, "rest_s": round(end - start - step_s - prefill_s, 4),
            "gc_by_generation": by_gen, "slow_prefills_ms_kind_tokens_gc_ms": slow}


def main(argv: list[str]) -> int:
    install()
    import load_test

    rc = load_test.main(argv)
    streams = int(argv[argv.index("--streams") + 1]) if "--streams" in argv else 32  # load_test's default
    full = [s for s in STEPS if s["rows"] >= streams]
    report: dict[str, Any] = {"lane steps": summary([s for s in full if s["lane"]]),
              "other steps": summary([s for s in full if not s["lane"]])}
    if PROCESSED:
        ms = np.array(PROCESSED) * 1e3
        report["rows processed"] = [round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3)]
    print("\nThe decode steps of at least", streams, "rows, by part: [p50, p99, mean] ms")
    for name, value in report.items():
        print(f"- {name}: {json.dumps(value)}")
    if "--json" in argv:  # each level's timed window, split (prefill by kind: [seconds, runs, tokens])
        rows = json.loads(Path(argv[argv.index("--json") + 1]).read_text()).get("levels", [])
        report["timeline"] = {str(r["concurrency"]): timeline(r["start"], r["end"]) for r in rows if "start" in r}
        for level, split in report["timeline"].items():
            print(f"- {level} streams, the timed window: {json.dumps(split)}")
        for r in rows:  # the scheduler's counters after the level (cumulative): steps, fed, overlapped, launched ahead
            st = r.get("server_stats") or {}
            if st:
                print(f"- {r['concurrency']} streams, the scheduler's steps so far: " + json.dumps(
                    {k: st.get(k) for k in ("steps", "fed_steps", "overlapped_steps", "ahead_steps", "row_patches")}))
    if "--json" in argv:
        path = Path(argv[argv.index("--json") + 1])
        path.with_name(path.stem + ".steps.json").write_text(json.dumps({"summary": report, "steps": STEPS,
                                                                         "prefills": PREFILLS, "gc": GCS}))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
