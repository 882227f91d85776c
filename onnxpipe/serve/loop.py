"""What every scheduler of the server shares: the bounded queue, the thread that runs the loop, each request's events
and sampling. How the running batch's KV cache is laid out (and so how requests join and leave it) is a subclass's:
``scheduler.ConcatScheduler`` (the concat cache of the CPU form), ``slots.SlotScheduler`` (fixed rows of a shared
buffer: the CUDA form, and its CUDA-graph slots).

One iteration of the loop: admit waiting requests (under the lock), drop the cancelled ones, run this iteration's
prefill work (``budget.PrefillBudget``'s allowance: a fixed number of tokens, or with ``auto`` the runs that fit a
share of a decode step, sized from the measured cost of a run), then one decode step of the running batch. Events go to each request's ``emit`` callback from the
scheduler thread: ``("piece", StreamPiece)`` as text becomes final, then ``("done", GenerationResult)``, or
``("error", message)``.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from onnxpipe.errors import OnnxpipeError, first_line
from onnxpipe.runtime.generate import LanguageModel, RowState
from onnxpipe.runtime.sampling import next_token
from onnxpipe.runtime.session import KVCache
from onnxpipe.serve.budget import MAX_CHUNK, Allowance, PrefillBudget

Event = tuple[str, Any]


class QueueFull(OnnxpipeError):
    """The waiting queue holds ``max_queue`` requests already (answered 429)."""


class TooLong(OnnxpipeError):
    """The request's prompt and its most new tokens do not fit the scheduler's rows (answered 400)."""


@dataclass(eq=False)  # compared by identity: `req in running` per row per step, not field by field
class Request:
    row: RowState
    emit: Callable[[Event], None]
    id: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # prefill progress: the prompt tokens already in the cache (its own cache, or its slot's row)
    cache: KVCache | None = None
    prefilled: int = 0
    slot: int = -1  # the row of the fixed batch it holds (slot layout), from admission until it leaves
    # the loop's log of cancels (``BatchLoop._cancels``): a request cancelled appends itself, so that an iteration
    # looks for cancelled requests only when there may be one (one test of a list, not one per request)
    cancels: list[Request] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """The client is gone: the scheduler drops the request at its next iteration, freeing its place."""
        if not self.cancelled.is_set():
            self.cancelled.set()  # before the log: a look that finds the log's entry finds the flag set
            if self.cancels is not None:
                self.cancels.append(self)


# the trace's fields after the first five: seconds from the last iteration's end to this one's top (the loop's own
# work between, or idle), seconds from its top to its prefill (the lock, admission, cancels), requests admitted, fed
# steps, overlapped steps, chunks read in the lane, rows running after it
TRACE_MORE = ("gap_s", "admit_s", "admitted", "fed", "overlapped", "lane", "rows_after")


@dataclass
class SchedulerStats:
    steps: int = 0  # decode steps of the running batch
    fed_steps: int = 0  # of them, steps whose inputs the step before wrote on the device (CUDA-graph step tail)
    overlapped_steps: int = 0  # of them, steps run while the step before's rows were processed (slot layout)
    ahead_steps: int = 0  # of them, fed steps launched before the step before them was read (slot layout)
    row_patches: int = 0  # rows whose next inputs were set on the device as they joined, moved or left (slot layout)
    row_patch_error: str = ""  # why setting a row's inputs on the device failed (changes then go up from the host)
    prefill_chunks: int = 0
    prefill_tokens: int = 0  # prompt tokens read by those chunks
    graph_chunks: int = 0  # of the chunks, long prompts' chunks run through a captured CUDA graph (slot layout)
    max_running: int = 0  # the largest batch a decode step ran
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0  # refused with QueueFull
    capture_error: str = ""  # why the loop's thread could not capture the CUDA graph (its steps then run uncaptured)
    chunk_graph_error: str = ""  # why a captured prefill chunk failed (chunks then run uncaptured)
    # with chunk graphs, long prompts' chunks that ran uncaptured, by why (RowPrefill.skipped)
    chunk_graph_skipped: dict[str, int] = field(default_factory=dict)
    # with the chunk lane: long prompts' chunks read inside a decode step's run, and the others by why (LANE_SKIPS)
    lane_chunks: int = 0
    lane_skipped: dict[str, int] = field(default_factory=dict)
    lane_error: str = ""  # why capturing the lane's graphs failed (chunks then read apart)
    # on a GPU, whole prompts' padded run shapes run once at start (RowPrefill.warm_shapes), and why that failed
    warmed_shapes: int = 0
    warm_error: str = ""
    # objects moved out of the garbage collector's reach once the loop had started (``freeze_gc``), 0 where not
    gc_frozen: int = 0


class BatchLoop:
    """``submit`` requests from any thread; ``start``/``stop`` the loop that serves them."""

    def __init__(self, lm: LanguageModel, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | str = "auto"):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OnnxpipeError(f"{name} must be a positive integer, got {value!r}")
        self.lm = lm
        self.max_batch, self.max_queue = max_batch, max_queue
        self.budget = PrefillBudget.parse(prefill_chunk)  # prompt tokens an iteration reads: fixed, or auto
        self.max_length = lm.session.max_positions  # prompt + new tokens of one request, at most
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._ids = itertools.count(1)
        self._cancels: list[Request] = []  # appended by Request.cancel from any thread; emptied by _drop_cancelled
        self._stop = False
        self._thread: threading.Thread | None = None
        # set once the loop's thread has done what it prepares before serving (``_started``: a CUDA-graph capture)
        self.ready = threading.Event()
        # where each iteration's time went, when a caller (the load test) sets a deque: (start, prompt tokens read,
        # prefill seconds, decode step seconds, rows that decoded, then ``TRACE_MORE``), perf_counter seconds
        self.trace: deque[tuple[Any, ...]] | None = None
        # a server process's choice (``create_app(freeze_gc=True)``): once the loop has started, every object made
        # so far (the libraries', the model's, the warm-up's) is left out of the collector's full runs, which
        # otherwise walk them all mid-serving (25-31 ms here for a small model's server process, gc_freeze_wanted)
        self.freeze_gc = False

    # ---- from the server ----
    def submit(self, row: RowState, emit: Callable[[Event], None]) -> Request:
        """Queue a prepared request (``LanguageModel.prepare``); raises QueueFull when ``max_queue`` wait already,
        TooLong when its prompt and ``row.limit`` new tokens pass ``max_length``."""
        if len(row.prompt) + row.limit > self.max_length:
            raise TooLong(f"the prompt has {len(row.prompt)} tokens and asks for {row.limit} more: this server's rows "
                          f"hold {self.max_length} tokens")
        with self._cond:
            if self._stop:
                raise OnnxpipeError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            req = Request(row, emit, next(self._ids), cancels=self._cancels)
            self._waiting.append(req)
            self._cond.notify()
        return req

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._running), "prefilling": len(self._prefilling()),
                    "waiting": len(self._waiting), "max_batch": self.max_batch, "max_queue": self.max_queue}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="onnxpipe-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop ----
    def _loop(self) -> None:
        try:
            self._started()
        except Exception as e:  # the layout runs without what it prepares (each layout says what that costs)
            self.stats.capture_error = first_line(e)
        finally:
            if self.freeze_gc:
                gc.collect()
                gc.freeze()
                self.stats.gc_frozen = gc.get_freeze_count()
            self.ready.set()
        ended = time.perf_counter()
        while True:
            top = time.perf_counter()
            with self._cond:
                while not (self._stop or self._waiting or self._prefilling() or self._running):
                    self._cond.wait()
                    top = time.perf_counter()
                if self._stop:
                    break
                allowance = self.budget.iteration(decoding=bool(self._running))
                waiting = len(self._waiting)
                if waiting:
                    self._admit(self.budget.chunk or allowance.next(0, MAX_CHUNK))
                admitted = waiting - len(self._waiting)
            try:
                self._drop_cancelled()
                start = time.perf_counter()
                st = self.stats
                before = (st.fed_steps, st.overlapped_steps, st.lane_chunks)
                read = self._prefill(allowance)
                stepped = time.perf_counter()
                self.stats.prefill_tokens += read
                rows = len(self._running)
                if rows:
                    self._decode_step()
                    self.budget.stepped(time.perf_counter() - stepped)
                if self.trace is not None:
                    now = time.perf_counter()
                    self.trace.append((start, read, stepped - start, now - stepped, rows,
                                       top - ended, start - top, admitted, st.fed_steps - before[0],
                                       st.overlapped_steps - before[1], st.lane_chunks - before[2], len(self._running)))
                    ended = now
            except Exception as e:  # a fault outside one request's own work: fail those in flight, keep serving
                self._fail_in_flight(e)
        try:
            self._settle()
        except Exception as e:  # the step being processed failed as a whole: its requests get the error
            self._fail_in_flight(e)
        with self._cond:
            left = list(self._waiting) + self._prefilling() + self._running
            self._waiting.clear()
        for req in left:
            self._send(req, ("error", "the server is shutting down"))

    def _drop_cancelled(self) -> None:
        """The cancelled requests dropped, waiting or in flight; nothing to look at while none was cancelled since
        the last look (the log is emptied of what this look covers: a cancel logged meanwhile stays for the next)."""
        seen = len(self._cancels)
        if not seen:
            return
        del self._cancels[:seen]
        with self._cond:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            for r in gone:
                self._waiting.remove(r)
            self.stats.cancelled += len(gone)
        self._drop_cancelled_in_flight()

    def _fail_in_flight(self, e: BaseException) -> None:
        in_flight = self._prefilling() + self._running
        self._reset()
        for req in in_flight:
            self._fail(req, e)

    # ---- the layout's (a subclass's) ----
    def _started(self) -> None:
        """On the loop's thread, before it serves anything: what must happen on that thread (nothing here)."""

    def _prefilling(self) -> list[Request]:
        """The requests admitted and not yet running (their prompts being read)."""
        raise NotImplementedError

    def _admit(self, budget: int) -> None:
        """Under the lock: move the waiting requests that start now out of ``_waiting`` (``budget``: the prompt
        tokens this iteration's first run reads from a prompt's start)."""
        raise NotImplementedError

    def _prefill(self, allowance: Allowance) -> int:
        """This iteration's prefill work, its runs within ``allowance`` (asked run by run, each run's time told to
        it); requests whose prompt is read sample their first token and join. Returns the prompt tokens read."""
        raise NotImplementedError

    def _decode_step(self) -> None:
        raise NotImplementedError

    def _drop_cancelled_in_flight(self) -> None:
        raise NotImplementedError

    def _settle(self) -> None:
        """Finish the work of a decode step still in progress off the loop's thread (the slot layout's rows
        processed while the next step runs); nothing here."""

    def _reset(self) -> None:
        """Forget every request in flight (they are failed by the caller) and empty the batch."""
        raise NotImplementedError

    # ---- tokens and events ----
    def _want(self, reqs: list[Request]) -> str:
        greedy = all(r.row.cfg.greedy and r.row.cfg.repetition_penalty == 1.0 for r in reqs)
        return "argmax" if greedy else "logits"

    def _choose(self, req: Request, out: np.ndarray, i: int) -> int:
        if out.ndim == 1:
            return int(out[i])
        cfg = req.row.cfg
        if cfg.greedy and cfg.repetition_penalty == 1.0:  # next_token's own answer, without the row's history
            return int(np.argmax(out[i]))
        return next_token(out[i], cfg, req.row.seen(), req.row.rng)

    def _take(self, req: Request, token: int) -> None:
        row = req.row
        row.add(token)
        piece = row.piece()
        if piece is not None and (piece.text or piece.finish_reason):
            self._send(req, ("piece", piece))
        if row.done:
            self.stats.finished += 1
            self._send(req, ("done", row.result()))

    def _fail(self, req: Request, e: BaseException) -> None:
        self.stats.failed += 1
        text = first_line(e)
        self._send(req, ("error", text))

    def _send(self, req: Request, event: Event) -> None:
        try:
            req.emit(event)
        except Exception:  # the receiver is gone (its event loop closed): nothing to tell, drop the request
            req.cancel()
