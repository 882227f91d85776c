"""A long prompt's chunks beside decode steps fed on the device (serve/slots.py's ``parks``): a row being read is
parked, for decode steps, at its prompt's full length, so a chunk before the prompt's last leaves the fed pipeline as
it was (the next step fed on the device, the step's rows processed on the rows thread) and reads no logits back;
only the last chunk (the row joins) makes the next step host-fed. Run on the CPU through the session's CUDA-graph
slot path (tests/serve/test_slots.py's stand-in), the loop's steps driven by hand so that which step is fed does not
depend on timing. Every stream, and the long prompt, gets exactly its solo tokens, and the prompt's keys and values
in its row are exactly those of its chunks read alone: no decode step wrote over them."""

from __future__ import annotations

import queue

import numpy as np
import pytest
from serve.conftest import iterate
from serve.test_slots import PROMPTS, slot_lm

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.cuda_graphs import CudaGraphs
from onnxpipe.runtime.generate import load
from onnxpipe.serve.row_prefill import RowPrefill
from onnxpipe.serve.scheduler import make_scheduler
from onnxpipe.serve.slot_table import DECODING, PREFILLING, SlotTable

rng = np.random.default_rng(19)
LONG = rng.integers(5, 4000, 100).tolist()  # read in chunks of 16: 6 before its last (4 tokens)
STREAMS = [(PROMPTS[0], 60), (PROMPTS[2], 50)]  # decoding while it is read


# ---- the table alone ----
@pytest.mark.fast
def test_a_row_being_read_is_parked_at_its_park_for_decode_steps():
    t = SlotTable(4, 32, pad_id=9)
    a = t.take()
    t.prefilled(a, 5)
    t.start_decoding(a, 42)
    b = t.take(park=20)  # a prompt of 20 tokens, 8 of them read so far
    t.prefilled(b, 8)
    c = t.take()  # parked at what it holds (3)
    t.prefilled(c, 3)
    ids, mask, positions = t.step_inputs()
    assert positions[:, 0].tolist() == [5, 20, 3, 0] and mask.sum(axis=1).tolist() == [6, 21, 4, 1]
    assert ids[:, 0].tolist() == [42, 9, 9, 9] and mask.shape == (4, 21)
    assert t.parked_room() == 32 - 1 - 20  # fed steps that may follow: row b written up to position 31
    t.prefilled(b, 20)
    t.start_decoding(b, 7)  # decoding: at its count, its park gone
    t.release(c)
    assert t.step_inputs()[2][:, 0].tolist() == [5, 20, 0, 0] and t.park.tolist() == [0, 0, 0, 0]
    assert t.parked_room() == 32  # no row being read: the running rows bound fed steps
    t.stepped([a, b], [1, 2])
    assert t.counts.tolist() == [6, 21, 0, 0]
    with pytest.raises(OnnxpipeError, match="cannot be parked at position 32"):
        t.take(park=32)
    # rows not begun keep their parks when a group run moves them
    t.release_all()
    d, e, f = t.take(park=10), t.take(park=12), t.take(park=14)
    t.start_decoding(d, 1)
    assert t.place([e], others=[f]) == [1, 2] and t.park.tolist() == [0, 12, 14, 0]
    t.release(e)
    assert t.place([f]) == [1] and t.park.tolist() == [0, 14, 0, 0]  # moved down, its park with it
    assert t.state.tolist()[:2] == [DECODING, PREFILLING]


# ---- the scheduler's steps by hand ----
def _emit_to(out: queue.Queue):
    def emit(event):
        if event[0] == "done":
            out.put(event[1].token_ids)
        elif event[0] == "error":
            out.put(event)
    return emit


def _read_beside_streams(lm, long_prompt, new_tokens, max_length=160, chunk_graphs=False, park_at_prompt=True):
    """Two greedy streams decoding (fed on the device), then ``long_prompt`` arriving, read 16 tokens an iteration,
    the loop driven by hand. Returns (each request's tokens, the long prompt's keys and values in its row once it
    joined (its first decode step run) [kv_heads, prompt, head_dim] per buffer, the scheduler, a log per iteration
    while the prompt was read: (chunks read, fed steps, overlapped steps, a step's rows pending after it)).
    ``park_at_prompt=False`` parks the row at what the table holds for it (what the scheduler did before)."""
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=max_length, chunk_graphs=chunk_graphs)
    assert sched.parks
    if not park_at_prompt:
        take = sched.table.take
        sched.table.take = lambda last=False, among=None, park=0: take(last, among)
    sched._started()
    outs = [queue.Queue() for _ in range(3)]
    try:
        for (prompt, n), out in zip(STREAMS, outs):
            sched.submit(lm.prepare(prompt, max_new_tokens=n, stop_token_ids=[]), _emit_to(out))
        for _ in range(4):  # both read and decoding, their steps fed and overlapped
            iterate(sched)
        assert len(sched._running) == 2 and sched.stats.overlapped_steps > 0
        if sched._in_flight():  # a step launched ahead (a GPU's stream) is read first, as an arrival's iteration does
            sched._settle()
        req = sched.submit(lm.prepare(long_prompt, max_new_tokens=new_tokens, stop_token_ids=[]), _emit_to(outs[2]))
        log = []
        while req not in sched._running and outs[2].empty():
            before = (sched.stats.prefill_chunks, sched.stats.fed_steps, sched.stats.overlapped_steps)
            iterate(sched)
            after = (sched.stats.prefill_chunks, sched.stats.fed_steps, sched.stats.overlapped_steps)
            log.append(tuple(b - a for a, b in zip(before, after)) + (sched._pending is not None,))
        held = [v.numpy()[req.slot, :, :len(long_prompt)].copy() for v in sched.cache.values]
        while sched._running or sched._waiting or sched._admitted:
            iterate(sched)
        sched._settle()
    finally:
        sched._settle()
        sched._rows_thread.shutdown(wait=True)
    return [out.get(timeout=5) for out in outs], held, sched, log


def _chunks_alone(lm, prompt, rows, capacity):
    """The prompt's keys and values read in chunks of 16 into row 1 of a buffer of its own, nothing else run."""
    cache = lm.session.new_cache(rows, capacity=capacity)
    prefill = RowPrefill(lm, cache.values)
    for start in range(0, len(prompt), 16):
        prefill.run(1, prompt[start:start + 16], start)
    return [v.numpy()[1, :, :len(prompt)].copy() for v in cache.values]


@pytest.mark.parametrize("chunk_graphs", [False, True], ids=["uncaptured", "chunk-graphs"])
def test_a_long_prompt_read_beside_fed_steps_leaves_them_fed_and_every_stream_its_solo_tokens(stdlib_cuda_model,
                                                                                           chunk_graphs, monkeypatch):
    plain = load(stdlib_cuda_model, "cpu", threads=1)
    want = [plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids for p, n in STREAMS + [(LONG, 10)]]
    lm = slot_lm(stdlib_cuda_model, True)
    asked: list[bool] = []  # whether each chunk read its logits back
    if chunk_graphs:
        original = CudaGraphs.run_chunk

        def run_chunk(self, *args, logits=True):
            asked.append(logits)
            return original(self, *args, logits=logits)

        monkeypatch.setattr(CudaGraphs, "run_chunk", run_chunk)
    else:
        original_run = RowPrefill.run

        def run(self, row, ids, start, logits=True, want="logits", pad_id=0):
            if len(ids) == 16 or start:  # the long prompt's chunks, not the streams' prompts (3 and 7 tokens)
                asked.append(logits)
            return original_run(self, row, ids, start, logits, want, pad_id)

        monkeypatch.setattr(RowPrefill, "run", run)
    got, held, sched, log = _read_beside_streams(lm, LONG, 10, chunk_graphs=chunk_graphs)
    assert got == want
    # 7 chunks, one an iteration, a decode step after each, every one fed on the device: the row just admitted is
    # parked there (its inputs patched: ``_on_device``), and so is its first token when the last chunk's row joins;
    # every step's rows left to the rows thread (still pending when the next chunk ran), each step overlapped with
    # the step before's rows but the first (the admission waits for them) and the last (so does the join)
    assert [c for c, *_ in log] == [1] * 7
    assert [f for _, f, _, _ in log] == [1] * 7
    assert [o for _, _, o, _ in log] == [0] + [1] * 5 + [0]
    assert [p for *_, p in log] == [True] * 7
    assert sched.stats.row_patches >= 2 and sched.stats.steps - sched.stats.fed_steps == 1  # the streams' first
    assert asked == [False] * 6 + [True]  # only the last chunk read its logits back
    if chunk_graphs:
        assert sched.stats.graph_chunks == 7
    # the prompt's keys and values in its row: exactly those of its chunks read alone (no step wrote over them)
    alone = _chunks_alone(plain, LONG, 4, sched.cache.capacity)
    assert all(np.array_equal(h, ref) for h, ref in zip(held, alone))


def test_a_row_parked_at_what_it_holds_gets_a_fed_steps_write_over_its_prompt(stdlib_cuda_model):
    """The check above can fail: parked at what the table holds for it (nothing until it joins, its chunks not
    making the next step host-fed), the fed steps between its chunks write over the prompt's first positions."""
    lm = slot_lm(stdlib_cuda_model, True)
    _, held, sched, log = _read_beside_streams(lm, LONG, 10, park_at_prompt=False)
    assert sum(f for _, f, _, _ in log) >= 5
    alone = _chunks_alone(load(stdlib_cuda_model, "cpu", threads=1), LONG, 4, sched.cache.capacity)
    assert not all(np.array_equal(h, ref) for h, ref in zip(held, alone))


def test_fed_steps_stop_where_a_parked_row_would_pass_its_capacity(stdlib_cuda_model):
    """A prompt of capacity - 6 tokens (with 2 new ones) read beside fed steps: parked at its length, 5 positions are
    left past it, so at most 5 fed steps follow its parking (on the device as it is admitted, then by host-fed steps)
    while it is read, then a host-fed step parks it there again; its tokens and keys and values are still exactly
    its own."""
    lm = slot_lm(stdlib_cuda_model, True)
    capacity = 256
    prompt = rng.integers(5, 4000, capacity - 6).tolist()
    plain = load(stdlib_cuda_model, "cpu", threads=1)
    want = [plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids for p, n in STREAMS + [(prompt, 2)]]
    got, held, sched, log = _read_beside_streams(lm, prompt, 2, max_length=capacity)
    assert sched.cache.capacity == capacity and got == want
    # 16 chunks (250 tokens); the steps after them: 5 fed (the row parked on the device as it was admitted, 5
    # positions of room), host-fed (re-parked), 5 fed, host-fed, 4 fed (the last chunk's row joins on the device)
    assert [f for _, f, _, _ in log] == [1] * 5 + [0] + [1] * 5 + [0] + [1] * 4
    alone = _chunks_alone(plain, prompt, 4, capacity)
    assert all(np.array_equal(h, ref) for h, ref in zip(held, alone))


# ---- the loop's own thread ----
@pytest.mark.parametrize("chunk_graphs", [False, True], ids=["uncaptured", "chunk-graphs"])
def test_two_long_prompts_read_beside_streams_ending_on_stop_tokens(stdlib_cuda_model, chunk_graphs, monkeypatch):
    """The loop on its thread, every request queued before it starts: three greedy streams, then two long prompts
    read 16 tokens an iteration (over both, in order) while the streams decode, the streams ending on stop tokens
    (an end no step foresees: their rows were stepped once more, unread, on the device) while the prompts are read.
    Every request gets exactly the tokens it gets alone, and steps were fed while the prompts were read."""
    from serve.test_slots import result, submit

    plain = load(stdlib_cuda_model, "cpu", threads=1)
    streams = [(PROMPTS[i], 40) for i in (0, 2, 4)]
    stops = []
    for i, (p, n) in enumerate(streams):  # a token first produced at step 4, 6, 8 or later (up to 12)
        ids = plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids
        j = next(j for j in range(4 + 2 * i, 13) if ids[j] not in ids[:j])
        stops.append([ids[j]])
    longs = [(LONG, 8), (LONG[::-1][:90], 6)]
    want = [plain.generate(p, max_new_tokens=n, stop_token_ids=s).token_ids for (p, n), s in zip(streams, stops)]
    want += [plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids for p, n in longs]
    assert all(len(w) <= 13 for w in want[:3])
    lm = slot_lm(stdlib_cuda_model, True)
    sched = make_scheduler(lm, max_batch=6, prefill_chunk=16, max_length=160, chunk_graphs=chunk_graphs)
    ended: list[int] = []  # the prefill runs done when each stream ended
    fed_at: list[int] = []  # ... when each fed step ran
    step_fed = lm.session.step_fed
    monkeypatch.setattr(lm.session, "step_fed", lambda cache: fed_at.append(sched.stats.prefill_chunks)
                        or step_fed(cache))

    def emit(out):
        def put(event):
            if event[0] == "done":
                ended.append(sched.stats.prefill_chunks)
            _emit_to(out)(event)
        return put

    first = [queue.Queue() for _ in streams]
    for (p, n), s, out in zip(streams, stops, first):
        sched.submit(lm.prepare(p, max_new_tokens=n, stop_token_ids=s), emit(out))
    later = [submit(sched, lm, p, n)[0] for p, n in longs]
    sched.start()
    try:
        got = [q.get(timeout=60) for q in first] + [result(q) for q in later]
    finally:
        sched.stop()
    assert got == want and sched.stats.failed == 0
    runs = sched.stats.prefill_chunks  # the last one read the second long prompt's last tokens
    assert sched.stats.prefill_tokens == sum(len(p) for p, _ in streams + longs)
    assert len(ended) == 3 and all(n < runs for n in ended)  # each stream ended while the prompts were read
    assert sum(1 for n in fed_at if n < runs) >= 3  # and steps were fed on the device meanwhile
