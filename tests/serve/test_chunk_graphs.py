"""A long prompt's chunks through captured CUDA graphs (RowPrefill.run_chunk, CudaGraphs.run_chunk): each chunk
right-padded to one of CHUNK_WIDTHS, the mask at the row's full capacity, a graph per (row, width) on the loop's
thread, bounded in number, the same inputs uncaptured where no graph runs it. Run here on the CPU: the padded run
against today's unpadded chunks (bit for bit), and the captured path through the session's CUDA-graph slot path minus
the GPU (a stand-in session runs a graph id's first use on each thread 3 times, as onnxruntime's capture does)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from serve.test_slots import result, slot_lm, submit, wait_until

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime import cuda_graphs
from onnxpipe.runtime.cuda_graphs import CHUNK_WIDTHS, CudaGraphs
from onnxpipe.runtime.generate import load
from onnxpipe.serve.budget import MIN_CHUNK, PROBE_CHUNK, PrefillBudget, RunCost
from onnxpipe.serve.row_prefill import RowPrefill, chunk_inputs, chunk_width
from onnxpipe.serve.scheduler import make_scheduler

rng = np.random.default_rng(7)
LONG = rng.integers(5, 4000, 70).tolist()  # read in chunks of 16: 16, 16, 16, 16, 6 (padded to 8)
SHORT = rng.integers(5, 4000, 9).tolist()  # read in one run, uncaptured, in any row


# ---- the widths and the inputs ----
@pytest.mark.fast
def test_a_chunk_takes_the_smallest_width_that_holds_it_and_fits_the_row():
    assert [chunk_width(n, 0, 1024) for n in (1, 8, 9, 16, 33, 64, 65, 200)] == [8, 8, 16, 16, 64, 64, 128, 256]
    assert chunk_width(200, 0, 256) == 200  # 256 would fill the row: the mask must stay wider than the chunk
    assert chunk_width(40, 200, 256) == 40  # 64 would pass the row's end: its own width, run uncaptured
    assert chunk_width(40, 190, 256) == 64  # 190 + 64 = 254 fits
    assert chunk_width(10, 0, 16) == 10  # the width must stay narrower than the mask (the capacity)
    assert chunk_width(600, 0, 4096) == 600  # past the widest: its own width
    assert max(CHUNK_WIDTHS) == 512 and list(CHUNK_WIDTHS) == sorted(CHUNK_WIDTHS)


@pytest.mark.fast
def test_chunk_inputs_pad_the_chunk_and_give_the_mask_at_the_row_capacity():
    ids, mask, positions, last = chunk_inputs([5, 6, 7], 10, 8, 32, pad_id=2)
    assert ids.tolist() == [[5, 6, 7, 2, 2, 2, 2, 2]] and ids.dtype == np.int64
    assert mask.shape == (1, 32) and mask.sum() == 18 and mask[0, :18].all() and not mask[0, 18:].any()
    assert positions.tolist() == [list(range(10, 18))] and last.tolist() == [2]  # the last real token
    for args in (([], 0, 8, 32), ([1] * 9, 0, 8, 32), ([1], 30, 8, 32), ([1], -1, 8, 32)):
        with pytest.raises(OnnxpipeError, match="does not fit"):
            chunk_inputs(*args)


@pytest.mark.fast
def test_auto_sizes_chunks_among_the_widths_and_learns_only_what_it_is_told():
    b = PrefillBudget.parse("auto")
    b.widths = CHUNK_WIDTHS
    b.stepped(0.002)
    cost = RunCost(fixed=0.0004, token=0.000004, context=0.0)  # a replayed chunk: ~0.65 ms for 64 tokens
    a = b.iteration(decoding=True)
    assert a.next(0, 4096) == MIN_CHUNK  # the probes are widths
    a.ran(MIN_CHUNK, 0, 0.05, learn=False)  # the run that captured its graph: not a measure
    assert not b.runs
    a = b.iteration(decoding=True)
    assert a.next(0, 4096) == MIN_CHUNK  # still no measure
    a.ran(MIN_CHUNK, 0, cost.seconds(MIN_CHUNK, 0))
    a = b.iteration(decoding=True)
    assert a.next(MIN_CHUNK, 4096) == PROBE_CHUNK
    a.ran(PROBE_CHUNK, MIN_CHUNK, cost.seconds(PROBE_CHUNK, MIN_CHUNK))
    fitted = b.model
    assert fitted is not None and fitted.fixed == pytest.approx(cost.fixed)
    free = fitted.tokens(b.target_s, 64)  # what fits the target (0.001 s): 150 tokens, not a width
    assert free not in CHUNK_WIDTHS and free > 128
    assert b.tokens(decoding=True, start=64) == 128  # the largest width within it
    assert b.iteration(decoding=True).next(64, 20) == 20  # the prompt's last tokens (padded by the run)
    b.widths = ()
    assert b.tokens(decoding=True, start=64) == free  # without graphs: as before


# ---- the padded run on the CPU ----
def test_a_padded_chunk_writes_and_returns_exactly_what_an_unpadded_chunk_does(stdlib_cuda_model):
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    s = lm.session

    def filled():  # every byte random first, so "unchanged" can fail
        cache = s.new_cache(4, capacity=96)
        noise = np.random.default_rng(1)
        for v in cache.values:
            v.numpy()[...] = noise.standard_normal(v.numpy().shape)
        return cache

    plain_cache, cache = filled(), filled()
    plain, padded = RowPrefill(lm, plain_cache.values), RowPrefill(lm, cache.values)
    padded.chunk_graphs = True  # no CUDA-graph slot holds these buffers: the padded inputs, uncaptured
    before = [v.numpy().copy() for v in cache.values]
    for start, end in ((0, 16), (16, 40), (40, 70)):  # widths 16, 32 (24 tokens) and 32 (30 tokens)
        want = plain.run(2, LONG[start:end], start)
        got, how = padded.run_chunk(2, LONG[start:end], start, pad_id=3)
        assert how == "uncaptured" and got.shape == want.shape == (1, s.vocab_size)
        assert np.array_equal(got, want)  # bit for bit on the CPU, not just close
    for b, a, w in zip(before, [v.numpy() for v in cache.values], [v.numpy() for v in plain_cache.values]):
        assert np.array_equal(a[2, :, :70], w[2, :, :70])  # the prompt's keys and values: the unpadded run's
        assert not np.array_equal(a[2, :, 70:72], b[2, :, 70:72])  # the last chunk's padding, where the next go
        assert np.array_equal(a[2, :, 72:], b[2, :, 72:])  # nothing past the last chunk's width
        assert np.array_equal(np.delete(a, 2, axis=0), np.delete(b, 2, axis=0))  # no other row
    padded.chunk_graphs = False  # off: today's run, unpadded
    again = filled()
    out, how = RowPrefill(lm, again.values).run_chunk(1, LONG[:5], 0)
    assert how == "uncaptured" and np.array_equal(out, plain.run(1, LONG[:5], 0))


# ---- through the graph slots (the CPU run of the same binding) ----
def _spy(monkeypatch) -> list[dict]:
    """Each CudaGraphs.run_chunk call: its row, inputs and whether it ran (a graph replayed or captured)."""
    calls: list[dict] = []
    original = CudaGraphs.run_chunk

    def run_chunk(self, values, row, ids, mask, positions, last_index, logits=True):
        out = original(self, values, row, ids, mask, positions, last_index, logits=logits)
        calls.append({"row": row, "ids": ids.copy(), "mask": mask.copy(), "positions": positions.copy(),
                      "last": last_index.copy(), "ran": not isinstance(out, str), "thread": threading.get_ident(),
                      "logits": logits})
        return out

    monkeypatch.setattr(CudaGraphs, "run_chunk", run_chunk)
    return calls


def _serve(lm, requests, chunk_graphs=True, chunk=16, warm_rows=0):
    """``requests`` (prompt, new tokens) through a scheduler of 4 rows, the first one alone until it decodes; the
    tokens of each and the scheduler (stopped)."""
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=chunk, max_length=128, chunk_graphs=chunk_graphs)
    sched.warm_rows = warm_rows
    sched.start()
    try:
        first = submit(sched, lm, *requests[0])[0]
        wait_until(lambda: sched.stats.steps > 0)  # decoding: a long prompt now takes the highest free row
        rest = [submit(sched, lm, p, n)[0] for p, n in requests[1:]]
        tokens = [result(first)] + [result(q) for q in rest]
    finally:
        sched.stop()
    return tokens, sched


def test_long_prompts_chunks_replay_graphs_per_row_and_width_and_give_the_plain_tokens(stdlib_cuda_model,
                                                                                      monkeypatch):
    requests = [(SHORT, 30), (LONG, 8), (LONG[::-1], 6)]
    plain = load(stdlib_cuda_model, "cpu", threads=1)
    want = [plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids for p, n in requests]
    lm = slot_lm(stdlib_cuda_model, True)
    calls = _spy(monkeypatch)
    got, sched = _serve(lm, requests)
    assert got == want
    assert sched.rows.chunk_graphs and sched.budget.widths == CHUNK_WIDTHS and not sched.stats.chunk_graph_error
    # the short prompt read whole, uncaptured; each long prompt in 5 chunks, all through graphs
    assert len(calls) == 10 and all(c["ran"] for c in calls) and sched.stats.graph_chunks == 10
    assert {c["thread"] for c in calls} == {sched._thread.ident}  # the loop's thread, where the decode graph was
    (slot,) = lm.session._graphs.values()
    rows = {c["row"] for c in calls}  # the rows the long prompts took (the highest free one while others decode)
    assert 1 <= len(rows) <= 2 and set(slot.chunks) == {(c["row"], c["ids"].shape[1]) for c in calls}
    assert {w for _, w in slot.chunks} <= {8, 16}  # chunks of 16 and the prompts' last ones: their widths
    # the inputs fed: the chunk padded to its width, the mask at the slot's capacity over the row's positions so
    # far and the width, positions from the chunk's start, the last index at its last real token
    for i, start in enumerate((0, 16, 32, 48, 64)):
        c = calls[i]
        n = min(16, 70 - start)
        width = 16 if n == 16 else 8
        assert c["ids"].shape == (1, width) and c["ids"][0, :n].tolist() == LONG[start:start + n]
        assert (c["ids"][0, n:] == sched.table.pad_id).all()
        assert c["mask"].shape == (1, slot.capacity) and c["mask"].sum() == start + width
        assert c["positions"].tolist() == [list(range(start, start + width))] and c["last"].tolist() == [n - 1]
    # each graph id captured once (the stand-in ran its first use 3 times in that call: idempotent, the tokens
    # above), then replayed; ids of their own
    stand_in = lm.session.session
    for cg in slot.chunks.values():
        assert stand_in.runs[cg.graph_id] == cg.runs >= 1 and cg.graph_id != slot.graph_id
        assert [g for _, g in stand_in.captures].count(cg.graph_id) == 1 and len(cg.threads) == 1


def test_chunks_past_the_bound_or_off_the_widths_run_uncaptured_with_the_same_tokens(stdlib_cuda_model,
                                                                                    monkeypatch):
    requests = [(SHORT, 30), (LONG, 8)]
    plain = load(stdlib_cuda_model, "cpu", threads=1)
    want = [plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids for p, n in requests]
    monkeypatch.setattr(cuda_graphs, "CHUNK_GRAPHS_PER_SLOT", 1)
    lm = slot_lm(stdlib_cuda_model, True)
    calls = _spy(monkeypatch)
    got, sched = _serve(lm, requests)
    assert got == want
    (slot,) = lm.session._graphs.values()
    row = calls[0]["row"]
    assert list(slot.chunks) == [(row, 16)] and slot.chunks[(row, 16)].runs == 4  # the one graph: width 16
    assert [c["ran"] for c in calls] == [True] * 4 + [False]  # the last chunk's width 8: no room for its graph
    assert sched.stats.graph_chunks == 4 and sched.stats.prefill_chunks == 6  # + the short prompt's run
    assert sched.stats.chunk_graph_skipped == {"bound": 1}  # said, not silent
    # a chunk of 24 tokens (a fixed budget of 24: width 32): captured; then the same with no CUDA-graph width
    monkeypatch.setattr(cuda_graphs, "CHUNK_WIDTHS", (16, 8))
    calls.clear()
    got, sched = _serve(lm, requests, chunk=24)
    assert got == want and calls and not any(c["ran"] for c in calls) and sched.stats.graph_chunks == 0
    assert sched.stats.chunk_graph_skipped == {"width": len(calls)}


def test_a_chunk_graph_runs_only_on_a_thread_its_decode_graph_was_captured_on(stdlib_cuda_model):
    lm = slot_lm(stdlib_cuda_model, True)
    cache = lm.session.new_cache(2, capacity=128)  # its slot's decode graph captured here, on this thread
    capacity = cache.capacity
    inputs = chunk_inputs(LONG[:16], 0, 16, capacity)
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("other", lm.session.graphs.run_chunk(cache.values, 1, *inputs)))
    t.start()
    t.join(60)
    assert out == {"other": "thread"}  # another thread: the caller runs it uncaptured
    logits, captured = lm.session.graphs.run_chunk(cache.values, 1, *inputs)
    assert captured and logits.shape == (1, lm.session.vocab_size)
    assert lm.session.graphs.run_chunk(cache.values, 1, *inputs)[1] is False  # replayed
    narrow = (inputs[0], inputs[1][:, :64], inputs[2], inputs[3])  # a mask not at the slot's width
    assert lm.session.graphs.run_chunk(cache.values, 1, *narrow) == "mask"
    elsewhere = load(stdlib_cuda_model, "cpu", threads=1).session.new_cache(2, capacity=capacity)
    assert lm.session.graphs.run_chunk(elsewhere.values, 1, *inputs) == "no_slot"  # buffers of no slot
    assert set(cuda_graphs.CHUNK_SKIPS) >= {"thread", "mask", "no_slot", "width", "head", "bound"}


@pytest.mark.parametrize("warm_rows", [0, 2], ids=["on-first-chunk", "at-start"])
def test_a_failing_chunk_graph_is_reported_and_the_chunk_runs_uncaptured(stdlib_cuda_model, monkeypatch, warm_rows):
    requests = [(SHORT, 30), (LONG, 8)]
    want = [load(stdlib_cuda_model, "cpu", threads=1).generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids
            for p, n in requests]
    lm = slot_lm(stdlib_cuda_model, True)

    def broken(self, *args, **kwargs):  # at start: not even the project's error type
        if warm_rows:
            raise RuntimeError("boom")
        raise OnnxpipeError("model: onnxruntime failed on a CUDA-graph prefill chunk (row 3, 16 tokens): boom")

    monkeypatch.setattr(CudaGraphs, "run_chunk", broken)
    got, sched = _serve(lm, requests, warm_rows=warm_rows)
    assert got == want and sched.stats.graph_chunks == 0 and "boom" in sched.stats.chunk_graph_error
    assert sched._rows_thread is not None and not sched.stats.capture_error  # the loop's start otherwise whole


def test_chunk_graphs_need_cuda_graphs_and_change_nothing_without_them(stdlib_cuda_model, stdlib_model):
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    with pytest.raises(OnnxpipeError, match="need a session with CUDA graphs"):
        make_scheduler(lm, max_batch=2, max_length=64, chunk_graphs=True)
    sched = make_scheduler(lm, max_batch=2, max_length=64)
    assert not sched.rows.chunk_graphs and sched.budget.widths == ()
    # opt-in until a GPU run has checked them: off by default even with CUDA graphs
    assert not make_scheduler(slot_lm(stdlib_cuda_model, True), max_batch=2, max_length=64).rows.chunk_graphs
    assert not make_scheduler(slot_lm(stdlib_cuda_model, True), max_batch=2, max_length=64,
                              chunk_graphs=False).rows.chunk_graphs
    with pytest.raises(OnnxpipeError, match="grows its cache"):
        make_scheduler(load(stdlib_model, "cpu", threads=1), max_batch=2, chunk_graphs=True)


def test_the_load_tests_check_reads_prompts_through_chunk_graphs_and_says_how_many(stdlib_cuda_model):
    from serve.test_prefill_group import load_test_script

    lm = slot_lm(stdlib_cuda_model, True)

    def make(chunk):
        return make_scheduler(lm, max_batch=4, prefill_chunk=chunk, max_length=128, chunk_graphs=True)

    line = load_test_script().check_equal(lm, make, 4, 128, 32, np.random.default_rng(0))
    assert line.startswith("check-equal: 7 requests") and "concurrent == solo" in line
    through = int(line.split(" chunks through CUDA graphs")[0].rsplit("; ", 1)[1])
    graphs = [cg for slot in lm.session._graphs.values() for cg in slot.chunks.values()]  # (generate's slots: none)
    assert through > 0 and through == sum(cg.runs for cg in graphs)


def test_the_highest_rows_chunk_graphs_are_captured_when_the_loop_starts(stdlib_cuda_model, monkeypatch):
    """On a GPU the scheduler captures the chunk graphs of its highest rows at every width before serving (none on
    the CPU by default): later chunks there replay them, the warm-up's writes into empty rows change no token."""
    requests = [(SHORT, 30), (LONG, 8), (LONG[::-1], 6)]
    plain = load(stdlib_cuda_model, "cpu", threads=1)
    want = [plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids for p, n in requests]
    lm = slot_lm(stdlib_cuda_model, True)
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128, chunk_graphs=True)
    assert sched.warm_rows == 0  # the CPU
    sched.warm_rows = 2
    sched.start()
    try:
        wait_until(lambda: lm.session._graphs and next(iter(lm.session._graphs.values())).chunks)
        first = submit(sched, lm, *requests[0])[0]
        wait_until(lambda: sched.stats.steps > 0)
        rest = [submit(sched, lm, p, n)[0] for p, n in requests[1:]]
        got = [result(first)] + [result(q) for q in rest]
    finally:
        sched.stop()
    assert got == want and not sched.stats.chunk_graph_error
    (slot,) = lm.session._graphs.values()
    widths = [w for w in CHUNK_WIDTHS if w < slot.capacity]
    warmed = {(r, w) for r in (3, 2) for w in widths}
    assert warmed <= set(slot.chunks) and len(widths) == 5  # capacity 256: 8 to 128
    stand_in = lm.session.session
    for key in warmed:  # each captured once, on the loop's thread (the stand-in's thread numbers: its own)
        assert [g for _, g in stand_in.captures].count(slot.chunks[key].graph_id) == 1
    loop = {t for t, g in stand_in.captures if g == slot.chunks[(3, 8)].graph_id}
    assert loop == {t for t, g in stand_in.captures if g == slot.graph_id} - {stand_in.captures[0][0]}
    assert sched.stats.graph_chunks == 10  # the real chunks only, not the warm-up's runs


# ---- the load test's long-prompt row: long prompts arriving beside 32 decoding streams ----
@pytest.fixture(scope="module")
def long_cuda_model(tmp_path_factory) -> object:
    """A tiny Llama of 8192 positions through `optimize --target cuda`: rows of 4096-token prompts fit it."""
    from tiny import make_tiny_model

    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import optimize_model

    out = tmp_path_factory.mktemp("long-cuda")
    hf = make_tiny_model("llama", out / "hf", max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    export_decoder(hf, out / "onnx", verify=False)
    optimize_model(out / "onnx", out / "cuda", level=3, target="cuda", verify=False)
    return out / "cuda"


@pytest.mark.fast
def test_a_row_is_taken_among_the_rows_asked_while_one_is_free_there():
    from onnxpipe.serve.slot_table import SlotTable

    table = SlotTable(6, 16)
    assert table.take(among=range(0, 2)) == 0 and table.take(last=True, among=range(0, 2)) == 1
    assert table.take(last=True, among=range(0, 2)) == 5  # none free there: any row, the highest
    assert table.take(last=True, among=range(3, 6)) == 4 and table.take(among=range(0)) == 2


def test_long_prompts_beside_32_streams_read_through_graphs_in_the_graph_rows(long_cuda_model):
    """The configuration of load_test's long-prompt row (--streams 32 --long-prompts 4 --long-prompt-tokens 4096
    --chunks 64 --chunk-graphs on): 36 rows of 4352 positions (4104 asked, rounded up), the highest rows' graphs
    captured at start as on a GPU, 32 streams of 128-token prompts (2 chunks each) arriving while others decode, then
    4 prompts of 4096 tokens. The streams took the highest free rows, whose graphs (and 12 more rows') used up the
    bound of 40, so the long prompts, in the rows left, ran every chunk uncaptured, and nothing said why (0/256 on an
    H100). Now they are read in the graph rows, every chunk through a graph, with their solo tokens."""
    rng = np.random.default_rng(3)
    lm = slot_lm(long_cuda_model, True)
    vocab = lm.session.vocab_size
    longs = [rng.integers(0, vocab, 4096).tolist() for _ in range(4)]
    plain = load(long_cuda_model, "cpu", threads=1)
    want = [plain.generate(p, max_new_tokens=4, stop_token_ids=[]).token_ids for p in longs]
    sched = make_scheduler(lm, max_batch=36, max_queue=256, prefill_chunk=64, max_length=4104, chunk_graphs=True)
    assert sched.cache.capacity == 4352 and sched.warm_rows == 0  # the CPU: set as on a GPU
    sched.warm_rows = 4
    sched.start()
    streams = []
    try:
        streams.append(submit(sched, lm, rng.integers(0, vocab, 128).tolist(), 1000)[1])
        wait_until(lambda: sched.stats.steps > 0)  # decoding: the other streams arrive beside it
        streams += [submit(sched, lm, rng.integers(0, vocab, 128).tolist(), 1000)[1] for _ in range(31)]
        wait_until(lambda: len(sched._running) == 32 and not sched._admitted)
        before = (sched.stats.prefill_chunks, sched.stats.graph_chunks, dict(sched.stats.chunk_graph_skipped))
        got = [result(q) for q in [submit(sched, lm, p, 4)[0] for p in longs]]
        after = (sched.stats.prefill_chunks, sched.stats.graph_chunks, dict(sched.stats.chunk_graph_skipped))
    finally:
        for req in streams:
            req.cancel()
        sched.stop()
    assert got == want
    assert after[0] - before[0] == 256 and after[1] - before[1] == 256  # every long chunk through a graph
    assert after[2] == before[2] == {"row": 64}  # the streams' chunks, uncaptured outside the graph rows: said
    (slot,) = lm.session._graphs.values()
    assert {row for row, _ in slot.chunks} == {32, 33, 34, 35}  # the graph rows, at every width: the warm-up's
    assert len(slot.chunks) == 4 * len(CHUNK_WIDTHS) == cuda_graphs.CHUNK_GRAPHS_PER_SLOT


@pytest.mark.fast
def test_the_load_tests_long_prompt_rows_say_why_chunks_ran_uncaptured():
    from serve.test_prefill_group import load_test_script

    script = load_test_script()
    before = {"graph_chunks": 32, "chunk_graph_skipped": {"row": 64}}
    after = {"graph_chunks": 32, "chunk_graph_skipped": {"row": 64, "bound": 256}}
    assert script.skipped_between(before, after) == {"bound": 256}
    assert script.skipped_between({}, {"chunk_graph_skipped": {"thread": 2}}) == {"thread": 2}
    assert script.skipped_between(before, before) == {} and script.skips({}) == "none"
    assert script.skips({"row": 3, "bound": 256}) == "bound 256, row 3"
