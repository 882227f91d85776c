"""A server process freezes what it made before serving out of the garbage collector's full runs (BatchLoop.freeze_gc):
a full collection walks every object the process holds, 25-31 ms for a small model's server process on this
machine, where a decode step on a GPU is 1.7 ms (serve.md, runs 55-56: group prefill runs of 34-61 ms)."""

from __future__ import annotations

import gc

import pytest

from onnxpipe.serve.app import create_app, gc_freeze_wanted
from onnxpipe.serve.scheduler import make_scheduler


@pytest.mark.parametrize("value, wanted", [(None, True), ("1", True), ("on", True), ("0", False), ("off", False),
                                           ("False", False), ("no", False)])
def test_the_server_freezes_unless_told_not_to(monkeypatch, value, wanted):
    if value is None:
        monkeypatch.delenv("ONNXPIPE_SERVE_GC_FREEZE", raising=False)
    else:
        monkeypatch.setenv("ONNXPIPE_SERVE_GC_FREEZE", value)
    assert gc_freeze_wanted() is wanted


def test_a_loop_asked_to_freeze_does_so_once_started_and_says_how_many(stdlib_lm):
    assert create_app(stdlib_lm, "m", max_batch=2).state.scheduler.freeze_gc is False  # a library's app: not unasked
    assert create_app(stdlib_lm, "m", max_batch=2, freeze_gc=True).state.scheduler.freeze_gc is True
    plain = make_scheduler(stdlib_lm, max_batch=2)
    plain.start()
    try:
        assert plain.ready.wait(60) and plain.stats.gc_frozen == 0
    finally:
        plain.stop()
    assert gc.get_freeze_count() == 0
    sched = make_scheduler(stdlib_lm, max_batch=2)
    sched.freeze_gc = True
    sched.start()
    try:
        assert sched.ready.wait(60)
        assert sched.stats.gc_frozen > 1000 and gc.get_freeze_count() > 1000  # the libraries' and the model's
    finally:
        sched.stop()
        gc.unfreeze()  # this test process goes on: its objects back in the collector's reach
