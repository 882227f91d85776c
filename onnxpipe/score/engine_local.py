"""The local engine: one process, one onnxruntime session, the input's chunks in order.

Each chunk's rows are appended to the output (JSONL) or written as one part file (Parquet, merged at the end), then
the checkpoint that covers them is committed (onnxpipe.score.checkpoint); ``--resume`` continues from it. Progress
counts windows as well as records, so a long record shows it moving.
"""

from __future__ import annotations

import shutil
import time
from typing import Any, Callable

from onnxpipe.score.batching import ChunkStats
from onnxpipe.score.checkpoint import Checkpoint, account, cut_back, record_bad, start
from onnxpipe.score.generate import GenerateWorker
from onnxpipe.score.job import ScoreJob, fail_on_bad, progress_bar, split_chunk
from onnxpipe.score.output import append_jsonl, merge_parts, write_part
from onnxpipe.score.perplexity import ScoreWorker
from onnxpipe.score.summary import ScoreSummary, finish, finished_summary, make_summary


def score_local(job: ScoreJob, log: Callable[[str], None]) -> ScoreSummary:
    """Run ``job`` (prepared, its output's lock held) to the end, from its checkpoint on; returns the summary."""
    c = job.config
    ckpt = start(job, log)
    if ckpt.complete:
        if job.fmt == "parquet":
            shutil.rmtree(job.parts_dir, ignore_errors=True)
        return finished_summary(job, ckpt)
    cut_back(job, ckpt)
    messages: list[str] = []
    worker: ScoreWorker | GenerateWorker
    if c.task == "generate":
        worker = GenerateWorker(job, messages.append)
    else:
        worker = ScoreWorker(job, messages.append)
    for m in messages:
        log(m)
    ckpt.runs += 1
    bar = progress_bar(job, ckpt.records_done)
    run_tokens, run_start = 0, time.perf_counter()

    step = "prompt" if c.task == "generate" else "window"

    def on_progress(records: int, tokens: int, windows_done: int, windows: int) -> None:
        nonlocal run_tokens
        run_tokens += tokens
        bar.update(records)
        # refreshed every batch: a long record shows its windows moving while the record count stands still
        bar.set_postfix_str(f"{run_tokens / max(time.perf_counter() - run_start, 1e-9):.0f} tok/s, "
                            f"{step} {windows_done}/{windows} of the chunk", refresh=True)

    try:
        for chunk in job.chunks(ckpt.records_done):
            t0 = time.perf_counter()
            records, items, bads = split_chunk(job, worker.items, chunk)
            bar.update(len(bads))
            rows, stats, failed = worker.run(records, items, on_progress)
            for bad in failed:
                fail_on_bad(job, bad)
            record_bad(ckpt, bads + failed, bar.write)
            _commit_chunk(job, ckpt, rows, len(chunk), stats, time.perf_counter() - t0)
    finally:
        bar.close()
    if job.fmt == "parquet":  # the parts go only after the checkpoint says complete: a kill here merges again
        merge_parts([job.part_path(i) for i in range(ckpt.parts)], job.output, "parquet")
    summary = make_summary(job, ckpt, worker.provider, 1)
    finish(job, ckpt, summary)
    if job.fmt == "parquet":
        shutil.rmtree(job.parts_dir, ignore_errors=True)
    return summary


def _commit_chunk(job: ScoreJob, ckpt: Checkpoint, rows: list[dict[str, Any]], n_records: int, stats: ChunkStats,
                  seconds: float) -> None:
    """Make the chunk's rows durable, then the checkpoint that covers them."""
    if job.fmt == "jsonl":
        ckpt.output_bytes = append_jsonl(job.output, rows)
    else:
        write_part(job.part_path(ckpt.parts), rows, "parquet")
        ckpt.parts += 1
    account(ckpt, rows, n_records, stats, seconds)
    ckpt.save(job.checkpoint_path)
