"""int4 --zero-points float: each block's exact min-max grid (a float zero point), written as MatMulNBits with the
nearest integer zero point plus a correction matmul of the input's block sums, so the fast integer kernel serves it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant.gptq import gptq_weight, matmulnbits_nodes, rtn_blocks, rtn_weight
from test_modes import CALIBRATION, check_directory, quantize


def _q4_1_like(k: int, n: int, seed: int = 0) -> np.ndarray:
    """Weights on GGUF Q4_1-style grids: per block of 32 along K, min + d * j with j in 0..15 (both ends used)."""
    rng = np.random.default_rng(seed)
    j = rng.integers(0, 16, (k, n))
    j[0::32], j[1::32] = 0, 15
    d = rng.uniform(0.002, 0.02, (k // 32, n)).repeat(32, 0)
    m = rng.uniform(-0.15, -0.01, (k // 32, n)).repeat(32, 0)
    return m + d * j


def test_the_exact_grid_recovers_q4_1_weights_that_integer_zero_points_round_again():
    w = _q4_1_like(128, 48)
    exact = rtn_blocks(w, 32, exact=True).dequantize(128)
    np.testing.assert_allclose(exact, w, atol=1e-6)  # only the float32 scale's rounding
    integer = rtn_weight(w, 32)
    assert np.abs(integer - w).max() > 1e-3  # the integer zero point shifts the grid: a second rounding
    h = np.eye(128) + 0.1  # GPTQ on the exact grid stays on it
    np.testing.assert_allclose(gptq_weight(w, h, 32, exact=True).dequantize(128), w, atol=1e-6)


@pytest.mark.parametrize("level", [0, 4])
def test_matmulnbits_plus_correction_computes_the_float_zero_point_weight(level):
    k, n = 128, 40
    w = np.random.default_rng(1).standard_normal((k, n)) * 0.05 + 0.03  # blocks whose range misses 0 too
    qw = rtn_blocks(w, 32, exact=True)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    nodes, inits = matmulnbits_nodes(mm, (k, n), qw, 32, level)
    assert [x.op_type for x in nodes] == ["MatMulNBits", "MatMul", "MatMul", "Add"]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    x = np.random.default_rng(2).standard_normal((2, 5, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ qw.dequantize(k)
    scale = np.abs(want).max()
    # level 0: fp32 compute; level 4: activations in int8 inside the kernel (a block-wise error of ~1%)
    assert np.abs(got - want).max() <= (1e-5 if level == 0 else 2e-2) * scale
    integer_only = x @ ((qw.q.astype(np.float64) - qw.zero_point) * qw.scale).reshape(n, -1)[:, :k].T
    assert np.abs(integer_only - want).max() > 5e-2 * scale  # without the correction the output would be off


@pytest.mark.parametrize("family,algo", [("llama", "rtn"), ("llama", "gptq"), ("gpt2", "rtn")])  # gpt2: 2-D linears
def test_float_zero_points_quantize_a_model(tok_model, small_eval: Path, tmp_path: Path, family: str, algo: str) -> None:  # noqa: ANN001
    opts = {"calibration": CALIBRATION} if algo == "gptq" else {}
    md = quantize(tok_model(family), tmp_path / algo, "int4", small_eval, algo=algo, float_zero_points=True, **opts)
    step = check_directory(md, "int4")
    assert step["params"]["float_zero_points"] is True and step["details"]["zero_points"].startswith("float")
    graph = onnx.load(str(md.model_path)).graph
    nbits = [x for x in graph.node if x.op_type == "MatMulNBits"]
    corrections = [x for x in graph.node if x.name.endswith("_Q4F/MatMul")]
    assert nbits and len(corrections) >= len(nbits) - 1  # every body layer whose K tiles into blocks
    sums = [x for x in graph.node if x.name.endswith("_Q4F/BlockSums")]
    assert 0 < len(sums) <= len(corrections)
    if family == "llama":  # q/k/v and gate/up share their input's block sums (GPT-2's c_attn is one linear)
        assert len(sums) < len(corrections)
    indicators = {x.input[1] for x in sums}  # the [K, blocks] ones: one per distinct K in the whole graph
    assert indicators == {t.name for t in graph.initializer if t.name.startswith("onnxpipe_q4f_blocks_")}
    assert len(indicators) == len({t.dims[0] for t in graph.initializer if t.name in indicators}) <= 2
    assert step["quality"]["top1_agreement"] > 0.7 and np.isfinite(step["quality"]["ppl_after"])


@pytest.mark.parametrize("opts", [dict(algo="hqq"), dict(block_size=0), dict(symmetric=True), dict(mode="dynamic")])
def test_float_zero_points_are_refused_where_they_do_not_apply(tok_model, small_eval: Path, tmp_path: Path, opts) -> None:  # noqa: ANN001
    mode = opts.pop("mode", "int4")
    with pytest.raises(OnnxpipeError, match="--zero-points float applies to --mode int4"):
        quantize(tok_model("llama"), tmp_path / "q", mode, small_eval, float_zero_points=True, **opts)
