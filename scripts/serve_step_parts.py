"""scripts/load_test.py with the serving loop's decode steps timed in parts: where a step's time goes in the server.

    python scripts/serve_step_parts.py /tmp/serve-1b/cuda --provider auto --cuda-graph --concurrency '' \
        --long-prompts 4 --long-prompt-tokens 4096 --streams 32 --stream-tokens 2048 --chunks 16 \
        --prefill-group 8 --chunk-graphs on --chunk-lane on --budget-s 120 --json $OUT/serve.json

Every argument is load_test.py's. In this process (the server's), each decode step of the slot scheduler
(``SlotScheduler._decode_step``) is timed, and inside it: the time before its call into the CUDA graphs (``pre``),
that call (``step_lane`` or ``step_fed``), and within it the uploads, onnxruntime's run (``run_graph``) and the
read-back; the wait for the rows thread (``settle``) and a prompt's join. The rows thread's processing of each step
is timed on that thread. Printed after load_test's tables: p50, p99 and mean (ms) of each part over the steps of at
least --streams rows, lane steps (a chunk in the step's run) apart from the others; every step's parts go to
``<--json>.steps.json``. Wrapping costs a few microseconds a call. On the CPU no step goes through the CUDA graphs:
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
    """The wrappers, on the classes (every scheduler and session of this process)."""
    from onnxpipe.runtime import cuda_graphs, session
    from onnxpipe.serve import slots

    step = slots.SlotScheduler._decode_step

    def decode_step(self: Any) -> None:
        parts: dict[str, Any] = {"lane": self._lane is not None, "overlapped": self._pending is not None,
                                 "rows": len(self._running), "_began": _clock()}
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

    slots.SlotScheduler._decode_step = decode_step  # type: ignore[method-assign]
    slots.SlotScheduler._process = processed  # type: ignore[method-assign]
    _timed(slots.SlotScheduler, "_settle", "settle")
    _timed(slots.SlotScheduler, "_join", "join")
    _timed(cuda_graphs, "_upload", "upload")
    _timed(cuda_graphs.CudaGraphs, "_upload_step", "upload_step")
    _timed(cuda_graphs.CudaGraphs, "_next_ids", "next_ids")
    _timed(cuda_graphs.CudaGraphs, "step_lane", "step_lane")
    _timed(cuda_graphs.CudaGraphs, "step_fed", "step_fed")
    _timed(session.DecoderSession, "_run_graph", "run_graph")


def summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """p50, p99 and mean ms of each part over ``steps`` (a part a step did not have counts 0)."""
    out: dict[str, Any] = {"steps": len(steps)}
    for key in sorted({k for s in steps for k, v in s.items() if isinstance(v, float)}):
        ms = np.array([s.get(key, 0.0) for s in steps]) * 1e3
        out[key] = [round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3),
                    round(float(ms.mean()), 3)]
    return out


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
    if "--json" in argv:
        path = Path(argv[argv.index("--json") + 1])
        path.with_name(path.stem + ".steps.json").write_text(json.dumps({"summary": report, "steps": STEPS}))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
