"""Scoring's records: the input (JSONL or Parquet, a file or a directory of shards) read into records, and the
malformed ones told apart.

A record is one JSON object (or Parquet row) holding exactly one of
  ``text``                          score every token of the text
  ``prompt`` + ``completion``       score only the completion's tokens, conditioned on the prompt
  ``input_ids``                     token ids instead of text (every id after the first is scored)
  ``prompt_ids`` + ``completion_ids``
and optionally ``id`` (a string or an integer; default: the record's 1-based line or row number, prefixed with
the shard's file name when INPUT is a directory). Anything else is a *bad record*: reported with its line number,
then skipped or fatal (``--on-bad-record``); it never crashes the run. Bad records include text that is not valid
Unicode (a lone surrogate such as ``"\udc80"``, which no tokenizer can take), a record over the size cap
(``max_chars``: characters of text, or token ids), and the rows of a Parquet row group whose data cannot be read
(each reported with the unreadable row range; the other row groups are read). A Parquet file with none of the
fields above as a column is an error naming the file, not an empty run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from onnxpipe.errors import OnnxpipeError

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
TEXT_FIELDS = ("text", "prompt", "completion")
ID_FIELDS = ("input_ids", "prompt_ids", "completion_ids")
KNOWN_COLUMNS = ("id", *TEXT_FIELDS, *ID_FIELDS)
MAX_RECORD_CHARS = 1_000_000  # default cap: characters of text (or token ids) in one record


@dataclass
class Record:
    """A valid input record. Exactly one of (text, prompt+completion) or (ids, prompt_ids+completion_ids)."""

    id: Any
    where: str  # "file:line" for messages
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    ids: list[int] | None = None
    prompt_ids: list[int] | None = None
    completion_ids: list[int] | None = None

    @property
    def is_text(self) -> bool:
        return self.text is not None or self.completion is not None


@dataclass
class BadRecord:
    where: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"where": self.where, "error": self.error}


@dataclass
class Shard:
    path: Path
    fmt: str  # jsonl | parquet
    records: int  # non-blank lines or rows


def format_of(path: Path, role: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OnnxpipeError(f"{path}: unknown {role} extension {path.suffix or '(none)'!r}; use .jsonl or .parquet")
    return fmt


def require_pyarrow(path: Path) -> Any:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise OnnxpipeError(f"{path}: Parquet needs pyarrow; pip install 'onnxpipe[ray]' (or pyarrow), or use .jsonl") from None
    return pq


def list_shards(input_path: Path) -> list[Shard]:
    """The input's shards in order: the file itself, or a directory's *.jsonl / *.parquet files sorted by name."""
    if not input_path.exists():
        raise OnnxpipeError(f"{input_path}: no such input file or directory")
    if input_path.is_dir():
        paths = sorted(p for p in input_path.iterdir() if p.suffix.lower() in FORMATS and p.is_file())
        if not paths:
            raise OnnxpipeError(f"{input_path}: directory holds no .jsonl or .parquet files")
    elif not input_path.is_file():  # a pipe was counted, then waited on forever: a run reads its input twice
        raise OnnxpipeError(f"{input_path}: not a regular file (a pipe or a device?); score reads its input more "
                            "than once (to count it, to score it, on --resume): save it to a file first")
    else:
        paths = [input_path]
    shards = [Shard(p, format_of(p, "input"), 0) for p in paths]
    for s in shards:
        s.records = _count_records(s)
    if sum(s.records for s in shards) == 0:
        raise OnnxpipeError(f"{input_path}: no records (the input is empty)")
    return shards


def _count_records(shard: Shard) -> int:
    if shard.fmt == "parquet":
        pf = _open_parquet(shard.path)
        names = pf.schema_arrow.names
        if not set(names) & {*TEXT_FIELDS, *ID_FIELDS}:
            raise OnnxpipeError(f"{shard.path}: no column to score; expected text, prompt+completion, input_ids or "
                                f"prompt_ids+completion_ids (the file's columns: {', '.join(names) or 'none'})")
        return pf.metadata.num_rows
    n = 0
    with open(shard.path, "rb") as f:
        for line in f:
            n += bool(line.strip())
    return n


def _open_parquet(path: Path) -> Any:
    pq = require_pyarrow(path)
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid & co for files that are not Parquet
        raise OnnxpipeError(f"{path}: not a readable Parquet file ({first_line(e)})") from None


def iter_records(shard: Shard, prefix_ids: bool, vocab_size: int | None, generate: bool = False,
                 max_chars: int = MAX_RECORD_CHARS) -> Iterator[Record | BadRecord]:
    """Every record of a shard in order (blank JSONL lines are not records); bad ones as BadRecord."""
    if shard.fmt == "parquet":
        yield from _parquet_records(shard, prefix_ids, vocab_size, generate, max_chars)
        return
    with open(shard.path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield BadRecord(f"{shard.path.name}:{number}", f"not valid JSON ({e})")
                continue
            except RecursionError:
                yield BadRecord(f"{shard.path.name}:{number}", "not valid JSON (nested too deeply)")
                continue
            yield parse_record(obj, number, shard.path, prefix_ids, vocab_size, generate, max_chars)


def _parquet_records(shard: Shard, prefix_ids: bool, vocab_size: int | None, generate: bool, max_chars: int
                     ) -> Iterator[Record | BadRecord]:
    """A Parquet shard's rows, row group by row group, reading only the columns a record can use. A row group
    whose data cannot be read (a corrupted page) gives one BadRecord per row it did not deliver, naming the row
    range; the next row group is read as usual."""
    pf = _open_parquet(shard.path)
    columns = [c for c in pf.schema_arrow.names if c in KNOWN_COLUMNS]
    number = 0
    for group in range(pf.metadata.num_row_groups):
        last = number + pf.metadata.row_group(group).num_rows
        try:
            for batch in pf.iter_batches(batch_size=1024, row_groups=[group], columns=columns):
                for row in batch.to_pylist():
                    number += 1
                    yield parse_record(row, number, shard.path, prefix_ids, vocab_size, generate, max_chars)
        except Exception as e:  # pyarrow's OSError / ArrowInvalid / decompression errors for a damaged page
            reason = f"unreadable Parquet data in rows {number + 1}-{last} (row group {group}): {first_line(e)}"
            while number < last:
                number += 1
                yield BadRecord(f"{shard.path.name}:{number}", reason)


def parse_record(obj: Any, number: int, path: Path, prefix_ids: bool, vocab_size: int | None,
                 generate: bool = False, max_chars: int = MAX_RECORD_CHARS) -> Record | BadRecord:
    """A Record, or a BadRecord saying what is wrong. For generation a record holds one prompt: ``prompt`` or
    ``text`` (text), or ``prompt_ids`` or ``input_ids`` (token ids). ``max_chars`` caps the record's characters of
    text, or its token ids."""
    where = f"{path.name}:{number}"
    if not isinstance(obj, dict):
        return BadRecord(where, f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if rid is None:
        rid = f"{path.name}:{number}" if prefix_ids else number
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return BadRecord(where, f"id must be a string or an integer, got {type(rid).__name__}")
    present = {k for k in (*TEXT_FIELDS, *ID_FIELDS) if obj.get(k) is not None}
    rec = Record(rid, where)
    try:
        if generate:
            if len(present) != 1 or present & {"completion", "completion_ids"}:
                got = ", ".join(sorted(present)) or "none of them"
                return BadRecord(where, f"expected exactly one prompt field: prompt | text | prompt_ids | input_ids (got {got})")
            (key,) = present
            if key in ("prompt", "text"):
                rec.prompt = _string(obj, key)
            else:
                rec.prompt_ids = _ids(obj, key, vocab_size)
        elif present == {"text"}:
            rec.text = _string(obj, "text")
        elif present == {"prompt", "completion"}:
            rec.prompt, rec.completion = _string(obj, "prompt"), _string(obj, "completion")
        elif present == {"input_ids"}:
            rec.ids = _ids(obj, "input_ids", vocab_size)
        elif present == {"prompt_ids", "completion_ids"}:
            rec.prompt_ids, rec.completion_ids = _ids(obj, "prompt_ids", vocab_size), _ids(obj, "completion_ids", vocab_size)
        else:
            got = ", ".join(sorted(present)) or "none of them"
            return BadRecord(where, "expected exactly one of: text | prompt+completion | input_ids | "
                                    f"prompt_ids+completion_ids (got {got})")
    except ValueError as e:
        return BadRecord(where, str(e))
    return _within_cap(rec, max_chars)


def _within_cap(rec: Record, max_chars: int) -> Record | BadRecord:
    texts = [t for t in (rec.text, rec.prompt, rec.completion) if t is not None]
    if texts and (n := sum(map(len, texts))) > max_chars:
        return BadRecord(rec.where, f"record has {n:,} characters of text, over the cap of {max_chars:,} "
                                    "(--max-record-chars)")
    ids = [t for t in (rec.ids, rec.prompt_ids, rec.completion_ids) if t is not None]
    if ids and (n := sum(map(len, ids))) > max_chars:
        return BadRecord(rec.where, f"record has {n:,} token ids, over the cap of {max_chars:,} "
                                    "(--max-record-chars caps token ids too)")
    return rec


def _string(obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\udc80": a lone surrogate, which no tokenizer can take
        raise ValueError(f"{key} is not valid Unicode: a lone surrogate (\\u{ord(value[e.start]):04x}) at "
                         f"character {e.start}") from None
    return value


def _ids(obj: dict[str, Any], key: str, vocab_size: int | None) -> list[int]:
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{key} must be a list of integers")
    if vocab_size is not None and any(not 0 <= v < vocab_size for v in value):
        raise ValueError(f"{key} holds a token id outside 0..{vocab_size - 1}")
    return list(value)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
