"""The slot layout (serve/slots.py, serve/slot_table.py): requests join and leave fixed rows of a shared KV buffer at
every decode step, run here on the CPU with the graph of `optimize --target cuda`, both plain and through the
session's CUDA-graph slot path (its replay minus the GPU: a stand-in session runs a graph id's first use on each
thread 3 times, as onnxruntime's capture does). Each concurrent greedy request gets exactly the tokens it gets alone."""

from __future__ import annotations

import itertools
import queue
import threading
import time

import numpy as np
import openai
import pytest

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.generate import LanguageModel, load
from onnxpipe.runtime.session import DecoderSession
from onnxpipe.serve.app import ServerThread, create_app
from onnxpipe.serve.budget import MIN_CHUNK, Allowance, PrefillBudget
from onnxpipe.serve.scheduler import ConcatScheduler, SlotScheduler, TooLong, make_scheduler
from onnxpipe.serve.slot_table import DECODING, FREE, PREFILLING, SlotTable

MODEL = "llama-stdlib"
rng = np.random.default_rng(0)
PROMPTS = [rng.integers(5, 4000, n).tolist() for n in (3, 40, 7, 70, 12, 25)]
LENGTHS = [20, 9, 30, 14, 5, 25]  # new tokens: requests leave at different steps


# ---- the table alone ----
def test_rows_are_taken_lowest_first_and_released():
    t = SlotTable(3, 16, pad_id=9)
    assert [t.take(), t.take()] == [0, 1] and t.free_rows() == 1
    t.release(0)
    assert t.take() == 0 and t.take() == 2 and t.free_rows() == 0
    with pytest.raises(OnnxpipeError, match="no free row"):
        t.take()
    with pytest.raises(OnnxpipeError, match="not held"):
        SlotTable(2, 16).release(1)


def test_a_prompt_read_in_chunks_can_take_the_highest_row_and_a_step_runs_up_to_the_last_decoding_row():
    t = SlotTable(4, 16, pad_id=9)
    assert t.step_rows() == 1  # nothing decodes: the smallest step
    assert t.take(last=True) == 3 and t.take() == 0 and t.take(last=True) == 2
    t.prefilled(0, 4)
    t.start_decoding(0, 42)
    t.prefilled(3, 12)  # being read
    assert t.step_rows() == 1
    ids, mask, positions = t.step_inputs(t.step_rows())
    assert ids.tolist() == [[42]] and mask.shape == (1, 5) and positions.tolist() == [[4]]  # row 3's 13 not in the width
    t.prefilled(2, 2)
    t.start_decoding(2, 7)
    assert t.step_rows() == 3 and t.step_inputs(3)[0][:, 0].tolist() == [42, 9, 7]
    with pytest.raises(OnnxpipeError, match="1 to 4 rows"):
        t.step_inputs(5)


def test_step_inputs_mask_each_row_by_its_own_count():
    t = SlotTable(4, 16, pad_id=9)
    a, b, c = t.take(), t.take(), t.take()  # row 3 stays free
    t.prefilled(a, 5)
    t.start_decoding(a, 42)
    t.prefilled(b, 3)  # b's prompt is still being read
    t.prefilled(c, 2)
    t.start_decoding(c, 7)
    ids, mask, positions = t.step_inputs()
    assert ids[:, 0].tolist() == [42, 9, 7, 9]  # rows not decoding feed the pad token
    assert mask.sum(axis=1).tolist() == [6, 4, 3, 1] and mask.shape == (4, 6)
    assert (mask == (np.arange(6)[None] < mask.sum(axis=1)[:, None])).all()  # ones from the left
    assert positions[:, 0].tolist() == [5, 3, 2, 0]  # a masked row writes just past what it holds
    t.stepped([a, c], [43, 8])
    assert t.counts.tolist() == [6, 3, 3, 0] and t.tokens[[a, c]].tolist() == [43, 8]
    assert t.state.tolist() == [DECODING, PREFILLING, DECODING, FREE]
    with pytest.raises(OnnxpipeError, match="not decoding"):
        t.stepped([b], [1])
    for bad in (-1, 4):  # no row's index wraps around or passes the table
        with pytest.raises(OnnxpipeError, match=f"row {bad} is not decoding"):
            t.stepped([a, bad], [1, 1])
    assert t.counts.tolist() == [6, 3, 3, 0] and t.tokens[a] == 43  # a refused step changes nothing
    t.release(a)
    assert t.counts[a] == 0 and t.state[a] == FREE


def test_chunks_and_full_rows():
    t = SlotTable(1, 8)
    assert t.chunk(20, 0, 6) == (0, 6) and t.chunk(20, 18, 6) == (18, 20)
    with pytest.raises(OnnxpipeError):
        t.chunk(20, 20, 6)
    row = t.take()
    with pytest.raises(OnnxpipeError, match="do not fit"):
        t.prefilled(row, 8)
    t.prefilled(row, 7)
    t.start_decoding(row, 1)
    t.stepped()
    with pytest.raises(OnnxpipeError, match="full"):
        t.step_inputs()


# ---- the scheduler on the CPU ----
class _GraphRuns:
    """Stands in for the InferenceSession of a CUDA EP with CUDA graphs on, as onnxruntime runs a ``gpu_graph_id``:
    its captured graphs live in the calling thread's context (the EP's PerThreadContext), so the first run of a
    graph id on each thread captures it there: two regular runs (min_num_runs_before_cuda_graph_capture_ = 2), then
    the capture (nothing executes) and its replay, all within that one call: the graph executes 3 times. Later runs
    on that thread replay it once. -1: a plain run; no gpu_graph_id at all is graph 0, captured like any other (and
    then replayed whatever its inputs), which the session must never do: refused here."""

    WARMUP_RUNS = 2
    _local = threading.local()
    _numbers = itertools.count(1)

    def __init__(self, inner):
        self._inner, self.runs, self.captured = inner, {}, set()
        self.captures: list[tuple[int, int]] = []  # (thread, graph id) in the order they were captured

    def run_with_iobinding(self, io, run_options=None):
        gid = int(run_options.get_run_config_entry("gpu_graph_id")) if run_options is not None else None
        assert gid is not None, "a run without gpu_graph_id: onnxruntime would capture it as graph 0"
        self.runs[gid] = self.runs.get(gid, 0) + 1
        thread = getattr(self._local, "number", None) or next(self._numbers)  # a new thread: a new context
        self._local.number = thread
        key = (thread, gid)
        times = 1
        if gid >= 0 and key not in self.captured:
            self.captured.add(key)
            self.captures.append(key)
            times = self.WARMUP_RUNS + 1
        for _ in range(times):
            self._inner.run_with_iobinding(io, run_options)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def slot_lm(path, graphs: bool) -> LanguageModel:
    if not graphs:
        return load(path, "cpu", threads=1)
    s = DecoderSession(path, "cpu", threads=1, feed_back=True)
    s.cuda_graph = True  # what a CUDA session with graphs does: decode steps through its captured slot
    s.session = _GraphRuns(s.session)
    return LanguageModel(s, None)


def submit(sched, lm, prompt, n, **opts):
    """Returns a queue that receives ("done", token ids) or ("error", message), and the request."""
    out: queue.Queue = queue.Queue()

    def emit(event):
        if event[0] == "done":
            out.put(("done", event[1].token_ids))
        elif event[0] == "error":
            out.put(event)

    opts.setdefault("stop_token_ids", [])
    req = sched.submit(lm.prepare(prompt, max_new_tokens=n, **opts), emit)
    return out, req


def result(q):
    kind, value = q.get(timeout=60)
    assert kind == "done", value
    return value


def solo_results(lm, sampled: dict) -> tuple[list, list, SlotScheduler]:
    """Each of PROMPTS alone, greedy, then PROMPTS[2] sampled with ``sampled``: one request at a time through a
    scheduler of 4 rows (the reference the concurrent runs are compared with), and that scheduler (stopped)."""
    alone = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128)
    assert isinstance(alone, SlotScheduler) and alone.prefill_group == 1
    assert alone.max_length == 128 and alone.cache.capacity >= 128
    alone.start()
    try:
        solo = [result(submit(alone, lm, p, n)[0]) for p, n in zip(PROMPTS, LENGTHS)]
        solo_sampled = result(submit(alone, lm, PROMPTS[2], 12, **sampled)[0])
    finally:
        alone.stop()
    return solo, solo_sampled, alone


def served(sched, lm, asks, until=None) -> list:
    """``asks`` ((prompt, new tokens, options) each) all queued before ``sched``'s loop starts (so what overlaps does
    not depend on timing), served, and the scheduler stopped (after ``until()`` holds, where given). Returns the
    requests' tokens, in order."""
    waiting = [submit(sched, lm, p, n, **opts)[0] for p, n, opts in asks]
    sched.start()
    try:
        got = [result(q) for q in waiting]
        if until is not None:
            wait_until(until)
    finally:
        sched.stop()
    return got


def thirteen_requests(sched, lm, sampled: dict) -> list:
    """PROMPTS twice greedy, then PROMPTS[2] sampled with ``sampled`` (12 tokens), ``served`` until every row is free
    again."""
    asks = [(p, n, {}) for p, n in zip(PROMPTS * 2, LENGTHS * 2)] + [(PROMPTS[2], 12, sampled)]
    return served(sched, lm, asks, until=lambda: sched.table.free_rows() == sched.table.rows)


@pytest.mark.parametrize("graphs", [False, True], ids=["plain", "graph-slots"])
def test_concurrent_requests_get_their_solo_tokens(stdlib_cuda_model, graphs):
    lm = slot_lm(stdlib_cuda_model, graphs)
    sampled = {"temperature": 0.9, "top_k": 50, "seed": 3}
    solo, solo_sampled, alone = solo_results(lm, sampled)
    plain = lm if not graphs else load(stdlib_cuda_model, "cpu", threads=1)
    assert solo == [plain.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids  # what generate gives
                    for p, n in zip(PROMPTS, LENGTHS)]
    # 13 requests on 4 rows, all queued before the loop starts (so the overlap does not depend on timing): the
    # first four take the rows and are read 16 prompt tokens an iteration while those already read decode; the
    # others join as rows free up, each leaving at its own step
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=128)
    assert thirteen_requests(sched, lm, sampled) == solo * 2 + [solo_sampled]
    assert sched.stats.max_running == 4 and sched.stats.steps < sum(LENGTHS) * 2
    assert sched.stats.failed == 0
    if graphs:  # decode steps replayed the slot's graph id; prefills into rows ran outside it (chunk graphs are
        # opt-in: tests/serve/test_chunk_graphs.py)
        assert lm.session.fed and sched.stats.fed_steps > 0  # greedy steps with no change fed on the device
        runs = lm.session.session.runs
        (slot,) = lm.session._graphs.values()  # both schedulers: the one slot of (4, 128)
        gid = slot.graph_id
        assert set(runs) == {-1, gid} | {cg.graph_id for cg in slot.chunks.values()}
        steps = alone.stats.steps + sched.stats.steps
        graph_chunks = alone.stats.graph_chunks + sched.stats.graph_chunks
        assert graph_chunks == 0 and not slot.chunks
        assert runs[gid] >= steps and runs[-1] == alone.stats.prefill_chunks + sched.stats.prefill_chunks - graph_chunks
        # captured on each thread that ran it, on harmless inputs: where the scheduler was made, and on each
        # scheduler's own loop thread before its first prefill
        assert len({t for t, g in lm.session.session.captures if g == gid}) == 3
        assert not alone.stats.capture_error and not sched.stats.capture_error


def test_generate_through_the_graph_slot_on_another_thread(stdlib_cuda_model):
    """generate's CUDA-graph path (greedy steps fed on the device) from a second thread, over the slot the first
    call made and captured on this one: the slot is captured again on that thread before its prefill (not by the
    first real step, which would come back 2 tokens on), and its steps replay the graph there."""
    lm = slot_lm(stdlib_cuda_model, True)
    want = load(stdlib_cuda_model, "cpu", threads=1).generate(PROMPTS[2], max_new_tokens=12, stop_token_ids=[]).token_ids
    assert lm.generate(PROMPTS[2], max_new_tokens=12, stop_token_ids=[]).token_ids == want
    stand_in = lm.session.session
    (gid,) = [g for g in stand_in.runs if g >= 0]
    before = stand_in.runs[gid]
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("ids", lm.generate(PROMPTS[2], max_new_tokens=12,
                                                                           stop_token_ids=[]).token_ids))
    t.start()
    t.join(60)
    assert out.get("ids") == want
    assert len({th for th, g in stand_in.captures if g == gid}) == 2 and len(lm.session._graphs) == 1
    assert stand_in.runs[gid] - before >= 11  # its capture and 11 decode steps replayed (none ran uncaptured)


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_long_prompt_is_read_in_chunks_between_decode_steps(stdlib_cuda_model):
    """A 100-token prompt, read 16 tokens an iteration while another request decodes in the row beside it: the
    running request gets a token after each chunk, and both get their solo tokens (the masked step of a row being
    prefilled writes only past what it holds)."""
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    long_prompt = rng.integers(5, 4000, 100).tolist()
    sched = make_scheduler(lm, max_batch=2, prefill_chunk=16, max_length=160)
    sched.start()
    try:
        alone = [result(submit(sched, lm, PROMPTS[0], 100)[0]), result(submit(sched, lm, long_prompt, 10)[0])]
        events: queue.Queue = queue.Queue()
        opts = {"stop_token_ids": []}
        steps = sched.stats.steps
        sched.submit(lm.prepare(PROMPTS[0], max_new_tokens=100, **opts), lambda e: events.put(("a", e)))
        wait_until(lambda: sched.stats.steps >= steps + 2)
        chunks = sched.stats.prefill_chunks
        events.put(("b", ("submitted", None)))  # A's tokens from here on came while B was being read
        sched.submit(lm.prepare(long_prompt, max_new_tokens=10, **opts), lambda e: events.put(("b", e)))
        during, submitted, b_started, done = 0, False, False, {}
        while len(done) < 2:
            who, (kind, value) = events.get(timeout=60)
            assert kind != "error", value
            if kind == "submitted":
                submitted = True
            elif kind == "done":
                done[who] = value.token_ids
            elif who == "b":
                b_started = True
            elif kind == "piece" and submitted and not b_started:
                during += len(value.token_ids)
        assert [done["a"], done["b"]] == alone
        assert sched.stats.prefill_chunks - chunks == 7  # ceil(100 / 16)
        assert during >= 6  # a decode step of A after each chunk but the last
    finally:
        sched.stop()


def test_on_the_cpu_a_decode_step_runs_only_the_rows_up_to_the_last_decoding_one(stdlib_cuda_model, monkeypatch):
    """A long prompt read in chunks takes the highest free row, and the CPU's decode steps bind only the rows up to
    the last decoding one (a prefix of the shared buffer, by address): while it is read the steps run one row, not
    four; then both rows decode in a step of all four. Both requests get their solo tokens (the prefix is the
    buffer's own memory: the steps' writes land in it)."""
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    long_prompt = rng.integers(5, 4000, 100).tolist()
    sched = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=160)
    assert sched.prefix is not None
    forward, batches = type(lm.session).forward, []

    def recorded(self, input_ids, *args, **kw):
        batches.append(input_ids.shape[0])
        return forward(self, input_ids, *args, **kw)

    monkeypatch.setattr(type(lm.session), "forward", recorded)
    sched.start()
    try:
        alone = [result(submit(sched, lm, PROMPTS[0], 150)[0]), result(submit(sched, lm, long_prompt, 10)[0])]
        assert set(batches) == {1}  # each alone: its own row, and a step of one row
        steps = sched.stats.steps
        a, _ = submit(sched, lm, PROMPTS[0], 150)  # still decoding while B is read, however slow this machine
        wait_until(lambda: sched.stats.steps >= steps + 2)
        batches.clear()
        b, b_req = submit(sched, lm, long_prompt, 10)
        assert [result(a), result(b)] == alone and b_req.slot == 3
        read = batches[:batches.index(4)]  # the steps before B decoded
        assert len(read) >= 5 and set(read) == {1}  # 7 chunks of 16, a step of A's row alone after each
    finally:
        sched.stop()


def test_the_auto_budget_reads_a_prompt_whole_alone_and_in_measured_chunks_beside_a_stream(stdlib_cuda_model):
    """prefill_chunk="auto" (budget.py): a prompt read while nothing decodes is one chunk (up to MAX_CHUNK); read
    while a request decodes, it starts with a MIN_CHUNK probe and goes on in chunks sized from the measured step and
    prefill times, a decode step after each; a short prompt (at most WHOLE_PROMPT tokens) is read whole. Every
    request gets its solo tokens."""
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    long_prompt = rng.integers(5, 4000, 150).tolist()
    sched = make_scheduler(lm, max_batch=2, max_length=300)
    assert sched.budget.chunk is None  # auto is the default
    sched.start()
    try:
        alone = [result(submit(sched, lm, PROMPTS[0], 150)[0])]
        chunks = sched.stats.prefill_chunks
        alone.append(result(submit(sched, lm, long_prompt, 10)[0]))
        assert sched.stats.prefill_chunks - chunks == 1  # nothing decoded beside it: read whole
        alone.append(result(submit(sched, lm, PROMPTS[3], 10)[0]))
        steps = sched.stats.steps
        a, _ = submit(sched, lm, PROMPTS[0], 150)
        wait_until(lambda: sched.stats.steps >= steps + 2)
        chunks, tokens, steps = sched.stats.prefill_chunks, sched.stats.prefill_tokens, sched.stats.steps
        b, _ = submit(sched, lm, long_prompt, 10)
        assert result(b) == alone[1]
        read = sched.stats.prefill_chunks - chunks
        assert sched.stats.prefill_tokens - tokens == len(long_prompt) and read >= 2  # MIN_CHUNK first
        assert sched.stats.steps - steps >= read - 1  # a decode step of A after each chunk but the last
        assert sched.budget.step_s is not None and sched.budget.model is not None  # what it measured
        split = PrefillBudget.parse(MIN_CHUNK)  # a budget that would split it
        sched.budget.iteration = lambda decoding: Allowance(split, decoding)
        chunks = sched.stats.prefill_chunks
        c, _ = submit(sched, lm, PROMPTS[3], 10)  # 70 tokens, under WHOLE_PROMPT
        assert result(c) == alone[2] and a.empty()  # read while A still decoded
        assert sched.stats.prefill_chunks - chunks == 1
        assert result(a) == alone[0]
    finally:
        sched.stop()


@pytest.mark.parametrize("chunk", ["auto", 8])
def test_short_prompts_are_read_whole_ahead_of_a_long_one_with_the_auto_budget(stdlib_cuda_model, chunk):
    """The loop's steps by hand (no thread): with auto, short prompts (WHOLE_PROMPT) go first, each whole, at most
    SHORT_TOKENS of them an iteration (at least one), and the budget left goes to the long prompt; a fixed budget
    reads in order of admission."""
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    sched = make_scheduler(lm, max_batch=5, max_length=300, prefill_chunk=chunk)
    lengths = [200, 100, 100, 60, 120]  # the long one first
    for n in lengths:
        sched.submit(lm.prepare(rng.integers(5, 4000, n).tolist(), max_new_tokens=4, stop_token_ids=[]), lambda e: None)
    sched._admit(8)
    reads, eight = [], PrefillBudget.parse(8)
    for _ in range(3):  # auto: its probe's MIN_CHUNK (nothing measured yet) beside streams, else 8 tokens
        allowance = sched.budget.iteration(decoding=True) if chunk == "auto" else Allowance(eight, True)
        reads.append((sched._prefill(allowance), [r.prefilled for r in sched._admitted]))
    if chunk == "auto":
        assert reads == [(200, [0, 0, 0]), (180, [0]), (8, [8])]  # 100 + 100 (+ 60 passes 256), then 60 + 120
        assert [len(r.row.prompt) for r in sched._running] == [100, 100, 60, 120]
    else:
        assert reads == [(8, [8, 0, 0, 0, 0]), (8, [16, 0, 0, 0, 0]), (8, [24, 0, 0, 0, 0])]


def test_cancelled_and_failed_requests_free_their_rows(stdlib_cuda_model, monkeypatch):
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    sched = make_scheduler(lm, max_batch=2, prefill_chunk=16, max_length=200)
    sched.start()
    try:
        alone = result(submit(sched, lm, PROMPTS[1], 20)[0])
        steps = sched.stats.steps
        q, req = submit(sched, lm, PROMPTS[0], 150)
        wait_until(lambda: sched.stats.steps >= steps + 3)
        req.cancel()
        wait_until(lambda: sched.table.free_rows() == 2)
        assert sched.stats.cancelled == 1 and q.empty()
        forward = type(lm.session).forward
        calls = {"n": 0}

        def flaky(self, input_ids, *args, **kw):  # the third decode step fails as a whole
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected step fault")
            return forward(self, input_ids, *args, **kw)

        monkeypatch.setattr(type(lm.session), "forward", flaky)
        failing, _ = submit(sched, lm, PROMPTS[0], 30)
        kind, message = failing.get(timeout=60)
        assert kind == "error" and "injected step fault" in message
        wait_until(lambda: sched.table.free_rows() == 2)
        assert result(submit(sched, lm, PROMPTS[1], 20)[0]) == alone  # the next request is served
    finally:
        sched.stop()


def test_requests_longer_than_the_rows_are_refused(stdlib_cuda_model, stdlib_lm):
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    sched = make_scheduler(lm, max_batch=2, max_length=64)
    with pytest.raises(TooLong, match="hold 64 tokens"):
        sched.submit(lm.prepare(PROMPTS[3], max_new_tokens=1), lambda e: None)
    with pytest.raises(OnnxpipeError, match="needs at least"):  # refused before anything is allocated
        make_scheduler(lm, max_batch=1 << 24, max_length=256)
    with pytest.raises(OnnxpipeError, match="shared KV buffer"):
        SlotScheduler(stdlib_lm)
    with pytest.raises(OnnxpipeError, match="max_length"):
        make_scheduler(stdlib_lm, max_length=64)
    with pytest.raises(OnnxpipeError, match="slot layout"):
        ConcatScheduler(lm)
    app = create_app(lm, MODEL, max_batch=2, max_length=64)
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=4)
        assert e.value.body["code"] == "context_length_exceeded" and "64 tokens" in e.value.body["message"]


def test_the_server_serves_the_slot_layout(stdlib_cuda_model):
    """Through the openai client: concurrent streamed and plain completions give the text each gets alone."""
    lm = load(stdlib_cuda_model, "cpu", threads=1)
    app = create_app(lm, MODEL, max_batch=3, max_queue=8, prefill_chunk=16, max_length=128)
    texts = ["def fib(n):", "import os\nimport sys\n\n\ndef main(argv", "class Stack:\n    def push(self, item):"]
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def complete(prompt, stream=False):
            r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=stream)
            return "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text

        alone = [complete(t) for t in texts]
        assert alone == [lm.generate(t, max_new_tokens=24).text for t in texts] and all(alone)
        out: list = [None] * 6
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, complete(texts[i % 3], stream=i >= 3)))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == alone * 2
        assert app.state.scheduler.stats.max_running >= 2


def test_serve_cli_refuses_max_length_for_a_concat_graph(stdlib_model):
    from click.testing import CliRunner

    from onnxpipe.cli import main

    r = CliRunner().invoke(main, ["serve", str(stdlib_model), "--port", "0", "--provider", "cpu", "--max-length", "64"])
    assert r.exit_code == 1 and "Traceback" not in r.output and "max_length" in r.output, r.output
