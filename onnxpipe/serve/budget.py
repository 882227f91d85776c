"""How many prompt tokens one iteration of the serving loop prefills: the token budget of DeepSpeed-FastGen's
SplitFuse, here between a prefill and the decode step that follows it.

An iteration reads at most the budget's tokens of the admitted prompts (several prompts share it, in order), then
runs one decode step of the running batch, so a running stream's next token waits for that chunk and its own step.
A fixed budget (``--prefill-chunk N``) is the same on every machine; ``auto`` sizes it from what this machine
measures, so that an iteration that prefills takes at most ``MIXED_STEP_RATIO`` times a decode step:

    tokens = (MIXED_STEP_RATIO - 1) * decode step seconds / prefill seconds per token

both moving averages of the last iterations, at least ``MIN_CHUNK`` (a prompt always moves on) and at most
``MAX_CHUNK``. The seconds per token are measured on the chunks read while streams decode: a prefill run has a
fixed cost (on a CPU one pass over the weights, about a decode step of a small batch) that weighs more in a small
chunk, and a chunk's cost per token grows with its place in the prompt (attention over what is before it). Sizing
the next chunk from the last one's cost per token settles where a chunk's cost is the target (a chunk of n tokens
costing a + b n is followed by one of target n / (a + b n) tokens, which shrinks toward the fixed point while
a + b n is over the target and grows toward it while under), or at ``MIN_CHUNK`` where the fixed cost alone passes
it. The first chunk read while streams decode, before anything is measured, is ``MIN_CHUNK``. While nothing decodes
no stream waits: the budget is ``MAX_CHUNK``.

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
MIN_CHUNK = 8
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
    token_s: float | None = None  # prefill seconds per token, read while streams decode (moving average)

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

    def describe(self) -> str:
        return str(self.chunk) if self.chunk is not None else f"{AUTO} ({MIN_CHUNK}-{MAX_CHUNK})"

    def tokens(self, decoding: bool) -> int:
        """This iteration's budget; ``decoding``: whether a decode step of running streams follows it."""
        if self.chunk is not None:
            return self.chunk
        if not decoding:
            return MAX_CHUNK
        if self.step_s is None or self.token_s is None:
            return MIN_CHUNK
        n = (MIXED_STEP_RATIO - 1) * self.step_s / max(self.token_s, 1e-9)
        return int(min(MAX_CHUNK, max(MIN_CHUNK, n)))

    def stepped(self, seconds: float) -> None:
        """A decode step of the running batch took ``seconds``."""
        self.step_s = _average(self.step_s, seconds, STEP_SMOOTHING)

    def prefilled(self, tokens: int, seconds: float, decoding: bool) -> None:
        """An iteration read ``tokens`` prompt tokens in ``seconds`` (its prefill runs, first tokens, joins)."""
        if tokens > 0 and decoding:
            self.token_s = _average(self.token_s, seconds / tokens, TOKEN_SMOOTHING)
