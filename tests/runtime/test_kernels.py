"""onnxpipe's custom-op library on the CPU: the hand-written ABI (ort_abi.h), the MatMulInt4 reference kernel against
a float64 dequantized reference, the MatMulNBits rewrite and its near-misses, and the kernel's one-line errors.

The library is built once per test session with the system C++ compiler into a temporary cache (skipped, with the
reason, where no compiler runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.kernels import KernelBuildError, KernelPlan, build_library, kernels_mode, plan_kernels
from onnxpipe.runtime.kernels.rewrite import rewrite_matmul_nbits

NP_TYPE = {"fp32": np.float32, "fp16": np.float16}
ONNX_TYPE = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """ONNXPIPE_KERNEL_CACHE for the whole test session: a temporary folder, so a build never lands in ~/.cache."""
    path = tmp_path_factory.getbasetemp() / "onnxpipe-kernels"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNXPIPE_KERNEL_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def cpu_library(kernel_cache: Path) -> Path:
    """The CPU kernels library, built once (skips where this machine has no working C++ compiler)."""
    try:
        return build_library("cpu")
    except KernelBuildError as e:
        if "no C++ compiler" in str(e) or "does not run" in str(e):
            pytest.skip(f"no C++ compiler to build the kernels: {e}")
        raise


# ---- a one-node MatMulNBits model and its float64 reference ----
def nbits_weights(rng: np.random.Generator, n: int, k: int, block: int, zero_points: bool, dtype: str) -> dict:
    blocks = k // block
    return {"B": rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8),
            "scales": (rng.random(n * blocks) * 0.05 + 0.005).astype(NP_TYPE[dtype]),
            "zero_points": rng.integers(0, 256, n * ((blocks + 1) // 2), dtype=np.uint8) if zero_points else None}


def dequantized(w: dict, n: int, k: int, block: int) -> np.ndarray:
    """W^T [N, K] in float64: (q - zero point) * scale, the first weight of a byte in its low nibble."""
    blocks = k // block
    q = np.empty((n, blocks, block), np.float64)
    q[..., 0::2], q[..., 1::2] = w["B"] & 0x0F, w["B"] >> 4
    if w["zero_points"] is None:
        zp = np.full((n, blocks), 8.0)
    else:
        packed = w["zero_points"].reshape(n, -1)
        both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)
        zp = both[:, :blocks].astype(np.float64)
    scales = w["scales"].astype(np.float64).reshape(n, blocks)
    return ((q - zp[..., None]) * scales[..., None]).reshape(n, k)


def nbits_model(w: dict, n: int, k: int, block: int, dtype: str, **attrs: int) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w["B"], "B"), numpy_helper.from_array(w["scales"], "scales")]
    inputs = ["A", "B", "scales"]
    if w["zero_points"] is not None:
        inits.append(numpy_helper.from_array(w["zero_points"], "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], name="proj", domain="com.microsoft",
                            **{"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": 0, **attrs})
    graph = helper.make_graph([node], "one_matmul", [helper.make_tensor_value_info("A", ONNX_TYPE[dtype], ["M", k])],
                              [helper.make_tensor_value_info("Y", ONNX_TYPE[dtype], None)], inits)
    # an IR version onnxruntime 1.31 reads too (the GPU tier runs these models there)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def session(model: onnx.ModelProto, library: Path | None = None):  # noqa: ANN201
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if library is not None:
        so.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(sess, a: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """Run a [..., K] input through a graph declared [M, K]: the rows flattened, the shape restored."""
    y = sess.run(None, {"A": a.reshape(-1, a.shape[-1])})[0]
    return y.reshape(*a.shape[:-1], y.shape[-1])


# ---- the kernel against the float64 reference ----
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("zero_points", [True, False], ids=["zero_points", "no_zero_points"])
def test_matmul_int4_equals_the_dequantized_reference(cpu_library: Path, dtype: str, block: int,
                                                      zero_points: bool) -> None:
    rng = np.random.default_rng(block + 2 * zero_points + (dtype == "fp16"))
    n, k = 40, 384  # block 128: 3 blocks a row, an odd count (the last zero-point byte half used)
    w = nbits_weights(rng, n, k, block, zero_points, dtype)
    model = nbits_model(w, n, k, block, dtype)
    ours_model = onnx.ModelProto()
    ours_model.CopyFrom(model)
    report = rewrite_matmul_nbits(ours_model, "cpu")
    assert (report.rewritten, report.total) == (1, 1) and ours_model.graph.node[0].op_type == "MatMulInt4"
    ours, ort_own = session(ours_model, cpu_library), session(model)
    weight = dequantized(w, n, k, block)
    for shape in [(1, k), (5, k), (33, k), (2, 3, k)]:
        a = rng.standard_normal(shape).astype(NP_TYPE[dtype])
        ref = a.astype(np.float64) @ weight.T
        y = run(ours, a)
        assert y.dtype == NP_TYPE[dtype] and y.shape == (*shape[:-1], n)
        # float64 accumulation rounded once to the output type: within half a unit in the last place (fp16: one
        # unit, the double -> float -> half rounding)
        ulp = np.spacing(np.abs(ref).astype(NP_TYPE[dtype])).astype(np.float64)
        err = np.abs(y.astype(np.float64) - ref)
        assert np.all(err <= (0.5 if dtype == "fp32" else 1.0) * ulp + 1e-30), (shape, float(err.max()))
        # and onnxruntime's own MatMulNBits on the same graph agrees to its own rounding
        own = run(ort_own, a).astype(np.float64)
        assert np.abs(own - ref).max() <= (1e-5 if dtype == "fp32" else 2e-2) * np.abs(ref).max()


def test_kernel_errors_are_one_clear_line(cpu_library: Path) -> None:
    rng = np.random.default_rng(0)
    w = nbits_weights(rng, 16, 64, 32, True, "fp32")
    model = nbits_model(w, 16, 64, 32, "fp32")
    rewrite_matmul_nbits(model, "cpu")
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w["B"][:8], "B"))  # half of N's rows
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "K"  # onnxruntime lets any width through
    with pytest.raises(Exception, match=r"onnxpipe\.MatMulInt4: B \[8, 2, 16\] does not hold N x K/block_size x "
                                        r"block_size/2 = 16 x 2 x 16"):
        session(model, cpu_library).run(None, {"A": np.ones((2, 64), np.float32)})
    with pytest.raises(Exception, match=r"onnxpipe\.MatMulInt4: A \[2, 32\] must end in K = 64"):
        session(model, cpu_library).run(None, {"A": np.ones((2, 32), np.float32)})
    bad = nbits_model(w, 16, 64, 32, "fp32", block_size=48)
    rewrite_matmul_nbits(bad, "cpu")  # kept: block 48
    bad.graph.node[0].op_type, bad.graph.node[0].domain = "MatMulInt4", "onnxpipe"
    bad.opset_import.append(helper.make_opsetid("onnxpipe", 1))
    with pytest.raises(Exception, match=r"onnxpipe\.MatMulInt4: block_size=48 must be a power of 2"):
        session(bad, cpu_library)


# ---- the rewrite ----
def _nodes(variants: dict[str, dict]) -> onnx.ModelProto:
    """One MatMulNBits node per variant (attributes, inputs, zero-point type), over typed initializers."""
    inits = [numpy_helper.from_array(np.zeros(4, np.uint8), "B"),
             numpy_helper.from_array(np.zeros(4, np.float32), "s32"),
             numpy_helper.from_array(np.zeros(4, np.float16), "s16"),
             numpy_helper.from_array(np.zeros(4, np.uint8), "zp_u8"),
             numpy_helper.from_array(np.zeros(4, np.float32), "zp_f32")]
    nodes = []
    for name, v in variants.items():
        attrs = {"K": 256, "N": 64, "bits": 4, "block_size": 32, **v.get("attrs", {})}
        nodes.append(helper.make_node("MatMulNBits", v.get("inputs", ["A32", "B", "s32"]), [f"{name}_out"], name=name,
                                      domain="com.microsoft", **attrs))
    nodes.append(helper.make_node("MatMul", ["A32", "A32"], ["other"], name="plain"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A32", TensorProto.FLOAT, [1, 256]),
                                           helper.make_tensor_value_info("A16", TensorProto.FLOAT16, [1, 256])],
                              [helper.make_tensor_value_info("other", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


NEAR_MISSES = {
    "fine": ({}, None),
    "fine_zp": ({"inputs": ["A32", "B", "s32", "zp_u8"]}, None),
    "bits8": ({"attrs": {"bits": 8}}, "bits=8 (MatMulInt4 takes 4)"),
    "g_idx": ({"inputs": ["A32", "B", "s32", "", "g"]}, "it has a g_idx or bias input"),
    "bias": ({"inputs": ["A32", "B", "s32", "", "", "bias"]}, "it has a g_idx or bias input"),
    "block16": ({"attrs": {"block_size": 16}}, "block_size=16 (MatMulInt4 takes 32, 64, 128)"),
    "k_ragged": ({"attrs": {"K": 100}}, "K=100 is not a multiple of block_size=32"),
    "float_zp": ({"inputs": ["A32", "B", "s32", "zp_f32"]}, "its zero points are not packed uint8"),
    "zp_unknown": ({"inputs": ["A32", "B", "s32", "zp_computed"]}, "its zero points are not packed uint8 (type unknown)"),
}


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_rewrite_keeps_what_the_kernel_does_not_compute_and_says_why(target: str) -> None:
    model = _nodes({name: v for name, (v, _) in NEAR_MISSES.items()})
    report = rewrite_matmul_nbits(model, target)
    expected = {name: why for name, (_, why) in NEAR_MISSES.items() if why is not None}
    if target == "cuda":  # fp32 activations: the CUDA kernel takes float16 only
        expected.update(fine="its activations are float32 (the CUDA kernel takes float16)",
                        fine_zp="its activations are float32 (the CUDA kernel takes float16)")
    assert report.kept == expected
    assert report.total == len(NEAR_MISSES) and report.rewritten == len(NEAR_MISSES) - len(expected)
    ops = {n.name: (n.domain, n.op_type) for n in model.graph.node}
    for name in NEAR_MISSES:
        assert ops[name] == (("onnxpipe", "MatMulInt4") if name not in expected else ("com.microsoft", "MatMulNBits"))
    assert ops["plain"] == ("", "MatMul")
    assert any(o.domain == "onnxpipe" for o in model.opset_import) == (report.rewritten > 0)
    assert report.reasons().count("node") == len(set(expected.values()))


def test_rewrite_on_cuda_takes_float16_activations() -> None:
    model = _nodes({"half": {"inputs": ["A16", "B", "s16", "zp_u8"]}, "single": {}})
    report = rewrite_matmul_nbits(model, "cuda")
    assert (report.rewritten, report.total) == (1, 2)
    assert report.kept == {"single": "its activations are float32 (the CUDA kernel takes float16)"}
    assert [o.version for o in model.opset_import if o.domain == "onnxpipe"] == [1]
    assert report.line() == "onnxpipe MatMulInt4 on 1 of 2 MatMulNBits"


def test_rewritten_node_keeps_inputs_outputs_and_attributes() -> None:
    model = _nodes({"n": {"inputs": ["A16", "B", "s16", "zp_u8"], "attrs": {"accuracy_level": 4}}})
    before = onnx.NodeProto()
    before.CopyFrom(model.graph.node[0])
    rewrite_matmul_nbits(model, "cuda")
    after = model.graph.node[0]
    assert (after.domain, after.op_type) == ("onnxpipe", "MatMulInt4")
    assert list(after.input) == list(before.input) and list(after.output) == list(before.output)
    assert [a.SerializeToString() for a in after.attribute] == [a.SerializeToString() for a in before.attribute]


# ---- the mode and the plan ----
def test_kernels_mode_comes_from_the_argument_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONNXPIPE_KERNELS", raising=False)
    assert kernels_mode(None) == "off" and kernels_mode("Auto") == "auto"
    monkeypatch.setenv("ONNXPIPE_KERNELS", "on")
    assert kernels_mode(None) == "on" and kernels_mode("off") == "off"
    monkeypatch.setenv("ONNXPIPE_KERNELS", "fast")
    with pytest.raises(OnnxpipeError, match=r"^ONNXPIPE_KERNELS='fast': choose one of off, on, auto, reference$"):
        kernels_mode(None)
    with pytest.raises(OnnxpipeError, match=r"^kernels='yes': choose one of"):
        kernels_mode("yes")


class _Options:
    """Stands in for onnxruntime's SessionOptions: records the libraries registered."""

    def __init__(self) -> None:
        self.libraries: list[str] = []

    def register_custom_ops_library(self, path: str) -> None:
        self.libraries.append(path)


def test_a_provider_other_than_cuda_falls_back_with_auto_and_is_an_error_with_on() -> None:
    said: list[str] = []
    plan = plan_kernels("auto", ["cpu"], _Options())
    assert not plan.active and plan.library is None
    plan.finish(said.append)
    assert said == ["kernels: off (provider cpu is not CUDA)"]
    with pytest.raises(OnnxpipeError, match=r"^kernels=on: provider tensorrt is not CUDA \(kernels=auto runs"):
        plan_kernels("on", ["tensorrt", "cuda", "cpu"], _Options()).finish(said.append)
    with pytest.raises(OnnxpipeError, match=r"^kernels=reference: the reference kernels run on the CPU provider only"):
        plan_kernels("reference", ["cuda", "cpu"], _Options()).finish(said.append)
    assert plan_kernels("off", ["cuda"], _Options()).line() == "kernels: off (not asked for)"


def test_no_cuda_compiler_falls_back_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONNXPIPE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONNXPIPE_NVCC", str(tmp_path / "no-nvcc"))
    options, said = _Options(), []
    plan = plan_kernels("auto", ["cuda", "cpu"], options)
    model = _nodes({"half": {"inputs": ["A16", "B", "s16"]}})
    plan.edit(model)  # the build is tried once there is a node to rewrite
    assert options.libraries == [] and not plan.active and model.graph.node[0].op_type == "MatMulNBits"
    plan.finish(said.append)
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith(f"kernels: off (the compiler {tmp_path / 'no-nvcc'} (ONNXPIPE_NVCC) does not run")
    strict = plan_kernels("on", ["cuda", "cpu"], _Options())
    strict.edit(model)
    with pytest.raises(OnnxpipeError, match=r"^kernels=on: the compiler .*no-nvcc \(ONNXPIPE_NVCC\) does not run"):
        strict.finish(said.append)


def test_the_library_is_registered_once_and_only_for_a_graph_with_work(cpu_library: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    options = _Options()
    plan = plan_kernels("reference", ["cpu"], options)
    assert plan.active and plan.library is None and options.libraries == []
    for _ in range(2):  # the session may edit a graph twice (e.g. again on an fp32 copy): one registration
        model = _nodes({"fine": {}})
        plan.edit(model)
        assert model.graph.node[0].op_type == "MatMulInt4"
    assert plan.library == cpu_library and options.libraries == [str(cpu_library)]
    assert plan.line() == "kernels: onnxpipe MatMulInt4 on 1 of 1 MatMulNBits [CPU reference kernels]"
    # a graph with nothing to rewrite builds nothing: no compiler is needed to say so
    monkeypatch.setenv("ONNXPIPE_NVCC", str(tmp_path / "no-nvcc"))
    idle = plan_kernels("auto", ["cuda"], _Options())
    idle.edit(_nodes({"single": {}}))  # float32 activations: nothing for the CUDA kernel
    assert idle.library is None
    assert idle.line() == ("kernels: off (nothing to rewrite: its activations are float32 (the CUDA kernel takes "
                           "float16) (1 node))")


def test_nothing_to_rewrite_is_a_reason_to_fall_back(cpu_library: Path) -> None:
    plan = plan_kernels("reference", ["cpu"], _Options())
    model = _nodes({"bits8": {"attrs": {"bits": 8}}})
    plan.edit(model)
    assert plan.line() == "kernels: off (nothing to rewrite: bits=8 (MatMulInt4 takes 4) (1 node))"
    assert plan.library is None and model.graph.node[0].op_type == "MatMulNBits"
    with pytest.raises(OnnxpipeError, match=r"^kernels=reference: nothing to rewrite"):
        plan.finish(lambda _m: None)
    empty = KernelPlan("auto", target="cuda", library=cpu_library)
    empty.edit(helper.make_model(helper.make_graph([], "g", [], [])))
    assert empty.line() == "kernels: off (nothing to rewrite: the graph has no MatMulNBits and no gate/up pair to fuse)"
