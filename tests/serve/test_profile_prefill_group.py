"""scripts/profile_prefill_group.py end to end on the CPU with a tiny model: every (k, capacity) row and every
generate row is timed and written; a capacity that cannot hold the prompt is skipped and said so."""

from __future__ import annotations

import json

import pytest
from scripts_module import load_script

pg = load_script("profile_prefill_group")


def test_the_rows_are_timed_and_written(stdlib_cuda_model, tmp_path, capsys):
    out = tmp_path / "pg.json"
    rc = pg.main([str(stdlib_cuda_model), "--groups", "1,2", "--capacities", "8,64", "--prompt-tokens", "8",
                  "--repeats", "1", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["run"], r["k"]) for r in rows] == [("run_group (logits)", 1), ("run_group (argmax)", 1),
                                                   ("run_group (logits)", 2), ("run_group (argmax)", 2),
                                                   ("generate (prefill + 1 step)", 1), ("generate (prefill + 1 step)", 2)]
    assert all(r["ms"] > 0 and r["ms_per_1024_tokens"] == pytest.approx(r["ms"] * 1024 / (r["k"] * 8)) for r in rows)
    assert all(r["first_ms"] > 0 for r in rows)  # the first call of each shape, timed apart
    assert rows[0]["capacity"] >= 64
    # a group run's parts (one call timed: --repeats 1): its decoder run and its head pick, inside its own time
    groups = [r for r in rows if r["run"].startswith("run_group")]
    assert all(0 < r["ort_ms"] and 0 < r["select_ms"] and r["ort_ms"] + r["select_ms"] <= r["ms"] for r in groups)
    assert all("ort_ms" not in r for r in rows if r["run"].startswith("generate"))
    captured = capsys.readouterr()
    assert "skipped: capacity 8" in captured.err and "| run_group (argmax) | 2 |" in captured.out


def test_bad_options_exit_with_one_line(stdlib_cuda_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pg.main([str(stdlib_cuda_model), "--groups", "0"])
    assert e.value.code == 2
    assert pg.main([str(tmp_path / "missing")]) == 2
    assert "no such model directory" in capsys.readouterr().err
