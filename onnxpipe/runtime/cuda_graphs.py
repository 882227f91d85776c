"""Decode steps and prefills of a DecoderSession replayed as captured CUDA graphs.

A CUDA graph replays fixed kernels over fixed buffers, so every (batch, capacity) gets a *slot* (``_GraphSlot``):
the KV cache at its full capacity, the step's input and logits buffers, and one IO binding over them, made and
captured once (``CudaGraphs.capture``). A decode step then copies its few inputs into the slot's buffers and replays
(``replay``); greedy steps whose graph carries the step tail (``step_tail.py``) write their own next inputs and need
nothing from the host (``step_fed``). A prefill into a slot's empty cache replays a graph of its own per prompt
width (``_PrefillGraph``). Only the CUDA form of ``onnxpipe optimize --target cuda`` can run so
(``check_cuda_graph_form``).

The graphs belong to one session (``GraphHost``: a DecoderSession) and read its state as it is when they run, so
a caller (or a test driving the slots on the CPU) may swap its onnxruntime session or switch ``cuda_graph`` on.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from onnxpipe.errors import OnnxpipeError, first_line
from onnxpipe.runtime.chunk_lane import CHUNK_IDS, CHUNK_LAST, CHUNK_LOGITS, CHUNK_MASK, CHUNK_POSITIONS, chunk_name
from onnxpipe.runtime.helper_graphs import patch_graph, step_head_graph
from onnxpipe.runtime.kv_cache import KVCache
from onnxpipe.runtime.last_position import LAST_INDEX
from onnxpipe.runtime.step_tail import NEXT_IDS, NEXT_MASK, NEXT_POSITIONS

GRAPH_CAPACITY_STEP = 256
# at most this many (batch, capacity) slots keep their fixed buffers (each holds a whole KV cache: 256 MB for a 1B
# Llama at batch 32 x 256 positions in fp16); a new one lets the least recently used go. Its captured graphs are
# never replayed again (graph ids are not reused), and a cache still holding its buffers keeps them alive and runs
# uncaptured
GRAPH_SLOTS_MAX = 8
# captured prefills: only where launches, not the device, bound them (H100, 1B: batch 1 x 128 tokens 1.7 ms of
# kernels, ~1 ms of launching), and a bounded number per slot (each keeps its own input buffers and graph)
PREFILL_CAPTURE_TOKENS = 4096
PREFILL_GRAPHS_PER_SLOT = 16
# fed steps launched before the oldest is read (``FedAhead``): 1 hides the host's wait, read-back and launch
# behind the step that runs meanwhile; each is a step a row may have to hold unread at its end
AHEAD_DEPTH = 1
# chunks of a long prompt read into one row of a slot's shared buffer (serve's slot layout) through captured graphs:
# one per (row, chunk width), the chunk padded to the width, so only these widths, and only in a fixed set of rows
# (serve reads long prompts in its CHUNK_GRAPH_ROWS highest rows): at most one graph per (row, width) of those, so
# the bound does not grow with the batch. A graph keeps, besides what onnxruntime keeps for it for the session's
# life (it has no call that releases one graph id, so letting a graph go would free none of that: no eviction), its
# own fixed buffers: ids and positions [1, width] and the last index (int64), the mask and the step tail's next mask
# [1, capacity] (int64) and logits [1, 1, vocab] (the KV dtype): ~16 x capacity + 2 x vocab bytes in fp16, 0.33 MB
# for a 1B Llama at 4352 positions (vocabulary 128256), 9 MB for all 28. Beyond the bound (or for any other reason
# of ``CHUNK_SKIPS``) a chunk runs uncaptured with the same inputs
CHUNK_WIDTHS = (8, 16, 32, 64, 128, 256, 512)
CHUNK_GRAPH_ROWS = 4
CHUNK_GRAPHS_PER_SLOT = CHUNK_GRAPH_ROWS * len(CHUNK_WIDTHS)
# why a chunk did not run through a captured graph (``CudaGraphs.run_chunk``'s answer, counted by serve's /health)
CHUNK_SKIPS = {
    "no_slot": "its KV buffers are no graph slot's (none made, or let go past GRAPH_SLOTS_MAX)",
    "width": "its width is not one of CHUNK_WIDTHS (a chunk wider than 512, or one that would pass the row's end)",
    "mask": "its mask is not at the slot's full width",
    "head": "the session has no last-position head",
    "thread": "the slot's decode graph was not captured on this thread",
    "bound": "a new graph past CHUNK_GRAPHS_PER_SLOT",
}
# why a chunk did not ride in the decode step's run (``CudaGraphs.step_lane``), besides CHUNK_SKIPS' reasons
LANE_SKIPS = {
    "lane": "the session has no lane (chunk_lane off, or lane_why_not)",
    "not_fed": "asked for a fed step (no host inputs) where the slot's last step wrote none (serve passes them then)",
    "not_captured": "the row's lane graph at that width was not captured ahead (warm_lanes)",
}


_threads = threading.local()
_thread_numbers = itertools.count(1)


def _this_thread() -> int:
    """A number of the calling thread, never reused (thread idents are, once a thread ends; onnxruntime's
    per-thread context is not: a new thread starts with no captured graph)."""
    n = getattr(_threads, "number", None)
    if n is None:
        n = _threads.number = next(_thread_numbers)
    return n


class GraphHost(Protocol):
    """What the graphs read of the session they belong to (a DecoderSession), at the time they run."""

    session: Any  # the onnxruntime InferenceSession of the decoder graph
    lane: Any  # the InferenceSession of its lane graph (chunk_lane.py), or None
    lane_has_positions: bool  # the lane graph reads its chunk's position_ids
    transfers: Any  # its Transfers counters
    cuda_graph: bool
    capture_prefill: bool
    fed: bool  # its decode steps carry the step tail
    last_position: bool  # its logits are [B, 1, V], at the LAST_INDEX input's position
    has_position_ids: bool
    past_names: list[str]
    present_names: list[str]
    logits_name: str
    num_kv_heads: int
    head_dim: int
    kv_dtype: np.dtype
    vocab_size: int
    max_positions: int

    def _buffer(self, shape: tuple[int, ...], dtype: Any) -> Any: ...
    def _device_type(self) -> str: ...
    def _helper(self, proto: Any) -> Any: ...
    def _bind_input(self, io: Any, name: str, array: np.ndarray, session: Any = None) -> None: ...
    def _onnx_dtype(self) -> int: ...
    def _run_graph(self, io: Any, run_options: Any, what: str, session: Any = None) -> None: ...
    def _failed(self, e: Exception, what: str) -> None: ...
    def _select(self, logits: Any, last_index: np.ndarray, want: str) -> np.ndarray: ...


@dataclass
class _GraphSlot:
    graph_id: int
    capacity: int
    cache: list[Any]
    ids: Any
    mask: Any
    positions: Any
    logits: Any
    io: Any
    runs: int = 0
    primed: bool = False  # its last run wrote the next step's inputs (step tail)
    run_options: Any = None
    head: Any = None
    head_io: Any = None
    last_index: Any = None  # zeros [B]: the position a decode step's logits are taken at
    threads: set[int] = field(default_factory=set)  # the threads its decode graph was captured on (capture)
    prefills: dict[int, "_PrefillGraph"] = field(default_factory=dict)  # by prompt width
    chunks: dict[tuple[int, int], "_ChunkGraph"] = field(default_factory=dict)  # by (row, chunk width)
    lanes: dict[tuple[int, int], "_ChunkGraph"] = field(default_factory=dict)  # the lane's, by (row, chunk width)
    ahead: Any = None  # (run options without the end-of-run sync, IdsReader) of its fed steps launched ahead


class FedAhead:
    """Greedy fed steps of one slot launched ahead of their reads: ``launch`` queues a step on the session's stream
    (onnxruntime's run returns without waiting for it) and a copy of the ids it writes into pinned memory behind
    it; ``read`` waits for the oldest launched step's copy. With ``AHEAD_DEPTH`` steps launched before the first
    read, the GPU runs step k+1 while the host takes step k's tokens: no gap between two steps for the host's
    wait, its read-back and its next launch. ``drain`` waits for everything launched (the loop's end: the cache
    and its buffers are then the host's again). Each launched step advances the cache by one position, read or not
    (the caller launches no step a row could not hold)."""

    def __init__(self, graphs: CudaGraphs, slot: _GraphSlot, cache: KVCache, options: Any, reader: Any):
        self.graphs, self.slot, self.cache, self.options, self.reader = graphs, slot, cache, options, reader
        self.launched = self.read_count = 0

    @property
    def in_flight(self) -> int:
        return self.launched - self.read_count

    def launch(self) -> None:
        host, slot = self.graphs.host, self.slot
        if self.in_flight >= self.reader.depth:
            raise OnnxpipeError(f"FedAhead: {self.in_flight} steps unread already (at most {self.reader.depth})")
        try:
            host.session.run_with_iobinding(slot.io, self.options)
            self.reader.queue(self.launched, slot.ids.data_ptr())
        except Exception as e:
            self.drain_quietly()
            host._failed(e, f"a CUDA-graph decode step launched ahead (batch {self.cache.batch}, "
                            f"{self.cache.length} cached)")
        self.launched += 1
        self.graphs.ahead_steps += 1
        slot.runs += 1
        self.cache.length += 1
        host.transfers.steps += 1

    def read(self) -> np.ndarray:
        """The oldest unread launched step's next ids [batch] (waits for it)."""
        if self.in_flight <= 0:
            raise OnnxpipeError("FedAhead.read: no step launched and unread")
        out = self.reader.read(self.read_count)
        self.read_count += 1
        self.graphs.host.transfers.down_bytes += out.nbytes
        return out

    def wait(self) -> None:
        """Wait for every launched step; their ids stay to be read."""
        self.reader.stream.sync()

    def drain(self) -> None:
        """Wait for every launched step; the unread ones' ids are dropped."""
        self.reader.stream.sync()
        self.read_count = self.launched

    def drain_quietly(self) -> None:
        """``drain`` where an error is already being raised: a failing wait adds none."""
        try:
            self.reader.stream.sync()
        except Exception:  # noqa: BLE001 - the failure being reported is the run's
            pass
        self.read_count = self.launched


@dataclass
class _PrefillGraph:
    """A captured prefill into its slot's cache: fixed input buffers for one prompt width."""

    graph_id: int
    ids: Any
    mask: Any
    positions: Any
    last_index: Any
    logits: Any
    io: Any
    runs: int = 0
    run_options: Any = None
    scratch: dict[str, Any] = field(default_factory=dict)


@dataclass
class _ChunkGraph:
    """A captured chunk of a prompt into one row of its slot's cache, bound by address: fixed input buffers for one
    chunk width, the mask at the slot's full width. The lane's graphs (a decode step of the slot that also reads a
    chunk, ``chunk_lane.py``) are these too: the chunk's buffers their own, the decode step's the slot's."""

    graph_id: int
    row: int
    width: int
    ids: Any
    mask: Any
    positions: Any
    last_index: Any
    logits: Any
    io: Any
    run_options: Any = None
    runs: int = 0
    threads: set[int] = field(default_factory=set)  # the threads it was captured on (its first run on each)
    scratch: dict[str, Any] = field(default_factory=dict)


def _upload(host: Any, graph: Any, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            last_index: np.ndarray, positions_read: bool | None = None) -> None:
    """Copy a captured prefill's or chunk's int64 inputs into its fixed buffers (positions only where the graph
    reads them: ``positions_read``, default the session's), counted as uploads."""
    arrays = [(graph.ids, ids), (graph.mask, mask), (graph.last_index, last_index)]
    if host.has_position_ids if positions_read is None else positions_read:
        arrays.append((graph.positions, positions))
    for value, array in arrays:
        array = np.ascontiguousarray(array, dtype=np.int64)
        value.update_inplace(array)
        host.transfers.up_bytes += array.nbytes


def _bind_scratch(host: Any, io: Any, batch: int, mask_width: int) -> dict[str, Any]:
    """Fixed buffers of its own for a captured run's step-tail outputs (never the decode graph's), bound to ``io``."""
    dev = host._buffer
    scratch = {NEXT_IDS: dev((batch, 1), np.int64), NEXT_MASK: dev((batch, mask_width), np.int64)}
    if NEXT_POSITIONS in {o.name for o in host.session.get_outputs()}:
        scratch[NEXT_POSITIONS] = dev((batch, 1), np.int64)
    for name, value in scratch.items():
        io.bind_ortvalue_output(name, value)
    return scratch


def check_cuda_graph_form(path: Any, graph: dict[str, Any]) -> None:
    """CUDA graphs replay fixed shapes: the cache must be one in-place buffer and the mask readable at a fixed
    width, which is the CUDA attention form of optimize --target cuda."""
    kv = graph.get("kv") or {}
    if not (kv.get("shares_buffer") and graph.get("padding_side") == "right"
            and graph.get("attention_mask_use") == "row sums and width"):
        raise OnnxpipeError(f"{path}: CUDA graphs need the graph of `onnxpipe optimize --target cuda` (a shared KV "
                            "buffer and a mask read only for its row sums); this one is not")


def run_options(ort: Any, graph_id: int) -> Any:
    """onnxruntime RunOptions naming the CUDA graph a run captures or replays (-1: neither)."""
    ro = ort.RunOptions()
    ro.add_run_config_entry("gpu_graph_id", str(graph_id))  # -1: run without capturing or replaying
    return ro


class CudaGraphs:
    """The captured graphs of one session: its slots by (batch, capacity), least recently used first."""

    def __init__(self, host: GraphHost, ort: Any):
        self.host = host
        self._ort = ort
        self.slots: dict[tuple[int, int], _GraphSlot] = {}
        self.graph_ids = 0
        self.lane_graph_ids = 0  # the lane session's own graph ids
        self.slots_dropped = 0  # slots let go to keep at most GRAPH_SLOTS_MAX (their graph ids never rerun)
        self._patch: Any = None  # the helper session of ``patch_rows`` (made at its first use)
        self.ahead_steps = 0  # fed steps launched ahead of their reads (``FedAhead``)

    # ---- the session's entry points ----
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache in the slot of (batch, capacity): its first step's inputs come from the host. The slot's
        decode graph is captured on the calling thread here, while the cache is empty, unless it already was."""
        slot = self.slot(batch, capacity)
        if _this_thread() not in slot.threads:
            self.capture(slot)
        slot.primed = False
        return KVCache(slot.cache, 0, slot.capacity, batch)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache,
             last_index: np.ndarray | None, want: str) -> np.ndarray | None:
        """The step through a captured graph where ``cache`` lives in a slot and the step fits one (a decode
        step; a prefill into the slot's empty cache, small enough and of a width the slot has or may add), else
        None: the caller runs it uncaptured."""
        host = self.host
        batch, seq = input_ids.shape
        slot = self.slots.get((batch, cache.capacity or 0))
        if slot is None or cache.values is not slot.cache:
            return None
        if seq == 1:
            if _this_thread() not in slot.threads:  # its first run here would capture it on this step
                return None
            return self.replay(slot, input_ids, attention_mask, position_ids, cache, want)
        if (cache.length == 0 and host.capture_prefill and batch * seq <= PREFILL_CAPTURE_TOKENS
                and (seq in slot.prefills or len(slot.prefills) < PREFILL_GRAPHS_PER_SLOT)):
            return self.replay_prefill(slot, input_ids, attention_mask, position_ids, cache, last_index, want)
        return None

    def can_feed(self, cache: KVCache) -> bool:
        """Whether ``step_fed`` can run the next step of ``cache`` (a slot whose step wrote its inputs)."""
        host = self.host
        slot = self.slots.get((cache.batch, cache.capacity or 0)) if host.fed and host.cuda_graph else None
        return (slot is not None and slot.primed and cache.values is slot.cache
                and _this_thread() in slot.threads)

    def step_fed(self, cache: KVCache) -> np.ndarray:
        """One greedy decode step fed by the previous one on the device (its argmax, mask and positions): nothing
        goes up; returns the next token ids [batch]."""
        if not self.can_feed(cache):
            raise OnnxpipeError("step_fed needs a cache whose last step ran in a CUDA-graph slot with the step tail")
        slot = self.slots[(cache.batch, cache.capacity or 0)]
        self._run_slot(slot, cache)
        return self._next_ids(slot)

    def ahead(self, cache: KVCache) -> FedAhead | None:
        """Fed steps of ``cache`` launched ahead of their reads (``FedAhead``), or None where they cannot be: the
        step must be feedable (``can_feed``) and the session's CUDA EP must run on a stream of its own
        (``host.stream``: ``cuda_stream.py``)."""
        stream = getattr(self.host, "stream", None)
        if stream is None or not self.can_feed(cache):
            return None
        slot = self.slots[(cache.batch, cache.capacity or 0)]
        if slot.ahead is None:
            from onnxpipe.runtime.cuda_stream import IdsReader

            options = run_options(self._ort, slot.graph_id)
            options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            slot.ahead = (options, IdsReader(stream, cache.batch, AHEAD_DEPTH + 1))
        return FedAhead(self, slot, cache, *slot.ahead)

    def patch_rows(self, cache: KVCache, rows: list[int], ids: list[int], places: list[int]) -> bool:
        """Set rows ``rows`` of a primed slot's next decode inputs on the device, as a host-fed step would upload
        them for those rows: token ``ids[i]`` written at position ``places[i]`` (its mask ``places[i] + 1`` ones),
        the other rows as the step before wrote them; so a row that joins or is parked needs no host-fed step for
        every row. A small helper graph (``helper_graphs.patch_graph``) whose outputs are bound to the buffers it
        reads, run on the calling thread between two steps. False (nothing done) where the next step could not be
        fed anyway (``can_feed``)."""
        if not self.can_feed(cache):
            return False
        host = self.host
        slot = self.slots[(cache.batch, cache.capacity or 0)]
        if any(not 0 <= r < cache.batch for r in rows) or any(not 0 <= p < slot.capacity for p in places):
            raise OnnxpipeError(f"no row {rows} / position {places} in a slot of {cache.batch} x {slot.capacity}")
        if self._patch is None:
            self._patch = host._helper(patch_graph(host.has_position_ids))
        sel = np.zeros((cache.batch, 1), bool)
        new_ids, new_places = np.zeros((cache.batch, 1), np.int64), np.zeros((cache.batch, 1), np.int64)
        sel[rows, 0], new_ids[rows, 0], new_places[rows, 0] = True, ids, places
        io = self._patch.io_binding()
        io.bind_ortvalue_input("ids", slot.ids)
        io.bind_ortvalue_input("mask", slot.mask)
        io.bind_ortvalue_output("ids_out", slot.ids)
        io.bind_ortvalue_output("mask_out", slot.mask)
        small = {"sel": sel, "new_ids": new_ids, "new_counts": new_places + 1}
        if host.has_position_ids:
            io.bind_ortvalue_input("positions", slot.positions)
            io.bind_ortvalue_output("positions_out", slot.positions)
            small["new_positions"] = new_places
        for name, array in small.items():
            host._bind_input(io, name, array, session=self._patch)
        try:
            self._patch.run_with_iobinding(io)
        except Exception as e:
            text = first_line(e)
            raise OnnxpipeError(f"onnxruntime failed on a decode slot's row patch: {text}") from None
        return True

    # ---- slots ----
    def slot(self, batch: int, capacity: int) -> _GraphSlot:
        """The fixed buffers of the decode graph for ``batch`` rows; capacity rounds up to a multiple of 256 (at
        most the model's max positions) so that generations of similar length share one captured graph."""
        host = self.host
        # the fixed-width mask makes the graph's total length the capacity: never past the rotary caches' length
        capacity = max(capacity, min(-(-capacity // GRAPH_CAPACITY_STEP) * GRAPH_CAPACITY_STEP, host.max_positions))
        key = (batch, capacity)
        if key in self.slots:
            self.slots[key] = self.slots.pop(key)  # the most recently used last
        else:
            while len(self.slots) >= GRAPH_SLOTS_MAX:  # the least recently used slot's buffers go
                self.slots.pop(next(iter(self.slots)))
                self.slots_dropped += 1
            where, dev = host._device_type(), host._buffer
            cache = [dev((batch, host.num_kv_heads, capacity, host.head_dim), host.kv_dtype) for _ in host.past_names]
            self.graph_ids += 1
            slot = _GraphSlot(self.graph_ids, capacity, cache, dev((batch, 1), np.int64),
                              dev((batch, capacity), np.int64), dev((batch, 1), np.int64),
                              dev((batch, 1, host.vocab_size), host.kv_dtype), host.session.io_binding())
            io = slot.io
            if host.last_position:  # a decode step's one position: index 0, fixed
                slot.last_index = self._ort.OrtValue.ortvalue_from_numpy(np.zeros(batch, np.int64), where, 0)
            self._bind_fixed(io, slot.ids, slot.mask, slot.positions, slot.last_index, cache, slot.logits)
            if host.fed:  # the step writes the next step's inputs into the buffers it read them from
                io.bind_ortvalue_output(NEXT_IDS, slot.ids)
                io.bind_ortvalue_output(NEXT_MASK, slot.mask)
                if NEXT_POSITIONS in {o.name for o in host.session.get_outputs()}:  # where the graph reads them
                    io.bind_ortvalue_output(NEXT_POSITIONS, slot.positions)
            self.slots[key] = slot
            self.capture(slot)
        return self.slots[key]

    def _bind_fixed(self, io: Any, ids: Any, mask: Any, positions: Any, last_index: Any, cache: list[Any],
                    logits: Any) -> None:
        """Bind a captured graph's fixed buffers: its inputs, the slot's KV buffers (read and written in place) and
        its logits. last_index None: the graph has no one-position head."""
        host = self.host
        io.bind_ortvalue_input("input_ids", ids)
        io.bind_ortvalue_input("attention_mask", mask)
        if host.has_position_ids:
            io.bind_ortvalue_input("position_ids", positions)
        if last_index is not None:
            io.bind_ortvalue_input(LAST_INDEX, last_index)
        for name, value in zip(host.past_names, cache):
            io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_output(host.logits_name, logits)
        for name, value in zip(host.present_names, cache):
            io.bind_ortvalue_output(name, value)

    def capture(self, slot: _GraphSlot) -> None:
        """Capture the slot's decode graph on harmless inputs, before any real step on this thread. onnxruntime
        captures a graph id on its first use by running the model several times within that one call (two regular
        runs, the capture, its replay). Those repeats are not idempotent for a decode step: each writes a KV entry
        at the row's length and, with the step tail, advances its own ids, mask and positions, so a real first step
        would come back several steps on. And the CUDA EP keeps its captured graphs per thread (its
        PerThreadContext): a graph id captured on one thread is captured again by its first run on another. So a
        slot records the threads it was captured on (``threads``); ``new_cache`` captures it on a new one, and a
        decode step on a thread it was not captured on runs uncaptured (``step``, ``can_feed``). Here the repeats
        write only the first few positions of an empty slot, which the next prefill and steps write before they
        read; the inputs go up again with the first real step (not counted as per-step transfers). A prefill graph
        needs none of this: its repeats rewrite the same entries."""
        host = self.host
        batch = slot.ids.shape()[0]
        self._harmless_inputs(slot)
        slot.run_options = run_options(self._ort, slot.graph_id)
        host._run_graph(slot.io, slot.run_options, f"capturing the CUDA-graph decode step (batch {batch})")
        slot.threads.add(_this_thread())
        slot.primed = False

    def _harmless_inputs(self, slot: _GraphSlot) -> None:
        """The slot's decode inputs for a capture: token 0 at position 0 in every row (a capture's repeated runs then
        write only the first few positions of the empty rows)."""
        batch = slot.ids.shape()[0]
        mask = np.zeros((batch, slot.capacity), np.int64)
        mask[:, 0] = 1
        slot.ids.update_inplace(np.zeros((batch, 1), np.int64))
        slot.mask.update_inplace(mask)
        if self.host.has_position_ids:
            slot.positions.update_inplace(np.zeros((batch, 1), np.int64))

    # ---- replay ----
    def replay(self, slot: _GraphSlot, input_ids: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray, cache: KVCache, want: str) -> np.ndarray:
        """One decode step through the slot's captured graph (captured when the slot was made: capture). The mask
        is fed at the slot's full width with each row's count of ones: the graph reads only its row sums (seqlens)
        and width (total length, fixed so the graph's shapes never change)."""
        self._upload_step(slot, input_ids, attention_mask, position_ids)
        self._run_slot(slot, cache)
        return self._decoded(slot, want)

    def _upload_step(self, slot: _GraphSlot, input_ids: np.ndarray, attention_mask: np.ndarray,
                     position_ids: np.ndarray) -> None:
        """A host-fed decode step's inputs into the slot's fixed buffers, the mask at the slot's full width."""
        host = self.host
        counts = attention_mask.sum(axis=1)
        mask = (np.arange(slot.capacity)[None, :] < counts[:, None]).astype(np.int64)
        slot.ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        slot.mask.update_inplace(mask)
        if host.has_position_ids:
            slot.positions.update_inplace(np.ascontiguousarray(position_ids, dtype=np.int64))
        host.transfers.up_bytes += input_ids.nbytes + mask.nbytes + (position_ids.nbytes if host.has_position_ids else 0)

    def _decoded(self, slot: _GraphSlot, want: str) -> np.ndarray:
        """What a decode step of the slot gives back: its argmax (the step tail's, in the ids buffer) or through the
        slot's head graph its logits [batch, vocab] or argmax [batch]."""
        host = self.host
        batch = slot.ids.shape()[0]
        if host.fed and want == "argmax":  # the step left its argmax in the ids buffer
            return self._next_ids(slot)
        if slot.head is None:  # the decode step's own head: logits [B, 1, V] read in place, nothing to index
            slot.head = host._helper(step_head_graph(host._onnx_dtype(), batch, host.vocab_size))
            slot.head_io = {}
            for name in ("last_logits", "argmax"):
                io = slot.head.io_binding()
                io.bind_ortvalue_input("logits", slot.logits)
                io.bind_output(name, "cpu")
                slot.head_io[name] = io
        io = slot.head_io["last_logits" if want == "logits" else "argmax"]
        slot.head.run_with_iobinding(io)
        out = io.get_outputs()[0].numpy()
        host.transfers.down_bytes += out.nbytes
        return out

    def replay_prefill(self, slot: _GraphSlot, input_ids: np.ndarray, attention_mask: np.ndarray,
                       position_ids: np.ndarray, cache: KVCache, last_index: np.ndarray | None,
                       want: str) -> np.ndarray:
        """A prefill into the slot's empty cache through a captured graph of its own (per prompt width: generate
        pads GPU prompts to multiples of PREFILL_BUCKET, so widths repeat). Inputs go up into fixed buffers."""
        host = self.host
        batch, width = input_ids.shape
        pg = slot.prefills.get(width) or self._prefill_graph(slot, batch, width)
        if last_index is None:
            last_index = np.full((batch,), width - 1, np.int64)
        _upload(host, pg, input_ids, attention_mask, position_ids, last_index)
        if pg.run_options is None:
            pg.run_options = run_options(self._ort, pg.graph_id)
        host._run_graph(pg.io, pg.run_options, f"a CUDA-graph prefill (batch {batch}, {width} tokens)")
        pg.runs += 1
        slot.primed = False  # the decode buffers were not written: the first step goes up from the host
        cache.length += width
        host.transfers.steps += 1
        if want == "argmax" and NEXT_IDS in pg.scratch:  # the step tail's argmax of these logits: no head run
            out = pg.scratch[NEXT_IDS].numpy()[:, 0]
            host.transfers.down_bytes += out.nbytes
            return out
        return host._select(pg.logits, np.zeros(batch, np.int64), want)

    def _prefill_graph(self, slot: _GraphSlot, batch: int, width: int) -> _PrefillGraph:
        host = self.host
        dev = host._buffer
        self.graph_ids += 1
        pg = _PrefillGraph(self.graph_ids, dev((batch, width), np.int64), dev((batch, width), np.int64),
                           dev((batch, width), np.int64), dev((batch,), np.int64),
                           dev((batch, 1, host.vocab_size), host.kv_dtype), host.session.io_binding())
        io = pg.io
        self._bind_fixed(io, pg.ids, pg.mask, pg.positions, pg.last_index, slot.cache, pg.logits)
        if host.fed:  # the step tail's outputs: fixed scratch (a prefill's mask is narrower than the slot's)
            pg.scratch = _bind_scratch(host, io, batch, width)
        slot.prefills[width] = pg
        return pg

    # ---- chunks of a prompt into one row of a slot (serve's slot layout) ----
    def run_chunk(self, values: list[Any], row: int, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                  last_index: np.ndarray, logits: bool = True) -> tuple[np.ndarray | None, bool] | str:
        """One chunk of a prompt into row ``row`` of the slot whose KV buffers are ``values``, through the captured
        graph of (row, chunk width): (its logits at ``last_index`` [1, vocab] float32, or None with ``logits=False``:
        nothing read back, whether this run captured the graph), or, where it cannot run so, why (a key of ``CHUNK_SKIPS``: no such slot, a width not in CHUNK_WIDTHS,
        a mask not at the slot's full width, no last-position head, a thread the slot's decode graph was not captured
        on, or a new graph past CHUNK_GRAPHS_PER_SLOT): the caller runs the same inputs uncaptured.

        The inputs are ``RowPrefill.chunk_inputs``': ids [1, width] (the chunk right-padded to its width), the mask
        [1, capacity] with ones over the row's positions so far and the chunk's width, positions [1, width]. With the
        mask wider than the chunk, onnxruntime's GroupQueryAttention takes the run as a "subsequent prompt" whatever
        the start (group_query_attention_helper.h, CheckInputs: ``sequence_length > 1 && sequence_length !=
        total_sequence_length``, batch 1 only; total_sequence_length is the mask's width): it then reads each row's
        length from seqlens_k (the mask's row sum - 1), so the chunk's past is ``seqlens_k + 1 - width`` positions,
        its keys and values are written from there and its rotary positions follow; the width of the mask is never
        read as a length, only as the total the graph's shapes are made for, as in the decode graph. A capture's
        repeated runs (onnxruntime runs a graph id's first use several times in one call) write the same entries
        again: a chunk run is idempotent.

        The graph has input and output buffers of its own (its step tail's outputs too: ``_bind_scratch``) and writes
        of the slot's buffers only the row's keys and values: the decode graph's inputs stay as its last step wrote
        them, so a slot that was primed stays primed. Whether the next decode step may then be fed on the device is
        the caller's to say (serve parks a row being read where fed steps cannot write over its prompt)."""
        host = self.host
        width = ids.shape[1]
        slot = next((s for s in self.slots.values() if s.cache and values
                     and s.cache[0].data_ptr() == values[0].data_ptr()), None)
        if slot is None:
            return "no_slot"
        if width not in CHUNK_WIDTHS:
            return "width"
        if mask.shape != (1, slot.capacity):
            return "mask"
        if not host.last_position:
            return "head"
        if _this_thread() not in slot.threads:
            return "thread"
        cg = slot.chunks.get((row, width))
        if cg is None:
            if len(slot.chunks) >= CHUNK_GRAPHS_PER_SLOT:
                return "bound"
            cg = self._chunk_graph(slot, row, width)
        _upload(host, cg, ids, mask, positions, last_index)
        thread = _this_thread()
        captures = thread not in cg.threads
        host._run_graph(cg.io, cg.run_options, f"a CUDA-graph prefill chunk (row {row}, {width} tokens)")
        cg.threads.add(thread)
        cg.runs += 1
        return (host._select(cg.logits, np.zeros(1, np.int64), "logits") if logits else None), captures

    def _chunk_graph(self, slot: _GraphSlot, row: int, width: int) -> _ChunkGraph:
        host = self.host
        self.graph_ids += 1
        cg = self._chunk_buffers(self.graph_ids, slot, row, width, host.session)
        io = cg.io
        io.bind_ortvalue_input("input_ids", cg.ids)
        io.bind_ortvalue_input("attention_mask", cg.mask)
        if host.has_position_ids:
            io.bind_ortvalue_input("position_ids", cg.positions)
        io.bind_ortvalue_input(LAST_INDEX, cg.last_index)
        io.bind_ortvalue_output(host.logits_name, cg.logits)
        self._bind_row(io, slot, row, host.past_names, host.present_names)
        if host.fed:  # the step tail's outputs: fixed scratch, never the decode graph's buffers
            cg.scratch = _bind_scratch(host, io, 1, slot.capacity)
        cg.run_options = run_options(self._ort, cg.graph_id)
        slot.chunks[(row, width)] = cg
        return cg

    # ---- a chunk in the decode step's own run (the lane, chunk_lane.py) ----
    def step_lane(self, cache: KVCache, row: int, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                  last_index: np.ndarray, step: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                  want: str = "argmax", logits: bool = False) -> tuple[np.ndarray, np.ndarray | None] | str:
        """A decode step of the slot whose run also reads a chunk of a prompt into row ``row``
        (``RowPrefill.chunk_inputs``' arrays): the weights are read once for both. ``step``: the step's host inputs
        (ids, mask, positions), uploaded as ``replay`` does; None: a greedy step fed on the device, as ``step_fed``.
        Returns (what the step gives: the next ids [batch] (greedy) or with ``want="logits"`` its logits [batch,
        vocab]; with ``logits`` the chunk's logits at ``last_index`` [1, vocab] float32, else None: nothing read
        back), or why it cannot run so (a key of LANE_SKIPS or CHUNK_SKIPS; nothing ran): the caller then runs the
        chunk and the step apart. The graph was captured ahead (``warm_lanes``): a lane graph's first run on a
        thread runs it several times, which a decode step's inputs cannot take (each run advances them)."""
        host = self.host
        slot = self._lane_slot(cache)
        if isinstance(slot, str):
            return slot
        if step is None and not self.can_feed(cache):
            return "not_fed"
        width = ids.shape[1]
        if width not in CHUNK_WIDTHS:
            return "width"
        if mask.shape != (1, slot.capacity):
            return "mask"
        lg = slot.lanes.get((row, width))
        if lg is None or _this_thread() not in lg.threads:
            return "not_captured"
        if step is not None:
            self._upload_step(slot, *step)
        # the graph takes the chunk's last index in the merged sequence: after the step's rows
        _upload(host, lg, ids, mask, positions, last_index + cache.batch, host.lane_has_positions)
        host._run_graph(lg.io, lg.run_options, f"a CUDA-graph decode step with a chunk (row {row}, {width} tokens)",
                        session=host.lane)
        lg.runs += 1
        slot.runs += 1
        slot.primed = host.fed
        cache.length += 1
        host.transfers.steps += 1
        out = self._next_ids(slot) if step is None else self._decoded(slot, want)
        return out, (host._select(lg.logits, np.zeros(1, np.int64), "logits") if logits else None)

    def warm_lanes(self, cache: KVCache, rows: list[int], pad_id: int = 0) -> int | str:
        """Capture the lane graphs of ``rows`` at every width that fits (each a decode step of the slot that also
        reads a chunk into the row), on this thread, while the slot is empty: a capture runs the graph several
        times, and each run writes a decode step's entry in every row and advances the step's inputs, so the slot's
        inputs are put back as ``capture`` leaves them before each, and the first real step after goes up from the
        host. Returns the graphs captured, or why none can be (a key of LANE_SKIPS or CHUNK_SKIPS)."""
        host = self.host
        slot = self._lane_slot(cache)
        if isinstance(slot, str):
            return slot
        thread, captured = _this_thread(), 0
        batch = cache.batch
        for row in rows:
            for width in (w for w in CHUNK_WIDTHS if w < slot.capacity):
                lg = slot.lanes.get((row, width))
                if lg is None:
                    if len(slot.lanes) >= CHUNK_GRAPHS_PER_SLOT:
                        return captured
                    lg = self._lane_graph(slot, row, width)
                if thread in lg.threads:
                    continue
                self._harmless_inputs(slot)
                chunk = np.full((1, width), pad_id, np.int64)
                _upload(host, lg, chunk, (np.arange(slot.capacity) < width).astype(np.int64)[None, :],
                        np.arange(width, dtype=np.int64)[None, :], np.array([batch + width - 1], np.int64),
                        host.lane_has_positions)
                host._run_graph(lg.io, lg.run_options, f"capturing a CUDA-graph decode step with a chunk (row {row}, "
                                f"{width} tokens)", session=host.lane)
                lg.threads.add(thread)
                captured += 1
        slot.primed = False
        return captured

    def _lane_slot(self, cache: KVCache) -> _GraphSlot | str:
        """The slot whose lane graphs may run on ``cache`` on this thread, or why none (a LANE_SKIPS or CHUNK_SKIPS
        key): a session with a lane, the cache in the slot's buffers, the slot's decode graph captured here."""
        if self.host.lane is None:
            return "lane"
        slot = self.slots.get((cache.batch, cache.capacity or 0))
        if slot is None or cache.values is not slot.cache:
            return "no_slot"
        if _this_thread() not in slot.threads:
            return "thread"
        return slot

    def _lane_graph(self, slot: _GraphSlot, row: int, width: int) -> _ChunkGraph:
        host = self.host
        self.lane_graph_ids += 1
        lg = self._chunk_buffers(self.lane_graph_ids, slot, row, width, host.lane)
        io = lg.io
        # the decode step: the slot's own buffers, as its decode graph binds them (its tail writes the next inputs)
        self._bind_fixed(io, slot.ids, slot.mask, slot.positions, slot.last_index, slot.cache, slot.logits)
        io.bind_ortvalue_output(NEXT_IDS, slot.ids)
        io.bind_ortvalue_output(NEXT_MASK, slot.mask)
        if NEXT_POSITIONS in {o.name for o in host.lane.get_outputs()}:
            io.bind_ortvalue_output(NEXT_POSITIONS, slot.positions)
        # the chunk: its own inputs and logits, the row [1, kv_heads, capacity, head_dim] of each buffer by address
        io.bind_ortvalue_input(CHUNK_IDS, lg.ids)
        io.bind_ortvalue_input(CHUNK_MASK, lg.mask)
        if host.lane_has_positions:
            io.bind_ortvalue_input(CHUNK_POSITIONS, lg.positions)
        io.bind_ortvalue_input(CHUNK_LAST, lg.last_index)
        io.bind_ortvalue_output(CHUNK_LOGITS, lg.logits)
        self._bind_row(io, slot, row, [chunk_name(n) for n in host.past_names],
                       [chunk_name(n) for n in host.present_names])
        lg.run_options = run_options(self._ort, lg.graph_id)
        slot.lanes[(row, width)] = lg
        return lg

    def _chunk_buffers(self, graph_id: int, slot: _GraphSlot, row: int, width: int, session: Any) -> _ChunkGraph:
        """A chunk's fixed buffers for one width (ids, mask at the slot's width, positions, last index, logits) and
        an IO binding of ``session``'s, nothing bound yet."""
        host = self.host
        dev = host._buffer
        return _ChunkGraph(graph_id, row, width, dev((1, width), np.int64), dev((1, slot.capacity), np.int64),
                           dev((1, width), np.int64), dev((1,), np.int64), dev((1, 1, host.vocab_size), host.kv_dtype),
                           session.io_binding())

    def _bind_row(self, io: Any, slot: _GraphSlot, row: int, pasts: list[str], presents: list[str]) -> None:
        """Bind row ``row`` [1, kv_heads, capacity, head_dim] of each of the slot's KV buffers, by address, as the
        inputs ``pasts`` and the outputs ``presents``: read and written in place."""
        host = self.host
        where = host._device_type()
        shape = [1, host.num_kv_heads, slot.capacity, host.head_dim]
        row_bytes = host.num_kv_heads * slot.capacity * host.head_dim * np.dtype(host.kv_dtype).itemsize
        for past, present, value in zip(pasts, presents, slot.cache):
            at = value.data_ptr() + row * row_bytes
            io.bind_input(past, where, 0, host.kv_dtype, shape, at)
            io.bind_output(present, where, 0, host.kv_dtype, shape, at)

    def _run_slot(self, slot: _GraphSlot, cache: KVCache) -> None:
        host = self.host
        if slot.run_options is None:  # made once: the step is a hot path
            slot.run_options = run_options(self._ort, slot.graph_id)
        try:
            host.session.run_with_iobinding(slot.io, slot.run_options)
        except Exception as e:  # the message is built only on failure
            host._failed(e, f"a CUDA-graph decode step (batch {cache.batch}, {cache.length} cached)")
        slot.runs += 1
        slot.primed = host.fed
        cache.length += 1
        host.transfers.steps += 1

    def _next_ids(self, slot: _GraphSlot) -> np.ndarray:
        out = slot.ids.numpy()[:, 0]
        self.host.transfers.down_bytes += out.nbytes
        return out
