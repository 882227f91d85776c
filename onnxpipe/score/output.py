"""Scoring's output: result rows written durably, and files replaced atomically.

Rows are appended chunk by chunk to a JSONL output (fsync'd before the checkpoint that covers them is written), or
written as one part file per chunk (built beside its name, fsync'd, renamed, the directory fsync'd) and merged at the
end. A file built here is named ``temp_name(path)`` until its rename, so a killed run leaves only hidden temporaries,
which the next run on the same output removes (remove_stale_temps).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

from onnxpipe.score.records import require_pyarrow


def encode_rows(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def rows_to_table(rows: list[dict[str, Any]], path: Path) -> Any:
    """Rows as a pyarrow Table; ids of mixed types (strings and integers) become strings."""
    require_pyarrow(path)
    import pyarrow as pa

    columns = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {})}
    if "id" in columns and len({type(v) for v in columns["id"]}) > 1:
        columns["id"] = [str(v) for v in columns["id"]]
    return pa.table(columns)


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> int:
    """Append rows, fsync, and return the file's new size."""
    with open(path, "ab") as f:
        f.write(encode_rows(rows))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def write_part(path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    """One part file (a chunk's rows), written atomically."""
    tmp = temp_name(path)
    if fmt == "parquet":
        pq = require_pyarrow(path)
        pq.write_table(rows_to_table(rows, path), tmp)
        _fsync_file(tmp)
    else:
        with open(tmp, "wb") as f:
            f.write(encode_rows(rows))
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_part(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        pq = require_pyarrow(path)
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def merge_parts(parts: list[Path], target: Path, fmt: str) -> None:
    """Concatenate part files into ``target`` atomically."""
    tmp = temp_name(target)
    if fmt == "parquet":
        pq = require_pyarrow(target)
        rows = [r for p in parts for r in read_part(p)]
        pq.write_table(rows_to_table(rows, target), tmp)
        _fsync_file(tmp)
    else:
        with open(tmp, "wb") as out:
            for p in parts:
                out.write(p.read_bytes())
            out.flush()
            os.fsync(out.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def temp_name(path: Path) -> Path:
    """Where ``path`` is built before its rename: hidden, beside it, and unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temps(paths: list[Path]) -> None:
    """Remove the temporary files (temp_name) that killed runs left beside ``paths``. Called with the output's lock
    held, so no live run is building them."""
    for path in paths:
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink() and tmp.name[len(path.name) + 2:-4].isdigit():
                tmp.unlink()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = temp_name(path)
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())

