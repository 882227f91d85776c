"""Stopping the server (Ctrl-C, SIGTERM, ``ServerThread.stop``) while requests are open: each ends at once with an
error its client can read (a stream: an error event, then ``data: [DONE]``; a request still waiting: a 503), instead
of running on until uvicorn's graceful-shutdown timeout cuts its connection mid-body."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from onnxpipe.serve.app import GRACEFUL_SHUTDOWN_S, ServerThread, create_app

MODEL = "llama-stdlib"
LONG = "def fib(n):"  # greedy from here runs to any length without an end-of-sequence token


def test_stopping_ends_open_streams_and_waiting_requests_with_an_error(stdlib_lm, slow_steps):
    app = create_app(stdlib_lm, MODEL, max_batch=1, max_queue=2)
    server = ServerThread(app).__enter__()
    try:
        body = {"model": MODEL, "prompt": LONG, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        waiting: list[httpx.Response] = []
        with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions",
                                                      json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: {")  # it runs, holding the one batch place
            t = threading.Thread(target=lambda: waiting.append(httpx.post(server.url + "/v1/completions",
                                                                          json=body, timeout=60)))
            t.start()
            deadline = time.monotonic() + 30
            while app.state.scheduler.load()["waiting"] != 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            stopper = threading.Thread(target=server.stop)
            began = time.monotonic()
            stopper.start()
            rest = [ln for ln in lines if ln]  # read to the end of the body: a cut one raises here
            took = time.monotonic() - began
        t.join(30)
        stopper.join(30)
    finally:
        server.stop()
    assert not server.thread.is_alive()
    assert rest[-1] == "data: [DONE]", rest[-3:]
    err = json.loads(rest[-2][len("data: "):])["error"]
    assert err["code"] == "server_shutting_down" and err["type"] == "server_error" and err["message"]
    chunks = [json.loads(ln[len("data: "):]) for ln in [first] + rest[:-2]]
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks)  # stopped, not run to its length
    assert len(chunks) < 150 and took < GRACEFUL_SHUTDOWN_S - 1, (len(chunks), took)
    assert len(waiting) == 1 and waiting[0].status_code == 503, waiting
    assert waiting[0].json()["error"]["code"] == "server_shutting_down"


def test_the_openai_client_sees_the_stop_as_an_error(stdlib_lm, slow_steps):
    app = create_app(stdlib_lm, MODEL, max_batch=1, max_queue=1)
    with ServerThread(app) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = c.completions.create(model=MODEL, prompt=LONG, max_tokens=200, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        assert next(iter(stream)).choices[0].text is not None
        threading.Thread(target=server.stop).start()
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
