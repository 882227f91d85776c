"""scripts/profile_decode.py's side of the kernel profile, without a GPU: a CUPTI trace (torch.profiler's chrome
format) read into per-step kernels, kinds and busy time; int4 before and after onnxpipe's kernels compared per batch;
the runs' order and the --budget-s cut."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "profile_decode.py"


@pytest.fixture(scope="module")
def pd() -> ModuleType:
    spec = importlib.util.spec_from_file_location("profile_decode", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OURS = "void (anonymous namespace)::int4_gemm_kernel<1, 1, 4>(__half const*, unsigned char const*, int)"
NBITS = "void onnxruntime::contrib::cuda::MatMulFloatInt4Kernel<__half, 8>(__half*, __half const*, int)"
GEMM = "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64"
ATTN = "void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<64, 64, 256, 4>>(Flash_fwd_params)"
NORM = "void onnxruntime::contrib::cuda::SkipLayerNormKernelSmall<__half, float, __half, 256, 8, true>(int)"


def trace(path: Path, kernels: list[tuple[str, float, float]], cat: str = "kernel") -> Path:
    """A chrome trace holding ``kernels`` as (name, start us, duration us), plus a CPU event that must be ignored."""
    events = [{"cat": cat if not name.startswith("Memcpy") else "gpu_memcpy", "name": name, "ts": ts, "dur": dur}
              for name, ts, dur in kernels]
    events.append({"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 1e6})
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_kernel_table_per_step_kinds_and_busy(pd: ModuleType, tmp_path: Path) -> None:
    """Two steps: per-step time and count of each kernel and kind (ours before onnxruntime's int4 pattern), and the
    busy time as the union of the intervals (overlaps counted once), CPU events ignored."""
    t = trace(tmp_path / "t.json", [(OURS, 0, 10), (OURS, 5, 10), (NBITS, 30, 4), (GEMM, 40, 6), (ATTN, 50, 8),
                                    (NORM, 60, 2), ("Memcpy HtoD (Pageable -> Device)", 70, 1),
                                    ("elementwise_kernel", 100, 3)])
    r = pd.kernel_table(t, steps=2, t_wall=0.001)
    assert r["busy_ms"] == pytest.approx((15 + 4 + 6 + 8 + 2 + 1 + 3) / 1e3 / 2)  # OURS twice overlapping: 0-15
    assert r["kernel_sum_ms"] == pytest.approx((20 + 4 + 6 + 8 + 2 + 1 + 3) / 1e3 / 2)
    assert r["wall_ms"] == pytest.approx(0.5) and r["kernels_per_step"] == 4.0
    assert r["groups"] == {"int4 GEMM (onnxpipe)": {"us": 10.0, "count": 1.0},
                           "attention": {"us": 4.0, "count": 0.5}, "GEMM (cuBLAS, CUTLASS)": {"us": 3.0, "count": 0.5},
                           "MatMulNBits (onnxruntime)": {"us": 2.0, "count": 0.5},
                           "other": {"us": 1.5, "count": 0.5}, "norms": {"us": 1.0, "count": 0.5},
                           "copies and sets": {"us": 0.5, "count": 0.5}}
    assert r["top"][0] == {"name": OURS, "us": 10.0, "count": 1.0}


def test_compare_before_and_after(pd: ModuleType, tmp_path: Path) -> None:
    """int4 plain against int4 with our kernels at one batch: the step and busy time, each kind's us before ->
    after (a kind on one side only is 0 on the other), and the kernels that moved most, largest first."""
    before = pd.kernel_table(trace(tmp_path / "b.json", [(NBITS, 0, 40), (ATTN, 50, 10)]), steps=1, t_wall=0.0011)
    after = pd.kernel_table(trace(tmp_path / "a.json", [(OURS, 0, 55), (ATTN, 60, 10)]), steps=1, t_wall=0.0012)
    rows = [dict(before, variant="onnxpipe_int4_graph", batch=1), dict(after, variant="onnxpipe_int4_graph_kernels",
                                                                         batch=1),
            dict(before, variant="onnxpipe_int4_graph", batch=8)]  # no after at batch 8: no comparison
    lines = pd.compare_rows(rows)
    assert lines[0].startswith("batch 1: onnxpipe_int4_graph -> onnxpipe_int4_graph_kernels: wall 1.100 -> 1.200 "
                               "ms/step, device busy 0.050 -> 0.065 ms (+15.0 us)")
    kinds = {ln.split("  ")[1].strip(): ln for ln in lines[1:4]}
    assert "(-40.0)" in kinds["MatMulNBits (onnxruntime)"] and "(+55.0)" in kinds["int4 GEMM (onnxpipe)"]
    assert "(+0.0)" in kinds["attention"]
    assert "+55.0 us  0.0 -> 55.0" in lines[4] and "-40.0 us  40.0 -> 0.0" in lines[5]
    assert len([ln for ln in lines if ln.startswith("batch ")]) == 1


def test_runs_pair_each_batch_first(pd: ModuleType) -> None:
    assert pd.runs(["onnxpipe_int4_graph", "levels", "onnxpipe_int4_graph_kernels"], [1, 8]) == [
        ("onnxpipe_int4_graph", 1), ("onnxpipe_int4_graph_kernels", 1), ("onnxpipe_int4_graph", 8),
        ("onnxpipe_int4_graph_kernels", 8), ("levels", 1)]


def test_budget_starts_nothing_past_it(tmp_path: Path) -> None:
    """--budget-s 0: no child runs and every (variant, batch) is listed as skipped, in the results file too."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), "--out", str(out),
                           "--variants", "onnxpipe_int4_graph,onnxpipe_int4_graph_kernels", "--batches", "1,8",
                           "--budget-s", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "profile_decode.json").read_text())
    assert proc.stdout.count("skipped (past --budget-s 0)") == 4
    assert "===== " not in (out / "profile_decode.log").read_text()
    assert result["rows"] == [] and result["compare"] == []
    assert result["skipped"] == ["onnxpipe_int4_graph: past --budget-s", "onnxpipe_int4_graph_kernels: past --budget-s",
                                 "onnxpipe_int4_graph b8: past --budget-s",
                                 "onnxpipe_int4_graph_kernels b8: past --budget-s"]
