"""Iteration-level batching (Orca's scheduling) over one DecoderSession, on a thread of its own.

Requests join and leave the running batch at every decode step. ``make_scheduler`` picks the layout of the running
batch's KV cache from the graph's form: the concat cache of the CPU form (``ConcatScheduler``, here), or the fixed
rows of a shared buffer, the CUDA form and its CUDA-graph slots (``slots.SlotScheduler``). The queue, the thread,
the events and sampling are ``loop.BatchLoop``'s.

The concat layout: each request owns its rows of the KV cache. The running batch is one left-padded cache
[batch, kv_heads, length, head_dim] in which row i holds ``counts[i]`` positions, right-aligned; the attention mask and
the position ids of a step follow from those counts alone, so a row's result does not depend on who else is in the
batch (the padding is masked out, its positions are its own).

One iteration of the loop:

1. admit: when the batch has free places, the oldest waiting requests start. Short prompts start together, as many
   as fit one prefill of the iteration's budget of padded tokens (``budget.PrefillBudget``: ``prefill_chunk``, or
   sized from the measured step and prefill times): they are prefilled in one left-padded call, their first tokens
   sampled, and their rows join the batch in one copy. Otherwise the oldest request starts alone:
2. prefill one chunk (the budget's tokens) of that request's prompt into a cache of its own; after its last
   chunk the first token is sampled and the request's rows join the batch (the caches are padded to one length and
   stacked). A long prompt is thus split across iterations, each followed by a decode step of the running batch, so
   running streams keep getting tokens while it is read (DeepSpeed-FastGen's SplitFuse, interleaved rather than fused
   into one call);
3. one decode step for every running request, each choosing its next token with its own sampling options;
   finished, cancelled (client gone) and failed requests leave the batch, their rows cut out of the cache.

Failures stay with their request: a request whose prefill or sampling fails gets an error and the others go on; a
decode step that fails as a whole (onnxruntime) fails the requests in that batch, and the loop serves the next ones.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.generate import LanguageModel
from onnxpipe.runtime.session import KVCache
from onnxpipe.serve.budget import Allowance
from onnxpipe.serve.loop import BatchLoop, Event, QueueFull, Request, SchedulerStats, TooLong
from onnxpipe.serve.slots import SlotScheduler

__all__ = ["BatchLoop", "ConcatScheduler", "Event", "QueueFull", "Request", "SchedulerStats", "SlotScheduler",
           "TooLong", "make_scheduler"]


def make_scheduler(lm: LanguageModel, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | str = "auto",
                   max_length: int | None = None, prefill_group: int | None = None,
                   chunk_graphs: bool | None = None, chunk_lane: bool | None = None) -> BatchLoop:
    """The scheduler for ``lm``'s graph: fixed rows of its shared KV buffer (CUDA form; ``max_length``: the tokens a
    row holds, prompt and reply; ``prefill_group``: whole prompts read in one run, at most), else the concat layout
    (``max_length`` and ``prefill_group`` must then be None: a row holds the model's context, and short prompts are
    read together by the budget). ``prefill_chunk``: the prompt tokens an iteration reads, or ``auto``
    (``budget.PrefillBudget``)."""
    if lm.session.shares_buffer:
        group = {} if prefill_group is None else {"prefill_group": prefill_group}
        return SlotScheduler(lm, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                             max_length=max_length, chunk_graphs=chunk_graphs, chunk_lane=chunk_lane, **group)
    if chunk_graphs or chunk_lane:
        what = "chunk_lane reads long prompts' chunks inside the decode steps of" if chunk_lane else (
            "chunk_graphs replays long prompts' chunks into")
        raise OnnxpipeError(f"{what} fixed rows of a shared-buffer graph (optimize --target cuda) with CUDA graphs; "
                            "this graph grows its cache (concat)")
    if max_length is not None:
        raise OnnxpipeError("max_length sizes the fixed rows of a shared-buffer graph (optimize --target cuda); this "
                            "graph grows its cache (concat): leave it unset")
    if prefill_group is not None:
        raise OnnxpipeError("prefill_group reads prompts into adjacent fixed rows of a shared-buffer graph (optimize "
                            "--target cuda); this graph grows its cache (concat), whose short prompts are read "
                            "together by the budget: leave it unset")
    return ConcatScheduler(lm, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)


class ConcatScheduler(BatchLoop):
    """The concat layout: one left-padded cache; rows joining or leaving copy it (once per change, not per step)."""

    def __init__(self, lm: LanguageModel, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | str = "auto"):
        s = lm.session
        if s.shares_buffer or s.padding_side != "left" or s.cuda_graph:
            raise OnnxpipeError(f"{s.model_dir.path}: the concat layout runs the concat-cache, left-padded form of a "
                                "graph (export, or optimize --target cpu); this one shares a preallocated KV buffer "
                                "(optimize --target cuda): serve it with the slot layout (make_scheduler)")
        super().__init__(lm, max_batch, max_queue, prefill_chunk)
        self._prefill_req: Request | None = None
        self._group: list[Request] = []
        self._values: list[Any] = []  # the batch cache as numpy between membership changes, else OrtValues
        self._length = 0  # the batch cache's length (positions, padding included)
        self._counts = np.zeros(0, np.int64)  # positions each row holds
        self._tokens = np.zeros(0, np.int64)  # each row's last token, not yet in the cache

    # ---- the loop's steps ----
    def _prefilling(self) -> list[Request]:
        return ([self._prefill_req] if self._prefill_req is not None else []) + self._group

    def _prefill(self, allowance: Allowance) -> int:
        group, self._group = self._group, []
        if len(group) > 1:
            return self._prefill_group(group, allowance)
        if self._prefill_req is not None:
            return self._prefill_chunk(self._prefill_req, allowance)
        return 0

    def _admit(self, budget: int) -> None:
        """Under the lock: the waiting requests that start now. Short prompts start together, as many as fit one
        prefill of ``budget`` padded tokens (``_group``, prefilled in one call); otherwise the oldest one starts its
        chunked prefill (``_prefill_req``)."""
        if self._prefill_req is not None or not self._waiting or len(self._running) >= self.max_batch:
            return
        budget = max(budget, self.budget.whole[1])  # short prompts are read whole (auto)
        group = [self._waiting.popleft()]
        width = len(group[0].row.prompt)
        while self._waiting and len(self._running) + len(group) < self.max_batch:
            wider = max(width, len(self._waiting[0].row.prompt))
            if wider * (len(group) + 1) > budget:
                break
            group.append(self._waiting.popleft())
            width = wider
        if len(group) == 1:
            self._prefill_req = group[0]
        else:
            self._group = group

    def _reset(self) -> None:
        self._prefill_req, self._group, self._running = None, [], []
        self._values, self._length = [], 0
        self._counts, self._tokens = np.zeros(0, np.int64), np.zeros(0, np.int64)

    def _drop_cancelled_in_flight(self) -> None:
        if self._prefill_req is not None and self._prefill_req.cancelled.is_set():
            self.stats.cancelled += 1
            self._prefill_req = None
        keep = [i for i, r in enumerate(self._running) if not r.cancelled.is_set()]
        if len(keep) < len(self._running):
            self.stats.cancelled += len(self._running) - len(keep)
            self._keep_rows(keep)

    def _prefill_chunk(self, req: Request, allowance: Allowance) -> int:
        """One chunk of ``req``'s prompt (the tokens ``allowance`` gives it) into its own cache; returns the tokens
        read."""
        s, row = self.lm.session, req.row
        start = req.prefilled
        if start == 0 and len(row.prompt) <= self.budget.whole[0]:  # a short prompt is read whole (auto)
            budget = len(row.prompt)
        else:
            budget = allowance.next(start, len(row.prompt) - start)
        if budget <= 0:
            return 0
        try:
            began = time.perf_counter()
            if req.cache is None:
                req.cache = s.new_cache(1)
            end = min(start + budget, len(row.prompt))
            last = end == len(row.prompt)
            ids = np.asarray(row.prompt[start:end], np.int64)[None, :]
            mask = np.ones((1, end), np.int64)
            positions = np.arange(start, end, dtype=np.int64)[None, :]
            out = s.forward(ids, mask, positions, req.cache, want=self._want([req]) if last else "argmax")
            allowance.ran(end - start, start, time.perf_counter() - began)
            req.prefilled = end
            self.stats.prefill_chunks += 1
            if not last:
                return end - start
            self._prefill_req = None
            self._take(req, self._choose(req, out, 0))
        except Exception as e:  # this request alone fails; the batch goes on
            self._prefill_req = None
            self._fail(req, e)
            return 0
        if not row.done:
            try:  # builds the new cache before it changes any state
                self._join([req], [v.numpy() for v in req.cache.values], [req.cache.length])
            except Exception as e:
                self._fail(req, e)
            req.cache = None
        return end - start

    def _prefill_group(self, group: list[Request], allowance: Allowance) -> int:
        """Short prompts prefilled together, left-padded (each row's result is its own, as in generate's batches),
        then joined to the batch in one copy; returns the prompt tokens read."""
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
            began = time.perf_counter()
            out = s.forward(ids, mask, positions, cache, want=self._want(group))
            allowance.ran(width, 0, time.perf_counter() - began, rows=len(group))
            self.stats.prefill_chunks += 1
        except Exception as e:  # these requests fail; the batch goes on
            for r in group:
                self._fail(r, e)
            return 0
        joining = []
        for i, r in enumerate(group):
            try:
                self._take(r, self._choose(r, out, i))
            except Exception as e:
                self._fail(r, e)
                continue
            if not r.row.done and not r.cancelled.is_set():
                joining.append(i)
        if joining:
            try:
                self._join([group[i] for i in joining], [v.numpy()[joining] for v in cache.values], lengths[joining])
            except Exception as e:
                for i in joining:
                    self._fail(group[i], e)
        return int(lengths.sum())

    def _decode_step(self) -> None:
        s, n = self.lm.session, len(self._running)
        length = self._length + 1
        mask = (np.arange(length)[None, :] >= (length - 1 - self._counts)[:, None]).astype(np.int64)
        cache = KVCache(self._ort_values(), self._length, None, n)
        try:
            out = s.forward(self._tokens[:, None], mask, self._counts[:, None].copy(), cache, want=self._want(self._running))
        except Exception as e:  # the whole step failed: its requests fail, the loop serves the next ones
            running = self._running  # a request still being prefilled has a cache of its own: it goes on
            self._keep_rows([])
            for req in running:
                self._fail(req, e)
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
