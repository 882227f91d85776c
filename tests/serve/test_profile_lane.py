"""scripts/profile_lane.py on the CPU with a tiny model (its smoke form): every kind of run is timed, the spread
step's rows keep the step's mean length, and the kernel tables add up; --kernels asks for the CUDA EP."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scripts_module import load_script

pl = load_script("profile_lane")


def test_each_kind_is_timed_and_written(stdlib_cuda_model, tmp_path):
    out = tmp_path / "lane.json"
    rc = pl.main([str(stdlib_cuda_model), "--provider", "cpu", "--batch", "4", "--row-context", "16", "--contexts",
                  "8", "--widths", "4", "--capacity", "128", "--runs", "2", "--spread", "--json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())
    assert (row["context"], row["width"]) == (8, 4)
    assert all(row[f"{k}_eager_ms"] > 0 for k in ("step", "apart", "lane", "step_spread"))


def test_the_spread_step_keeps_the_mean_length():
    feed = {"attention_mask": np.ones((4, 64), np.int64), "position_ids": np.full((4, 1), 15, np.int64)}
    got = pl.spread(feed, 16)
    lengths = got["attention_mask"].sum(axis=1)
    assert lengths.tolist() == [1, 11, 21, 31] and lengths.mean() == 16
    assert got["position_ids"][:, 0].tolist() == [0, 10, 20, 30]
    assert feed["attention_mask"].sum() == 4 * 64  # the step's own feed untouched


def test_kernel_tables_and_the_lanes_excess():
    table = pl.kernel_table([("gemm", 3000.0, 6), ("attn", 600.0, 3), ("gemm", 300.0, 3)], runs=3)
    assert table["gemm"] == (pytest.approx(1.1), 3) and table["attn"] == (pytest.approx(0.2), 1)
    rows = pl.excess(table, {"gemm": (0.5, 2), "copy": (0.3, 1)})
    assert [(round(ms, 3), n, name) for ms, n, name in rows] == [(0.6, 1, "gemm"), (-0.3, -1, "copy"),
                                                                   (0.2, 1, "attn")]


def test_kernels_need_the_cuda_ep(stdlib_cuda_model):
    with pytest.raises(SystemExit, match="--kernels profiles the CUDA EP"):
        pl.main([str(stdlib_cuda_model), "--provider", "cpu", "--kernels", "3"])


def test_a_missing_model_directory_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no such model directory"):
        pl.main([str(tmp_path / "absent"), "--provider", "cpu"])
