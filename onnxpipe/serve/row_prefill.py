"""A prompt written straight into rows of the slot layout's shared KV buffer, by address, outside any CUDA graph.

A row of the buffer [rows, kv_heads, capacity, head_dim] is [1, kv_heads, capacity, head_dim] and contiguous, and so
are k adjacent rows: a run binds past and present to the same address (the graph writes its new entries in place),
and nothing is copied. ``run`` reads one chunk of one prompt into its row; ``run_group`` reads whole prompts of
several adjacent rows in one run of [k, width] (``slots.SlotScheduler``'s ``prefill_group``): on a GPU, where a run
outside the CUDA graph costs its kernel launches whatever its length, k prompts cost about one run instead of k.

``run_chunk`` (with CUDA graphs, ``chunk_graphs`` on) reads a chunk of a long prompt in a fixed shape instead: the
chunk right-padded to a width of ``cuda_graphs.CHUNK_WIDTHS`` and the mask at the row's full capacity
(``chunk_inputs``), replayed through a graph captured per (row, width) (``CudaGraphs.run_chunk``), launch-free, in the
rows ``graph_rows`` only; where no graph can run it (another row, a width without one, past the bound, another
thread, an earlier failure), the same inputs run uncaptured, and the reason is counted (``skipped``), so a chunk's
keys, values and logits do not depend on whether it was captured and a run says why its chunks were not. The padding's keys and values land just
past the chunk's real tokens, which come before it and attend only to each other (causal): the row's next chunk or
decode step writes those positions before anything reads them (as ``run_group``'s padding).

Only a prompt's last run needs its logits (its first token): ``run`` and ``run_chunk`` with ``logits=False`` read
nothing back to the host (``None``), an intermediate chunk's run then costs its device time only.

With ``ONNXPIPE_PREFILL_PAD=N`` (opt-in: on an H100 it removed each shape's first-run cost but raised no served
share, run 55 in docs/serve.md) a run from a row's first position (``run`` at position 0, ``run_group``) is
right-padded to a multiple of N tokens, in the same way: the first run of each new input shape costs the CUDA EP
~10 ms more than the same run again (run 52), so these runs then meet a bounded set of shapes, and ``warm_shapes``
runs the likely ones once while the rows are empty (at a server's start on a GPU) instead of on the first prompts of
each length.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np

from onnxpipe.errors import OnnxpipeError, first_line
from onnxpipe.runtime.cuda_graphs import CHUNK_WIDTHS
from onnxpipe.runtime.generate import LanguageModel
from onnxpipe.runtime.last_position import LAST_INDEX

# ``warm_shapes`` runs each padded width up to WARM_WIDTH tokens once at start, in runs of at most WARM_TOKENS (a
# larger group at a width is left to its first prompts: with 64 prompts a group, ~360 runs instead of 1,000+)
WARM_WIDTH = 512
WARM_TOKENS = 4096


def pad_to() -> int:
    """The multiple a run from position 0 is padded to (``RowPrefill.padded``): ``ONNXPIPE_PREFILL_PAD``, an integer
    from 1 to 512 (32 is the candidate for a GPU), else 1: widths as they are."""
    text = os.environ.get("ONNXPIPE_PREFILL_PAD", "").strip()
    if not text:
        return 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 512:
        raise OnnxpipeError(f"ONNXPIPE_PREFILL_PAD must be an integer from 1 to 512, got {text!r}")
    return value


def chunk_width(tokens: int, start: int, capacity: int) -> int:
    """The width a chunk of ``tokens`` from position ``start`` runs at: the smallest of CHUNK_WIDTHS that holds it
    and fits the row (narrower than its capacity, so the mask stays wider than the chunk), else ``tokens`` itself."""
    return next((w for w in CHUNK_WIDTHS if tokens <= w < capacity and start + w <= capacity), tokens)


def chunk_inputs(ids: list[int], start: int, width: int, capacity: int,
                 pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids [1, width]: ``ids`` right-padded with ``pad_id``, attention_mask [1, capacity]: ones over the
    ``start + width`` positions the row holds after the run, position_ids [1, width]: ``start``..., the last index
    [1]: the chunk's last real token) of a chunk at a fixed width. The mask is read for its row sum and width only."""
    n = len(ids)
    if not 1 <= n <= width or start < 0 or start + width > capacity:
        raise OnnxpipeError(f"a chunk of {n} tokens from position {start} does not fit a width of {width} in a row of "
                            f"{capacity}")
    padded = np.full((1, width), pad_id, np.int64)
    padded[0, :n] = ids
    mask = (np.arange(capacity) < start + width).astype(np.int64)[None, :]
    positions = np.arange(start, start + width, dtype=np.int64)[None, :]
    return padded, mask, positions, np.array([n - 1], np.int64)


class RowPrefill:
    """Prefill chunks of one prompt into one row of a shared KV buffer, by address, outside any CUDA graph."""

    def __init__(self, lm: LanguageModel, values: list[Any]):
        s = self.session = lm.session
        import onnxruntime as ort

        self._ort = ort
        self.device = "cpu" if s.device == "cpu" else "cuda"
        rows, heads, capacity, head_dim = (int(d) for d in values[0].shape())
        if (heads, head_dim) != (s.num_kv_heads, s.head_dim) or any(v.shape() != values[0].shape() for v in values):
            raise OnnxpipeError(f"the KV buffers {values[0].shape()} are not [rows, {s.num_kv_heads}, capacity, "
                                f"{s.head_dim}] each")
        self.values, self.capacity = values, capacity
        self.pad_to = pad_to()  # runs from position 0 padded to a multiple of it (``padded``)
        self.row_shape = [1, heads, capacity, head_dim]
        self.row_bytes = heads * capacity * head_dim * s.kv_dtype.itemsize
        self.run_options = None
        # long prompts' chunks at fixed widths through captured graphs (``run_chunk``); the scheduler turns it on
        self.chunk_graphs = False
        self.graph_error = ""  # why a captured chunk failed (chunks then run uncaptured, at the same widths)
        # the rows whose chunks may run through graphs (None: any row); elsewhere chunks run uncaptured ("row")
        self.graph_rows: frozenset[int] | None = None
        # chunks (with chunk_graphs on) that ran uncaptured, by why: "row", "failed" (after graph_error) or a key of
        # cuda_graphs.CHUNK_SKIPS; the warm-up's by "warm <why>"
        self.skipped: Counter[str] = Counter()
        if s.cuda_graph:  # a session with CUDA graphs on: this run is not one of them
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", "-1")

    def run(self, row: int, ids: list[int], start: int, logits: bool = True,
            want: str = "logits", pad_id: int = 0) -> np.ndarray | None:
        """Write prompt tokens ``ids`` at positions ``start``... of ``row``; returns the logits of the last one
        [1, vocab] (float32), with ``want="argmax"`` just its argmax [1], or with ``logits=False`` None (nothing
        read back). From position 0 the run is right-padded with ``pad_id`` to ``padded(len(ids))``."""
        if start + len(ids) > self.capacity:
            raise OnnxpipeError(f"{start + len(ids)} positions do not fit a row of {self.capacity}")
        width = self.padded(len(ids)) if start == 0 else len(ids)  # from position 0: right-padded, as run_group
        padded = np.full((1, width), pad_id, np.int64)
        padded[0, :len(ids)] = ids
        return self._run(row, padded, np.ones((1, start + width), np.int64),
                         np.arange(start, start + width, dtype=np.int64)[None, :], np.array([len(ids) - 1]),
                         f"a prefill into row {row} ({len(ids)} tokens from position {start})", logits, want)

    def padded(self, width: int) -> int:
        """``width`` rounded up to a multiple of ``pad_to`` where the row holds that, else ``width``."""
        rounded = -(-width // self.pad_to) * self.pad_to
        return rounded if rounded <= self.capacity else width

    def run_chunk(self, row: int, ids: list[int], start: int, pad_id: int = 0,
                  logits: bool = True) -> tuple[np.ndarray | None, str]:
        """A chunk of a long prompt, as ``run``: (the logits of its last token [1, vocab] float32, or None with
        ``logits=False``, how it ran: "replayed" or "captured" (through the graph of (row, width); "captured": this
        run captured it, several runs in one) or "uncaptured"). With ``chunk_graphs`` on, at a fixed width
        (``chunk_width``, ``chunk_inputs``), through a captured graph where one can run it, else the same inputs
        uncaptured; off: ``run``."""
        if not self.chunk_graphs:
            return self.run(row, ids, start, logits), "uncaptured"
        width = chunk_width(len(ids), start, self.capacity)
        inputs = chunk_inputs(ids, start, width, self.capacity, pad_id)
        out: tuple[np.ndarray | None, bool] | str = "failed"
        if self.graph_rows is not None and row not in self.graph_rows:
            out = "row"
        elif not self.graph_error:
            try:
                out = self.session.graphs.run_chunk(self.values, row, *inputs, logits=logits)
            except OnnxpipeError as e:  # kept; this chunk and the next run uncaptured (a run writes the same entries)
                self.graph_error = str(e)[:300]
        if not isinstance(out, str):
            return out[0], "captured" if out[1] else "replayed"
        self.skipped[out] += 1
        return self._run(row, *inputs, f"a prefill chunk into row {row} ({len(ids)} tokens padded to {width} from "
                                        f"position {start})", logits), "uncaptured"

    def warm_shapes(self, most: int, pad_id: int = 0, widest: int = WARM_WIDTH, tokens: int = WARM_TOKENS) -> int:
        """Every shape a whole prompt's run takes up to ``widest`` tokens, run once ahead: 1 to ``most`` prompts
        (a group's size) at each multiple of ``pad_to``, at most ``tokens`` in a run, into rows 0, 1... from position
        0, each shape's argmax and its first width's logits too (the head's pick is shaped by the rows). Only while
        those rows are empty: the runs write their first positions, which a prompt writes before anything reads
        them. Returns the runs made; none where widths are not padded (``pad_to`` 1: the shapes would be every
        length)."""
        if self.pad_to <= 1:
            return 0
        runs = 0
        for width in range(self.pad_to, min(widest, self.capacity) + 1, self.pad_to):
            for k in range(1, min(most, tokens // width) + 1):
                for want in ("argmax", "logits") if width == self.pad_to else ("argmax",):
                    self.run_group(0, [[pad_id] * width] * k, pad_id, want=want)
                    runs += 1
        return runs

    def warm(self, rows: list[int], pad_id: int = 0) -> int:
        """Capture the chunk graphs of ``rows`` at every width that fits, ahead, on harmless inputs (pad tokens from
        position 0): each graph's first run on a thread captures it by running it several times in one call, a
        stall of several chunks that would otherwise fall on the first long prompt read beside running streams.
        Only while ``rows`` are empty: the runs write their first positions, which a prompt writes before anything
        reads them. Returns the graphs captured (stops where a graph cannot run: why, in ``skipped`` as "warm <why>",
        or at a failure: ``graph_error``)."""
        graphs = self.session.graphs
        captured = 0
        for row in rows:
            for width in (w for w in CHUNK_WIDTHS if w < self.capacity):
                try:
                    out = graphs.run_chunk(self.values, row, *chunk_inputs([pad_id] * width, 0, width, self.capacity,
                                                                           pad_id), logits=False)
                except OnnxpipeError as e:
                    self.graph_error = str(e)[:300]
                    return captured
                if isinstance(out, str):
                    self.skipped[f"warm {out}"] += 1
                    return captured
                captured += out[1]
        return captured

    def run_group(self, first: int, prompts: list[list[int]], pad_id: int = 0, want: str = "logits") -> np.ndarray:
        """Whole prompts into the adjacent rows ``first``, ``first + 1``... in one run of [k, width] (width: the
        longest prompt); returns each row's logits of its last prompt token [k, vocab] (float32), or with
        ``want="argmax"`` just their argmax [k] (the greedy rows' first tokens: nothing else read back).

        Shorter prompts are right-padded, and the padding runs as tokens of the row: every row's mask sums to
        ``width``, so the graph reads the k rows as k prompts of one length from position 0 (onnxruntime's
        GroupQueryAttention's first-prompt case, the one a solo prompt takes), and a row's real tokens, which come
        before its padding, attend only to each other (causal): their keys, values and logits are computed as in a
        run of the row alone. The padding's keys and values land just past the row's prompt, where the row's next
        writes go before anything reads them (as a masked decode step's write does)."""
        k = len(prompts)
        if not prompts or min(len(p) for p in prompts) < 1 or first < 0 or first + k > int(self.values[0].shape()[0]):
            raise OnnxpipeError(f"a group prefill needs 1 or more non-empty prompts in rows of the buffer, got {k} "
                                f"from row {first}")
        width = max(len(p) for p in prompts)
        if width > self.capacity:
            raise OnnxpipeError(f"{width} positions do not fit a row of {self.capacity}")
        width = self.padded(width)
        ids = np.full((k, width), pad_id, np.int64)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        last = np.array([len(p) - 1 for p in prompts], np.int64)
        out = self._run(first, ids, np.ones((k, width), np.int64), np.tile(np.arange(width, dtype=np.int64), (k, 1)),
                        last, f"a prefill of {k} prompts into rows {first}-{first + k - 1} ({width} tokens each)",
                        want=want)
        assert out is not None
        return out

    def _run(self, row: int, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, last: np.ndarray,
             what: str, logits: bool = True, want: str = "logits") -> np.ndarray | None:
        """One run of ``ids`` [k, n] into rows ``row``... (contiguous in each buffer, bound by address): each row's
        logits at its position ``last[i]`` of the run [k, vocab] (float32), with ``want="argmax"`` their argmax [k],
        or with ``logits=False`` None: the logits stay where the run wrote them (the device), unread. The position is
        picked, cast and (argmax) reduced by the session's head graph where the run wrote the logits
        (``DecoderSession._select``), as the session's own steps do: on the host, casting [32, vocab] float16 logits
        to float32 took 7.7 ms on the H100's host, more than a third of a 32-prompt group run (docs/serve.md, run
        41)."""
        s, k = self.session, ids.shape[0]
        io = s.session.io_binding()
        # first, so get_outputs()[0]; [k, 1, vocab] with the last-position head; on the device, as the session's
        # own runs bind it, read back below
        io.bind_output(s.logits_name, self.device, 0)
        self._input(io, "input_ids", ids)
        self._input(io, "attention_mask", mask)
        if s.has_position_ids:
            self._input(io, "position_ids", positions)
        if s.last_position:
            self._input(io, LAST_INDEX, last.astype(np.int64))
        shape = [k] + self.row_shape[1:]
        for past, present, value in zip(s.past_names, s.present_names, self.values):
            at = value.data_ptr() + row * self.row_bytes
            io.bind_input(past, self.device, 0, s.kv_dtype, shape, at)
            io.bind_output(present, self.device, 0, s.kv_dtype, shape, at)  # written in place
        try:
            s.session.run_with_iobinding(io, self.run_options)
        except Exception as e:
            text = first_line(e)
            raise OnnxpipeError(f"{s.model_dir.path}: onnxruntime failed on {what}: {text}") from None
        if not logits:
            return None
        at = np.zeros(k, np.int64) if s.last_position else last
        return s._select(io.get_outputs()[0], at, want)

    def _input(self, io: Any, name: str, array: np.ndarray) -> None:
        if self.device == "cpu":
            io.bind_cpu_input(name, array)
        else:
            io.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(array, self.device, 0))
