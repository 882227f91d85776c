"""The Ray engine of ``onnxpipe score``: the same chunks, windows and batches as the local engine, on Ray Data.

The driver reads, validates and tokenizes the input (so bad records are reported with their line numbers exactly
as locally) and hands each chunk to Ray Data as one row ``(chunk, tokens[], score_from[])`` in a block of its own.
``map_batches`` (``batch_size=1``: Ray needs a batch size when GPUs are requested, and one row is one whole chunk)
runs ``RayChunkScorer``, a callable class: each worker (a Ray actor) opens one onnxruntime session in its
constructor and scores whole chunks with ``score_items``, so a chunk is batched exactly as the local engine
batches it. With a CUDA/TensorRT provider, or ``auto`` on a cluster with GPUs, each worker asks for one GPU
(``num_gpus=1``) and there is one worker per GPU; Ray points the worker's CUDA_VISIBLE_DEVICES at its GPU, and the
log-softmax runs on it too (WindowScorer's device head). A worker whose onnxruntime cannot start CUDA falls back to
the CPU; the driver prints what the workers said once. On CPUs each worker takes ``threads`` CPUs (default 1).

Results stream back to the driver, which writes one part file per chunk (``OUTPUT/part-NNNNN.jsonl|parquet``,
atomically) and then the checkpoint ``OUTPUT/_checkpoint.json`` naming the chunks that are durable. ``--resume``
sends only the chunks that are not. Concatenating the parts in name order gives the local engine's output.

A worker process that dies (kill -9, a crash in onnxruntime, the OOM killer) is restarted by Ray and its chunk
sent again, up to WORKER_RETRIES times for an actor and for a chunk; a chunk's part is written once, when its
result reaches the driver, so a retry neither loses nor repeats a record. Past that (a chunk that kills every
worker it reaches, say) the run stops with one line naming the Ray error; the chunks already written stay, and
``--resume`` sends the rest. Ray's own default is to retry forever, which turns such a chunk into a run that
never ends.

Cluster: ``ray.init(address=...)`` with ``--ray-address`` or ``$RAY_ADDRESS``; every node needs onnxpipe installed
and MODEL_DIR at the same path (a shared file system); the driver needs the input and output paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from typing import Any, Callable

from onnxpipe.errors import OnnxpipeError
from onnxpipe.score.batching import ChunkStats
from onnxpipe.score.checkpoint import account, record_bad, start
from onnxpipe.score.encoding import Encoder, Item
from onnxpipe.score.job import ScoreJob, fail_on_bad, progress_bar, split_chunk
from onnxpipe.score.output import write_part
from onnxpipe.score.perplexity import rows_and_failures, score_items
from onnxpipe.score.records import BadRecord, Record
from onnxpipe.score.scorer import WindowScorer
from onnxpipe.score.summary import ScoreSummary, finish, finished_summary, make_summary

WORKER_RETRIES = 3  # restarts of one worker, and attempts of one chunk, before the run stops (Ray's default: forever)


class RayChunkScorer:
    """map_batches callable: one onnxruntime session per worker, opened once. A row is a whole chunk (its items'
    tokens and first scored positions) and the answer is one row per chunk; it also carries the worker's id, the
    GPUs Ray gave it and what the provider choice said (a fallback, say), for the driver."""

    def __init__(self, model_dir: str, provider: str, threads: int | None, context: int, stride: int,
                 batch_tokens: int, max_padding: float, head: str = "auto"):
        import ray

        said: list[str] = []
        self.scorer = WindowScorer.open(model_dir, provider, threads, announce=said.append, head=head)
        self.messages = "\n".join(m for m in said if m != self.scorer.provider)
        ctx = ray.get_runtime_context()
        # Ray sets CUDA_VISIBLE_DEVICES to the worker's GPUs, so the session's device 0 is the first of these
        self.worker = json.dumps({"actor": ctx.get_actor_id(), "gpu_ids": [int(g) for g in ray.get_gpu_ids()]})
        self.args = (context, stride, batch_tokens, max_padding)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        types = {"chunk": pa.int64(), "loglik": pa.list_(pa.float64()), "tokens": pa.list_(pa.int64()),
                 "greedy": pa.list_(pa.bool_()), "errors": pa.list_(pa.string()), "input_tokens": pa.int64(),
                 "padded_slots": pa.int64(),
                 "provider": pa.string(), "worker": pa.string(), "messages": pa.string()}
        cols = batch.to_pydict()
        out: dict[str, list[Any]] = {k: [] for k in types}
        for chunk, tokens, score_from in zip(cols["chunk"], cols["tokens"], cols["score_from"]):
            results, stats = score_items(self.scorer, [Item(list(t), int(s)) for t, s in zip(tokens, score_from)],
                                         *self.args)
            ok = [(0.0, 0, True) if isinstance(r, str) else r for r in results]
            for key, value in (("chunk", chunk), ("loglik", [r[0] for r in ok]), ("tokens", [r[1] for r in ok]),
                               ("greedy", [r[2] for r in ok]),
                               ("errors", [r if isinstance(r, str) else "" for r in results]),
                               ("input_tokens", stats.input_tokens),
                               ("padded_slots", stats.padded_slots), ("provider", self.scorer.provider),
                               ("worker", self.worker), ("messages", self.messages)):
                out[key].append(value)
        return pa.table({k: pa.array(v, types[k]) for k, v in out.items()})


def _import_ray() -> Any:
    try:
        import pyarrow  # noqa: F401
        import ray
    except ImportError:
        raise OnnxpipeError("--engine ray needs ray and pyarrow: pip install 'onnxpipe[ray]'") from None
    return ray


class _NoTraceback(logging.Filter):
    """Ray Data logs a failed task's traceback before raising; the run's own one-line error says what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


_NO_TRACEBACK = _NoTraceback()  # one instance: addFilter adds it once however many runs a process makes


def _worker_failure(ray: Any) -> tuple[type[BaseException], ...]:
    """The exceptions that mean a worker died or its chunk failed on Ray (not a fault of the driver)."""
    failures: list[type[BaseException]] = [ray.exceptions.RayError]
    try:
        from ray.data.exceptions import UserCodeException

        failures.append(UserCodeException)
    except ImportError:  # older Ray Data raises the task's error as a RayError
        pass
    return tuple(failures)


def _connect(ray: Any, address: str | None, log: Callable[[str], None]) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    log(f"ray: {'joining ' + address if address else 'starting a local instance'}")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")


def _placement(ray: Any, job: ScoreJob) -> tuple[int, int, float]:
    """(workers, cpus per worker, gpus per worker): with a GPU provider (or auto on a cluster with GPUs) one worker
    per GPU, each asking Ray for num_gpus=1; else one worker per `threads` CPUs."""
    c = job.config
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = c.threads or 1
    use_gpu = c.provider in ("cuda", "tensorrt") or (c.provider == "auto" and gpus > 0)
    if use_gpu:
        if gpus == 0:
            raise OnnxpipeError(f"--provider {c.provider} on Ray: the cluster has no GPUs; use --provider cpu")
        if c.num_workers and c.num_workers > gpus:  # Ray would wait forever for the missing GPUs
            raise OnnxpipeError(f"--num-workers {c.num_workers} with --provider {c.provider}: each worker takes one "
                                f"GPU and the cluster has {gpus}; pass --num-workers {gpus} or fewer")
        return c.num_workers or gpus, cpus, 1.0
    return c.num_workers or max(1, int(resources.get("CPU", 1)) // cpus), cpus, 0.0


def _what_failed(e: BaseException) -> str:
    """The Ray error's name and first line, and the dead worker's process id where Ray names it."""
    text = str(e)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "no message")
    pid = re.search(r"^\s*pid: (\d+)\s*$", text, re.MULTILINE)
    return f"{type(e).__name__}: {first}" + (f" (worker pid {pid.group(1)})" if pid else "")


def _scoring_dataset(ray: Any, job: ScoreJob, chunk_rows: list[dict[str, Any]], workers: int, cpus: int,
                     gpus: float) -> Any:
    """One block per chunk, scored by a pool of ``workers`` RayChunkScorer actors (batch_size=1: a whole chunk)."""
    import pyarrow as pa

    c = job.config
    table = pa.Table.from_pylist(chunk_rows, schema=pa.schema([
        ("chunk", pa.int64()), ("tokens", pa.list_(pa.list_(pa.int64()))), ("score_from", pa.list_(pa.int64()))]))
    with warnings.catch_warnings():  # Ray 2.60 deprecates ray_remote_args; max_restarts has no named parameter yet
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.data.from_arrow([table.slice(i, 1) for i in range(len(table))]).map_batches(
            RayChunkScorer,
            fn_constructor_kwargs=dict(model_dir=str(job.model_dir.path.absolute()), provider=c.provider,
                                       threads=cpus, context=job.context, stride=job.stride,
                                       batch_tokens=c.batch_tokens, max_padding=c.max_padding, head=c.head),
            batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus, num_gpus=gpus, max_restarts=WORKER_RETRIES, max_task_retries=WORKER_RETRIES,
        )


def score_on_ray(job: ScoreJob, log: Callable[[str], None]) -> ScoreSummary:
    ray = _import_ray()
    c = job.config
    ckpt = start(job, log)
    if ckpt.complete:
        return finished_summary(job, ckpt)
    for p in job.parts_dir.iterdir():  # parts a killed driver wrote but did not checkpoint
        if p.name.startswith(".") or (p.name.startswith("part-") and int(p.name[5:10]) not in ckpt.done_chunks):
            p.unlink()
    done = set(ckpt.done_chunks)
    encoder = Encoder(job.model_dir)
    pending: dict[int, tuple[list[Record], list[BadRecord], int]] = {}  # chunk -> (records, bad, n)
    chunk_rows: list[dict[str, Any]] = []
    for index, chunk in enumerate(job.chunks()):
        if index in done:
            continue
        records, items, bads = split_chunk(job, encoder.items, chunk)
        pending[index] = (records, bads, len(chunk))
        if items:  # one row per chunk: Ray hands a worker whole chunks, never a part of one (batch_size=1)
            chunk_rows.append({"chunk": index, "tokens": [it.tokens for it in items],
                               "score_from": [it.score_from for it in items]})
    ckpt.runs += 1
    bar = progress_bar(job, ckpt.records_done)
    t_last = time.perf_counter()
    provider = "none (nothing to score)"

    def commit(index: int, results: list[Any], input_tokens: int, padded: int) -> None:
        """results: (loglik, tokens, greedy) per record, or the reason its model run failed."""
        nonlocal t_last
        records, bads, n_records = pending.pop(index)
        if len(results) != len(records):
            raise OnnxpipeError(f"ray returned {len(results)} results for chunk {index} of {len(records)} records")
        rows, failed = rows_and_failures(records, results, c.task)
        for bad in failed:
            fail_on_bad(job, bad)
        write_part(job.part_path(index), rows, job.fmt)
        record_bad(ckpt, bads + failed, bar.write)
        ckpt.done_chunks.append(index)
        now = time.perf_counter()
        account(ckpt, rows, n_records, ChunkStats(input_tokens, padded), now - t_last)
        t_last = now
        ckpt.save(job.checkpoint_path)
        bar.update(n_records)

    workers, cpus, gpus = 0, 0, 0.0
    seen_workers: dict[str, list[int]] = {}  # actor id -> the GPU ids Ray gave it
    said: set[str] = set()
    try:
        for index in [i for i, (recs, _b, _n) in pending.items() if not recs]:
            commit(index, [], 0, 0)  # chunks of bad records only
        if chunk_rows:
            _connect(ray, c.ray_address, bar.write)
            t_last = time.perf_counter()  # throughput counts from here: starting a local Ray instance is not scoring
            workers, cpus, gpus = _placement(ray, job)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            logging.getLogger("ray.data._internal.execution.streaming_executor_state").addFilter(_NO_TRACEBACK)
            ds = _scoring_dataset(ray, job, chunk_rows, workers, cpus, gpus)
            try:
                for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in out.to_pylist():
                        provider = row["provider"]
                        seen_workers.setdefault(json.loads(row["worker"])["actor"], json.loads(row["worker"])["gpu_ids"])
                        for m in row["messages"].splitlines():
                            if m not in said:  # once, however many workers say it
                                said.add(m)
                                log(f"ray worker: {m}")
                        results = [err or (ll, n, g) for ll, n, g, err in
                                   zip(row["loglik"], row["tokens"], row["greedy"], row["errors"])]
                        commit(row["chunk"], results, row["input_tokens"], row["padded_slots"])
            except _worker_failure(ray) as e:
                raise OnnxpipeError(
                    f"ray: scoring stopped: a worker failed ({_what_failed(e)}; a worker that dies is restarted and "
                    f"its chunk sent again up to {WORKER_RETRIES} times); {len(ckpt.done_chunks)} chunk(s) are "
                    f"written in {job.output}: rerun with --resume to continue") from None
        if pending:
            raise OnnxpipeError(f"ray returned no results for chunk(s) {sorted(pending)[:5]}; rerun with --resume")
    finally:
        bar.close()
    summary = make_summary(job, ckpt, provider, workers)
    summary.placement = {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus,
                         "gpu_ids_seen": sorted(seen_workers.values())}
    finish(job, ckpt, summary)
    return summary
