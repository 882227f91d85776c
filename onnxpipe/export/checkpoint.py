"""A Hugging Face safetensors checkpoint read one tensor at a time.

The files are read with plain seeks and reads, not mapped: pages of a mapped file that were touched count in the
process's resident size for as long as the mapping lives, so mapping a 16 GB checkpoint and reading every tensor
would leave the process at 16 GB. Read this way, the only memory held is the tensor asked for (the page cache is
the kernel's, not ours).

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}}
(offsets relative to the end of the header), then the data. A sharded checkpoint lists its files in
``model.safetensors.index.json`` (``weight_map``: name -> file).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxpipe.confine import check_inside, is_plain_name
from onnxpipe.errors import OnnxpipeError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HEADER_MAX_BYTES = 100 << 20
ITEM_SIZE = {"BF16": 2, "F16": 2, "F32": 4}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors' name: BF16, F16, F32
    shape: tuple[int, ...]
    start: int  # absolute offsets in ``file``
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def has_safetensors(src: Path) -> bool:
    return (src / SINGLE_FILE).is_file() or (src / INDEX_FILE).is_file()


class Checkpoint:
    """The tensors of a safetensors checkpoint by name; ``read`` returns one as a torch tensor of its stored dtype."""

    def __init__(self, entries: dict[str, TensorEntry]):
        self.entries = entries
        self._files: dict[Path, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, src: Path, root: Path | None = None) -> "Checkpoint":
        """Read the headers of ``src``'s safetensors file(s); every file must stay inside ``root`` (``src``)."""
        root = root or src
        if (src / INDEX_FILE).is_file():
            files = _index_files(src / INDEX_FILE)
        elif (src / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise OnnxpipeError(f"{src}: no {SINGLE_FILE} or {INDEX_FILE}")
        entries: dict[str, TensorEntry] = {}
        for name in files:
            path = src / name
            check_inside(path, root, "a weights file")
            if not path.is_file():
                raise OnnxpipeError(f"{path}: listed in {INDEX_FILE} but missing")
            for key, entry in _read_header(path).items():
                if key in entries:
                    raise OnnxpipeError(f"{path}: tensor {key!r} is also in {entries[key].file.name}")
                entries[key] = entry
        return cls(entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise OnnxpipeError(f"the checkpoint has no tensor {name!r}")
        return self.entries[name]

    def read(self, name: str) -> Any:
        """The tensor ``name`` (torch, its stored dtype), read into memory of its own."""
        e = self.entry(name)
        return self._pread(name, e.start, e.nbytes).reshape(e.shape)

    def read_rows(self, name: str, first: int, stop: int) -> Any:
        """Rows ``first:stop`` of ``name`` (its first dimension; a 0-d tensor is one row of one element)."""
        e = self.entry(name)
        rows = e.shape[0] if e.shape else 1
        if not 0 <= first <= stop <= rows:
            raise OnnxpipeError(f"rows {first}:{stop} of tensor {name!r} (it has {rows})")
        row_bytes = e.nbytes // rows if rows else 0
        t = self._pread(name, e.start + first * row_bytes, (stop - first) * row_bytes)
        return t.reshape(stop - first, *e.shape[1:])

    def _pread(self, name: str, offset: int, nbytes: int) -> Any:
        """``nbytes`` of ``name``'s file from ``offset``, as a flat torch tensor of ``name``'s dtype. Positional
        reads: several threads may read one file at once."""
        import torch

        e = self.entry(name)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        fd = self._handle(e.file).fileno()
        array: Any = buf.numpy()
        view = memoryview(array).cast("B")
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OnnxpipeError(f"{e.file}: truncated (tensor {name!r} ends past the end of the file)")
            done += n
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[e.dtype]
        return buf.view(dtype)

    def read_elements(self, name: str, flat: Any) -> Any:
        """The elements of ``name`` at the row-major indices ``flat`` (a torch tensor of its stored dtype), each
        read alone: a sample of a tensor without reading the tensor."""
        import torch

        e = self.entry(name)
        size = ITEM_SIZE[e.dtype]
        fh = self._handle(e.file)
        raw = bytearray()
        for i in flat:
            fh.seek(e.start + int(i) * size)
            raw += fh.read(size)
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[e.dtype]
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).clone() if raw else torch.empty(0, dtype=dtype)

    def _handle(self, path: Path) -> Any:
        with self._lock:
            fh = self._files.get(path)
            if fh is None:
                fh = self._files[path] = open(path, "rb")
            return fh

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _index_files(index: Path) -> list[str]:
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OnnxpipeError(f"{index}: malformed JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise OnnxpipeError(f"{index}: no weight_map")
    files = sorted(set(weight_map.values()), key=str)
    for name in files:
        if not is_plain_name(name):
            raise OnnxpipeError(f"{index}: weight_map names {name!r}, not a file name in the model directory")
    return files


def _read_header(path: Path) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise OnnxpipeError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(HEADER_MAX_BYTES, size - 8):
            raise OnnxpipeError(f"{path}: not a safetensors file (header length {n} for a file of {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OnnxpipeError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise OnnxpipeError(f"{path}: malformed safetensors header (not an object)")
    base = 8 + n
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise OnnxpipeError(f"{path}: malformed safetensors entry for {key!r}") from None
        if dtype not in ITEM_SIZE:
            raise OnnxpipeError(f"{path}: tensor {key!r} is {dtype}; the streamed export reads BF16, F16 and F32")
        numel = 1
        for d in shape:
            numel *= d
        if not (0 <= begin <= end <= size - base) or end - begin != numel * ITEM_SIZE[dtype]:
            raise OnnxpipeError(f"{path}: tensor {key!r} has offsets {begin}..{end} that do not fit its shape "
                                f"{list(shape)} {dtype} or the file")
        entries[key] = TensorEntry(path, dtype, shape, base + begin, base + end)
    return entries
