"""How many prompt tokens one iteration of the serving loop prefills: the token budget of DeepSpeed-FastGen's
SplitFuse, here between the prefill runs and the decode step that follows them.

An iteration reads prompt tokens (several prompts may share it, in order), then runs one decode step of the running
batch, so a running stream's next token waits for those runs and its own step. A fixed budget
(``--prefill-chunk N``) is N tokens an iteration on every machine. ``auto`` bounds the iteration's time instead: its
prefill runs may take ``(MIXED_STEP_RATIO - 1)`` decode steps (the target), so that an iteration that prefills takes
at most ``MIXED_STEP_RATIO`` times a decode step; how many tokens fit follows from the measured cost of a run.

A prefill run of n tokens of a prompt from position p costs about

    a + b n + c n (p + (n - 1) / 2)

a: a run's fixed cost (on a CPU one pass over the weights, about a decode step of a small batch; on a GPU the
launches of a run outside the CUDA graph); b: a token's share of the weights' work; c: a token's attention over one
position before it (the chunk's tokens attend over the p positions before it and over each other). a, b and c are
fitted (least squares, none negative) on the last ``WINDOW`` runs read while streams decode, whole short prompts and
chunks alike, each measured alone: a model per run, not per iteration, so an iteration of several runs (short prompts
read whole, a second long prompt) and the growing cost along a long prompt are both what the model says. Until the
runs measured have two sizes the model cannot tell a from b: the first chunks are then probes (``MIN_CHUNK``, then
``PROBE_CHUNK`` tokens).

Each run of an iteration gets what is left of the target (the runs before it measured as they took): the most tokens
whose predicted cost fits, at least ``MIN_CHUNK`` for the iteration's first run (a prompt always moves on), none for a
later run where fewer than ``MIN_CHUNK`` fit, at most ``MAX_CHUNK``. Where a alone passes the target, the first run's
tokens get ``MIN_SHARE`` of the target beyond a (smaller chunks would not shorten the iteration, only slow the
prompt). The decode step's seconds are a moving average. While nothing decodes no stream waits: ``MAX_CHUNK`` tokens.

With a long prompt's chunks run through captured CUDA graphs (``widths``: the chunk widths graphs are captured for,
``serve/row_prefill.py``), ``auto`` gives a run the largest of those widths that fits (at least the smallest), so the
chunks take the few shapes that have graphs, and the model is fitted on those chunk runs only, not on whole prompts
or group runs (uncaptured, their launches cost several times a replay) nor on a run that captured its graph (several
runs in one call): what it predicts is the captured cost of a chunk.

Short prompts are not split: with ``auto`` a prompt of at most ``WHOLE_PROMPT`` tokens, not yet begun, is read in one
piece, ahead of the long ones, ``SHORT_TOKENS`` tokens of such prompts an iteration at most (at least one prompt);
their time counts against the target. Most requests come with one, and reading each in several runs would pay a
run's fixed cost several times and leave its row idle meanwhile: on the 2-core CPU, 32 clients with 64-token prompts
got 42% of the offline batch's tokens/s with their prompts split to the budget, 118% with a fixed budget of 256
(SmolLM2-135M).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from onnxpipe.errors import OnnxpipeError

AUTO = "auto"
MIXED_STEP_RATIO = 1.5  # an iteration that prefills, against a decode step alone (the target is under 2x at p99)
MIN_SHARE = 0.25  # of the target, the least the first run's tokens may take (beyond a run's fixed cost)
MIN_CHUNK = 8
PROBE_CHUNK = 4 * MIN_CHUNK  # the second size measured: with the first, a run's fixed cost
MAX_CHUNK = 512
WHOLE_PROMPT = 128  # auto reads a prompt of at most this many tokens in one piece,
SHORT_TOKENS = 256  # and at most this many tokens of such prompts an iteration (at least one prompt)
STEP_SMOOTHING = 0.25  # weight of the newest decode step in its moving average
WINDOW = 32  # the prefill runs the cost model is fitted on (the latest)


def _average(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


@dataclass(frozen=True)
class RunCost:
    """A prefill run's seconds: ``fixed + token * n + context * n * (start + (n - 1) / 2)`` for n tokens from
    position ``start`` (of each row, for a run of several rows)."""

    fixed: float
    token: float
    context: float

    def seconds(self, tokens: int, start: int, rows: int = 1) -> float:
        return self.fixed + rows * tokens * (self.token + self.context * (start + (tokens - 1) / 2))

    def tokens(self, seconds: float, start: int) -> int:
        """The most tokens from ``start`` whose run fits ``seconds`` (0 if none; capped at MAX_CHUNK)."""
        room = seconds - self.fixed
        if room <= 0:
            return 0
        # context / 2 n^2 + (token + context (start - 1/2)) n <= room
        lin = self.token + self.context * (start - 0.5)
        if self.context > 0:
            n = (-lin + math.sqrt(lin * lin + 2 * self.context * room)) / self.context
        elif lin > 0:
            n = room / lin
        else:
            return MAX_CHUNK
        return int(min(n, MAX_CHUNK))

    @classmethod
    def fit(cls, runs: list[tuple[int, int, int, float]]) -> RunCost | None:
        """Least squares over (rows, tokens, start, seconds) runs, no coefficient negative; None until the runs have
        two sizes (one size cannot tell the fixed cost from the tokens'). The context term is fitted where the runs
        tell it apart (three different (tokens, context) points), else it is 0."""
        if len({rows * n for rows, n, _, _ in runs}) < 2:
            return None
        x = np.array([[1.0, rows * n, rows * n * (p + (n - 1) / 2)] for rows, n, p, _ in runs])
        y = np.array([t for *_, t in runs])
        keep = [0, 1, 2] if len({(a, b) for _, a, b in x}) >= 3 else [0, 1]
        while True:  # drop the most negative coefficient's column until none is negative
            cols = x[:, keep]
            scale = np.abs(cols).max(axis=0)
            scale[scale == 0] = 1.0
            coef = np.linalg.lstsq(cols / scale, y, rcond=None)[0] / scale
            if (coef >= 0).all() or len(keep) == 1:
                break
            del keep[int(np.argmin(coef))]
        full = [0.0, 0.0, 0.0]
        for k, c in zip(keep, coef):
            full[k] = max(float(c), 0.0)
        return cls(*full)


@dataclass
class PrefillBudget:
    """``chunk``: a fixed budget of tokens, or None for ``auto``."""

    chunk: int | None = None
    step_s: float | None = None  # a decode step's seconds (moving average)
    widths: tuple[int, ...] = ()  # auto's chunks take one of these widths (chunks through captured graphs), if any
    runs: deque[tuple[int, int, int, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    _model: RunCost | None = None
    _fitted: int = -1  # len of runs when the model was fitted (the runs only grow until the window is full)
    _count: int = 0  # runs recorded

    @classmethod
    def parse(cls, value: int | str) -> PrefillBudget:
        """``auto`` or a positive number of tokens (an int, or its digits as text)."""
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return cls(None)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OnnxpipeError(f"prefill_chunk must be a positive integer or {AUTO!r}, got {value!r}")
        return cls(value)

    @property
    def largest(self) -> int:
        """The most tokens one prefill reads (what the memory check sizes a prefill for)."""
        return self.chunk if self.chunk is not None else MAX_CHUNK

    @property
    def whole(self) -> tuple[int, int]:
        """(the longest prompt read in one piece whatever the budget, the most tokens of such prompts an iteration):
        auto's; (0, 0) when fixed."""
        return (WHOLE_PROMPT, SHORT_TOKENS) if self.chunk is None else (0, 0)

    @property
    def model(self) -> RunCost | None:
        """The cost of a run as fitted on the latest runs read while streams decoded (auto), or None. Where the
        latest runs all have one size (chunks that settled), the model fitted before them stands."""
        if self._fitted != self._count:
            self._model, self._fitted = RunCost.fit(list(self.runs)) or self._model, self._count
        return self._model

    @property
    def target_s(self) -> float | None:
        """The seconds an iteration's prefill runs may take (auto, while streams decode)."""
        return None if self.step_s is None else (MIXED_STEP_RATIO - 1) * self.step_s

    def iteration(self, decoding: bool) -> Allowance:
        """This iteration's budget; ``decoding``: whether a decode step of running streams follows it."""
        return Allowance(self, decoding)

    def tokens(self, decoding: bool, start: int = 0) -> int:
        """The tokens an iteration's first run reads from position ``start`` of a prompt."""
        return self.iteration(decoding).next(start, MAX_CHUNK)

    def stepped(self, seconds: float) -> None:
        """A decode step of the running batch took ``seconds``."""
        self.step_s = _average(self.step_s, seconds, STEP_SMOOTHING)

    def ran(self, tokens: int, start: int, seconds: float, rows: int = 1, learn: bool = True) -> None:
        """A prefill run read ``tokens`` prompt tokens of each of ``rows`` rows from position ``start`` in
        ``seconds``, while streams decoded (auto measures these only; ``learn`` False: not this run)."""
        if tokens > 0 and self.chunk is None and learn:
            self.runs.append((rows, tokens, start, seconds))
            self._count += 1


class Allowance:
    """One iteration's budget, spent run by run: tokens (a fixed budget, or ``MAX_CHUNK`` while nothing decodes), or
    seconds (auto while streams decode)."""

    def __init__(self, budget: PrefillBudget, decoding: bool):
        self.budget, self.decoding = budget, decoding
        self.tokens_left: int | None = budget.chunk if budget.chunk is not None else (None if decoding else MAX_CHUNK)
        self.spent_s, self.read, self.runs = 0.0, 0, 0

    def next(self, start: int, left: int) -> int:
        """The tokens the next run reads from position ``start`` of a prompt with ``left`` tokens to read (0: none
        this iteration)."""
        if self.tokens_left is not None:
            return max(min(self.tokens_left, left), 0)
        b, model = self.budget, self.budget.model
        first = self.runs == 0
        if model is None or b.target_s is None:  # the probes, one a iteration: MIN_CHUNK, then PROBE_CHUNK
            sizes = {n for _, n, _, _ in b.runs}
            return min(left, PROBE_CHUNK if MIN_CHUNK in sizes and b.step_s is not None else MIN_CHUNK) if first else 0
        target = b.target_s
        seconds = max(target, model.fixed + MIN_SHARE * target) if first else target - self.spent_s
        n = model.tokens(seconds, start)
        if n < MIN_CHUNK:
            n = MIN_CHUNK if first else 0
        if n and b.widths:  # the largest width that fits (the smallest at least): chunks of the captured shapes
            n = max((w for w in b.widths if w <= n), default=min(b.widths))
        return min(n, left)

    def ran(self, tokens: int, start: int, seconds: float, rows: int = 1, learn: bool = True) -> None:
        """A run of this iteration read ``tokens`` of each of ``rows`` rows from ``start`` in ``seconds`` (``learn``
        False: the cost model does not learn from it)."""
        self.runs += 1
        self.read += rows * tokens
        self.spent_s += seconds
        if self.tokens_left is not None:
            self.tokens_left -= rows * tokens
        if self.decoding:
            self.budget.ran(tokens, start, seconds, rows, learn)
