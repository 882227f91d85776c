"""What the slot layout's loop does between one decode step and the next, kept short (docs/serve.md, "The serial
path between two steps"): the rows' table moved on by the rows thread, a handoff to it of one lock, an iteration that
looks for cancelled requests only after a cancel, and the look for rows ending by length made by the rows' own
processing. Each keeps what it replaced did: these tests hold that."""

from __future__ import annotations

import threading
import time

import pytest
from serve.conftest import iterate
from serve.test_slots import LENGTHS, PROMPTS, result, served, slot_lm, submit

from onnxpipe.serve.rows_worker import RowsWorker
from onnxpipe.serve.scheduler import make_scheduler


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


@pytest.mark.fast
def test_a_submit_racing_a_shutdown_runs_its_job_or_is_refused_never_left_queued():
    """A job queued after the thread's end would never run, and the loop's thread would wait for it forever: here the
    submit is held between its check and its queueing while a shutdown starts on another thread."""
    worker = RowsWorker("test-rows")
    real = worker._queue
    in_put, go = threading.Event(), threading.Event()

    class Held:  # the worker's queue, its first job's put held until ``go``
        def put(self, item):
            if item is not None and not in_put.is_set():
                in_put.set()
                go.wait(5)
            real.put(item)

        def get(self):
            return real.get()

    worker._queue = Held()  # type: ignore[assignment]
    submitted: dict = {}
    first = threading.Thread(target=lambda: submitted.setdefault("job", worker.submit(lambda: 7)))
    first.start()
    assert in_put.wait(5)
    closing = threading.Thread(target=worker.shutdown)
    closing.start()
    time.sleep(0.05)  # the shutdown has begun (and waits for the submit to be queued)
    go.set()
    first.join(5)
    closing.join(5)
    assert not closing.is_alive() and not worker.thread.is_alive()
    assert submitted["job"].done() and submitted["job"].result() == 7


def test_an_iteration_looks_for_cancelled_requests_only_after_a_cancel(stdlib_cuda_model, monkeypatch):
    lm = slot_lm(stdlib_cuda_model, True)
    sched = make_scheduler(lm, max_batch=3, prefill_chunk=16, max_length=128)
    sched._started()
    looks = {"n": 0}
    look = sched._drop_cancelled_in_flight

    def counted() -> None:
        looks["n"] += 1
        look()

    monkeypatch.setattr(sched, "_drop_cancelled_in_flight", counted)
    try:
        q, req = submit(sched, lm, PROMPTS[0], 60)
        _, other = submit(sched, lm, PROMPTS[2], 60)
        for _ in range(6):
            iterate(sched)
        assert looks["n"] == 0 and len(sched._running) == 2  # nothing cancelled: no look at each request
        req.cancel()
        req.cancel()  # twice: logged once
        iterate(sched)
        assert looks["n"] == 1 and sched._running == [other] and sched.stats.cancelled == 1
        assert sched.table.free_rows() == 2 and q.empty()  # its row freed, no event after the cancel
        for _ in range(3):
            iterate(sched)
        assert looks["n"] == 1 and not sched._cancels
        _, waiting = submit(sched, lm, PROMPTS[1], 5)
        waiting.cancel()  # cancelled while it waits: dropped before its prompt is read
        iterate(sched)
        assert looks["n"] == 2 and not sched._waiting and not sched._admitted and sched.stats.cancelled == 2
    finally:
        sched._settle()
        sched._rows_thread.shutdown(wait=True)


def test_no_row_that_ends_by_length_is_processed_on_the_rows_thread(stdlib_cuda_model, monkeypatch):
    """A step whose token is a row's last by length is processed before the next step runs (that row must not be
    stepped again on the device): the look is now the rows' processing's count of the fewest tokens left, not a look
    at each row between the steps. Requests of different lengths, overlapped steps between their ends."""
    lm = slot_lm(stdlib_cuda_model, True)
    alone = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128)
    alone.start()
    try:
        solo = [result(submit(alone, lm, p, n)[0]) for p, n in zip(PROMPTS, LENGTHS)]
    finally:
        alone.stop()
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128)
    process = sched._process
    on_rows_thread: list[list[str | None]] = []

    def recorded(running, out):
        keep, slack = process(running, out)
        if threading.current_thread() is sched._rows_thread.thread:
            on_rows_thread.append([r.row.finish_reason for r in running])
        return keep, slack

    monkeypatch.setattr(sched, "_process", recorded)
    assert served(sched, lm, [(p, n, {}) for p, n in zip(PROMPTS, LENGTHS)]) == solo
    assert sched.stats.overlapped_steps > 0 and len(on_rows_thread) > 10
    assert not [reasons for reasons in on_rows_thread if "length" in reasons]
