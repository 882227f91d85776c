"""Batch offline scoring: per-record log-likelihood, token count and perplexity (or greedy generations) of a JSONL or
Parquet file, resumable.

    from onnxpipe.score import ScoreConfig, score
    summary = score("out/model", "records.jsonl", "scores.jsonl", ScoreConfig(task="perplexity"))

A stage of its own (it imports the runtime, the model directory and the tokenizer; nothing below it imports it), one
job per module:

    records.py      the input read into records; malformed ones become bad records, never a crash
    encoding.py     records to token ids under the model's tokenizer's special-token rules
    batching.py     long records cut into windows; windows packed into batches
    scorer.py       the model side: a batch of windows as one prefill (runtime.step binds the graph's names)
    head.py         the log-softmax on the device that holds the logits
    perplexity.py   tasks perplexity and loglik; generate.py: task generate
    job.py          one run's paths, options and chunks, validated before anything is written
    checkpoint.py   resuming without losing or duplicating a record; output.py: rows written durably
    summary.py      what a run reports
    engine_local.py, engine_ray.py   the two ways to run a job

Locks: a run holds its output's lock (onnxpipe.outputs.output_lock) from start to finish, so a second run on the
same output, ``--resume`` or not, refuses at once instead of writing rows twice.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from onnxpipe.errors import OnnxpipeError
from onnxpipe.outputs import output_lock
from onnxpipe.score.config import ENGINES, TASKS, ScoreConfig
from onnxpipe.score.engine_local import score_local
from onnxpipe.score.engine_ray import score_on_ray
from onnxpipe.score.job import prepare_job
from onnxpipe.score.summary import ScoreSummary

__all__ = ["ENGINES", "TASKS", "ScoreConfig", "ScoreSummary", "score"]


def score(model_dir: str | Path, input_path: str | Path, output: str | Path, config: ScoreConfig | None = None,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> ScoreSummary:
    """Score every record of ``input_path`` into ``output`` with the model directory ``model_dir``; returns the
    summary (also written to ``OUTPUT.summary.json``). Raises OnnxpipeError for bad options, paths or inputs."""
    config = config or ScoreConfig()
    job = prepare_job(model_dir, input_path, output, config)
    with output_lock(job.output):  # a second run on this output refuses at once instead of duplicating rows
        summary = score_on_ray(job, log) if config.engine == "ray" else score_local(job, log)
    if summary.records == 0 and summary.bad_records:  # skipping bad records is for a few, not for all of them
        first = summary.bad[0] if summary.bad else {}
        raise OnnxpipeError(f"{input_path}: no record could be scored: all {summary.bad_records} were bad (first: "
                            f"{first.get('where', '?')}: {first.get('error', '?')})")
    return summary
