"""Serve's chunk lane (``--chunk-lane``): a long prompt's chunks before its last read inside the fed decode step's own
run (``CudaGraphs.step_lane``, the lane graphs captured ahead by ``warm_lanes``), through the session's CUDA-graph
slot path on the CPU (the stand-in session runs a graph id's first use on each thread 3 times, as onnxruntime's
capture does): the tokens are each request's solo ones, and where the lane cannot take a chunk it is read apart,
counted by why."""

from __future__ import annotations

import numpy as np
import pytest
from serve.test_slots import _GraphRuns, result, submit

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.cuda_graphs import CHUNK_WIDTHS
from onnxpipe.runtime.generate import LanguageModel, load
from onnxpipe.runtime.session import DecoderSession
from onnxpipe.serve.scheduler import make_scheduler

rng = np.random.default_rng(11)
LONG = rng.integers(5, 4000, 70).tolist()  # chunks of 16: 4 before its last (16 x 4), then 6
SHORT = rng.integers(5, 4000, 9).tolist()


def lane_lm(path) -> LanguageModel:
    s = DecoderSession(path, "cpu", threads=1, feed_back=True, chunk_lane=True)
    assert s.lane is not None, s.lane_why_not
    s.cuda_graph = True  # what a CUDA session with graphs does: decode steps through its captured slot
    s.session, s.lane = _GraphRuns(s.session), _GraphRuns(s.lane)
    return LanguageModel(s, None)


def _serve(lm, requests, warm_rows=2, trace=None):
    """``requests`` (prompt, new tokens) through a scheduler of 4 rows, all submitted before its loop starts: the
    short first one is read whole and decodes from the first iteration, the long ones (taking the graph rows,
    highest first) are read 16 tokens an iteration beside it; the tokens of each and the scheduler (stopped)."""
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128, chunk_graphs=True, chunk_lane=True)
    sched.warm_rows = warm_rows  # the CPU warms none by default
    sched.graph_row_tokens = 32  # the long prompts take the graph rows
    sched.trace = trace
    queues = [submit(sched, lm, p, n)[0] for p, n in requests]
    sched.start()
    try:
        tokens = [result(q) for q in queues]
    finally:
        sched.stop()
    return tokens, sched


def test_long_prompts_chunks_ride_in_the_decode_steps_and_give_the_solo_tokens(stdlib_cuda_model):
    requests = [(SHORT, 100), (LONG, 8), (LONG[::-1], 6)]
    plain = load(stdlib_cuda_model, "cpu", threads=1)
    want = [plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids for p, n in requests]
    lm = lane_lm(stdlib_cuda_model)
    got, sched = _serve(lm, requests)
    assert got == want
    assert not sched.stats.lane_error
    # each long prompt: 5 chunks, one an iteration, each in the decode step's run (fed, or host-fed after a row
    # joined), its last one's logits its first token; none read apart
    assert sched.stats.lane_chunks == 10 and not sched.stats.lane_skipped and sched.stats.graph_chunks == 0
    (slot,) = lm.session._graphs.values()
    widths = [w for w in CHUNK_WIDTHS if w < slot.capacity]
    assert {(r, w) for r in (3, 2) for w in widths} == set(slot.lanes)  # captured ahead, rows 3 and 2
    lane = lm.session.lane
    ran = {(lg.row, lg.width): lg.runs for lg in slot.lanes.values() if lg.runs}
    assert ran == {(3, 16): 4, (3, 8): 1, (2, 16): 4, (2, 8): 1}  # chunks of 16, the last 6 tokens at width 8
    for lg in slot.lanes.values():  # each captured once, on the loop's thread, then replayed
        assert [g for _, g in lane.captures].count(lg.graph_id) == 1
        assert lane.runs[lg.graph_id] == lg.runs + 1  # the capture's call, then each replay
    assert sum(lg.runs for lg in slot.lanes.values()) == sched.stats.lane_chunks


def test_beside_a_sampled_stream_the_lane_rides_host_fed_steps_and_gives_the_same_tokens(stdlib_cuda_model):
    """A sampled stream makes every step host-fed (its logits read back): the lane's chunks ride in those steps,
    their inputs uploaded, and each request gets what it gets with the chunks read apart."""
    sampled = {"temperature": 0.9, "top_k": 50, "seed": 3}

    def serve(lane: bool):
        lm = lane_lm(stdlib_cuda_model)
        sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128, chunk_graphs=True,
                               chunk_lane=lane)
        sched.warm_rows, sched.graph_row_tokens = 2, 32
        queues = [submit(sched, lm, SHORT, 40, **sampled)[0], submit(sched, lm, LONG, 8)[0]]
        sched.start()
        try:
            return [result(q) for q in queues], sched
        finally:
            sched.stop()

    (want, apart), (got, sched) = serve(False), serve(True)
    assert got == want and apart.stats.lane_chunks == 0
    assert sched.stats.lane_chunks == 5 and not sched.stats.lane_skipped  # 4 x 16 + 6, every one in a step
    assert sched.stats.fed_steps == 0  # sampled: host-fed, every step


def test_without_captured_lane_graphs_chunks_are_read_apart_with_the_same_tokens(stdlib_cuda_model):
    requests = [(SHORT, 100), (LONG, 8)]
    plain = load(stdlib_cuda_model, "cpu", threads=1)
    want = [plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids for p, n in requests]
    lm = lane_lm(stdlib_cuda_model)
    got, sched = _serve(lm, requests, warm_rows=0)
    assert got == want
    assert sched.stats.lane_chunks == 0 and sched.stats.lane_skipped == {"not_captured": 5}
    assert sched.stats.graph_chunks == 5  # read apart, through the chunk graphs (captured as they came)


def test_a_lane_step_that_fails_fails_its_requests_and_the_server_goes_on(stdlib_cuda_model, monkeypatch):
    from onnxpipe.runtime.cuda_graphs import CudaGraphs

    lm = lane_lm(stdlib_cuda_model)
    calls = []

    def broken(self, *args, **kwargs):
        calls.append(1)
        raise OnnxpipeError("a planted lane failure")

    monkeypatch.setattr(CudaGraphs, "step_lane", broken)
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128, chunk_graphs=True, chunk_lane=True)
    sched.warm_rows, sched.graph_row_tokens = 2, 32
    first, long = (submit(sched, lm, p, n)[0] for p, n in ((SHORT, 60), (LONG, 8)))
    sched.start()
    try:
        assert long.get(timeout=60)[0] == "error" and first.get(timeout=60)[0] == "error"
        monkeypatch.undo()
        again = result(submit(sched, lm, LONG, 8)[0])  # alone: no step to ride in, read apart
    finally:
        sched.stop()
    assert calls and again == load(stdlib_cuda_model, "cpu", threads=1).generate(
        LONG, max_new_tokens=8, stop_token_ids=[]).token_ids


def test_the_lane_needs_chunk_graphs_and_a_session_with_it(stdlib_cuda_model):
    from serve.test_slots import slot_lm

    lm = slot_lm(stdlib_cuda_model, True)  # no lane loaded
    with pytest.raises(OnnxpipeError, match="lane"):
        make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128, chunk_graphs=True, chunk_lane=True)
    with pytest.raises(OnnxpipeError, match="chunk-graphs"):
        make_scheduler(lane_lm(stdlib_cuda_model), max_batch=4, prefill_chunk=16, max_length=128, chunk_lane=True)
    plain = DecoderSession(stdlib_cuda_model, "cpu", threads=1, chunk_lane=True)  # no step tail: no lane
    assert plain.lane is None and "step tail" in plain.lane_why_not
    assert DecoderSession(stdlib_cuda_model, "cpu", threads=1).lane_why_not == "not asked for"


def test_serve_says_in_one_line_why_the_lane_cannot_run(stdlib_model, stdlib_cuda_model):
    from click.testing import CliRunner

    from onnxpipe.cli import main

    for model, why in ((stdlib_model, "grows its cache"), (stdlib_cuda_model, "needs --cuda-graph, --chunk-graphs")):
        r = CliRunner().invoke(main, ["serve", str(model), "--chunk-lane", "--provider", "cpu", "--port", "0"])
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output  # a clean exit, no traceback
        assert why in r.output and ("chunk_lane" in r.output or "chunk lane" in r.output), r.output


def test_the_trace_says_what_each_iteration_did(stdlib_cuda_model):
    """The scheduler's trace (the load test's breakdown of the slowest iterations): each iteration's lane chunk,
    admissions, fed steps and rows, adding up to the run's own counts."""
    from collections import deque

    from onnxpipe.serve.loop import TRACE_MORE

    trace: deque = deque()
    requests = [(SHORT, 40), (LONG, 8), (LONG[::-1], 6)]
    got, sched = _serve(lane_lm(stdlib_cuda_model), requests, trace=trace)
    assert [len(t) for t in got] == [40, 8, 6]
    rows = [dict(zip(("start", "read", "prefill_s", "step_s", "rows") + TRACE_MORE, t)) for t in trace]
    assert rows and all(r["gap_s"] >= 0 and r["admit_s"] >= 0 for r in rows)
    assert sum(r["admitted"] for r in rows) == len(requests)
    assert sum(r["lane"] for r in rows) == sched.stats.lane_chunks == 10
    assert sum(r["fed"] for r in rows) == sched.stats.fed_steps
    assert sum(r["overlapped"] for r in rows) == sched.stats.overlapped_steps
    # a row joins after its last chunk rides in a step: the rows after that iteration grow by one
    assert any(r["lane"] and r["rows_after"] == r["rows"] + 1 for r in rows)
