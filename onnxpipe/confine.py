"""Keeping a model directory's paths inside it: a model directory is untrusted input.

- a name the manifest gives (``graph.file``, tokenizer files) is one plain component: no separator, no ``..``;
- a file we read or copy may be a symlink only if it stays inside the directory (``inside``);
- the external-data locations written inside model.onnx are read here, from the protobuf wire format and without
  loading any weights, and checked the same way before onnx or onnxruntime opens the model.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from onnxpipe.errors import OnnxpipeError


def is_plain_name(name: object) -> bool:
    """A file name of one component: no directory part, not ``.``/``..``, not absolute, no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name)


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, every symlink on the way resolved, lies within ``root`` (resolved too)."""
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return real == base or base in real.parents


def check_inside(path: Path, root: Path, what: str) -> None:
    """Refuse a ``path`` (a file the directory names) that is a symlink leading out of ``root``."""
    if not inside(path, root):
        raise OnnxpipeError(
            f"{path}: {what} is a symlink leading out of {root} (to {os.path.realpath(path)}); refusing to follow it"
        )


# -- external data inside model.onnx ---------------------------------------------------------------------------------

def external_data_locations(model_path: Path) -> list[str]:
    """Every external-data ``location`` recorded in the ONNX file ``model_path`` (graph and subgraph initializers,
    Constant attributes, sparse tensors, functions), read from the protobuf wire format without loading weights.

    Raises ValueError for a file that is not well-formed protobuf."""
    return sorted(external_data_extents(model_path))


def external_data_extents(model_path: Path) -> dict[str, int]:
    """Each external-data location of ``model_path`` -> the end of the last byte range the graph reads from it
    (offset + length; 0 where no tensor records both). Raises ValueError as ``external_data_locations``."""
    size = model_path.stat().st_size
    if size == 0:
        return {}
    extents: dict[str, int] = {}
    with open(model_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            for location, end in _model_locations(buf, 0, size):
                extents[location] = max(extents.get(location, 0), end)
        finally:
            buf.release()
    return extents


def check_external_data(model_path: Path, root: Path) -> list[str]:
    """Refuse, naming ``model_path``, an external-data location that is absolute, climbs with ``..``, leads out of
    ``root`` through a symlink, or is missing. Returns the locations (relative to ``root``)."""
    try:
        extents = external_data_extents(model_path)
    except (ValueError, IndexError, RecursionError) as e:
        raise OnnxpipeError(f"{model_path}: not a readable ONNX model ({e})") from None
    locations = sorted(extents)
    for loc in locations:
        parts = Path(loc).parts
        if not loc or os.path.isabs(loc) or "\\" in loc or "\x00" in loc or ".." in parts:
            raise OnnxpipeError(
                f"{model_path}: external data location {loc!r} is not a relative path inside {root}; refusing it"
            )
        path = root / loc
        check_inside(path, root, f"external data of {model_path.name}")
        if not path.is_file():
            raise OnnxpipeError(f"{model_path}: its external data file {loc} is missing from {root}")
        size = path.stat().st_size
        if size < extents[loc]:  # optimize and quantize met this as an unexpected ValueError of their readers
            raise OnnxpipeError(f"{model_path}: its external data file {loc} holds {size:,} bytes, but the graph "
                                f"reads up to byte {extents[loc]:,} of it (truncated, or not this graph's weights)")
    return locations


def check_has_graph(model_path: Path) -> None:
    """Refuse, naming ``model_path``, an ONNX file with no graph to run: empty (0 bytes), or well-formed protobuf
    whose graph holds no node (onnxruntime's "No graph was found in the protobuf" came out of optimize as an
    unexpected error, after every pass had run). Read from the wire format: the first node ends the walk."""
    size = model_path.stat().st_size
    if size == 0:
        raise OnnxpipeError(f"{model_path}: empty file (0 bytes), not an ONNX model")
    with open(model_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            for number, wire, s, e in _fields(buf, 0, size):
                if number == _MODEL_GRAPH and wire == 2 and any(n == _GRAPH_NODE and w == 2 for n, w, _, _ in _fields(buf, s, e)):
                    return
        except (ValueError, IndexError) as err:
            raise OnnxpipeError(f"{model_path}: not a readable ONNX model ({err})") from None
        finally:
            buf.release()
    raise OnnxpipeError(f"{model_path}: not a readable ONNX model (no graph in it)")


# protobuf field numbers (onnx.proto): where tensors, and so external-data entries, can sit
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            _, nxt = _varint(buf, pos, end)
            yield number, wire, pos, nxt
        elif wire == 1:
            nxt = pos + 8
            yield number, wire, pos, nxt
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            nxt = pos + length
            if nxt > end:
                raise ValueError("truncated field")
            yield number, wire, pos, nxt
        elif wire == 5:
            nxt = pos + 4
            yield number, wire, pos, nxt
        else:
            raise ValueError(f"wire type {wire}")
        if nxt > end:
            raise ValueError("truncated field")
        pos = nxt


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _model_locations(buf: memoryview, start: int, end: int) -> Iterator[tuple[str, int]]:
    for number, wire, s, e in _fields(buf, start, end):
        if wire != 2:
            continue
        if number == _MODEL_GRAPH:
            yield from _graph_locations(buf, s, e, 0)
        elif number == _MODEL_FUNCTIONS:
            for n2, w2, s2, e2 in _fields(buf, s, e):
                if n2 == _FUNCTION_NODE and w2 == 2:
                    yield from _node_locations(buf, s2, e2, 1)


def _graph_locations(buf: memoryview, start: int, end: int, depth: int) -> Iterator[tuple[str, int]]:
    if depth > _MAX_DEPTH:
        raise ValueError("subgraphs nested too deep")
    for number, wire, s, e in _fields(buf, start, end):
        if wire != 2:
            continue
        if number == _GRAPH_INITIALIZER:
            yield from _tensor_locations(buf, s, e)
        elif number == _GRAPH_SPARSE_INITIALIZER:
            yield from _sparse_locations(buf, s, e)
        elif number == _GRAPH_NODE:
            yield from _node_locations(buf, s, e, depth)


def _node_locations(buf: memoryview, start: int, end: int, depth: int) -> Iterator[tuple[str, int]]:
    for number, wire, s, e in _fields(buf, start, end):
        if number != _NODE_ATTRIBUTE or wire != 2:
            continue
        for n2, w2, s2, e2 in _fields(buf, s, e):
            if w2 != 2:
                continue
            if n2 in (_ATTR_T, _ATTR_TENSORS):
                yield from _tensor_locations(buf, s2, e2)
            elif n2 in (_ATTR_G, _ATTR_GRAPHS):
                yield from _graph_locations(buf, s2, e2, depth + 1)
            elif n2 in (_ATTR_SPARSE, _ATTR_SPARSES):
                yield from _sparse_locations(buf, s2, e2)


def _sparse_locations(buf: memoryview, start: int, end: int) -> Iterator[tuple[str, int]]:
    for number, wire, s, e in _fields(buf, start, end):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES) and wire == 2:
            yield from _tensor_locations(buf, s, e)


def _tensor_locations(buf: memoryview, start: int, end: int) -> Iterator[tuple[str, int]]:
    """(location, offset + length) of a tensor stored as external data (its entries are key/value strings; the end
    is 0 unless both offset and length are plain numbers)."""
    entries: dict[str, str] = {}
    for number, wire, s, e in _fields(buf, start, end):
        if number != _TENSOR_EXTERNAL_DATA or wire != 2:
            continue
        key = value = None
        for n2, w2, s2, e2 in _fields(buf, s, e):
            if w2 == 2 and n2 == _ENTRY_KEY:
                key = bytes(buf[s2:e2]).decode("utf-8", "replace")
            elif w2 == 2 and n2 == _ENTRY_VALUE:
                value = bytes(buf[s2:e2]).decode("utf-8", "replace")
        if key is not None:
            entries[key] = value or ""
    if "location" in entries:
        offset, length = entries.get("offset", "0"), entries.get("length", "")
        extent = int(offset) + int(length) if offset.isdigit() and length.isdigit() else 0
        yield entries["location"], extent
