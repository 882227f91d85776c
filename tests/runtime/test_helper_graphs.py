"""The runtime's helper graphs (helper_graphs.py), run by onnxruntime on random inputs: the builder's graphs give
what the hand-made protobuf graphs gave, element for element."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from onnxpipe.runtime import helper_graphs
from onnxpipe.runtime.sessions import open_session

TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _run(model, feed):
    return open_session(model, optimization="off").run(None, feed)


def _signature(model):
    def spec(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return spec(model.graph.input), spec(model.graph.output)


def _same(new, old, feed):
    assert _signature(new) == _signature(old)
    got, want = _run(new, feed), _run(old, feed)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("elem_type", list(TYPES))
@pytest.mark.parametrize("seed", range(3))
def test_head_graph(elem_type, seed):
    rng = np.random.default_rng(seed)
    b, s, v = rng.integers(1, 6), rng.integers(1, 9), rng.integers(2, 50)
    feed = {"logits": rng.standard_normal((b, s, v)).astype(TYPES[elem_type]),
            "last_index": rng.integers(0, s, b).astype(np.int64)}
    _same(helper_graphs.head_graph(elem_type), helper_graphs._legacy_head_graph(elem_type), feed)


@pytest.mark.parametrize("elem_type", list(TYPES))
@pytest.mark.parametrize("seed", range(3))
def test_step_head_graph(elem_type, seed):
    rng = np.random.default_rng(seed)
    b, v = int(rng.integers(1, 6)), int(rng.integers(2, 50))
    feed = {"logits": rng.standard_normal((b, 1, v)).astype(TYPES[elem_type])}
    _same(helper_graphs.step_head_graph(elem_type, b, v), helper_graphs._legacy_step_head_graph(elem_type, b, v), feed)


@pytest.mark.parametrize("elem_type", list(TYPES))
@pytest.mark.parametrize("n", [1, 4])
def test_gather_graph(elem_type, n):
    rng = np.random.default_rng(n)
    feed = {f"x{i}": rng.standard_normal((3, 2, 5, 4)).astype(TYPES[elem_type]) for i in range(n)}
    feed["rows"] = np.array([2, 0, 0, 1, 2], np.int64)  # kept, dropped and repeated rows
    _same(helper_graphs.gather_graph(n, elem_type), helper_graphs._legacy_gather_graph(n, elem_type), feed)
