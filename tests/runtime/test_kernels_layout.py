"""The int4 GEMM's layout table and the kernel check's bench rows, without a GPU: int4_gemm.cu's kLayouts entries are
taken where they hold a call and nowhere else, a bad entry is seen; scripts/check_kernels.py's shapes are those of
the bench's int4 build (a tiny model of it built here), its suggested table rows and its bench step come from the
figures as written."""

from __future__ import annotations

import collections
import ctypes
import shutil
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Callable

import onnx
import pytest
from runtime.conftest import byte_tokenizer
from runtime.test_kernels import cpu_library, kernel_cache  # noqa: F401  (fixtures)
from scripts_module import load_script

from onnxpipe.quant import quantize_model

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "onnxpipe" / "runtime" / "kernels" / "csrc" / "int4_gemm.cu"


def load_check_kernels() -> ModuleType:
    return load_script("check_kernels")


@pytest.fixture(scope="module")
def ck() -> ModuleType:
    return load_check_kernels()


def build_kernel(ck: ModuleType, source: Path, out: Path) -> Path:
    nvcc = ck.find_nvcc(None)
    if nvcc is None:
        pytest.skip("no nvcc (set ONNXPIPE_NVCC, or pip install the [kernels] extra)")
    ck.nvcc_build(nvcc, [source], out, ["90"], [])
    return out


@pytest.fixture(scope="module")
def kernel(ck: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_kernel(ck, SOURCE, tmp_path_factory.mktemp("layouts") / "libint4_gemm.so")


def describe(lib_path: Path, form: int, m: int, n: int, k: int, tile: int = 0, split: int = 0) -> str:
    lib = ctypes.CDLL(str(lib_path))
    lib.onnxpipe_int4_gemm_describe.argtypes = [ctypes.c_int] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_char_p,
                                                                                            ctypes.c_int]
    buf = ctypes.create_string_buffer(256)
    assert lib.onnxpipe_int4_gemm_describe(form, tile, split, m, n, k, buf, len(buf)) == 0
    return buf.value.decode()


def test_table_entries_are_taken_where_they_hold(ck: ModuleType, kernel: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each entry's layout is what a call inside its ranges gets (auto form or the entry's), and its corners' first
    neighbours outside get the rule's (the same form asked with tile and split 0 and no entry there)."""
    monkeypatch.delenv("ONNXPIPE_INT4_GEMM_FORM", raising=False)
    entries = ck.layout_table(kernel)
    assert entries, "kLayouts is empty: this test then checks nothing"
    lines, problems = ck.launcher_layouts(kernel, [("1b gate,up", 8192, 2048)], (1, 8, 32))
    assert problems == []
    for i, (m0, m1, n0, n1, k0, k1, form, tile, split) in enumerate(entries):
        want = describe(kernel, form, m0, n0, k0, tile, split)
        for m, n, k in ((m0, n0, k0), (m1, n1, k1)):
            assert describe(kernel, 0, m, n, k) == describe(kernel, form, m, n, k) == \
                describe(kernel, form, m, n, k, tile, split), (i, m, n, k)
        assert describe(kernel, 0, m0, n0, k0) == want
        for m, n, k in ((m0 - 1, n0, k0), (m1 + 1, n1, k1), (m0, n0 - 1, k0), (m0, n1 + 1, k0), (m0, n0, k1 + 1)):
            if m < 1:
                continue
            lib = ctypes.CDLL(str(kernel))
            lib.onnxpipe_int4_gemm_layout_for.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 3
            assert lib.onnxpipe_int4_gemm_layout_for(0, m, n, k) != i, (i, m, n, k)
    # the 1B gate/up entries (runs 28 and 29's sweeps: M 17-32 and 2-8) and the rule at M = 1, which no entry holds:
    # the GEMV form, 2 weight rows a warp (512 blocks of 16 rows)
    assert "(kLayouts[0])" in lines[2] and "32 weight rows and 32 A rows a block, 4 warps along K" in lines[2]
    assert "(kLayouts[2])" in lines[1] and "16 weight rows and 8 A rows a block, 8 warps along K" in lines[1]
    assert "(the rule)" in lines[0] and "gemv: grid 512x1, 16 weight rows and 1 A rows a block, 2 weight rows a " \
        "warp, 1 warps along K" in lines[0]
    assert describe(kernel, 0, 16, 8192, 2048) == "warps: grid 256x1, 32 weight rows and 16 A rows a block, 8 warps along K"


def test_a_bad_table_entry_is_reported(ck: ModuleType, tmp_path: Path) -> None:
    """A copy of the source whose entry asks for 3 warps along K (a layout the launcher refuses) and one whose second
    entry repeats the first (never reached) are both named by the dry run's table check."""
    text = SOURCE.read_text()
    row = "{17, 32, 8192, 8192, 2048, 2048, ONNXPIPE_INT4_GEMM_WARPS, 2, 4},"
    assert row in text
    bad = tmp_path / "bad.cu"
    refused = row.replace("{17, 32,", "{1, 1,").replace(", 2, 4}", ", 1, 3}")
    bad.write_text(text.replace(row, refused + "\n    " + row + "\n    " + row))
    for header in ("int4_gemm.h", "kernel_common.cuh"):  # what the copy includes from beside it
        (tmp_path / header).write_text((SOURCE.parent / header).read_text())
    lib = build_kernel(ck, bad, tmp_path / "libbad.so")
    _, problems = ck.launcher_layouts(lib, [], (1,))
    assert len(problems) == 2, problems
    assert "refuses form 1 tile 1 split 3" in problems[0] and "kLayouts[2]: an earlier entry" in problems[1]


def test_shapes_are_the_bench_builds(ck: ModuleType, cuda_form: Callable[[str], Path], tmp_path: Path) -> None:
    """The bench's int4 build (quantize --mode int4 --algo rtn --block-size 32 --symmetric --lm-head int4 on the
    optimize --target cuda form) of the tiny Llama has, per layer and for the head, the int4 MatMuls that
    bench_shapes says at its widths; at the 1B widths those are check_kernels' bench cases."""
    src = tmp_path / "cuda"
    shutil.copytree(cuda_form("llama"), src)
    byte_tokenizer().save(str(src / "tokenizer.json"))
    (tmp_path / "eval.txt").write_text((ROOT / "data" / "eval.txt").read_text()[:3000])
    quantize_model(src, tmp_path / "int4", "int4", eval_file=tmp_path / "eval.txt", eval_context=64, algo="rtn",
                   block_size=32, symmetric=True, lm_head="int4", max_ppl_increase=1e9, min_greedy_agreement=0.0)
    nodes = [n for n in onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert {a["block_size"] for a in attrs} == {32} and all(len(n.input) == 3 for n in nodes)  # no zero points
    got = collections.Counter((a["N"], a["K"]) for a in attrs)
    layer, head = ck.bench_shapes(64, 32, 128, 256)  # tests/tiny.py's Llama: 2 layers, 4 heads of 16, 2 KV heads
    assert got == collections.Counter({**{s: 2 * c for s, c in layer.items()}, head: 1})
    one_b, one_b_head = ck.bench_shapes(2048, 512, 8192, 128256)
    named = {name: (n, k) for name, n, k in ck.SHAPES["1b"] + ck.SHAPES["head"]}
    assert {named[name]: count for name, count in ck.BENCH_NODES.items()} == one_b
    assert named[ck.BENCH_HEAD] == one_b_head
    assert ck.is_bench_case("1b qkv", 32, False) and not ck.is_bench_case("1b qkv", 128, False)
    assert not ck.is_bench_case("1b k,v", 32, False)  # not in a packed build


def sweep_entry(case: str, m: int, form: str, tile: int, split: int, us: float, ok: bool = True) -> dict:
    return {"case": case, "n": 8192, "k": 2048, "block": 32, "m": m, "form": form, "tile": tile, "split": split,
            "plan": f"{form} {tile}x{split}", "us": us, "ok": ok}


@pytest.mark.parametrize("faster", [True, False])
def test_suggested_rows_come_from_the_sweep(ck: ModuleType, faster: bool) -> None:
    """A layout right and more than 5% under the default's time gives a row for the M range of the swept M; a
    faster wrong one or one within 5% (here 4%) gives none."""
    sweeps = [sweep_entry("1b gate,up", 32, "default", 0, 0, 14.8),
              sweep_entry("1b gate,up", 32, "warps", 2, 4, 12.6 if faster else 14.2),
              sweep_entry("1b gate,up", 32, "warps", 1, 2, 9.0, ok=False),
              sweep_entry("1b gate,up", 1, "default", 0, 0, 8.0),
              sweep_entry("1b gate,up", 1, "cluster", 4, 2, 8.1)]
    rows = ck.suggest_layouts(sweeps)
    if faster:
        assert len(rows) == 1 and rows[0].startswith("{17, 32, 8192, 8192, 2048, 2048, ONNXPIPE_INT4_GEMM_WARPS, 2, 4},")
        assert "12.60 us against the default's 14.80" in rows[0]
    else:
        assert rows == []


def test_bench_step_sums_the_builds_matmuls(ck: ModuleType) -> None:
    """16 layers of qkv, o, 2 gate/up and down, and one head, MatMulNBits against ours; a shape not measured is
    named, not counted."""
    def row(case: str, n: int, k: int, nbits: float, ours: float, m: int = 1):
        return ck.Row(case, n, k, 32, False, m, us_nbits=nbits, us_ours=ours)

    rows = [row("1b qkv", 3072, 2048, 5.0, 5.5), row("1b q,o", 2048, 2048, 4.67, 4.10),
            row("1b gate,up", 8192, 2048, 6.63, 8.48), row("1b down", 2048, 8192, 10.44, 9.39),
            row("1b k,v", 512, 2048, 1.0, 50.0),  # not in the build: left out
            ck.Row("1b q,o", 2048, 2048, 128, True, 1, us_nbits=1.0, us_ours=99.0),  # another variant: left out
            row("1b q,o", 2048, 2048, 4.0, 4.0, m=8)]
    (m1, m8) = ck.bench_step(rows)
    nbits = 16 * (5.0 + 4.67 + 2 * 6.63 + 10.44)
    ours = 16 * (5.5 + 4.10 + 2 * 8.48 + 9.39)
    assert m1.startswith(f"bench int4 step M=1: MatMulNBits {nbits:.1f} us, ours {ours:.1f} us ({ours - nbits:+.1f}:")
    assert "1b gate,up x32 +59.2" in m1 and m1.endswith("not measured: 1b lm_head")
    assert m8.startswith("bench int4 step M=8: MatMulNBits 64.0 us, ours 64.0 us (+0.0:")
    rows.append(row("1b lm_head", 128256, 2048, 60.0, 100.0))
    assert "1b lm_head x1 +40.0" in ck.bench_step(rows)[0] and "not measured" not in ck.bench_step(rows)[0]


class FakeKernel:
    """TorchKernel's surface for sweep(): each layout's time from ``times`` (default 10 us), the right product
    except where ``wrong`` names the layout."""

    def __init__(self, ref, times: dict, wrong: tuple = ()):
        self.ref, self.times, self.wrong = ref, times, wrong
        self.torch = SimpleNamespace(cuda=SimpleNamespace(empty_cache=lambda: None))
        self.config = (1, 0, 0)
        self.seen: list[tuple[int, int, int]] = []

    def describe(self, form: int, m: int, n: int, k: int, tile: int = 0, split: int = 0) -> str:
        names = {code: name for name, code in load_check_kernels().FORMS.items()}
        name = names.get(form) or ("gemv" if m == 1 else "warps")  # form 0: as the launcher's rule resolves it
        return f"{name}: form {form} {tile}x{split} M={m}"

    def upload(self, w):
        return (w.packed, w.scales, w.zero_points)

    def run(self, a, dev, n: int, k: int, block: int, repeats: int):
        import numpy as np

        self.seen.append(self.config)
        if self.ref is None:  # the product of the first weight, rounded as the CPU reference op rounds (via fp32)
            w = load_check_kernels().Int4Weight(dev[0][0], dev[0][1], dev[0][2], block)
            y = load_check_kernels().reference(a, w).astype(np.float32).astype(np.float16)
        else:
            y = self.ref[:a.shape[0]].astype(np.float16)
        if self.config in self.wrong:
            y = y + np.float16(1.0)
        return y, self.times.get(self.config, 10.0) * 1e-6


def test_sweep_times_the_default_beside_every_layout(ck: ModuleType) -> None:
    """sweep() times the default (form 0: as the custom op resolves it) and every layout of SWEEP at M 1, 8 and 32;
    a wrong result is marked, and suggest_layouts() takes the fastest right layout from those entries."""
    import argparse
    import time

    import numpy as np

    ref = np.random.default_rng(0).standard_normal((32, 40))
    faster, wrong = (ck.FORMS["warps"], 1, 2), (ck.FORMS["cluster"], 4, 8)
    gemv = (ck.FORMS["gemv"], 2, 1)
    tk = FakeKernel(ref, {faster: 7.0, wrong: 1.0, (0, 0, 0): 9.0, gemv: 6.0}, wrong=(wrong,))
    ctx = ck.Context(argparse.Namespace(repeats=2), None, None, 0.0, time.perf_counter(), log=lambda _m: None)
    ck.sweep(ctx, tk, [], "1b gate,up", 8192, 2048, 32, np.zeros((32, 2048), np.float16), ref, 1 << 20,
             {m: 1e-3 for m in (1, 8, 32)})
    gemv_layouts = sum(1 for form, _, _ in ck.SWEEP if form in ("gemv", "hgemv"))  # both GEMV forms: M = 1 only
    assert gemv_layouts >= 4 and len(ctx.sweeps) == 3 * len(ck.SWEEP) - 2 * gemv_layouts
    assert tk.seen.count((0, 0, 0)) == 3
    assert {e["m"] for e in ctx.sweeps} == {1, 8, 32} and all(e["block"] == 32 for e in ctx.sweeps)
    assert {e["m"] for e in ctx.sweeps if e["form"] in ("gemv", "hgemv")} == {1}  # swept at M = 1 only
    assert [e["ok"] for e in ctx.sweeps if (ck.FORMS.get(e["form"]), e["tile"], e["split"]) == wrong] == [False] * 3
    assert tk.config == (0, 0, 0)  # left as the rows' own calls expect: the op's layout
    rows = ck.suggest_layouts(ctx.sweeps)
    assert [r.split("  //")[0] for r in rows] == [
        "{1, 1, 8192, 8192, 2048, 2048, ONNXPIPE_INT4_GEMM_GEMV, 2, 1},",
        "{2, 8, 8192, 8192, 2048, 2048, ONNXPIPE_INT4_GEMM_WARPS, 1, 2},",
        "{17, 32, 8192, 8192, 2048, 2048, ONNXPIPE_INT4_GEMM_WARPS, 1, 2},"]


def test_a_bench_case_runs_its_sweep(ck: ModuleType, cpu_library: Path) -> None:  # noqa: F811
    """random_case on a bench case (1B o, block 32, no zero points) on the CPU reference op with a stand-in kernel:
    its rows are made and judged at M 1, 8, 32, and its sweep runs (the same case with zero points does not)."""
    import argparse
    import time

    runner = ck.OrtRunner("CPUExecutionProvider", cpu_library, graphs=False)
    swept = sum(1 for m in ck.SWEEP_MS for form, _, _ in ck.SWEEP if m <= ck.SWEEP_MAX_M.get(form, m))
    for with_zp in (False, True):
        tk = FakeKernel(None, {})
        ctx = ck.Context(argparse.Namespace(repeats=1, sweep=True), runner, tk, 0.0, time.perf_counter(),
                         copy_bytes=1, log=lambda _m: None)
        ck.random_case(ctx, "1b q,o", 2048, 2048, 32, with_zp, (1, 8, 32), set())
        assert [(r.m, r.ok) for r in ctx.rows] == [(1, True), (8, True), (32, True)]
        assert [(r.m, r.form) for r in ctx.rows] == [(1, "gemv"), (8, "warps"), (32, "warps")]
        assert len(ctx.sweeps) == (0 if with_zp else swept)
    # the rows' own calls: the op's layout at every M, each other form by its rule, the GEMV forms only where M <= 4
    forms = ck.FORMS  # (the last case, with zero points, has no sweep after its rows)
    assert tk.seen == [(0, 0, 0), (forms["warps"], 0, 0), (forms["cluster"], 0, 0), (forms["hgemv"], 0, 0),
                       (0, 0, 0), (forms["cluster"], 0, 0), (0, 0, 0), (forms["cluster"], 0, 0)]


@pytest.mark.parametrize("wrong_form", ["op", "warps", "cluster"])
def test_the_error_gate_covers_every_form(ck: ModuleType, cpu_library: Path, wrong_form: str) -> None:  # noqa: F811
    """A wrong result from the op's own layout through ctypes (the GEMV form at M = 1, warps at 8 and 32) fails every
    row; from the warps form only the M = 1 row, where it is another form beside the op's GEMV; the cluster form,
    another form at every M, every row."""
    import argparse
    import time

    runner = ck.OrtRunner("CPUExecutionProvider", cpu_library, graphs=False)
    config = (0, 0, 0) if wrong_form == "op" else (ck.FORMS[wrong_form], 0, 0)
    tk = FakeKernel(None, {}, wrong=(config,))
    ctx = ck.Context(argparse.Namespace(repeats=1, sweep=False), runner, tk, 0.0, time.perf_counter(),
                     copy_bytes=1, log=lambda _m: None)
    ck.random_case(ctx, "1b q,o", 2048, 2048, 32, True, (1, 8, 32), set())
    want = {"op": [False] * 3, "warps": [False, True, True], "cluster": [False] * 3}[wrong_form]
    assert [r.ok for r in ctx.rows] == want
