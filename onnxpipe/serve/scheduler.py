"""Iteration-level batching (Orca's scheduling) over one DecoderSession, on a thread of its own.

Requests join and leave the running batch at every decode step. Each request owns its rows of the KV cache: the
running batch is one left-padded cache [batch, kv_heads, length, head_dim] in which row i holds ``counts[i]``
positions, right-aligned; the attention mask and the position ids of a step follow from those counts alone, so a
row's result does not depend on who else is in the batch (the padding is masked out, its positions are its own).

One iteration of the loop:

1. admit: when the batch has free places, the oldest waiting requests start. Short prompts start together, as many
   as fit one prefill of ``prefill_chunk`` padded tokens: they are prefilled in one left-padded call, their first
   tokens sampled, and their rows join the batch in one copy. Otherwise the oldest request starts alone:
2. prefill one chunk (``prefill_chunk`` tokens) of that request's prompt into a cache of its own; after its last
   chunk the first token is sampled and the request's rows join the batch (the caches are padded to one length and
   stacked). A long prompt is thus split across iterations, each followed by a decode step of the running batch, so
   running streams keep getting tokens while it is read (DeepSpeed-FastGen's SplitFuse, interleaved rather than fused
   into one call);
3. one decode step for every running request, each choosing its next token with its own sampling options;
   finished, cancelled (client gone) and failed requests leave the batch, their rows cut out of the cache.

Failures stay with their request: a request whose prefill or sampling fails gets an error and the others go on; a
decode step that fails as a whole (onnxruntime) fails the requests in that batch, and the loop serves the next ones.

Events go to each request's ``emit`` callback from the scheduler thread: ``("piece", StreamPiece)`` as text
becomes final, then ``("done", GenerationResult)``, or ``("error", message)``.

The scheduler works on the CPU form of a graph (a concat KV cache, left padding: what export writes). The
shared-buffer form of ``optimize --target cuda`` (and its CUDA-graph slots) is refused with a one-line error.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.generate import LanguageModel, RowState
from onnxpipe.runtime.sampling import next_token
from onnxpipe.runtime.session import KVCache

Event = tuple[str, Any]


class QueueFull(OnnxpipeError):
    """The waiting queue holds ``max_queue`` requests already (answered 429)."""


@dataclass
class Request:
    row: RowState
    emit: Callable[[Event], None]
    id: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # prefill progress: the request's own cache until it joins the batch
    cache: KVCache | None = None
    prefilled: int = 0

    def cancel(self) -> None:
        """The client is gone: the scheduler drops the request at its next iteration, freeing its place."""
        self.cancelled.set()


@dataclass
class SchedulerStats:
    steps: int = 0  # decode steps of the running batch
    prefill_chunks: int = 0
    max_running: int = 0  # the largest batch a decode step ran
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0  # refused with QueueFull


class Scheduler:
    """``submit`` requests from any thread; ``start``/``stop`` the loop that serves them."""

    def __init__(self, lm: LanguageModel, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 256):
        s = lm.session
        if s.shares_buffer or s.padding_side != "left" or s.cuda_graph:
            raise OnnxpipeError(f"{s.model_dir.path}: the server's scheduler runs the concat-cache, left-padded form "
                                "of a graph (export, or optimize --target cpu); this one shares a preallocated KV "
                                "buffer (optimize --target cuda)")
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise OnnxpipeError(f"{name} must be a positive integer, got {value!r}")
        self.lm = lm
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._prefill: Request | None = None
        self._running: list[Request] = []  # row i of the batch cache
        self._values: list[np.ndarray] = []  # the batch cache as numpy between membership changes, else OrtValues
        self._length = 0  # the batch cache's length (positions, padding included)
        self._counts = np.zeros(0, np.int64)  # positions each row holds
        self._tokens = np.zeros(0, np.int64)  # each row's last token, not yet in the cache
        self._ids = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- from the server ----
    def submit(self, row: RowState, emit: Callable[[Event], None]) -> Request:
        """Queue a prepared request (``LanguageModel.prepare``); raises QueueFull when ``max_queue`` wait already."""
        with self._cond:
            if self._stop:
                raise OnnxpipeError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            req = Request(row, emit, next(self._ids))
            self._waiting.append(req)
            self._cond.notify()
        return req

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._running), "prefilling": int(self._prefill is not None),
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
        while True:
            with self._cond:
                while not (self._stop or self._waiting or self._prefill or self._running):
                    self._cond.wait()
                if self._stop:
                    break
                group = self._admit()
            try:
                self._drop_cancelled()
                if len(group) > 1:
                    self._prefill_group(group)
                elif self._prefill is not None:
                    self._prefill_chunk(self._prefill)
                if self._running:
                    self._decode_step()
            except Exception as e:  # a fault outside one request's own work: fail those in flight, keep serving
                self._fail_in_flight(e)
        with self._cond:
            left = list(self._waiting) + ([self._prefill] if self._prefill else []) + self._running
            self._waiting.clear()
        for req in left:
            self._send(req, ("error", "the server is shutting down"))

    def _admit(self) -> list[Request]:
        """Under the lock: the waiting requests that start now. Short prompts start together, as many as fit one
        prefill of ``prefill_chunk`` padded tokens (returned, prefilled in one call); otherwise the oldest one starts
        its chunked prefill (``_prefill``)."""
        if self._prefill is not None or not self._waiting or len(self._running) >= self.max_batch:
            return []
        group = [self._waiting.popleft()]
        width = len(group[0].row.prompt)
        while self._waiting and len(self._running) + len(group) < self.max_batch:
            wider = max(width, len(self._waiting[0].row.prompt))
            if wider * (len(group) + 1) > self.prefill_chunk:
                break
            group.append(self._waiting.popleft())
            width = wider
        if len(group) == 1:
            self._prefill = group[0]
        return group

    def _fail_in_flight(self, e: BaseException) -> None:
        in_flight = ([self._prefill] if self._prefill is not None else []) + self._running
        self._prefill, self._running = None, []
        self._values, self._length = [], 0
        self._counts, self._tokens = np.zeros(0, np.int64), np.zeros(0, np.int64)
        for req in in_flight:
            self._fail(req, e)

    def _drop_cancelled(self) -> None:
        if self._prefill is not None and self._prefill.cancelled.is_set():
            self.stats.cancelled += 1
            self._prefill = None
        with self._cond:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            for r in gone:
                self._waiting.remove(r)
            self.stats.cancelled += len(gone)
        keep = [i for i, r in enumerate(self._running) if not r.cancelled.is_set()]
        if len(keep) < len(self._running):
            self.stats.cancelled += len(self._running) - len(keep)
            self._keep_rows(keep)

    def _prefill_chunk(self, req: Request) -> None:
        s, row = self.lm.session, req.row
        try:
            if req.cache is None:
                req.cache = s.new_cache(1)
            start = req.prefilled
            end = min(start + self.prefill_chunk, len(row.prompt))
            last = end == len(row.prompt)
            ids = np.asarray(row.prompt[start:end], np.int64)[None, :]
            mask = np.ones((1, end), np.int64)
            positions = np.arange(start, end, dtype=np.int64)[None, :]
            out = s.forward(ids, mask, positions, req.cache, want=self._want([req]) if last else "argmax")
            req.prefilled = end
            self.stats.prefill_chunks += 1
            if not last:
                return
            self._prefill = None
            self._take(req, self._choose(req, out, 0))
        except Exception as e:  # this request alone fails; the batch goes on
            self._prefill = None
            self._fail(req, e)
            return
        if not row.done:
            try:  # builds the new cache before it changes any state
                self._join([req], [v.numpy() for v in req.cache.values], [req.cache.length])
            except Exception as e:
                self._fail(req, e)
            req.cache = None

    def _prefill_group(self, group: list[Request]) -> None:
        """Short prompts prefilled together, left-padded (each row's result is its own, as in generate's batches),
        then joined to the batch in one copy."""
        s = self.lm.session
        lengths = np.array([len(r.row.prompt) for r in group], np.int64)
        width = int(lengths.max())
        try:
            pad = int(self.lm.manifest.tokenizer.get("pad_token_id") or 0)
            ids = np.full((len(group), width), pad, np.int64)
            mask = np.zeros((len(group), width), np.int64)
            for i, r in enumerate(group):
                ids[i, width - lengths[i]:] = r.row.prompt
                mask[i, width - lengths[i]:] = 1
            positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)
            cache = s.new_cache(len(group))
            out = s.forward(ids, mask, positions, cache, want=self._want(group))
            self.stats.prefill_chunks += 1
        except Exception as e:  # these requests fail; the batch goes on
            for r in group:
                self._fail(r, e)
            return
        joining = []
        for i, r in enumerate(group):
            try:
                self._take(r, self._choose(r, out, i))
            except Exception as e:
                self._fail(r, e)
                continue
            if not r.row.done and not r.cancelled.is_set():
                joining.append(i)
        if not joining:
            return
        try:
            self._join([group[i] for i in joining], [v.numpy()[joining] for v in cache.values], lengths[joining])
        except Exception as e:
            for i in joining:
                self._fail(group[i], e)

    def _decode_step(self) -> None:
        s, n = self.lm.session, len(self._running)
        length = self._length + 1
        mask = (np.arange(length)[None, :] >= (length - 1 - self._counts)[:, None]).astype(np.int64)
        cache = KVCache(self._ort_values(), self._length, None, n)
        try:
            out = s.forward(self._tokens[:, None], mask, self._counts[:, None].copy(), cache, want=self._want(self._running))
        except Exception as e:  # the whole step failed: its requests fail, the loop serves the next ones
            prefill, self._prefill = self._prefill, None
            self._fail_in_flight(e)
            self._prefill = prefill  # a request still being prefilled has a cache of its own: it goes on
            return
        self._values, self._length = cache.values, cache.length
        self._counts = self._counts + 1
        self.stats.steps += 1
        self.stats.max_running = max(self.stats.max_running, n)
        keep = []
        for i, req in enumerate(self._running):
            try:
                token = self._choose(req, out, i)
                self._tokens[i] = token
                self._take(req, token)
            except Exception as e:  # a row whose sampling or callback fails leaves alone
                self._fail(req, e)
                continue
            if req.cancelled.is_set() and not req.row.done:
                self.stats.cancelled += 1
            elif not req.row.done:
                keep.append(i)
        if len(keep) < n:
            self._keep_rows(keep)

    # ---- rows in and out of the batch cache ----
    def _join(self, reqs: list[Request], values: list[np.ndarray], counts: Any) -> None:
        """Stack new rows (``values``: [new rows, kv_heads, width, head_dim] each, every row right-aligned with
        ``counts`` positions) under the batch's, both right-aligned at one length."""
        longest = int(max(counts))  # a longer row of the block may have finished at its first token
        values = [v[:, :, v.shape[2] - longest:] for v in values]
        ours = [self._numpy(v) for v in self._values] if self._running else [None] * len(values)
        width = max(self._length if self._running else 0, longest)
        stacked = []
        for a, b in zip(ours, values):
            old = a.shape[0] if a is not None else 0
            out = np.zeros((old + b.shape[0], b.shape[1], width, b.shape[3]), b.dtype)
            if a is not None:
                out[:old, :, width - a.shape[2]:] = a
            out[old:, :, width - b.shape[2]:] = b
            stacked.append(out)
        self._values, self._length = stacked, width
        self._running.extend(reqs)
        self._counts = np.append(self._counts, np.asarray(counts, np.int64)).astype(np.int64)
        self._tokens = np.append(self._tokens, [r.row.tokens[-1] for r in reqs]).astype(np.int64)

    def _keep_rows(self, keep: list[int]) -> None:
        """Only rows ``keep`` stay; the columns no kept row reads are cut off the left."""
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._values, self._length = [], 0
            self._counts, self._tokens = np.zeros(0, np.int64), np.zeros(0, np.int64)
            return
        self._counts, self._tokens = self._counts[keep], self._tokens[keep]
        width = int(self._counts.max())
        self._values = [self._numpy(v)[keep][:, :, self._length - width:] for v in self._values]
        self._length = width

    def _numpy(self, value: Any) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy()

    def _ort_values(self) -> list[Any]:
        ort = self.lm.session._ort
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                for v in self._values]

    # ---- tokens and events ----
    def _want(self, reqs: list[Request]) -> str:
        greedy = all(r.row.cfg.greedy and r.row.cfg.repetition_penalty == 1.0 for r in reqs)
        return "argmax" if greedy else "logits"

    def _choose(self, req: Request, out: np.ndarray, i: int) -> int:
        if out.ndim == 1:
            return int(out[i])
        return next_token(out[i], req.row.cfg, req.row.seen(), req.row.rng)

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
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        self._send(req, ("error", text))

    def _send(self, req: Request, event: Event) -> None:
        try:
            req.emit(event)
        except Exception:  # the receiver is gone (its event loop closed): nothing to tell, drop the request
            req.cancel()
