"""Several waiting prompts read in one prefill run (slots.SlotScheduler's prefill_group): whole prompts not yet begun
go to adjacent rows of the shared KV buffer (SlotTable.place) and one run of [k, longest prompt] writes them
(RowPrefill.run_group). On the CPU a group run's logits and keys/values are exactly a solo run's, so concurrent greedy
and seeded requests still get exactly their solo tokens; the run never writes a row outside its group."""

from __future__ import annotations

import numpy as np
import pytest
from scripts_module import load_script
from serve.test_slots import LENGTHS, PROMPTS, result, slot_lm, solo_results, submit, thirteen_requests, wait_until

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.generate import load
from onnxpipe.serve.row_prefill import RowPrefill
from onnxpipe.serve.scheduler import make_scheduler
from onnxpipe.serve.slot_table import DECODING, FREE, PREFILLING, SlotTable


# ---- the table alone ----
@pytest.mark.fast
def test_rows_not_begun_move_to_runs_of_adjacent_rows():
    t = SlotTable(8, 16)
    for _ in range(8):
        t.take()
    for row in (1, 4, 5):
        t.start_decoding(row, 7)  # rows 1, 4, 5 decode: rows 0, 2-3, 6-7 are the holes
    t.release(7)
    assert t.place([0, 2, 3, 6]) == [2, 3, 6, 7]  # no run holds 4: the longest (lowest first), then 2 more
    assert t.state.tolist() == [FREE, DECODING, PREFILLING, PREFILLING, DECODING, DECODING, PREFILLING, PREFILLING]
    t.release(7)
    assert t.place([2, 3, 6]) == [2, 3, 0]  # row 7 free again: holes 0, 2-3, 6-7
    assert t.state.tolist() == [PREFILLING, DECODING, PREFILLING, PREFILLING, DECODING, DECODING, FREE, FREE]
    t.release_all()
    for _ in range(4):
        t.take()
    # rows 0 and 2 to run together while rows 1 and 3 hold prompts not begun either: those move aside
    assert t.place([0, 2], others=[1, 3]) == [0, 1, 2, 3]
    t.take()
    assert t.place([0, 4], others=[1, 2, 3]) == [0, 1, 4, 2, 3]  # rows 2 and 3 stay where the run left them
    t.release(1)
    assert t.place([0, 2]) == [0, 1]  # the lowest run that holds them both
    assert t.state[:4].tolist() == [PREFILLING, PREFILLING, FREE, PREFILLING] and t.counts[:2].tolist() == [0, 0]
    t.prefilled(0, 5)
    with pytest.raises(OnnxpipeError, match="not begun"):  # a row holding prompt tokens stays where it is
        t.place([0, 1])
    with pytest.raises(OnnxpipeError, match="not prefilling"):
        t.place([5])
    with pytest.raises(OnnxpipeError, match="twice"):
        t.place([3], others=[3])


# ---- one group run against solo runs ----
def test_a_group_run_writes_what_solo_runs_write_and_no_other_row(stdlib_cuda_model):
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    s = lm.session
    prompts = [PROMPTS[i] for i in (0, 3, 2, 1)] + [[11]]  # 3, 70, 7, 40 and 1 tokens: right-padded to 70

    def filled():  # every byte random first, so "unchanged" can fail
        cache = s.new_cache(8, capacity=96)
        noise = np.random.default_rng(1)
        for v in cache.values:
            v.numpy()[...] = noise.standard_normal(v.numpy().shape)  # the buffer's memory: a view, written
        return cache

    solo_cache = filled()
    solo_rows = RowPrefill(lm, solo_cache.values)
    solo = np.concatenate([solo_rows.run(2 + i, p, 0) for i, p in enumerate(prompts)])
    cache = filled()
    before = [v.numpy().copy() for v in cache.values]
    logits = RowPrefill(lm, cache.values).run_group(2, prompts)
    assert logits.shape == solo.shape and logits.shape[0] == 5
    assert np.array_equal(logits, solo)  # exact on the CPU, not just close
    for b, a, want in zip(before, [v.numpy() for v in cache.values], [v.numpy() for v in solo_cache.values]):
        assert np.array_equal(a[:2], b[:2]) and np.array_equal(a[7:], b[7:])  # rows outside the group: untouched
        for i, p in enumerate(prompts):
            assert np.array_equal(a[2 + i, :, :len(p)], want[2 + i, :, :len(p)])  # the prompt's entries: solo's
            assert np.array_equal(a[2 + i, :, 70:], b[2 + i, :, 70:])  # nothing past the run's width
        assert not np.array_equal(a[2, :, 3:70], b[2, :, 3:70])  # the padding's entries, where the row's next go
    with pytest.raises(OnnxpipeError, match="rows of the buffer"):
        RowPrefill(lm, cache.values).run_group(6, prompts[:3])  # rows 6-8 of 8
    with pytest.raises(OnnxpipeError, match="do not fit a row of 96"):
        RowPrefill(lm, cache.values).run_group(0, [list(range(5, 105))])


# ---- the scheduler ----
def recorded_groups(monkeypatch):
    """The rows of each group run, recorded; each run checked to leave every other row's keys and values as they
    were, byte for byte (rows decoding beside it among them)."""
    runs: list[list[int]] = []
    original = RowPrefill.run_group

    def run_group(self, first, prompts, pad_id=0, want="logits"):
        rows = list(range(first, first + len(prompts)))
        runs.append(rows)
        others = [r for r in range(int(self.values[0].shape()[0])) if r not in rows]
        # bytes, not values: a slot's buffers start uninitialised, NaN in places (never equal to itself)
        before = [v.numpy()[others].tobytes() for v in self.values]
        logits = original(self, first, prompts, pad_id, want)
        assert all(b == v.numpy()[others].tobytes() for b, v in zip(before, self.values))
        return logits

    monkeypatch.setattr(RowPrefill, "run_group", run_group)
    return runs


@pytest.mark.parametrize("graphs,chunk", [(False, 16), (False, "auto"), (True, 16)],
                         ids=["plain-16", "plain-auto", "graph-slots-16"])
def test_concurrent_requests_read_in_groups_get_their_solo_tokens(stdlib_cuda_model, graphs, chunk, monkeypatch):
    """13 requests on 4 rows, all queued before the loop starts, with groups of up to 4: the solo tokens of each
    (greedy and seeded), and group runs of several rows happened (with a budget of 16 tokens: the prompts of 3 and 7
    tokens together; with auto, the short prompts not yet begun, 4 at a time while nothing decodes)."""
    lm = slot_lm(stdlib_cuda_model, graphs)
    sampled = {"temperature": 0.9, "top_k": 50, "seed": 3}
    solo, solo_sampled, _ = solo_results(lm, sampled)
    runs = recorded_groups(monkeypatch)
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=chunk, max_length=128, prefill_group=4)
    assert thirteen_requests(sched, lm, sampled) == solo * 2 + [solo_sampled]
    assert sched.stats.failed == 0 and sched.stats.max_running == 4
    assert max(map(len, runs)) >= (2 if chunk == 16 else 4)
    assert all(rows == list(range(rows[0], rows[0] + len(rows))) for rows in runs)


def test_a_client_gone_during_its_group_run_frees_its_row(stdlib_cuda_model, monkeypatch):
    """Four prompts in one group run; one request's client leaves while the run is on: it gets no event (not even
    its first token), its row is free again, and the other three get their solo tokens."""
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    alone = make_scheduler(lm, max_batch=4, prefill_chunk="auto", max_length=128)
    alone.start()
    try:
        solo = [result(submit(alone, lm, p, n)[0]) for p, n in zip(PROMPTS[:4], LENGTHS[:4])]
    finally:
        alone.stop()
    sched = make_scheduler(lm, max_batch=4, prefill_chunk="auto", max_length=128, prefill_group=4)
    outs, reqs = zip(*[submit(sched, lm, p, n) for p, n in zip(PROMPTS[:4], LENGTHS[:4])])
    events: list = []
    reqs[1].emit = events.append  # every event the gone client would get
    original, rows = RowPrefill.run_group, {}

    def run_group(self, first, prompts, pad_id=0, want="logits"):
        reqs[1].cancel()  # the client of the 40-token prompt disconnects mid-run
        rows["gone"] = reqs[1].slot
        return original(self, first, prompts, pad_id, want)

    monkeypatch.setattr(RowPrefill, "run_group", run_group)
    sched.start()
    try:
        assert [result(outs[i]) for i in (0, 2, 3)] == [solo[i] for i in (0, 2, 3)]
        wait_until(lambda: sched.table.free_rows() == 4)
        assert sched.stats.cancelled == 1 and sched.stats.failed == 0 and sched.stats.prefill_chunks == 1
        assert rows["gone"] in range(4) and outs[1].empty() and events == []
    finally:
        sched.stop()


def test_a_failed_group_run_fails_its_requests_and_the_next_are_served(stdlib_cuda_model, monkeypatch):
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    sched = make_scheduler(lm, max_batch=4, prefill_chunk="auto", max_length=128, prefill_group=4)
    original, calls = RowPrefill.run_group, []

    def flaky(self, first, prompts, pad_id=0, want="logits"):
        calls.append(len(prompts))
        if len(calls) == 1:
            raise OnnxpipeError("injected group fault")
        return original(self, first, prompts, pad_id, want)

    monkeypatch.setattr(RowPrefill, "run_group", flaky)
    outs = [submit(sched, lm, p, 5)[0] for p in PROMPTS[:3]]
    sched.start()
    try:
        for q in outs:
            kind, message = q.get(timeout=60)
            assert kind == "error" and "injected group fault" in message
        wait_until(lambda: sched.table.free_rows() == 4)
        again = [submit(sched, lm, p, 5)[0] for p in PROMPTS[:3]]
        want = [lm.generate(p, max_new_tokens=5, stop_token_ids=[]).token_ids for p in PROMPTS[:3]]
        assert [result(q) for q in again] == want and sched.stats.failed == 3
    finally:
        sched.stop()


def test_prefill_group_is_checked(stdlib_cuda_model, stdlib_model, stdlib_lm):
    from click.testing import CliRunner

    from onnxpipe.cli import main

    lm = load(stdlib_cuda_model, "cpu", threads=1)
    for bad in (0, 5, True, "2"):
        with pytest.raises(OnnxpipeError, match="prefill_group must be an integer from 1 to max_batch"):
            make_scheduler(lm, max_batch=4, max_length=64, prefill_group=bad)
    with pytest.raises(OnnxpipeError, match="prefill_group reads prompts into adjacent fixed rows"):
        make_scheduler(stdlib_lm, prefill_group=2)
    r = CliRunner().invoke(main, ["serve", str(stdlib_model), "--port", "0", "--provider", "cpu", "--prefill-group", "2"])
    assert r.exit_code == 1 and "Traceback" not in r.output and "prefill_group" in r.output, r.output
    r = CliRunner().invoke(main, ["serve", str(stdlib_model), "--port", "0", "--prefill-group", "0"])
    assert r.exit_code == 2 and "--prefill-group" in r.output, r.output


# ---- the load test's check ----
def load_test_script():
    return load_script("load_test")


@pytest.mark.fast
def test_the_load_test_reports_agreement_with_solo_tokens():
    agreement = load_test_script().agreement
    solo, got = [[1, 2, 3, 4], [5, 6], [7, 8, 9]], [[1, 2, 3, 4], [5, 0], [7, 9, 9, 1]]
    assert agreement(solo, got, [10, 20, 30]) == ("1/3 requests identical to solo; 7/10 tokens (70.0%) equal position "
                                                  "by position; first differences: request 1 (prompt 20) at token 1, "
                                                  "request 2 (prompt 30) at token 1")
    assert agreement(solo, solo, [10, 20, 30]).startswith("3/3 requests identical to solo; 9/9 tokens (100.0%)")


def test_the_load_test_refuses_long_prompts_the_model_cannot_hold(stdlib_model, capsys):
    """--long-prompt-tokens past the model's context is one line naming the option and the limit, before any
    server starts (run 56 met it as a traceback from the client process, the server's 400 inside)."""
    with pytest.raises(SystemExit) as e:
        load_test_script().main([str(stdlib_model), "--provider", "cpu", "--concurrency", "", "--long-prompts", "1",
                                 "--streams", "1", "--long-prompt-tokens", "100000", "--chunks", "auto"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--long-prompt-tokens 100000" in err and "max_position_embeddings" in err, err
    assert "Traceback" not in err


def test_the_load_test_check_fails_on_a_difference_where_exact_and_reports_it_where_not(stdlib_cuda_model,
                                                                                         monkeypatch):
    """A group run that rounds differently from a solo run (as a GPU's batched GEMM may), planted: the check that
    promises exactness stops (exit 1, the first difference named), the one that does not reports the agreement."""
    script = load_test_script()
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    original = RowPrefill.run_group

    def rounded(self, first, prompts, pad_id=0, want="logits"):
        logits = original(self, first, prompts, pad_id)  # the logits, whatever was asked: the rows' choice planted
        if len(prompts) > 1:  # the second-best token wins in every row of a group: a first token that differs
            logits[np.arange(len(prompts)), np.argsort(logits, axis=1)[:, -2]] += 1e3
        return logits

    monkeypatch.setattr(RowPrefill, "run_group", rounded)

    def make(chunk):
        return make_scheduler(lm, max_batch=4, prefill_chunk=chunk, max_length=64, prefill_group=4)

    with pytest.raises(SystemExit, match=r"check-equal FAILED: \d/7 requests differ from solo; .* at token 0"):
        script.check_equal(lm, make, 4, 64, "auto", np.random.default_rng(0), exact=True)
    line = script.check_equal(lm, make, 4, 64, "auto", np.random.default_rng(0), exact=False)
    assert line.startswith("check-equal (prefill group 4, exactness not promised): ") and "at token 0" in line


def test_a_group_of_greedy_requests_reads_back_only_their_first_tokens(stdlib_cuda_model, monkeypatch):
    """``want="argmax"``: each row's argmax of the logits a run gives otherwise, taken where the run wrote them (the
    session's head graph), so nothing of [k, vocab] comes back; the scheduler asks it of a group whose requests are
    all greedy (without a repetition penalty) and the logits of a group with a sampled request."""
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    prompts = [PROMPTS[i] for i in (0, 3, 2)]
    rows = RowPrefill(lm, lm.session.new_cache(4, capacity=96).values)
    logits = rows.run_group(0, prompts)
    ids = rows.run_group(0, prompts, want="argmax")
    assert logits.shape[0] == 3 and logits.dtype == np.float32
    assert ids.shape == (3,) and ids.dtype == np.int64 and ids.tolist() == np.argmax(logits, axis=1).tolist()
    assert rows.run(1, PROMPTS[1], 0, want="argmax").tolist() == [int(np.argmax(rows.run(1, PROMPTS[1], 0)))]
    asked: list[tuple[int, str]] = []
    original = RowPrefill.run_group

    def run_group(self, first, prompts, pad_id=0, want="logits"):
        asked.append((len(prompts), want))
        return original(self, first, prompts, pad_id, want)

    monkeypatch.setattr(RowPrefill, "run_group", run_group)
    for options, expected in (({}, "argmax"), ({"temperature": 0.9, "top_k": 50, "seed": 3}, "logits")):
        asked.clear()
        sched = make_scheduler(lm, max_batch=4, prefill_chunk="auto", max_length=128, prefill_group=4)
        outs = [submit(sched, lm, PROMPTS[0], 4)[0], submit(sched, lm, PROMPTS[2], 4, **options)[0]]
        sched.start()
        try:
            assert all(len(result(q)) == 4 for q in outs)
        finally:
            sched.stop()
        assert asked == [(2, expected)]
