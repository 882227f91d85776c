"""Tasks ``perplexity`` and ``loglik``: each record's windows scored in batches, summed back per record.

``loglik`` is the natural-log sum over a record's scored tokens; ``perplexity`` is exp(-loglik / tokens). Task
``loglik`` adds ``greedy``: whether every scored token was the model's argmax.

A batch whose model run fails is rerun window by window, so only the records whose own windows fail are bad
records (``file:line: the model run failed on it (...)``). When every record of a chunk (two or more) fails in the
model run, the fault is the model's or the machine's, not the records', and the run stops with that error.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from onnxpipe.errors import OnnxpipeError
from onnxpipe.score.batching import ChunkStats, Progress, cut_windows, plan_batches
from onnxpipe.score.encoding import Encoder, Item
from onnxpipe.score.job import ScoreJob
from onnxpipe.score.records import BadRecord, Record, first_line
from onnxpipe.score.scorer import WindowScorer

ItemResult = tuple[float, int, bool] | str  # (loglik, tokens, greedy), or why the model run failed on the item


def score_items(scorer: WindowScorer, items: Sequence[Item], context: int, stride: int, batch_tokens: int,
                max_padding: float, on_progress: Progress | None = None) -> tuple[list[ItemResult], ChunkStats]:
    """(loglik, tokens, greedy) per item, scoring their windows in length-bucketed batches; or, for an item whose
    window the model run failed on (run alone after its batch failed), the reason. Every item failing (two or
    more) is an error: the model or the machine is at fault, not the records."""
    windows: list[tuple[int, np.ndarray, int]] = []  # (item index, tokens, first scored index in the window)
    for k, it in enumerate(items):
        arr = np.asarray(it.tokens, np.int64)
        for begin, end, first in cut_windows(len(arr), context, stride, it.score_from):
            windows.append((k, arr[begin:end], first - begin))
    remaining = np.bincount([w[0] for w in windows], minlength=len(items))
    loglik = np.zeros(len(items))
    count = np.zeros(len(items), np.int64)
    greedy = np.ones(len(items), bool)
    failed: dict[int, str] = {}
    stats = ChunkStats()
    windows_done = 0
    for batch in plan_batches([len(w[1]) for w in windows], batch_tokens, max_padding):
        owner = np.fromiter((windows[i][0] for i in batch), np.int64, len(batch))
        run = [i for i in batch if windows[i][0] not in failed]
        scored = 0
        if run:
            width = max(len(windows[i][1]) for i in run)
            scorer.check_fits(len(run), width, batch_tokens)  # the run's memory, not a record's fault
            ok, ll, n, g = _score_batch(scorer, [windows[i] for i in run], failed)
            real = sum(len(windows[i][1]) for i in run)
            stats.input_tokens += real
            stats.padded_slots += width * len(run)
            stats.batches += 1
            stats.max_batch_padding = max(stats.max_batch_padding, 1.0 - real / (width * len(run)))
            ran = np.fromiter((windows[i][0] for i in run), np.int64, len(run))[ok]
            np.add.at(loglik, ran, ll[ok])  # unbuffered, in batch order: the sums of a one-by-one loop
            np.add.at(count, ran, n[ok])
            np.logical_and.at(greedy, ran, g[ok])
            scored = int(n[ok].sum())
        np.subtract.at(remaining, owner, 1)
        windows_done += len(batch)
        if on_progress is not None:
            finished = int(np.count_nonzero(remaining[np.unique(owner)] == 0))
            on_progress(finished, scored, windows_done, len(windows))
    if len(items) >= 2 and len(failed) == len(items):
        raise OnnxpipeError(f"the model run failed on every record of a chunk ({next(iter(failed.values()))}); "
                            "this is the model or the machine, not the records")
    return [failed[k] if k in failed else (float(loglik[k]), int(count[k]), bool(greedy[k]))
            for k in range(len(items))], stats


def _score_batch(scorer: WindowScorer, windows: list[tuple[int, np.ndarray, int]], failed: dict[int, str]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scorer.score over the windows; when the batch fails, window by window, and the owner of a window that fails
    alone goes into ``failed``. Returns (ran, loglik, count, greedy) per window."""
    try:
        ll, n, g = scorer.score([(w[1], w[2]) for w in windows])
        return np.ones(len(windows), bool), ll, n, g
    except Exception:  # onnxruntime's own error types (a shape, an allocation); each window is tried alone below
        if len(windows) == 1:
            return _score_alone(scorer, windows[0], failed)
    parts = [_score_alone(scorer, w, failed) for w in windows]
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(4))  # type: ignore[return-value]


def _score_alone(scorer: WindowScorer, window: tuple[int, np.ndarray, int], failed: dict[int, str]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        ll, n, g = scorer.score([(window[1], window[2])])
        return np.ones(1, bool), ll, n, g
    except Exception as e:
        failed.setdefault(window[0], f"the model run failed on it ({first_line(e)})")
        return np.zeros(1, bool), np.zeros(1), np.zeros(1, np.int64), np.ones(1, bool)


def rows_and_failures(records: Sequence[Record], results: Sequence[ItemResult], task: str
                      ) -> tuple[list[dict[str, Any]], list[BadRecord]]:
    rows: list[dict[str, Any]] = []
    failed: list[BadRecord] = []
    for rec, res in zip(records, results):
        if isinstance(res, str):
            failed.append(BadRecord(rec.where, res))
        else:
            rows.append(result_row(rec.id, *res, task))
    return rows, failed


def result_row(record_id: Any, loglik: float, tokens: int, greedy: bool, task: str) -> dict[str, Any]:
    row = {"id": record_id, "loglik": loglik, "tokens": tokens, "perplexity": math.exp(-loglik / tokens)}
    if task == "loglik":
        row["greedy"] = greedy
    return row


class ScoreWorker:
    """The local engine's scoring: records -> Items (Encoder) -> windows -> batches (WindowScorer) -> rows."""

    def __init__(self, job: ScoreJob, announce: Callable[[str], None]):
        c = job.config
        self.job = job
        self.scorer = WindowScorer.open(job.model_dir.path, c.provider, c.threads, announce=announce, head=c.head)
        self.scorer.want_greedy = c.task == "loglik"
        self.provider = self.scorer.provider
        self.items = Encoder(job.model_dir).items

    def run(self, records: list[Record], items: list[Item], on_progress: Progress
            ) -> tuple[list[dict[str, Any]], ChunkStats, list[BadRecord]]:
        """The rows of the records scored, and the records the model run failed on."""
        job, c = self.job, self.job.config
        results, stats = score_items(self.scorer, items, job.context, job.stride, c.batch_tokens, c.max_padding,
                                     on_progress)
        rows, failed = rows_and_failures(records, results, c.task)
        return rows, stats, failed

