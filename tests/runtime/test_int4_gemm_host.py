"""The int4 GEMM's host side, on a machine without a GPU: the launcher's argument checks and error codes, the
layouts it plans for the Llama shapes, and the float64 reference that scripts/check_kernels.py judges the kernel by
(against onnxruntime's own MatMulNBits on the CPU). The kernel's numbers are checked on a GPU by that script."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scripts_module import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def check_kernels() -> ModuleType:
    return load_script("check_kernels")


@pytest.fixture(scope="module")
def kernel_library(check_kernels: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """int4_gemm.cu alone as a shared library (nvcc as onnxpipe.runtime.kernels.build finds it)."""
    nvcc = check_kernels.find_nvcc(None)
    if nvcc is None:
        pytest.skip("no nvcc (set ONNXPIPE_NVCC, or pip install the [kernels] extra)")
    out = tmp_path_factory.mktemp("int4_gemm") / "libint4_gemm.so"
    check_kernels.nvcc_build(nvcc, [check_kernels.CSRC / "int4_gemm.cu"], out, ["90"], [])
    lib = ctypes.CDLL(str(out))
    lib.onnxpipe_int4_gemm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_void_p]
    lib.onnxpipe_int4_gemm_config.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4
                                              + [ctypes.c_void_p])
    lib.onnxpipe_int4_gemm_describe.argtypes = [ctypes.c_int] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_char_p,
                                                                                           ctypes.c_int]
    lib.onnxpipe_int4_gemm_error.restype = ctypes.c_char_p
    return lib


def test_argument_checks_return_codes(kernel_library: ctypes.CDLL) -> None:
    """Every bad argument is a named code before anything reaches the GPU; M = 0 is a no-op."""
    gemm, err = kernel_library.onnxpipe_int4_gemm, kernel_library.onnxpipe_int4_gemm_error
    ok = 1 << 12  # an aligned non-null address (never dereferenced: each call below stops before a launch)
    cases = {
        "null": (gemm(None, ok, ok, None, ok, 1, 16, 64, 32, None), -4),
        "block 48": (gemm(ok, ok, ok, None, ok, 1, 16, 96, 48, None), -2),
        "K % block": (gemm(ok, ok, ok, None, ok, 1, 16, 96, 64, None), -2),
        "misaligned A": (gemm(ok + 8, ok, ok, None, ok, 1, 16, 64, 32, None), -3),
        "misaligned B": (gemm(ok, ok + 4, ok, None, ok, 1, 16, 64, 32, None), -3),
        "negative M": (gemm(ok, ok, ok, None, ok, -1, 16, 64, 32, None), -1),
        "N past int32": (gemm(ok, ok, ok, None, ok, 1, 1 << 31, 64, 32, None), -1),
        "M = 0": (gemm(ok, ok, ok, None, ok, 0, 16, 64, 32, None), 0),
        "form 5": (kernel_library.onnxpipe_int4_gemm_config(5, 0, 0, ok, ok, ok, None, ok, 1, 16, 64, 32, None), -5),
        "hgemv tile 8": (kernel_library.onnxpipe_int4_gemm_config(4, 8, 1, ok, ok, ok, None, ok, 1, 16, 64, 32,
                                                                  None), -5),
        "hgemv split 16": (kernel_library.onnxpipe_int4_gemm_config(4, 1, 16, ok, ok, ok, None, ok, 1, 16, 64, 32,
                                                                    None), -5),
        "gemv tile 3": (kernel_library.onnxpipe_int4_gemm_config(3, 3, 1, ok, ok, ok, None, ok, 1, 16, 64, 32, None),
                        -5),
        "gemv split 3": (kernel_library.onnxpipe_int4_gemm_config(3, 1, 3, ok, ok, ok, None, ok, 1, 16, 64, 32, None),
                         -5),
        "warps split 5": (kernel_library.onnxpipe_int4_gemm_config(1, 1, 5, ok, ok, ok, None, ok, 1, 16, 64, 32,
                                                                   None), -5),
        "2 tiles x 16 warps": (kernel_library.onnxpipe_int4_gemm_config(1, 2, 16, ok, ok, ok, None, ok, 1, 16, 64, 32,
                                                                        None), -5),
    }
    assert {name: got for name, (got, _) in cases.items()} == {name: want for name, (_, want) in cases.items()}
    messages = {code: err(code).decode() for code in (0, -1, -2, -3, -4, -5, -99)}
    assert messages[0] == "ok" and "block_size" in messages[-2] and "aligned" in messages[-3]
    assert len(set(messages.values())) == len(messages)  # each code its own words


PLAN = re.compile(r"^(warps|cluster|h?gemv): grid (\d+)x(\d+)(?:x(\d+))?, (?:(\d+) weight rows and (\d+) A rows a block, "
                  r"(?:(\d+) weight rows a warp, )?(\d+) warps along K(?:, K staged (\d+) at a time)?"
                  r"|(\d+) warps along N, (\d+) A rows a block, clusters of (\d+) along K)$")


@pytest.mark.parametrize("form", [1, 2, 3, 4])
def test_plans_cover_every_output(kernel_library: ctypes.CDLL, form: int) -> None:
    """For the 1B/8B shapes, ragged edges and M from 1 to 4096, each form's grid covers N and M with no block
    wholly past them, a cluster splits K into at most 8 non-empty slices, and a GEMV block's rows are its 8 warps'
    (weight rows a warp x warps not along K) with K staged in slices of 32-k chunks of at most 8192 fp32 (the half2
    form: 16384 halves) for its A rows. (Without a GPU the launcher assumes 132 SMs of sm_90.)"""
    buf = ctypes.create_string_buffer(256)
    shapes = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (128256, 2048), (4096, 4096), (1024, 4096),
              (14336, 4096), (4096, 14336), (200, 576), (24, 160), (16, 32)]
    seen = set()
    for n, k in shapes:
        for m in (1, 2, 7, 8, 9, 16, 17, 32, 33, 100, 512, 4096):
            assert kernel_library.onnxpipe_int4_gemm_describe(form, 0, 0, m, n, k, buf, len(buf)) == 0
            text = buf.value.decode()
            hit = PLAN.match(text)
            assert hit, text
            name, gx, gy, gz = hit.group(1), int(hit.group(2)), int(hit.group(3)), int(hit.group(4) or 1)
            if name in ("gemv", "hgemv"):
                rows, a_rows, tile, split, staged = (int(hit.group(i)) for i in (5, 6, 7, 8, 9))
                cap = 8192 if name == "gemv" else 16384
                assert tile in (1, 2, 4) and split in (1, 2, 4, 8) and rows == tile * 8 // split and gz == 1, text
                assert a_rows == (1 if m == 1 else 2 if m == 2 else 4), text
                assert staged % 32 == 0 and 0 < staged <= k and a_rows * staged <= cap, text
                assert staged == k or a_rows * (staged + 32) > cap, text  # the whole K where it fits
            elif name == "warps":
                rows, a_rows, split = int(hit.group(5)), int(hit.group(6)), int(hit.group(8))
                assert hit.group(7) is None and hit.group(9) is None and rows in (16, 32) and split in (1, 2, 4, 8, 16) and gz == 1, text
            else:
                rows, a_rows, split = 16 * int(hit.group(10)), int(hit.group(11)), int(hit.group(12))
                assert gz == split and 1 <= split <= min(8, -(-k // 128)), text
            if name not in ("gemv", "hgemv"):
                assert a_rows in ((8, 16, 32) if name == "warps" else (8, 16, 32, 64)), text
            assert gx * rows >= n > (gx - 1) * rows, text
            assert gy * a_rows >= m > (gy - 1) * a_rows, text
            seen.add(name)
    assert seen == {{1: "warps", 2: "cluster", 3: "gemv", 4: "hgemv"}[form]}


def test_auto_takes_gemv_at_m1(kernel_library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule (form 0 where no layout-table entry holds the call) takes the GEMV form at M = 1 and only there; its
    weight rows a warp fill the grid: 2048-wide outputs 1 row a warp (256 blocks on 132 SMs), 8192 2 (512 blocks),
    the 128256-row LM head's 4 at K = 4096 (no table entry there)."""
    monkeypatch.delenv("ONNXPIPE_INT4_GEMM_FORM", raising=False)
    buf = ctypes.create_string_buffer(256)

    def plan(m: int, n: int, k: int) -> str:
        assert kernel_library.onnxpipe_int4_gemm_describe(0, 0, 0, m, n, k, buf, len(buf)) == 0
        return buf.value.decode()

    assert plan(1, 2048, 2048).startswith("gemv: grid 256x1, 8 weight rows and 1 A rows a block, 1 weight rows a warp")
    assert plan(1, 4096, 8192).endswith("K staged 8192 at a time")  # (1B down, 2048 x 8192: a table entry)
    assert plan(1, 4096, 14336).endswith("K staged 8192 at a time")  # two slices
    assert plan(1, 8192, 4096).startswith("gemv: grid 512x1, 16 weight rows")
    assert plan(1, 128256, 4096).startswith("gemv: grid 4008x1, 32 weight rows")
    for m in (2, 4, 8, 32):
        assert plan(m, 2048, 2048).startswith("warps:"), m


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("zero_points", [True, False])
def test_reference_is_matmulnbits(check_kernels: ModuleType, block: int, zero_points: bool) -> None:
    """check_kernels' float64 dequantized reference reads MatMulNBits' layout as onnxruntime does: within one fp16
    rounding of its output; with the nibbles of each byte swapped it is not."""
    import onnxruntime as ort

    ck = check_kernels
    rng = np.random.default_rng(block + zero_points)
    w = ck.random_int4(rng, 40, 384, block, zero_points)
    a = rng.standard_normal((3, 384)).astype(np.float16)
    session = ort.InferenceSession(ck.copies_model("MatMulNBits", [w]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"A": a})[0].astype(np.float64)
    ref = ck.reference(a, w)
    top = float(np.abs(ref).max())
    assert np.abs(got - ref).max() <= 2.0 ** -10 * top
    swapped = ck.Int4Weight((w.packed << 4) | (w.packed >> 4), w.scales, w.zero_points, block)
    assert np.abs(got - ck.reference(a, swapped)).max() > 0.1 * top
