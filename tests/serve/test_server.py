"""The server, started in-process on a free loopback port and stopped within each test, through the real `openai`
client and plain httpx: concurrent greedy clients get what they get alone; streams join to the non-streamed text; a
disconnect frees its place; bad requests get 4xx with OpenAI error bodies; a full queue gets 429; one failing
request leaves the others alone; long prompts are prefilled in chunks between the decode steps of running streams."""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from click.testing import CliRunner

from onnxpipe.cli import main
from onnxpipe.serve.app import ServerThread, create_app
from onnxpipe.serve.scheduler import ConcatScheduler as Scheduler

MODEL = "llama-stdlib"
PROMPTS = ["def fib(n):", "import os\nimport sys\n\n\ndef main(argv", "class Stack:\n    def push(self, item):",
           "    for i in range(10):\n        if", "# " + "a long comment line, " * 12 + "\ndef parse("]
LONG = "def fib(n):"  # greedy from here runs to any length without an end-of-sequence token


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(stdlib_lm):
    """Batches of up to 4, prompts prefilled 16 tokens at a time (so PROMPTS[4] takes several chunks)."""
    app = create_app(stdlib_lm, MODEL, max_batch=4, max_queue=8, prefill_chunk=16)
    with ServerThread(app) as s:
        s.scheduler = app.state.scheduler
        yield s
    assert not s.thread.is_alive()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_concurrent_greedy_clients_get_what_they_get_alone(server, stdlib_lm):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    assert c.models.list().data[0].model_extra["max_model_len"] == stdlib_lm.session.max_positions
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("org/other-model")
    assert e.value.body["code"] == "model_not_found"
    assert len(stdlib_lm.encode(PROMPTS[4])) > 2 * 16  # prefilled over several chunks

    def complete(prompt):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    def sampled(seed):
        r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.95, seed=seed)
        return r.choices[0].text

    alone = [complete(p) for p in PROMPTS]
    library = [stdlib_lm.generate(p, max_new_tokens=24) for p in PROMPTS]
    assert [a[0] for a in alone] == [r.text for r in library]
    assert [a[1] for a in alone] == [len(r.token_ids) for r in library]
    seeded_alone = sampled(7)
    steps = server.scheduler.stats.steps
    with ThreadPoolExecutor(6) as pool:
        together = [pool.submit(complete, p) for p in PROMPTS * 2]
        seeded = pool.submit(sampled, 7)
        assert [f.result() for f in together] == alone * 2
        assert seeded.result() == seeded_alone  # a seed gives the same sample whoever shares the batch
    assert server.scheduler.stats.max_running >= 3  # they really were decoded together
    assert server.scheduler.stats.steps - steps < 11 * 24  # fewer steps than one by one


def test_streamed_chunks_join_to_the_text(server, stdlib_lm):
    c = client(server)
    for prompt in PROMPTS[:2]:
        whole = c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
        chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == whole.choices[0].text and len(chunks) > 3
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finals == [whole.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "system", "content": "Python only."}, {"role": "user", "content": PROMPTS[2]}]
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert whole.choices[0].message.content and whole.object == "chat.completion"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # ignore_eos runs to max_tokens past the end-of-sequence token the model writes
    ending = 'if __name__ == "__main__":\n    main()\n'
    assert stdlib_lm.generate(ending, max_new_tokens=60).finish_reason == "eos"
    for prompt in (ending,):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 60 and r.choices[0].finish_reason == "length"
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: {") for ln in lines[:-1])


def test_bad_requests_get_openai_errors(server, stdlib_lm):
    url = server.url + "/v1/completions"
    long_prompt = "x " * (stdlib_lm.session.max_positions + 10)
    cases = [
        ({"model": "nope", "prompt": "a"}, 404, "model"),
        ({"prompt": "a"}, 400, "model"),
        ({"model": MODEL, "prompt": "a", "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "a", "top_p": float("nan")}, 400, "top_p"),
        ({"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "a", "max_tokens": True}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": long_prompt}, 400, "prompt"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": MODEL, "prompt": [1, "a"]}, 400, "prompt"),
        ({"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
        ({"model": MODEL, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": MODEL, "prompt": "a", "n": 2}, 400, "n"),
        ({"model": MODEL, "prompt": "a", "seed": -1}, 400, "seed"),
        ({"model": MODEL, "prompt": "a", "stream": "yes"}, 400, "stream"),
        ({"model": MODEL, "prompt": "a", "ignore_eos": 1}, 400, "ignore_eos"),
    ]
    for body, status, param in cases:
        r = httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"], (body, err)
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"]
    for kind in ("text/plain", "application/x-www-form-urlencoded"):  # what a web page may send without asking
        r = httpx.post(url, content=json.dumps({"model": MODEL, "prompt": "a"}), headers={"content-type": kind},
                       timeout=30)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
    chat = server.url + "/v1/chat/completions"
    for messages in ([], [{"content": "a"}], [{"role": "user", "content": 3}], "hi"):
        r = httpx.post(chat, json={"model": MODEL, "messages": messages}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert httpx.get(server.url + "/v1/nothing", timeout=30).status_code == 404
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="a")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], temperature=3)
    assert e.value.body["param"] == "temperature"
    assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"  # still serving


@pytest.fixture
def narrow(stdlib_lm, monkeypatch):
    """One batch place and one queue place, and decode steps slowed to 20 ms (the tiny model would otherwise finish
    a 200-token stream before the test has filled the queue)."""
    step = Scheduler._decode_step

    def slow_step(self):
        time.sleep(0.02)
        step(self)

    monkeypatch.setattr(Scheduler, "_decode_step", slow_step)
    app = create_app(stdlib_lm, MODEL, max_batch=1, max_queue=1)
    with ServerThread(app) as s:
        s.scheduler = app.state.scheduler
        yield s
    assert not s.thread.is_alive()


def health(server):
    return httpx.get(server.url + "/health", timeout=30).json()


def test_disconnect_frees_its_place_and_a_full_queue_answers_429(narrow, stdlib_lm):
    assert stdlib_lm.generate(LONG, max_new_tokens=200).finish_reason == "length"
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as hold:
        with hold.stream("POST", narrow.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")  # it runs: the one batch place is taken
            assert health(narrow)["running"] == 1
            waiting: queue.Queue = queue.Queue()
            t = threading.Thread(target=lambda: waiting.put(httpx.post(
                narrow.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)))
            t.start()
            wait_until(lambda: health(narrow)["waiting"] == 1)  # the one queue place is taken
            with pytest.raises(openai.RateLimitError) as e:
                client(narrow).completions.create(model=MODEL, prompt="a", max_tokens=2)
            assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
            assert 1 <= int(e.value.response.headers["retry-after"]) <= 60  # whole seconds (test_queue_full.py)
            assert waiting.empty()
        # the stream's client went away after one chunk: its place goes to the waiting request
        second = waiting.get(timeout=60)
        t.join(10)
    assert second.status_code == 200 and second.json()["choices"][0]["text"]
    wait_until(lambda: health(narrow)["running"] == 0)
    stats = health(narrow)["stats"]
    assert stats["cancelled"] == 1 and stats["rejected"] == 1 and stats["finished"] == 1
    assert stats["steps"] < 100  # the 200-token stream did not run to its end


def test_a_failing_request_leaves_the_others_alone(server, monkeypatch):
    sched = server.scheduler
    bad_prompt = "def broken():"
    bad = {tuple(sched.lm.encode(bad_prompt))}
    choose = Scheduler._choose

    def faulty(self, req, out, i):
        if tuple(req.row.prompt) in bad and len(req.row.tokens) == 3:
            raise RuntimeError("injected fault")
        return choose(self, req, out, i)

    c = client(server)
    alone = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0).choices[0].text
    monkeypatch.setattr(Scheduler, "_choose", faulty)
    with ThreadPoolExecutor(3) as pool:
        good = [pool.submit(c.completions.create, model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
                for _ in range(2)]
        failing = pool.submit(httpx.post, server.url + "/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": bad_prompt, "max_tokens": 24, "temperature": 0})
        r = failing.result()
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        assert [f.result().choices[0].text for f in good] == [alone, alone]


def test_long_prompt_is_prefilled_between_decode_steps(stdlib_lm):
    """While a 200-token prompt is read 16 tokens at a time, a running stream keeps getting a token per chunk; read
    in one piece, it waits the whole prefill; with the auto budget it is read in more than one. The long prompt's
    own tokens are the same every way."""
    long_prompt = stdlib_lm.encode("import os\n" * 60)[:200]

    def run(chunk):
        """(A's tokens while B's prompt was read, B's tokens, the chunks B's prompt was read in)"""
        sched = Scheduler(stdlib_lm, max_batch=4, prefill_chunk=chunk)
        sched.start()
        try:
            events: queue.Queue = queue.Queue()
            sched.submit(stdlib_lm.prepare(LONG, max_new_tokens=120), lambda e: events.put(("a", e)))
            wait_until(lambda: sched.stats.steps >= 2)
            chunks = sched.stats.prefill_chunks
            events.put(("b", ("submitted", None)))  # A's tokens from here on came while B was being read
            sched.submit(stdlib_lm.prepare(long_prompt, max_new_tokens=8), lambda e: events.put(("b", e)))
            a_tokens_during, submitted, b_started = 0, False, False
            while True:
                who, (kind, value) = events.get(timeout=60)
                assert kind != "error", value
                if kind == "submitted":
                    submitted = True
                elif who == "b":
                    b_started = True
                    if kind == "done":
                        return a_tokens_during, value.token_ids, sched.stats.prefill_chunks - chunks
                elif kind == "piece" and submitted and not b_started:
                    a_tokens_during += len(value.token_ids)
        finally:
            sched.stop()

    out = {chunk: run(chunk) for chunk in (16, 256, "auto")}
    assert out[16][0] >= 200 // 16 - 1  # a decode step of the stream after each chunk but the last
    assert out[256][0] <= 2  # at most the step in flight when B came
    assert out[16][2] == -(-len(long_prompt) // 16) and out[256][2] == 1
    assert out["auto"][2] >= 2  # budget.py: a MIN_CHUNK probe first, then chunks sized from what it measured
    assert out[16][1] == out[256][1] == out["auto"][1] == stdlib_lm.generate(long_prompt, max_new_tokens=8).token_ids


def test_serve_cli_refuses_bad_input_in_one_line(tmp_path):
    r = CliRunner().invoke(main, ["serve", str(tmp_path / "missing"), "--port", "0"])
    assert r.exit_code == 1 and "Traceback" not in r.output and str(tmp_path / "missing") in r.output
    for bad in ("0", "fast", "2.5"):  # a count of tokens or auto, checked before the model is read
        r = CliRunner().invoke(main, ["serve", str(tmp_path / "missing"), "--prefill-chunk", bad])
        assert r.exit_code == 2 and "Traceback" not in r.output and "--prefill-chunk" in r.output, r.output


def test_serve_cli_refuses_an_address_it_cannot_listen_on_before_loading(tmp_path):
    """A host that does not resolve or a port another process listens on was uvicorn's log lines and exit code 3,
    after the model load and a "serving on" line. Now one line naming it, before the model is read (the model
    directory here does not exist: its error would come first otherwise)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, fragment in [(["--host", "256.1.1.1", "--port", "0"], "--host 256.1.1.1: not an address"),
                               (["--port", str(port)], f"--port {port}: cannot listen there")]:
            r = CliRunner().invoke(main, ["serve", str(tmp_path / "missing"), *args])
            assert r.exit_code == 1 and "Traceback" not in r.output, r.output
            lines = [ln for ln in r.output.splitlines() if ln.strip()]
            assert len(lines) == 1 and fragment in lines[0], r.output


def test_a_failed_decode_step_fails_its_batch_and_the_next_requests_are_served(stdlib_lm, monkeypatch):
    session = stdlib_lm.session
    forward = type(session).forward
    calls = {"decode": 0}

    def flaky(self, input_ids, *args, **kw):
        if input_ids.shape[1] == 1:
            calls["decode"] += 1
            if calls["decode"] == 3:
                raise RuntimeError("injected step fault")
        return forward(self, input_ids, *args, **kw)

    monkeypatch.setattr(type(session), "forward", flaky)
    sched = Scheduler(stdlib_lm, max_batch=4)

    def submit(prompts):
        events = [queue.Queue() for _ in prompts]
        for q, p in zip(events, prompts):
            sched.submit(stdlib_lm.prepare(p, max_new_tokens=12), q.put)
        return events

    def results(events):
        out = []
        for q in events:
            while True:
                kind, value = q.get(timeout=60)
                if kind in ("done", "error"):
                    out.append((kind, value if kind == "error" else value.token_ids))
                    break
        return out

    def run(prompts):
        return results(submit(prompts))

    first_events = submit(PROMPTS[:2])  # both queued before the loop starts: both are in the batch at step 3
    sched.start()
    try:
        first = results(first_events)
        assert [k for k, _ in first] == ["error", "error"] and "injected step fault" in first[0][1]
        second = run(PROMPTS[:2])
        assert second == [("done", stdlib_lm.generate(p, max_new_tokens=12).token_ids) for p in PROMPTS[:2]]
        assert sched._thread.is_alive() and sched.stats.failed == 2
    finally:
        sched.stop()


def test_short_prompts_start_together_and_get_what_they_get_alone(stdlib_lm):
    """Requests waiting together are prefilled in one left-padded call and join in one copy; the longest of them
    ends at its first token (an end-of-sequence), so the rows that join are narrower than the block."""
    ending = 'if __name__ == "__main__":\n    main()\n'
    prompts = [ending] + PROMPTS[:4]
    assert all(len(stdlib_lm.encode(p)) < len(stdlib_lm.encode(ending)) for p in PROMPTS[:4])
    alone = [stdlib_lm.generate(p, max_new_tokens=16).token_ids for p in prompts]
    assert len(alone[0]) == 1
    sched = Scheduler(stdlib_lm, max_batch=8, prefill_chunk=256)
    events = [queue.Queue() for _ in prompts]
    for q, p in zip(events, prompts):  # all waiting before the loop starts
        sched.submit(stdlib_lm.prepare(p, max_new_tokens=16), q.put)
    sched.start()
    try:
        got = []
        for q in events:
            while True:
                kind, value = q.get(timeout=60)
                assert kind != "error", value
                if kind == "done":
                    got.append(value.token_ids)
                    break
        assert got == alone
        assert sched.stats.prefill_chunks == 1 and sched.stats.max_running == 4
    finally:
        sched.stop()
