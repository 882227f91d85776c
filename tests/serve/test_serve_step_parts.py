"""scripts/serve_step_parts.py's arithmetic (no model, no server): how a level's timed window is split into decode
steps, prefill runs by kind and the rest, and which steps' parts are summarised."""

from __future__ import annotations

import pytest
from scripts_module import load_script

pytestmark = pytest.mark.fast

sp = load_script("serve_step_parts")


@pytest.fixture
def recorded(monkeypatch):
    steps = [{"at": 10.0, "total": 0.002, "rows": 32, "lane": False}, {"at": 10.5, "total": 0.003, "rows": 32,
             "lane": False}, {"at": 12.0, "total": 0.004, "rows": 32, "lane": False}]  # the last outside the window
    prefills = [(10.1, 0.005, "run_group", 1024), (10.2, 0.007, "run_group", 512), (10.3, 0.001, "run", 16),
                (9.0, 0.5, "run", 99)]  # the last before the window
    monkeypatch.setattr(sp, "STEPS", steps)
    monkeypatch.setattr(sp, "PREFILLS", prefills)


def test_a_window_splits_into_steps_prefill_runs_by_kind_and_the_rest(recorded):
    split = sp.timeline(10.0, 11.0)
    assert split["decode_steps"] == 2 and split["decode_s"] == pytest.approx(0.005)
    assert split["prefill_s"] == pytest.approx(0.013)
    assert split["prefill_by_kind"] == {"run": [0.001, 1, 16], "run_group": [0.012, 2, 1536]}
    assert split["prefill_run_ms"] == {"run": [1.0, 1.0], "run_group": [6.0, 7.0]}
    assert split["rest_s"] == pytest.approx(1.0 - 0.005 - 0.013)
    assert split["gc_by_generation"] == {} and split["slow_prefills_ms_kind_tokens_gc_ms"] == []
    assert sp.timeline(13.0, 14.0) == {"window_s": 1.0, "decode_steps": 0, "decode_s": 0, "prefill_s": 0,
                                       "prefill_by_kind": {}, "prefill_run_ms": {}, "rest_s": 1.0,
                                       "gc_by_generation": {}, "slow_prefills_ms_kind_tokens_gc_ms": []}


def test_a_window_counts_the_collectors_runs_and_names_the_slow_prefill_runs_they_fell_in(recorded, monkeypatch):
    """A prefill run over 3x its kind's p50 is listed with the collection inside it (run 55's 34-61 ms group runs:
    whether they are the collector's)."""
    monkeypatch.setattr(sp, "PREFILLS", [(10.1, 0.005, "run_group", 1024), (10.2, 0.006, "run_group", 1024),
                                         (10.3, 0.005, "run_group", 1024), (10.4, 0.040, "run_group", 1024),
                                         (10.6, 0.030, "run_group", 1024)])
    monkeypatch.setattr(sp, "GCS", [(10.41, 0.032, 2), (10.43, 0.0002, 0), (10.8, 0.0001, 0), (12.0, 0.05, 2)])
    split = sp.timeline(10.0, 11.0)
    assert split["gc_by_generation"] == {"0": [2, 0.3, 0.2], "2": [1, 32.0, 32.0]}
    assert split["slow_prefills_ms_kind_tokens_gc_ms"] == [[40.0, "run_group", 1024, 32.2],
                                                           [30.0, "run_group", 1024, 0.0]]


def test_the_summary_leaves_out_a_steps_start_time():
    out = sp.summary([{"at": 5.0, "total": 0.002, "run_graph": 0.001}, {"at": 6.0, "total": 0.004}])
    assert "at" not in out and out["steps"] == 2
    assert out["total"][2] == pytest.approx(3.0) and out["run_graph"][2] == pytest.approx(0.5)
