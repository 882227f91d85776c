"""Dynamic int8 with a "massive activation": one token whose input to a linear layer is ~1000x the others.

Trained LLMs have such tokens (SmolLM2-135M's layer-11 down_proj input: |x| ~ 3000 on a window's first token, ~1.3
on the median token). One activation scale per tensor, as ORT's DynamicQuantizeMatMul takes, rounds every other
token of the prefill to a few levels; one scale per token keeps them at int8 precision. Given an explicit
threshold (no search), each layer's input is measured on calibration prefills: per token for such a layer, per
tensor for an ordinary one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxpipe.quant.dynamic import activation_statistics, quantize_dynamic_int8
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


def two_layer_model(w_massive: np.ndarray, w_plain: np.ndarray) -> onnx.ModelProto:
    """Two linear layers side by side: x (which will carry a massive token) -> y, h (ordinary) -> z."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/layers.0/mlp/down_proj/MatMul"),
         helper.make_node("MatMul", ["h", "v"], ["z"], name="/layers.0/attn/q_proj/MatMul")], "two",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", K]),
         helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", N]),
         helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(w_massive, "w"), numpy_helper.from_array(w_plain, "v")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def test_auto_picks_per_token_for_the_massive_layer_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w, v = ((rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32) for _ in range(2))
    feeds = [{"x": inputs_with_massive_token(rng), "h": rng.standard_normal((2, T, K)).astype(np.float32)}
             for _ in range(2)]
    proto = two_layer_model(w, v)
    # without logits to search on (a bare graph), the threshold alone decides: per tensor where it costs nothing
    details = quantize_dynamic_int8(proto, tmp_path / "q.onnx", plan_weights(proto, "y"), feeds=feeds)
    assert details["batch_independent"] is False
    choice = {c["nodes"][0]: c for c in details["activation_choice"]}
    massive, plain = choice["/layers.0/mlp/down_proj/MatMul"], choice["/layers.0/attn/q_proj/MatMul"]
    assert massive["scheme"] == "token" and massive["tensor_error"] > 0.5 and massive["token_spread"] > 100
    assert plain["scheme"] == "tensor" and plain["tensor_error"] < 0.02 and plain["token_spread"] < 3
    assert details["per_token_nodes"] == 1 and details["per_tensor_nodes"] == 1
    out = onnx.load(str(tmp_path / "q.onnx"))
    ops = [n.op_type for n in out.graph.node]
    # per token: QuantizeLinear on the fixed grid; per tensor: ORT's quantize_dynamic output (DynamicQuantizeLinear)
    assert ops.count("QuantizeLinear") == 1 and ops.count("DynamicQuantizeLinear") == 1
    assert ops.count("MatMulInteger") == 2
    # and it works: the massive layer's ordinary tokens at int8 precision, the plain layer too
    x, h = inputs_with_massive_token(rng), rng.standard_normal((2, T, K)).astype(np.float32)
    y, z = measure_session(tmp_path / "q.onnx").run(["y", "z"], {"x": x, "h": h})
    ordinary = np.ones((2, T), bool)
    ordinary[0, 0] = False
    assert np.abs(y - x @ w)[ordinary].max() / np.abs((x @ w)[ordinary]).max() < 0.02
    assert np.abs(z - h @ v).max() / np.abs(h @ v).max() < 0.02


def test_auto_needs_feeds(tmp_path: Path) -> None:
    proto = linear_model(np.eye(K, N, dtype=np.float32), 18)
    with pytest.raises(ValueError, match="needs feeds"):
        quantize_dynamic_int8(proto, tmp_path / "q.onnx", plan_weights(proto, "y"))


def test_activation_statistics_of_a_massive_token() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 100, K))
    err, spread = activation_statistics(x)
    assert err < 0.02 and spread < 3  # ordinary tokens: one per-tensor scale is fine
    x[0, 0, 5] = 3000.0
    err, spread = activation_statistics(x)
    assert err > 0.5 and spread > 500  # most tokens round to zero under the massive token's scale


def test_per_token_dynamic(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    proto = linear_model(w, 18)
    details = quantize_dynamic_int8(proto, tmp_path / "q.onnx", plan_weights(proto, "y"), activations="token")
    assert "per token" in details["activations"]
    x = inputs_with_massive_token(rng)
    assert rel_err_of_ordinary_tokens(tmp_path / "q.onnx", x, w) < 0.02
    # the massive token itself is exact to int8 precision too, and the graph reads no float weight any more
    y = measure_session(tmp_path / "q.onnx").run(["y"], {"x": x})[0]
    np.testing.assert_allclose(y[0, 0], x[0, 0] @ w, rtol=0, atol=0.02 * np.abs(x[0, 0] @ w).max())
    out = onnx.load(str(tmp_path / "q.onnx"))
    assert not any(t.name == "w" for t in out.graph.initializer)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("QuantizeLinear") == 1 and "MatMul" not in ops
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)  # standard ONNX only
    onnx.checker.check_model(out, full_check=True)
    assert details["batch_independent"] is True
