"""MatMulInt4 past the small-M kernel (a prefill), everything a CPU can check: the dequantize kernel's own source
(csrc/int4_dequant.cu) under the int4 GEMM's host simulation, bit for bit, and broken copies of it failing; the
library's plan (csrc/int4_prefill.h: which M takes which path, the scratch, each slice's cublasGemmEx arguments) run
through a numpy model of cublasGemmEx against onnxruntime's MatMulNBits; how the CUDA kernel finds cuBLAS in the
process (fake libraries standing in for it); and the OrtApi allocator slots, a table miscounted by one failing."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from runtime.test_kernels import cpu_library, kernel_cache  # noqa: F401  (fixtures)
from scripts_module import load_script

from onnxpipe.runtime.kernels import build

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "onnxpipe" / "runtime" / "kernels" / "csrc"
SIM = Path(__file__).parent / "int4_gemm_sim"
MiB = 1 << 20


def _cxx() -> str:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    return cxx


@pytest.fixture(scope="module")
def check_kernels() -> ModuleType:
    return load_script("check_kernels")


# ---- the dequantize kernel's source on the CPU ----
def dequant_source(text: str) -> str:
    """int4_dequant.cu's device code and grid (everything above the launcher's line) between the simulation's
    prelude and the dequantize harness."""
    start = text.index("namespace {")
    end = text.index("// ---- the launcher (not simulated) ----")
    return ((SIM / "prelude.h").read_text() + "\n" + text[start:end] + "}  // namespace\n" +
            (SIM / "dequant_harness.inc").read_text())


def _build_sim(text: str, out: Path) -> Path:
    source = out.with_suffix(".cpp")
    source.write_text(dequant_source(text))
    proc = subprocess.run([_cxx(), "-std=c++20", "-O2", "-fno-strict-aliasing", "-w", str(source), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def dequant_sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cxx = _cxx()
    work = tmp_path_factory.mktemp("int4_dequant_sim")
    probe = work / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { _Float16 h = 1; return (int)(float)h - 1; }\n")
    if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(work / "probe")], capture_output=True).returncode:
        pytest.skip(f"{cxx} lacks C++20 or _Float16 (GCC 12 on x86-64 has both)")
    return _build_sim((CSRC / "int4_dequant.cu").read_text(), work / "sim")


# (N, K, block, zero points, n0, rows): odd block counts (the last zero-point byte half used), a slice in the middle
# and at the end of N, one row, a grid whose last block is partly idle
DEQUANT_CASES = [
    (40, 384, 128, 1, 0, 40),
    (40, 320, 64, 1, 7, 21),
    (33, 96, 32, 0, 0, 33),
    (300, 64, 64, 1, 129, 171),
    (17, 4096, 128, 0, 16, 1),
    (9, 2048, 32, 1, 3, 5),
]


@pytest.mark.parametrize("case", DEQUANT_CASES, ids=lambda c: "N{}-K{}-bs{}-zp{}-rows{}+{}".format(*c))
def test_dequantize_source_on_the_cpu(dequant_sim: Path, case: tuple[int, ...]) -> None:
    proc = subprocess.run([str(dequant_sim), *map(str, case)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith(" ok"), proc.stdout + proc.stderr
    assert "wrong 0, unwritten 0, past the end 0" in proc.stdout


# each broken copy and a case where it must show
BROKEN = {
    "swapped nibbles": ("const int lo_shift = 8 * i, hi_shift = 8 * i + 4;",
                        "const int lo_shift = 8 * i + 4, hi_shift = 8 * i;", (40, 384, 128, 1, 0, 40)),
    "dropped last block": ("return (rows * (K / 8) + kDequantThreads - 1) / kDequantThreads;",
                           "return (rows * (K / 8)) / kDequantThreads;", (300, 64, 64, 1, 129, 171)),
    "zero point of the next block": ("((blk & 1) * 4)", "(((blk + 1) & 1) * 4)", (40, 320, 64, 1, 7, 21)),
    "scale of the first block": ("S[n * blocks + blk]", "S[n * blocks]", (33, 96, 32, 0, 0, 33)),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_dequantize_simulation_fails_a_broken_copy(tmp_path: Path, name: str) -> None:
    old, new, case = BROKEN[name]
    text = (CSRC / "int4_dequant.cu").read_text()
    assert text.count(old) == 1, f"int4_dequant.cu changed: update the broken copy {name!r}"
    binary = _build_sim(text.replace(old, new), tmp_path / "broken")
    proc = subprocess.run([str(binary), *map(str, case)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout


# ---- the plan and the GEMM's arguments ----
def _library(path: Path) -> ctypes.CDLL:
    return ctypes.CDLL(str(path))


def _small_cap_library(tmp_path: Path, cap: int) -> ctypes.CDLL:
    """The CPU library built with a scratch cap of ``cap`` bytes, so that small weights take several slices."""
    out = tmp_path / f"libcap{cap}.so"
    cmd = [build.find_cxx().path, *build.CXX_FLAGS, f"-DONNXPIPE_INT4_SCRATCH_MAX_BYTES={cap}ll", "-I", str(CSRC),
           "-o", str(out), str(CSRC / "ops.cc"), *build.LINK_LIBS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _library(out)


LLAMA = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (4096, 4096), (1024, 4096), (14336, 4096),
         (4096, 14336), (128256, 2048), (200, 576), (24, 160), (1, 32)]


def test_plan_takes_the_small_kernel_to_32_and_bounds_the_scratch(cpu_library: Path,  # noqa: F811
                                                                  check_kernels: ModuleType) -> None:
    lib = _library(cpu_library)
    for n, k in LLAMA:
        for m in (1, 8, 32, 33, 64, 128, 2048, 8192):
            plan = check_kernels.prefill_plan(lib, m, n, k)
            assert plan.use_gemm == (m > 32), (m, n, k)
            if not plan.use_gemm:
                assert plan.calls == () and plan.scratch_bytes == 0
                continue
            assert plan.scratch_bytes == plan.slice_rows * k * 2 <= 64 * MiB, (n, k, plan)
            assert plan.slice_rows == n or plan.slice_rows % 128 == 0, (n, k, plan)
            # the slices tile N exactly, each one call of the same shape rules
            assert [c.n0 for c in plan.calls] == [i * plan.slice_rows for i in range(plan.slices)]
            assert sum(c.rows for c in plan.calls) == n and all(0 < c.rows <= plan.slice_rows for c in plan.calls)
            for c in plan.calls:
                assert (c.transa, c.transb, c.m, c.n, c.k) == (1, 0, c.rows, m, k)
                assert (c.lda, c.ldb, c.ldc, c.c_offset) == (k, k, n, c.n0)
    slices = {(n, k): check_kernels.prefill_plan(lib, 2048, n, k).slices for n, k in LLAMA}
    # a 1B model's largest weight in one slice, an 8B's gate/up in two, the LM head in 8
    assert slices[(8192, 2048)] == 1 and slices[(14336, 4096)] == 2 and slices[(128256, 2048)] == 8


@pytest.mark.parametrize("block,zero_points,n,k,m,cap", [
    (32, True, 40, 384, 33, 4096),      # 5 rows a slice (under 128): 8 slices
    (128, False, 40, 384, 64, 1 << 30),  # one slice
    (64, True, 300, 64, 50, 64 << 10),   # 512 rows a slice, N under it: one slice
    (64, False, 1000, 64, 40, 64 << 10),  # 512 + 488
])
def test_the_gemm_calls_compute_matmulnbits(check_kernels: ModuleType, tmp_path: Path, block: int, zero_points: bool,
                                            n: int, k: int, m: int, cap: int) -> None:
    """Each slice dequantized into a scratch of the plan's size and multiplied as cublasGemmEx would with the
    library's arguments: every output written once, equal to onnxruntime's MatMulNBits (CPU) and the float64
    reference to fp16's rounding; the same calls with op N for W, or C's offset one row off, do not."""
    import onnxruntime as ort

    ck = check_kernels
    lib = _small_cap_library(tmp_path, cap)
    rng = np.random.default_rng([n, k, block, int(zero_points)])
    w = ck.random_int4(rng, n, k, block, zero_points)
    a = rng.standard_normal((m, k)).astype(np.float16)
    plan = ck.prefill_plan(lib, m, n, k)
    assert plan.use_gemm and plan.scratch_bytes <= max(cap, 2 * k)
    y, writes = ck.prefill_model(plan, a, w)
    assert (writes == 1).all()
    ref = ck.reference(a, w)
    top = float(np.abs(ref).max())
    assert np.abs(y.astype(np.float64) - ref).max() <= 2.0 ** -10 * top
    session = ort.InferenceSession(ck.copies_model("MatMulNBits", [w]), providers=["CPUExecutionProvider"])
    own = session.run(None, {"A": a})[0].astype(np.float64)
    assert np.abs(y.astype(np.float64) - own).max() <= 2.0 ** -9 * top
    # the model notices wrong arguments: W not transposed (a wrong product, or a read past the scratch) ...
    try:
        bad, _ = ck.prefill_model(plan, a, w, lambda c: dataclasses.replace(c, transa=0, lda=c.rows))
        assert np.abs(bad.astype(np.float64) - ref).max() > 0.1 * top
    except ValueError:
        pass
    # ... and C one row of Y^T off: some outputs never written, others twice
    if plan.slices > 1:
        _, twice = ck.prefill_model(plan, a, w, lambda c: dataclasses.replace(c, c_offset=max(0, c.c_offset - 1)))
        assert (twice != 1).any()


# ---- cuBLAS as the CUDA kernel finds it ----
FAKE_CUBLAS = """
int cublasCreate_v2(void** handle) { *handle = (void*)0x1; return 0; }
int cublasSetStream_v2(void* handle, void* stream) { return 0; }
"""


def test_cublas_is_taken_from_the_process_by_its_sonames(cpu_library: Path, tmp_path: Path) -> None:  # noqa: F811
    """None loaded: one line naming both sonames; a libcublas.so.12 without cublasGemmEx: named; a libcublas.so.13
    with the three functions: found (soname matched, whatever the file's name). In a subprocess: the fakes stay out
    of the test run."""
    cc = _cxx()
    fakes = {}
    for soname, gemm in (("libcublas.so.12", ""), ("libcublas.so.13", "int cublasGemmEx(void) { return 0; }\n")):
        src = tmp_path / f"{soname}.c"
        src.write_text(FAKE_CUBLAS + gemm)
        fakes[soname] = tmp_path / f"fake_{soname.split('.')[-1]}.so"
        subprocess.run([cc, "-x", "c", "-shared", "-fPIC", f"-Wl,-soname,{soname}", str(src), "-o",
                        str(fakes[soname])], check=True)
    script = textwrap.dedent(f"""
        import ctypes, json
        lib = ctypes.CDLL({str(cpu_library)!r})
        def probe():
            buf = ctypes.create_string_buffer(400)
            return [lib.onnxpipe_find_cublas(buf, 400), buf.value.decode()]
        seen = [probe()]
        ctypes.CDLL({str(fakes["libcublas.so.12"])!r}, mode=ctypes.RTLD_GLOBAL)
        seen.append(probe())
        ctypes.CDLL({str(fakes["libcublas.so.13"])!r})
        seen.append(probe())
        print(json.dumps(seen))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    none, lacking, found = json.loads(proc.stdout)
    assert none == [0, "cuBLAS is not loaded in this process (neither libcublas.so.13 nor libcublas.so.12; "
                       "onnxruntime-gpu's CUDA EP loads it)"]
    assert lacking == [0, "libcublas.so.12 lacks cublasGemmEx"]
    assert found == [1, "libcublas.so.13"]


# ---- the allocator slots ----
def test_allocator_slot_miscounted_by_one_fails_the_cpu_reference(tmp_path: Path) -> None:
    """ort_abi.h with KernelContext_GetAllocator one slot early (the static_asserts moved with it, as a wrong count
    would have them): the CPU reference's ABI check on every run fails (an error or a crash), where the real table
    runs (tests/runtime/test_kernels.py)."""
    copy = tmp_path / "csrc"
    shutil.copytree(CSRC, copy)
    abi = (copy / "ort_abi.h").read_text()
    for old, new in (("ONNXPIPE_PAD(195, 58);", "ONNXPIPE_PAD(195, 57);"),
                     ("KernelContext_GetAllocator) == 253 * sizeof", "KernelContext_GetAllocator) == 252 * sizeof"),
                     ("sizeof(OrtApi) == 254 * sizeof", "sizeof(OrtApi) == 253 * sizeof")):
        assert abi.count(old) == 1, old
        abi = abi.replace(old, new)
    (copy / "ort_abi.h").write_text(abi)
    lib = tmp_path / "libmiscounted.so"
    subprocess.run([build.find_cxx().path, *build.CXX_FLAGS, "-I", str(copy), "-o", str(lib), str(copy / "ops.cc"),
                    *build.LINK_LIBS], check=True)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import onnxruntime as ort
        sys.path.insert(0, {str(ROOT / "scripts")!r})
        import check_kernels as ck
        w = ck.random_int4(np.random.default_rng(0), 16, 64, 32, True)
        so = ort.SessionOptions()
        so.register_custom_ops_library({str(lib)!r})
        sess = ort.InferenceSession(ck.copies_model("MatMulInt4", [w]), so, providers=["CPUExecutionProvider"])
        sess.run(None, {{"A": np.ones((2, 64), np.float16)}})
        print("ran")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ran" not in proc.stdout, (proc.stdout, proc.stderr[-2000:])
