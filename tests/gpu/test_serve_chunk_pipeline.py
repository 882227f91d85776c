"""On the CUDA EP with CUDA graphs and chunk graphs: a long prompt read in chunks beside greedy streams whose decode
steps are fed on the device (serve/slots.py's ``parks``). The chunks' captured runs write none of the decode graph's
input buffers, so between the prompt's first and last chunk every step stays fed and every request gets the tokens
the same scheduler gives it alone (tests/serve/test_chunk_pipeline.py runs the same on the CPU, through the graph-slot
path minus the GPU)."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest
from serve.test_chunk_pipeline import LONG, STREAMS, _read_beside_streams

pytestmark = pytest.mark.gpu


def test_a_long_prompt_read_in_chunk_graphs_beside_fed_steps_gets_its_solo_tokens(gpu_llama_cuda_form: Path):
    from onnxpipe.runtime import load
    from onnxpipe.serve.scheduler import make_scheduler

    lm = load(gpu_llama_cuda_form, "cuda", cuda_graph=True)
    assert lm.session.cuda_graph and lm.session.fed and lm.session.last_position
    alone = make_scheduler(lm, max_batch=4, prefill_chunk=16, max_length=160, chunk_graphs=True)
    alone.start()
    try:
        want = []
        for prompt, n in STREAMS + [(LONG, 10)]:
            out: queue.Queue = queue.Queue()
            alone.submit(lm.prepare(prompt, max_new_tokens=n, stop_token_ids=[]),
                         lambda e, out=out: out.put(e) if e[0] in ("done", "error") else None)
            kind, value = out.get(timeout=120)
            assert kind == "done", value
            want.append(list(value.token_ids))
    finally:
        alone.stop()
    got, _, sched, log = _read_beside_streams(lm, LONG, 10, chunk_graphs=True)
    assert [list(t) for t in got] == want
    assert [f for _, f, _, _ in log] == [0] + [1] * 5 + [0]  # fed between the first and the last chunk
    assert sched.stats.graph_chunks == 7 and not sched.stats.chunk_graph_error and not sched.stats.capture_error
