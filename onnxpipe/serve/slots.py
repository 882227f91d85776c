"""The slot layout: the running batch is ``max_batch`` fixed rows of one shared KV buffer (the graph of
``optimize --target cuda``), on the CPU or on the CUDA provider, where its decode step replays the session's
CUDA graph of (max_batch, capacity) (``DecoderSession.new_cache`` makes and captures it, and captures it again on the
loop's thread before its first prefill: the CUDA EP keeps captured graphs per thread).

- A request joins by taking a free row (``slot_table.SlotTable``) when it is admitted; it leaves by freeing it. Rows
  not decoding run through every step masked (their output unread, their write one entry past what they hold).
- Its prompt is prefilled straight into its row, outside the graph: a batch-1 run whose past and present are bound
  to that row of the shared buffer (``row_prefill.RowPrefill``: the row [1, kv_heads, capacity, head_dim] is
  contiguous in the buffer, so it is bound by address; nothing is copied). Prompts are read in chunks: each
  iteration's prefill runs take what its budget allows (``budget.PrefillBudget``: ``prefill_chunk`` tokens, or with
  ``auto`` the runs whose fitted cost fits half a decode step), over the admitted requests in their order, then the
  running batch decodes one step, so a long prompt does not stall running streams. A prompt read in chunks while
  others decode takes the highest free row.
- With ``prefill_group`` N > 1, whole prompts not yet begun are read up to N in one run of [k, longest prompt]
  (``RowPrefill.run_group``, right-padded) bound to k adjacent rows: their rows are moved together first
  (``SlotTable.place``; rows not begun hold nothing). With ``auto`` these are the short prompts (the first group
  whatever its tokens, then as many as ``budget.whole`` allows); with a budget of tokens, prompts whose padded run
  fits what is left. A group run is one run to the budget (its fitted cost counts k rows' tokens). On a GPU, where a
  run outside the CUDA graph costs its launches whatever its length, k prompts then cost about one run.
- With CUDA graphs and ``chunk_graphs`` (opt-in), a long prompt's chunks run at fixed widths through graphs
  captured per (row, width) on the loop's thread (``RowPrefill.run_chunk``, ``CudaGraphs.run_chunk``): launch-free,
  so a chunk costs its device time, not its launches; ``auto`` sizes chunks among those widths. Only the highest
  ``CHUNK_GRAPH_ROWS`` rows have graphs (captured when the loop starts, on a GPU): prompts longer than
  ``graph_row_tokens`` take them, others the rest first (``_take_row``). ``stats.graph_chunks`` counts the chunks
  that ran so, ``stats.chunk_graph_skipped`` why the others did not. Short prompts read whole and group runs stay
  uncaptured (any row, any length).
- A decode step is one ``forward`` of every row (with CUDA graphs), or on the CPU of the rows up to the last decoding
  one (``RowPrefix``): [rows, 1] ids, each row's mask sum and position its own.
  Where the session's graph slot has the step tail (greedy steps writing their own next inputs, as ``generate``
  uses them), a greedy step is fed on the device (``step_fed``): nothing goes up, and its rows are processed on the
  rows thread while the next step runs. A row that changes (a prompt admitted, a row joining, moved by a group run
  or freed) has its own next inputs set on the device before that step (``_on_device``, ``CudaGraphs.patch_rows``:
  a small graph writing only those rows), so the change costs no host-fed step of every row.
  With a session stream of its own (``CudaGraphs.ahead``), a steady fed step also launches the step after it before
  it is read (``_fed_step``; ``ONNXPIPE_SERVE_AHEAD=0`` turns it off); a step so in flight is read and processed
  before anything changes (``_land``), and a row patch waits for it.
  Rows not decoding then advance on the device too, writing one entry further each such step: a free row from 0,
  never past the longest running row's end (all within the row's capacity); a row being read from where it is
  parked (``parks``): at its prompt's full length, the position its own first decode step writes, so such writes land
  only on entries its own decode steps write before they read them (a step at position p writes p, then attends to
  positions up to p) and no chunk of its prompt writes. So a long prompt's chunk before its last leaves the pipeline
  as it was: the next step is still fed (the chunk's run, captured or not, writes none of the decode step's input
  buffers), its rows still go to the rows thread, the loop's thread touches neither the table nor the running rows
  for it (its count is the table's once it joins), and it reads no logits back (``logits=False``). Where the parked
  rows' room past their prompts (``SlotTable.parked_room``: at least their replies' length) would run out, a
  host-fed step parks them there again. A run that ends a prompt (the row joins, its logits read), a group run and
  any admission first wait for the step being processed (``_settle``). Elsewhere (no step tail, or the CPU's plain
  steps) every step is host-fed and a row being read is parked at what it holds.
- With the chunk lane (``chunk_lane``, opt-in, on top of chunk graphs), a long prompt's chunks in the graph rows are
  not run on their own while streams decode: each iteration hands one to its decode step, whose run reads it too
  (``CudaGraphs.step_lane``, ``runtime/chunk_lane.py``), fed or host-fed; the prompt's last chunk's logits give its
  first token after the step. Where no lane graph can take it, the chunk is read apart first (``stats.lane_skipped``).

Each row's result depends on its own tokens only: the step's shapes are the same whoever is in the batch, and each
prefill is a batch of one, or with ``prefill_group`` a group whose rows are computed apart (a row's real tokens come
before its padding and attend only to each other). On the CPU a group run's logits and keys/values are exactly a solo
run's (tests/serve/test_prefill_group.py); on a GPU a GEMM of k rows may round differently from one of a row, so
there a grouped request's tokens are not promised to be its solo ones (docs/serve.md, "On a GPU"). The tests run
this on the CPU with the slot path of the session (``tests/serve``); on a GPU ``scripts/load_test.py --provider
cuda --cuda-graph --check-equal [--prefill-group N]`` checks concurrent against solo tokens (with a group: reports
how far they agree).
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

import numpy as np

from onnxpipe.errors import OnnxpipeError, first_line
from onnxpipe.runtime.cuda_graphs import CHUNK_GRAPH_ROWS, CHUNK_WIDTHS
from onnxpipe.runtime.generate import LanguageModel
from onnxpipe.runtime.limits import check_fits
from onnxpipe.runtime.session import KVCache
from onnxpipe.serve.budget import Allowance
from onnxpipe.serve.loop import BatchLoop, Request
from onnxpipe.serve.row_prefill import RowPrefill, chunk_inputs, chunk_width
from onnxpipe.serve.rows_worker import Job, RowsWorker
from onnxpipe.serve.slot_table import PREFILLING, SlotTable

DEFAULT_MAX_LENGTH = 2048  # a row's tokens (prompt and reply) unless max_length says otherwise
DEFAULT_PREFILL_GROUP = 1  # prompts read in one run: each its own unless asked (docs/serve.md, "On a GPU")
# a fed step is launched before the one before it is read (``_fed_step``) only where every running row may still take
# this many tokens (the rows' slack, known one step late): the two steps in flight and the one being processed stay
# within each row's own positions
AHEAD_SLACK = 4
# with chunk graphs: prompts longer than this (read in 2 chunks or more at the widest width) take the graph rows
GRAPH_ROW_TOKENS = max(CHUNK_WIDTHS)
# the lane's chunk, in tokens, where the prefill budget is auto (a fixed --prefill-chunk N gives N): on a GPU a decode
# step's GEMMs read the weights whatever the rows, so up to ~100s of tokens ride in it at little cost (docs/serve.md)
LANE_TOKENS = 128


def _adjacent(group: list[Request]) -> list[list[Request]]:
    """``group`` split where its rows stop being adjacent (row r, then r + 1...)."""
    runs: list[list[Request]] = []
    for req in group:
        if runs and req.slot == runs[-1][-1].slot + 1:
            runs[-1].append(req)
        else:
            runs.append([req])
    return runs


class RowPrefix:
    """The first rows of a shared KV buffer on the CPU as a cache of their own, over the buffer's memory (numpy views
    by address, wrapped as OrtValues without a copy), so that a decode step runs only the rows up to the last one
    decoding: a row beyond it, free or holding a prompt being read, costs the step nothing (in a step of every row it
    costs its share of the weights' work and, being read, attention over what it holds: on the 2-core CPU two rows
    holding 4000 positions each made a 32-stream step of SmolLM2-135M ~80 ms slower, 329 against 248 ms)."""

    def __init__(self, lm: LanguageModel, cache: KVCache):
        import onnxruntime as ort

        s = lm.session
        if s.device != "cpu" or s.cuda_graph:
            raise OnnxpipeError("a prefix of the rows is bound by host address: the CPU only")
        self._ort, self.cache = ort, cache
        self.views = [self._view(v, s.kv_dtype) for v in cache.values]  # they read the buffers ``cache`` holds
        self._last: tuple[int, KVCache] | None = None

    @staticmethod
    def _view(value: Any, dtype: np.dtype) -> np.ndarray:
        shape = [int(d) for d in value.shape()]
        nbytes = int(np.prod(shape)) * dtype.itemsize
        buffer = memoryview((ctypes.c_char * nbytes).from_address(value.data_ptr())).cast("B")
        return np.frombuffer(buffer, dtype).reshape(shape)

    def rows(self, n: int) -> KVCache:
        """The cache of rows [0, n): the same memory as the buffer's."""
        if n == self.cache.batch:
            return self.cache
        if self._last is None or self._last[0] != n:
            values = [self._ort.OrtValue.ortvalue_from_numpy(v[:n]) for v in self.views]  # CPU: wraps, no copy
            self._last = (n, KVCache(values, 0, self.cache.capacity, n))
        return self._last[1]


class SlotScheduler(BatchLoop):
    """Fixed rows of one shared KV buffer (optimize --target cuda): on the CPU, the CUDA EP, or its CUDA graphs."""

    def __init__(self, lm: LanguageModel, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | str = "auto",
                 max_length: int | None = None, prefill_group: int = DEFAULT_PREFILL_GROUP,
                 chunk_graphs: bool | None = None, chunk_lane: bool | None = None):
        s = lm.session
        if not s.shares_buffer or s.padding_side != "right":
            raise OnnxpipeError(f"{s.model_dir.path}: the slot layout needs a shared KV buffer read by row sums "
                                "(optimize --target cuda); this graph grows its cache: serve it with the concat "
                                "layout (make_scheduler)")
        super().__init__(lm, max_batch, max_queue, prefill_chunk)
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                       or max_length < 2):
            raise OnnxpipeError(f"max_length must be an integer >= 2, got {max_length!r}")
        if not isinstance(prefill_group, int) or isinstance(prefill_group, bool) or not 1 <= prefill_group <= max_batch:
            raise OnnxpipeError(f"prefill_group must be an integer from 1 to max_batch ({max_batch}), got "
                                f"{prefill_group!r}")
        self.prefill_group = prefill_group  # whole prompts read together in one run, at most
        length = min(max_length or DEFAULT_MAX_LENGTH, s.max_positions)
        # with CUDA graphs: the session's slot of (max_batch, capacity), captured once here; its capacity may be
        # rounded up (never past the model's positions)
        # the CPU's memory, before allocating (every row prefilled at once at the widest prefill: a group run's
        # rows are fewer, each at most that wide)
        check_fits(s, max_batch, length, min(length, self.budget.largest))
        try:
            self.cache = s.new_cache(max_batch, capacity=length)
        except OnnxpipeError:
            raise
        except Exception as e:  # onnxruntime's allocation failure (device memory): one line that says what to change
            text = first_line(e, 200)
            raise OnnxpipeError(f"{s.model_dir.path}: could not allocate the KV buffer of {max_batch} rows x {length} "
                                f"positions ({text}); use a smaller --max-batch or --max-length") from None
        assert self.cache.capacity is not None
        self.max_length = min(length, self.cache.capacity)
        self.table = SlotTable(max_batch, self.cache.capacity, int(lm.manifest.tokenizer.get("pad_token_id") or 0))
        self.rows = RowPrefill(lm, self.cache.values)
        # long prompts' chunks through captured graphs: opt-in (chunk_graphs=True, with CUDA graphs and the
        # last-position head's small fixed logits) until a GPU run has checked them (docs/serve.md)
        if chunk_graphs and not (s.cuda_graph and s.last_position):
            raise OnnxpipeError(f"{s.model_dir.path}: chunk graphs replay long prompts' chunks as CUDA graphs: they need "
                                "a session with CUDA graphs (--cuda-graph) and the last-position head")
        self.rows.chunk_graphs = bool(chunk_graphs)
        if self.rows.chunk_graphs:
            self.budget.widths = CHUNK_WIDTHS
        # long prompts are read through chunk graphs in a fixed set of rows, the highest CHUNK_GRAPH_ROWS (a graph
        # binds its row by address): prompts longer than ``graph_row_tokens`` take them while one is free, any other
        # prompt a row outside them while one is free (``_take_row``), so a bounded number of graphs
        # (cuda_graphs.CHUNK_GRAPHS_PER_SLOT), all captured ahead, serves long prompts whatever the batch
        self.graph_rows = range(max(max_batch - CHUNK_GRAPH_ROWS, 0), max_batch) if self.rows.chunk_graphs else None
        self.graph_row_tokens = GRAPH_ROW_TOKENS
        if self.graph_rows is not None:
            self.rows.graph_rows = frozenset(self.graph_rows)
        # the lane (opt-in): while streams decode, a long prompt's chunks (its last included) ride in the decode
        # step's own run (``CudaGraphs.step_lane``, fed or host-fed), in the graph rows, one chunk an iteration, of
        # ``lane_tokens``
        if chunk_lane and not (self.rows.chunk_graphs and s.fed and s.lane is not None):
            raise OnnxpipeError(f"{s.model_dir.path}: the chunk lane reads long prompts' chunks inside fed CUDA-graph "
                                "decode steps: it needs --cuda-graph, --chunk-graphs and a session loaded with its "
                                f"lane ({s.lane_why_not})")
        self.lane = bool(chunk_lane)
        self.lane_tokens = self.budget.chunk or LANE_TOKENS
        self._lane: tuple[Request, list[int], int] | None = None  # the chunk the next decode step reads
        # the rows whose chunk graphs ``_started`` captures ahead, the highest (the graph rows on a GPU; none on the
        # CPU, where tests drive the graph path): a capture stalls the loop for several runs, so not mid-stream
        self.warm_rows = len(self.graph_rows) if self.graph_rows is not None and s.device != "cpu" else 0
        # on the CPU a decode step runs the rows up to the last decoding one; a prompt read in chunks beside running
        # streams takes the highest free row, so it stays out of their steps until it decodes (with CUDA graphs
        # every step runs all rows)
        self.prefix = RowPrefix(lm, self.cache) if s.device == "cpu" and not s.cuda_graph else None
        self._admitted: list[Request] = []  # holding a row, their prompts being read, in order of admission
        self._changed = True  # a change since the last decode step that the next must upload (``_on_device``)
        # where decode steps may be fed on the device (CUDA graphs with the step tail), a row being read is parked at
        # its prompt's full length (``SlotTable.take``'s park): a prompt's chunks before its last then leave the
        # fed pipeline as it was (no host-fed step after them, the step's rows still processed on the rows thread).
        # Elsewhere every step is host-fed and a row being read is parked at what it holds (its count)
        self.parks = bool(s.cuda_graph and s.fed)
        self._fed_left = 0  # fed steps that may still follow the last host-fed one (``SlotTable.parked_room``)
        # a fed step's rows being processed on the rows thread: (rows, job of _process, True)
        # the overlapped step: its rows, the job processing them (None until handed over: ``_hand_rows``), True
        self._pending: tuple[list[Request], Job | None, bool] | None = None
        self._held: np.ndarray | None = None  # that step's output until its rows are handed over
        self._rows_thread: RowsWorker | None = None  # made on the loop's thread (``_started``)
        # after a processed step: the fewest new tokens any row going on may still take (``_process``)
        self._slack = 0
        # fed steps launched ahead of their reads on the session's own stream (``CudaGraphs.ahead``): between two
        # iterations at most one is in flight, the next iteration's own step (``_fed_step``, ``_land``). On by
        # default (run 48, docs/serve.md); ONNXPIPE_SERVE_AHEAD=0 syncs every step
        self.ahead = os.environ.get("ONNXPIPE_SERVE_AHEAD", "1").strip().lower() not in ("0", "off", "false", "no")
        self._ahead: Any = None

    # ---- the loop's steps ----
    def _started(self) -> None:
        """The session's CUDA graph of the rows captured on the loop's thread, while the rows are empty: the CUDA EP
        keeps captured graphs per thread, and the first run of a graph id on a thread captures it there by running
        it 3 times in that one call, which on a real step would advance the rows fed by the step tail (a request's
        first decode token came back 2 tokens on). A step on a thread the graph was not captured on runs uncaptured
        (correct, slower): so it does where this fails (``stats.capture_error``) or rows are already held. With chunk
        graphs on a GPU, the chunk graphs of the ``warm_rows`` highest rows are captured here too, at every width
        (``RowPrefill.warm``), so that no capture stalls running streams later. On a GPU with padded widths
        (``ONNXPIPE_PREFILL_PAD``) the whole prompts' shapes (1 to ``prefill_group`` prompts, widths up to
        ``row_prefill.WARM_WIDTH``) are run once here as well (``RowPrefill.warm_shapes``, ``stats.warmed_shapes``):
        the first run of a shape costs ~10 ms more (run 52)."""
        s = self.lm.session
        empty = self.table.free_rows() == self.table.rows
        warm = s.cuda_graph and empty
        if warm:
            self.cache = s.new_cache(self.max_batch, capacity=self.cache.capacity)
        self._rows_thread = RowsWorker("onnxpipe-rows")
        if empty and s.device != "cpu" and not self.stats.warmed_shapes:
            try:
                self.stats.warmed_shapes = self.rows.warm_shapes(self.prefill_group, self.table.pad_id)
            except Exception as e:  # the shapes then meet their first runs with the prompts
                self.stats.warm_error = first_line(e)
        if warm and self.rows.chunk_graphs and self.warm_rows:  # the rows are empty, the thread the loop's
            try:
                self.rows.warm(list(range(self.max_batch - 1, self.max_batch - 1 - self.warm_rows, -1)),
                               self.table.pad_id)
            except Exception as e:  # chunks then run uncaptured where their graphs were not captured
                self.rows.graph_error = first_line(e)
            self.stats.chunk_graph_error = self.rows.graph_error
            self.stats.chunk_graph_skipped = dict(self.rows.skipped)
        if warm and self.lane and self.warm_rows:
            rows = list(range(self.max_batch - 1, self.max_batch - 1 - self.warm_rows, -1))
            try:
                out = s.graphs.warm_lanes(self.cache, rows, self.table.pad_id)
                if isinstance(out, str):
                    self.stats.lane_skipped[f"warm {out}"] = 1
            except Exception as e:  # chunks then run apart from the steps, uncaptured lanes counted
                self.stats.lane_error = first_line(e)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self._rows_thread is not None:
            self._rows_thread.shutdown(wait=True)

    def _prefilling(self) -> list[Request]:
        return list(self._admitted)

    def _admit(self, budget: int) -> None:
        if self._waiting:
            self._settle()  # rows that ended in the step being processed free their places first
        rows = []
        while self._waiting and self.table.free_rows():
            req = self._waiting.popleft()
            req.slot = self._take_row(len(req.row.prompt))
            self._admitted.append(req)
            rows.append(req.slot)
        self._on_device(rows)  # each parked at its prompt's length

    def _take_row(self, prompt: int) -> int:
        """The row a prompt of ``prompt`` tokens takes: the lowest free one, or the highest where it is read in chunks
        while others decode (on the CPU, out of their steps until it decodes: ``RowPrefix``). With chunk graphs a
        prompt longer than ``graph_row_tokens`` takes the highest free graph row, where its chunks replay graphs, and
        any other prompt a row outside them while one is free, so that they stay free for long prompts."""
        chunked = prompt > (self.budget.chunk or self.budget.whole[0])
        last = chunked and bool(self._running)
        park = prompt if self.parks else 0
        if self.graph_rows is None:
            return self.table.take(last=last, park=park)
        if prompt > self.graph_row_tokens:
            return self.table.take(last=True, among=self.graph_rows, park=park)
        return self.table.take(last=last, among=range(self.graph_rows.start), park=park)

    def _read_whole(self, req: Request) -> bool:
        """Whether ``req``'s prompt is read in one run (``_prefill``), so that its row joins the iteration it is read."""
        return len(req.row.prompt) <= (self.budget.chunk or self.budget.whole[0])

    def _prefill(self, allowance: Allowance) -> int:
        """This iteration's prefill runs, over the admitted requests in order, each run as many tokens as
        ``allowance`` gives it; first, each in one piece, the short prompts not yet begun (``budget.whole``), their
        runs counted in the allowance. With ``prefill_group`` > 1, whole prompts not yet begun are read up to that
        many in one run (``_group_run``): the short ones (the first group of them whatever their tokens, then as
        many as ``budget.whole`` allows), and with a budget of tokens those whose padded run fits what is left.

        A run that ends a prompt (its row joins: the logits read, the next decode step host-fed) waits first for the
        step whose rows are being processed on the rows thread (``_settle``); a long prompt's chunk before its last
        does not: on the loop's thread it touches neither the table nor the running rows, the row being parked at
        its prompt's length (``parks``), and reads no logits back."""
        if self._lane is not None:  # deferred by the last iteration, whose decode step did not run (none ran)
            self._flush_lane()
        if not self._admitted:
            return 0
        read, (whole, most) = 0, self.budget.whole
        shorts: list[Request] = []
        for req in self._admitted:
            n = len(req.row.prompt)
            if req.prefilled == 0 and n <= whole and (len(shorts) < self.prefill_group or read + n <= most):
                shorts.append(req)
                read += n
        read = 0
        if self.prefill_group > 1 and shorts:
            by_length = sorted(shorts, key=lambda r: len(r.row.prompt))  # less padding in each run
            for at in range(0, len(by_length), self.prefill_group):
                read += self._group_run(by_length[at:at + self.prefill_group], allowance)
            shorts = []
        for req in shorts + [r for r in self._admitted if r not in shorts]:
            if req not in self._admitted:  # read in a group run of this iteration
                continue
            prompt = req.row.prompt
            left = len(prompt) - req.prefilled
            group = self._whole_prompts(req, allowance)
            if len(group) > 1:
                read += self._group_run(group, allowance)
                continue
            lane = (self.lane and self._lane is None and req not in shorts and not self._read_whole(req)
                    and bool(self._running) and req.slot in (self.rows.graph_rows or ()))
            n = min(self.lane_tokens, left) if lane else left if req in shorts else allowance.next(req.prefilled, left)
            if n <= 0:
                break
            start, end = self.table.chunk(len(prompt), req.prefilled, n)
            read += end - start
            joins = end == len(prompt)  # its last run: the row joins, its logits give its first token
            if lane:  # read by the decode step that follows (``_decode_step``), in its run
                self._lane = (req, prompt[start:end], start)
                req.prefilled = end
                allowance.ran(end - start, start, 0.0, learn=False)
                self.stats.prefill_chunks += 1
                break  # one chunk an iteration: the step's
            try:
                began = time.perf_counter()
                if req in shorts or self._read_whole(req):  # read in one run
                    logits, how = self.rows.run(req.slot, prompt[start:end], start, logits=joins,
                                                want=self._want([req]), pad_id=self.table.pad_id), "whole"
                else:  # a long prompt's chunk (in the row ``_admit`` gave it)
                    logits, how = self.rows.run_chunk(req.slot, prompt[start:end], start, self.table.pad_id,
                                                      logits=joins)
                # with chunk graphs the cost model learns chunks' replays (and uncaptured chunks) only
                learn = not self.rows.chunk_graphs or how in ("replayed", "uncaptured")
                allowance.ran(end - start, start, time.perf_counter() - began, learn=learn)
                self.stats.prefill_chunks += 1
                self.stats.graph_chunks += how in ("replayed", "captured")
                self.stats.chunk_graph_error = self.rows.graph_error
                if how == "uncaptured" and self.rows.chunk_graphs:  # a copy: /health reads it from another thread
                    self.stats.chunk_graph_skipped = dict(self.rows.skipped)
                req.prefilled = end
            except Exception as e:  # this request alone fails; the others go on
                self._settle()  # its row is released: the table is the loop's again first
                self._leave(req)
                self._fail(req, e)
                continue
            if not joins:
                if not self.parks:  # parked at what it holds (every step host-fed: none is being processed)
                    self.table.prefilled(req.slot, end)
                continue
            assert logits is not None
            self._join(req, logits)
        return read

    def _whole_prompts(self, req: Request, allowance: Allowance) -> list[Request]:
        """``req`` and the admitted prompts after it, not yet begun, that one group run reads whole within a budget of
        tokens (``prefill_group`` at most, k rows x the longest prompt within the tokens left); ``[req]`` alone where
        none joins it, or where the budget is auto's seconds."""
        left = allowance.tokens_left
        if self.prefill_group == 1 or left is None or req.prefilled or len(req.row.prompt) > left:
            return [req]
        group, width = [req], len(req.row.prompt)
        for other in self._admitted[self._admitted.index(req) + 1:]:
            if len(group) == self.prefill_group:
                break
            wider = max(width, len(other.row.prompt))
            if other.prefilled == 0 and wider * (len(group) + 1) <= left:
                group.append(other)
                width = wider
        return group

    def _group_run(self, group: list[Request], allowance: Allowance) -> int:
        """Whole prompts not yet begun, read together: their rows moved to runs of adjacent rows
        (``SlotTable.place``), each run of rows one prefill of [rows, longest prompt] (``RowPrefill.run_group``),
        counted as one run by the budget; each request then samples its first token and decodes. A failed run fails
        its requests alone. Returns the prompt tokens read."""
        self._settle()  # rows move and join self._running: the step being processed is applied first
        # the other prompts not yet begun may give up their rows for the group's run of adjacent rows
        others = [r for r in self._admitted if r.prefilled == 0 and r not in group]
        moved = {r.slot for r in group + others}  # the rows they held, and below the rows they hold
        for req, row in zip(group + others, self.table.place([r.slot for r in group], [r.slot for r in others])):
            req.slot = row
            moved.add(row)
        read = 0
        for members in _adjacent(group):
            first, rows = members[0].slot, len(members)
            prompts = [r.row.prompt for r in members]
            try:
                began = time.perf_counter()
                logits = self.rows.run_group(first, prompts, self.table.pad_id, want=self._want(members))
                allowance.ran(max(map(len, prompts)), 0, time.perf_counter() - began, rows=rows,
                              learn=not self.rows.chunk_graphs)
            except Exception as e:  # these requests fail; the others go on
                for req in members:
                    self._leave(req)
                    self._fail(req, e)
                continue
            self.stats.prefill_chunks += 1
            for i, req in enumerate(members):
                read += len(req.row.prompt)
                req.prefilled = len(req.row.prompt)
                self._admitted.remove(req)
                if req.cancelled.is_set():  # its client left during the run: no token for it, its row freed
                    self.stats.cancelled += 1
                    self.table.release(req.slot)
                    continue
                try:
                    self.table.prefilled(req.slot, req.prefilled)
                    self._take(req, self._choose(req, logits, i))
                except Exception as e:  # this request alone fails
                    self._leave(req)
                    self._fail(req, e)
                    continue
                self._joined(req)
        self._on_device(sorted(moved))  # every row a member or another prompt left or took, as it is now
        return read

    def _joined(self, req: Request) -> None:
        """A request whose prompt is read and first token taken: it decodes from the next step, or leaves (done, or
        its client gone meanwhile)."""
        if req.row.done:
            self.table.release(req.slot)
        elif req.cancelled.is_set():
            self.stats.cancelled += 1
            self.table.release(req.slot)
        else:
            self.table.start_decoding(req.slot, req.row.tokens[-1])
            self._running.append(req)

    def _decode_step(self) -> None:
        """One decode step of the running rows. A greedy step fed on the device, when the step before was one too and
        none of its rows ends by length, is started before that step's rows are processed: their tokens' text and
        events are made on the rows thread (``_process``) while the graph runs, then applied (``_settle``). A row
        that ended there by a stop token or string has been stepped once more on the device, unread: room the
        scheduler leaves (a row ends by length at most at its last position)."""
        s = self.lm.session
        steady = self._pending is not None and self._pending[2] and not self._changed and self._lane is None
        if self._in_flight() and not steady:  # something changed since it was launched: it is read first
            self._settle()
        overlap = self._pending is not None and self._pending[2] and not self._changed
        if not overlap:
            self._settle()
        running = self._pending[0] if overlap else self._running  # type: ignore[index]
        # an overlapped step's rows are the fed step's before it, unchanged: greedy (argmax) still
        want = "argmax" if overlap else self._want(running)
        # fed: the step before wrote this one's inputs on the device (and ``_on_device`` any changed row's), and the rows
        # being read are parked where one more step writes within their rows (``_fed_left``)
        fed = want == "argmax" and not self._changed and self._fed_left > 0 and s.can_feed(self.cache)
        if overlap and not fed:  # a row being read would be written past its end: host-fed, parked there again
            self._settle()
            running, overlap, fed = self._running, False, False
        self._changed = False
        # a long prompt's chunk deferred by ``_prefill``: in this step's run (fed, or its inputs uploaded), or where
        # the lane cannot take it read apart first; the prompt's last chunk gives its first token (``_join``)
        lane, self._lane = self._lane, None
        failed: tuple[Request, Exception] | None = None  # (request, error) of a chunk read apart that failed
        chunk_logits: np.ndarray | None = None  # a last chunk's, read back
        rode = False  # the chunk is read by this step's run
        try:
            out = None
            if lane is not None:
                step = None
                if not fed:  # host-fed: every row (CUDA graphs), the row being read where it is parked
                    step = self.table.step_inputs(self.table.rows)
                    self._fed_left = self.table.parked_room()
                rode = True  # until it says the chunk was read apart (a raise: in the run)
                out, chunk_logits, rode, failed = self._step_lane(lane, step, want)
            if out is None and fed:
                self._hand_rows()
                out = self._fed_step()
            elif out is None:
                rows = self.table.step_rows() if self.prefix is not None else self.table.rows
                ids, mask, positions = self.table.step_inputs(rows)
                self._fed_left = self.table.parked_room()
                out = s.forward(ids, mask, positions, self.prefix.rows(rows) if self.prefix else self.cache, want=want)
        except Exception as e:  # the whole step failed: its requests fail; rows being prefilled go on
            self._drop_ahead()
            self._settle()
            self._changed = True
            dropped, self._running = self._running, []
            for req in dropped:
                self.table.release(req.slot)
                self._fail(req, e)
            if rode and lane is not None and lane[0] in self._admitted:  # its chunk was read by the failed run
                failed = (lane[0], e)
            self._lane_failed(failed)
            return
        self.stats.steps += 1
        self.stats.fed_steps += fed
        self._fed_left -= fed
        self.stats.max_running = max(self.stats.max_running, len(running))
        if overlap:  # the step before, applied: its rows that ended leave; this step's tokens for them unread
            self._settle_pending()  # (not ``_settle``: a step launched ahead is the next iteration's)
            running = self._running
            self.stats.overlapped_steps += 1
        # whether a row's token of this step is its last (by length): overlapped, the processing of the step before
        # counted it over the rows it left running (these), so no look at each row here
        ends = self._slack <= 1 if overlap else any(r.row.limit - len(r.row.tokens) <= 1 for r in running)
        # this step's rows processed now, or on the rows thread while the next step runs; now too where a request
        # waits or a prompt read in one run is admitted: the next iteration's admission or join would wait for the
        # rows thread at once (a handoff to it and back, under a GIL the event loop holds while it writes the
        # step's chunks). A long prompt's chunks do not wait for it, but its last one's join (after its run)
        joins = lane is not None and failed is None and lane[2] + len(lane[1]) == len(lane[0].row.prompt)
        if (fed and not ends and not self._changed and self._rows_thread is not None and not self._waiting
                and not any(self._read_whole(r) for r in self._admitted) and failed is None and not joins):
            self._pending, self._held = (running, None, True), out  # handed over as the next step starts
        else:
            self._apply(running, *self._process(running, out))
        self._lane_failed(failed)
        if joins and lane is not None and chunk_logits is not None:
            self._join(lane[0], chunk_logits)

    def _step_lane(self, lane: tuple[Request, list[int], int], step: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                   want: str) -> tuple[np.ndarray | None, np.ndarray | None, bool, tuple[Request, Exception] | None]:
        """The decode step with ``lane``'s chunk in its run (``CudaGraphs.step_lane``; ``step``: its host inputs, None
        where it is fed): (what the step gives, the chunk's logits where it is its prompt's last, True, None); where
        the lane cannot run it (counted by why in ``stats.lane_skipped``), the chunk read apart: (None, its logits
        or None, False, None), the step then runs alone, or (None, None, False, (request, error)) where that read
        failed."""
        req, ids, start = lane
        capacity = self.rows.capacity
        last = start + len(ids) == len(req.row.prompt)
        width = chunk_width(len(ids), start, capacity)
        inputs = chunk_inputs(ids, start, width, capacity, self.table.pad_id)
        self._hand_rows()
        got = self.lm.session.graphs.step_lane(self.cache, req.slot, *inputs, step=step, want=want, logits=last)
        if not isinstance(got, str):
            self.stats.lane_chunks += 1
            out, chunk_logits = got
            return np.array(out, copy=True), chunk_logits, True, None  # a bound buffer is the next step's
        self.stats.lane_skipped[got] = self.stats.lane_skipped.get(got, 0) + 1
        chunk_logits, failed = self._chunk_apart(lane, last)
        return None, chunk_logits, False, failed

    def _chunk_apart(self, lane: tuple[Request, list[int], int],
                     logits: bool) -> tuple[np.ndarray | None, tuple[Request, Exception] | None]:
        """``lane``'s chunk read in a run of its own (``RowPrefill.run_chunk``; its logits read back with
        ``logits``): (the logits or None, None), or (None, (request, error)) where it failed: the request fails once
        the step is done (``_lane_failed``)."""
        req, ids, start = lane
        try:
            out, how = self.rows.run_chunk(req.slot, ids, start, self.table.pad_id, logits=logits)
        except Exception as e:
            return None, (req, e)
        self.stats.graph_chunks += how in ("replayed", "captured")
        return out, None

    def _flush_lane(self) -> None:
        """The deferred chunk read apart now (no decode step came to read it), its prompt joining where it was the
        last."""
        lane, self._lane = self._lane, None
        assert lane is not None
        last = lane[2] + len(lane[1]) == len(lane[0].row.prompt)
        logits, failed = self._chunk_apart(lane, last)
        self._lane_failed(failed)
        if failed is None and logits is not None:
            self._join(lane[0], logits)

    def _join(self, req: Request, logits: np.ndarray) -> None:
        """A prompt read to its end: its row joins the running rows (the step being processed applied first), its
        first token taken from its last run's logits [1, vocab]; the next step is host-fed."""
        self._settle()
        try:
            self.table.prefilled(req.slot, len(req.row.prompt))
            self._admitted.remove(req)
            self._take(req, self._choose(req, logits, 0))
        except Exception as e:  # this request alone fails; the others go on
            self._leave(req)
            self._fail(req, e)
            return
        self._joined(req)
        self._on_device([req.slot])

    def _lane_failed(self, failed: tuple[Request, Exception] | None) -> None:
        """A chunk of the lane's prompt that could not be read: its request fails, the others go on."""
        if failed is None or failed[0] not in self._admitted:
            return
        self._settle()  # its row is released: the table is the loop's again first
        self._leave(failed[0])
        self._fail(failed[0], failed[1])

    def _process(self, running: list[Request], out: np.ndarray) -> tuple[list[Request], int]:
        """Each row's token taken (its text and event made) and the table moved on (each row one position more, its
        token for the next host-fed step); returns the requests that go on and the fewest new tokens one of them may
        still take (``_decode_step``'s ``ends``). On the rows thread while the next step runs, so the table's update
        is off the serial path between two steps (after the device's wait its numpy calls ran cold there: 16-43 us
        at p50 on the 2-core machine's proxy); the loop's thread touches the table only once it has settled the
        step."""
        rows, tokens, keep = [], [], []
        slack = 1 << 62
        for req in running:
            try:
                token = self._choose(req, out, req.slot)
                rows.append(req.slot)
                tokens.append(token)
                self._take(req, token)
            except Exception as e:  # a row whose sampling or callback fails leaves alone
                self._fail(req, e)
                continue
            row = req.row
            if req.cancelled.is_set() and not row.done:
                self.stats.cancelled += 1
            elif not row.done:
                keep.append(req)
                slack = min(slack, row.limit - len(row.tokens))
        self.table.stepped(rows, tokens)
        return keep, slack

    def _apply(self, running: list[Request], keep: list[Request], slack: int) -> None:
        """A processed step's requests: those that ended or failed leave, their rows released."""
        self._slack = slack
        if len(keep) == len(running):  # every row goes on (``keep`` is ``running`` less those that left)
            self._running = keep
            return
        kept = {id(r) for r in keep}
        freed = [req.slot for req in running if id(req) not in kept]
        for row in freed:
            self.table.release(row)
        self._running = keep
        self._on_device(freed)  # each a free row again: a pad at 0

    def _on_device(self, rows: list[int]) -> None:
        """Rows whose next decode inputs changed (a prompt admitted and parked, a row joined, moved or freed): set
        on the device where the next step may still be fed (``CudaGraphs.patch_rows``, each row's token and place as
        the table gives them), so that they cost no host-fed step of every row; the fed steps left are bounded by
        the room of the rows being read. Elsewhere (no step tail, the CPU's plain steps, a slot not yet primed,
        another change already pending, no room, or after a patch failed: ``stats.row_patch_error``) the next step
        goes up from the host (``_changed``), which writes every row's inputs."""
        if not rows:
            return
        if self._in_flight():  # a patch runs on another stream: the step in flight writes these buffers first
            self._ahead.wait()
        t = self.table
        parked = [int(max(t.counts[r], t.park[r])) for r in rows if t.state[r] == PREFILLING]
        room = min((t.capacity - 1 - place for place in parked), default=self._fed_left)
        if not self.parks or self._changed or self._fed_left <= 0 or room <= 0:
            self._changed = True
            return
        ids, places = t.row_inputs(rows)
        try:
            patched = not self.stats.row_patch_error and self.lm.session.graphs.patch_rows(self.cache, rows, ids,
                                                                                        places)
        except OnnxpipeError as e:  # kept, and every later change goes up from the host (its inputs rewritten)
            self.stats.row_patch_error, patched = str(e)[:300], False
        if not patched:
            self._changed = True
            return
        self._fed_left = min(self._fed_left, room)
        self.stats.row_patches += len(rows)

    def _settle(self) -> None:
        """The step whose rows are being processed on the rows thread, waited for and applied; then a step launched
        ahead of it, read and applied (``_land``): after this nothing runs on the device for the running rows."""
        self._settle_pending()
        self._land()

    def _settle_pending(self) -> None:
        """The step whose rows are being processed on the rows thread, waited for and applied."""
        if self._pending is None:
            return
        running, job, _ = self._pending
        self._pending = None
        if job is None:  # not handed over: processed here
            out, self._held = self._held, None
            assert out is not None
            self._apply(running, *self._process(running, out))
            return
        self._apply(running, *job.result())

    def _fed_step(self) -> np.ndarray:
        """This iteration's fed step's next ids: the step launched ahead by the iteration before, or launched now;
        where the next iteration looks to be another such step (``_ahead_ok``), the step after it is launched before
        this one is read, so the GPU runs it while this thread reads, settles and comes round again. Without a
        stream of the session's own (``CudaGraphs.ahead`` None) the step runs synced."""
        a = self._ahead if self._in_flight() else self._launch()
        if a is None:
            return np.array(self.lm.session.step_fed(self.cache), copy=True)  # the bound buffer is the next step's
        if self._ahead_ok():
            a.launch()
            self.stats.ahead_steps += 1
        return a.read()

    def _launch(self) -> Any:
        if not self.ahead:
            return None
        a = self._ahead = self.lm.session.graphs.ahead(self.cache)
        if a is not None:
            a.launch()
        return a

    def _ahead_ok(self) -> bool:
        """Whether the step after this one may be launched before this one is read: the next iteration is another
        fed, overlapped step of the same rows unless a request arrives or a row ends (then ``_land`` reads it
        first), no prompt is being read, and every row and parked row has room for both steps."""
        return (self._rows_thread is not None and self._pending is not None and self._pending[2]
                and not self._waiting and not self._admitted and self._lane is None and not self._changed
                and self._slack >= AHEAD_SLACK and self._fed_left >= 2)

    def _in_flight(self) -> bool:
        return self._ahead is not None and self._ahead.in_flight > 0

    def _land(self) -> None:
        """A fed step launched ahead, read and processed now, as a step of the rows still running (it ran for
        them, and for rows that ended just before it, unread: the room ``AHEAD_SLACK`` kept)."""
        if not self._in_flight():
            return
        try:
            out = self._ahead.read()
        except Exception:  # its requests fail with the error (the loop's handler); nothing is left in flight
            self._drop_ahead()
            raise
        running = self._running
        self.stats.steps += 1
        self.stats.fed_steps += 1
        self._fed_left -= 1
        self.stats.max_running = max(self.stats.max_running, len(running))
        self._apply(running, *self._process(running, out))

    def _drop_ahead(self) -> None:
        """After a failed step: whatever was launched ahead is waited for and dropped, unread."""
        if self._ahead is not None:
            self._ahead.drain_quietly()
            self._ahead = None

    def _hand_rows(self) -> None:
        """The overlapped step's rows handed to the rows thread, as the next step's run is about to start: their
        processing (Python, under the GIL) then runs while this thread waits in onnxruntime with the GIL released,
        not while it prepares the run. Handed over at the end of the step, the processing competed for the GIL with
        that preparation (the loop's iteration, a lane step's chunk inputs), on the serial path: in run 38 (H100) a
        lane step spent 0.41 ms at p50 and 1.54 at p99 outside its call into the graphs, the plain fed step 0.03."""
        pending = self._pending
        if pending is not None and pending[1] is None and self._rows_thread is not None:
            self._pending = (pending[0], self._rows_thread.submit(self._process, pending[0], self._held), True)
            self._held = None

    def _drop_cancelled_in_flight(self) -> None:
        if not any(r.cancelled.is_set() for r in self._admitted + self._running):
            return  # looked at only once a cancel was logged (``_drop_cancelled``)
        self._settle()
        for reqs in (self._admitted, self._running):
            for req in [r for r in reqs if r.cancelled.is_set()]:
                self.stats.cancelled += 1
                reqs.remove(req)
                self.table.release(req.slot)
                self._changed = True

    def _reset(self) -> None:
        try:
            self._settle()
        except Exception:  # the rows are dropped anyway
            self._drop_ahead()
            self._pending, self._held = None, None
        self._admitted, self._running = [], []
        self._lane = None
        self.table.release_all()
        self._changed = True

    def _leave(self, req: Request) -> None:
        if req in self._admitted:
            self._admitted.remove(req)
        if req in self._running:
            self._running.remove(req)
        self.table.release(req.slot)
        self._changed = True
