"""What the slot layout's loop does between one decode step and the next, kept short (docs/serve.md, "The serial
path between two steps"): the rows' table moved on by the rows thread, a handoff to it of one lock, an iteration that
looks for cancelled requests only after a cancel, and the look for rows ending by length made by the rows' own
processing. Each keeps what it replaced did: these tests hold that."""

from __future__ import annotations

import threading
import time

import pytest

from onnxpipe.serve.rows_worker import RowsWorker


@pytest.mark.fast
def test_the_rows_worker_runs_jobs_in_order_and_hands_back_values_and_errors():
    worker = RowsWorker("test-rows")
    seen: list[int] = []
    gate = threading.Event()

    def slow(i: int) -> int:
        gate.wait(5)
        seen.append(i)
        return i * 10

    def record(i: int) -> int:
        seen.append(i)
        return i

    def fails() -> None:
        raise ValueError("row fault")

    try:
        first = worker.submit(slow, 1)
        jobs = [worker.submit(record, i) for i in (2, 3)]
        bad = worker.submit(fails)
        assert not first.done() and not bad.done()  # the first holds the thread: nothing after it has run
        gate.set()
        assert first.result() == 10 and [j.result() for j in jobs] == [2, 3] and seen == [1, 2, 3]
        with pytest.raises(ValueError, match="row fault"):
            bad.result()
        assert bad.done() and first.result() == 10  # a result can be read again
        assert worker.thread.name == "test-rows" and worker.thread is not threading.current_thread()
        last = worker.submit(time.sleep, 0.05)
    finally:
        worker.shutdown(wait=True)
    assert last.done() and not worker.thread.is_alive()  # what was submitted ran before the thread ended
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(fails)

