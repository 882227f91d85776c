"""GPTQ: our implementation beats round-to-nearest on the error it minimises; the MatMulNBits packing is exact."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxpipe.quant.gptq import dequantize_linear_nodes, gptq_weight, matmulnbits_node, rtn_per_channel, rtn_weight


def correlated_inputs(k: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=(600, k))
    x[:, 3] *= 10  # an outlier channel, as real activations have
    return x + 0.5 * x[:, :1]


@pytest.mark.parametrize("k", [64, 88])  # 88: K not a multiple of the block (padding, odd block count)
def test_gptq_beats_rtn_on_output_error(k: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(k, 24)).astype(np.float32)
    x = correlated_inputs(k, rng)
    h = 2 * x.T @ x / len(x)
    q = gptq_weight(w, h.copy(), group_size=32).dequantize(k)
    err_gptq = np.linalg.norm(x @ (w - q))
    err_rtn = np.linalg.norm(x @ (w - rtn_weight(w, 32)))
    assert err_gptq < 0.97 * err_rtn


def test_gptq_with_identity_hessian_is_rtn() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 8)).astype(np.float32)
    q = gptq_weight(w, np.eye(64), group_size=32, percdamp=0.0).dequantize(64)
    np.testing.assert_allclose(q, rtn_weight(w, 32), atol=1e-6)


def test_ort_bundled_gptq_compensates_nothing() -> None:
    """Why gptq.py exists: ORT 1.32's bundled GPTQ returns round-to-nearest. If this starts failing, ORT fixed it."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq

    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 24)).astype(np.float32)
    x = correlated_inputs(64, rng)
    h = 2 * x.T @ x / len(x)
    np.testing.assert_allclose(gptq(w.copy(), h.copy(), group_size=32), rtn_weight(w, 32), atol=1e-5)


@pytest.mark.parametrize("k", [64, 88])
def test_matmulnbits_packing_matches_dequantized(k: int) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    n = 24
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = rng.normal(size=(5, k)).astype(np.float32)
    qw = gptq_weight(w, np.eye(k) * 2.0, group_size=32)
    node, inits = matmulnbits_node(helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), (k, n), qw, 32, 4)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, n])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ qw.dequantize(k)
    # accuracy_level 4 quantizes x to int8 inside the kernel: close to, not equal to, the dequantized product
    assert np.abs(y - ref).max() / np.abs(ref).max() < 2e-2
    assert np.abs(y - ref).max() < 0.2 * np.abs(y - x @ w).max()


@pytest.mark.parametrize("k", [64, 57])  # 57: odd K and odd K * N, the last uint4 byte half used
def test_per_channel_dequantize_linear_is_exact(k: int) -> None:
    """The uint4 packing and the per-axis scale / zero point: DequantizeLinear -> MatMul (ORT optimizations off,
    so nothing is fused) equals x @ the dequantized weights; RTN and GPTQ with one group of K agree on the grid."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    n = 23
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[:, 0] = np.abs(w[:, 0])  # a column with no negative weight: zero point 0
    x = rng.normal(size=(5, k)).astype(np.float32)
    qw = rtn_per_channel(w)
    np.testing.assert_allclose(qw.dequantize(k), gptq_weight(w, np.eye(k), group_size=k, percdamp=0.0).dequantize(k),
                               atol=1e-6)
    assert np.abs(qw.dequantize(k) - w).max(0).max() <= 0.5 * qw.scale.max() + 1e-6
    nodes, inits = dequantize_linear_nodes(helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), (k, n), qw)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, n])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x.astype(np.float64) @ qw.dequantize(k), rtol=1e-5, atol=1e-5)
