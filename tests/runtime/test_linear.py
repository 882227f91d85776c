"""onnxpipe.Linear (Y = A @ W^T, W [N, K]) and the rewrite that feeds it a MatMul's weight through a Transpose that
onnxruntime folds at load (onnxpipe.runtime.kernels.linear): the CPU reference op against numpy, the rewrite's
choices and its folded graph, a tiny Llama through DecoderSession with the same tokens, and the CUDA GEMV's own
source (csrc/linear.cu) run under the host simulation of the int4 kernels' tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime.test_kernels import cpu_library, kernel_cache  # noqa: F401  (fixtures)
from runtime.test_kernels_session import assert_same_run

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.kernels.rewrite import rewrite_matmul_nbits
from onnxpipe.runtime.session import DecoderSession

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "onnxpipe" / "runtime" / "kernels" / "csrc" / "linear.cu"
SIM = Path(__file__).parent / "int4_gemm_sim"
K, N = 64, 48


def _model(rng: np.random.Generator, dtype: str = "fp32", tied: bool = False) -> onnx.ModelProto:
    """Y = A @ W and Z = A @ W (two MatMuls of one weight) and U = A @ V; ``tied``: W is also a Gather's table."""
    elem, np_type = (TensorProto.FLOAT, np.float32) if dtype == "fp32" else (TensorProto.FLOAT16, np.float16)
    w = rng.standard_normal((K, N)).astype(np_type)
    v = rng.standard_normal((K, 2 * N)).astype(np_type)
    nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm_y"),
             helper.make_node("MatMul", ["A", "W"], ["Z"], name="mm_z"),
             helper.make_node("MatMul", ["A", "V"], ["U"], name="mm_u")]
    inputs = [helper.make_tensor_value_info("A", elem, ["M", K])]
    outputs = [helper.make_tensor_value_info(name, elem, ["M", n]) for name, n in (("Y", N), ("Z", N), ("U", 2 * N))]
    if tied:
        nodes.append(helper.make_node("Gather", ["W", "ids"], ["G"], name="gather"))
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["I"]))
        outputs.append(helper.make_tensor_value_info("G", elem, ["I", N]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(w, "W"),
                                                             numpy_helper.from_array(v, "V")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _session(model: onnx.ModelProto, library: Path | None, optimized: Path | None = None):  # noqa: ANN202
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    if library is not None:
        so.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_matmuls_become_linear_of_a_folded_transpose(cpu_library: Path, tmp_path: Path, dtype: str) -> None:  # noqa: F811
    """Every MatMul by a weight becomes Linear; a weight two of them read is transposed once; onnxruntime folds the
    Transposes at load (its optimized graph holds Linear nodes and [N, K] weights only); the outputs are MatMul's."""
    rng = np.random.default_rng(1)
    model = _model(rng, dtype)
    ours = onnx.ModelProto()
    ours.CopyFrom(model)
    report = rewrite_matmul_nbits(ours, "cpu", linear=True)
    assert report.linear == 3 and report.line() == "onnxpipe 3 MatMul as Linear"
    assert [(n.domain, n.op_type) for n in ours.graph.node] == [
        ("", "Transpose"), ("onnxpipe", "Linear"), ("onnxpipe", "Linear"), ("", "Transpose"), ("onnxpipe", "Linear")]
    a = rng.standard_normal((5, K)).astype(np.float32 if dtype == "fp32" else np.float16)
    want = _session(model, None).run(None, {"A": a})
    got = _session(ours, cpu_library, tmp_path / "optimized.onnx").run(None, {"A": a})
    tol = 1e-5 if dtype == "fp32" else 2e-3
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.abs(g.astype(np.float64) - w).max() <= tol * np.abs(w.astype(np.float64)).max()
    folded = onnx.load(str(tmp_path / "optimized.onnx"))
    assert [n.op_type for n in folded.graph.node] == ["Linear"] * 3
    assert sorted(tuple(t.dims) for t in folded.graph.initializer) == [(N, K), (2 * N, K)]


def test_a_weight_read_elsewhere_stays_a_matmul_and_cuda_takes_float16_only() -> None:
    """A weight that a Gather also reads (tied embeddings) is not transposed (it would be held twice); the CUDA
    kernel takes float16 weights only, so a float32 graph has nothing for it."""
    rng = np.random.default_rng(2)
    tied = _model(rng, tied=True)
    report = rewrite_matmul_nbits(tied, "cpu", linear=True)
    assert report.linear == 1 and [n.op_type for n in tied.graph.node].count("MatMul") == 2
    assert rewrite_matmul_nbits(_model(rng), "cuda", linear=True, apply=False).linear == 0
    assert rewrite_matmul_nbits(_model(rng, "fp16"), "cuda", linear=True, apply=False).linear == 3
    assert rewrite_matmul_nbits(_model(rng, "fp16"), "cuda", apply=False).linear == 0  # off unless asked


@pytest.mark.parametrize("m", [1, 4, 7])
def test_linear_alone_against_numpy(cpu_library: Path, m: int) -> None:  # noqa: F811
    """The reference op on [..., K] inputs of any leading shape, float and float16, and its one-line errors."""
    import onnxruntime as ort

    rng = np.random.default_rng(m)
    for elem, np_type, tol in ((TensorProto.FLOAT, np.float32, 1e-6), (TensorProto.FLOAT16, np.float16, 1e-3)):
        graph = helper.make_graph([helper.make_node("Linear", ["A", "W"], ["Y"], domain="onnxpipe")], "g",
                                  [helper.make_tensor_value_info("A", elem, None),
                                   helper.make_tensor_value_info("W", elem, None)],
                                  [helper.make_tensor_value_info("Y", elem, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxpipe", 1)])
        model.ir_version = 8
        sess = _session(model, cpu_library)
        a = rng.standard_normal((2, m, K)).astype(np_type)
        w = rng.standard_normal((N, K)).astype(np_type)
        y = sess.run(None, {"A": a, "W": w})[0]
        want = a.astype(np.float64) @ w.astype(np.float64).T
        assert y.shape == (2, m, N) and y.dtype == np_type
        assert np.abs(y - want).max() <= tol * np.abs(want).max()
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                           match=r"onnxpipe\.Linear: A \[2, 1, 63\] must end in W's K = 64"):
            sess.run(None, {"A": a[:, :1, :63].copy(), "W": w})


def test_a_tiny_llama_through_the_session_keeps_its_tokens(byte_model: Callable[[str], Path], cpu_library: Path,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ONNXPIPE_KERNELS_LINEAR=on: each projection a Linear (the gate/up pairs' merged ones included) whose weight is an
    initializer in the graph onnxruntime runs (the Transpose folded at load), the line says how many, the greedy
    tokens are the plain run's and the logits within float rounding; a bad value is one line."""
    monkeypatch.delenv("ONNXPIPE_KERNELS_FUSE", raising=False)
    monkeypatch.setenv("ONNXPIPE_KERNELS_LINEAR", "on")
    import onnxruntime as ort

    said: list[str] = []
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")  # what onnxruntime runs: the Transposes folded
    ours = DecoderSession(byte_model("llama"), "cpu", announce=said.append, kernels="reference", session_options=so)
    plain = DecoderSession(byte_model("llama"), "cpu")
    ran = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    linears = [n for n in ran.graph.node if n.op_type == "Linear"]
    assert linears and all(n.input[1] in {t.name for t in ran.graph.initializer} for n in linears)
    assert not [n for n in ran.graph.node if n.op_type == "Transpose" and n.output[0].endswith("/linear_t")]
    line = [m for m in said if m.startswith("kernels:")]
    # two layers of q, k, v, o, the merged gate/up and down, and the LM head
    assert line == ["kernels: onnxpipe 2 gate/up pairs as one with SiluMul, 13 MatMul as Linear [CPU reference kernels]"]
    assert_same_run(ours, plain)
    monkeypatch.setenv("ONNXPIPE_KERNELS_LINEAR", "yes")
    with pytest.raises(OnnxpipeError, match=r"^ONNXPIPE_KERNELS_LINEAR='yes': choose on or off$"):
        DecoderSession(byte_model("llama"), "cpu", kernels="reference")


# ---- the CUDA GEMV's source under the host simulation ----

def simulated_source(text: str) -> str:
    """linear.cu's device code (up to its launcher) after kernel_common.cuh's, with the inline-PTX helpers and the
    shared arrays mapped to the simulation."""
    from runtime.test_int4_gemm_sim import COMMON, common_device_code

    start = text.index("namespace {") + len("namespace {")
    body = ("namespace {\n" + common_device_code(COMMON.read_text()) +
            text[start:text.index("template <int T, int MR>\ncudaError_t launch_linear(")])
    body, count = re.subn(r"extern __shared__ float4 linear_smem\[\];",
                          "float4* linear_smem = reinterpret_cast<float4*>(sim_smem());", body)
    assert count == 1, "linear.cu's GEMV shared memory changed: update simulated_source"
    body, count = re.subn(r"__shared__ float partial((?:\[[^\]]+\])+);",
                          lambda m: f"float (&partial){m.group(1)} = *reinterpret_cast<float (*){m.group(1)}>(sim_smem());",
                          body)
    assert count == 1, "linear.cu's mma shared memory changed: update simulated_source"
    return ((SIM / "prelude.h").read_text() + "\n" + body + "}  // namespace\n" +
            (SIM / "linear_harness.inc").read_text())


def _build(source_text: str, work: Path, name: str, opt: str = "-O1") -> Path:
    """The simulation of ``source_text`` compiled (a planted fault's copy at -O0: one case runs, compiling is most of
    the time)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    source = work / f"{name}.cpp"
    source.write_text(simulated_source(source_text))
    binary = work / name
    proc = subprocess.run([cxx, "-std=c++20", opt, "-pthread", "-w", str(source), "-o", str(binary)],
                          capture_output=True, text=True)
    if proc.returncode != 0 and ("<barrier>" in proc.stderr or "_Float16" in proc.stderr):
        pytest.skip(f"{cxx} lacks C++20 <barrier> or _Float16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return binary


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(SOURCE.read_text(), tmp_path_factory.mktemp("linear_sim"), "sim")


# the GEMV (form 1): (1, M, N, K, weight rows a warp, warps along K[, k staged a time]): M 1-4 and past (chunks of 4
# rows), N not a multiple of a block's rows, K not a multiple of 256 (a warp step), 1-8 warps along K, K in several
# slices (a ragged last one); the mma form (2): (2, M, N, K, 0, warps along K): M 5-33 (1, 2 and 4 tiles of 8 rows,
# ragged; past 32 a second chunk), N not a multiple of 16, K not a multiple of 32 (a warp step), 1-16 warps along K
CASES = [(1, 1, 40, 576, 1, 1), (1, 1, 33, 320, 2, 1), (1, 1, 70, 384, 4, 1), (1, 1, 21, 1416, 1, 2),
         (1, 1, 50, 168, 2, 4), (1, 1, 9, 2048, 1, 8), (1, 1, 37, 600, 2, 2, 128), (1, 1, 1, 8, 1, 1),
         (1, 2, 19, 448, 1, 1), (1, 3, 41, 96, 2, 2), (1, 4, 17, 640, 4, 1, 256), (1, 7, 24, 200, 1, 4, 64),
         (1, 1, 16, 4096, 1, 1, 1024),
         (2, 5, 40, 576, 0, 4), (2, 8, 33, 200, 0, 1), (2, 9, 24, 1416, 0, 16), (2, 16, 17, 96, 0, 2),
         (2, 20, 48, 328, 0, 8), (2, 32, 16, 64, 0, 4), (2, 33, 30, 104, 0, 2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ("gemv" if c[0] == 1 else "mma") + "-M{}-N{}-K{}-{}.{}".format(*c[1:])
                         + (f"-slice{c[6]}" if len(c) > 6 else ""))
def test_gemv_source_on_the_cpu(simulator: Path, case: tuple[int, ...]) -> None:
    proc = subprocess.run([str(simulator), *map(str, case)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith(" ok"), proc.stdout + proc.stderr
    assert "unwritten 0" in proc.stdout


def _fails_with(tmp_path: Path, right: str, old: str, new: str, case: list[str]) -> None:
    """The simulation of a copy of linear.cu whose line ``right`` has ``old`` as ``new`` fails ``case``."""
    text = SOURCE.read_text()
    assert text.count(right) == 1
    binary = _build(text.replace(right, right.replace(old, new)), tmp_path, "broken", "-O0")
    proc = subprocess.run([str(binary), *case], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout


def test_the_simulation_sees_a_misplaced_activation_unit(simulator: Path, tmp_path: Path) -> None:
    """A copy that reads a lane's second 4 k from the first unit's place fails: the check can fail."""
    _fails_with(tmp_path, "const float4 a1 = stage[j * (slice / 4) + 2 * cc + (1 ^ ((cc >> 2) & 1))];",
                "(1 ^ ((cc >> 2) & 1))", "((cc >> 2) & 1)", ["1", "1", "40", "576", "1", "1"])


def test_the_simulation_sees_an_mma_step_with_the_wrong_words(simulator: Path, tmp_path: Path) -> None:
    """A copy of the mma form whose second mma of a step takes the activations' first words fails."""
    _fails_with(tmp_path, "mma_16816(acc[j], cur[0].z, cur[1].z, cur[0].w, cur[1].w, x.z, x.w);", "x.z, x.w",
                "x.x, x.y", ["2", "8", "40", "576", "0", "4"])


@pytest.fixture(scope="module")
def gemv_library(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """linear.cu alone as a shared library (nvcc as onnxpipe.runtime.kernels.build finds it): its host side."""
    import ctypes

    from onnxpipe.runtime.kernels.build import KernelBuildError, find_nvcc

    try:
        nvcc = find_nvcc()
    except KernelBuildError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("linear") / "liblinear.so"
    # the library's own flags (-fvisibility=hidden): an entry point not exported is missing here as it would be there
    subprocess.run([str(nvcc.path), "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                    "-arch=sm_90", "-o", str(out), str(SOURCE)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(out))
    lib.onnxpipe_linear_gemv_config.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [
        ctypes.c_void_p]
    lib.onnxpipe_linear_mma_config.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [
        ctypes.c_void_p]
    lib.onnxpipe_linear_describe.argtypes = [ctypes.c_int] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_char_p, ctypes.c_int]
    return lib


def test_the_gemv_plan_covers_every_output_and_refuses_bad_calls(gemv_library) -> None:  # noqa: ANN001
    """The rule's layouts (132 SMs assumed without a GPU) cover N and M with no block wholly past them: the GEMV to
    M = 4 (at most 8 warps along K, 8192 staged activations: the whole K where it fits; a narrow projection gets warps
    along K, the LM head 4 rows a warp), the mma form past it (tiles of 8, 16, 32 A rows; 4-16 warps along K); bad
    shapes, pointers and layouts are codes before any launch."""
    import ctypes

    buf = ctypes.create_string_buffer(256)
    plan = re.compile(r"^linear: grid (\d+)x(\d+), (\d+) weight rows and (\d+) A rows a block, (\d+) weight rows a "
                      r"warp, (\d+) warps along K, K staged (\d+) at a time$")

    mma = re.compile(r"^linear mma: grid (\d+)x(\d+), 16 weight rows and (\d+) A rows a block, (\d+) warps along K$")

    def describe(m: int, n: int, k: int, tile: int = 0, split: int = 0) -> tuple[int, ...]:
        assert gemv_library.onnxpipe_linear_describe(1, tile, split, m, n, k, buf, len(buf)) == 0
        hit = plan.match(buf.value.decode())
        assert hit, buf.value
        return tuple(int(x) for x in hit.groups())

    for n, k in ((2048, 2048), (512, 2048), (3072, 2048), (16384, 2048), (2048, 8192), (128256, 2048), (14336, 4096),
                 (40, 8), (1, 4096)):
        for m in (1, 2, 3, 4, 5, 9):
            gx, gy, rows, a_rows, tile, split, staged = describe(m, n, k)
            assert rows == tile * 8 // split and tile in (1, 2, 4) and split in (1, 2, 4, 8)
            assert a_rows == (1 if m == 1 else 2 if m == 2 else 4) and gy * a_rows >= m > (gy - 1) * a_rows
            assert gx * rows >= n > (gx - 1) * rows
            assert staged % 8 == 0 and 0 < staged <= k and a_rows * staged <= 8192
            assert staged == k or a_rows * (staged + 8) > 8192
        for m in (1, 4, 5, 8, 9, 16, 17, 32, 33, 100):
            assert gemv_library.onnxpipe_linear_describe(0, 0, 0, m, n, k, buf, len(buf)) == 0
            if m <= 4:
                assert buf.value.startswith(b"linear: "), buf.value
                continue
            hit = mma.match(buf.value.decode())
            assert hit, buf.value
            gx, gy, a_rows, warps = (int(x) for x in hit.groups())
            assert a_rows == (8 if m <= 8 else 16 if m <= 16 else 32) and gy * a_rows >= m > (gy - 1) * a_rows
            assert gx * 16 >= n > (gx - 1) * 16 and warps in (4, 8, 16)
    assert describe(1, 512, 2048)[4:6] == (1, 8) and describe(1, 3072, 2048)[4:6] == (1, 1)
    assert describe(1, 128256, 2048)[4:6] == (4, 1)
    ok = 1 << 12
    call = gemv_library.onnxpipe_linear_gemv_config
    assert call(0, 0, ok, ok, ok, 1, 16, 12, None) == -1  # K not a multiple of 8
    assert call(0, 0, ok + 8, ok, ok, 1, 16, 64, None) == -2  # A not 16-byte aligned
    assert call(0, 0, None, ok, ok, 1, 16, 64, None) == -2
    assert call(3, 0, ok, ok, ok, 1, 16, 64, None) == -3 and call(0, 16, ok, ok, ok, 1, 16, 64, None) == -3
    assert call(0, 0, ok, ok, ok, 0, 16, 64, None) == 0  # M = 0: nothing to do
    mma_call = gemv_library.onnxpipe_linear_mma_config
    assert mma_call(3, ok, ok, ok, 8, 16, 64, None) == -3 and mma_call(0, ok, ok, ok, 8, 16, 60, None) == -1
    assert mma_call(0, ok + 4, ok, ok, 8, 16, 64, None) == -2


def test_check_linear_sums_a_step_and_suggests_only_clear_wins() -> None:
    """scripts/check_linear.py: a step's projections summed per M (16 layers of each 1B shape, the head once) only
    where every shape was timed; a layout suggested only where it is right and 5% under the rule."""
    from scripts_module import load_script

    cl = load_script("check_linear")
    rows = [{"name": nm, "m": 1, "ours_us": 2.0, "cublas_us": 3.0} for nm, *_ in cl.SHAPES["1b"] + cl.SHAPES["head"]]
    rows.append({"name": "qkv", "m": 8, "ours_us": 1.0, "cublas_us": 1.0})  # M = 8: the others missing
    (step,) = cl.step_sums(rows)
    assert step.startswith("step M=1: cuBLAS 195.0 us, ours 130.0 us (-65.0: ")  # (4 x 16 + 1) x 3 against x 2
    sweeps = [{"name": "o", "m": 1, "layout": ("rule", 0, 0), "us": 10.0, "ok": True, "plan": "linear: ..."},
              {"name": "o", "m": 1, "layout": ("gemv", 1, 2), "us": 9.0, "ok": True},
              {"name": "o", "m": 1, "layout": ("gemv", 4, 1), "us": 5.0, "ok": False},  # wrong: never suggested
              {"name": "down", "m": 8, "layout": ("rule", 0, 0), "us": 10.0, "ok": True, "plan": "p"},
              {"name": "down", "m": 8, "layout": ("mma", 1, 16), "us": 9.7, "ok": True}]  # under 5%: not a win
    assert cl.suggestions(sweeps) == ["o M=1: gemv tile 1 split 2 9.00 us against the rule's 10.00 (linear: ...)"]
