"""/health says whether the server takes requests: 200 "ok" while it serves; a 503 "starting" before its lifespan has
started the scheduler's thread, and "shutting_down" once it is stopping (uvicorn's exit flag set, or the lifespan
ending), so that a load balancer stops sending. It said "ok" throughout."""

from __future__ import annotations

import time
from types import SimpleNamespace

from starlette.testclient import TestClient

from onnxpipe.serve.app import create_app

MODEL = "llama-stdlib"


def test_health_says_starting_ok_and_shutting_down(stdlib_lm):
    app = create_app(stdlib_lm, MODEL, max_batch=2, max_queue=2)
    r = TestClient(app).get("/health")  # no lifespan run: the scheduler's thread is not running
    assert r.status_code == 503 and r.json()["status"] == "starting", r.text
    with TestClient(app) as client:  # runs the lifespan: the scheduler starts
        r = client.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == MODEL, r.text
        assert r.json()["waiting"] == 0 and "steps" in r.json()["stats"]
        app.state.server = SimpleNamespace(should_exit=True)  # Ctrl-C or SIGTERM: uvicorn's exit flag
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "shutting_down", r.text
        assert r.json()["model"] == MODEL and "running" in r.json()  # the same fields as when ok
        app.state.server = None
        assert client.get("/health").status_code == 200
    r = TestClient(app).get("/health")  # the lifespan ended: the scheduler is stopped
    assert r.status_code == 503 and r.json()["status"] == "shutting_down", r.text


def test_the_server_takes_requests_once_the_scheduler_has_prepared(stdlib_lm, monkeypatch):
    """The lifespan's start waits for the scheduler thread's preparation (``_started``: on a GPU, the CUDA-graph
    capture, seconds), so /health's first "ok" and the first request come after it, not during it."""
    app = create_app(stdlib_lm, MODEL, max_batch=2, max_queue=2)
    scheduler = app.state.scheduler
    done = []

    def slow_start():
        time.sleep(0.3)
        done.append(True)

    monkeypatch.setattr(scheduler, "_started", slow_start)
    with TestClient(app) as client:
        assert done == [True]
        assert client.get("/health").json()["status"] == "ok"
