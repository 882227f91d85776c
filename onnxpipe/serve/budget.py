"""How many prompt tokens one iteration of the serving loop prefills: the token budget of DeepSpeed-FastGen's
SplitFuse, here between a prefill and the decode step that follows it.

An iteration reads at most the budget's tokens of the admitted prompts (several prompts share it, in order), then
runs one decode step of the running batch, so a running stream's next token waits for that chunk and its own step.
A fixed budget (``--prefill-chunk N``) is the same on every machine; ``auto`` sizes it from what this machine
measures, so that an iteration that prefills takes at most ``MIXED_STEP_RATIO`` times a decode step.

A prefill run of n tokens costs about a + b n: a fixed cost a (on a CPU one pass over the weights, about a decode
step of a small batch; on a GPU the launches of a run outside the CUDA graph, more than a captured decode step) and
b per token, which grows with the chunk's place in the prompt (attention over what is before it). The target is
``(MIXED_STEP_RATIO - 1)`` decode steps; the chunk's own share of it, b n, is the target less a, and at least
``MIN_SHARE`` of the target (where a alone passes the target, smaller chunks no longer shorten the iteration, they
only make the prompt wait longer):

    tokens = max(target - a, MIN_SHARE * target) / b

at least ``MIN_CHUNK`` (a prompt always moves on) and at most ``MAX_CHUNK``. The decode step's seconds are a moving
average; a and b are measured on the chunks read while streams decode: the first two (``MIN_CHUNK``, then
``PROBE_CHUNK`` tokens) give a (held from then on) and b, and each later chunk updates b's moving average with its
(seconds - a) / tokens. An error in a moves the chunks' cost by as much only where a passes the target less
``MIN_SHARE`` of it; below that the chunk's cost settles at the target whatever a was taken to be (b absorbs it).
While nothing decodes no stream waits: the budget is ``MAX_CHUNK``.

Short prompts are not split: with ``auto`` a prompt of at most ``WHOLE_PROMPT`` tokens, not yet begun, is read in one
piece, ahead of the long ones, ``SHORT_TOKENS`` tokens of such prompts an iteration at most (at least one prompt);
their tokens count against the budget. Most requests come with one, and reading each in several runs would pay a
run's fixed cost several times and leave its row idle meanwhile: on the 2-core CPU, 32 clients with 64-token prompts
got 42% of the offline batch's tokens/s with their prompts split to the budget, 118% with a fixed budget of 256
(SmolLM2-135M). The measured budget bounds what a long prompt adds to every iteration while it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxpipe.errors import OnnxpipeError

AUTO = "auto"
MIXED_STEP_RATIO = 1.5  # an iteration that prefills, against a decode step alone (the target is under 2x at p99)
MIN_SHARE = 0.25  # of the target, the least a chunk's tokens may take (beyond a run's fixed cost)
MIN_CHUNK = 8
PROBE_CHUNK = 4 * MIN_CHUNK  # the second chunk read while streams decode: with the first, a run's fixed cost
MAX_CHUNK = 512
WHOLE_PROMPT = 128  # auto reads a prompt of at most this many tokens in one piece,
SHORT_TOKENS = 256  # and at most this many tokens of such prompts an iteration (at least one prompt)
STEP_SMOOTHING = 0.25  # weight of the newest decode step in its moving average
TOKEN_SMOOTHING = 0.5  # weight of the newest chunk's seconds per token


def _average(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


@dataclass
class PrefillBudget:
    """``chunk``: a fixed budget of tokens, or None for ``auto``."""

    chunk: int | None = None
    step_s: float | None = None  # a decode step's seconds (moving average)
    fixed_s: float | None = None  # a prefill run's fixed seconds (from the first two chunks read while streams decode)
    token_s: float | None = None  # a prefill's seconds per token beyond its fixed cost (moving average)
    first: tuple[int, float] | None = None  # (tokens, seconds) of the first chunk read while streams decoded

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

    def tokens(self, decoding: bool) -> int:
        """This iteration's budget; ``decoding``: whether a decode step of running streams follows it."""
        if self.chunk is not None:
            return self.chunk
        if not decoding:
            return MAX_CHUNK
        if self.first is None or self.step_s is None:
            return MIN_CHUNK
        if self.fixed_s is None or self.token_s is None:
            return PROBE_CHUNK
        target = (MIXED_STEP_RATIO - 1) * self.step_s
        n = max(target - self.fixed_s, MIN_SHARE * target) / max(self.token_s, 1e-9)
        return int(min(MAX_CHUNK, max(MIN_CHUNK, n)))

    def stepped(self, seconds: float) -> None:
        """A decode step of the running batch took ``seconds``."""
        self.step_s = _average(self.step_s, seconds, STEP_SMOOTHING)

    def prefilled(self, tokens: int, seconds: float, decoding: bool) -> None:
        """An iteration read ``tokens`` prompt tokens in ``seconds`` (its prefill runs, first tokens, joins)."""
        if tokens <= 0 or not decoding or self.chunk is not None:
            return
        if self.first is None:
            self.first = (tokens, seconds)
            return
        if self.fixed_s is None:
            n, t = self.first
            if tokens == n:  # the same size again says nothing about the fixed cost: wait for another
                self.first = (tokens, seconds)
                return
            per_token = max((seconds - t) / (tokens - n), 0.0)
            self.fixed_s = min(max(t - per_token * n, 0.0), t, seconds)
        self.token_s = _average(self.token_s, max(seconds - self.fixed_s, 0.0) / tokens, TOKEN_SMOOTHING)
