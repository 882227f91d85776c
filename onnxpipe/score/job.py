"""One scoring run: its model, input shards, output paths and options, validated before anything is written; its
records read chunk by chunk, and a chunk split into the records to run and the bad ones.

Paths: a run refuses an output (or its checkpoint, parts or summary) that is, holds or sits inside its input or
its model directory,
compared after resolving ``..``, symlinks and hard links (onnxpipe.outputs.check_io_paths), before anything is
written or removed.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.outputs import check_io_paths
from onnxpipe.score.config import ScoreConfig
from onnxpipe.score.encoding import Item
from onnxpipe.score.records import BadRecord, Record, Shard, format_of, iter_records, list_shards, require_pyarrow

TEXT_ENCODING = "tokenizer-special-tokens"  # in the fingerprint: a run is never resumed under another convention


@dataclass
class ScoreJob:
    """Everything a run needs, validated up front."""

    model_dir: ModelDir
    input_path: Path
    output: Path
    shards: list[Shard]
    fmt: str
    config: ScoreConfig
    context: int
    stride: int

    @property
    def total_records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def checkpoint_path(self) -> Path:
        return (self.output / "_checkpoint.json") if self.config.engine == "ray" else \
            self.output.with_name(self.output.name + ".checkpoint.json")

    @property
    def parts_dir(self) -> Path:
        return self.output if self.config.engine == "ray" else self.output.with_name(self.output.name + ".parts")

    @property
    def summary_path(self) -> Path:
        return self.output.with_name(self.output.stem + ".summary.json")

    @property
    def written_paths(self) -> list[Path]:
        """Every path a run writes, replaces or (with --force) deletes."""
        return [self.output, self.checkpoint_path, self.parts_dir, self.summary_path]

    def check_paths(self) -> None:
        """Refuse a run that would write over, delete or write inside its own input, however the paths are
        spelled (``..``, symlinks, hard links): before anything is written or removed."""
        inputs = [self.input_path, self.model_dir.path, *(s.path for s in self.shards)]
        for path in self.written_paths:
            check_io_paths(inputs, path)

    def part_path(self, index: int) -> Path:
        return self.parts_dir / f"part-{index:05d}.{self.fmt}"

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        manifest = (self.model_dir.path / "onnxpipe.json").read_bytes()
        c = self.config
        return {
            "model": hashlib.sha256(manifest).hexdigest()[:16] + f"/{self.model_dir.model_path.stat().st_size}",
            "input": [[s.path.name, s.path.stat().st_size, s.records] for s in self.shards],
            "task": c.task, "context": self.context, "stride": self.stride, "batch_tokens": c.batch_tokens,
            "max_padding": c.max_padding, "chunk_records": c.chunk_records, "engine": c.engine,
            "max_record_chars": c.max_record_chars, "text_encoding": TEXT_ENCODING,
            **({"max_new_tokens": c.max_new_tokens} if c.task == "generate" else {}),
        }

    def records(self, skip: int = 0) -> Iterator[Record | BadRecord]:
        prefix = self.input_path.is_dir()
        vocab = int(self.model_dir.manifest.model["vocab_size"])
        seen = 0
        for shard in self.shards:
            if seen + shard.records <= skip:
                seen += shard.records
                continue
            for rec in iter_records(shard, prefix, vocab, self.config.task == "generate",
                                             self.config.max_record_chars):
                seen += 1
                if seen > skip:
                    yield rec

    def chunks(self, skip: int = 0) -> Iterator[list[Record | BadRecord]]:
        chunk: list[Record | BadRecord] = []
        for rec in self.records(skip):
            chunk.append(rec)
            if len(chunk) == self.config.chunk_records:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def prepare_job(model_dir: str | Path, input_path: str | Path, output: str | Path, config: ScoreConfig) -> ScoreJob:
    config.check()
    md = ModelDir.open(model_dir)
    input_path, output = Path(input_path), Path(output)
    fmt = format_of(output, "output")
    if fmt == "parquet":
        require_pyarrow(output)
    shards = list_shards(input_path)
    model_context = int(md.manifest.model.get("max_position_embeddings") or 0)
    context = min(x for x in (config.max_context, model_context) if x) if (config.max_context or model_context) else 0
    if context < 2:
        raise OnnxpipeError(f"{md.path}: no usable context length in the manifest; pass --max-context")
    stride = config.stride or max(1, context // 2)
    if not 0 < stride < context:
        raise OnnxpipeError(f"--stride must be in 1..{context - 1} (below the context, so that every window "
                            f"overlaps the last and every token is scored with some history), got {stride}")
    job = ScoreJob(md, input_path, output, shards, fmt, config, context, stride)
    job.check_paths()
    return job


def fail_on_bad(job: ScoreJob, bad: BadRecord) -> None:
    if job.config.on_bad_record == "fail":
        raise OnnxpipeError(f"{job.input_path}: bad record at {bad.where}: {bad.error} "
                            "(fix it, or pass --on-bad-record skip)")


def check_all_records(job: ScoreJob, skip: int = 0) -> None:
    """--on-bad-record fail: find a malformed record before any scoring (JSON and field checks only)."""
    for rec in job.records(skip):
        if isinstance(rec, BadRecord):
            fail_on_bad(job, rec)


def split_chunk(job: ScoreJob, make_items: Callable[[list[Record]], list[Item | str]],
                chunk: list[Record | BadRecord]) -> tuple[list[Record], list[Item], list[BadRecord]]:
    """The chunk's workable records with their Items, and its bad records (fatal in --on-bad-record fail)."""
    good = [r for r in chunk if isinstance(r, Record)]
    made = dict(zip((id(r) for r in good), make_items(good)))
    records: list[Record] = []
    items: list[Item] = []
    bads: list[BadRecord] = []
    for rec in chunk:
        item = None if isinstance(rec, BadRecord) else made[id(rec)]
        if isinstance(rec, BadRecord) or isinstance(item, str):
            bad = rec if isinstance(rec, BadRecord) else BadRecord(rec.where, str(item))
            fail_on_bad(job, bad)
            bads.append(bad)
        elif isinstance(item, Item):
            records.append(rec)
            items.append(item)
    return records, items, bads


def progress_bar(job: ScoreJob, done: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=job.total_records, initial=done, unit="rec", file=sys.stderr, disable=not job.config.progress,
                dynamic_ncols=True, smoothing=0.1, desc="score")

