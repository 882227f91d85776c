"""On the CUDA EP with CUDA graphs and chunk graphs: a long prompt read in chunks beside greedy streams whose decode
steps are fed on the device (serve/slots.py's ``parks``). The chunks' captured runs write none of the decode graph's
input buffers, so between the prompt's first and last chunk every step stays fed and every request gets the tokens
the same scheduler gives it alone (tests/serve/test_chunk_pipeline.py runs the same on the CPU, through the graph-slot
path minus the GPU)."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest
from serve.test_chunk_pipeline import LONG, STREAMS, _read_beside_streams

pytestmark = pytest.mark.gpu


def _done_tokens(outs: list) -> list[list[int]]:
    """Each request's tokens from its queue of ("done" | "error", value) events, in order."""
    got = []
    for out in outs:
        kind, value = out.get(timeout=120)
        assert kind == "done", value
        got.append(list(value.token_ids))
    return got


def test_a_long_prompt_read_in_chunk_graphs_beside_fed_steps_gets_its_solo_tokens(gpu_llama_cuda_form: Path):
    from onnxpipe.runtime import load
    from onnxpipe.serve.scheduler import make_scheduler

    lm = load(gpu_llama_cuda_form, "cuda", cuda_graph=True)
    assert lm.session.cuda_graph and lm.session.fed and lm.session.last_position
    alone = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=160, chunk_graphs=True)
    alone.start()
    try:
        want = []
        for prompt, n in STREAMS + [(LONG, 10)]:
            out: queue.Queue = queue.Queue()
            alone.submit(lm.prepare(prompt, max_new_tokens=n, stop_token_ids=[]),
                         lambda e, out=out: out.put(e) if e[0] in ("done", "error") else None)
            kind, value = out.get(timeout=120)
            assert kind == "done", value
            want.append(list(value.token_ids))
    finally:
        alone.stop()
    got, _, sched, log = _read_beside_streams(lm, LONG, 10, chunk_graphs=True)
    assert [list(t) for t in got] == want
    # every step fed: the row parked on the device as it was admitted, its first token set there as it joined
    assert [f for _, f, _, _ in log] == [1] * 7 and sched.stats.row_patches >= 2
    assert sched.stats.graph_chunks == 7 and not sched.stats.chunk_graph_error and not sched.stats.capture_error


def test_a_long_prompt_read_in_the_chunk_lane_beside_streams(gpu_llama_cuda_form: Path):
    """The chunk lane on the CUDA EP: its graph loads and is captured (run 31 found onnxruntime refusing to capture
    it: a host value mixed into a device index), every chunk of the long prompt rides in a decode step's run, and
    the tokens come out as the scheduler gives them without the lane. On a GPU a step's GEMMs over B + W tokens may
    round otherwise than over B, so exact equality is not promised: most tokens must agree (a lane that read the
    wrong row or position would agree on almost none), and how many did is printed."""
    from onnxpipe.runtime import load
    from onnxpipe.serve.scheduler import make_scheduler

    lm = load(gpu_llama_cuda_form, "cuda", cuda_graph=True, chunk_lane=True)
    assert lm.session.lane is not None, lm.session.lane_why_not
    results = {}
    for lane in (False, True):
        sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=160, chunk_graphs=True, chunk_lane=lane)
        sched.graph_row_tokens = 32  # the long prompt takes a graph row (a lane graph's)
        outs = []
        for prompt, n in STREAMS + [(LONG, 10)]:  # all waiting before the loop starts: read in its first iterations
            out: queue.Queue = queue.Queue()
            sched.submit(lm.prepare(prompt, max_new_tokens=n, stop_token_ids=[]),
                         lambda e, out=out: out.put(e) if e[0] in ("done", "error") else None)
            outs.append(out)
        sched.start()
        try:
            got = _done_tokens(outs)
        finally:
            sched.stop()
        results[lane] = (got, sched)
    (plain, _), (laned, sched) = results[False], results[True]
    assert not sched.stats.lane_error and not sched.stats.capture_error and not sched.stats.chunk_graph_error
    assert sched.stats.lane_chunks == 7 and not sched.stats.lane_skipped  # 100 tokens: 6 chunks of 16, then 4
    assert [len(t) for t in laned] == [len(t) for t in plain]
    equal = sum(a == b for p, q in zip(plain, laned) for a, b in zip(p, q))
    total = sum(map(len, plain))
    print(f"the lane's tokens equal to those without it: {equal}/{total}")
    assert equal >= 0.5 * total
    # the lane and the decode session read one copy of the weights on the device (shared_weights.py), where the
    # graph keeps them as external data
    s = lm.session
    print(f"shared weights: {s.shared_weights.nbytes if s.shared_weights else 0} bytes ({s.shared_weights_why_not})")
    if s.shared_weights_why_not != "the graph has no external weights to share":
        assert s.shared_weights is not None, s.shared_weights_why_not


def test_patched_rows_on_the_cuda_slot(gpu_llama_cuda_form: Path):
    """``CudaGraphs.patch_rows`` on the CUDA EP: the helper graph's outputs bound to the slot's device buffers it
    reads (tests/serve/test_row_patch.py runs the same check on the CPU stand-in)."""
    from serve.test_row_patch import check_patched_rows

    from onnxpipe.runtime import load

    check_patched_rows(load(gpu_llama_cuda_form, "cuda", cuda_graph=True))


def test_the_servers_fed_steps_launched_ahead_give_the_synced_tokens(gpu_llama_cuda_form: Path):
    """The slot scheduler launching a fed step before the one before it is read (``SlotScheduler._fed_step``, on the
    session's own stream) against the same scheduler synced (``ahead`` off): every request gets the same tokens
    while requests arrive mid-stream (a step launched ahead is read first: ``_land``), rows end by length and by a
    stop id at different steps and leave (their rows set on the device only once the step in flight is done)."""
    import threading

    from gpu.conftest import prompts

    from onnxpipe.runtime import load
    from onnxpipe.serve.scheduler import make_scheduler

    lm = load(gpu_llama_cuda_form, "cuda", cuda_graph=True)
    assert lm.session.stream is not None, lm.session.stream_why_not
    vocab = lm.session.vocab_size
    asks = [(p, n) for p, n in zip(prompts(vocab, [5, 40, 17, 9, 60, 3, 28, 12], seed=5), [48, 30, 64, 20, 40, 56, 24, 36])]
    first = lm.generate(asks[2][0], max_new_tokens=64, stop_token_ids=[])
    stop = int(first.token_ids[20])  # request 2 stops at its 21st token (others where it recurs)

    def serve(ahead: bool) -> tuple[list[list[int]], object]:
        sched = make_scheduler(lm, max_batch=8, max_length=256)
        sched.ahead = ahead
        outs: list[queue.Queue] = []
        started = threading.Event()

        def submit(items):
            for p, n in items:
                out: queue.Queue = queue.Queue()
                sched.submit(lm.prepare(p, max_new_tokens=n, stop_token_ids=[stop]),
                             lambda e, out=out: (started.set(), out.put(e) if e[0] in ("done", "error") else None))
                outs.append(out)

        sched.start()
        try:
            submit(asks[:4])
            assert started.wait(60)
            for item in asks[4:]:  # the others arrive one by one while the first four decode
                submit([item])
                threading.Event().wait(0.01)
            got = _done_tokens(outs)
        finally:
            sched.stop()
        return got, sched

    synced, s0 = serve(False)
    ahead, s1 = serve(True)
    assert ahead == synced
    assert s0.stats.ahead_steps == 0 and s1.stats.ahead_steps > 0, vars(s1.stats)
    assert not s1.stats.capture_error and not s1.stats.row_patch_error
