"""--engine ray with a worker process killed by SIGKILL mid-run, on a local Ray instance this test process starts
(so the workers are its descendants; scripts/ray_multi_gpu.py finds them the same way on a GPU host).

A worker killed once is restarted by Ray and its chunk sent again: the run completes with the local engine's
bytes. Workers that keep dying stop the run with one line (Ray's default retries forever); the chunks written stay
and --resume completes it with the same bytes."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest
from score.conftest import random_records, write_jsonl

from onnxpipe.errors import OnnxpipeError
from onnxpipe.score import ScoreConfig, score

ray = pytest.importorskip("ray")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from ray_multi_gpu import kill, ray_worker_pids  # noqa: E402


@pytest.fixture(scope="module")
def own_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _config(**kw) -> ScoreConfig:
    return ScoreConfig(**{"progress": False, "provider": "cpu", "chunk_records": 8, "threads": 1, **kw})


class Killer(threading.Thread):
    """Once OUT's checkpoint shows `after` chunks written, SIGKILLs a scoring worker: one (`every=False`), or
    every one it finds, every 50 ms, until `stop` is set or `limit` kills."""

    def __init__(self, out: Path, after: int, every: bool, limit: int = 40):
        super().__init__(daemon=True)
        self.out, self.after, self.every, self.limit = out, after, every, limit
        self.killed: list[int] = []
        self.stop = threading.Event()

    def chunks(self) -> int:
        try:
            return len(json.loads((self.out / "_checkpoint.json").read_text())["done_chunks"])
        except (OSError, ValueError, KeyError):
            return 0

    def run(self) -> None:
        while not self.stop.is_set() and len(self.killed) < self.limit:
            if self.chunks() >= self.after:
                self.killed += [p for p in ray_worker_pids()[:None if self.every else 1] if kill(p)]
                if self.killed and not self.every:
                    return
            time.sleep(0.05)


def _parts(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.glob("part-*.jsonl")))


@pytest.fixture(scope="module")
def scored(tiny_onnx, tmp_path_factory):
    """(model, input, the local engine's bytes): 300 records in 38 chunks of 8, long enough to be killed mid-run."""
    model = tiny_onnx("llama")
    tmp = tmp_path_factory.mktemp("ray-kill")
    inp = write_jsonl(tmp / "in.jsonl", random_records(300, seed=31, max_len=260))
    local = tmp / "local.jsonl"
    score(model, inp, local, _config(), log=lambda m: None)
    return model, inp, local.read_bytes()


def test_a_worker_killed_mid_run_is_restarted_and_the_run_completes(own_ray, scored, tmp_path):
    model, inp, local = scored
    out = tmp_path / "ray.jsonl"
    killer = Killer(out, after=3, every=False)
    killer.start()
    summary = score(model, inp, out, _config(engine="ray", num_workers=2), log=lambda m: None)
    killer.stop.set()
    killer.join()
    assert len(killer.killed) == 1, "the run ended before a worker could be killed"
    assert summary.runs == 1 and summary.records == 300
    ck = json.loads((out / "_checkpoint.json").read_text())
    assert ck["complete"] and sorted(ck["done_chunks"]) == list(range(38))  # each chunk once
    assert _parts(out) == local


def test_workers_that_keep_dying_stop_the_run_in_one_line_and_resume_completes(own_ray, scored, tmp_path, monkeypatch):
    import onnxpipe.score.engine_ray as engine_ray

    model, inp, local = scored
    monkeypatch.setattr(engine_ray, "WORKER_RETRIES", 1)  # two deaths exhaust a worker's restarts
    out = tmp_path / "ray.jsonl"
    killer = Killer(out, after=2, every=True)
    killer.start()
    try:
        with pytest.raises(OnnxpipeError) as err:
            score(model, inp, out, _config(engine="ray", num_workers=2), log=lambda m: None)
    finally:
        killer.stop.set()
        killer.join()
    message = str(err.value)
    # one line naming Ray's error (ActorDiedError in every run so far) and what to do
    assert "\n" not in message and re.search(r"a worker failed \(\w+Error: ", message) and "--resume" in message, message
    written = json.loads((out / "_checkpoint.json").read_text())["done_chunks"]
    assert 2 <= len(written) < 38 and not json.loads((out / "_checkpoint.json").read_text())["complete"]

    again = score(model, inp, out, _config(engine="ray", num_workers=2, resume=True), log=lambda m: None)
    assert again.runs == 2 and again.records == 300
    assert _parts(out) == local
