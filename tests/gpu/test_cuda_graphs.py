"""CUDA graphs against no graphs on the CUDA EP, every way generate decodes: the same tokens.

The seeded Llama's `optimize --target cuda` form is loaded twice (``cuda_graph`` off and on) and both get the
same requests: ragged greedy batches, stop ids that end rows at different steps (rows dropped from the cache),
several batch sizes in turn (one captured graph each, one replayed), prompts past a capacity bucket, seeded
sampling, a repetition penalty (the logits path through the graph) and beam search. Before the capture fix
(e04dd31) the first use of each (batch, capacity) slot came back several steps on: 5 of 9 of these cases matched
on an H100; 9 of 9 after it (docs/benchmarks.md, "The first generation on a new CUDA-graph slot").
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gpu.conftest import prompts, token_lists

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def plain_and_graphs(gpu_llama_cuda_form: Path):
    from onnxpipe.runtime import load

    plain = load(gpu_llama_cuda_form, "cuda", cuda_graph=False)
    said: list[str] = []
    graphs = load(gpu_llama_cuda_form, "cuda", cuda_graph=True, announce=said.append)
    assert plain.provider == graphs.provider == "cuda"
    assert graphs.session.cuda_graph, said  # the graph session really replays graphs
    return plain, graphs


def _cases(vocab: int, stop: int) -> list[tuple[str, list[list[int]], dict]]:
    ragged = prompts(vocab, [5, 17, 40])
    return [
        ("greedy, ragged batch of 3", ragged, dict(max_new_tokens=24)),
        ("greedy, a stop id ends rows at different steps", ragged, dict(max_new_tokens=24, stop_token_ids=[stop])),
        ("greedy, batch 1", ragged[:1], dict(max_new_tokens=16)),
        ("greedy, batch 5", prompts(vocab, [3, 9, 30, 31, 64], seed=1), dict(max_new_tokens=20)),
        ("greedy, batch 3 again (its graph replayed)", ragged, dict(max_new_tokens=24)),
        ("greedy, past a 256-position capacity bucket", prompts(vocab, [250, 120], seed=2), dict(max_new_tokens=40)),
        ("sampling, temperature 0.8, top-k 40, top-p 0.9, seed 7", ragged,
         dict(max_new_tokens=24, temperature=0.8, top_k=40, top_p=0.9, seed=7)),
        ("greedy, repetition penalty 1.3", ragged, dict(max_new_tokens=24, repetition_penalty=1.3)),
        ("beam search, 3 beams", ragged[1:2], dict(max_new_tokens=16, num_beams=3)),
    ]


CASE_NAMES = [name for name, _, _ in _cases(16, 0)]


@pytest.fixture(scope="module")
def cases(plain_and_graphs) -> dict[str, tuple[list[list[int]], dict]]:
    plain, _ = plain_and_graphs
    vocab = plain.session.vocab_size
    first = plain.generate(prompts(vocab, [5, 17, 40]), max_new_tokens=24, stop_token_ids=[])
    stop = int(first[1].token_ids[6])  # row 1 stops at its 7th token; the others run on (or stop where it recurs)
    return {name: (batch, {"stop_token_ids": [], **options}) for name, batch, options in _cases(vocab, stop)}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_cuda_graphs_give_the_plain_tokens(plain_and_graphs, cases, case):
    """The cases run in this order in one module, so the graph session meets new slots and replays old ones."""
    plain, graphs = plain_and_graphs
    batch, options = cases[case]
    expected = token_lists(plain.generate(batch, **options))
    got = token_lists(graphs.generate(batch, **options))
    assert [len(t) for t in expected] == [len(t) for t in got]
    assert got == expected


def test_auto_keeps_the_cuda_eps_options(gpu_llama_cuda_form: Path):
    """``provider="auto"`` on this GPU: whether or not TensorRT's libraries load (onnxruntime-gpu lists TensorRT
    either way, and where they do not load onnxruntime's Python retried on its default providers without options),
    a session asked for CUDA graphs runs its CUDA EP with ``enable_cuda_graph``; run 37 found auto replaying nothing."""
    from onnxpipe.runtime import load

    lm = load(gpu_llama_cuda_form, "auto", cuda_graph=True, announce=lambda m: None)
    if lm.provider != "cuda":
        pytest.skip(f"auto ran on {lm.provider} here")
    live = lm.session.session.get_provider_options()["CUDAExecutionProvider"]
    assert live["enable_cuda_graph"] == "1" and lm.session.cuda_graph
    a = lm.generate(prompts(lm.session.vocab_size, [7]), max_new_tokens=8, stop_token_ids=[])
    assert len(token_lists(a)[0]) == 8


def test_fed_steps_launched_ahead_give_the_synced_tokens(gpu_llama_cuda_form: Path, plain_and_graphs):
    """The CUDA EP on a stream of the session's own and generate's greedy fed steps launched one ahead of their
    reads (the default where the CUDA runtime is found) against the same session kind with ``ahead=False``: the
    same tokens, and the ahead path really ran."""
    from onnxpipe.runtime import load

    _, graphs = plain_and_graphs
    assert graphs.session.stream is not None, graphs.session.stream_why_not
    synced = load(gpu_llama_cuda_form, "cuda", cuda_graph=True)
    synced.session.stream, synced.session.stream_why_not = None, "turned off for the test"
    vocab = graphs.session.vocab_size
    for batch, n in (([5, 17, 40], 24), ([9], 30), ([3, 9, 30, 31, 64], 20)):
        before = graphs.session.graphs.ahead_steps
        want = token_lists(synced.generate(prompts(vocab, batch, seed=4), max_new_tokens=n, stop_token_ids=[]))
        got = token_lists(graphs.generate(prompts(vocab, batch, seed=4), max_new_tokens=n, stop_token_ids=[]))
        assert got == want
        assert graphs.session.graphs.ahead_steps - before >= n - 3  # all but the prefill's and the first fed step
    assert synced.session.graphs.ahead_steps == 0
