"""Prefills replayed through a CUDA-graph slot of their own (CudaGraphs.replay_prefill), driven on the CPU through the
same slot path minus the capture: fixed buffers per prompt width, the plain path's tokens and logits."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpipe.runtime import cuda_graphs, load
from onnxpipe.runtime.generate import LanguageModel
from onnxpipe.runtime.session import DecoderSession

PROMPTS = [[5, 9, 12, 3, 7, 100, 20], [44, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _slots(path, **kw) -> LanguageModel:
    s = DecoderSession(path, "cpu", **kw)
    s.cuda_graph = True  # what a CUDA session with graphs does, minus the capture
    s.capture_prefill = kw.get("capture_prefill", True) and s.last_position
    return LanguageModel(s, None)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("fed", [True, False])
def test_graph_prefills_give_the_plain_tokens(cuda_form, family, fed):
    plain, lm = load(cuda_form(family), "cpu"), _slots(cuda_form(family), feed_back=fed)
    opts = {"max_new_tokens": 6, "stop_token_ids": []}
    want = [r.token_ids for r in plain.generate(PROMPTS, **opts)]
    for _ in range(2):  # the second generation replays the same width's prefill graph
        assert [r.token_ids for r in lm.generate(PROMPTS, **opts)] == want
    (slot,) = lm.session._graphs.values()
    assert list(slot.prefills) == [11] and slot.prefills[11].runs == 2
    assert slot.prefills[11].graph_id != slot.graph_id
    assert bool(slot.prefills[11].scratch) == lm.session.fed  # the step tail's outputs bound to fixed scratch
    lm.generate(PROMPTS[:2], **opts)  # another batch and width: a slot and a prefill graph of its own
    assert sorted(len(s.prefills) for s in lm.session._graphs.values()) == [1, 1]


def test_graph_prefill_logits_equal_the_plain_prefill(cuda_form):
    plain, lm = load(cuda_form("llama"), "cpu"), _slots(cuda_form("llama"))
    got = {}
    for name, m in (("plain", plain), ("graph", lm)):
        cfg = m._config({"max_new_tokens": 4, "stop_token_ids": []})
        got[name] = m.prefill(m._rows(PROMPTS, cfg), 32, "logits")[3]
    np.testing.assert_allclose(got["graph"], got["plain"], rtol=1e-5, atol=1e-5)
    assert lm.session._graphs and all(s.prefills for s in lm.session._graphs.values())


def test_prefill_capture_can_be_turned_off(cuda_form):
    lm = _slots(cuda_form("llama"), capture_prefill=False)
    lm.generate(PROMPTS, max_new_tokens=3, stop_token_ids=[])
    (slot,) = lm.session._graphs.values()
    assert slot.prefills == {} and slot.runs == 2


def test_large_or_many_prefills_run_uncaptured(cuda_form, monkeypatch):
    plain, lm = load(cuda_form("llama"), "cpu"), _slots(cuda_form("llama"))
    opts = {"max_new_tokens": 3, "stop_token_ids": []}
    want = [r.token_ids for r in plain.generate(PROMPTS, **opts)]
    monkeypatch.setattr(cuda_graphs, "PREFILL_CAPTURE_TOKENS", 3 * 11 - 1)  # batch x width just over the limit
    assert [r.token_ids for r in lm.generate(PROMPTS, **opts)] == want
    (slot,) = lm.session._graphs.values()
    assert slot.prefills == {}
    monkeypatch.setattr(cuda_graphs, "PREFILL_CAPTURE_TOKENS", 4096)
    monkeypatch.setattr(cuda_graphs, "PREFILL_GRAPHS_PER_SLOT", 1)
    lm.generate(PROMPTS, **opts)  # width 11: the slot's one graph
    short = [p[:9] for p in PROMPTS]  # width 9: over the per-slot count, uncaptured, same tokens
    assert [r.token_ids for r in lm.generate(short, **opts)] == [r.token_ids for r in plain.generate(short, **opts)]
    assert list(slot.prefills) == [11]
