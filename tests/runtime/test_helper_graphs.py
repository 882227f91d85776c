"""The runtime's helper graphs (helper_graphs.py), run by onnxruntime on random inputs against numpy: the
position each row reads and its argmax, a decode step's logits, and KV rows kept, dropped and repeated. (Their
onnxscript-built form was checked equal, element for element, to the hand-made graphs it replaced.)"""

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


def _equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("elem_type", list(TYPES))
@pytest.mark.parametrize("seed", range(3))
def test_head_graph(elem_type, seed):
    rng = np.random.default_rng(seed)
    b, s, v = rng.integers(1, 6), rng.integers(1, 9), rng.integers(2, 50)
    logits = rng.standard_normal((b, s, v)).astype(TYPES[elem_type])
    last_index = rng.integers(0, s, b).astype(np.int64)
    model = helper_graphs.head_graph(elem_type)
    assert _signature(model) == (
        [("logits", elem_type, ["B", "S", "V"]), ("last_index", TensorProto.INT64, ["B"])],
        [("last_logits", TensorProto.FLOAT, ["B", "V"]), ("argmax", TensorProto.INT64, ["B"])])
    picked = logits[np.arange(b), last_index].astype(np.float32)
    _equal(_run(model, {"logits": logits, "last_index": last_index}), [picked, picked.argmax(axis=1)])


@pytest.mark.parametrize("elem_type", list(TYPES))
@pytest.mark.parametrize("seed", range(3))
def test_step_head_graph(elem_type, seed):
    rng = np.random.default_rng(seed)
    b, v = int(rng.integers(1, 6)), int(rng.integers(2, 50))
    logits = rng.standard_normal((b, 1, v)).astype(TYPES[elem_type])
    model = helper_graphs.step_head_graph(elem_type, b, v)
    assert _signature(model) == ([("logits", elem_type, [b, 1, v])],
                                 [("last_logits", TensorProto.FLOAT, [b, v]), ("argmax", TensorProto.INT64, [b])])
    _equal(_run(model, {"logits": logits}), [logits[:, 0].astype(np.float32), logits[:, 0].argmax(axis=1)])


@pytest.mark.parametrize("elem_type", list(TYPES))
@pytest.mark.parametrize("n", [1, 4])
def test_gather_graph(elem_type, n):
    rng = np.random.default_rng(n)
    xs = [rng.standard_normal((3, 2, 5, 4)).astype(TYPES[elem_type]) for _ in range(n)]
    rows = np.array([2, 0, 0, 1, 2], np.int64)  # kept, dropped and repeated rows
    model = helper_graphs.gather_graph(n, elem_type)
    assert [name for name, _, _ in _signature(model)[0]] == ["rows"] + [f"x{i}" for i in range(n)]
    assert [name for name, _, _ in _signature(model)[1]] == [f"y{i}" for i in range(n)]
    _equal(_run(model, {"rows": rows, **{f"x{i}": x for i, x in enumerate(xs)}}), [x[rows] for x in xs])
