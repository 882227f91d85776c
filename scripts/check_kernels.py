#!/usr/bin/env python3
"""onnxpipe's int4 GEMM (onnxpipe.MatMulInt4 on CUDA) against onnxruntime's MatMulNBits: error and time, one GPU call.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/check_kernels.py --out $OUT/kernels [--trained FILE.npz] [--budget-s 240]
    python3 scripts/check_kernels.py --dry-run --out /tmp/kernels   # no GPU: builds, models, the plan, CPU checks

What it does, in order:
1. Builds the CUDA custom-op library (onnxpipe.runtime.kernels.build, or nvcc directly on csrc/ where that module
   cannot be imported) and a small library of the kernel alone (int4_gemm.cu) for a ctypes call under torch.
2. Random weights in the Llama-3.2-1B and Llama-3.1-8B projection shapes (N, K), block 32 and 128, with and without
   zero points, M in 1 ... 2048 (the LM head to M = 32; M = 64 ... 2048 are prefill shapes, where the custom op
   dequantizes into scratch and calls cuBLAS: the `path` column): one model per case holding C copies of the node (so that the
   weights read exceed the L2 cache, as in a decode step), for com.microsoft.MatMulNBits, onnxpipe.MatMulInt4, and
   an fp16 MatMul of the same weights. Each runs on the CUDA EP with IO binding inside a captured CUDA graph (one
   graph per M, onnxruntime's gpu_graph_id): the max abs error of the first copy against a float64 dequantized
   reference, the time per call (median run over C, less the run overhead of a one-node graph), ours twice to show
   the same bits, and our GB/s (packed weight, scales and zero points over the time). With torch on CUDA the kernel
   alone is also timed through ctypes in a torch CUDA graph of the same C calls (at every M: past 32 this is the
   small-M kernel the custom op no longer takes, timed beside the path it takes instead), and its output compared bit
   for bit with the custom op's where the op took it (M <= 32).
3. Trained weights (--trained: .npz files made by --save-trained, or Hugging Face directories with safetensors;
   default out/check_kernels/trained.npz where it exists (carry it to the GPU host), else models/llama-stdlib): each linear layer quantized to int4 by our quantizer
   (onnxpipe.quant.rtn_stream.quantize_block, which is onnxruntime's quantize_matmul_4bits) at block 32 and 128,
   with and without zero points, and fed random activations of the layer's real per-channel scale. --model DIR adds
   an existing int4 build's MatMulNBits weights as they are (fp16 scales: a GPU build), with unit-scale activations.
Prints one line per case as it goes, a short table last, writes results.json under --out, and exits 1 if any
error of ours exceeds 2x MatMulNBits' own error plus a slack of 2^-10 of the reference's largest magnitude, or ours
is not bit-identical across runs; 2 if the custom op could not be built or run (the reason in one line).
--budget-s stops starting new cases past that many seconds (the rest is reported as skipped).

--dry-run (no GPU needed): builds what it can (the libraries where a compiler is found; the CPU reference library
of onnxpipe.runtime.kernels), builds every model of the plan once at its smallest, checks the float64 reference
against onnxruntime's MatMulNBits on the CPU (and the CPU reference MatMulInt4 where built), and prints the plan.
For every prefill M of the plan it reads the library's large-M plan (path, slices, scratch), checks that the slices
tile N, and runs them through the numpy model of cublasGemmEx on a slice of N against MatMulNBits; the edge cases'
rows run at M = 128 and 2048 too (on the CPU reference op).

--save-trained FILE.npz (a CPU with torch and transformers): the float16 weights of SmolLM2-135M's first and last
layers (onnxpipe.reference, when installed) and of models/llama-stdlib, with each linear input's per-channel RMS
measured on data/eval.txt, for a GPU host that has neither (carry the file there).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "onnxpipe" / "runtime" / "kernels" / "csrc"

# (name, N, K) of each projection: Llama-3.2-1B (hidden 2048, kv 512, intermediate 8192, vocab 128256) and
# Llama-3.1-8B (4096, 1024, 14336). "1b qkv" is q, k and v packed into one MatMul (2048 + 512 + 512 rows), as
# `optimize --target cuda` makes them for GroupQueryAttention's packed input (head size a multiple of 16): the form
# scripts/bench_gpu.py's int4 build has.
SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "1b": [("1b qkv", 3072, 2048), ("1b q,o", 2048, 2048), ("1b k,v", 512, 2048), ("1b gate,up", 8192, 2048),
           ("1b down", 2048, 8192), ("1b gate+up", 16384, 2048)],
    "8b": [("8b q,o", 4096, 4096), ("8b k,v", 1024, 4096), ("8b gate,up", 14336, 4096), ("8b down", 4096, 14336)],
    "head": [("1b lm_head", 128256, 2048)],
    # ragged edges: N not a multiple of 16 or 32, K not a multiple of 128 (a k step only part used), every block
    "edge": [("edge", 200, 576), ("edge", 24, 160)],
}
EDGE_MS = (1, 3, 9, 17, 33, 100)
EDGE_BLOCKS = (32, 64, 128)
MS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)
PREFILL_MS = (128, 2048)  # the prefill shapes: the dry run's edge rows and model checks run these too
HEAD_MS = (1, 2, 4, 8, 16, 32)
TRAINED_MS = (1, 8, 32, 128)
TRAINED_NPZ = "out/check_kernels/trained.npz"  # --save-trained's default; --trained's when it exists
BLOCKS = (32, 128)
# scripts/bench_gpu.py's int4 build of the 1B shape (bench_gpu_builds.child_build_onnxpipe_int4: `quantize --mode int4
# --algo rtn --block-size 32 --symmetric --lm-head int4` on the `optimize --level 3 --target cuda` form): per layer
# qkv, o, gate, up and down, then the LM head, all block 32 without zero points. Timed first, swept, and summed into
# a step (BENCH_LAYERS layers) beside MatMulNBits'.
BENCH_VARIANT = (32, False)  # (block, zero points)
BENCH_NODES = {"1b qkv": 1, "1b q,o": 1, "1b gate,up": 2, "1b down": 1}  # MatMulNBits a layer of each shape
# what the kernels' rewrite makes of a layer's gate and up (one MatMulInt4 of 2N rows, runtime/kernels/gate_up.py):
# timed first and swept with the bench's shapes, not summed into the MatMulNBits step
FUSED_NODES = {"1b gate+up"}
BENCH_HEAD = "1b lm_head"
BENCH_LAYERS = 16


def bench_shapes(hidden: int, kv_dim: int, intermediate: int, vocab: int) -> tuple[dict[tuple[int, int], int],
                                                                                   tuple[int, int]]:
    """The (N, K) of each int4 MatMul of the bench's build of a Llama with these widths, with how many a layer
    has, and the LM head's: q, k and v packed, o, gate, up, down."""
    layer: dict[tuple[int, int], int] = {}
    for shape in ((hidden + 2 * kv_dim, hidden), (hidden, hidden), (intermediate, hidden), (intermediate, hidden),
                  (hidden, intermediate)):
        layer[shape] = layer.get(shape, 0) + 1
    return layer, (vocab, hidden)
COPY_BYTES = 160 << 20  # weights a timed model holds in all: past H100/H200's 50 MB L2, as a decode step's are
MAX_COPIES = 128
FORMS = {"warps": 1, "cluster": 2, "gemv": 3, "hgemv": 4}  # int4_gemm.h: ONNXPIPE_INT4_GEMM_WARPS, ... _HGEMV
# the largest M a form is timed at when the op does not take it there (the GEMV forms re-read the weights per 4 rows
# of A past that: correct, and never a layout to time)
FORM_MAX_M = {"gemv": 4, "hgemv": 4}
SLACK = 2.0 ** -10  # of the reference's largest magnitude: one fp16 rounding step near the top of the range

# -------------------------------------------------------------------------------------------------------------
# weights, the reference, models


@dataclass(frozen=True)
class Int4Weight:
    """MatMulNBits' inputs for one weight: packed [N, blocks, bs/2] uint8, scales [N, blocks] fp16, zero points
    [N, ceil(blocks/2)] uint8 or None (8)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block_size: int

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])

    @property
    def k(self) -> int:
        return int(self.packed.shape[1] * self.block_size)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)

    def rolled(self, shift: int) -> Int4Weight:
        """The same weight with its rows rotated: a distinct copy (no two initializers alike) of the same size."""
        if shift == 0:
            return self
        zp = None if self.zero_points is None else np.roll(self.zero_points, shift, axis=0)
        return Int4Weight(np.roll(self.packed, shift, axis=0), np.roll(self.scales, shift, axis=0), zp,
                          self.block_size)


def random_int4(rng: np.random.Generator, n: int, k: int, block_size: int, zero_points: bool) -> Int4Weight:
    blocks = k // block_size
    packed = rng.integers(0, 256, (n, blocks, block_size // 2), dtype=np.uint8)
    scales = rng.uniform(0.004, 0.02, (n, blocks)).astype(np.float16)  # a 1B model's weights: |w| ~ 0.02-0.1
    zp = rng.integers(0, 256, (n, (blocks + 1) // 2), dtype=np.uint8) if zero_points else None
    return Int4Weight(packed, scales, zp, block_size)


def dequantize(w: Int4Weight, rows: slice = slice(None)) -> np.ndarray:
    """W[n, k] = (q - zp) * scale as float32 [rows, K]: exact (an 11-bit scale times an integer below 16)."""
    packed = w.packed[rows]
    n, blocks, half = packed.shape
    q = np.empty((n, blocks, 2 * half), np.float32)
    q[..., 0::2] = packed & 0x0F  # even k: the low nibble
    q[..., 1::2] = packed >> 4
    if w.zero_points is None:
        zp = np.full((n, blocks), 8.0, np.float32)
    else:
        z = w.zero_points[rows]
        zp = np.empty((n, 2 * z.shape[1]), np.float32)
        zp[:, 0::2] = z & 0x0F  # block 2j: the low nibble
        zp[:, 1::2] = z >> 4
        zp = zp[:, :blocks]
    q -= zp[..., None]
    q *= w.scales[rows].astype(np.float32)[..., None]
    return q.reshape(n, blocks * 2 * half)


def reference(a: np.ndarray, w: Int4Weight, chunk: int = 8192) -> np.ndarray:
    """a [M, K] @ W^T in float64, W dequantized; N in chunks to bound the memory."""
    a64 = a.astype(np.float64)
    out = np.empty((a.shape[0], w.n), np.float64)
    for start in range(0, w.n, chunk):
        rows = slice(start, min(w.n, start + chunk))
        out[:, rows] = a64 @ dequantize(w, rows).astype(np.float64).T
    return out


# -------------------------------------------------------------------------------------------------------------
# the large-M path (csrc/int4_prefill.h) on the CPU: its plan from the library, a numpy model of cublasGemmEx

SMALL_M_MAX = 32  # int4_prefill.h: ONNXPIPE_INT4_SMALL_M_MAX (the custom op's path is read from the library)
CUBLAS_OP = {0: "N", 1: "T"}


@dataclass(frozen=True)
class GemmCall:
    """One slice of the large-M path as the library passes it: rows n0 .. n0 + rows of W dequantized into the
    scratch, then cublasGemmEx(transa, transb, m, n, k, 1, scratch, lda, A, ldb, 0, Y + c_offset, ldc)."""

    n0: int
    rows: int
    transa: int
    transb: int
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int
    c_offset: int


@dataclass(frozen=True)
class PrefillPlan:
    use_gemm: bool
    slice_rows: int
    slices: int
    scratch_bytes: int
    calls: tuple[GemmCall, ...]


def prefill_plan(lib: Any, m: int, n: int, k: int) -> PrefillPlan:
    """The custom-op library's own plan for an M x N x K call (onnxpipe_int4_prefill_plan / _gemm, exported by the
    CPU and CUDA builds alike); every slice's call, and the index past the last refused."""
    out = (ctypes.c_int64 * 11)()
    lib.onnxpipe_int4_prefill_plan(ctypes.c_int64(m), ctypes.c_int64(n), ctypes.c_int64(k), out)
    use, rows, slices, scratch = (int(x) for x in out[:4])
    calls = []
    for i in range(slices if use else 0):
        if lib.onnxpipe_int4_prefill_gemm(ctypes.c_int64(m), ctypes.c_int64(n), ctypes.c_int64(k), ctypes.c_int64(i),
                                          out) != 0:
            raise RuntimeError(f"onnxpipe_int4_prefill_gemm refused slice {i} of {slices}")
        calls.append(GemmCall(*(int(x) for x in out)))
    for bad in (-1, slices if use else 0):
        if lib.onnxpipe_int4_prefill_gemm(ctypes.c_int64(m), ctypes.c_int64(n), ctypes.c_int64(k), ctypes.c_int64(bad),
                                          out) != -1:
            raise RuntimeError(f"onnxpipe_int4_prefill_gemm took slice {bad}, outside a plan of {slices}")
    return PrefillPlan(bool(use), rows, slices, scratch, tuple(calls))


def column_major(flat: np.ndarray, offset: int, rows: int, cols: int, ld: int) -> np.ndarray:
    """The [rows, cols] column-major matrix with leading dimension ``ld`` that cuBLAS reads at ``flat[offset:]``, as
    a view; an ``ld`` below ``rows`` or an element past the buffer's end is an error (cuBLAS would read past it)."""
    if ld < max(1, rows):
        raise ValueError(f"leading dimension {ld} < rows {rows}")
    last = offset + (rows - 1) + (cols - 1) * ld
    if offset < 0 or last >= flat.size:
        raise ValueError(f"a {rows}x{cols} matrix (ld {ld}) at {offset} ends at {last}, past the buffer ({flat.size})")
    step = flat.itemsize
    return np.lib.stride_tricks.as_strided(flat[offset:], shape=(rows, cols), strides=(step, ld * step),
                                           writeable=flat.flags.writeable)


def gemm_ex_model(call: GemmCall, a_flat: np.ndarray, b_flat: np.ndarray, c_flat: np.ndarray,
                  writes: np.ndarray | None = None) -> None:
    """What cublasGemmEx computes, column-major: C[m, n] = op(A)[m, k] @ op(B)[k, n] (alpha 1, beta 0), with op T
    reading the stored [k, m] (or [n, k]) matrix transposed; C written at ``c_flat[call.c_offset:]`` in fp16 (the
    sums in float64: a model of the layout, not of cuBLAS's rounding). ``writes`` counts the writes per element."""
    op_a = column_major(a_flat, 0, call.k, call.m, call.lda).T if call.transa == 1 else \
        column_major(a_flat, 0, call.m, call.k, call.lda)
    op_b = column_major(b_flat, 0, call.n, call.k, call.ldb).T if call.transb == 1 else \
        column_major(b_flat, 0, call.k, call.n, call.ldb)
    c = column_major(c_flat, call.c_offset, call.m, call.n, call.ldc)
    c[...] = (op_a.astype(np.float64) @ op_b.astype(np.float64)).astype(c_flat.dtype)
    if writes is not None:
        column_major(writes, call.c_offset, call.m, call.n, call.ldc)[...] += 1


def prefill_model(plan: PrefillPlan, a: np.ndarray, w: Int4Weight,
                  call_edit: Callable[[GemmCall], GemmCall] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The large-M path run in numpy as the CUDA kernel runs it: per slice, W's rows dequantized to fp16 into a
    scratch of the plan's size, then the slice's cublasGemmEx (``call_edit`` may alter a call, to show the model
    notices). Returns Y [M, N] fp16 and how many times each element of Y was written."""
    m, k = a.shape
    scratch = np.zeros(plan.scratch_bytes // 2, np.float16)
    y = np.full(m * w.n, np.nan, np.float16)
    writes = np.zeros(m * w.n, np.int32)
    a_flat = np.ascontiguousarray(a, np.float16).reshape(-1)
    for call in plan.calls:
        if call.rows * k > scratch.size:
            raise ValueError(f"slice of {call.rows} rows x K={k} does not fit the scratch ({plan.scratch_bytes} bytes)")
        scratch[:call.rows * k] = dequantize(w, slice(call.n0, call.n0 + call.rows)).astype(np.float16).reshape(-1)
        gemm_ex_model(call_edit(call) if call_edit else call, scratch, a_flat, y, writes)
    return y.reshape(m, w.n), writes.reshape(m, w.n)


def quantize_weight(weight_nk: np.ndarray, block_size: int, symmetric: bool) -> tuple[Int4Weight, str]:
    """``weight_nk`` [N, K] (y = x W^T) quantized to int4 as onnxpipe's RTN does; returns the weight and which
    quantizer made it."""
    w_kn = np.ascontiguousarray(weight_nk.T.astype(np.float16))
    try:
        from onnxpipe.quant.rtn_stream import quantize_block

        packed, scales, zp = quantize_block(w_kn, block_size, symmetric)
        who = "onnxpipe.quant.rtn_stream.quantize_block"
    except Exception:  # noqa: BLE001 - e.g. onnx_ir missing on a bare GPU host: the kernel that function calls
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits

        rows, cols = w_kn.shape
        blocks = rows // block_size
        packed = np.zeros((cols, blocks, block_size // 2), np.uint8)
        zp = np.zeros((cols, (blocks + 1) // 2), np.uint8)
        scales = np.zeros((cols, blocks), np.float16)
        quantize_matmul_4bits(packed, w_kn, scales, zp, block_size, cols, rows, symmetric)
        who = "onnxruntime quantize_matmul_4bits (onnxpipe.quant not importable here)"
    return Int4Weight(packed, scales.astype(np.float16), None if symmetric else zp, block_size), who


def _onnx() -> Any:
    import onnx

    return onnx


def int4_node(op: str, a: str, w: Int4Weight, prefix: str, out: str, inits: list[Any]) -> Any:
    onnx = _onnx()
    from onnx import numpy_helper

    names = [a, f"{prefix}_Q4", f"{prefix}_scales"]
    inits += [numpy_helper.from_array(w.packed, names[1]), numpy_helper.from_array(w.scales, names[2])]
    if w.zero_points is not None:
        names.append(f"{prefix}_zero_points")
        inits.append(numpy_helper.from_array(w.zero_points, names[3]))
    domain = "com.microsoft" if op == "MatMulNBits" else "onnxpipe"
    return onnx.helper.make_node(op, names, [out], name=f"{prefix}/{op}", domain=domain, K=w.k, N=w.n, bits=4,
                                 block_size=w.block_size)


def model_bytes(nodes: list[Any], inits: list[Any], inputs: list[Any], outputs: list[Any], domain: str) -> bytes:
    onnx = _onnx()
    graph = onnx.helper.make_graph(nodes, "check_kernels", inputs, outputs, initializer=inits)
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid(domain, 1)]
    model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=9)
    return model.SerializeToString()


def copies_model(op: str, copies: list[Int4Weight]) -> bytes:
    """One input A [M, K] fp16, node i = op(A, copy i) -> Y{i} [M, N] fp16."""
    onnx = _onnx()
    fp16 = onnx.TensorProto.FLOAT16
    nodes: list[Any] = []
    inits: list[Any] = []
    outputs = []
    for i, w in enumerate(copies):
        nodes.append(int4_node(op, "A", w, f"w{i}", f"Y{i}", inits))
        outputs.append(onnx.helper.make_tensor_value_info(f"Y{i}", fp16, ["M", copies[0].n]))
    inputs = [onnx.helper.make_tensor_value_info("A", fp16, ["M", copies[0].k])]
    return model_bytes(nodes, inits, inputs, outputs, "com.microsoft" if op == "MatMulNBits" else "onnxpipe")


def fp16_model(weights_kn: list[np.ndarray]) -> bytes:
    onnx = _onnx()
    from onnx import numpy_helper

    fp16 = onnx.TensorProto.FLOAT16
    k, n = weights_kn[0].shape
    nodes, inits, outputs = [], [], []
    for i, w in enumerate(weights_kn):
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(onnx.helper.make_node("MatMul", ["A", f"W{i}"], [f"Y{i}"], name=f"w{i}/MatMul"))
        outputs.append(onnx.helper.make_tensor_value_info(f"Y{i}", fp16, ["M", n]))
    inputs = [onnx.helper.make_tensor_value_info("A", fp16, ["M", k])]
    graph = onnx.helper.make_graph(nodes, "check_kernels_fp16", inputs, outputs, initializer=inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


def overhead_model() -> bytes:
    onnx = _onnx()
    fp16 = onnx.TensorProto.FLOAT16
    node = onnx.helper.make_node("Add", ["A", "A"], ["Y0"], name="add")
    graph = onnx.helper.make_graph([node], "overhead", [onnx.helper.make_tensor_value_info("A", fp16, ["M", 8])],
                                   [onnx.helper.make_tensor_value_info("Y0", fp16, ["M", 8])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)],
                                  ir_version=9).SerializeToString()


def n_copies(bytes_per_copy: int, total: int = COPY_BYTES) -> int:
    return max(1, min(MAX_COPIES, -(-total // max(1, bytes_per_copy))))


# -------------------------------------------------------------------------------------------------------------
# building the libraries


def find_nvcc(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    try:
        from onnxpipe.runtime.kernels.build import find_nvcc as onnxpipe_find_nvcc

        return onnxpipe_find_nvcc().path
    except Exception:  # noqa: BLE001 - the module may be missing or find nothing: look where nvcc usually is
        pass
    for cand in [os.environ.get("CUDA_HOME", "") + "/bin/nvcc", shutil.which("nvcc") or "",
                 *sorted(Path("/usr/local").glob("cuda*/bin/nvcc"), reverse=True)]:
        if cand and Path(cand).is_file():
            return str(cand)
    return None


def cuda_archs(explicit: str | None) -> list[str]:
    if explicit:
        return [a.strip().replace(".", "") for a in explicit.split(",") if a.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
        caps = sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip()})
        if caps:
            return caps
    except (OSError, subprocess.SubprocessError):
        pass
    return ["80", "90"]


def nvcc_build(nvcc: str, sources: list[Path], out: Path, archs: list[str], defines: list[str]) -> None:
    """A shared library from ``sources`` with nvcc; raises RuntimeError with the compiler's first error line."""
    nvcc_root = Path(nvcc).resolve().parent.parent
    includes = [f"-I{p}" for p in (nvcc_root / "include", nvcc_root / "include" / "cccl") if p.is_dir()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    tmp = out.with_name(out.name + ".tmp")
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static", *gencode, *includes,
           *defines, *map(str, sources), "-ldl", "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()] or [proc.stderr]
        raise RuntimeError(f"{Path(nvcc).name} failed on {', '.join(s.name for s in sources)}: {lines[0].strip()}")
    os.replace(tmp, out)


@dataclass
class Libraries:
    ort_cuda: Path | None = None      # the custom-op library for onnxruntime's CUDA EP
    ort_cuda_how: str = ""
    kernel: Path | None = None        # int4_gemm.cu alone, for ctypes
    ort_cpu: Path | None = None       # the CPU reference custom-op library (dry run)
    notes: list[str] = field(default_factory=list)


def build_libraries(args: argparse.Namespace, work: Path, log: Callable[[str], None]) -> Libraries:
    libs = Libraries()
    nvcc = find_nvcc(args.nvcc)
    archs = cuda_archs(args.arch)
    if args.nvcc:
        os.environ.setdefault("ONNXPIPE_NVCC", args.nvcc)
    if args.arch:
        os.environ.setdefault("ONNXPIPE_CUDA_ARCH", args.arch)
    try:
        from onnxpipe.runtime.kernels.build import build_library

        libs.ort_cuda = build_library("cuda", announce=log)
        libs.ort_cuda_how = "onnxpipe.runtime.kernels.build"
    except Exception as e:  # noqa: BLE001 - say why, then build it here
        libs.notes.append(f"onnxpipe.runtime.kernels.build: {type(e).__name__}: {e}".splitlines()[0])
        if nvcc and (CSRC / "ops.cc").is_file():
            try:
                out = work / "libonnxpipe_kernels_cuda.so"
                nvcc_build(nvcc, [CSRC / "ops.cc", CSRC / "int4_gemm.cu", CSRC / "int4_dequant.cu"], out, archs,
                           ["-DONNXPIPE_CUDA"])
                libs.ort_cuda, libs.ort_cuda_how = out, f"nvcc directly ({nvcc})"
            except RuntimeError as e2:
                libs.notes.append(str(e2))
        elif not nvcc:
            libs.notes.append("no nvcc found (--nvcc, CUDA_HOME, PATH, /usr/local/cuda*)")
        else:
            libs.notes.append(f"{CSRC / 'ops.cc'} is missing: no custom-op library")
    if nvcc:
        try:
            out = work / "libonnxpipe_int4_gemm.so"
            nvcc_build(nvcc, [CSRC / "int4_gemm.cu"], out, archs, [])
            libs.kernel = out
        except RuntimeError as e:
            libs.notes.append(str(e))
    if args.dry_run:
        try:
            from onnxpipe.runtime.kernels.build import build_library

            libs.ort_cpu = build_library("cpu", announce=log)
        except Exception as e:  # noqa: BLE001
            libs.notes.append(f"CPU reference library: {type(e).__name__}: {e}".splitlines()[0])
    return libs


# -------------------------------------------------------------------------------------------------------------
# running on onnxruntime


class OrtRunner:
    """Sessions on one provider, fed and read through IO binding; CUDA graphs per M on CUDA."""

    def __init__(self, provider: str, custom_lib: Path | None, graphs: bool):
        import onnxruntime as ort

        self.ort = ort
        self.provider = provider
        self.custom_lib = custom_lib
        self.graphs = graphs and provider == "CUDAExecutionProvider"
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"

    def session(self, model: bytes, custom: bool, graphs: bool | None = None) -> Any:
        so = self.ort.SessionOptions()
        so.log_severity_level = 3
        if custom:
            if self.custom_lib is None:
                raise RuntimeError("no custom-op library")
            so.register_custom_ops_library(str(self.custom_lib))
        use_graphs = self.graphs if graphs is None else graphs
        if self.provider == "CUDAExecutionProvider":
            opts = {"enable_cuda_graph": "1" if use_graphs else "0"}
            providers: list[Any] = [(self.provider, opts)]
        else:
            providers = [self.provider]
        return self.ort.InferenceSession(model, so, providers=providers)

    def run_bound(self, sess: Any, a: np.ndarray, n: int, outputs: int, graph_id: int,
                  repeats: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """Bind A and the outputs on the device, run once untimed (twice with graphs: the run before capture and
        the capture), read the first output, then ``repeats`` timed runs (replays) and read it again; returns (first
        output after the untimed runs, after the timed ones, seconds of each timed run). A graph id is captured
        once with these buffers: each is bound here once."""
        ort = self.ort
        io = sess.io_binding()
        a_dev = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)
        outs = [ort.OrtValue.ortvalue_from_shape_and_type([a.shape[0], n], np.float16, self.device, 0)
                for _ in range(outputs)]
        io.bind_ortvalue_input("A", a_dev)
        for i, o in enumerate(outs):
            io.bind_ortvalue_output(f"Y{i}", o)
        ro = ort.RunOptions()
        if self.graphs:
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))
        for _ in range(2 if self.graphs else 1):
            sess.run_with_iobinding(io, ro)
        first = outs[0].numpy()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run_with_iobinding(io, ro)
            times.append(time.perf_counter() - t0)
        return first, outs[0].numpy(), times


class TorchKernel:
    """int4_gemm.cu called through ctypes on torch's CUDA stream, timed in a torch CUDA graph."""

    def __init__(self, lib: Path):
        import torch

        self.torch = torch
        self.config = (0, 0, 0)  # form (0: as the custom op resolves it), tile, split (0: chosen by shape)
        self.lib = ctypes.CDLL(str(lib))
        f = self.lib.onnxpipe_int4_gemm_config
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_void_p]
        self.lib.onnxpipe_int4_gemm_error.restype = ctypes.c_char_p
        self.lib.onnxpipe_int4_gemm_error.argtypes = [ctypes.c_int]
        d = self.lib.onnxpipe_int4_gemm_describe
        d.restype = ctypes.c_int
        d.argtypes = [ctypes.c_int] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_char_p, ctypes.c_int]

    def describe(self, form: int, m: int, n: int, k: int, tile: int = 0, split: int = 0) -> str:
        buf = ctypes.create_string_buffer(200)
        code = self.lib.onnxpipe_int4_gemm_describe(form, tile, split, m, n, k, buf, len(buf))
        return buf.value.decode() if code == 0 else self.lib.onnxpipe_int4_gemm_error(code).decode()

    def upload(self, w: Int4Weight) -> tuple[Any, Any, Any]:
        t = self.torch
        zp = None if w.zero_points is None else t.from_numpy(np.ascontiguousarray(w.zero_points)).cuda()
        return (t.from_numpy(np.ascontiguousarray(w.packed)).cuda(),
                t.from_numpy(np.ascontiguousarray(w.scales).view(np.int16)).cuda(), zp)

    def call(self, a: Any, w: tuple[Any, Any, Any], y: Any, m: int, n: int, k: int, block: int) -> None:
        stream = self.torch.cuda.current_stream().cuda_stream
        form, tile, split = self.config
        code = self.lib.onnxpipe_int4_gemm_config(form, tile, split, a.data_ptr(), w[0].data_ptr(), w[1].data_ptr(),
                                                  None if w[2] is None else w[2].data_ptr(), y.data_ptr(), m, n, k,
                                                  block, stream)
        if code != 0:
            raise RuntimeError(f"onnxpipe_int4_gemm returned {code}: {self.lib.onnxpipe_int4_gemm_error(code).decode()}")

    def run(self, a_np: np.ndarray, weights: list[tuple[Any, Any, Any]], n: int, k: int, block: int,
            repeats: int) -> tuple[np.ndarray, float]:
        """Y of the first weight (an eager call), and the time per call in a graph of one call per weight."""
        t = self.torch
        m = a_np.shape[0]
        a = t.from_numpy(np.ascontiguousarray(a_np).view(np.int16)).cuda()
        ys = [t.empty((m, n), dtype=t.int16, device="cuda") for _ in weights]
        self.call(a, weights[0], ys[0], m, n, k, block)
        t.cuda.synchronize()
        first = ys[0].cpu().numpy().view(np.float16)
        side = t.cuda.Stream()
        side.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(side):  # one eager pass off the default stream before capture, as torch asks
            for w, y in zip(weights, ys):
                self.call(a, w, y, m, n, k, block)
        t.cuda.current_stream().wait_stream(side)
        graph = t.cuda.CUDAGraph()
        with t.cuda.graph(graph):
            for w, y in zip(weights, ys):
                self.call(a, w, y, m, n, k, block)
        graph.replay()
        t.cuda.synchronize()
        start, end = t.cuda.Event(enable_timing=True), t.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        per_call = start.elapsed_time(end) / 1e3 / repeats / len(weights)
        graphed = ys[0].cpu().numpy().view(np.float16)
        if not np.array_equal(graphed.view(np.uint16), first.view(np.uint16)):
            raise RuntimeError("the kernel's output in a CUDA graph differs from its eager output")
        del graph, ys, a
        return first, per_call


# -------------------------------------------------------------------------------------------------------------
# the cases


@dataclass
class Row:
    """One (weight, M) result."""

    case: str
    n: int
    k: int
    block: int
    zero_points: bool
    m: int
    source: str = "random"
    ref_max: float = 0.0
    err_nbits: float | None = None
    err_ours: float | None = None
    err_fp16: float | None = None
    err_kernel: float | None = None      # the ctypes call (torch), the form the custom op uses
    err_other: float | None = None       # the ctypes calls, the other forms (the worst)
    ort_equals_kernel: bool | None = None
    deterministic: bool | None = None
    us_nbits: float | None = None
    us_ours: float | None = None
    us_fp16: float | None = None
    us_kernel: float | None = None
    us_other: float | None = None        # the fastest other form's (other_form)
    gbps_ours: float | None = None
    gbps_kernel: float | None = None
    gbps_other: float | None = None
    path: str = ""                       # the custom op's path at this M: "kernel" (M <= 32) or "cublas"
    form: str = ""                       # the form the custom op uses at this M, and how each form lays this call out
    other_form: str = ""
    plans: dict[str, str] = field(default_factory=dict)
    copies: int = 1
    ok: bool | None = None
    note: str = ""

    def judge(self) -> None:
        if self.err_ours is None or self.err_nbits is None:
            return
        limit = 2 * self.err_nbits + SLACK * self.ref_max + 1e-6
        self.ok = bool(self.err_ours <= limit and self.deterministic is not False and self.ort_equals_kernel
                       is not False and all(e is None or e <= limit for e in (self.err_kernel, self.err_other)))


def max_err(y: np.ndarray, ref: np.ndarray) -> float:
    d = np.abs(y.astype(np.float64) - ref)
    return float(np.nan_to_num(d, nan=np.inf).max()) if d.size else 0.0


def median_us(times: list[float], overhead_s: float, copies: int) -> float:
    return max(0.0, statistics.median(times) - overhead_s) / copies * 1e6


@dataclass
class Context:
    args: argparse.Namespace
    runner: Any  # OrtRunner on CUDA, or None (dry run)
    torch_kernel: TorchKernel | None
    overhead_s: float
    start: float
    copy_bytes: int = COPY_BYTES
    form: str = "warps"  # the forms onnxpipe_int4_gemm (the custom op) takes here, by M (for the log)
    plan_lib: Any = None  # the custom-op library through ctypes: its large-M plan (onnxpipe_int4_prefill_plan)
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # cases that raised before their rows were made
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    log: Callable[[str], None] = print

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.args.budget_s


def op_path(ctx: Context, m: int, n: int, k: int) -> str:
    """The custom op's path for an M x N x K call: from the library's own plan where it is loaded, else by the
    threshold this script knows (the row's note says so)."""
    if ctx.plan_lib is not None:
        plan = prefill_plan(ctx.plan_lib, m, n, k)
        return f"cublas/{plan.slices}" if plan.use_gemm else "kernel"
    return "cublas?" if m > SMALL_M_MAX else "kernel?"


def random_case(ctx: Context, name: str, n: int, k: int, block: int, with_zp: bool, ms: tuple[int, ...],
                fp16_done: set[str]) -> None:
    args = ctx.args
    rng = np.random.default_rng([n, k, block, int(with_zp)])
    w = random_int4(rng, n, k, block, with_zp)
    a_all = rng.standard_normal((max(ms), k)).astype(np.float16)
    ref = reference(a_all, w)
    copies = n_copies(w.nbytes, ctx.copy_bytes)
    weights = [w.rolled(i) for i in range(copies)]
    rows = {m: Row(name, n, k, block, with_zp, m, copies=copies, ref_max=float(np.abs(ref[:m]).max()),
                   path=op_path(ctx, m, n, k)) for m in ms}

    def fill_nbits(r: Row, got: np.ndarray, again: np.ndarray, times: list[float]) -> None:
        r.err_nbits = max_err(got, ref[:r.m])
        r.us_nbits = median_us(times, ctx.overhead_s, copies)

    ours_out: dict[int, np.ndarray] = {}

    def fill_ours(r: Row, got: np.ndarray, again: np.ndarray, times: list[float]) -> None:
        ours_out[r.m] = got
        r.err_ours = max_err(got, ref[:r.m])
        r.deterministic = bool(np.array_equal(got.view(np.uint16), again.view(np.uint16)))
        r.us_ours = median_us(times, ctx.overhead_s, copies)
        r.gbps_ours = w.nbytes / (r.us_ours * 1e-6) / 1e9 if r.us_ours else None

    ort_rows(ctx, "MatMulNBits", lambda: copies_model("MatMulNBits", weights), False, copies, n, rows, a_all,
             fill_nbits)
    ort_rows(ctx, "MatMulInt4", lambda: copies_model("MatMulInt4", weights), True, copies, n, rows, a_all,
             fill_ours)
    gc.collect()
    tk = ctx.torch_kernel
    if tk is not None:
        dev = [tk.upload(x) for x in weights]
        for m in ms:
            r = rows[m]
            # the op's own layout (form 0: the table, else the rule), then each other form by its rule
            r.plans["op"] = tk.describe(0, m, n, k)
            r.form = r.plans["op"].split(":")[0]
            runs = [("op", 0)] + [(f, code) for f, code in FORMS.items()
                                  if f != r.form and m <= FORM_MAX_M.get(f, m)]
            for form_name, form in runs:
                mine = form_name == "op"
                tk.config = (form, 0, 0)
                if not mine:
                    r.plans[form_name] = tk.describe(form, m, n, k)
                try:
                    y, per_call = tk.run(a_all[:m], dev, n, k, block, args.repeats)
                except Exception as e:  # noqa: BLE001 - on the row, and the next M goes on
                    r.note += f" {r.form if mine else form_name} via ctypes: {one_line(e)}"
                    if mine:
                        r.err_kernel = float("inf")
                    else:
                        r.err_other = float("inf")
                    continue
                err, us, gbps = max_err(y, ref[:m]), per_call * 1e6, (w.nbytes / per_call / 1e9 if per_call
                                                                      else None)
                if mine:
                    r.err_kernel, r.us_kernel, r.gbps_kernel = err, us, gbps
                    if m in ours_out and r.path.startswith("kernel"):  # past 32 the op multiplies with cuBLAS instead
                        r.ort_equals_kernel = bool(np.array_equal(y.view(np.uint16), ours_out[m].view(np.uint16)))
                else:  # every other form's error is judged (the worst kept); the fastest's time is kept
                    r.err_other = err if r.err_other is None else max(r.err_other, err)
                    if r.us_other is None or us < r.us_other:
                        r.us_other, r.gbps_other, r.other_form = us, gbps, form_name
        tk.config = (0, 0, 0)
        if args.sweep and is_bench_case(name, block, with_zp):
            limits = {m: 2 * r.err_nbits + SLACK * r.ref_max + 1e-6 for m, r in rows.items() if r.err_nbits is not None}
            sweep(ctx, tk, dev, name, n, k, block, a_all, ref, w.nbytes, limits)
        del dev
        tk.torch.cuda.empty_cache()
    if name not in fp16_done:  # the fp16 MatMul of the same weights: once per shape
        fp16_done.add(name)
        w16 = np.ascontiguousarray(dequantize(w).T.astype(np.float16))
        c16 = n_copies(w16.nbytes, ctx.copy_bytes)

        def fill_fp16(r: Row, got: np.ndarray, again: np.ndarray, times: list[float]) -> None:
            r.err_fp16 = max_err(got, ref[:r.m])
            r.us_fp16 = median_us(times, ctx.overhead_s, c16)

        ort_rows(ctx, "fp16 MatMul", lambda: fp16_model([w16 if i == 0 else np.roll(w16, i, axis=1)
                                                         for i in range(c16)]), False, c16, n, rows, a_all, fill_fp16)
        del w16
    for m in ms:
        rows[m].judge()
        ctx.rows.append(rows[m])
        ctx.log(line(rows[m]))


def is_bench_case(name: str, block: int, with_zp: bool) -> bool:
    """A shape and variant of scripts/bench_gpu.py's int4 build (timed first, and swept)."""
    return (name in BENCH_NODES or name in FUSED_NODES or name == BENCH_HEAD) and (block, with_zp) == BENCH_VARIANT


# (form, tile, split) tried by --sweep: the warps form's weight tiles x warps along K, the cluster form's warps
# along N x blocks along K, the GEMV forms' weight rows a warp x warps along K (at M = 1 only: FORM_MAX_M does not
# apply, a sweep times the M the form is for); ("default", 0, 0) first: the layout the custom op takes
# (int4_gemm.cu's table, else its rule), timed beside them
SWEEP = [("default", 0, 0)] + \
        [("warps", t, s) for t, s in ((1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (2, 1), (2, 2), (2, 4), (2, 8))] + \
        [("cluster", t, s) for t in (2, 4, 8) for s in (1, 2, 4, 8)] + \
        [(f, t, s) for f in ("gemv", "hgemv") for t, s in ((1, 1), (2, 1), (4, 1), (1, 2))]
SWEEP_MAX_M = {"gemv": 1, "hgemv": 1}
SWEEP_MS = (1, 8, 32)
# the M range a swept M stands for in a suggested table row: the A rows a block takes (8, 16, 32) are the same
# through it; M = 9-16 is not swept and stays with the rule
SWEEP_M_RANGE = {1: (1, 1), 8: (2, 8), 32: (17, 32)}
# a layout is suggested where it takes under this fraction of the default's time (run 28: the best within 3.1% of the
# rule for 11 of the 12 1B shape and M pairs, 15% under it for the 12th: rows for clear gains only)
SUGGEST_BELOW = 0.95


def sweep(ctx: Context, tk: TorchKernel, dev: list[Any], name: str, n: int, k: int, block: int, a_all: np.ndarray,
          ref: np.ndarray, nbytes: int, limits: dict[int, float]) -> None:
    """Each layout of SWEEP timed through ctypes on this case, for picking the defaults; ``limits``: the error
    allowed at each M (twice MatMulNBits' plus the slack)."""
    for m in SWEEP_MS:
        if m > a_all.shape[0]:
            continue
        limit = limits.get(m, SLACK * float(np.abs(ref[:m]).max()) * 4)
        for form_name, tile, split in SWEEP:
            if m > SWEEP_MAX_M.get(form_name, m):
                continue
            form = FORMS.get(form_name, 0)  # default: 0, as onnxpipe_int4_gemm resolves it (table, then rule)
            tk.config = (form, tile, split)
            entry: dict[str, Any] = {"case": name, "n": n, "k": k, "block": block, "m": m, "form": form_name,
                                     "tile": tile, "split": split, "plan": tk.describe(form, m, n, k, tile, split)}
            try:
                y, per_call = tk.run(a_all[:m], dev, n, k, block, ctx.args.repeats)
                entry.update(us=per_call * 1e6, gbps=nbytes / per_call / 1e9, err=max_err(y, ref[:m]))
                entry["ok"] = entry["err"] <= limit
            except Exception as e:  # noqa: BLE001
                entry.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", ok=None)
            ctx.sweeps.append(entry)
        done = [e for e in ctx.sweeps if e["case"] == name and e["m"] == m and e["block"] == block and e.get("us")]
        if done:
            best = min(done, key=lambda e: e["us"])
            default = next((e for e in done if e["form"] == "default"), None)
            ctx.log(f"sweep {name} bs={block} M={m}: best {best['form']} tile {best['tile']} split {best['split']} "
                    f"{best['us']:.2f} us ({best['plan']})"
                    + (f", default {default['us']:.2f} us ({default['plan']})" if default else "")
                    + f"; {sum(1 for e in done if not e['ok'])} wrong")
    tk.config = (0, 0, 0)


def suggest_layouts(sweeps: list[dict[str, Any]]) -> list[str]:
    """int4_gemm.cu kLayouts rows from a sweep: for each case, block and swept M, the fastest layout whose result
    was right, where it takes under SUGGEST_BELOW of the default layout's time (timed in the same sweep), as a row to
    paste with the figures it rests on. A shape where the default is best gets no row."""
    groups: dict[tuple[str, int, int, int, int], list[dict[str, Any]]] = {}
    for e in sweeps:
        groups.setdefault((e["case"], e["n"], e["k"], e["block"], e["m"]), []).append(e)
    out = []
    for (case, n, k, block, m), entries in groups.items():
        default = next((e for e in entries if e["form"] == "default" and e.get("us")), None)
        right = [e for e in entries if e.get("us") and e.get("ok") and e["form"] != "default"]
        if default is None or not right or m not in SWEEP_M_RANGE:
            continue
        best = min(right, key=lambda e: e["us"])
        if best["us"] >= SUGGEST_BELOW * default["us"]:
            continue
        lo, hi = SWEEP_M_RANGE[m]
        form = "ONNXPIPE_INT4_GEMM_" + best["form"].upper()
        out.append(f"{{{lo}, {hi}, {n}, {n}, {k}, {k}, {form}, {best['tile']}, {best['split']}}},  // {case} bs={block} "
                   f"M={m}: {best['us']:.2f} us against the default's {default['us']:.2f} ({default['plan']})")
    return out


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def ort_rows(ctx: Context, label: str, model: Callable[[], bytes], custom: bool, copies: int, n: int,
             rows: dict[int, Row], a_all: np.ndarray, fill: Callable[[Row, np.ndarray, np.ndarray, list[float]], None]
             ) -> None:
    """One session of ``model`` on the CUDA EP, each M of ``rows`` bound and run in its own CUDA graph; ``fill``
    records a run. A failure goes on the rows it touched (the session's: all of them) and the rest go on."""
    runner: OrtRunner = ctx.runner
    try:
        sess = runner.session(model(), custom=custom)
    except Exception as e:  # noqa: BLE001
        for r in rows.values():
            r.note += f" {label}: {one_line(e)}"
        return
    for gid, (m, r) in enumerate(rows.items()):
        try:
            got, again, times = runner.run_bound(sess, a_all[:m], n, copies, gid, ctx.args.repeats)
        except Exception as e:  # noqa: BLE001
            r.note += f" {label}: {one_line(e)}"
            continue
        fill(r, got, again, times)
    del sess
    gc.collect()


def line(r: Row) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    status = {True: "ok", False: "FAIL", None: "?"}[r.ok]
    return (f"{r.case:>14} {r.source:>8} N={r.n:<6} K={r.k:<5} bs={r.block:<3} zp={'y' if r.zero_points else 'n'} "
            f"M={r.m:<4} {r.path or '-':>9} err nbits {f(r.err_nbits, '.2e')} ours {f(r.err_ours, '.2e')} fp16 {f(r.err_fp16, '.2e')} | "
            f"us nbits {f(r.us_nbits, '.2f')} ours {f(r.us_ours, '.2f')} fp16 {f(r.us_fp16, '.2f')} | kernel "
            f"{r.form or '-'} {f(r.us_kernel, '.2f')} other {r.other_form or '-'} {f(r.us_other, '.2f')} us, err "
            f"{f(r.err_other, '.1e')} | "
            f"ours {f(r.gbps_ours, '.0f')} GB/s {status} {r.note}").rstrip()


# -------------------------------------------------------------------------------------------------------------
# trained weights


@dataclass
class Linear:
    name: str
    weight: np.ndarray      # [N, K] float (y = x W^T)
    act_rms: np.ndarray     # [K] the input's per-channel RMS (or the scale it is taken from)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (F32, F16, BF16) as float32, read with numpy alone."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    base = 8 + size
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        buf = raw[base + start: base + end]
        if meta["dtype"] == "F32":
            arr = np.frombuffer(buf, np.float32)
        elif meta["dtype"] == "F16":
            arr = np.frombuffer(buf, np.float16).astype(np.float32)
        elif meta["dtype"] == "BF16":
            arr = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            continue
        out[name] = arr.reshape(meta["shape"])
    return out


PROJ_INPUT = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
              "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}


def linears_from_hf_dir(path: Path, layers: list[int] | None) -> list[Linear]:
    """A Llama directory's projections; the input scale of q/k/v and gate/up is the RMSNorm weight before them (the
    normalized input has unit RMS), of o_proj and down_proj 1 (their real scale needs a forward pass: --save-trained)."""
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(read_safetensors(f))
    found = []
    for name, w in tensors.items():
        parts = name.split(".")
        if len(parts) < 6 or parts[-1] != "weight" or w.ndim != 2 or parts[-2] not in (*PROJ_INPUT, "o_proj",
                                                                                          "down_proj"):
            continue
        layer = int(parts[2])
        if layers is not None and layer not in layers:
            continue
        norm = PROJ_INPUT.get(parts[-2])
        scale = tensors.get(".".join(parts[:3] + [norm, "weight"])) if norm else None
        rms = np.abs(scale) if scale is not None else np.ones(w.shape[1], np.float32)
        found.append(Linear(f"{path.name}:{'.'.join(parts[2:-1])}", w.astype(np.float32), rms.astype(np.float32)))
    return found


def linears_from_npz(path: Path) -> list[Linear]:
    data = np.load(path)
    names = sorted({k[: -len(".weight")] for k in data.files if k.endswith(".weight")})
    return [Linear(nm, data[nm + ".weight"].astype(np.float32), data[nm + ".act_rms"].astype(np.float32))
            for nm in names]


def trained_case(ctx: Context, source: str, linears: list[Linear], block: int, symmetric: bool) -> None:
    """``linears`` quantized by our RTN at ``block``, then int4_case."""
    usable = [lin for lin in linears if lin.weight.shape[1] % block == 0]
    for lin in linears:
        if lin not in usable:
            ctx.skipped.append(f"{lin.name} bs={block}: K={lin.weight.shape[1]} is not a multiple of the block")
    quantized = []
    who = ""
    for lin in usable:
        w, who = quantize_weight(lin.weight, block, symmetric)
        quantized.append((lin.name, w, lin.act_rms))
    if quantized:
        int4_case(ctx, source, quantized, seed=block + int(symmetric), note=f"quantized by {who}")


def int4_case(ctx: Context, source: str, quantized: list[tuple[str, Int4Weight, np.ndarray]], seed: int,
              note: str) -> None:
    """Each (name, weight, input RMS) in one model per op (an input per node), M in TRAINED_MS, plain runs."""
    onnx = _onnx()
    fp16 = onnx.TensorProto.FLOAT16
    rng = np.random.default_rng(seed)
    acts = {m: [(rng.standard_normal((m, w.k)) * rms).astype(np.float16) for _, w, rms in quantized]
            for m in TRAINED_MS}

    def build(op: str) -> bytes:
        nodes: list[Any] = []
        inits: list[Any] = []
        inputs, outputs = [], []
        for i, (_, w, _) in enumerate(quantized):
            nodes.append(int4_node(op, f"A{i}", w, f"w{i}", f"Y{i}", inits))
            inputs.append(onnx.helper.make_tensor_value_info(f"A{i}", fp16, ["M", w.k]))
            outputs.append(onnx.helper.make_tensor_value_info(f"Y{i}", fp16, ["M", w.n]))
        return model_bytes(nodes, inits, inputs, outputs, "com.microsoft" if op == "MatMulNBits" else "onnxpipe")

    runner: OrtRunner = ctx.runner
    results: dict[str, dict[int, list[np.ndarray]]] = {}
    for op, custom in (("MatMulNBits", False), ("MatMulInt4", True)):
        try:
            sess = runner.session(build(op), custom=custom, graphs=False)
            results[op] = {m: sess.run(None, {f"A{i}": a for i, a in enumerate(acts[m])}) for m in TRAINED_MS}
            del sess
        except Exception as e:  # noqa: BLE001
            ctx.log(f"{source} {op}: {one_line(e)}")
    for i, (name, w, _) in enumerate(quantized):
        for m in TRAINED_MS:
            ref = reference(acts[m][i], w)
            r = Row(name, w.n, w.k, w.block_size, w.zero_points is not None, m, source=source,
                    ref_max=float(np.abs(ref).max()), note=note if i == 0 and m == TRAINED_MS[0] else "",
                    path=op_path(ctx, m, w.n, w.k))
            if "MatMulNBits" in results:
                r.err_nbits = max_err(results["MatMulNBits"][m][i], ref)
            if "MatMulInt4" in results:
                r.err_ours = max_err(results["MatMulInt4"][m][i], ref)
            r.judge()
            ctx.rows.append(r)
        ctx.log(line(ctx.rows[-1]))


def int4_build_weights(model_dir: Path, limit: int) -> list[tuple[str, Int4Weight, np.ndarray]]:
    """The first ``limit`` 4-bit MatMulNBits of an int4 build's model.onnx (block 32/64/128 dividing K, packed
    zero points or none) as they are, with unit input scale (an int4 build holds no activation statistics)."""
    onnx = _onnx()
    from onnx import numpy_helper

    path = model_dir / "model.onnx" if model_dir.is_dir() else model_dir
    model = onnx.load(str(path), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(out) >= limit:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        k, n, bs = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
        names = list(node.input) + [""] * 6
        if attrs.get("bits", 4) != 4 or bs not in (32, 64, 128) or k % bs or any(names[4:6]) \
                or names[1] not in inits or names[2] not in inits:
            continue
        blocks = k // bs
        packed = numpy_helper.to_array(inits[names[1]]).reshape(n, blocks, bs // 2)
        scales = numpy_helper.to_array(inits[names[2]])
        if scales.dtype != np.float16:
            continue  # the CUDA kernel takes fp16 scales (a build for the GPU)
        zp = None
        if names[3]:
            if names[3] not in inits or inits[names[3]].data_type != onnx.TensorProto.UINT8:
                continue
            zp = numpy_helper.to_array(inits[names[3]]).reshape(n, (blocks + 1) // 2)
        out.append((node.name or names[1], Int4Weight(packed, scales.reshape(n, blocks), zp, bs),
                    np.ones(k, np.float32)))
    return out


def trained_sources(args: argparse.Namespace) -> list[tuple[str, list[Linear]]]:
    out = []
    default = ROOT / TRAINED_NPZ
    for p in args.trained or [str(default if default.is_file() else ROOT / "models" / "llama-stdlib")]:
        path = Path(p)
        if path.suffix == ".npz":
            out.append((path.stem, linears_from_npz(path)))
        elif path.is_dir():
            out.append((path.name, linears_from_hf_dir(path, None)))
        else:
            raise SystemExit(f"--trained {p}: neither an .npz file nor a directory")
    return out


def save_trained(path: Path, log: Callable[[str], None]) -> None:
    """SmolLM2-135M's first and last layers (when installed) and models/llama-stdlib: fp16 weights + input RMS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sources = [("llama-stdlib", ROOT / "models" / "llama-stdlib", None)]
    try:
        from onnxpipe.reference import smollm2_hf_dir

        sources.append(("smollm2", smollm2_hf_dir(log=log), [0, 29]))
    except Exception as e:  # noqa: BLE001
        log(f"SmolLM2 not available here ({type(e).__name__}: {e}); llama-stdlib only")
    text = (ROOT / "data" / "eval.txt").read_text(encoding="utf-8")[:20000]
    arrays: dict[str, np.ndarray] = {}
    for label, hf_dir, layers in sources:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(hf_dir)
        ids = tok(text, return_tensors="pt").input_ids[:, :256]  # llama-stdlib was trained on 256
        sums: dict[str, Any] = {}
        hooks = []
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or "layers." not in name:
                continue
            layer = int(name.split("layers.")[1].split(".")[0])
            if layers is not None and layer not in layers:
                continue

            def hook(_m: Any, inp: Any, _out: Any, name: str = name, sums: dict[str, Any] = sums) -> None:
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                sums[name] = (x.pow(2).mean(0).sqrt()).float().numpy()

            hooks.append(mod.register_forward_hook(hook))
            arrays[f"{label}:{name.split('layers.')[1]}.weight"] = mod.weight.detach().numpy().astype(np.float16)
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        for name, rms in sums.items():
            arrays[f"{label}:{name.split('layers.')[1]}.act_rms"] = rms
        log(f"{label}: {len(sums)} linear layers, activations of {ids.shape[1]} tokens of data/eval.txt")
        del model
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(arrays) // 2} weights)")


# -------------------------------------------------------------------------------------------------------------
# the dry run: everything that needs no GPU


def check_prefill(lib: Any, runner: OrtRunner, name: str, n: int, k: int, block: int, with_zp: bool,
                  ms: tuple[int, ...], log: Callable[[str], None]) -> bool:
    """The library's large-M plan at each M of a case past 32: the slices tile N within the scratch; then, at the
    first such M on the first 256 rows of N, the calls run through the numpy model of cublasGemmEx against
    onnxruntime's MatMulNBits on the CPU (within 2^-9 of the largest output, every output written once)."""
    prefill = [m for m in ms if m > SMALL_M_MAX]
    if not prefill:
        return True
    problems = []
    described = []
    for m in prefill:
        plan = prefill_plan(lib, m, n, k)
        rows = [c.rows for c in plan.calls]
        if not plan.use_gemm or sum(rows) != n or plan.scratch_bytes < max(rows) * k * 2 or \
                plan.scratch_bytes > max(64 << 20, 2 * k):
            problems.append(f"M={m}: {plan.slices} slices of {plan.slice_rows} rows, {plan.scratch_bytes} bytes")
        described.append(f"M={m} {plan.slices} slice{'s' if plan.slices > 1 else ''} of {plan.slice_rows} rows, "
                         f"{plan.scratch_bytes / (1 << 20):.1f} MiB scratch")
    n_small, m = min(n, 256), min(prefill[0], 128) if prefill[0] > 128 else prefill[0]
    rng = np.random.default_rng([n, k, block, int(with_zp), m])
    w = random_int4(rng, n_small, k, block, with_zp)
    a = rng.standard_normal((m, k)).astype(np.float16)
    y, writes = prefill_model(prefill_plan(lib, m, n_small, k), a, w)
    own = runner.session(copies_model("MatMulNBits", [w]), custom=False, graphs=False).run(None, {"A": a})[0]
    top = float(np.abs(reference(a, w)).max())
    err = max_err(y, own.astype(np.float64))
    if err > 2.0 ** -9 * top or not (writes == 1).all():
        problems.append(f"the cuBLAS model at M={m}, N={n_small}: {err:.2e} from MatMulNBits (of {top:.2e}), "
                        f"{int((writes != 1).sum())} outputs not written once")
    log(f"prefill {name:>14} N={n:<6} K={k:<5} bs={block:<3} zp={'y' if with_zp else 'n'}: dequantize + cuBLAS at "
        + "; ".join(described) + f" | the cuBLAS model at M={m}, N={n_small} vs MatMulNBits {err:.2e} "
        + ("ok" if not problems else "FAIL: " + "; ".join(problems)))
    return not problems


def layout_table(lib_path: Path) -> list[tuple[int, ...]]:
    """int4_gemm.cu's kLayouts, read back from a build of it (onnxpipe_int4_gemm_layout)."""
    lib = ctypes.CDLL(str(lib_path))
    lib.onnxpipe_int4_gemm_layout.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    out, rows = (ctypes.c_int * 9)(), []
    while lib.onnxpipe_int4_gemm_layout(len(rows), out) == 0:
        rows.append(tuple(out))
    return rows


def launcher_layouts(lib_path: Path, shapes: list[tuple[str, int, int]], ms: tuple[int, ...]
                     ) -> tuple[list[str], list[str]]:
    """The layout onnxpipe_int4_gemm takes for each shape and M here (without a GPU: as on a 132-SM sm_90) and
    whether the layout table or the rule gave it; and what is wrong with the table: an entry whose layout the
    launcher refuses, an empty range, an M past the small-M kernel's, an entry no call reaches (an earlier one
    holds its whole range)."""
    lib = ctypes.CDLL(str(lib_path))
    lib.onnxpipe_int4_gemm_describe.argtypes = [ctypes.c_int] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_char_p,
                                                                                            ctypes.c_int]
    lib.onnxpipe_int4_gemm_layout_for.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 3
    buf = ctypes.create_string_buffer(256)
    lines, problems = [], []
    entries = layout_table(lib_path)
    for i, (m0, m1, n0, n1, k0, k1, form, tile, split) in enumerate(entries):
        if not (1 <= m0 <= m1 <= SMALL_M_MAX and 1 <= n0 <= n1 and 1 <= k0 <= k1):
            problems.append(f"kLayouts[{i}]: ranges M {m0}-{m1}, N {n0}-{n1}, K {k0}-{k1}")
        elif lib.onnxpipe_int4_gemm_describe(form, tile, split, m0, n0, k0, buf, len(buf)) != 0:
            problems.append(f"kLayouts[{i}]: the launcher refuses form {form} tile {tile} split {split}")
        elif lib.onnxpipe_int4_gemm_layout_for(form, m0, n0, k0) != i:
            problems.append(f"kLayouts[{i}]: an earlier entry takes M {m0}, N {n0}, K {k0}")
    for name, n, k in shapes:
        for m in ms:
            lib.onnxpipe_int4_gemm_describe(0, 0, 0, m, n, k, buf, len(buf))
            entry = lib.onnxpipe_int4_gemm_layout_for(0, m, n, k)
            lines.append(f"layout {name:>14} N={n:<6} K={k:<5} M={m:<3} {buf.value.decode()} "
                         f"({f'kLayouts[{entry}]' if entry >= 0 else 'the rule'})")
    return lines, problems


def dry_run(args: argparse.Namespace, libs: Libraries, plan: list[tuple[str, int, int, int, bool, tuple[int, ...]]],
            log: Callable[[str], None]) -> int:
    """Every case's models built at their smallest; the reference checked against onnxruntime's MatMulNBits (and
    the CPU reference MatMulInt4 where built) on the CPU, at a small M, on a slice of N."""
    runner = OrtRunner("CPUExecutionProvider", libs.ort_cpu, graphs=False)
    bad = 0
    for name, n, k, block, with_zp, ms in plan:
        n_small = min(n, 256)  # the layout is the same for every row: a slice of N keeps the CPU run short
        rng = np.random.default_rng([n, k, block, int(with_zp)])
        w = random_int4(rng, n_small, k, block, with_zp)
        a = rng.standard_normal((4, k)).astype(np.float16)
        ref = reference(a, w)
        copies = n_copies(random_int4(rng, 1, k, block, with_zp).nbytes * n)
        errs = {}
        for op, custom in (("MatMulNBits", False), ("MatMulInt4", True)):
            if custom and libs.ort_cpu is None:
                continue
            sess = runner.session(copies_model(op, [w]), custom=custom, graphs=False)
            errs[op] = max_err(sess.run(None, {"A": a})[0], ref)
        tol = SLACK * float(np.abs(ref).max()) * 4
        ok = all(e <= tol for e in errs.values())
        bad += not ok
        log(f"plan {name:>14} N={n:<6} K={k:<5} bs={block:<3} zp={'y' if with_zp else 'n'} M={','.join(map(str, ms))} "
            f"copies {copies} ({copies * w.nbytes * n // n_small / 1e6:.0f} MB) | CPU, N={n_small}, M=4: reference vs "
            + ", ".join(f"{op} {e:.2e}" for op, e in errs.items()) + f" (tolerance {tol:.1e}) {'ok' if ok else 'FAIL'}")
    for source, linears in trained_sources(args):
        ks = sorted({lin.weight.shape[1] for lin in linears})
        log(f"trained {source}: {len(linears)} linear layers, K in {ks}, blocks {BLOCKS}, zero points y/n, "
            f"M {TRAINED_MS}")
    if libs.kernel is not None:  # the launcher's layout for every planned shape at the swept M, and the table's health
        shapes = list(dict.fromkeys((name, n, k) for name, n, k, *_ in plan))
        lines, problems = launcher_layouts(libs.kernel, shapes, SWEEP_MS)
        for ln in lines:
            log(ln)
        for problem in problems:
            log(f"layout table: {problem} FAIL")
        bad += len(problems)
    else:
        log("no kernel library (no nvcc): the launcher's layouts are not read here")
    if libs.ort_cpu is None:
        log("no CPU reference library: the cases' code is not run here")
        return 1 if bad else 0
    # the large-M path's plan and its cuBLAS calls in numpy, every case at its prefill M
    plan_lib = ctypes.CDLL(str(libs.ort_cpu))
    for name, n, k, block, with_zp, ms in plan:
        bad += not check_prefill(plan_lib, runner, name, n, k, block, with_zp, ms, log)
    # the cases' own code on the CPU reference MatMulInt4 (no graphs, 1 copy): the edge shapes (at prefill M too,
    # the rows' path from the library's plan) and trained weights
    quick = argparse.Namespace(**{**vars(args), "repeats": 2})  # CPU times mean nothing: the rows' code is the point
    ctx = Context(quick, runner, None, 0.0, time.perf_counter(), copy_bytes=1, log=log, plan_lib=plan_lib)
    fp16_done: set[str] = set()
    for name, n, k in SHAPES["edge"]:
        for block in EDGE_BLOCKS:
            if k % block == 0:
                for with_zp in (True, False):
                    random_case(ctx, name, n, k, block, with_zp, EDGE_MS[:3] + PREFILL_MS, fp16_done)
    for source, linears in trained_sources(args):
        for block in BLOCKS:
            trained_case(ctx, source, linears[:6], block, symmetric=block == 128)
    for model_dir in args.model or []:
        int4_case(ctx, Path(model_dir).name, int4_build_weights(Path(model_dir), 4), seed=0, note=f"from {model_dir}")
    failed = [r for r in ctx.rows if r.ok is not True]
    log(f"CPU reference MatMulInt4 on the cases' code: {len(ctx.rows)} rows, {len(failed)} not ok"
        + (f" (first: {line(failed[0])})" if failed else ""))
    return 1 if bad or failed else 0


# -------------------------------------------------------------------------------------------------------------


def build_plan(args: argparse.Namespace) -> list[tuple[str, int, int, int, bool, tuple[int, ...]]]:
    plan = []
    for group in args.shapes.split(","):
        for name, n, k in SHAPES[group]:
            for block in EDGE_BLOCKS if group == "edge" else args.blocks:
                if k % block:
                    continue
                for with_zp in (True, False):
                    ms = EDGE_MS if group == "edge" else tuple(m for m in args.ms if group != "head" or m in HEAD_MS)
                    plan.append((name, n, k, block, with_zp, ms))
    return plan


def table(rows: list[Row], block: int = 128, zero_points: bool = True) -> list[str]:
    """Per case and M of one variant (default block 128 with zero points, the usual GPU int4 build; the bench's
    is BENCH_VARIANT; the others in the JSON): times, ours against MatMulNBits and fp16, and the worst error ratio of
    the case over every variant."""
    out = ["| case | M | ours' path | MatMulNBits us | ours us | fp16 us | ours/nbits | ours/fp16 | ours GB/s | "
           "kernel (the op's form) us | fastest other form us | worst err ours/nbits |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    worst: dict[tuple[str, int], float] = {}
    for r in rows:
        if r.err_ours is not None and r.err_nbits:
            key = (r.case, r.m)
            worst[key] = max(worst.get(key, 0.0), r.err_ours / r.err_nbits)
    fp16 = {(r.case, r.m): r.us_fp16 for r in rows if r.us_fp16 is not None}
    for r in rows:
        if r.source != "random" or r.block != block or r.zero_points != zero_points:
            continue

        def f(x: float | None, fmt: str = ".2f") -> str:
            return "-" if x is None else format(x, fmt)

        t16 = fp16.get((r.case, r.m))
        ratio = r.us_ours / r.us_nbits if r.us_ours and r.us_nbits else None
        vs16 = r.us_ours / t16 if r.us_ours and t16 else None
        out.append(f"| {r.case} | {r.m} | {r.path or '-'} | {f(r.us_nbits)} | {f(r.us_ours)} | {f(t16)} | {f(ratio)} | {f(vs16)} | "
                   f"{f(r.gbps_ours, '.0f')} | {r.form or '-'} {f(r.us_kernel)} | {r.other_form or '-'} "
                   f"{f(r.us_other)} | {f(worst.get((r.case, r.m)))} |")
    return out


def bench_step(rows: list[Row]) -> list[str]:
    """The int4 MatMuls of scripts/bench_gpu.py's 1B build summed into one decode step at each M (BENCH_LAYERS
    layers of BENCH_NODES, then the LM head), MatMulNBits against ours (the custom op, in onnxruntime's CUDA graphs):
    what the GEMMs alone add to or take from the bench's step, shape by shape."""
    at = {(r.case, r.m): r for r in rows if r.source == "random" and (r.block, r.zero_points) == BENCH_VARIANT}
    out = []
    for m in sorted({m for _, m in at}):
        parts, nbits, ours, missing = [], 0.0, 0.0, []
        for case, count in [*BENCH_NODES.items(), (BENCH_HEAD, 0)]:
            r = at.get((case, m))
            if r is None or not r.us_nbits or not r.us_ours:
                missing.append(case)
                continue
            times = BENCH_LAYERS * count if count else 1
            nbits += times * r.us_nbits
            ours += times * r.us_ours
            parts.append(f"{case} x{times} {times * (r.us_ours - r.us_nbits):+.1f}")
        if not parts:
            continue
        out.append(f"bench int4 step M={m}: MatMulNBits {nbits:.1f} us, ours {ours:.1f} us ({ours - nbits:+.1f}: "
                   + ", ".join(parts) + ")" + (f"; not measured: {', '.join(missing)}" if missing else ""))
    return out


def form_summary(rows: list[Row]) -> list[str]:
    """The fastest other form's kernel time over the custom op's own layout's, by M and the op's form there (both
    through ctypes, same case): under 1, another form would have been faster."""
    out = []
    for label, lo, hi in (("M 1", 1, 1), ("M 2-8", 2, 8), ("M 9-32", 9, 32), ("M 33+", 33, 1 << 30)):
        for form in FORMS:
            ratios = sorted(r.us_other / r.us_kernel for r in rows if r.us_other and r.us_kernel and r.form == form
                            and lo <= r.m <= hi and r.source == "random")
            if ratios:
                out.append(f"fastest other form / the op's {form}, {label}: median {statistics.median(ratios):.2f}, "
                           f"best {ratios[0]:.2f}, worst {ratios[-1]:.2f} over {len(ratios)} cases")
    return out


def prefill_summary(rows: list[Row]) -> list[str]:
    """Past M = 32 (the custom op on dequantize + cuBLAS): its time over MatMulNBits' and over the small-M kernel's
    alone (through ctypes, the path it no longer takes; a torch graph rather than onnxruntime's), by M: what would
    move ONNXPIPE_INT4_SMALL_M_MAX. Random weights, every block and zero-point variant."""
    out = []
    for m in sorted({r.m for r in rows if r.m > SMALL_M_MAX and r.source == "random"}):
        at = [(r.us_ours, r) for r in rows if r.m == m and r.source == "random" and r.us_ours]
        vs_nbits = sorted(us / r.us_nbits for us, r in at if r.us_nbits)
        vs_kernel = sorted(us / r.us_kernel for us, r in at if r.us_kernel)
        if not vs_nbits and not vs_kernel:
            continue
        parts = [f"prefill M={m}: ours/MatMulNBits"]
        parts.append(f"median {statistics.median(vs_nbits):.2f} (best {vs_nbits[0]:.2f}, worst {vs_nbits[-1]:.2f})"
                     if vs_nbits else "-")
        parts.append("ours/small-M kernel alone")
        parts.append(f"median {statistics.median(vs_kernel):.2f} (best {vs_kernel[0]:.2f}, worst "
                     f"{vs_kernel[-1]:.2f})" if vs_kernel else "-")
        out.append(" ".join(parts) + f" over {len(at)} cases")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="directory for results.json and the libraries built (required)")
    p.add_argument("--budget-s", type=float, default=230.0, help="start no new case past this many seconds")
    p.add_argument("--dry-run", action="store_true", help="no GPU: build, make the models, check the reference")
    p.add_argument("--shapes", default="1b,edge,8b,head", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--ms", default=",".join(map(str, MS)), help="rows of A to try")
    p.add_argument("--blocks", default="32,128")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per case and M")
    p.add_argument("--trained", action="append", help=".npz from --save-trained, or a Hugging Face directory "
                   f"(repeatable; default {TRAINED_NPZ} where it exists, else models/llama-stdlib)")
    p.add_argument("--model", action="append", help="an existing int4 build (its model.onnx): its first "
                   "--model-nodes MatMulNBits as they are, random unit-scale activations (repeatable)")
    p.add_argument("--model-nodes", type=int, default=24)
    p.add_argument("--save-trained", nargs="?", const=ROOT / TRAINED_NPZ, type=Path,
                   help=f"write the trained weights' .npz (default {TRAINED_NPZ}) and stop (CPU)")
    p.add_argument("--nvcc", help="the nvcc to use (default: found as onnxpipe.runtime.kernels.build finds it)")
    p.add_argument("--arch", help="GPU architectures, e.g. 90 or 80,90 (default: the visible GPUs')")
    p.add_argument("--no-torch", action="store_true", help="skip the ctypes call of the kernel under torch")
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help="skip timing every layout of both forms on the 1B shapes (block 128, zero points; M 1, 8, 32)")
    args = p.parse_args()
    args.ms = tuple(sorted({int(x) for x in args.ms.split(",")}))
    args.blocks = tuple(int(x) for x in args.blocks.split(","))
    for group in args.shapes.split(","):
        if group not in SHAPES:
            p.error(f"--shapes: {group!r} is not one of {', '.join(SHAPES)}")
    if any(b not in (32, 64, 128) for b in args.blocks):
        p.error("--blocks: 32, 64 or 128")

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.save_trained:
        save_trained(args.save_trained, log)
        return 0
    if args.out is None:
        p.error("--out is required")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "lib"
    work.mkdir(exist_ok=True)
    libs = build_libraries(args, work, log)
    log(f"custom-op library: {libs.ort_cuda or 'none'} ({libs.ort_cuda_how or 'not built'}); kernel alone: "
        f"{libs.kernel or 'none'}; CPU reference library: {libs.ort_cpu or '-'}")
    for note in libs.notes:
        log(f"  note: {note}")
    plan = build_plan(args)
    if args.dry_run:
        rc = dry_run(args, libs, plan, log)
        log(f"dry run: {len(plan)} random cases planned, {time.perf_counter() - start:.1f} s")
        return rc

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        log(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider here ({ort.get_available_providers()})")
        return 2
    runner = OrtRunner("CUDAExecutionProvider", libs.ort_cuda, graphs=True)
    # onnxruntime's CUDA EP loads its CUDA libraries first, torch (another CUDA build perhaps) after
    over = runner.session(overhead_model(), custom=False)
    _, _, times = runner.run_bound(over, np.zeros((1, 8), np.float16), 8, 1, 0, 200)
    torch_kernel = None
    if libs.kernel and not args.no_torch:
        try:
            import torch

            if torch.cuda.is_available():
                torch_kernel = TorchKernel(libs.kernel)
        except Exception as e:  # noqa: BLE001
            log(f"  note: kernel via ctypes off: {type(e).__name__}: {e}")
    ctx = Context(args, runner, torch_kernel, statistics.median(times), start, log=log,
                  plan_lib=ctypes.CDLL(str(libs.ort_cuda)) if libs.ort_cuda else None)
    if torch_kernel is not None:  # the forms onnxpipe_int4_gemm resolves to here ($ONNXPIPE_INT4_GEMM_FORM or auto)
        ctx.form = ", ".join(f"{torch_kernel.describe(0, m, 4096, 4096).split(':')[0]} at M={m}" for m in (1, 8, 32))
        log(f"the custom op's form here (4096 x 4096, no table entry): {ctx.form}; every form timed through ctypes "
            f"(the GEMV forms to M = {FORM_MAX_M['gemv']})")
    log(f"onnxruntime {ort.__version__}; run overhead of a one-node CUDA graph {ctx.overhead_s * 1e6:.1f} us "
        "(taken off each timed run before dividing by its copies)")
    fp16_done: set[str] = set()
    trained_done = False
    # the bench's int4 build's shapes and variant (the head included), the other 1B shapes, trained weights, the rest
    order = [c for c in plan if is_bench_case(c[0], c[3], c[4])]
    order += [c for c in plan if c[0].startswith("1b") and "head" not in c[0] and c not in order]
    order += [("trained", 0, 0, 0, False, ())] + [c for c in plan if c not in order]
    def save(done: bool) -> None:
        """results.json as it stands (after every case, so a run cut short keeps what it measured)."""
        failed = [r for r in ctx.rows if r.ok is False]
        result = {"onnxruntime": ort.__version__, "library": str(libs.ort_cuda),
                  "library_built_by": libs.ort_cuda_how, "notes": libs.notes, "run_overhead_us": ctx.overhead_s * 1e6,
                  "copy_bytes": COPY_BYTES, "slack": SLACK, "elapsed_s": time.perf_counter() - start,
                  "complete": done, "trained_done": trained_done, "skipped": ctx.skipped, "broken": ctx.broken,
                  "failed": len(failed), "ours_not_run": sum(r.err_ours is None for r in ctx.rows),
                  "rows": [asdict(r) for r in ctx.rows], "sweeps": ctx.sweeps, "table": table(ctx.rows),
                  "bench_table": table(ctx.rows, *BENCH_VARIANT), "bench_step": bench_step(ctx.rows),
                  "layouts": suggest_layouts(ctx.sweeps),
                  "form_summary": form_summary(ctx.rows), "prefill_summary": prefill_summary(ctx.rows)}
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out / "results.json")

    for case in order:
        save(done=False)
        name, n, k, block, with_zp, ms = case
        if ctx.over_budget():
            ctx.skipped.append(f"{name} N={n} K={k} bs={block} zp={with_zp}: past --budget-s" if n else
                               "trained weights: past --budget-s")
            continue
        try:
            if name == "trained":
                trained_done = True
                for source, linears in trained_sources(args):
                    for block_t in BLOCKS:
                        for symmetric in (False, True):
                            trained_case(ctx, source, linears, block_t, symmetric)
                for model_dir in args.model or []:
                    weights = int4_build_weights(Path(model_dir), args.model_nodes)
                    if weights:
                        int4_case(ctx, Path(model_dir).name, weights, seed=0, note=f"from {model_dir}")
                    else:
                        ctx.skipped.append(f"--model {model_dir}: no 4-bit MatMulNBits with fp16 scales")
                continue
            random_case(ctx, name, n, k, block, with_zp, ms, fp16_done)
        except Exception as e:  # noqa: BLE001 - one case that breaks is reported; the others run
            ctx.broken.append(f"{name} N={n} K={k} bs={block} zp={with_zp}: {one_line(e)}")
            log(f"broken: {ctx.broken[-1]}")
            gc.collect()

    failed = [r for r in ctx.rows if r.ok is False]
    sweep_wrong = [e for e in ctx.sweeps if e.get("ok") is False]
    unrun = [r for r in ctx.rows if r.err_ours is None]
    lines = table(ctx.rows)
    save(done=True)
    log("")
    for s in ctx.skipped[:8]:
        log(f"skipped: {s}")
    if len(ctx.skipped) > 8:
        log(f"skipped: {len(ctx.skipped) - 8} more (results.json)")
    log(f"{len(ctx.rows)} rows, {len(failed)} failed, {len(unrun)} without ours, "
        f"{time.perf_counter() - start:.0f} s; results.json under {args.out}")
    for ln in lines + form_summary(ctx.rows) + prefill_summary(ctx.rows):
        log(ln)
    log(f"the bench's int4 build (block {BENCH_VARIANT[0]}, zero points {'yes' if BENCH_VARIANT[1] else 'no'}):")
    for ln in table(ctx.rows, *BENCH_VARIANT) + bench_step(ctx.rows):
        log(ln)
    suggested = suggest_layouts(ctx.sweeps)
    log(f"layouts: {len(suggested)} kLayouts rows (int4_gemm.cu) the sweep suggests"
        + (":" if suggested else " (the default layout is within 5% of the best everywhere swept)"))
    for ln in suggested:
        log(f"layouts: {ln}")
    if sweep_wrong:
        log(f"sweep: {len(sweep_wrong)} layouts gave a wrong result, first: {sweep_wrong[0]}")
    if unrun:
        log(f"onnxpipe.MatMulInt4 did not run on {len(unrun)} rows: {unrun[0].note or 'no custom-op library'}")
        return 2
    for b in ctx.broken:
        log(f"broken: {b}")
    return 1 if failed or sweep_wrong or ctx.broken else 0


if __name__ == "__main__":
    sys.exit(main())
