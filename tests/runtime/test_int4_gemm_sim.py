"""The int4 GEMM's kernels, their very source, run on the CPU under a host simulation of the CUDA features they use
(int4_gemm_sim/prelude.h): the four forms, ragged N and M, K not a multiple of 128, block 32/64/128, with and
without zero points, clusters of 1-5 blocks along K, the GEMV forms' 1-8 warps along K and K in several slices. Each case's output is checked against a double-precision reference
within 2^-9 of its largest magnitude (fp16 rounding is 2^-11), and every output must be written. The kernel's own
launch code and speed are the GPU's business (scripts/check_kernels.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "onnxpipe" / "runtime" / "kernels" / "csrc" / "int4_gemm.cu"
COMMON = SOURCE.parent / "kernel_common.cuh"  # device helpers int4_gemm.cu and linear.cu share
SIM = Path(__file__).parent / "int4_gemm_sim"

# (form, M, N, K, block, zero points, p1, p2, p3): warps form p = (weight tiles, A tiles, warps along K); cluster
# form p = (A tiles, warps along N, blocks along K)
CASES = [
    (1, 3, 40, 96, 32, 1, 1, 1, 4),
    (1, 11, 33, 320, 64, 0, 1, 2, 8),
    (1, 20, 32, 384, 128, 1, 1, 4, 4),
    (1, 1, 16, 256, 32, 0, 1, 1, 16),
    (1, 9, 48, 160, 32, 1, 2, 2, 8),
    (1, 33, 40, 576, 32, 1, 2, 4, 4),
    (1, 5, 24, 160, 32, 0, 2, 1, 4),
    (2, 1, 200, 576, 32, 1, 1, 2, 5),
    (2, 3, 24, 160, 32, 0, 1, 2, 2),
    (2, 17, 40, 576, 64, 1, 4, 2, 5),
    (2, 33, 72, 384, 128, 0, 8, 4, 3),
    (2, 9, 64, 1408, 128, 1, 2, 2, 8),
    (2, 100, 24, 160, 32, 1, 8, 2, 2),
    (2, 8, 48, 256, 32, 1, 1, 3, 1),
    # the smallest, and M past one chunk with a ragged last one
    (1, 1, 1, 32, 32, 1, 1, 1, 4),
    (2, 1, 1, 32, 32, 0, 1, 1, 1),
    (1, 65, 17, 64, 64, 1, 2, 4, 8),
    (2, 65, 17, 64, 64, 1, 8, 2, 1),
    (1, 64, 16, 128, 128, 0, 1, 4, 16),
    (2, 70, 33, 96, 32, 1, 8, 3, 3),
    (2, 2, 130, 640, 128, 1, 1, 8, 5),
    # 1 and 2 warps along K (the large-N layouts the sweep tries): every k step on one or two warps
    (1, 1, 40, 576, 32, 0, 1, 1, 1),
    (1, 9, 33, 384, 128, 1, 2, 2, 2),
    (1, 33, 48, 160, 32, 1, 1, 4, 2),
    (1, 5, 72, 320, 64, 0, 2, 1, 1),
]


def replace_function(code: str, head: str, new: str) -> str:
    """``code`` with the function starting at ``head`` (up to its closing brace at the start of a line) as ``new``."""
    i = code.index(head)
    j = code.index("\n}\n", i) + 3
    return code[:i] + new + code[j:]


def common_device_code(common: str) -> str:
    """kernel_common.cuh's namespace body, its two inline-PTX helpers mapped to the simulation."""
    body = common[common.index("namespace {") + len("namespace {"):common.index("}  // namespace")]
    body = replace_function(body, "__device__ __forceinline__ void mma_16816(",
                            "inline void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, "
                            "uint32_t b0, uint32_t b1) { sim_mma(c, a0, a1, a2, a3, b0, b1); }\n")
    return replace_function(body, "__device__ __forceinline__ uint4 load_weight(",
                            "inline uint4 load_weight(const void* p) { uint4 v; std::memcpy(&v, p, 16); return v; }\n")


def simulated_source(text: str, common: str | None = None) -> str:
    """int4_gemm.cu's device code after kernel_common.cuh's (``common``: that file's text, default as it stands), with
    the inline-PTX helpers and the shared arrays mapped to the simulation."""
    start = text.index("namespace {") + len("namespace {")
    warps_end = text.index("template <int NT, int MT, int KW>\ncudaError_t launch(")
    rows_start = text.index("template <int MT>\n__global__")
    rows_end = text.index("template <int MT>\ncudaError_t launch_rows(")
    gemv_start = text.index("constexpr int kGemvWarps")
    gemv_end = text.index("template <bool H, int T, int MR>\ncudaError_t launch_gemv(")
    body = ("namespace {\n" + common_device_code(COMMON.read_text() if common is None else common) + text[start:warps_end]
            + text[rows_start:rows_end] + text[gemv_start:gemv_end] + "}  // namespace\n")

    # cp.async (the row-tiled form's staged activations) as a plain copy, done at once: its waits are then nothing
    # to wait for, and the block barriers still order each stage's refill after every thread's reads of it
    body = replace_function(body, "__device__ __forceinline__ void cp_async16(",
                            "inline void cp_async16(void* smem, const void* gmem, bool full) { if (full) "
                            "std::memcpy(smem, gmem, 16); else std::memset(smem, 0, 16); }\n")
    for one_line in ("cp_async_commit", "cp_async_wait_one"):  # each a one-line function
        body, count = re.subn(rf"__device__ __forceinline__ void {one_line}\(\) {{[^\n]*}}\n",
                              f"inline void {one_line}() {{}}\n", body)
        assert count == 1, f"int4_gemm.cu's {one_line} changed: update simulated_source"
    body, count = re.subn(r'asm volatile\("cp\.async\.wait_all;\\n" ::\);', "", body)
    assert count == 1, "int4_gemm.cu's cp.async waits changed: update simulated_source"
    body, count = re.subn(r"__shared__ float partial((?:\[[^\]]+\])+);",
                          lambda m: f"float (&partial){m.group(1)} = *reinterpret_cast<float (*){m.group(1)}>(sim_smem());",
                          body)
    assert count == 1, "int4_gemm.cu's shared arrays changed: update simulated_source"
    body, count = re.subn(r"__shared__ __align__\(16\) unsigned char smem\[[^;]+\];",
                          "unsigned char* smem = static_cast<unsigned char*>(sim_smem());", body)
    assert count == 1, "int4_gemm.cu's row-tiled shared memory changed: update simulated_source"
    body, count = re.subn(r"extern __shared__ float4 gemv_smem\[\];",
                          "float4* gemv_smem = reinterpret_cast<float4*>(sim_smem());", body)
    assert count == 1, "int4_gemm.cu's GEMV shared memory changed: update simulated_source"
    body, count = re.subn(r"extern __shared__ uint4 hgemv_smem\[\];",
                          "uint4* hgemv_smem = reinterpret_cast<uint4*>(sim_smem());", body)
    assert count == 1, "int4_gemm.cu's half2 GEMV shared memory changed: update simulated_source"
    return (SIM / "prelude.h").read_text() + "\n" + body + "\n" + (SIM / "harness.inc").read_text()


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    work = tmp_path_factory.mktemp("int4_gemm_sim")
    probe = work / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); _Float16 h = 1; b.arrive_and_wait(); "
                     "return (int)(float)h - 1; }\n")
    if subprocess.run([cxx, "-std=c++20", "-pthread", str(probe), "-o", str(work / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip(f"{cxx} lacks C++20 <barrier> or _Float16 (GCC 12 on x86-64 has both)")
    source = work / "sim.cpp"
    source.write_text(simulated_source(SOURCE.read_text()))
    binary = work / "sim"
    proc = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-w", str(source), "-o", str(binary)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return binary


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-M{}-N{}-K{}-bs{}-zp{}-{}.{}.{}".format(*c))
def test_kernel_source_on_the_cpu(simulator: Path, case: tuple[int, ...]) -> None:
    proc = subprocess.run([str(simulator), *map(str, case)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith(" ok"), proc.stdout + proc.stderr
    assert "unwritten 0" in proc.stdout


# the GEMV form (3): (3, M, N, K, block, zero points, weight rows a warp, A rows a block, warps along K[, k staged a
# time]): M 1-4 (3 in a 4-row block, one masked) and past 4 (chunks of A rows), ragged N (not a multiple of the
# block's rows), K not a multiple of 128, blocks 32/64/128, zero points or not, 1-8 warps along K, K in several
# slices (ragged last slice) where the slice is given
GEMV_CASES = [
    (3, 1, 40, 576, 32, 0, 1, 1, 1),
    (3, 1, 33, 320, 64, 1, 2, 1, 1),
    (3, 1, 70, 384, 128, 0, 4, 1, 1),
    (3, 1, 21, 1408, 32, 1, 1, 1, 2),
    (3, 1, 50, 160, 32, 0, 2, 1, 4),
    (3, 1, 9, 2048, 128, 1, 1, 1, 8),
    (3, 1, 37, 576, 64, 1, 2, 1, 2, 128),
    (3, 1, 1, 32, 32, 1, 1, 1, 1),
    (3, 2, 19, 448, 64, 1, 1, 2, 1),
    (3, 3, 41, 96, 32, 0, 2, 4, 2),
    (3, 4, 17, 640, 128, 1, 4, 4, 1, 256),
    (3, 7, 24, 192, 64, 0, 1, 4, 4, 64),
]


@pytest.mark.parametrize("case", GEMV_CASES,
                         ids=lambda c: "gemv-M{1}-N{2}-K{3}-bs{4}-zp{5}-{6}.{7}.{8}".format(*c)
                         + (f"-slice{c[9]}" if len(c) > 9 else ""))
def test_gemv_source_on_the_cpu(simulator: Path, case: tuple[int, ...]) -> None:
    proc = subprocess.run([str(simulator), *map(str, case)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith(" ok"), proc.stdout + proc.stderr
    assert "unwritten 0" in proc.stdout


# the half2 GEMV form (4): the same arguments and the same spread of cases as the GEMV form's
HGEMV_CASES = [(4, *case[1:]) for case in GEMV_CASES] + [
    (4, 1, 24, 4096, 128, 1, 2, 1, 4, 1024),  # slices of 8 chunks: the swizzle's every phase
    (4, 4, 9, 160, 32, 0, 1, 4, 8),  # more warps along K than a row has steps
]


@pytest.mark.parametrize("case", HGEMV_CASES,
                         ids=lambda c: "hgemv-M{1}-N{2}-K{3}-bs{4}-zp{5}-{6}.{7}.{8}".format(*c)
                         + (f"-slice{c[9]}" if len(c) > 9 else ""))
def test_hgemv_source_on_the_cpu(simulator: Path, case: tuple[int, ...]) -> None:
    proc = subprocess.run([str(simulator), *map(str, case)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith(" ok"), proc.stdout + proc.stderr
    assert "unwritten 0" in proc.stdout


def broken_simulator(tmp_path: Path, line: str, tail: str) -> Path:
    """The simulation built from a copy of the source whose ``line`` (a statement ending in ';') ends in ``tail``
    instead: a planted fault the simulation must see."""
    text = SOURCE.read_text()
    assert line in text
    source = tmp_path / "broken.cpp"
    source.write_text(simulated_source(text.replace(line, line[:-1] + tail)))
    binary = tmp_path / "broken"
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx
    # -O0: a planted fault runs one case, where compiling is most of the time (2.8 s against 9.6 at -O2 here)
    subprocess.run([cxx, "-std=c++20", "-O0", "-pthread", "-w", str(source), "-o", str(binary)], check=True)
    return binary


def test_simulation_sees_a_lost_gemv_k_step(simulator: Path, tmp_path: Path) -> None:
    """A copy of the GEMV form where the first K slice leaves out its last 32 k fails the simulation, with one
    slice and with several."""
    binary = broken_simulator(tmp_path, "const int c1 = min(c0 + slice_chunks, chunks);", " - (c0 == 0);")
    for args in (["3", "1", "40", "576", "32", "0", "1", "1", "1"], ["3", "2", "19", "448", "64", "1", "1", "2", "2",
                                                                      "128"]):
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout


def test_simulation_sees_a_lost_k_step(simulator: Path, tmp_path: Path) -> None:
    """The same simulation of a copy of the source where the first block of a cluster skips its last k step
    fails: the check can fail."""
    binary = broken_simulator(tmp_path, "const int last = (int)((int64_t)(slice + 1) * steps / slices);",
                              " - (slice == 0);")
    proc = subprocess.run([str(binary), "2", "1", "200", "576", "32", "1", "1", "2", "5"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout


def test_simulation_sees_a_misplaced_hgemv_pair(simulator: Path, tmp_path: Path) -> None:
    """A copy of the half2 GEMV form that stages the pairs of k (8v + 2, 8v + 6) and (8v + 3, 8v + 7) swapped (the
    nibbles then meet the wrong activations) fails the simulation."""
    text = SOURCE.read_text()
    right = "__byte_perm(v.y, v.w, 0x5410),\n                     __byte_perm(v.y, v.w, 0x7632));"
    swapped = "__byte_perm(v.y, v.w, 0x7632),\n                     __byte_perm(v.y, v.w, 0x5410));"
    assert text.count(right) == 1
    source = tmp_path / "swapped.cpp"
    source.write_text(simulated_source(text.replace(right, swapped)))
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx
    binary = tmp_path / "swapped"
    subprocess.run([cxx, "-std=c++20", "-O0", "-pthread", "-w", str(source), "-o", str(binary)], check=True)
    proc = subprocess.run([str(binary), "4", "1", "40", "576", "32", "0", "1", "1", "1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout
