"""The CUDA build of the kernels library on a GPU (the `gpu` tier: `python -m pytest -m gpu
tests/runtime/test_kernels_cuda.py` on the GPU host; skipped with the reason elsewhere): MatMulInt4 against the
float64 dequantized reference and onnxruntime's own MatMulNBits on the CUDA EP, at decode M (the small-M kernel)
and prefill M (past 32: dequantize + cuBLAS, in slices of N), and inside a captured CUDA graph on both paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from runtime.test_kernels import dequantized, kernel_cache, nbits_model, nbits_weights  # noqa: F401  (fixture)

from onnxpipe.runtime.kernels import KernelBuildError, build_library
from onnxpipe.runtime.kernels.rewrite import rewrite_matmul_nbits

pytestmark = pytest.mark.gpu
CUDA = "CUDAExecutionProvider"


@pytest.fixture(scope="module")
def cuda_library(kernel_cache: Path) -> Path:  # noqa: F811
    from gpu.conftest import cuda_missing

    why = cuda_missing()
    if why:
        pytest.skip(why)
    try:
        return build_library("cuda")
    except KernelBuildError as e:
        if "no CUDA compiler" in str(e):
            pytest.skip(str(e))
        raise


def _session(model: onnx.ModelProto, library: Path | None, **cuda_options: str):  # noqa: ANN202
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if library is not None:
        so.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=[(CUDA, cuda_options)])
    assert sess.get_providers()[0] == CUDA
    return sess


def _pair(rng: np.random.Generator, n: int, k: int, block: int, zero_points: bool):  # noqa: ANN202
    w = nbits_weights(rng, n, k, block, zero_points, "fp16")
    model = nbits_model(w, n, k, block, "fp16")
    ours = onnx.ModelProto()
    ours.CopyFrom(model)
    assert rewrite_matmul_nbits(ours, "cuda").rewritten == 1
    return w, model, ours


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("zero_points", [True, False], ids=["zero_points", "no_zero_points"])
def test_cuda_matmul_int4_against_the_reference_and_onnxruntime(cuda_library: Path, block: int,
                                                                zero_points: bool) -> None:
    rng = np.random.default_rng(block + zero_points)
    n, k = 384, 1024
    w, model, ours_model = _pair(rng, n, k, block, zero_points)
    ours, theirs = _session(ours_model, cuda_library), _session(model, None)
    weight = dequantized(w, n, k, block)
    for m in (1, 5, 16, 32, 33, 64, 128, 2048):
        a = rng.standard_normal((m, k)).astype(np.float16)
        ref = a.astype(np.float64) @ weight.T
        y = ours.run(None, {"A": a})[0]
        own = theirs.run(None, {"A": a})[0]
        assert y.dtype == np.float16 and y.shape == (m, n) and np.isfinite(y).all()
        err, own_err = np.abs(y - ref).max(), np.abs(own.astype(np.float64) - ref).max()
        scale = np.abs(ref).max()
        # no worse than onnxruntime's own kernel on the same inputs (twice its error), and within fp16's reach
        assert err <= max(2 * own_err, 2e-3 * scale), (m, float(err), float(own_err), float(scale))


@pytest.mark.parametrize("m", [8, 64], ids=["small_m_kernel", "dequantize_cublas"])
def test_cuda_matmul_int4_inside_a_captured_cuda_graph(cuda_library: Path, m: int) -> None:
    """Bound buffers, CUDA graphs on: the first runs capture, later runs replay; each output is its own input's
    (at M = 64 the scratch from onnxruntime's allocator and the cuBLAS call are captured too)."""
    import onnxruntime as ort

    rng = np.random.default_rng(7)
    n, k = 256, 512
    w, _, ours_model = _pair(rng, n, k, 32, False)
    sess = _session(ours_model, cuda_library, enable_cuda_graph="1")
    weight = dequantized(w, n, k, 32)
    a_dev = ort.OrtValue.ortvalue_from_shape_and_type([m, k], np.float16, "cuda", 0)
    y_dev = ort.OrtValue.ortvalue_from_shape_and_type([m, n], np.float16, "cuda", 0)
    io = sess.io_binding()
    io.bind_ortvalue_input("A", a_dev)
    io.bind_ortvalue_output("Y", y_dev)
    for step in range(4):
        a = rng.standard_normal((m, k)).astype(np.float16)
        a_dev.update_inplace(a)
        sess.run_with_iobinding(io)
        ref = a.astype(np.float64) @ weight.T
        assert np.abs(y_dev.numpy() - ref).max() <= 2e-3 * np.abs(ref).max(), step


# (form, tile, split): each form's layouts, past the shapes the rule picks, so that a layout the table may name is
# right at every M: 1 warps, 2 cluster (row-tiled, activations staged in shared memory), 3 GEMV, 4 half2 GEMV
# (M <= 4 only: past it they re-read the weights per 4 rows, still right)
LAYOUTS = [(1, 1, 1), (1, 1, 16), (1, 2, 4), (2, 8, 1), (2, 8, 4), (2, 4, 8), (2, 1, 2), (2, 2, 1), (3, 1, 1), (3, 4, 2),
           (4, 1, 1), (4, 2, 1), (4, 4, 2), (4, 1, 8)]


@pytest.mark.parametrize("form,tile,split", LAYOUTS, ids=[f"form{f}-tile{t}-split{s}" for f, t, s in LAYOUTS])
def test_cuda_int4_gemm_every_layout_against_the_reference(cuda_library: Path, form: int, tile: int,
                                                           split: int) -> None:
    """The kernel called directly (ctypes, torch's stream) in a layout the call names, on a shape no layout divides:
    N = 400 (not a multiple of 128 rows), K = 1056 (8.25 k steps of 128: a cluster's slices and the staged steps end
    mid-step), M from 1 to 65 (A rows past a block's 8, 16, 32 or 64)."""
    import ctypes

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    lib = ctypes.CDLL(str(cuda_library))
    call = lib.onnxpipe_int4_gemm_config
    call.restype = ctypes.c_int
    call.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_void_p]
    lib.onnxpipe_int4_gemm_error.restype = ctypes.c_char_p
    rng = np.random.default_rng(form * 100 + tile * 10 + split)
    n, k, block = 400, 1056, 32
    w = nbits_weights(rng, n, k, block, True, "fp16")
    weight = dequantized(w, n, k, block)
    b = torch.from_numpy(w["B"]).cuda()
    s = torch.from_numpy(w["scales"].view(np.int16)).cuda()
    z = torch.from_numpy(w["zero_points"]).cuda()
    stream = torch.cuda.current_stream().cuda_stream
    for m in ((1, 2, 3, 4, 5) if form in (3, 4) else (1, 3, 8, 9, 16, 17, 32, 33, 64, 65)):
        a = rng.standard_normal((m, k)).astype(np.float16)
        a_dev = torch.from_numpy(a.view(np.int16)).cuda()
        y_dev = torch.full((m, n), -1, dtype=torch.int16, device="cuda")  # 0xFFFF: NaN wherever a write is missed
        code = call(form, tile, split, a_dev.data_ptr(), b.data_ptr(), s.data_ptr(), z.data_ptr(), y_dev.data_ptr(),
                    m, n, k, block, stream)
        assert code == 0, (m, lib.onnxpipe_int4_gemm_error(code).decode())
        torch.cuda.synchronize()
        y = y_dev.cpu().numpy().view(np.float16).astype(np.float64)
        ref = a.astype(np.float64) @ weight.T
        # fp32 accumulation of fp16 products, one fp16 rounding at the end (the half2 form: 8 products summed in
        # fp16 first, ~2x the error on the CPU simulation's cases): well inside 2e-3 of the largest output
        assert np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max(), (m, float(np.abs(y - ref).max()))


def test_cuda_gate_up_pair_as_one_matmul_and_silu_mul(cuda_library: Path) -> None:
    """The rewrite's gate/up fusion (gate_up.py) on the CUDA kernels: one MatMulInt4 of 2N rows and SiluMul give
    onnxruntime's five nodes' outputs (MatMulNBits, Sigmoid, Mul, Mul on the CUDA EP) at decode and prefill M."""
    from runtime.test_kernels_gate_up import _mlp

    rng = np.random.default_rng(11)
    model = _mlp(rng, False, "fp16")
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert rewrite_matmul_nbits(fused, "cuda", fuse=True).fused == 1
    ours, theirs = _session(fused, cuda_library), _session(model, None)
    for m in (1, 8, 32, 100):
        a = rng.standard_normal((m, 64)).astype(np.float16)
        y, want = ours.run(["Y"], {"A": a})[0], theirs.run(["Y"], {"A": a})[0].astype(np.float64)
        assert y.dtype == np.float16 and y.shape == want.shape and np.isfinite(y).all()
        assert np.abs(y - want).max() <= 4e-3 * np.abs(want).max(), m


def test_cuda_float16_gate_up_pair_as_one_matmul_and_silu_mul(cuda_library: Path) -> None:
    """A float16 model's gate and up MatMuls as one MatMul of [K, 2N] and SiluMul on the CUDA EP."""
    from runtime.test_kernels_gate_up import _float_mlp

    rng = np.random.default_rng(12)
    model = _float_mlp(rng, "fp16")
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert rewrite_matmul_nbits(fused, "cuda", fuse=True).fused == 1
    ours, theirs = _session(fused, cuda_library), _session(model, None)
    for m in (1, 32, 300):
        a = rng.standard_normal((m, 64)).astype(np.float16)
        y, want = ours.run(["Y"], {"A": a})[0], theirs.run(["Y"], {"A": a})[0].astype(np.float64)
        assert y.dtype == np.float16 and np.abs(y - want).max() <= 4e-3 * np.abs(want).max(), m


def _linear_pair(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, onnx.ModelProto, onnx.ModelProto]:
    """Y = A @ W (float16, W [K, N]) and its rewrite: Linear of the transposed weight."""
    from onnx import TensorProto, helper, numpy_helper

    w = (0.05 * rng.standard_normal((k, n))).astype(np.float16)
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], "g",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT16, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, ["M", n])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ours = onnx.ModelProto()
    ours.CopyFrom(model)
    assert rewrite_matmul_nbits(ours, "cuda", linear=True).linear == 1
    return w, model, ours


def test_cuda_linear_against_matmul_at_decode_and_prefill_m(cuda_library: Path) -> None:
    """onnxpipe.Linear on the CUDA EP (the Transpose folded at load): our GEMV at M 1-4, our mma form at 5-32, cuBLAS
    past it, against the float64 product and onnxruntime's MatMul; inside a captured CUDA graph too (M = 1, 8, 64)."""
    rng = np.random.default_rng(31)
    n, k = 400, 1056
    w, model, ours_model = _linear_pair(rng, n, k)
    ours, theirs = _session(ours_model, cuda_library), _session(model, None)
    # what the CUDA session runs: the Transpose folded into a [N, K] initializer, nothing transposed per run
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.register_custom_ops_library(str(cuda_library))
        ort.InferenceSession(ours_model.SerializeToString(), so, providers=[CUDA])
        ran = onnx.load(so.optimized_model_filepath)
    ops = [node.op_type for node in ran.graph.node]  # (the saved graph may hold the EP's Memcpy nodes too)
    assert ops.count("Linear") == 1 and "Transpose" not in ops, ops
    assert [tuple(t.dims) for t in ran.graph.initializer] == [(n, k)]
    for m in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 300):
        a = rng.standard_normal((m, k)).astype(np.float16)
        ref = a.astype(np.float64) @ w.astype(np.float64)
        y, own = ours.run(None, {"A": a})[0], theirs.run(None, {"A": a})[0]
        err, own_err = np.abs(y - ref).max(), np.abs(own.astype(np.float64) - ref).max()
        assert y.dtype == np.float16 and y.shape == (m, n)
        assert err <= max(2 * own_err, 2e-3 * np.abs(ref).max()), (m, float(err), float(own_err))
    for m in (1, 8, 64):
        sess = _session(ours_model, cuda_library, enable_cuda_graph="1")
        a_dev = ort.OrtValue.ortvalue_from_shape_and_type([m, k], np.float16, "cuda", 0)
        y_dev = ort.OrtValue.ortvalue_from_shape_and_type([m, n], np.float16, "cuda", 0)
        io = sess.io_binding()
        io.bind_ortvalue_input("A", a_dev)
        io.bind_ortvalue_output("Y", y_dev)
        for step in range(3):
            a = rng.standard_normal((m, k)).astype(np.float16)
            a_dev.update_inplace(a)
            sess.run_with_iobinding(io)
            ref = a.astype(np.float64) @ w.astype(np.float64)
            assert np.abs(y_dev.numpy() - ref).max() <= 2e-3 * np.abs(ref).max(), (m, step)


@pytest.mark.parametrize("tile,split", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 4), (1, 8)])
def test_cuda_linear_gemv_every_layout(cuda_library: Path, tile: int, split: int) -> None:
    """The GEMV called directly (ctypes, torch's stream) in a layout the call names: N = 400 (no layout divides it),
    K = 1056 (4.1 warp steps), M 1-5 (5: two chunks of A rows)."""
    import ctypes

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    lib = ctypes.CDLL(str(cuda_library))
    call = lib.onnxpipe_linear_gemv_config
    call.restype = ctypes.c_int
    call.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    rng = np.random.default_rng(tile * 10 + split)
    n, k = 400, 1056
    w = (0.05 * rng.standard_normal((n, k))).astype(np.float16)
    w_dev = torch.from_numpy(w.view(np.int16)).cuda()
    stream = torch.cuda.current_stream().cuda_stream
    for m in (1, 2, 3, 4, 5):
        a = rng.standard_normal((m, k)).astype(np.float16)
        a_dev = torch.from_numpy(a.view(np.int16)).cuda()
        y_dev = torch.full((m, n), -1, dtype=torch.int16, device="cuda")  # NaN wherever a write is missed
        assert call(tile, split, a_dev.data_ptr(), w_dev.data_ptr(), y_dev.data_ptr(), m, n, k, stream) == 0
        torch.cuda.synchronize()
        y = y_dev.cpu().numpy().view(np.float16).astype(np.float64)
        ref = a.astype(np.float64) @ w.astype(np.float64).T
        assert np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max(), (m, float(np.abs(y - ref).max()))


@pytest.mark.parametrize("split", [1, 2, 4, 8, 16])
def test_cuda_linear_mma_every_split(cuda_library: Path, split: int) -> None:
    """The mma form called directly with 1-16 warps along K: N = 400, K = 1056 (33 warp steps), M 5-40 (1, 2, 4
    tiles of 8 rows; 40: two chunks)."""
    import ctypes

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    lib = ctypes.CDLL(str(cuda_library))
    call = lib.onnxpipe_linear_mma_config
    call.restype = ctypes.c_int
    call.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    rng = np.random.default_rng(100 + split)
    n, k = 400, 1056
    w = (0.05 * rng.standard_normal((n, k))).astype(np.float16)
    w_dev = torch.from_numpy(w.view(np.int16)).cuda()
    stream = torch.cuda.current_stream().cuda_stream
    for m in (5, 8, 9, 16, 17, 32, 40):
        a = rng.standard_normal((m, k)).astype(np.float16)
        a_dev = torch.from_numpy(a.view(np.int16)).cuda()
        y_dev = torch.full((m, n), -1, dtype=torch.int16, device="cuda")
        assert call(split, a_dev.data_ptr(), w_dev.data_ptr(), y_dev.data_ptr(), m, n, k, stream) == 0
        torch.cuda.synchronize()
        y = y_dev.cpu().numpy().view(np.float16).astype(np.float64)
        ref = a.astype(np.float64) @ w.astype(np.float64).T
        assert np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max(), (m, float(np.abs(y - ref).max()))
