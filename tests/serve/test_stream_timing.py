"""A stream's tokens reach its client step by step: when a decode step ends, the client has every text the scheduler
has made final (with the slot layout's overlap a step's rows are processed on the rows thread while the next step
runs, so a step's text goes out during the step after it, never later). And the server keeps the time each chunk with
text was written when asked (``app.state.stream_times``): the inter-token gaps as the server made them, whatever a
client's reads join."""

from __future__ import annotations

import threading
import time

import openai
import pytest
from serve.test_prefill_group import load_test_script
from serve.test_slots import _GraphRuns

from onnxpipe.runtime.generate import LanguageModel
from onnxpipe.runtime.session import DecoderSession
from onnxpipe.serve.app import ServerThread, create_app
from onnxpipe.tokenizer import Tokenizer

MODEL = "llama-stdlib"
PROMPT = "def fib(n):"  # greedy from here runs to any length without an end-of-sequence token
GATE_S = 10.0  # how long a step waits for the client to have the text made so far


class GatedSteps:
    """The session's runs, where a decode step (a replay of the graph slot) ends only once the client has received
    (``client_text``) all the text its request has made final (``row.streamed``, which the rows thread extends with
    the step before's token meanwhile), or GATE_S has passed: then the step is counted ``late`` and goes on. Where
    the server held a step's text back until a later step (two steps' tokens sent together), that text could not
    reach the client before the next step ends, and the step would wait out GATE_S."""

    def __init__(self, inner):
        self._inner = inner
        self.request = None  # the request being served (set by the test's submit)
        self.client_text = ""  # what the client has received so far
        self.cond = threading.Condition()
        self.gated = self.late = 0

    def run_with_iobinding(self, io, run_options=None):
        gid = int(run_options.get_run_config_entry("gpu_graph_id") or -1) if run_options is not None else -1
        self._inner.run_with_iobinding(io, run_options)
        req = self.request
        if gid < 0 or req is None or not req.row.streamed:
            return
        with self.cond:
            self.gated += 1
            if not self.cond.wait_for(lambda: len(self.client_text) >= len(req.row.streamed), GATE_S):
                self.late += 1

    def received(self, text: str) -> None:
        with self.cond:
            self.client_text += text
            self.cond.notify_all()

    def __getattr__(self, name):
        return getattr(self._inner, name)


def gated_lm(path) -> tuple[LanguageModel, GatedSteps]:
    """The slot layout through the session's graph slot with the step tail (fed steps, overlapped), as on a GPU."""
    s = DecoderSession(path, "cpu", threads=1, feed_back=True)
    s.cuda_graph = True
    gate = GatedSteps(_GraphRuns(s.session))
    s.session = gate
    return LanguageModel(s, Tokenizer.from_dir(path)), gate


def test_a_steps_text_reaches_the_client_before_the_step_after_it_ends(stdlib_cuda_model):
    lm, gate = gated_lm(stdlib_cuda_model)
    app = create_app(lm, MODEL, max_batch=2, max_length=128)
    sched = app.state.scheduler
    submit = sched.submit

    def watched(row, emit):
        gate.request = req = submit(row, emit)
        return req

    sched.submit = watched
    app.state.stream_times = written = []
    n = 24
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chunks = 0
        began = time.monotonic()
        for ch in c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=n, temperature=0, stream=True):
            if ch.choices and ch.choices[0].text:
                chunks += 1
                gate.received(ch.choices[0].text)
        took = time.monotonic() - began
        gate.request = None
    assert gate.client_text == lm.generate(PROMPT, max_new_tokens=n).text
    assert sched.stats.overlapped_steps > 0  # the overlap ran: steps whose rows were processed during the next one
    assert gate.gated >= n // 2  # most steps waited for the client
    assert gate.late == 0, f"{gate.late} of {gate.gated} steps ended before the client had the text made so far"
    assert took < GATE_S
    # the server's write times: one per chunk with text, in order
    [(prompt_tokens, times)] = written
    assert prompt_tokens == len(lm.encode(PROMPT))
    assert len(times) == chunks and times == sorted(times)


@pytest.mark.fast
def test_the_load_tests_gaps_as_written_are_each_streams_own_within_the_window():
    server_gaps = load_test_script().server_gaps
    written = [(8, [0.5, 1.0]),  # the untimed request, before the window
               (128, [1.0, 1.002, 1.004, 1.010]),
               (128, [1.001, 1.003]),
               (4096, [1.005, 1.006])]  # a long prompt's stream
    gaps = server_gaps(written, 1.0, 1.006)
    assert sorted(round(g * 1e3, 6) for g in gaps) == [1.0, 2.0, 2.0, 2.0]  # 1.010 is past the window
    assert sorted(round(g * 1e3, 6) for g in server_gaps(written, 1.0, 2.0, 128)) == [2.0, 2.0, 2.0, 6.0]
    assert server_gaps(written, 3.0, 4.0) == []


def _sse_app(parts: list[bytes], status: int = 200):
    """An app (no model) that answers every completion with ``parts``, each its own chunk of the chunked body."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        await request.body()
        if status != 200:
            return JSONResponse({"error": {"message": "no such model"}}, status_code=status)

        async def body():
            for part in parts:
                yield part

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


def _complete(url: str, client: str, requests: int = 1):
    import asyncio

    connection = load_test_script().Connection

    async def run():
        async with connection(url, client) as conn:
            return [await conn.complete({"prompt": [1, 2], "max_tokens": 3}) for _ in range(requests)]

    return asyncio.run(run())


def _chunk(text: str = "", reason=None, usage=None) -> bytes:
    import json

    choices = [] if usage else [{"index": 0, "text": text, "finish_reason": reason}]
    return b"data: " + json.dumps({"id": "cmpl-1", "choices": choices, **({"usage": usage} if usage else {})}).encode()


@pytest.mark.fast
@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_the_load_tests_clients_time_each_chunk_with_text_and_read_the_usage(client):
    """An event split across the body's chunks, two events in one chunk, text that looks like an event (JSON escapes
    a newline), an empty text with a finish reason, the usage chunk, [DONE]: three chunks with text, 3 tokens; two
    requests on one kept-alive connection."""
    first = _chunk('a"\n\ndata: b')
    parts = [first[:20], first[20:] + b"\n\n", _chunk(" x") + b"\n\n" + _chunk(" y") + b"\n\n",
             _chunk("", "length") + b"\n\n", _chunk(usage={"completion_tokens": 3}) + b"\n\n", b"data: [DONE]\n\n"]
    with ServerThread(_sse_app(parts)) as s:
        results = _complete(s.url, client, requests=2)
    for r in results:
        assert len(r["times"]) == 3 and r["tokens"] == 3 and r["times"] == sorted(r["times"])
        assert r["ttft"] == r["times"][0] - r["sent"] > 0


@pytest.mark.fast
@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_the_load_tests_clients_raise_on_an_error_status_or_chunk(client):
    with ServerThread(_sse_app([], status=404)) as s:
        with pytest.raises(RuntimeError, match="404"):
            _complete(s.url, client)
    error = b'data: {"error": {"message": "the server is shutting down"}}\n\n'
    with ServerThread(_sse_app([_chunk("a") + b"\n\n", error])) as s:
        with pytest.raises(RuntimeError, match="shutting down"):
            _complete(s.url, client)


def test_the_load_tests_slowest_iterations_add_up_their_parts():
    """What the load test prints of the slowest iterations while long prompts are read: between + admission +
    prefill + step, with what each did (the scheduler's trace, loop.TRACE_MORE)."""
    slowest = load_test_script().slowest_iterations
    quiet = (0.0, 0, 0.0, 0.0018, 32, 0.0001, 0.00002, 0, 1, 1, 0, 32)
    joined = (0.01, 64, 0.0, 0.0031, 32, 0.0004, 0.0025, 4, 0, 0, 1, 33)  # 4 arrived, the lane's last chunk: a join
    (top,) = slowest([quiet, joined], k=1)
    assert top["ms"] == 6.0 and (top["between_ms"], top["admit_ms"], top["step_ms"]) == (0.4, 2.5, 3.1)
    assert (top["admitted"], top["lane"], top["fed"], top["rows"], top["rows_after"]) == (4, 1, 0, 32, 33)
    assert slowest([quiet[:5]]) == []  # a trace of the older form: nothing to say
