"""Resuming a run without losing or duplicating a record: the checkpoint, and what a run does with it.

After each chunk the output is made durable (JSONL appended and fsync'd, or a part file written atomically) and then
a small checkpoint is written atomically (temporary file, fsync, rename, fsync of the directory). A rerun with
``--resume`` refuses a checkpoint made under other options, model or input (its fingerprint), cuts the output back
to what the checkpoint covers and continues after its last record, so a kill at any moment loses at most the chunk
in flight and never writes a row twice.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from onnxpipe.errors import OnnxpipeError
from onnxpipe.score.batching import ChunkStats
from onnxpipe.score.job import ScoreJob, check_all_records
from onnxpipe.score.output import remove_stale_temps, write_json_atomic
from onnxpipe.score.records import BadRecord, first_line

MAX_BAD_LISTED = 100  # bad records listed in the checkpoint and summary; all are counted


@dataclass
class Checkpoint:
    """How far a run got. ``records_done`` counts input records (bad ones too) whose results are durable."""

    fingerprint: dict[str, Any]
    records_done: int = 0
    output_bytes: int = 0  # JSONL: the output's durable size
    parts: int = 0  # Parquet: durable part files
    done_chunks: list[int] = field(default_factory=list)  # Ray engine: chunks whose part file is durable
    loglik: float = 0.0
    tokens: int = 0
    input_tokens: int = 0  # tokens fed to the model (window overlap counted), padding not
    padded_slots: int = 0  # batch slots incl. padding
    records_scored: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)
    bad_count: int = 0
    seconds: float = 0.0  # scoring time summed over all runs
    runs: int = 0
    complete: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise OnnxpipeError(f"{path}: unreadable checkpoint ({first_line(e)}); rerun with --force to start over") from None

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())


def open_checkpoint(job: ScoreJob) -> Checkpoint:
    """The checkpoint to continue from; a fresh one unless --resume. Refuses to overwrite without --force."""
    c = job.config
    ck_path = job.checkpoint_path
    leftovers = [p for p in (job.output, ck_path, job.parts_dir) if p.exists()]
    remove_stale_temps(job.written_paths)
    if c.force:
        job.check_paths()  # again, right before removing anything: the input may have changed since
        for p in job.written_paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        leftovers = []
    fingerprint = job.fingerprint()
    if leftovers and not c.resume:
        raise OnnxpipeError(f"{job.output} already exists; pass --resume to continue that run or --force to start over")
    if c.resume and leftovers:
        if not ck_path.is_file():
            raise OnnxpipeError(f"{job.output} exists but has no checkpoint ({ck_path.name}), so it cannot be resumed; "
                                "pass --force to start over")
        ckpt = Checkpoint.load(ck_path)
        changed = [k for k in fingerprint if ckpt.fingerprint.get(k) != fingerprint[k]]
        if changed:
            raise OnnxpipeError(f"{ck_path}: the run being resumed had different {', '.join(changed)} "
                                f"(was {', '.join(str(ckpt.fingerprint.get(k)) for k in changed)}); rerun with the same "
                                "model, input and options, or pass --force to start over")
        return ckpt
    ckpt = Checkpoint(fingerprint)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    if c.engine == "ray" or job.fmt == "parquet":
        job.parts_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save(ck_path)
    return ckpt


def start(job: ScoreJob, log: Callable[[str], None]) -> Checkpoint:
    """Validate the whole input in --on-bad-record fail mode, then open (or create) the checkpoint."""
    if job.config.on_bad_record == "fail":
        check_all_records(job)
    ckpt = open_checkpoint(job)
    if ckpt.complete:
        log(f"{job.output}: already complete (summary in {job.summary_path.name})")
    return ckpt


def record_bad(ckpt: Checkpoint, bads: list[BadRecord], log: Callable[[str], None]) -> None:
    """Count (and list the first MAX_BAD_LISTED of) a committed chunk's bad records."""
    for bad in bads:
        if ckpt.bad_count < MAX_BAD_LISTED:
            ckpt.bad.append(bad.to_json())
            log(f"skipped bad record {bad.where}: {bad.error}")
        elif ckpt.bad_count == MAX_BAD_LISTED:
            log(f"more bad records; only the first {MAX_BAD_LISTED} are listed (all are counted in the summary)")
        ckpt.bad_count += 1


def cut_back(job: ScoreJob, ckpt: Checkpoint) -> None:
    """Drop whatever a killed run of the local engine wrote after its last checkpoint."""
    if job.fmt == "jsonl":
        if not job.output.exists():
            if ckpt.output_bytes:
                raise OnnxpipeError(f"{job.output} is missing but its checkpoint says {ckpt.output_bytes} bytes were "
                                    "written; pass --force to start over")
            job.output.touch()
        with open(job.output, "r+b") as f:
            size = f.seek(0, 2)
            if size < ckpt.output_bytes:
                raise OnnxpipeError(f"{job.output} is shorter ({size} bytes) than its checkpoint says "
                                    f"({ckpt.output_bytes}); it was changed outside this run; pass --force to start over")
            f.truncate(ckpt.output_bytes)
    else:
        job.parts_dir.mkdir(parents=True, exist_ok=True)
        for p in job.parts_dir.iterdir():
            if p.name.startswith(".") or int(p.stem.split("-")[-1]) >= ckpt.parts:
                p.unlink()


def account(ckpt: Checkpoint, rows: list[dict[str, Any]], n_records: int, stats: ChunkStats, seconds: float) -> None:
    """Add a committed chunk to the checkpoint's counts (saved by the caller, after the rows are durable)."""
    ckpt.records_done += n_records
    ckpt.records_scored += len(rows)
    ckpt.loglik += sum(r.get("loglik", 0.0) for r in rows)
    ckpt.tokens += sum(r["tokens"] for r in rows)
    ckpt.input_tokens += stats.input_tokens
    ckpt.padded_slots += stats.padded_slots
    ckpt.seconds += seconds
