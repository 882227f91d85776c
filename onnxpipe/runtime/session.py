"""One decoder graph behind IO binding, with its KV cache kept where the provider computes.

Each step binds the cache's OrtValues as the past inputs and lets onnxruntime allocate the presents on the same
device; the presents become the next step's past as they are (no numpy, no copies, no host round-trips). Where the
optimize stage fused attention with a shared past/present buffer (``manifest.graph["kv"]["shares_buffer"]``), the
cache is allocated once at its full length and bound as both past and present, so the graph writes in place.

Only small integer inputs go up each step (ids, mask, positions) and only what sampling needs comes down: the next
token ids (greedy) or the read position's logits, through a small helper graph (``_head``), so a prefill never
ships [batch, seq, vocab] logits to the host. ``transfers`` counts those bytes. The graph itself computes its LM
head only at that position (``last_position.py``, an in-memory edit), so its logits are [batch, 1, vocab].

The cache is a ``KVCache`` (``kv_cache.py``). With ``cuda_graph`` every decode step of a (batch, capacity) replays
a captured CUDA graph over fixed buffers, a prefill into the slot's empty cache replays one of its own per prompt
width, and greedy steps can feed themselves (``cuda_graphs.py``, ``step_tail.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError, first_line
from onnxpipe.runtime import cuda_graphs, kv_cache
from onnxpipe.runtime.chunk_lane import CHUNK_POSITIONS, add_chunk_lane
from onnxpipe.runtime.cuda_graphs import CudaGraphs, _GraphSlot, check_cuda_graph_form
from onnxpipe.runtime.cuda_stream import Stream, cuda_runtime
from onnxpipe.runtime.helper_graphs import gather_graph, head_graph
from onnxpipe.runtime.kernels import kernel_skip as skip_kinds
from onnxpipe.runtime.kernels import kernels_mode, plan_kernels
from onnxpipe.runtime.kv_cache import KVCache
from onnxpipe.runtime.last_position import LAST_INDEX, gather_last_position
from onnxpipe.runtime.providers import (CHAIN, EP_NAME, ProviderChoice, TensorRTOptions, available_providers, create_session,
                                        likely_chain)
from onnxpipe.runtime.sessions import open_session
from onnxpipe.runtime.shared_weights import SharedWeights, load_shared_weights
from onnxpipe.runtime.step_tail import add_step_tail

__all__ = ["DecoderSession", "KVCache", "ProviderChoice", "Transfers", "INLINE_EDIT_BYTES"]

_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


def _graphs_live(session: Any) -> bool:
    """Whether ``session``'s CUDA EP really runs with CUDA graphs (its live options, not those asked for)."""
    return session.get_provider_options().get("CUDAExecutionProvider", {}).get("enable_cuda_graph") == "1"


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
        kernels: str | None = None,
        kernel_skip: str | Sequence[str] | None = None,
        chunk_lane: bool = False,
        ahead: bool | None = None,
    ):
        """kernels: onnxpipe's own kernels applied at load ("off", "on", "auto"; default $ONNXPIPE_KERNELS or
        "off"; "reference" runs their CPU reference for checks): see ``onnxpipe.runtime.kernels``.
        kernel_skip: the kinds of MatMulNBits they leave to onnxruntime ("head", "qkv"; a comma list; default
        $ONNXPIPE_KERNELS_SKIP or none).
        chunk_lane: also load the graph whose decode step reads a chunk of one row's prompt in the same run
        (``chunk_lane.py``; serve's long prompts through CUDA graphs): a second onnxruntime session, ``lane`` (None
        where the graph or the session cannot: ``lane_why_not``). The two share one copy of the weights on the device
        (``shared_weights``; where they cannot, ``shared_weights_why_not`` says why and the lane holds its own).
        ahead: with CUDA graphs, the CUDA EP runs on a stream of the session's own (``stream``, ``cuda_stream.py``)
        so that ``generate``'s fed steps are launched one ahead of their reads (``CudaGraphs.ahead``); default
        $ONNXPIPE_AHEAD or on. ``stream_why_not`` says why there is none."""
        import onnxruntime as ort

        self.model_dir = model_dir if isinstance(model_dir, ModelDir) else ModelDir.open(model_dir)
        self.manifest = m = self.model_dir.manifest
        say = announce or (lambda _m: None)
        feed_back = cuda_graph if feed_back is None else feed_back
        if cuda_graph or feed_back:
            check_cuda_graph_form(self.model_dir.path, m.graph)
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

        # kernels of our own (onnxpipe.runtime.kernels): the library registered in the session options, the graph's
        # MatMulNBits rewritten by the same edit
        mode, skip = kernels_mode(kernels), skip_kinds(kernel_skip)
        if mode != "off" and session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3
        # planned for the EP the session will most likely run on: auto's TensorRT where its libraries load
        self.kernels = plan_kernels(mode, likely_chain(provider) if mode != "off" else [], session_options, announce,
                                    skip=skip, logits=logits)
        self.kernels.folder = self.model_dir.model_path.parent

        def edit(proto: Any) -> None:
            if last_position:
                why_not["last"] = gather_last_position(proto, logits)
            if feed_back:
                why_not["tail"] = add_step_tail(proto, logits)
            self.kernels.edit(proto)  # last: the edits above walk the graph by onnxruntime's own op types

        # the chunk lane's graph, checked on its structure (weights unread) before any session: where it can load,
        # the decode session and the lane share one copy of the weights on the device (shared_weights.py)
        lane_graph_why: str | None = "not asked for"
        self.shared_weights: SharedWeights | None = None
        self.shared_weights_why_not = "no chunk lane"
        if chunk_lane:
            import onnx

            lane_graph_why = add_chunk_lane(onnx.load(str(self.model_dir.model_path), load_external_data=False), logits)
            self.shared_weights, self.shared_weights_why_not = self._share_weights(
                provider, bool(feed_back), session_options, lane_graph_why)

        def options() -> Any:  # a fresh SessionOptions per session where weights are shared: a refusal leaves none
            if self.shared_weights is None:
                return session_options
            so = ort.SessionOptions()
            so.log_severity_level = 3
            self.shared_weights.add_to(so)
            return so

        # a stream of our own for the CUDA EP, where decode steps may be launched ahead of their reads
        self.stream: Stream | None = None
        self.stream_why_not: str | None = "no CUDA graphs"
        if cuda_graph:
            self.stream, self.stream_why_not = _own_stream(ort, provider, ahead)
        cuda_options: dict[str, str] | None = None
        if cuda_graph:
            cuda_options = {"enable_cuda_graph": "1"}
            if self.stream is not None:
                cuda_options["user_compute_stream"] = self.stream.provider_option()
        inputs = list(m.graph.get("inputs") or [])
        make = lambda edit, inputs: create_session(  # noqa: E731
            self.model_dir.model_path, provider, trt_options=trt_options, threads=threads,
            graph_inputs=inputs or None, dtype=m.graph.get("dtype"), announce=announce,
            session_options=options(), cuda_options=cuda_options, edit=edit,
        )
        edited = bool(last_position or feed_back or self.kernels.active)
        main_inputs = (inputs + [{"name": LAST_INDEX, "dtype": "int64", "shape": ["batch_size"]}]
                       if last_position and inputs else inputs)
        try:  # the TensorRT profiles name every dynamic input: the gather's index included
            try:
                self.session, self.choice = make(edit if edited else None, main_inputs)
            except OnnxpipeError as e:
                if self.shared_weights is None:
                    raise
                self._unshare(f"onnxruntime did not take them ({str(e)[-200:]})", say, keep=False)
                self.session, self.choice = make(edit if edited else None, main_inputs)
        except OnnxpipeError as e:
            if not edited:
                raise
            why = f"onnxruntime did not take the edited graph ({str(e)[-200:]})"
            why_not = {k: why for k in ("last", "tail")}
            self.kernels.fell_back(why)
            self.session, self.choice = make(None, inputs)
        self.kernels.finish(say)
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
        # the lane: a second session of the same graph, edited to read a chunk beside each decode step
        self.lane: Any = None
        self.lane_has_positions = False
        self.lane_why_not = "not asked for"
        if chunk_lane:
            self.lane_why_not = self._lane_why_not(lane_graph_why)
            if self.lane_why_not is None:
                def lane_edit(proto: Any) -> None:
                    why = add_chunk_lane(proto, logits)
                    if why is not None:  # checked on the same graph just above: a fault of the edit itself
                        raise OnnxpipeError(f"{self.model_dir.path}: the chunk lane: {why}")
                    edit(proto)  # its last-position input is the lane's own (gather_last_position leaves it)
                    if why_not.get("tail") is not None:
                        raise OnnxpipeError(f"{self.model_dir.path}: the chunk lane's graph took no step tail "
                                            f"({why_not['tail']})")
                try:
                    try:
                        self.lane, _ = make(lane_edit, [])
                    except OnnxpipeError as e:
                        if self.shared_weights is None:
                            raise
                        self._unshare(f"onnxruntime did not take them for the lane ({str(e)[-200:]})", say, keep=True)
                        self.lane, _ = make(lane_edit, [])
                except OnnxpipeError as e:
                    self.lane_why_not = f"onnxruntime did not take the lane's graph ({str(e)[-200:]})"
                if self.lane is not None and cuda_graph and _graphs_live(self.session) and not _graphs_live(self.lane):
                    self.lane = None  # its steps would run eagerly (run 37: 3.76 ms a step against 2.99 replayed)
                    self.lane_why_not = "its session runs without CUDA graphs (onnxruntime dropped enable_cuda_graph)"
                if self.lane is not None:
                    self.lane_has_positions = CHUNK_POSITIONS in {i.name for i in self.lane.get_inputs()}
            if self.lane is None and self.shared_weights is not None:  # the decode session still reads them
                self._weights_keep, self.shared_weights = self.shared_weights, None
                self.shared_weights_why_not = "no lane to share them with"
        # decode steps replayed as CUDA graphs, one per (batch, capacity): fixed buffers bound once
        self.cuda_graph = cuda_graph and self.device != "cpu" and "cuda" in self.choice.provider_options
        if cuda_graph and not self.cuda_graph:
            say(f"CUDA graphs need the CUDA EP; running on {self.provider} without them")
        elif self.cuda_graph and not _graphs_live(self.session):  # each run would go eagerly, unsaid
            raise OnnxpipeError(f"{self.model_dir.path}: CUDA graphs were asked for, but onnxruntime's CUDA EP runs "
                                f"without enable_cuda_graph (its options were dropped)")
        if not self.cuda_graph and self.stream is not None:
            self.stream, self.stream_why_not = None, f"no CUDA graphs on {self.provider}"
        elif self.cuda_graph and self.fed and self.stream is None and not str(self.stream_why_not).startswith("turned off"):
            say(f"greedy decode steps run synced, not launched ahead: {self.stream_why_not}")
        self.graphs = CudaGraphs(self, ort)
        # prefills replayed as CUDA graphs too, one per (batch, capacity, prompt width): a 1B model's 128-token
        # prefill is ~230 kernels whose launches outlast their 1.7 ms on an H100. Needs the [B, 1, V] logits of
        # the last-position head (a fixed, small output buffer)
        self.capture_prefill = bool(capture_prefill) and self.cuda_graph and self.last_position

    # ---- public ----
    @property
    def provider(self) -> str:
        return self.choice.used

    @property
    def _graphs(self) -> dict[tuple[int, int], _GraphSlot]:
        """The CUDA-graph slots by (batch, capacity), least recently used first."""
        return self.graphs.slots

    @property
    def graph_slots_dropped(self) -> int:
        """Slots let go to keep at most cuda_graphs.GRAPH_SLOTS_MAX (their graph ids never rerun)."""
        return self.graphs.slots_dropped

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty cache for ``batch`` rows; shared-buffer graphs need ``capacity`` (the longest total length)."""
        if self.shares_buffer and capacity is not None and self.cuda_graph:
            return self.graphs.new_cache(batch, capacity)  # a new generation in its slot's fixed buffers
        return kv_cache.empty_cache(self._zeros, len(self.past_names), batch, self.num_kv_heads, self.head_dim,
                                    self.shares_buffer, capacity)

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
        if self.cuda_graph:
            out = self.graphs.step(input_ids, attention_mask, position_ids, cache, last_index, want)
            if out is not None:
                return out
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
        self._run_graph(io, cuda_graphs.run_options(self._ort, -1) if self.cuda_graph else None,
                        f"a step (batch {batch}, {seq} new tokens, {cache.length} cached)")
        outs = io.get_outputs()
        if not cache.shared:
            cache.values = list(outs[1:])
        cache.length += seq
        self.transfers.steps += 1
        return self._select(outs[0], last_index, want)

    def reorder(self, cache: KVCache, rows: np.ndarray) -> None:
        """Keep (and repeat) cache rows ``rows`` in that order, on the device: beam search and finished-row removal."""
        if self._gather is None:
            self._gather = self._helper(gather_graph(len(self.past_names), self._onnx_dtype()))
        kv_cache.reorder(self._gather, cache, rows, lambda io, r: self._bind_input(io, "rows", r, session=self._gather),
                         self._device_type())

    def can_feed(self, cache: KVCache) -> bool:
        """Whether ``step_fed`` can run the next step of ``cache`` (a CUDA-graph slot whose step wrote its inputs)."""
        return self.graphs.can_feed(cache)

    def step_fed(self, cache: KVCache) -> np.ndarray:
        """One greedy decode step fed by the previous one on the device (its argmax, mask and positions): nothing
        goes up; returns the next token ids [batch]. Rows keep their places (finished rows keep decoding unread),
        so the caller must leave room: every row grows by one position a step."""
        return self.graphs.step_fed(cache)

    def _lane_why_not(self, graph_why: str | None) -> str | None:
        """Why the chunk lane cannot be loaded (None: it can): it rides on fed decode steps with a one-position
        head, and the graph must take the edit (``graph_why``: checked on its structure, the weights left unread)."""
        if not (self.fed and self.last_position):
            return "the lane needs the step tail and the last-position head (fed decode steps)"
        if self.choice.used not in ("cuda", "cpu"):
            return f"the lane runs on the CUDA EP (or the CPU, for tests), not {self.choice.used}"
        return graph_why

    def _share_weights(self, provider: str, feed_back: bool, session_options: Any, graph_why: str | None
                       ) -> tuple[SharedWeights | None, str | None]:
        """The weights the decode session and the lane will share, read onto the device the provider runs on, or
        None and why not. Sharing needs SessionOptions of this session's own (a caller's, or the kernels', could
        not be rebuilt without the shared weights were onnxruntime to refuse them)."""
        if graph_why is not None or not feed_back:
            return None, "no chunk lane"
        # the device the lane will run on: the CUDA EP where the chain has it and it is here (auto's TensorRT is
        # left for CUDA when its libraries are missing), else the CPU
        chain = CHAIN.get(provider, ())
        if provider == "tensorrt" or not {"cuda", "cpu"} & set(chain):
            return None, f"the lane runs on the CUDA EP (or the CPU), not {provider}"
        device = "cuda" if "cuda" in chain and "cuda" in available_providers() else "cpu"
        if session_options is not None:
            return None, "the session's options are the caller's or the kernels' (each session keeps its own weights)"
        try:
            shared = load_shared_weights(self.model_dir.model_path, self.model_dir.path, device)
        except (OSError, MemoryError, RuntimeError, ValueError) as e:  # a device out of memory included
            return None, f"the weights could not be read onto the device ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        if not shared.values:
            return None, "the graph has no external weights to share"
        return shared, None

    def _unshare(self, why: str, say: Callable[[str], None], keep: bool) -> None:
        """Load on without shared weights; ``keep``: the decode session reads them in place, so they must live on."""
        if keep:
            self._weights_keep = self.shared_weights
        self.shared_weights, self.shared_weights_why_not = None, why
        say(f"the chunk lane holds its own copy of the weights: {why}")

    # ---- running the graph ----
    def _run_graph(self, io: Any, run_options: Any, what: str, session: Any = None) -> None:
        try:
            (session or self.session).run_with_iobinding(io, run_options)
        except Exception as e:
            self._failed(e, what)

    def _failed(self, e: Exception, what: str) -> None:
        """onnxruntime's Fail/RuntimeException as one line that says which model and which run."""
        text = first_line(e)
        raise OnnxpipeError(f"{self.model_dir.path}: onnxruntime failed on {what}: {text}") from None

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
        return kv_cache.zeros(self._ort, self._device_type(), self.kv_dtype, shape)

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


def _own_stream(ort: Any, provider: str, ahead: bool | None) -> tuple[Stream | None, str | None]:
    """A CUDA stream for the session's CUDA EP (``cuda_stream.Stream``), or None and why not."""
    if ahead is None:
        ahead = os.environ.get("ONNXPIPE_AHEAD", "1").strip().lower() not in ("0", "off", "false", "no")
    if not ahead:
        return None, "turned off (ahead=False or ONNXPIPE_AHEAD=0)"
    if "cuda" not in CHAIN.get(provider, ()) or "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, "no CUDA EP"
    lib, why = cuda_runtime(ort)
    if lib is None:
        return None, why
    try:
        return Stream(lib), None
    except RuntimeError as e:
        return None, str(e)


# the largest model.onnx the session rebuilds in memory by default to add the last-position head: loading a graph
# with inline weights, serializing it and parsing it again took SmolLM2-135M (543 MB, fp32) from 1.8 s to 5.4 s
INLINE_EDIT_BYTES = 256 << 20

