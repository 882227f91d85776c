"""One decoder graph behind IO binding, with its KV cache kept where the provider computes.

Each step binds the cache's OrtValues as the past inputs and lets onnxruntime allocate the presents on the same
device; the presents become the next step's past as they are (no numpy, no copies, no host round-trips). Where the
optimize stage fused attention with a shared past/present buffer (``manifest.graph["kv"]["shares_buffer"]``), the
cache is allocated once at its full length and bound as both past and present, so the graph writes in place.

Only small integer inputs go up each step (ids, mask, positions) and only what sampling needs comes down: the next
token ids (greedy) or the read position's logits, through a small helper graph (``_head``), so a prefill never
ships [batch, seq, vocab] logits to the host. ``transfers`` counts those bytes. The graph itself computes its LM
head only at that position (``last_position.py``, an in-memory edit), so its logits are [batch, 1, vocab].

With ``cuda_graph`` every decode step of a (batch, capacity) replays a captured CUDA graph over fixed buffers
(``_GraphSlot``); a prefill into the slot's empty cache replays one of its own per prompt width
(``_PrefillGraph``); greedy steps can feed themselves (``step_tail.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.providers import EP_NAME, ProviderChoice, TensorRTOptions, create_session
from onnxpipe.runtime.sessions import open_session
from onnxpipe.runtime.helper_graphs import gather_graph, head_graph, step_head_graph
from onnxpipe.runtime.last_position import LAST_INDEX, gather_last_position
from onnxpipe.runtime.step_tail import NEXT_IDS, NEXT_MASK, NEXT_POSITIONS, add_step_tail

_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


@dataclass
class Transfers:
    """Bytes this runtime moved between host and device (inputs it bound from numpy, outputs it read back)."""

    up_bytes: int = 0
    down_bytes: int = 0
    steps: int = 0
    cache_bytes_moved: int = 0  # bytes of KV cache that crossed host<->device: stays 0 by construction

    def per_step(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {"up_bytes": self.up_bytes / n, "down_bytes": self.down_bytes / n, "cache_bytes_moved": self.cache_bytes_moved}


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


class DecoderSession:
    """A model directory's decoder graph on one provider: ``forward`` runs one step and updates a ``KVCache``."""

    def __init__(
        self,
        model_dir: str | ModelDir,
        provider: str = "auto",
        *,
        trt_options: TensorRTOptions | None = None,
        threads: int | None = None,
        announce: Callable[[str], None] | None = None,
        session_options: Any = None,
        cuda_graph: bool = False,
        feed_back: bool | None = None,
        last_position: bool | None = None,
        capture_prefill: bool = True,
    ):
        import onnxruntime as ort

        self.model_dir = model_dir if isinstance(model_dir, ModelDir) else ModelDir.open(model_dir)
        self.manifest = m = self.model_dir.manifest
        say = announce or (lambda _m: None)
        feed_back = cuda_graph if feed_back is None else feed_back
        if cuda_graph or feed_back:
            _check_cuda_graph_form(self.model_dir.path, m.graph)
        # edits made in memory to the graph (the model directory is untouched): the LM head only at the position
        # each row reads (last_position), and greedy decode steps that write their own next inputs (step_tail)
        logits = m.graph.get("logits", "logits")
        why_not: dict[str, str | None] = {}
        size = self.model_dir.model_path.stat().st_size
        if last_position is None:  # an edit reloads the graph: cheap where its weights are external (or few)
            last_position = bool(feed_back) or size <= INLINE_EDIT_BYTES
            if not last_position:
                why_not["last"] = (f"model.onnx holds its weights inline ({size >> 20} MiB): not rebuilt at load "
                                   "(export with external data to get it)")

        def edit(proto: Any) -> None:
            if last_position:
                why_not["last"] = gather_last_position(proto, logits)
            if feed_back:
                why_not["tail"] = add_step_tail(proto, logits)

        inputs = list(m.graph.get("inputs") or [])
        make = lambda edit, inputs: create_session(  # noqa: E731
            self.model_dir.model_path, provider, trt_options=trt_options, threads=threads,
            graph_inputs=inputs or None, dtype=m.graph.get("dtype"), announce=announce,
            session_options=session_options, cuda_options={"enable_cuda_graph": "1"} if cuda_graph else None, edit=edit,
        )
        edited = bool(last_position or feed_back)
        try:  # the TensorRT profiles name every dynamic input: the gather's index included
            self.session, self.choice = make(edit if edited else None,
                                             inputs + [{"name": LAST_INDEX, "dtype": "int64", "shape": ["batch_size"]}]
                                             if last_position and inputs else inputs)
        except OnnxpipeError as e:
            if not edited:
                raise
            why = f"onnxruntime did not take the edited graph ({str(e)[-200:]})"
            why_not = {k: why for k in ("last", "tail")}
            self.session, self.choice = make(None, inputs)
        self.fed = bool(feed_back) and why_not.get("tail") is None
        if feed_back and not self.fed:
            say(f"decode steps upload their inputs from the host: {why_not.get('tail')}")
        # logits come out [batch, 1, vocab]: the position each row reads, chosen by the LAST_INDEX input
        self.last_position = bool(last_position) and why_not.get("last") is None
        self.last_position_why_not = why_not.get("last", "not asked for")
        self.device = self.choice.device
        self._ort = ort
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.has_position_ids = "position_ids" in inputs
        pk = m.past_names(0)[0]
        if pk not in inputs:
            raise OnnxpipeError(f"{self.model_dir.path}: the graph has no input {pk!r}; the manifest's KV names do not match it")
        kv_type = _ORT_TO_NP.get(inputs[pk].type)
        if kv_type is None:
            raise OnnxpipeError(f"{self.model_dir.path}: KV cache type {inputs[pk].type} is not supported by the runtime")
        self.kv_dtype = np.dtype(kv_type)
        kv = m.graph["kv"]
        self.num_kv_heads = int(kv.get("num_kv_heads", m.model["num_kv_heads"]))
        self.head_dim = int(kv.get("head_dim", m.model["head_dim"]))
        self.shares_buffer = bool(kv.get("shares_buffer", False))
        self.padding_side = m.graph.get("padding_side", "left")
        if self.padding_side not in ("left", "right"):
            raise OnnxpipeError(f"{self.model_dir.path}: manifest padding_side {self.padding_side!r} is neither left nor right")
        self.vocab_size = int(m.model["vocab_size"])
        self.max_positions = int(m.model.get("max_position_embeddings") or 1 << 30)
        self.past_names = [n for i in range(m.num_layers) for n in m.past_names(i)]
        self.present_names = [n for i in range(m.num_layers) for n in m.present_names(i)]
        self.logits_name = m.graph.get("logits", "logits")
        helper_ep = "cpu" if self.device == "cpu" else "cuda"  # small helper graphs: never worth a TensorRT engine
        self._helper_providers = [EP_NAME[helper_ep]] + ([EP_NAME["cpu"]] if helper_ep != "cpu" else [])
        self._head = self._helper(head_graph(self._onnx_dtype()))
        self._gather = None
        self.transfers = Transfers()
        # decode steps replayed as CUDA graphs, one per (batch, capacity): fixed buffers bound once
        self.cuda_graph = cuda_graph and self.device != "cpu" and "cuda" in self.choice.provider_options
        if cuda_graph and not self.cuda_graph:
            say(f"CUDA graphs need the CUDA EP; running on {self.provider} without them")
        self._graphs: dict[tuple[int, int], _GraphSlot] = {}
        self._graph_ids = 0
        self.graph_slots_dropped = 0  # slots let go to keep at most GRAPH_SLOTS_MAX (their graph ids never rerun)
        # prefills replayed as CUDA graphs too, one per (batch, capacity, prompt width): a 1B model's 128-token
        # prefill is ~230 kernels whose launches outlast their 1.7 ms on an H100. Needs the [B, 1, V] logits of
        # the last-position head (a fixed, small output buffer)
        self.capture_prefill = bool(capture_prefill) and self.cuda_graph and self.last_position

    # ---- public ----
    @property
    def provider(self) -> str:
        return self.choice.used

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty cache for ``batch`` rows; shared-buffer graphs need ``capacity`` (the longest total length)."""
        if self.shares_buffer:
            if capacity is None:
                raise OnnxpipeError("this graph shares its past/present buffer: the cache needs a capacity (max length)")
            if self.cuda_graph:
                slot = self._graph_slot(batch, capacity)
                slot.primed = False  # a new generation: its first step's inputs come from the host
                return KVCache(slot.cache, 0, slot.capacity, batch)
            shape = (batch, self.num_kv_heads, capacity, self.head_dim)
            values = [self._zeros(shape) for _ in self.past_names]
            return KVCache(values, 0, capacity, batch)
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return KVCache([self._zeros(shape) for _ in self.past_names], 0, None, batch)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        *,
        last_index: np.ndarray | None = None,
        want: str = "logits",
    ) -> np.ndarray:
        """Run one step (prefill when the cache is empty). Returns, per row, the logits [batch, vocab] (float32) of
        the position ``last_index`` (default: the last), or with ``want="argmax"`` just their argmax [batch]."""
        batch, seq = input_ids.shape
        slot = self._graphs.get((batch, cache.capacity or 0)) if self.cuda_graph else None
        if slot is not None and seq == 1 and cache.values is slot.cache:
            return self._replay(slot, input_ids, attention_mask, position_ids, cache, want)
        if (slot is not None and cache.values is slot.cache and cache.length == 0 and self.capture_prefill
                and batch * seq <= PREFILL_CAPTURE_TOKENS
                and (seq in slot.prefills or len(slot.prefills) < PREFILL_GRAPHS_PER_SLOT)):
            return self._replay_prefill(slot, input_ids, attention_mask, position_ids, cache, last_index, want)
        io = self.session.io_binding()
        self._bind_input(io, "input_ids", input_ids.astype(np.int64, copy=False))
        self._bind_input(io, "attention_mask", attention_mask.astype(np.int64, copy=False))
        if self.has_position_ids:
            self._bind_input(io, "position_ids", position_ids.astype(np.int64, copy=False))
        if last_index is None:
            last_index = np.full((batch,), seq - 1, np.int64)
        last_index = last_index.astype(np.int64)
        if self.last_position:  # the graph's head runs on these positions only: its logits are [B, 1, V]
            self._bind_input(io, LAST_INDEX, last_index)
            last_index = np.zeros(batch, np.int64)
        for name, value in zip(self.past_names, cache.values):
            io.bind_ortvalue_input(name, value)
        io.bind_output(self.logits_name, self._device_type(), 0)
        for name, value in zip(self.present_names, cache.values):
            if cache.shared:
                io.bind_ortvalue_output(name, value)  # written in place
            else:
                io.bind_output(name, self._device_type(), 0)
        self._run_graph(io, self._run_options(-1) if self.cuda_graph else None,
                        f"a step (batch {batch}, {seq} new tokens, {cache.length} cached)")
        outs = io.get_outputs()
        if not cache.shared:
            cache.values = list(outs[1:])
        cache.length += seq
        self.transfers.steps += 1
        return self._select(outs[0], last_index, want)

    def reorder(self, cache: KVCache, rows: np.ndarray) -> None:
        """Keep (and repeat) cache rows ``rows`` in that order, on the device: beam search and finished-row removal."""
        rows = np.asarray(rows, np.int64)
        if self._gather is None:
            self._gather = self._helper(gather_graph(len(self.past_names), self._onnx_dtype()))
        io = self._gather.io_binding()
        self._bind_input(io, "rows", rows, session=self._gather)
        for i, value in enumerate(cache.values):
            io.bind_ortvalue_input(f"x{i}", value)
            io.bind_output(f"y{i}", self._device_type(), 0)
        self._gather.run_with_iobinding(io)
        cache.values = list(io.get_outputs())
        cache.batch = len(rows)

    # ---- CUDA graphs ----
    def _graph_slot(self, batch: int, capacity: int) -> "_GraphSlot":
        """The fixed buffers of the decode graph for ``batch`` rows; capacity rounds up to a multiple of 256 (at
        most the model's max positions) so that generations of similar length share one captured graph."""
        # the fixed-width mask makes the graph's total length the capacity: never past the rotary caches' length
        capacity = max(capacity, min(-(-capacity // GRAPH_CAPACITY_STEP) * GRAPH_CAPACITY_STEP, self.max_positions))
        key = (batch, capacity)
        if key in self._graphs:
            self._graphs[key] = self._graphs.pop(key)  # the most recently used last
        else:
            while len(self._graphs) >= GRAPH_SLOTS_MAX:  # the least recently used slot's buffers go
                self._graphs.pop(next(iter(self._graphs)))
                self.graph_slots_dropped += 1
            ort = self._ort
            where, dev = self._device_type(), self._buffer
            cache = [dev((batch, self.num_kv_heads, capacity, self.head_dim), self.kv_dtype) for _ in self.past_names]
            self._graph_ids += 1
            slot = _GraphSlot(self._graph_ids, capacity, cache, dev((batch, 1), np.int64),
                              dev((batch, capacity), np.int64), dev((batch, 1), np.int64),
                              dev((batch, 1, self.vocab_size), self.kv_dtype), self.session.io_binding())
            io = slot.io
            if self.last_position:  # a decode step's one position: index 0, fixed
                slot.last_index = ort.OrtValue.ortvalue_from_numpy(np.zeros(batch, np.int64), where, 0)
            self._bind_fixed(io, slot.ids, slot.mask, slot.positions, slot.last_index, cache, slot.logits)
            if self.fed:  # the step writes the next step's inputs into the buffers it read them from
                io.bind_ortvalue_output(NEXT_IDS, slot.ids)
                io.bind_ortvalue_output(NEXT_MASK, slot.mask)
                if NEXT_POSITIONS in {o.name for o in self.session.get_outputs()}:  # where the graph reads them
                    io.bind_ortvalue_output(NEXT_POSITIONS, slot.positions)
            self._graphs[key] = slot
            self._capture(slot)
        return self._graphs[key]

    def _bind_fixed(self, io: Any, ids: Any, mask: Any, positions: Any, last_index: Any, cache: list[Any],
                    logits: Any) -> None:
        """Bind a captured graph's fixed buffers: its inputs, the slot's KV buffers (read and written in place) and
        its logits. last_index None: the graph has no one-position head."""
        io.bind_ortvalue_input("input_ids", ids)
        io.bind_ortvalue_input("attention_mask", mask)
        if self.has_position_ids:
            io.bind_ortvalue_input("position_ids", positions)
        if last_index is not None:
            io.bind_ortvalue_input(LAST_INDEX, last_index)
        for name, value in zip(self.past_names, cache):
            io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_output(self.logits_name, logits)
        for name, value in zip(self.present_names, cache):
            io.bind_ortvalue_output(name, value)

    def _capture(self, slot: "_GraphSlot") -> None:
        """Capture the slot's decode graph on harmless inputs, once, before any real step. onnxruntime captures a
        graph id on its first use by running the model several times within that one call (warm-up runs, then
        the capture). Those repeats are not idempotent for a decode step: each writes a KV entry at the row's
        length and, with the step tail, advances its own ids, mask and positions, so a real first step would come
        back several steps on. Here the repeats write only the first few positions of an empty slot, which the next
        prefill and steps write before they read; the inputs go up again with the first real step (not counted as
        per-step transfers). A prefill graph needs none of this: its repeats rewrite the same entries."""
        batch = slot.ids.shape()[0]
        mask = np.zeros((batch, slot.capacity), np.int64)
        mask[:, 0] = 1
        slot.ids.update_inplace(np.zeros((batch, 1), np.int64))
        slot.mask.update_inplace(mask)
        if self.has_position_ids:
            slot.positions.update_inplace(np.zeros((batch, 1), np.int64))
        slot.run_options = self._run_options(slot.graph_id)
        self._run_graph(slot.io, slot.run_options, f"capturing the CUDA-graph decode step (batch {batch})")
        slot.primed = False

    def _replay(self, slot: "_GraphSlot", input_ids: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, cache: KVCache, want: str) -> np.ndarray:
        """One decode step through the slot's captured graph (captured when the slot was made: _capture). The mask
        is fed at the slot's full width with each row's count of ones: the graph reads only its row sums (seqlens)
        and width (total length, fixed so the graph's shapes never change)."""
        batch = input_ids.shape[0]
        counts = attention_mask.sum(axis=1)
        mask = (np.arange(slot.capacity)[None, :] < counts[:, None]).astype(np.int64)
        slot.ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        slot.mask.update_inplace(mask)
        if self.has_position_ids:
            slot.positions.update_inplace(np.ascontiguousarray(position_ids, dtype=np.int64))
        self.transfers.up_bytes += input_ids.nbytes + mask.nbytes + (position_ids.nbytes if self.has_position_ids else 0)
        self._run_slot(slot, cache)
        if self.fed and want == "argmax":  # the step left its argmax in the ids buffer
            return self._next_ids(slot)
        if slot.head is None:  # the decode step's own head: logits [B, 1, V] read in place, nothing to index
            slot.head = self._helper(step_head_graph(self._onnx_dtype(), batch, self.vocab_size))
            slot.head_io = {}
            for name in ("last_logits", "argmax"):
                io = slot.head.io_binding()
                io.bind_ortvalue_input("logits", slot.logits)
                io.bind_output(name, "cpu")
                slot.head_io[name] = io
        io = slot.head_io["last_logits" if want == "logits" else "argmax"]
        slot.head.run_with_iobinding(io)
        out = io.get_outputs()[0].numpy()
        self.transfers.down_bytes += out.nbytes
        return out

    def _replay_prefill(self, slot: "_GraphSlot", input_ids: np.ndarray, attention_mask: np.ndarray,
                        position_ids: np.ndarray, cache: KVCache, last_index: np.ndarray | None, want: str) -> np.ndarray:
        """A prefill into the slot's empty cache through a captured graph of its own (per prompt width: generate
        pads GPU prompts to multiples of PREFILL_BUCKET, so widths repeat). Inputs go up into fixed buffers."""
        batch, width = input_ids.shape
        pg = slot.prefills.get(width) or self._prefill_graph(slot, batch, width)
        if last_index is None:
            last_index = np.full((batch,), width - 1, np.int64)
        arrays = [(pg.ids, input_ids), (pg.mask, attention_mask), (pg.last_index, last_index)]
        if self.has_position_ids:
            arrays.append((pg.positions, position_ids))
        for value, array in arrays:
            array = np.ascontiguousarray(array, dtype=np.int64)
            value.update_inplace(array)
            self.transfers.up_bytes += array.nbytes
        if pg.run_options is None:
            pg.run_options = self._run_options(pg.graph_id)
        self._run_graph(pg.io, pg.run_options, f"a CUDA-graph prefill (batch {batch}, {width} tokens)")
        pg.runs += 1
        slot.primed = False  # the decode buffers were not written: the first step goes up from the host
        cache.length += width
        self.transfers.steps += 1
        if want == "argmax" and NEXT_IDS in pg.scratch:  # the step tail's argmax of these logits: no head run
            out = pg.scratch[NEXT_IDS].numpy()[:, 0]
            self.transfers.down_bytes += out.nbytes
            return out
        return self._select(pg.logits, np.zeros(batch, np.int64), want)

    def _prefill_graph(self, slot: "_GraphSlot", batch: int, width: int) -> "_PrefillGraph":
        dev = self._buffer
        self._graph_ids += 1
        pg = _PrefillGraph(self._graph_ids, dev((batch, width), np.int64), dev((batch, width), np.int64),
                           dev((batch, width), np.int64), dev((batch,), np.int64),
                           dev((batch, 1, self.vocab_size), self.kv_dtype), self.session.io_binding())
        io = pg.io
        self._bind_fixed(io, pg.ids, pg.mask, pg.positions, pg.last_index, slot.cache, pg.logits)
        if self.fed:  # the step tail's outputs: fixed scratch (a prefill's mask is narrower than the slot's)
            pg.scratch = {NEXT_IDS: dev((batch, 1), np.int64), NEXT_MASK: dev((batch, width), np.int64)}
            if NEXT_POSITIONS in {o.name for o in self.session.get_outputs()}:
                pg.scratch[NEXT_POSITIONS] = dev((batch, 1), np.int64)
            for name, value in pg.scratch.items():
                io.bind_ortvalue_output(name, value)
        slot.prefills[width] = pg
        return pg

    def can_feed(self, cache: KVCache) -> bool:
        """Whether ``step_fed`` can run the next step of ``cache`` (a CUDA-graph slot whose step wrote its inputs)."""
        slot = self._graphs.get((cache.batch, cache.capacity or 0)) if self.fed and self.cuda_graph else None
        return slot is not None and slot.primed and cache.values is slot.cache

    def step_fed(self, cache: KVCache) -> np.ndarray:
        """One greedy decode step fed by the previous one on the device (its argmax, mask and positions): nothing
        goes up; returns the next token ids [batch]. Rows keep their places (finished rows keep decoding unread),
        so the caller must leave room: every row grows by one position a step."""
        if not self.can_feed(cache):
            raise OnnxpipeError("step_fed needs a cache whose last step ran in a CUDA-graph slot with the step tail")
        slot = self._graphs[(cache.batch, cache.capacity or 0)]
        self._run_slot(slot, cache)
        return self._next_ids(slot)

    def _run_slot(self, slot: "_GraphSlot", cache: KVCache) -> None:
        if slot.run_options is None:  # made once: the step is a hot path
            slot.run_options = self._run_options(slot.graph_id)
        try:
            self.session.run_with_iobinding(slot.io, slot.run_options)
        except Exception as e:  # the message is built only on failure
            self._failed(e, f"a CUDA-graph decode step (batch {cache.batch}, {cache.length} cached)")
        slot.runs += 1
        slot.primed = self.fed
        cache.length += 1
        self.transfers.steps += 1

    def _run_graph(self, io: Any, run_options: Any, what: str) -> None:
        try:
            self.session.run_with_iobinding(io, run_options)
        except Exception as e:
            self._failed(e, what)

    def _failed(self, e: Exception, what: str) -> None:
        """onnxruntime's Fail/RuntimeException as one line that says which model and which run."""
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise OnnxpipeError(f"{self.model_dir.path}: onnxruntime failed on {what}: {text}") from None

    def _next_ids(self, slot: "_GraphSlot") -> np.ndarray:
        out = slot.ids.numpy()[:, 0]
        self.transfers.down_bytes += out.nbytes
        return out

    def _run_options(self, graph_id: int) -> Any:
        ro = self._ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(graph_id))  # -1: run without capturing or replaying
        return ro

    # ---- internals ----
    def _select(self, logits: Any, last_index: np.ndarray, want: str) -> np.ndarray:
        io = self._head.io_binding()
        io.bind_ortvalue_input("logits", logits)
        self._bind_input(io, "last_index", last_index, session=self._head)
        name = {"logits": "last_logits", "argmax": "argmax"}[want]
        io.bind_output(name, "cpu")
        self._head.run_with_iobinding(io)
        out = io.get_outputs()[0].numpy()
        self.transfers.down_bytes += out.nbytes if self.device != "cpu" else 0
        return out

    def _bind_input(self, io: Any, name: str, array: np.ndarray, session: Any = None) -> None:
        array = np.ascontiguousarray(array)
        if self.device == "cpu":
            io.bind_cpu_input(name, array)
            return
        value = self._ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
        self.transfers.up_bytes += array.nbytes
        io.bind_ortvalue_input(name, value)

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        if self.device == "cpu":
            return self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype))
        if 0 in shape:  # an empty past: nothing to copy
            return self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.kv_dtype), "cuda", 0)
        # a shared buffer: allocated on the device directly, each position written before the mask lets it be read
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.kv_dtype, "cuda", 0)

    def _buffer(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An uninitialised OrtValue on the session's device ("cuda"; the CPU where a test drives the graph slots
        without capture): the fixed buffers CUDA graphs read and write."""
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self._device_type(), 0)

    def _device_type(self) -> str:
        return "cpu" if self.device == "cpu" else "cuda"

    def _onnx_dtype(self) -> int:
        import onnx

        return onnx.TensorProto.FLOAT16 if self.kv_dtype == np.float16 else onnx.TensorProto.FLOAT

    def _helper(self, proto: Any) -> Any:
        return open_session(proto, self._helper_providers, threads=1, purpose="a helper graph of the decoder session")


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
# the largest model.onnx the session rebuilds in memory by default to add the last-position head: loading a graph
# with inline weights, serializing it and parsing it again took SmolLM2-135M (543 MB, fp32) from 1.8 s to 5.4 s
INLINE_EDIT_BYTES = 256 << 20


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
    prefills: dict[int, "_PrefillGraph"] = field(default_factory=dict)  # by prompt width


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


def _check_cuda_graph_form(path: Any, graph: dict[str, Any]) -> None:
    """CUDA graphs replay fixed shapes: the cache must be one in-place buffer and the mask readable at a fixed
    width, which is the CUDA attention form of optimize --target cuda."""
    kv = graph.get("kv") or {}
    if not (kv.get("shares_buffer") and graph.get("padding_side") == "right"
            and graph.get("attention_mask_use") == "row sums and width"):
        raise OnnxpipeError(f"{path}: CUDA graphs need the graph of `onnxpipe optimize --target cuda` (a shared KV "
                            "buffer and a mask read only for its row sums); this one is not")
