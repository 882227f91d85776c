"""An MLP's gate and up MatMulNBits made one MatMulInt4 and a SiluMul (onnxpipe.runtime.kernels.gate_up), on the CPU
reference kernels: the same outputs as onnxruntime's five nodes, the pattern taken only where it holds, the weights
read from the model directory where they are external."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime.test_kernels import cpu_library, kernel_cache, nbits_weights  # noqa: F401  (fixtures)

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.kernels import plan_kernels
from onnxpipe.runtime.kernels.rewrite import rewrite_matmul_nbits

K, N, BLOCK = 64, 48, 32


def _mlp(rng: np.random.Generator, zero_points: bool, dtype: str = "fp32", extra_reader: bool = False) -> onnx.ModelProto:
    """y = silu(A @ Wg) * (A @ Wu), each projection a MatMulNBits; ``extra_reader``: the gate's output is a graph
    output too (then the pattern does not hold)."""
    elem = TensorProto.FLOAT if dtype == "fp32" else TensorProto.FLOAT16
    inits, nodes = [], []
    for name in ("gate", "up"):
        w = nbits_weights(rng, N, K, BLOCK, zero_points, dtype)
        inputs = ["A", f"{name}.B", f"{name}.scales"]
        inits += [numpy_helper.from_array(w["B"], f"{name}.B"), numpy_helper.from_array(w["scales"], f"{name}.scales")]
        if zero_points:
            inits.append(numpy_helper.from_array(w["zero_points"], f"{name}.zp"))
            inputs.append(f"{name}.zp")
        nodes.append(helper.make_node("MatMulNBits", inputs, [name], name=f"proj_{name}", domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=0))
    nodes += [helper.make_node("Sigmoid", ["gate"], ["sig"], name="sig"),
              helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
              helper.make_node("Mul", ["up", "silu"], ["Y"], name="product")]  # up first: either order is taken
    outputs = [helper.make_tensor_value_info("Y", elem, ["M", N])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("gate", elem, ["M", N]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("A", elem, ["M", K])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8  # what every onnxruntime here reads (a newer onnx writes an IR an older runtime refuses)
    return model


def _run(model: onnx.ModelProto, a: np.ndarray, library: Path | None) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if library is not None:
        so.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(["Y"], {"A": a})[0]


@pytest.mark.parametrize("zero_points", [True, False], ids=["zero_points", "symmetric"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_the_pair_becomes_one_matmul_and_silu_mul_with_the_same_outputs(cpu_library: Path,  # noqa: F811
                                                                        zero_points: bool, dtype: str) -> None:
    rng = np.random.default_rng(3 + zero_points)
    model = _mlp(rng, zero_points, dtype)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    report = rewrite_matmul_nbits(fused, "cpu", fuse=True)
    assert report.fused == 1 and report.rewritten == report.total == 2 and not report.kept
    assert report.line() == "onnxpipe MatMulInt4 on 2 of 2 MatMulNBits, 1 gate/up pairs as one with SiluMul"
    ops = [(n.domain, n.op_type) for n in fused.graph.node]
    assert ops == [("onnxpipe", "MatMulInt4"), ("onnxpipe", "SiluMul")]
    assert next(a.i for a in fused.graph.node[0].attribute if a.name == "N") == 2 * N
    assert len(fused.graph.initializer) == (3 if zero_points else 2)  # the pair's weights, merged; the old ones gone
    np_type = np.float32 if dtype == "fp32" else np.float16
    a = rng.standard_normal((5, K)).astype(np_type)
    want, got = _run(model, a, None), _run(fused, a, cpu_library)
    assert got.shape == want.shape == (5, N) and got.dtype == want.dtype
    # onnxruntime rounds after Sigmoid and each Mul (to float16 in the fp16 graph); SiluMul once
    tol = 1e-5 if dtype == "fp32" else 4e-3
    assert np.abs(got.astype(np.float64) - want).max() <= tol * np.abs(want.astype(np.float64)).max()


@pytest.mark.parametrize("zero_points", [True, False], ids=["zero_points", "symmetric"])
def test_a_pair_of_kept_nodes_becomes_one_matmulnbits(cpu_library: Path, zero_points: bool) -> None:  # noqa: F811
    """skip=("all",): both projections stay onnxruntime's, so the pair becomes one com.microsoft MatMulNBits of 2N rows
    (the concatenated weights) and a SiluMul, with the five nodes' outputs."""
    rng = np.random.default_rng(21 + zero_points)
    model = _mlp(rng, zero_points)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    report = rewrite_matmul_nbits(fused, "cpu", fuse=True, skip=("all",))
    assert report.fused == report.fused_kept == 1 and report.rewritten == 0 and report.kept == {
        "proj_gate": "all", "proj_up": "all"}
    assert report.line() == ("onnxpipe MatMulInt4 on 0 of 2 MatMulNBits, 1 gate/up pairs as one with SiluMul (1 as one "
                             "MatMulNBits)")
    ops = [(n.domain, n.op_type) for n in fused.graph.node]
    assert ops == [("com.microsoft", "MatMulNBits"), ("onnxpipe", "SiluMul")]
    assert next(a.i for a in fused.graph.node[0].attribute if a.name == "N") == 2 * N
    a = rng.standard_normal((5, K)).astype(np.float32)
    want, got = _run(model, a, None), _run(fused, a, cpu_library)
    assert got.shape == want.shape == (5, N)
    assert np.abs(got.astype(np.float64) - want).max() <= 1e-5 * np.abs(want.astype(np.float64)).max()


def test_not_taken_where_a_value_between_the_nodes_is_read_elsewhere_or_fusing_is_off(cpu_library: Path) -> None:  # noqa: F811
    rng = np.random.default_rng(5)
    shared = _mlp(rng, True, extra_reader=True)
    report = rewrite_matmul_nbits(shared, "cpu", fuse=True)
    assert report.fused == 0 and report.rewritten == 2
    assert [n.op_type for n in shared.graph.node] == ["MatMulInt4", "MatMulInt4", "Sigmoid", "Mul", "Mul"]
    off = _mlp(rng, True)
    assert rewrite_matmul_nbits(off, "cpu").fused == 0  # fuse defaults off at this level; the plan turns it on
    assert [n.op_type for n in off.graph.node].count("MatMulInt4") == 2


def test_external_weights_are_read_from_the_model_directory(cpu_library: Path, tmp_path: Path) -> None:  # noqa: F811
    rng = np.random.default_rng(9)
    model = _mlp(rng, True)
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    saved = onnx.ModelProto()
    saved.CopyFrom(model)  # onnx.save points the proto it saves at the external file
    onnx.save(saved, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    # without the folder the pair stays apart (each still MatMulInt4)
    apart = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert rewrite_matmul_nbits(apart, "cpu", fuse=True).fused == 0
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert rewrite_matmul_nbits(proto, "cpu", fuse=True, folder=tmp_path).fused == 1
    merged = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    b = next(v for k, v in merged.items() if k.endswith("gate_up_1"))
    assert np.array_equal(b, np.concatenate([originals["gate.B"], originals["up.B"]]))
    a = rng.standard_normal((3, K)).astype(np.float32)
    want = _run(model, a, None)
    assert np.abs(_run(proto, a, cpu_library) - want).max() <= 1e-5 * np.abs(want).max()
    # a data file cut short is one line naming it
    cut = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(OnnxpipeError, match=r"model\.onnx\.data: initializer .* is cut short"):
        rewrite_matmul_nbits(cut, "cpu", fuse=True, folder=tmp_path)


@pytest.mark.parametrize("n", [7, 8])
def test_silu_mul_alone_against_numpy(cpu_library: Path, n: int) -> None:  # noqa: F811
    import onnxruntime as ort

    for elem, np_type, tol in ((TensorProto.FLOAT, np.float32, 1e-6), (TensorProto.FLOAT16, np.float16, 1e-3)):
        node = helper.make_node("SiluMul", ["X"], ["Y"], domain="onnxpipe")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", elem, [3, 2, 2 * n])],
                                  [helper.make_tensor_value_info("Y", elem, [3, 2, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxpipe", 1)])
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(cpu_library))
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = (np.random.default_rng(n).standard_normal((3, 2, 2 * n)) * 4).astype(np_type)
        g, u = x[..., :n].astype(np.float64), x[..., n:].astype(np.float64)
        want = g / (1 + np.exp(-g)) * u
        got = sess.run(None, {"X": x})[0]
        assert got.dtype == np_type and got.shape == (3, 2, n)
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_the_fuse_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXPIPE_KERNELS_FUSE", "off")
    assert plan_kernels("reference", ["cpu"], None).fuse is False
    monkeypatch.delenv("ONNXPIPE_KERNELS_FUSE")
    assert plan_kernels("reference", ["cpu"], None).fuse is True
    monkeypatch.setenv("ONNXPIPE_KERNELS_FUSE", "maybe")
    with pytest.raises(OnnxpipeError, match=r"^ONNXPIPE_KERNELS_FUSE='maybe': choose on or off$"):
        plan_kernels("reference", ["cpu"], None)
    assert plan_kernels("off", ["cpu"], None).fuse is True  # not read where the kernels are off


def _float_mlp(rng: np.random.Generator, dtype: str) -> onnx.ModelProto:
    """The same MLP with float weights [K, N]: gate and up plain MatMuls."""
    elem = TensorProto.FLOAT if dtype == "fp32" else TensorProto.FLOAT16
    np_type = np.float32 if dtype == "fp32" else np.float16
    inits = [numpy_helper.from_array((rng.standard_normal((K, N)) * 0.1).astype(np_type), f"{name}.W")
             for name in ("gate", "up")]
    nodes = [helper.make_node("MatMul", ["A", "gate.W"], ["gate"], name="proj_gate"),
             helper.make_node("MatMul", ["A", "up.W"], ["up"], name="proj_up"),
             helper.make_node("Sigmoid", ["gate"], ["sig"], name="sig"),
             helper.make_node("Mul", ["sig", "gate"], ["silu"], name="silu"),
             helper.make_node("Mul", ["silu", "up"], ["Y"], name="product")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("A", elem, ["M", K])],
                              [helper.make_tensor_value_info("Y", elem, ["M", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_float_gate_and_up_become_one_matmul_and_silu_mul(cpu_library: Path, dtype: str) -> None:  # noqa: F811
    rng = np.random.default_rng(21)
    model = _float_mlp(rng, dtype)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    report = rewrite_matmul_nbits(fused, "cpu", fuse=True)
    assert report.fused == 1 and report.total == 0 and report.line() == "onnxpipe 1 gate/up pairs as one with SiluMul"
    assert [(n.domain, n.op_type) for n in fused.graph.node] == [("", "MatMul"), ("onnxpipe", "SiluMul")]
    (weight,) = fused.graph.initializer
    want_w = np.concatenate([numpy_helper.to_array(t) for t in model.graph.initializer], axis=1)
    assert np.array_equal(numpy_helper.to_array(weight), want_w)  # [K, 2N]: gate's columns, then up's
    np_type = np.float32 if dtype == "fp32" else np.float16
    a = rng.standard_normal((4, K)).astype(np_type)
    want, got = _run(model, a, None).astype(np.float64), _run(fused, a, cpu_library)
    tol = 1e-5 if dtype == "fp32" else 4e-3
    assert got.dtype == np_type and np.abs(got - want).max() <= tol * np.abs(want).max()
    # the CUDA kernels fuse float16 weights only (SiluMul's CUDA kernel is float16)
    fp32 = _float_mlp(rng, "fp32")
    assert rewrite_matmul_nbits(fp32, "cuda", fuse=True, apply=False).fused == 0


def test_pairs_past_the_inline_budget_stay_apart_and_are_said(cpu_library: Path,  # noqa: F811
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The merged weights are held inline in the proto: past gate_up.INLINE_MAX_BYTES the remaining pairs stay
    two MatMulInt4 and the line says how many."""
    from onnxpipe.runtime.kernels import gate_up

    rng = np.random.default_rng(2)
    model = _mlp(rng, True)
    per_pair = gate_up.pair_bytes(model.graph, gate_up.find_pairs(model.graph, lambda n: True)[0])
    assert per_pair == 2 * (N * (K // BLOCK) * (BLOCK // 2) + N * (K // BLOCK) * 4 + N * ((K // BLOCK + 1) // 2))
    monkeypatch.setattr(gate_up, "INLINE_MAX_BYTES", per_pair - 1)
    report = rewrite_matmul_nbits(model, "cpu", fuse=True)
    assert report.fused == 0 and report.apart == 1 and report.rewritten == 2
    assert report.line() == ("onnxpipe MatMulInt4 on 2 of 2 MatMulNBits, 0 gate/up pairs as one with SiluMul (1 left "
                             "apart: merged weights past 0 MiB held in memory)")
    assert [n.op_type for n in model.graph.node].count("MatMulInt4") == 2
