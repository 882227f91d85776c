"""The fixed rows of a shared-buffer batch: which request holds which row, how many positions each row holds, and the
inputs of one decode step of all rows. Pure bookkeeping (numpy only), shared by the CPU and the CUDA-graph runs.

The batch is a KV buffer [rows, kv_heads, capacity, head_dim] that every decode step reads and writes in place. The
graph of ``optimize --target cuda`` reads the attention mask only for its row sums (and its width): row r's new token
is written at position ``sum(mask[r]) - 1`` and attends to the positions before it. So each row runs on its own
count of positions, whoever else is in the batch, and the step's shapes never change (what a captured CUDA graph
needs): a request joins by taking a free row, leaves by freeing it.

A row that is not decoding (free, or holding a prompt still being prefilled) still runs through the step: its mask
sum is its place + 1, so the step writes one entry at its place; its output is not read. A free row's place is 0,
which its next prefill writes before anything reads it. A row being prefilled is *parked* (``take(park=...)``): its
place is the larger of its count and its park, which the scheduler sets to the prompt's full length where decode
steps may be fed on the device: such a step writes the row one entry further each time, and from the prompt's
length on it writes only entries the row's own decode steps write before they read them (a step at position p writes
p, then attends to positions up to p), which no chunk of the prompt writes. ``parked_room`` says how many positions
such steps may advance the parked rows within the capacity. Counts do not move in a step but a decoding row's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxpipe.errors import OnnxpipeError

FREE, PREFILLING, DECODING = 0, 1, 2


class SlotTable:
    """``rows`` fixed rows of ``capacity`` positions each."""

    def __init__(self, rows: int, capacity: int, pad_id: int = 0):
        if rows < 1 or capacity < 2:
            raise OnnxpipeError(f"a slot table needs at least 1 row and 2 positions, got {rows} x {capacity}")
        self.rows, self.capacity, self.pad_id = rows, capacity, pad_id
        self.state = np.full(rows, FREE, np.int8)
        self.counts = np.zeros(rows, np.int64)  # positions of the row written (its prompt so far, then its tokens)
        self.tokens = np.full(rows, pad_id, np.int64)  # each decoding row's last token, not yet in the cache
        # where a row being prefilled is parked for decode steps (at least its count); 0 for rows not prefilling
        self.park = np.zeros(rows, np.int64)

    # ---- membership ----
    def free_rows(self) -> int:
        return int((self.state == FREE).sum())

    def take(self, last: bool = False, among: range | None = None, park: int = 0) -> int:
        """The lowest free row (``last``: the highest), now held for a prefill; with ``among``, one of those rows
        while one is free there, else of any; raises when none is free. ``park``: the place its masked decode steps
        write at until it decodes (at least its count; the scheduler passes the prompt's length where steps are fed
        on the device)."""
        if not 0 <= park < self.capacity:
            raise OnnxpipeError(f"a row cannot be parked at position {park} of {self.capacity}")
        free = np.flatnonzero(self.state == FREE)
        if not len(free):
            raise OnnxpipeError("no free row in the batch")
        if among is not None and np.isin(free, among).any():
            free = free[np.isin(free, among)]
        row = int(free[-1] if last else free[0])
        self.state[row], self.counts[row], self.tokens[row], self.park[row] = PREFILLING, 0, self.pad_id, park
        return row

    def place(self, rows: list[int], others: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Move the rows ``rows`` to runs of adjacent rows, so that a group prefill binds each run as one block of the
        buffer: as few runs as the free rows and ``others`` allow (the lowest run that holds all that is left, else
        the longest, lowest first); then each of ``others`` stays where it is, or where the runs took its row goes to
        the lowest row left. All are held for prompts not yet begun (nothing written in them); each keeps its park.
        Returns the new rows of ``rows`` then of ``others``, in their order."""
        moving = list(rows) + list(others)
        if len(set(moving)) != len(moving):
            raise OnnxpipeError(f"rows to move are listed twice: {moving}")
        for row in moving:
            self._held(row, PREFILLING)
            if self.counts[row]:
                raise OnnxpipeError(f"row {row} holds {self.counts[row]} positions: only rows not begun move")
        parks = self.park[moving].copy()
        self.state[moving], self.park[moving] = FREE, 0
        placed: list[int] = []
        while len(placed) < len(rows):
            left = len(rows) - len(placed)
            free = np.flatnonzero(self.state == FREE)
            breaks = np.flatnonzero(np.r_[True, np.diff(free) > 1])
            sizes = np.diff(np.r_[breaks, len(free)])
            fits = np.flatnonzero(sizes >= left)
            pick = int(fits[0]) if len(fits) else int(np.argmax(sizes))  # argmax: the lowest of the longest
            first = int(free[breaks[pick]])
            run = list(range(first, first + min(int(sizes[pick]), left)))
            self.state[run] = PREFILLING
            placed += run
        stay = [row for row in others if self.state[row] == FREE]  # a prompt read in chunks keeps the highest row
        self.state[stay] = PREFILLING
        for row in others:
            if row not in stay:
                row = int(np.flatnonzero(self.state == FREE)[0])
                self.state[row] = PREFILLING
            placed.append(row)
        self.counts[placed], self.tokens[placed], self.park[placed] = 0, self.pad_id, parks
        return placed

    def prefilled(self, row: int, count: int) -> None:
        """Row ``row`` now holds the first ``count`` positions of its prompt."""
        self._held(row, PREFILLING)
        if not 0 < count < self.capacity:
            raise OnnxpipeError(f"row {row}: {count} positions do not fit its {self.capacity}")
        self.counts[row] = count

    def start_decoding(self, row: int, token: int) -> None:
        """The row's prompt is read and ``token`` is its first new token: it decodes from the next step."""
        self._held(row, PREFILLING)
        self.state[row], self.tokens[row], self.park[row] = DECODING, token, 0

    def release(self, row: int) -> None:
        if not 0 <= row < self.rows or self.state[row] == FREE:
            raise OnnxpipeError(f"row {row} is not held")
        self.state[row], self.counts[row], self.tokens[row], self.park[row] = FREE, 0, self.pad_id, 0

    def release_all(self) -> None:
        self.state[:] = FREE
        self.counts[:] = 0
        self.tokens[:] = self.pad_id
        self.park[:] = 0

    def decoding(self) -> np.ndarray:
        return np.flatnonzero(self.state == DECODING)

    # ---- one step ----
    def chunk(self, prompt_length: int, start: int, budget: int) -> tuple[int, int]:
        """The next prefill chunk of a prompt whose first ``start`` tokens are in its row: [start, end)."""
        if budget < 1 or not 0 <= start < prompt_length:
            raise OnnxpipeError(f"no chunk to prefill from {start} of {prompt_length} with a budget of {budget}")
        return start, min(start + budget, prompt_length)

    def step_inputs(self, rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids [rows, 1], attention_mask [rows, width], position_ids [rows, 1]) of a decode step of the first
        ``rows`` rows (default: every row). Row r's mask holds place[r] + 1 ones from the left, its place its count
        (a parked row's: the larger of its count and its park); ``width`` is the longest row's (a captured graph
        widens it to the capacity; only the row sums are read)."""
        rows = self.rows if rows is None else rows
        if not 1 <= rows <= self.rows:
            raise OnnxpipeError(f"a step runs 1 to {self.rows} rows, not {rows}")
        ids, places = self._next(slice(0, rows))
        if (places + 1 > self.capacity).any():
            raise OnnxpipeError(f"a row is full ({self.capacity} positions)")
        ids = ids[:, None].astype(np.int64)
        sums = places + 1
        mask = (np.arange(int(sums.max()))[None, :] < sums[:, None]).astype(np.int64)
        return ids, mask, places[:, None]

    def row_inputs(self, rows: Sequence[int]) -> tuple[list[int], list[int]]:
        """(token, place) of each of ``rows`` for the next decode step, as ``step_inputs`` gives them: a decoding
        row's last token at its count, a row being prefilled a pad at the larger of its count and its park, a free
        row a pad at 0."""
        ids, places = self._next(list(rows))
        return [int(t) for t in ids], [int(p) for p in places]

    def _next(self, rows: slice | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Each row's next token (a pad but for decoding rows) and place (the larger of its count and its park; the
        park is 0 but for rows being prefilled)."""
        places = np.maximum(self.counts[rows], self.park[rows])
        return np.where(self.state[rows] == DECODING, self.tokens[rows], self.pad_id), places

    def parked_room(self) -> int:
        """After a host-fed step (``step_inputs``): how many decode steps fed on the device may follow before one of
        the rows being prefilled would be written past its last position (each such step writes those rows one entry
        further); the capacity where none is being prefilled."""
        held = self.state == PREFILLING
        if not held.any():
            return self.capacity
        return int(self.capacity - 1 - np.maximum(self.counts, self.park)[held].max())

    def step_rows(self) -> int:
        """The rows a decode step needs to run: up to the last decoding one (at least one)."""
        decoding = self.decoding()
        return int(decoding[-1]) + 1 if len(decoding) else 1

    def stepped(self, rows: Sequence[int] | np.ndarray = (), tokens: Sequence[int] | np.ndarray = ()) -> None:
        """After a decode step: each decoding row holds one more position; ``tokens[i]`` is the next token of row
        ``rows[i]`` (a decoding row). Whole arrays, no Python per row: this is on the serving loop's serial path."""
        rows, tokens = np.asarray(rows, np.int64), np.asarray(tokens, np.int64)
        if rows.shape != tokens.shape or rows.ndim != 1:
            raise OnnxpipeError(f"{len(rows)} rows and {len(tokens)} tokens: one token per row")
        decoding = self.state == DECODING
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows or np.count_nonzero(decoding[rows]) != len(rows)):
            for row in rows.tolist():
                self._held(row, DECODING)  # raises, naming the first row that is not decoding
        self.counts += decoding
        self.tokens[rows] = tokens

    def _held(self, row: int, state: int) -> None:
        if not 0 <= row < self.rows or self.state[row] != state:
            raise OnnxpipeError(f"row {row} is not {('free', 'prefilling', 'decoding')[state]}")
