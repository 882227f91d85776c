"""A CUDA-graph slot's first use. onnxruntime's CUDA EP captures a graph id by running the model several times
within the first call that names it (warm-up runs, then the capture). A decode step is not idempotent: it writes
its KV entry in place and, with the step tail, its own next inputs, so on an H100 the first generation on each new
slot came back several steps on (3 of 72 greedy tokens equal; scripts/gpu_graph_check.py). The session now
captures each slot's step on harmless inputs when it makes the slot (CudaGraphs.capture). Here the repeats are
reproduced on the CPU: a graph id's first call runs the model three times."""

from __future__ import annotations

import pytest

from onnxpipe.runtime import load
from onnxpipe.runtime.generate import LanguageModel
from onnxpipe.runtime.session import DecoderSession

PROMPTS = [[5, 9, 12, 3, 7, 100, 20], [44, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
REPEATS = 3


class _CaptureRepeats:
    """Stands in for the InferenceSession: the first run of each gpu_graph_id >= 0 runs the model REPEATS times."""

    def __init__(self, inner):
        self._inner, self.seen, self.repeated = inner, set(), 0

    def run_with_iobinding(self, io, run_options=None):
        gid = int(run_options.get_run_config_entry("gpu_graph_id")) if run_options is not None else -1
        times = REPEATS if gid >= 0 and gid not in self.seen else 1
        if gid >= 0:
            self.seen.add(gid)
        self.repeated += times > 1
        for _ in range(times):
            self._inner.run_with_iobinding(io, run_options)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _graphs(path, **kw) -> tuple[LanguageModel, _CaptureRepeats]:
    s = DecoderSession(path, "cpu", **kw)
    s.cuda_graph = True  # what a CUDA session with graphs does; the capture's repeats are _CaptureRepeats'
    s.capture_prefill = s.last_position
    s.session = runs = _CaptureRepeats(s.session)
    return LanguageModel(s, None), runs


def _tokens(lm, prompts, **opts):
    return [r.token_ids for r in lm.generate(prompts, **opts)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("fed", [True, False])
def test_first_use_of_each_slot_gives_the_plain_tokens(cuda_form, family, fed):
    plain = load(cuda_form(family), "cpu")
    lm, runs = _graphs(cuda_form(family), feed_back=fed)
    greedy = {"max_new_tokens": 12, "stop_token_ids": []}
    sampled = {"max_new_tokens": 12, "stop_token_ids": [], "temperature": 0.8, "top_k": 20, "seed": 3}
    for prompts, opts in ((PROMPTS, greedy), (PROMPTS[:1], sampled), (PROMPTS[1:], greedy), (PROMPTS, sampled)):
        assert _tokens(lm, prompts, **opts) == _tokens(plain, prompts, **opts), (len(prompts), opts)
    assert len(lm.session._graphs) == 3 and runs.repeated >= 3  # three new slots, each captured with repeats
    assert all(slot.prefills for slot in lm.session._graphs.values())  # prefill graphs went through it too


def test_without_the_capture_run_the_first_generation_is_off(cuda_form, monkeypatch):
    """The stand-in reproduces the fault: skipping the capture gives other tokens on a new slot."""
    plain = load(cuda_form("llama"), "cpu")
    lm, _ = _graphs(cuda_form("llama"), feed_back=True)
    from onnxpipe.runtime import cuda_graphs

    # the slot taken for captured on this thread, without the capture's run
    monkeypatch.setattr(lm.session.graphs, "capture", lambda slot: slot.threads.add(cuda_graphs._this_thread()))
    opts = {"max_new_tokens": 12, "stop_token_ids": []}
    assert _tokens(lm, PROMPTS, **opts) != _tokens(plain, PROMPTS, **opts)


def test_the_capture_leaves_the_slot_unprimed_and_uncounted(cuda_form):
    lm, runs = _graphs(cuda_form("llama"), feed_back=True)
    cache = lm.session.new_cache(3, capacity=40)
    (slot,) = lm.session._graphs.values()
    assert slot.graph_id in runs.seen and runs.repeated == 1  # captured at creation, on its own inputs
    assert not slot.primed and slot.runs == 0 and lm.session.transfers.steps == 0
    assert cache.values is slot.cache and cache.length == 0


def test_at_most_graph_slots_max_slots_keep_their_buffers(cuda_form, monkeypatch):
    """A new (batch, capacity) slot beyond GRAPH_SLOTS_MAX lets the least recently used one go; a slot made again
    later is captured afresh under a new graph id, and every generation still gives the plain tokens."""
    from onnxpipe.runtime import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "GRAPH_SLOTS_MAX", 2)
    plain = load(cuda_form("llama"), "cpu")
    lm, runs = _graphs(cuda_form("llama"), feed_back=True)
    opts = {"max_new_tokens": 6, "stop_token_ids": []}
    ids = {}
    for rows in (3, 1, 3, 2, 1):  # 3 and 1 made; 3 used again (1 is then the oldest); 2 lets 1 go; 1 comes back
        prompts = PROMPTS[:rows]
        assert _tokens(lm, prompts, **opts) == _tokens(plain, prompts, **opts), rows
        ids.setdefault(rows, []).append(lm.session._graphs[max(k for k in lm.session._graphs if k[0] == rows)].graph_id)
        assert len(lm.session._graphs) <= 2
    assert sorted(k[0] for k in lm.session._graphs) == [1, 2] and lm.session.graph_slots_dropped == 2
    assert ids[3][0] == ids[3][1] and ids[1][0] != ids[1][1]  # batch 3 kept its graph; batch 1 was captured anew
    assert ids[1][1] in runs.seen
