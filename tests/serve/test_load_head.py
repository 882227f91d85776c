"""`onnxpipe serve` loads its model with the LM head at the read position only, also where the model is a large
single file (the edit `load()` otherwise skips there, since it rebuilds the graph at load): a server prefills all
its life, and the logits of every prompt position were ~15-18% of a SmolLM2-135M prefill on the 2-core CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxpipe.runtime.session as session_module
from onnxpipe.runtime.generate import load


@pytest.fixture
def counted_as_large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every single-file model counts as too large to edit at load by default (the tiny model stands for a 500 MB one)."""
    monkeypatch.setattr(session_module, "INLINE_EDIT_BYTES", 0)


def test_load_skips_the_edit_for_a_large_single_file_unless_asked(stdlib_cuda_model: Path, counted_as_large) -> None:
    plain = load(stdlib_cuda_model, "cpu", threads=1)
    assert plain.session.last_position is False
    assert "holds its weights inline" in plain.session.last_position_why_not
    asked = load(stdlib_cuda_model, "cpu", threads=1, last_position=True)
    assert asked.session.last_position is True
    # the same next token from a prefill either way (the head at one position is the same head)
    ids = np.array([[5, 17, 42, 7, 99, 3]], np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]
    a = plain.session.forward(ids, mask, pos, plain.session.new_cache(1, 16), want="argmax")
    b = asked.session.forward(ids, mask, pos, asked.session.new_cache(1, 16), want="argmax")
    assert np.asarray(a).reshape(-1)[-1] == np.asarray(b).reshape(-1)[-1]


def test_serve_asks_for_the_head_at_the_read_position(stdlib_cuda_model: Path, counted_as_large,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvicorn")
    import uvicorn

    from onnxpipe.serve.app import serve_forever

    served = {}

    def run(self: uvicorn.Server) -> None:  # the server "runs" and stops at once; what it serves is kept
        served["app"], self.started = self.config.app, True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    serve_forever(stdlib_cuda_model, provider="cpu", threads=1, max_batch=2, max_length=64)
    scheduler = served["app"].state.scheduler
    try:
        assert scheduler.lm.session.last_position is True
    finally:
        scheduler.stop()
