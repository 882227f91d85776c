"""runtime.step.Step: a graph's inputs and outputs bound by the manifest's names, checked against the session."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.parity import empty_past, ort_step_fn, position_ids_for
from onnxpipe.runtime.step import Step


@pytest.fixture(scope="module")
def llama(tiny_onnx: Callable[..., Path]) -> tuple[ModelDir, object]:
    import onnxruntime as ort

    md = ModelDir.open(tiny_onnx("llama"))
    return md, ort.InferenceSession(str(md.model_path), providers=["CPUExecutionProvider"])


def test_bind_names_every_input_and_output_of_the_graph(llama):
    md, session = llama
    step = Step.bind(session, md.manifest)
    m = md.manifest
    assert step.past_names == tuple(n for i in range(m.num_layers) for n in m.past_names(i))
    assert step.present_names == tuple(n for i in range(m.num_layers) for n in m.present_names(i))
    assert step.has_position_ids == ("position_ids" in {i.name for i in session.get_inputs()})
    assert step.kv_dtype == np.float32
    ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int64)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int64)
    feed = step.feed(ids, mask)
    # exactly the graph's inputs, no more: onnxruntime rejects an unknown name and misses none
    assert set(feed) == {i.name for i in session.get_inputs()}
    assert all(feed[n].shape == (2, step.num_kv_heads, 0, step.head_dim) for n in step.past_names)
    outputs = session.run(step.outputs(presents=True), feed)
    assert len(outputs) == 1 + len(step.present_names)


def test_a_prefill_through_the_step_equals_the_parity_wrapper(llama):
    """The same logits as parity.ort_step_fn, the wrapper a parity check runs, on a padded batch."""
    md, session = llama
    step = Step.bind(session, md.manifest)
    ids = np.array([[5, 6, 7, 8, 9], [9, 10, 11, 0, 0]], np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64)
    (logits,) = session.run(step.outputs(), step.feed(ids, mask))
    want, _ = ort_step_fn(session, md.manifest)(ids, mask, position_ids_for(mask, 5), empty_past(md.manifest, 2, np.float32))
    np.testing.assert_array_equal(logits, want)
    # a decode step with a cache given: positions from the whole mask, the past fed in the manifest's order
    _, *presents = session.run(step.outputs(presents=True), step.feed(ids, mask))
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    nxt = np.array([[3], [4]], np.int64)
    (logits2,) = session.run(step.outputs(), step.feed(nxt, mask2, position_ids_for(mask2, 1), presents))
    past = [(presents[2 * i], presents[2 * i + 1]) for i in range(md.manifest.num_layers)]
    want2, _ = ort_step_fn(session, md.manifest)(nxt, mask2, position_ids_for(mask2, 1), past)
    np.testing.assert_array_equal(logits2, want2)


def test_bind_refuses_kv_names_the_graph_does_not_have(llama):
    md, session = llama
    manifest = copy.deepcopy(md.manifest)
    manifest.graph["kv"]["past_key"] = "cache.{i}.k"
    with pytest.raises(OnnxpipeError, match=r"model\.onnx: the graph has no input 'cache\.0\.k'"):
        Step.bind(session, manifest)


def test_feed_refuses_a_cache_of_the_wrong_length(llama):
    md, session = llama
    step = Step.bind(session, md.manifest)
    ids, mask = np.ones((1, 2), np.int64), np.ones((1, 2), np.int64)
    with pytest.raises(ValueError, match="past arrays"):
        step.feed(ids, mask, past=step.empty_past(1)[:-1])
