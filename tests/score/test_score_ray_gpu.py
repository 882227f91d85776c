"""--engine ray where the cluster has GPUs: one worker per GPU, each asking Ray for num_gpus=1 and opening its
session on the CUDA provider. Here Ray is told it has 2 GPUs that do not exist: the workers get one each, and the
CPU-only onnxruntime makes the provider choice fall back to the CPU, said once."""

from __future__ import annotations

import json

import pytest
from score.conftest import random_records, write_jsonl

from onnxpipe.errors import OnnxpipeError
from onnxpipe.score import ScoreConfig, score
from onnxpipe.score.engine_ray import _placement

ray = pytest.importorskip("ray")


class _Cluster:
    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


class _Job:
    def __init__(self, **config):
        self.config = ScoreConfig(engine="ray", **config)


@pytest.mark.parametrize("provider,want", [("cuda", (4, 1, 1.0)), ("tensorrt", (4, 1, 1.0)), ("auto", (4, 1, 1.0)),
                                           ("cpu", (16, 1, 0.0))])
def test_placement_one_worker_per_gpu(provider, want):
    assert _placement(_Cluster(CPU=16, GPU=4), _Job(provider=provider)) == want
    assert _placement(_Cluster(CPU=16, GPU=4), _Job(provider=provider, num_workers=2))[0] == 2


def test_placement_refuses_what_the_cluster_cannot_give():
    assert _placement(_Cluster(CPU=16), _Job(provider="auto")) == (16, 1, 0.0)  # auto without GPUs: CPU workers
    with pytest.raises(OnnxpipeError, match="no GPUs"):
        _placement(_Cluster(CPU=16), _Job(provider="cuda"))
    with pytest.raises(OnnxpipeError, match="--num-workers 4 or fewer"):
        _placement(_Cluster(CPU=16, GPU=4), _Job(provider="cuda", num_workers=5))


@pytest.fixture(scope="module")
def ray_with_two_fake_gpus():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_cuda_on_ray_takes_a_gpu_per_worker_and_falls_back_in_one_line(ray_with_two_fake_gpus, tiny_onnx, tmp_path):
    model = tiny_onnx("llama")
    inp = write_jsonl(tmp_path / "in.jsonl", random_records(60, seed=24, max_len=200))
    local = tmp_path / "local.jsonl"
    score(model, inp, local, ScoreConfig(progress=False, provider="cpu", chunk_records=16, threads=1), log=lambda m: None)

    said: list[str] = []
    out = tmp_path / "ray.jsonl"
    summary = score(model, inp, out, ScoreConfig(progress=False, provider="cuda", chunk_records=16, threads=1,
                                                 engine="ray"), log=said.append)
    assert summary.workers == 2  # one per GPU Ray reports
    assert summary.placement["gpus_per_worker"] == 1.0 and summary.placement["cpus_per_worker"] == 1
    seen = summary.placement["gpu_ids_seen"]  # per worker that scored a block: the GPU ids Ray gave it
    assert seen and all(len(ids) == 1 for ids in seen) and len({i[0] for i in seen}) == len(seen)
    assert {i[0] for i in seen} <= {0, 1}
    fallbacks = [m for m in said if "no CUDAExecutionProvider" in m]
    assert len(fallbacks) == 1 and fallbacks[0].startswith("ray worker: cuda was requested"), said
    assert summary.provider.startswith("provider: cpu") and "requested cuda" in summary.provider
    assert b"".join(p.read_bytes() for p in sorted(out.glob("part-*.jsonl"))) == local.read_bytes()
    assert json.loads((tmp_path / "ray.summary.json").read_text())["placement"]["workers"] == 2
