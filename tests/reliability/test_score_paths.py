"""`onnxpipe score` never deletes or overwrites its input, however the paths are spelled, and two runs on one output
never both write it: the second refuses while the first holds the output's lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import cli, digest, one_line_error

from onnxpipe.score import ScoreConfig, score
from onnxpipe.score import output as score_output


def _records(n: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"id": f"r{i}", "input_ids": rng.integers(0, 256, int(rng.integers(2, 60))).tolist()} for i in range(n)]


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _score(model: Path, inp: object, out: object, *extra: object):
    return cli("score", model, inp, "-o", out, "--provider", "cpu", "--no-progress", *extra)


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_force_never_deletes_the_input_file(spelling, tiny_onnx, tmp_path):
    """`score DIR IN.jsonl -o IN.jsonl --force` deleted IN.jsonl and died with `unexpected FileNotFoundError`."""
    data = tmp_path / "data"
    inp = _write(data / "in.jsonl", _records(5))
    out = {"same": inp, "dotdot": data / ".." / "data" / "in.jsonl", "symlink": tmp_path / "link.jsonl",
           "hardlink": tmp_path / "hard.jsonl"}[spelling]
    if spelling == "symlink":
        out.symlink_to(inp)
    elif spelling == "hardlink":
        os.link(inp, out)
    before = digest(data)
    one_line_error(_score(tiny_onnx("gpt2"), inp, out, "--force"), "the output is the input", "in.jsonl")
    assert digest(data) == before


def test_output_inside_the_input_directory_is_refused(tiny_onnx, tmp_path):
    """A directory of shards as input and the output inside it: the next run would read the output as a shard."""
    shards = tmp_path / "shards"
    _write(shards / "a.jsonl", _records(4))
    before = digest(shards)
    one_line_error(_score(tiny_onnx("gpt2"), shards, shards / "out.jsonl"), "is inside the input", "shards")
    one_line_error(_score(tiny_onnx("gpt2"), shards, tmp_path / "x" / ".." / "shards" / "o.jsonl", "--force"),
                   "is inside the input")
    assert digest(shards) == before


def test_output_in_the_model_directory_is_refused(tiny_onnx, tmp_path):
    """`score MODEL in.jsonl -o MODEL/x.jsonl` wrote its results, checkpoint and summary into the model directory
    (exit 0): the model directory is one of the run's inputs."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_onnx("gpt2"), model)
    inp = _write(tmp_path / "in.jsonl", _records(3))
    before = digest(model)
    one_line_error(_score(model, inp, model / "x.jsonl"), "is inside the input", str(model))
    one_line_error(_score(model, inp, tmp_path / "link" / ".." / "m" / "x.parquet"), "is inside the input")
    assert digest(model) == before


def test_parquet_parts_directory_is_never_the_input(tiny_onnx, tmp_path):
    """OUT.parquet's parts go in OUT.parquet.parts, which --force removes: an input of that name is refused."""
    parts = tmp_path / "o.parquet.parts"
    _write(parts / "a.jsonl", _records(4))
    before = digest(parts)
    one_line_error(_score(tiny_onnx("gpt2"), parts, tmp_path / "o.parquet", "--force"), "o.parquet.parts")
    assert digest(parts) == before


def test_ray_output_directory_holding_the_input_is_refused(tiny_onnx, tmp_path):
    """With --engine ray the output is a directory that --force replaces: an input inside it is refused (before
    Ray is imported)."""
    inp = _write(tmp_path / "out.jsonl" / "in.jsonl", _records(4))
    before = digest(tmp_path)
    one_line_error(_score(tiny_onnx("gpt2"), inp, tmp_path / "out.jsonl", "--engine", "ray", "--force"),
                   "the output contains the input")
    assert digest(tmp_path) == before


HOLD_LOCK = """
import sys, time
from onnxpipe.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_second_run_on_one_output_refuses_while_the_first_holds_it(tiny_onnx, tmp_path):
    """Two `score --resume` runs on one output duplicated 15-47 rows: now the output's lock is held for the whole
    run and a second process refuses at once, leaving the output and its checkpoint as they were."""
    model = tiny_onnx("gpt2")
    inp = _write(tmp_path / "in.jsonl", _records(40))
    out = tmp_path / "out.jsonl"
    score(model, inp, out, ScoreConfig(progress=False, provider="cpu", chunk_records=8), log=lambda m: None)
    ref = out.read_bytes()
    ckpt = out.with_name(out.name + ".checkpoint.json").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in (("--resume",), ("--force",)):
            one_line_error(_score(model, inp, out, "--chunk-records", "8", *extra), "another onnxpipe run is writing")
        assert out.read_bytes() == ref and out.with_name(out.name + ".checkpoint.json").read_bytes() == ckpt
    finally:
        holder.kill()
        holder.wait()
    assert _score(model, inp, out, "--chunk-records", "8", "--resume").exit_code == 0  # the lock died with it
    assert out.read_bytes() == ref


def test_two_real_resume_runs_write_each_row_once(tiny_onnx, tmp_path):
    """Two processes started together on one output: one scores, the other refuses; every record once."""
    model = tiny_onnx("gpt2")
    inp = _write(tmp_path / "in.jsonl", _records(300, seed=1))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "onnxpipe", "score", str(model), str(inp), "-o", str(out), "--provider", "cpu",
           "--chunk-records", "8", "--threads", "1", "--no-progress", "--resume"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    refused = [err for rc, err in results if rc != 0]
    assert all("another onnxpipe run is writing" in err for err in refused), results
    if not refused:  # the first finished before the second started: the second found it complete
        assert any("already complete" in err for _rc, err in results), results
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [f"r{i}" for i in range(300)]


def test_checkpoint_temp_names_are_per_process_and_stale_ones_go(tmp_path):
    target = tmp_path / "out.jsonl.checkpoint.json"
    assert str(os.getpid()) in score_output.temp_name(target).name
    stale = target.with_name(f".{target.name}.999999.tmp")
    stale.write_text("{}")
    keep = target.with_name(f".{target.name}.notes.tmp")  # not a name we make: left alone
    keep.write_text("mine")
    score_output.remove_stale_temps([target])
    assert not stale.exists() and keep.read_text() == "mine"
    score_output.write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == [
        keep.name, target.name]
