"""A request of megabytes does not stall the server's other streams while it is turned into tokens: its template and
tokens are made on a worker thread, and the tokenizer lets go of the GIL for a long text (the tokenizers library's
encode held it throughout: a 4 MiB prompt stood every stream still for 2-3 s before it was refused as too long)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from onnxpipe.serve.app import ServerThread, create_app
from onnxpipe.tokenizer import LONG_TEXT_CHARS, Tokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL = "llama-stdlib"
CODE = "def f(x):\n    return x + 1\n\n"


def worst_gap_while(work) -> tuple[float, float]:
    """(the longest this thread went without running, the seconds ``work`` took on another thread)."""
    th = threading.Thread(target=work)
    began = last = time.monotonic()
    worst = 0.0
    th.start()
    while th.is_alive():
        time.sleep(0.002)
        now = time.monotonic()
        worst, last = max(worst, now - last), now
    return worst, time.monotonic() - began


@pytest.mark.fast
def test_a_long_text_is_encoded_to_the_same_ids_letting_other_threads_run():
    tok = Tokenizer.from_dir(REPO / "models" / "llama-stdlib")
    assert tok is not None
    text = CODE * (1_500_000 // len(CODE))
    assert len(text) > LONG_TEXT_CHARS
    ids: list[int] = []
    worst, took = worst_gap_while(lambda: ids.extend(tok.encode(text, add_special_tokens=False)))
    head = CODE * (LONG_TEXT_CHARS // len(CODE))  # under the threshold: the library's plain encode
    assert ids[: 100] == tok.encode(head, add_special_tokens=False)[: 100]
    assert ids == list(tok.backend.encode(text, add_special_tokens=False).ids)
    assert took > 0.3 and worst < took / 3, (worst, took)


def test_a_streams_tokens_keep_coming_while_a_long_request_is_read(stdlib_lm, slow_steps):
    app = create_app(stdlib_lm, MODEL, max_batch=2, max_queue=2)
    huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": CODE * (3_500_000 // len(CODE))}]})
    with ServerThread(app) as server:
        times: list[float] = []
        answer: list[tuple[float, float, httpx.Response]] = []

        def long_request() -> None:
            began = time.monotonic()
            r = httpx.post(server.url + "/v1/chat/completions", content=huge, timeout=60,
                           headers={"content-type": "application/json"})
            answer.append((began, time.monotonic(), r))

        body = {"model": MODEL, "prompt": "def fib(n):", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            poster = threading.Thread(target=long_request)
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    times.append(time.monotonic())
                    if len(times) == 10:
                        poster.start()
            poster.join(60)
    began, ended, response = answer[0]
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    during = [b - a for a, b in zip(times, times[1:]) if b >= began and a <= ended]
    assert during and ended - began > 0.5, (ended - began, len(during))  # it took long enough to stall the stream
    assert max(during) < (ended - began) / 3, (max(during), ended - began)
