"""scripts/profile_decode.py's side of the kernel profile, without a GPU: a CUPTI trace (torch.profiler's chrome
format) read into per-step kernels, kinds and busy time; int4 before and after onnxpipe's kernels compared per batch;
the runs' order and the --budget-s cut."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from scripts_module import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "profile_decode.py"


@pytest.fixture(scope="module")
def pd() -> ModuleType:
    return load_script("profile_decode")


OURS = "void (anonymous namespace)::int4_gemm_kernel<1, 1, 4>(__half const*, unsigned char const*, int)"
NBITS = "void onnxruntime::contrib::cuda::MatMulFloat4BitsKernelM1<__half, 32, false>(__half*, __half const*, int)"
GEMM = "nvjet_sm90_hsh_64x8_64x16_2x1_v_bz_NNT"
ATTN = "onnxruntime::contrib::cuda::H64::grp4_fp16::kernel_mha(unsigned int, unsigned int, float)"
NORM = "void onnxruntime::contrib::cuda::SkipLayerNormKernelSmall<__half, 256u, 8, true>(__half*, __half*)"


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
                                    ("void onnxruntime::cuda::RangeKernel<long>(long, long)", 100, 3)])
    r = pd.kernel_table(t, steps=2, t_wall=0.001)
    assert r["busy_ms"] == pytest.approx((15 + 4 + 6 + 8 + 2 + 1 + 3) / 1e3 / 2)  # OURS twice overlapping: 0-15
    assert r["kernel_sum_ms"] == pytest.approx((20 + 4 + 6 + 8 + 2 + 1 + 3) / 1e3 / 2)
    assert r["wall_ms"] == pytest.approx(0.5) and r["kernels_per_step"] == 4.0
    assert r["groups"] == {"int4 GEMM (onnxpipe)": {"us": 10.0, "count": 1.0},
                           "attention": {"us": 4.0, "count": 0.5}, "GEMM (cuBLAS, CUTLASS)": {"us": 3.0, "count": 0.5},
                           "MatMulNBits (onnxruntime)": {"us": 2.0, "count": 0.5},
                           "other": {"us": 1.5, "count": 0.5}, "norms": {"us": 1.0, "count": 0.5},
                           "copies and sets": {"us": 0.5, "count": 0.5}}
    assert r["top"][0] == {"name": OURS, "us": 10.0, "count": 1.0, "longest_us": 10.0}


def test_our_gemv_is_ours_not_onnxruntimes(pd: ModuleType, tmp_path: Path) -> None:
    """The batch-1 GEMV form's kernel counts as onnxpipe's int4 GEMM, not under onnxruntime's `[Ii]nt4` pattern."""
    gemv = "void (anonymous namespace)::int4_gemv_kernel<2>(__half const*, unsigned char const*, int)"
    r = pd.kernel_table(trace(tmp_path / "g.json", [(gemv, 0, 6), (NBITS, 10, 4)]), steps=1, t_wall=0.001)
    assert r["groups"]["int4 GEMM (onnxpipe)"] == {"us": 6.0, "count": 1.0}
    assert r["groups"]["MatMulNBits (onnxruntime)"] == {"us": 4.0, "count": 1.0}


def test_longest_call_a_step_is_the_heads(pd: ModuleType, tmp_path: Path) -> None:
    """Three steps of four calls of one GEMM kernel, one of them long (the head): its time per call comes out, not
    the mean of all twelve; the comparison names it before and after."""
    step = [(NBITS, 0, 5), (NBITS, 10, 5), (NBITS, 20, 5), (NBITS, 30, 60)]
    before = pd.kernel_table(trace(tmp_path / "b.json", [(n, ts + 100 * i, d) for i in range(3) for n, ts, d in step]),
                             steps=3, t_wall=0.003)
    assert before["top"][0]["longest_us"] == 60.0 and before["top"][0]["us"] == 75.0
    ours = [(OURS, 0, 4), (OURS, 10, 4), (OURS, 20, 4), (OURS, 30, 90)]
    after = pd.kernel_table(trace(tmp_path / "a.json", [(n, ts + 100 * i, d) for i in range(3) for n, ts, d in ours]),
                            steps=3, t_wall=0.003)
    lines = pd.compare(dict(before, variant="x", batch=1), dict(after, variant="y", batch=1))
    assert lines[-1].startswith("  the longest int4 GEMM call a step (the LM head): 60.0 -> 90.0 us")


def test_kinds_of_run_7s_kernels(pd: ModuleType) -> None:
    """The kinds on the names of a real profile (run 7, H100): every int4 GEMM call of the int4 step is
    onnxruntime's MatMulNBits (81 a step: 16 layers x 5 and the head) and every fp16 GEMM a GEMM; neither is left
    in "other"."""
    run7 = json.loads((ROOT / "benchmarks" / "results" / "profile_decode-run7.json").read_text())
    rows = {r["variant"]: r for r in run7["rows"]}
    kinds = {v: {} for v in ("onnxpipe_int4_graph", "onnxpipe_graph")}
    for v, got in kinds.items():
        for k in rows[v]["top"]:
            got.setdefault(pd.kernel_group(k["name"]), []).append(k)
    nbits = kinds["onnxpipe_int4_graph"]["MatMulNBits (onnxruntime)"]
    assert [k["count"] for k in nbits] == [81.0] and "MatMulFloat4BitsKernelM1" in nbits[0]["name"]
    gemm = kinds["onnxpipe_graph"]["GEMM (cuBLAS, CUTLASS)"]
    assert sum(k["count"] for k in gemm) == 32 + 16 + 32 + 1 + 16  # the nvjet GEMMs and split-K's reductions
    for got in kinds.values():
        assert not any(w in k["name"] for k in got.get("other", []) for w in ("nvjet", "4Bits", "kernel_mha", "RoPE"))


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
    # the float16 pairs: plain -> the kernels -> the kernels with Linear, each its own comparison
    fp16 = [dict(before, variant=v, batch=1) for v in ("onnxpipe_graph", "onnxpipe_graph_kernels",
                                                       "onnxpipe_graph_kernels_linear")]
    heads = [ln.split(":")[1].strip() for ln in pd.compare_rows(fp16) if ln.startswith("batch ")]
    assert heads == ["onnxpipe_graph -> onnxpipe_graph_kernels", "onnxpipe_graph_kernels -> onnxpipe_graph_kernels_linear"]
    assert pd.kernel_options("onnxpipe_graph_kernels_linear") == {"kernels": "on", "kernel_skip": ""}


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


def test_each_variant_gets_its_kernels(pd: ModuleType) -> None:
    assert pd.kernel_options("onnxpipe_int4_graph") == {"kernels": "off", "kernel_skip": ""}
    assert pd.kernel_options("onnxpipe_int4_graph_kernels") == {"kernels": "on", "kernel_skip": ""}
    assert pd.kernel_options("onnxpipe_int4_graph_kernels_nohead") == {"kernels": "on", "kernel_skip": "head"}
    assert pd.kernel_options("onnxpipe_graph") == {"kernels": "off", "kernel_skip": ""}



# ---- a long prompt's chunk beside a decode step (the chunk_* variants) ----
def test_chunk_plan_profiles_the_first_and_last_chunks_and_reads_the_rest(pd: ModuleType) -> None:
    plan = pd.chunk_plan(4096, 64, 8)
    assert plan["chunks@0"] == list(range(0, 512, 64))
    assert plan["chunks@end"] == plan["iteration@end"] == list(range(3584, 4096, 64))  # the last 8, read twice
    assert plan["read"] == list(range(512, 3584, 64))
    assert sorted(plan["chunks@0"] + plan["read"] + plan["chunks@end"]) == list(range(0, 4096, 64))  # each once


def test_chunk_shapes_that_cannot_run_say_which_flag(pd: ModuleType) -> None:
    assert pd.chunk_args_error(32, 4352, 4096, 64, 8, 128) is None
    assert "--chunk-tokens" in pd.chunk_args_error(32, 4352, 4000, 64, 8, 128)  # not a whole number of chunks
    assert "--chunks" in pd.chunk_args_error(32, 4352, 4096, 64, 40, 128)  # 64 chunks < 2 x 40
    assert "--chunk-capacity" in pd.chunk_args_error(32, 4100, 4096, 64, 8, 128)  # no room for the steps
    assert "--chunk-rows" in pd.chunk_args_error(1, 4352, 4096, 64, 8, 128)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--variants", "chunk_graph", "--chunk-capacity", "4100"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--chunk-capacity (4100) must hold" in proc.stderr.splitlines()[-1]


def test_chunk_variants_run_once_and_the_budget_cut_lists_them(pd: ModuleType, tmp_path: Path) -> None:
    assert pd.runs(["chunk_graph", "onnxpipe_graph", "chunk_nograph"], [1, 8]) == [
        ("onnxpipe_graph", 1), ("onnxpipe_graph", 8), ("chunk_graph", 1), ("chunk_nograph", 1)]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), "--out", str(out),
                           "--variants", "chunk_graph,chunk_nograph", "--budget-s", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "profile_decode.json").read_text())
    assert result["skipped"] == ["chunk_graph: past --budget-s", "chunk_nograph: past --budget-s"]
    assert result["chunks"] == []


def _part(pd: ModuleType, tmp_path: Path, part: str, kernels: list[tuple[str, float, float]], n: int = 2) -> dict:
    """A chunk_* part's row as the child emits it, its kernels ``n`` times over (one set a chunk)."""
    events = [(name, ts + 10000 * i, dur) for i in range(n) for name, ts, dur in kernels]
    r = pd.kernel_table(trace(tmp_path / f"{part}.json", events), steps=n, t_wall=n * 0.005)
    offsets = {"chunks@0": [0, 64], "chunks@end": [3968, 4032], "iteration@end": [3968, 4032], "step": [0, 0]}[part]
    return dict(r, variant="chunk_graph", batch=32, capacity=4352, chunk_tokens=64, prompt=4096, context=128,
                part=part, offsets=offsets, how={"replayed": n} if part != "step" else {}, skipped={}, graph_error="",
                steps_fed={"fed": n} if part in ("iteration@end", "step") else {})


def test_chunk_summary_puts_the_start_beside_the_end_and_a_chunk_beside_a_step(pd: ModuleType,
                                                                                tmp_path: Path) -> None:
    """Attention that grows from 100 to 2100 us a chunk between the prompt's start and its end, GEMMs that do not:
    the summary gives each kind's move, attention's share at both offsets, names attention as the kind that grew and
    the largest near the end, and the chunk's device time against the step's."""
    rows = [_part(pd, tmp_path, "chunks@0", [(GEMM, 0, 500), (ATTN, 600, 100)]),
            _part(pd, tmp_path, "chunks@end", [(GEMM, 0, 500), (ATTN, 600, 2100)]),
            _part(pd, tmp_path, "iteration@end", [(GEMM, 0, 500), (ATTN, 600, 2100), (GEMM, 2800, 900)]),
            _part(pd, tmp_path, "step", [(GEMM, 0, 900), (NORM, 950, 50)])]
    lines = pd.chunk_summary(rows)
    assert lines[0] == "chunk_graph: a chunk at offsets 0-64 -> 3968-4032 (per chunk):"
    kinds = {ln.split("  ")[1].strip(): ln for ln in lines[1:3]}
    assert "(+2000.0)" in kinds["attention"] and "(+0.0)" in kinds["GEMM (cuBLAS, CUTLASS)"]
    verdict = next(ln for ln in lines if "attention a chunk" in ln)
    assert "100.0 us of 600.0 (17%) at the start, 2100.0 us of 2600.0 (81%) near the end" in verdict
    assert verdict.endswith("the largest kind near the end: attention (2100.0 us); the kind that grew most: attention")
    assert lines[-1] == ("  a chunk near the end: 2.600 ms of device time, 2.74 x the 32-row decode step's 0.950 ms; "
                         "a chunk then a step (iteration@end): 3.500 ms busy, 5.000 ms wall (the two alone: 3.550 ms)")
    line = pd.chunk_part_line(rows[1])
    assert line.startswith("chunk_graph chunks@end (offsets 3968-4032 of 4096, 64 tokens a chunk; 32 rows x 4352): "
                           "wall 5.0 ms/chunk, device busy 2.6 ms, kernels/chunk 2.0; chunks replayed 2; by kind: "
                           "attention 2100.0us x1; GEMM (cuBLAS, CUTLASS) 500.0us x1")
    assert "the row read parked at 4096" in pd.chunk_part_line(rows[3])
    assert pd.chunk_summary([{k: v for k, v in r.items() if k != "groups"} for r in rows]) == []  # no CUPTI: none


def test_chunk_variants_on_the_cpu_read_the_prompt_beside_steps(cuda_form, tmp_path: Path) -> None:
    """The smoke run (--provider cpu, a tiny CUDA-form model): both variants give the four parts, at the plan's
    offsets, with how their chunks ran; chunk graphs asked for on the CPU run uncaptured and say why (no slot)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), "--out", str(out),
                           "--provider", "cpu", "--variants", "chunk_graph,chunk_nograph",
                           "--chunk-model", str(cuda_form("llama")), "--chunk-rows", "4", "--chunk-capacity", "128",
                           "--chunk-prompt", "96", "--chunk-tokens", "16", "--chunks", "2", "--prompt", "16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "profile_decode.json").read_text())["rows"]
    assert [(r["variant"], r["part"]) for r in rows] == [(v, p) for v in ("chunk_graph", "chunk_nograph")
                                                          for p in ("chunks@0", "chunks@end", "iteration@end", "step")]
    for r in rows:
        assert r["batch"] == 4 and r["capacity"] == 128 and r["steps"] == 2 and r["wall_ms"] > 0
        chunks = {"chunks@0": [0, 16], "chunks@end": [64, 80], "iteration@end": [64, 80]}.get(r["part"])
        if chunks:
            assert r["offsets"] == chunks and r["how"] == {"uncaptured": 2}
            assert r["skipped"] == ({"no_slot": 2} if r["variant"] == "chunk_graph" else {})
        if r["part"] in ("iteration@end", "step"):
            assert sum(r["steps_fed"].values()) == 2
    assert proc.stdout.count("ms/chunk") == 4 and proc.stdout.count("ms/iteration") == 2


def test_chunk_graph_replays_its_chunks_beside_fed_steps_through_the_graph_slot_path(pd: ModuleType, cuda_form,
                                                                                   monkeypatch, capsys,
                                                                                   tmp_path: Path) -> None:
    """The child's GPU path on the CPU: its session through the CUDA-graph slot path minus the GPU (serve's stand-in,
    which runs a graph id's first use 3 times as onnxruntime's capture does). With chunk graphs, the row's graphs
    are captured ahead at every width under the capacity and every profiled chunk replays one; without, every chunk
    runs uncaptured; in both the decode steps beside them are fed on the device, as serve's are while a prompt is
    read."""
    from serve.test_slots import _GraphRuns

    import onnxpipe.runtime.session as session_module

    real = session_module.DecoderSession

    def with_graphs(path, provider, cuda_graph, **kwargs):  # noqa: ANN001, ANN003, ANN202
        s = real(path, "cpu", threads=1, **kwargs)
        s.cuda_graph = cuda_graph
        s.session = _GraphRuns(s.session)
        return s

    monkeypatch.setattr(session_module, "DecoderSession", with_graphs)
    spec = {"provider": "cpu", "chunk_rows": 4, "chunks": 2, "chunk_tokens": 16, "chunk_prompt": 96,
            "chunk_capacity": 128, "prompt": 16}
    got = {}
    for v in pd.CHUNK_VARIANTS:
        pd.child_chunk(dict(spec, variant=v, out=str(tmp_path)), str(cuda_form("llama")),
                       graph=v == "chunk_graph")
        got[v] = {r["part"]: r for r in (json.loads(ln[len(pd.RESULT):]) for ln in capsys.readouterr().out.splitlines()
                                         if ln.startswith(pd.RESULT))}
    assert got["chunk_graph"]["chunks@0"]["graphs_captured_ahead"] == 4  # widths 8, 16, 32, 64 (< 128)
    for v, how in (("chunk_graph", "replayed"), ("chunk_nograph", "uncaptured")):
        parts = got[v]
        assert list(parts) == list(pd.CHUNK_PARTS)
        for p in ("chunks@0", "chunks@end", "iteration@end"):
            assert parts[p]["how"] == {how: 2} and parts[p]["skipped"] == {} and not parts[p]["graph_error"]
        assert parts["iteration@end"]["steps_fed"] == parts["step"]["steps_fed"] == {"fed": 2}
