"""The decoder's KV cache: the past of every layer as OrtValues on the session's device.

A concat graph's cache grows: each step's presents replace it (``KVCache.values``). A shared-buffer graph
(``manifest.graph["kv"]["shares_buffer"]``) reads and writes one buffer per past, allocated once at its full length
(the *capacity*) and bound as both past and present, so the graph writes in place and ``length`` says how much of
it is written. ``reorder`` keeps (and repeats) rows on the device, through a small helper graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from onnxpipe.errors import OnnxpipeError


@dataclass
class KVCache:
    """The past of every layer as OrtValues [batch, kv_heads, length, head_dim] on the session's device.

    ``values`` is [key0, value0, key1, value1, ...]. For a concat graph ``length`` is the tensors' third axis; for a
    shared-buffer graph the tensors are ``capacity`` long and ``length`` says how much of them is written."""

    values: list[Any]
    length: int
    capacity: int | None = None
    batch: int = 0

    @property
    def shared(self) -> bool:
        return self.capacity is not None


def empty_cache(zeros: Callable[[tuple[int, ...]], Any], count: int, batch: int, num_kv_heads: int, head_dim: int,
                shares_buffer: bool, capacity: int | None) -> KVCache:
    """An empty cache of ``count`` tensors for ``batch`` rows: zero-length (concat graph) or ``capacity`` long
    (shared-buffer graph, which needs one). ``zeros(shape)`` makes one tensor on the device."""
    if shares_buffer:
        if capacity is None:
            raise OnnxpipeError("this graph shares its past/present buffer: the cache needs a capacity (max length)")
        shape = (batch, num_kv_heads, capacity, head_dim)
        return KVCache([zeros(shape) for _ in range(count)], 0, capacity, batch)
    shape = (batch, num_kv_heads, 0, head_dim)
    return KVCache([zeros(shape) for _ in range(count)], 0, None, batch)


def zeros(ort: Any, device: str, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
    """A cache tensor of ``shape`` on ``device`` ("cpu" or "cuda")."""
    if device == "cpu":
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))
    if 0 in shape:  # an empty past: nothing to copy
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), "cuda", 0)
    # a shared buffer: allocated on the device directly, each position written before the mask lets it be read
    return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", 0)


def reorder(gather: Any, cache: KVCache, rows: np.ndarray, bind_rows: Callable[[Any, np.ndarray], None],
            device: str) -> None:
    """Keep (and repeat) ``cache``'s rows ``rows`` in that order, on the device, through ``gather`` (a session
    of ``helper_graphs.gather_graph``); ``bind_rows(io, rows)`` binds the row indices as its ``rows`` input."""
    rows = np.asarray(rows, np.int64)
    io = gather.io_binding()
    bind_rows(io, rows)
    for i, value in enumerate(cache.values):
        io.bind_ortvalue_input(f"x{i}", value)
        io.bind_output(f"y{i}", device, 0)
    gather.run_with_iobinding(io)
    cache.values = list(io.get_outputs())
    cache.batch = len(rows)
