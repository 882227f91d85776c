"""Dynamic int8 with a "massive activation": one token whose input to a linear layer is ~1000x the others.

Trained LLMs have such tokens (SmolLM2-135M's layer-11 down_proj input: |x| ~ 3000 on a window's first token, ~1.3
on the median token). One activation scale per tensor, as ORT's DynamicQuantizeMatMul takes, rounds every other
token of the prefill to a few levels; one scale per token (the default) keeps them at int8 precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxpipe.quant.dynamic import quantize_dynamic_int8
from onnxpipe.quant.graph import plan_weights
from onnxpipe.quant.quality import measure_session

K, N, T = 64, 48, 16


def linear_model(w: np.ndarray, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/layers.0/mlp/down_proj/MatMul")], "linear",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def inputs_with_massive_token(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((2, T, K)).astype(np.float32)
    x[0, 0, 5] = 3000.0  # the first token of the first sequence carries one huge channel
    return x


def rel_err_of_ordinary_tokens(path: Path, x: np.ndarray, w: np.ndarray) -> float:
    y = measure_session(path).run(["y"], {"x": x})[0]
    ref = x @ w
    ordinary = np.ones((2, T), bool)
    ordinary[0, 0] = False
    return float(np.abs(y - ref)[ordinary].max() / np.abs(ref[ordinary]).max())


@pytest.mark.parametrize("opset", [17, 18])
def test_per_token_scales_survive_a_massive_activation(tmp_path: Path, opset: int) -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    x = inputs_with_massive_token(rng)
    errors = {}
    for act in ("token", "tensor"):
        proto = linear_model(w, opset)
        plan = plan_weights(proto, "y")
        details = quantize_dynamic_int8(proto, tmp_path / f"{act}.onnx", plan, activations=act)
        assert details["quantized_nodes"] == 1
        errors[act] = rel_err_of_ordinary_tokens(tmp_path / f"{act}.onnx", x, w)
    assert errors["token"] < 0.02  # int8 precision on every ordinary token
    assert errors["tensor"] > 0.2  # what one scale per tensor does to them


def test_default_dynamic_is_per_token(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    proto = linear_model(w, 18)
    details = quantize_dynamic_int8(proto, tmp_path / "q.onnx", plan_weights(proto, "y"))
    assert "per token" in details["activations"]
    x = inputs_with_massive_token(rng)
    assert rel_err_of_ordinary_tokens(tmp_path / "q.onnx", x, w) < 0.02
    # the massive token itself is exact to int8 precision too, and the graph reads no float weight any more
    y = measure_session(tmp_path / "q.onnx").run(["y"], {"x": x})[0]
    np.testing.assert_allclose(y[0, 0], x[0, 0] @ w, rtol=0, atol=0.02 * np.abs(x[0, 0] @ w).max())
    out = onnx.load(str(tmp_path / "q.onnx"))
    assert not any(t.name == "w" for t in out.graph.initializer)
    assert sum(n.op_type == "MatMulInteger" for n in out.graph.node) == 1
