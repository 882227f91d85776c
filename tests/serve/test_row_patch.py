"""``CudaGraphs.patch_rows``: some rows of a primed slot's next decode inputs set on the device (the CPU stand-in of
the CUDA-graph slot path), the others left as the step before wrote them; refused where the next step could not be
fed anyway."""

from __future__ import annotations

import numpy as np
import pytest
from serve.test_slots import result, slot_lm, submit

from onnxpipe.errors import OnnxpipeError


def check_patched_rows(lm) -> None:
    """On a fresh slot of 4 rows: refused before any step; after a step whose tail wrote the next inputs, rows 1 and
    3 set anew (a token at position 20, a free row's pad at 0), rows 0 and 2 as the tail left them. Shared with the
    GPU tier (tests/gpu/test_serve_chunk_pipeline.py)."""
    s = lm.session
    graphs = s.graphs
    cache = s.new_cache(4, capacity=64)
    assert not graphs.patch_rows(cache, [1], [7], [3])  # not primed: no step has written the next inputs
    counts = np.array([5, 9, 2, 30])
    mask = (np.arange(counts.max())[None, :] < counts[:, None]).astype(np.int64)
    s.forward(np.array([[11], [12], [13], [14]]), mask, (counts - 1)[:, None], cache, want="argmax")
    slot = graphs.slots[(4, cache.capacity)]
    before = slot.ids.numpy().copy(), slot.mask.numpy().copy(), slot.positions.numpy().copy()
    assert slot.primed and before[1].sum(axis=1).tolist() == (counts + 1).tolist()  # the tail advanced every row
    assert graphs.patch_rows(cache, [1, 3], [42, 0], [20, 0])
    ids, m, positions = slot.ids.numpy(), slot.mask.numpy(), slot.positions.numpy()
    assert ids[:, 0].tolist() == [before[0][0, 0], 42, before[0][2, 0], 0]
    assert m.sum(axis=1).tolist() == [counts[0] + 1, 21, counts[2] + 1, 1]
    assert (m[1, :21] == 1).all() and (m[1, 21:] == 0).all()
    assert positions[:, 0].tolist() == [before[2][0, 0], 20, before[2][2, 0], 0]
    with pytest.raises(OnnxpipeError, match="no row"):
        graphs.patch_rows(cache, [4], [1], [0])


def test_patched_rows_take_their_token_and_place_and_the_others_keep_theirs(stdlib_cuda_model):
    check_patched_rows(slot_lm(stdlib_cuda_model, True))


def test_requests_arriving_while_steps_are_fed_get_their_solo_tokens(stdlib_cuda_model):
    """Requests of 3-100 tokens, a quarter sampled, submitted one by one while the loop runs (so they are admitted,
    grouped, joined and freed between fed steps, their rows set on the device): each gets the tokens it gets alone."""
    import time

    from onnxpipe.serve.scheduler import make_scheduler

    lm = slot_lm(stdlib_cuda_model, True)
    rng = np.random.default_rng(5)
    asks = []
    for i in range(16):
        prompt = rng.integers(5, 4000, int(rng.choice([3, 7, 12, 40, 70, 100]))).tolist()
        sampled = {"temperature": 0.8, "top_k": 20, "seed": i} if rng.random() < 0.25 else {}
        asks.append((prompt, int(rng.integers(2, 30)), sampled))
    alone = make_scheduler(lm, max_batch=4, prefill_chunk="auto", max_length=160, prefill_group=4)
    alone.start()
    try:
        solo = [list(result(submit(alone, lm, p, n, **o)[0])) for p, n, o in asks]
    finally:
        alone.stop()
    sched = make_scheduler(lm, max_batch=4, prefill_chunk="auto", max_length=160, prefill_group=4)
    sched.start()
    try:
        outs = []
        for p, n, o in asks:
            outs.append(submit(sched, lm, p, n, **o)[0])
            time.sleep(0.003)
        assert [list(result(out)) for out in outs] == solo
        assert sched.stats.failed == 0 and sched.stats.row_patches > 0 and sched.stats.fed_steps > 0
    finally:
        sched.stop()


def test_a_failing_patch_is_reported_and_changes_go_up_from_the_host(stdlib_cuda_model, monkeypatch):
    """Where setting rows on the device fails, the error is kept in the stats, no patch is tried again, and every
    change makes the next step host-fed: the requests still get their solo tokens."""
    from onnxpipe.runtime.cuda_graphs import CudaGraphs
    from onnxpipe.serve.scheduler import make_scheduler

    lm = slot_lm(stdlib_cuda_model, True)
    prompts = [np.random.default_rng(i).integers(5, 4000, n).tolist() for i, n in enumerate((3, 40, 7))]

    def run(sched):
        outs = [submit(sched, lm, p, 12)[0] for p in prompts]
        sched.start()
        try:
            return [list(result(out)) for out in outs]
        finally:
            sched.stop()

    solo = run(make_scheduler(lm, max_batch=1, prefill_chunk=16, max_length=128))  # one at a time
    calls = []

    def broken(self, *args):
        calls.append(args)
        raise OnnxpipeError("injected patch fault")

    monkeypatch.setattr(CudaGraphs, "patch_rows", broken)
    sched = make_scheduler(lm, max_batch=2, prefill_chunk=16, max_length=128)
    got = run(sched)
    assert got == solo
    assert sched.stats.row_patch_error == "injected patch fault" and len(calls) == 1 and sched.stats.failed == 0
