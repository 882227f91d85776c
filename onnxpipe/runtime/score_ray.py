"""The Ray engine of ``onnxpipe score``: the same chunks, windows and batches as the local engine, on Ray Data.

The driver reads, validates and tokenizes the input (so bad records are reported with their line numbers exactly
as locally) and hands each chunk to Ray Data as one block of rows ``(chunk, index, tokens, score_from)``.
``map_batches`` runs ``RayChunkScorer``, a callable class: each worker (a Ray actor) opens one onnxruntime session
in its constructor and scores whole blocks with ``score_items``, so a chunk is batched exactly as the local engine
batches it. With a CUDA/TensorRT provider each worker asks for one GPU (``num_gpus=1``) and there is one worker
per GPU; on CPUs each worker takes ``threads`` CPUs (default 1).

Results stream back to the driver, which writes one part file per chunk (``OUTPUT/part-NNNNN.jsonl|parquet``,
atomically) and then the checkpoint ``OUTPUT/_checkpoint.json`` naming the chunks that are durable. ``--resume``
sends only the chunks that are not. Concatenating the parts in name order gives the local engine's output.

Cluster: ``ray.init(address=...)`` with ``--ray-address`` or ``$RAY_ADDRESS``; every node needs onnxpipe installed
and MODEL_DIR at the same path (a shared file system); the driver needs the input and output paths.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime import score_io
from onnxpipe.runtime.score import (
    Encoder, Item, ScoreJob, ScoreSummary, WindowScorer, finish, finished_summary, make_summary, progress_bar, record_bad, result_row,
    score_items, split_chunk, start,
)


class RayChunkScorer:
    """map_batches callable: one onnxruntime session per worker, opened once."""

    def __init__(self, model_dir: str, provider: str, threads: int | None, context: int, stride: int,
                 batch_tokens: int, max_padding: float):
        self.scorer = WindowScorer.open(model_dir, provider, threads)
        self.args = (context, stride, batch_tokens, max_padding)

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        cols = batch.to_pydict()
        out: dict[str, list[Any]] = {k: [] for k in ("chunk", "index", "loglik", "tokens", "greedy", "input_tokens",
                                                     "padded_slots", "provider")}
        for chunk in sorted(set(cols["chunk"])):  # a block is one chunk; group anyway in case Ray merged blocks
            rows = [i for i, c in enumerate(cols["chunk"]) if c == chunk]
            items = [Item(list(cols["tokens"][i]), int(cols["score_from"][i])) for i in rows]
            results, stats = score_items(self.scorer, items, *self.args)
            for j, (i, (ll, n, g)) in enumerate(zip(rows, results)):
                out["chunk"].append(chunk)
                out["index"].append(cols["index"][i])
                out["loglik"].append(ll)
                out["tokens"].append(n)
                out["greedy"].append(g)
                out["input_tokens"].append(stats.input_tokens if j == 0 else 0)
                out["padded_slots"].append(stats.padded_slots if j == 0 else 0)
                out["provider"].append(self.scorer.provider)
        return {k: np.asarray(v) for k, v in out.items()}


def _import_ray() -> Any:
    try:
        import pyarrow  # noqa: F401
        import ray
    except ImportError:
        raise OnnxpipeError("--engine ray needs ray and pyarrow: pip install 'onnxpipe[ray]'") from None
    return ray


def _connect(ray: Any, address: str | None, log: Callable[[str], None]) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    log(f"ray: {'joining ' + address if address else 'starting a local instance'}")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")


def _placement(ray: Any, job: ScoreJob) -> tuple[int, int, float]:
    """(workers, cpus per worker, gpus per worker)."""
    c = job.config
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = c.threads or 1
    use_gpu = c.provider in ("cuda", "tensorrt") or (c.provider == "auto" and gpus > 0)
    if use_gpu:
        if gpus == 0:
            raise OnnxpipeError(f"--provider {c.provider} on Ray: the cluster has no GPUs; use --provider cpu")
        return c.num_workers or gpus, cpus, 1.0
    return c.num_workers or max(1, int(resources.get("CPU", 1)) // cpus), cpus, 0.0


def score_on_ray(job: ScoreJob, log: Callable[[str], None]) -> ScoreSummary:
    ray = _import_ray()
    import pyarrow as pa

    c = job.config
    ckpt = start(job, log)
    if ckpt.complete:
        return finished_summary(job, ckpt)
    for p in job.parts_dir.iterdir():  # parts a killed driver wrote but did not checkpoint
        if p.name.startswith(".") or (p.name.startswith("part-") and int(p.name[5:10]) not in ckpt.done_chunks):
            p.unlink()
    done = set(ckpt.done_chunks)
    encoder = Encoder(job.model_dir)
    pending: dict[int, tuple[list[Any], list[score_io.BadRecord], int]] = {}  # chunk -> (ids, bad, n_records)
    tables = []
    for index, chunk in enumerate(job.chunks()):
        if index in done:
            continue
        records, items, bads = split_chunk(job, encoder.items, chunk)
        pending[index] = ([r.id for r in records], bads, len(chunk))
        if items:
            tables.append(pa.table({
                "chunk": pa.array([index] * len(items), pa.int64()),
                "index": pa.array(range(len(items)), pa.int64()),
                "tokens": pa.array([it.tokens for it in items], pa.list_(pa.int64())),
                "score_from": pa.array([it.score_from for it in items], pa.int64()),
            }))
    ckpt.runs += 1
    bar = progress_bar(job, ckpt.records_done)
    t_last = time.perf_counter()
    provider = "none (nothing to score)"

    def commit(index: int, results: dict[int, tuple[float, int, bool]], input_tokens: int, padded: int) -> None:
        nonlocal t_last
        ids, bads, n_records = pending.pop(index)
        rows = [result_row(ids[k], *results[k], c.task) for k in range(len(ids))]
        score_io.write_part(job.part_path(index), rows, job.fmt)
        record_bad(ckpt, bads, bar.write)
        ckpt.done_chunks.append(index)
        ckpt.records_done += n_records
        ckpt.records_scored += len(rows)
        ckpt.loglik += sum(r["loglik"] for r in rows)
        ckpt.tokens += sum(r["tokens"] for r in rows)
        ckpt.input_tokens += input_tokens
        ckpt.padded_slots += padded
        now = time.perf_counter()
        ckpt.seconds += now - t_last
        t_last = now
        ckpt.save(job.checkpoint_path)
        bar.update(n_records)

    workers, cpus, gpus = 0, 0, 0.0
    try:
        for index in [i for i, (ids, _b, _n) in pending.items() if not ids]:
            commit(index, {}, 0, 0)  # chunks of bad records only
        if tables:
            _connect(ray, c.ray_address, bar.write)
            t_last = time.perf_counter()  # throughput counts from here: starting a local Ray instance is not scoring
            workers, cpus, gpus = _placement(ray, job)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ds = ray.data.from_arrow(tables).map_batches(
                RayChunkScorer,
                fn_constructor_kwargs=dict(model_dir=str(job.model_dir.path.absolute()), provider=c.provider,
                                           threads=cpus, context=job.context, stride=job.stride,
                                           batch_tokens=c.batch_tokens, max_padding=c.max_padding),
                batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=cpus, num_gpus=gpus,
            )
            partial: dict[int, tuple[dict[int, tuple[float, int, bool]], list[int]]] = {}
            for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                cols = out.to_pydict()
                provider = cols["provider"][0] if cols["provider"] else provider
                for i, chunk in enumerate(cols["chunk"]):
                    results, stats = partial.setdefault(chunk, ({}, [0, 0]))
                    results[cols["index"][i]] = (cols["loglik"][i], cols["tokens"][i], bool(cols["greedy"][i]))
                    stats[0] += cols["input_tokens"][i]
                    stats[1] += cols["padded_slots"][i]
                    if len(results) == len(pending[chunk][0]):
                        commit(chunk, results, *partial.pop(chunk)[1])
        if pending:
            raise OnnxpipeError(f"ray returned no results for chunk(s) {sorted(pending)[:5]}; rerun with --resume")
    finally:
        bar.close()
    summary = make_summary(job, ckpt, provider, workers)
    finish(job, ckpt, summary)
    return summary
