"""--engine ray on a local Ray instance with 2 CPU workers: the same rows as the local engine, and resumable
(the resume test is marked slow: `pytest -m slow tests/score`)."""

from __future__ import annotations

import json

import pytest
from score.conftest import random_records, write_jsonl

from onnxpipe.score import ScoreConfig, score

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _config(**kw) -> ScoreConfig:
    return ScoreConfig(**{"progress": False, "provider": "cpu", "chunk_records": 16, "threads": 1, **kw})


def test_ray_two_workers_equal_local(local_ray, tiny_onnx, tmp_path):
    model = tiny_onnx("llama")
    recs = random_records(120, seed=21, max_len=260)
    recs[40] = "nope"
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    local = tmp_path / "local.jsonl"
    score(model, inp, local, _config(), log=lambda m: None)

    out = tmp_path / "ray.jsonl"
    summary = score(model, inp, out, _config(engine="ray", num_workers=2), log=lambda m: None)
    parts = sorted(out.glob("part-*.jsonl"))
    assert len(parts) == 8 and summary.workers == 2 and summary.engine == "ray"
    merged = b"".join(p.read_bytes() for p in parts)
    assert merged == local.read_bytes()  # same chunks, same batches, same session settings: the same bytes
    ref_summary = json.loads((tmp_path / "local.summary.json").read_text())
    assert (summary.records, summary.tokens, summary.bad_records) == (119, ref_summary["tokens"], 1)
    assert summary.loglik == pytest.approx(ref_summary["loglik"], abs=1e-6)



class _Crash(BaseException):
    pass


@pytest.mark.slow  # ~30 s: a second and third Ray execution
def test_ray_driver_crash_after_a_part_then_resume(local_ray, tiny_onnx, tmp_path, monkeypatch):
    """The driver dies between writing a chunk's part file and checkpointing it: the resumed run redoes that chunk
    (and only the chunks not checkpointed), and the parts equal the local engine's output."""
    from onnxpipe.score.checkpoint import Checkpoint

    model = tiny_onnx("gpt2")
    inp = write_jsonl(tmp_path / "in.jsonl", random_records(100, seed=22, max_len=200))
    local = tmp_path / "local.jsonl"
    score(model, inp, local, _config(), log=lambda m: None)

    real_save, calls = Checkpoint.save, []

    def save(self, path):
        calls.append(1)
        if len(calls) == 4:  # the empty checkpoint, two chunks, then the crash on the third
            raise _Crash()
        real_save(self, path)

    out = tmp_path / "ray.jsonl"
    monkeypatch.setattr(Checkpoint, "save", save)
    with pytest.raises(_Crash):
        score(model, inp, out, _config(engine="ray", num_workers=2), log=lambda m: None)
    monkeypatch.setattr(Checkpoint, "save", real_save)
    assert len(list(out.glob("part-*.jsonl"))) == 3
    assert len(json.loads((out / "_checkpoint.json").read_text())["done_chunks"]) == 2
    again = score(model, inp, out, _config(engine="ray", num_workers=2, resume=True), log=lambda m: None)
    assert b"".join(p.read_bytes() for p in sorted(out.glob("part-*.jsonl"))) == local.read_bytes()
    assert again.runs == 2 and again.records == 100
