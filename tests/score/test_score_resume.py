"""Nothing lost, nothing twice: a run killed at any moment and resumed equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from score.conftest import random_records, read_jsonl, write_jsonl

from onnxpipe.errors import OnnxpipeError
from onnxpipe.score import ScoreConfig, score
from onnxpipe.score.checkpoint import Checkpoint


def _config(**kw) -> ScoreConfig:
    return ScoreConfig(**{"progress": False, "provider": "cpu", "chunk_records": 8, "threads": 1, **kw})


def _quiet(_m: str) -> None:
    pass


@pytest.fixture
def inputs(tmp_path):
    recs = random_records(400, seed=11, max_len=200)
    recs[57] = "{not json"  # bad records are part of the run's state too
    recs[203] = {"id": "empty", "input_ids": [7]}
    return write_jsonl(tmp_path / "in.jsonl", recs)


def _checkpoint(out: Path) -> dict:
    try:
        return json.loads(out.with_name(out.name + ".checkpoint.json").read_text())
    except (OSError, ValueError):
        return {}


def _start(model_dir: Path, inp: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "onnxpipe", "score", str(model_dir), str(inp), "-o", str(out), "--provider", "cpu",
           "--chunk-records", "8", "--threads", "1", "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, out: Path, past: int, timeout: float = 120) -> int:
    """SIGKILL the run as soon as its checkpoint covers more than ``past`` records; returns what it covered."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = _checkpoint(out).get("records_done", 0)
        if done > past:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return done
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("the run made no progress")


def test_sigkill_twice_then_resume_equals_uninterrupted(tiny_onnx, inputs, tmp_path):
    model = tiny_onnx("gpt2")
    ref = tmp_path / "ref.jsonl"
    score(model, inputs, ref, _config(), log=_quiet)

    out = tmp_path / "out.jsonl"
    first = _kill_when(_start(model, inputs, out), out, past=0)  # right after the first chunk lands
    assert not _checkpoint(out)["complete"]
    second = _kill_when(_start(model, inputs, out, "--resume"), out, past=first + 80)
    assert first < second < 400 and not _checkpoint(out)["complete"]
    done = subprocess.run([sys.executable, "-m", "onnxpipe", "score", str(model), str(inputs), "-o", str(out),
                           "--provider", "cpu", "--chunk-records", "8", "--threads", "1", "--no-progress", "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == ref.read_bytes()
    rows = read_jsonl(out)
    assert len(rows) == len({r["id"] for r in rows}) == 398
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    ref_summary = json.loads((tmp_path / "ref.summary.json").read_text())
    assert summary["runs"] == 3 and summary["bad_records"] == 2
    for key in ("records", "tokens", "loglik", "perplexity", "bad", "input_tokens"):
        assert summary[key] == ref_summary[key], key


class _Crash(BaseException):
    pass


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("crash_at", [1, 4, 51])  # 51: the final save, after the Parquet merge
def test_crash_between_output_and_checkpoint_loses_nothing(tiny_onnx, inputs, tmp_path, monkeypatch, fmt, crash_at):
    """The worst moment: a chunk's rows are on disk but its checkpoint is not."""
    model = tiny_onnx("gpt2")
    ref = tmp_path / f"ref.{fmt}"
    score(model, inputs, ref, _config(), log=_quiet)

    real_save, calls = Checkpoint.save, []

    def save(self, path):
        calls.append(1)
        if len(calls) == crash_at + 1:  # the first save is the empty checkpoint at the start
            raise _Crash()
        real_save(self, path)

    out = tmp_path / f"out.{fmt}"
    monkeypatch.setattr(Checkpoint, "save", save)
    with pytest.raises(_Crash):
        score(model, inputs, out, _config(), log=_quiet)
    monkeypatch.setattr(Checkpoint, "save", real_save)
    with pytest.raises(OnnxpipeError, match="pass --resume"):
        score(model, inputs, out, _config(), log=_quiet)
    score(model, inputs, out, _config(resume=True), log=_quiet)
    assert _rows(out) == _rows(ref)
    assert len(_rows(out)) == 398


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_jsonl(path)


def test_resume_refuses_changed_options_and_finished_runs_are_kept(tiny_onnx, inputs, tmp_path):
    model = tiny_onnx("gpt2")
    out = tmp_path / "out.jsonl"
    score(model, inputs, out, _config(), log=_quiet)
    before = out.read_bytes()
    with pytest.raises(OnnxpipeError, match="different stride"):
        score(model, inputs, out, _config(resume=True, stride=10), log=_quiet)
    messages = []
    again = score(model, inputs, out, _config(resume=True), log=messages.append)
    assert out.read_bytes() == before and any("already complete" in m for m in messages) and again.records == 398
    score(model, inputs, out, _config(force=True, task="loglik"), log=_quiet)
    assert "greedy" in read_jsonl(out)[0]


def test_resume_without_checkpoint_is_refused(tiny_onnx, inputs, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1}\n')
    with pytest.raises(OnnxpipeError, match="no checkpoint"):
        score(tiny_onnx("gpt2"), inputs, out, _config(resume=True), log=_quiet)
    assert out.read_text() == '{"id": 1}\n'
    assert not os.path.exists(str(out) + ".checkpoint.json")
