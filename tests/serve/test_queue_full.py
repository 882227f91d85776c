"""A full queue's 429 says when to retry: a ``Retry-After`` header of whole seconds (as OpenAI's API sends), from the
measured decode step and the replies finished so far, 1 before either is known; the body stays OpenAI's error."""

from __future__ import annotations

import httpx
import openai
import pytest

from onnxpipe.serve.app import MAX_RETRY_AFTER_S, QueueWait, ServerThread, create_app
from onnxpipe.serve.scheduler import QueueFull

MODEL = "llama-stdlib"


@pytest.mark.fast
def test_queue_wait_is_one_place_freeing_from_what_was_measured():
    wait = QueueWait(max_batch=4)
    assert wait.seconds(None) == 1 and wait.seconds(0.5) == 1  # nothing finished yet
    wait.finished(40)
    assert wait.seconds(None) == 1  # no decode step measured yet
    assert wait.seconds(0.3) == 3  # 40 tokens a reply over 4 places: a place every 10 steps of 0.3 s
    assert wait.seconds(0.001) == 1  # at least 1 s
    assert wait.seconds(100.0) == MAX_RETRY_AFTER_S  # at most what the openai client still honours
    wait.finished(400)
    assert 40 < wait.reply_tokens < 400  # a moving average, not the last reply alone


def test_a_full_queue_answers_429_with_retry_after(stdlib_lm, monkeypatch):
    app = create_app(stdlib_lm, MODEL, max_batch=2, max_queue=1)
    scheduler = app.state.scheduler
    with ServerThread(app) as server:
        def full(row, emit):
            raise QueueFull("the queue is full (1 requests waiting); retry later")

        body = {"model": MODEL, "prompt": "def fib(n):", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
        monkeypatch.setattr(scheduler, "submit", full)
        scheduler.budget.step_s = None  # as before any decode step
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", (r.headers, r.text)
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and "queue is full" in r.json()["error"]["message"]
        scheduler.budget.step_s = 3.0  # a slow machine: one 6-token reply over 2 places frees one every 3 steps
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 429 and r.headers["retry-after"] == "9", (r.headers, r.text)
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="a", max_tokens=2, stream=True)
        assert e.value.response.headers["retry-after"] == "9"
