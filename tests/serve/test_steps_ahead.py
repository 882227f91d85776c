"""The slot scheduler's fed steps launched ahead of their reads (``SlotScheduler._fed_step``: the step after this
one launched before this one is read; ``_land``: a step launched ahead read and processed before anything changes),
on the CPU through the session's CUDA-graph slot path (tests/serve/test_slots.py's stand-in). Here a run is done when
it returns, so a host-side reader copies each step's ids at once where the GPU's copies them on the session's
stream (``cuda_stream.IdsReader``); what is checked is the scheduler's bookkeeping: every request gets exactly its
solo tokens with the steps launched ahead as without, while requests arrive, end by length or by a stop id and leave,
and their clients go away. The GPU runs the same against a real stream (tests/gpu/test_serve_chunk_pipeline.py)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from serve.test_slots import LENGTHS, PROMPTS, result, slot_lm, submit

from onnxpipe.runtime import cuda_stream
from onnxpipe.serve.scheduler import make_scheduler


class HostStream:
    def sync(self) -> None:  # the CPU's runs are done when they return
        pass


class HostReader:
    """``cuda_stream.IdsReader`` for host buffers: ``queue`` copies the ids at the address at once."""

    def __init__(self, stream, rows: int, depth: int = 2):
        self.stream, self.rows, self.depth = stream, rows, depth
        self.bufs: list[np.ndarray | None] = [None] * depth

    def queue(self, i: int, ptr: int) -> None:
        self.bufs[i % self.depth] = np.ctypeslib.as_array((ctypes.c_int64 * self.rows).from_address(ptr)).copy()

    def read(self, i: int) -> np.ndarray:
        out = self.bufs[i % self.depth]
        assert out is not None
        return out.copy()


@pytest.fixture
def ahead_lm(stdlib_cuda_model, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cuda_stream, "IdsReader", HostReader)
    lm = slot_lm(stdlib_cuda_model, True)
    lm.session.stream = HostStream()  # type: ignore[assignment]
    return lm


def _serve(lm, ahead: bool, asks, stop_ids=(), cancel_after=None):
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128)
    sched.ahead = ahead
    queues = [submit(sched, lm, p, n, stop_token_ids=list(stop_ids))[0] for p, n in asks]
    sched.start()
    try:
        got = [result(q) for q in queues]
    finally:
        sched.stop()
    return got, sched


def test_steps_launched_ahead_give_the_synced_tokens(ahead_lm):
    # 4 long replies alone on the rows (nothing waiting: the steady steps launch ahead), then 6 more queued behind
    asks = [(PROMPTS[i % 6], 40 + 3 * i) for i in range(4)] + list(zip(PROMPTS, LENGTHS))
    synced, s0 = _serve(ahead_lm, False, asks)
    got, s1 = _serve(ahead_lm, True, asks)
    assert got == synced
    assert s0.stats.ahead_steps == 0 and s1.stats.ahead_steps > 0, vars(s1.stats)
    assert s1.stats.steps == s0.stats.steps  # a step launched ahead is one of the loop's steps, read once
    assert s1._ahead is None or s1._ahead.in_flight == 0  # nothing left running once the loop stopped


def test_rows_that_stop_early_and_arrivals_mid_stream(ahead_lm):
    asks = [(PROMPTS[1], 30), (PROMPTS[0], 50), (PROMPTS[3], 44), (PROMPTS[2], 36)]
    alone = [ahead_lm.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids for p, n in asks]
    # a stop id that first comes up mid-reply in one of them: that row ends there, early, by a stop id
    row, at = next((j, i) for j, t in enumerate(alone) for i in range(4, len(t) - 2) if t[i] not in t[:i])
    stop = int(alone[row][at])
    synced, _ = _serve(ahead_lm, False, asks, stop_ids=[stop])
    got, s1 = _serve(ahead_lm, True, asks, stop_ids=[stop])
    assert got == synced and got[row] == list(alone[row][: at + 1])
    assert s1.stats.ahead_steps > 0


def _until_in_flight(sched) -> None:
    """The scheduler's iterations run by hand until a step launched ahead is in flight (at most 12)."""
    from serve.conftest import iterate

    for _ in range(12):
        iterate(sched)
        if sched._in_flight():
            return
    raise AssertionError(f"no step launched ahead after 12 iterations: {vars(sched.stats)}")


def test_the_schedulers_steps_go_ahead_unless_turned_off(ahead_lm, monkeypatch):
    monkeypatch.delenv("ONNXPIPE_SERVE_AHEAD", raising=False)
    assert make_scheduler(ahead_lm, max_batch=4, prefill_chunk=16, max_length=128).ahead
    for off in ("0", "off", "False"):
        monkeypatch.setenv("ONNXPIPE_SERVE_AHEAD", off)
        assert not make_scheduler(ahead_lm, max_batch=4, prefill_chunk=16, max_length=128).ahead


def test_a_request_arriving_while_a_step_is_in_flight_reads_it_first(ahead_lm):
    """Driven by hand: a step launched ahead is in flight when a request arrives; the next iteration reads and
    processes it (``_land``) before the admission writes the new row on the device."""
    from serve.conftest import iterate

    sched = make_scheduler(ahead_lm, max_batch=4, prefill_chunk=16, max_length=128)
    sched.ahead = True  # the default, whatever the environment says
    a = submit(sched, ahead_lm, PROMPTS[0], 30)[0]
    sched._started()  # the loop's iterations are driven on this thread
    try:
        _until_in_flight(sched)
        steps = sched.stats.steps
        b = submit(sched, ahead_lm, PROMPTS[2], 10)[0]
        iterate(sched)  # admits b: the step in flight is read and processed first
        assert sched.stats.steps >= steps + 1
        while sched._running or sched._admitted or sched._waiting:
            iterate(sched)
        sched._settle()
        want = [ahead_lm.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids
                for p, n in ((PROMPTS[0], 30), (PROMPTS[2], 10))]
        assert [result(a), result(b)] == want
    finally:
        if sched._rows_thread is not None:
            sched._rows_thread.shutdown(wait=True)


def test_a_step_in_flight_that_fails_to_read_leaves_nothing_in_flight(ahead_lm):
    """A read that fails (on a GPU: a CUDA error) is raised to the loop once; the next iteration does not read the
    failed step again."""

    sched = make_scheduler(ahead_lm, max_batch=4, prefill_chunk=16, max_length=128)
    sched.ahead = True
    submit(sched, ahead_lm, PROMPTS[0], 30)
    sched._started()
    try:
        _until_in_flight(sched)

        def broken(i):
            raise RuntimeError("cudaEventSynchronize failed (CUDA error 700)")

        sched._ahead.reader.read = broken
        with pytest.raises(RuntimeError, match="CUDA error 700"):
            sched._land()
        assert not sched._in_flight() and sched._ahead is None
    finally:
        sched._rows_thread.shutdown(wait=True)
