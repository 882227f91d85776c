"""Choosing the next token from a row of logits, and spotting degenerate repetition. Plain numpy, one row at a time.

The order of the logits processors is Hugging Face's: repetition penalty, then temperature, then top-k, then top-p;
temperature 0 (or ``do_sample=False``) is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.limits import MAX_LENGTH_PENALTY, MAX_REPETITION_PENALTY, check_int, check_real


@dataclass
class SamplingConfig:
    """How to decode. Defaults: greedy, at most 64 new tokens, stop at the model's end-of-sequence ids."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the prompt or output
    seed: int | None = None  # None: a fresh random seed per call
    stop_token_ids: Sequence[int] | None = None  # None: the manifest's eos ids; [] to stop only on length
    stop_strings: Sequence[str] = ()
    max_length: int | None = None  # prompt + generated; None: the model's max positions
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: score = logprob / generated_length ** length_penalty
    repeat_ngram_limit: int | None = None  # stop when an n-gram (n <= repeat_ngram_max) repeats this many times
    repeat_ngram_max: int = 8

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> "SamplingConfig":
        """Every field checked for type and range, NaN and infinities refused (a server passes users' values
        straight in); one OnnxpipeError naming each bad option."""
        problems = []

        def check(fn, *args, **kw) -> None:  # noqa: ANN001
            try:
                fn(*args, **kw)
            except OnnxpipeError as e:
                problems.append(str(e))

        check(check_int, self.max_new_tokens, "max_new_tokens", 1)
        check(check_real, self.temperature, "temperature", 0.0)
        check(check_int, self.top_k, "top_k", 0)
        check(check_real, self.top_p, "top_p", 0.0, 1.0, low_open=True)
        check(check_real, self.repetition_penalty, "repetition_penalty", 1 / MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        check(check_real, self.length_penalty, "length_penalty", -MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY)
        if self.seed is not None:
            check(check_int, self.seed, "seed", 0)
        if self.max_length is not None:
            check(check_int, self.max_length, "max_length", 2)
        check(check_int, self.num_beams, "num_beams", 1)
        if self.repeat_ngram_limit is not None:
            check(check_int, self.repeat_ngram_limit, "repeat_ngram_limit", 2)
        check(check_int, self.repeat_ngram_max, "repeat_ngram_max", 1)
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
                problems.append(f"stop_token_ids must be a list of integers, got {type(self.stop_token_ids).__name__}")
            else:
                for t in self.stop_token_ids:
                    check(check_int, t, "stop_token_ids", 0)
        if isinstance(self.stop_strings, (str, bytes)) or not isinstance(self.stop_strings, Sequence):
            problems.append(f"stop_strings must be a list of strings, got {type(self.stop_strings).__name__}")
        elif any(not isinstance(s, str) for s in self.stop_strings):
            problems.append("stop_strings must be a list of strings")
        elif any(not s for s in self.stop_strings):
            problems.append("stop strings must not be empty")
        if not problems and self.num_beams > 1 and not self.greedy:
            problems.append("beam search is deterministic here: use temperature 0 with num_beams > 1")
        if problems:
            raise OnnxpipeError("; ".join(problems))
        return self


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF's rule: a seen token's logit is divided by ``penalty`` when positive, multiplied when negative."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.astype(np.float64)  # a float32 logit times a large penalty would overflow
    idx = np.unique(seen)
    vals = out[idx]
    out[idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (always at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    cum = np.cumsum(probs)
    keep_sorted = cum - probs < p  # a token is kept if the mass before it is still short of p
    keep_sorted[0] = True
    out = np.full_like(logits, -np.inf)
    out[order[keep_sorted]] = logits[order[keep_sorted]]
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x[np.isfinite(x)]) if np.isfinite(x).any() else 0.0
    e = np.exp(x - m)
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def next_token(logits: np.ndarray, cfg: SamplingConfig, seen: np.ndarray, rng: np.random.Generator | None) -> int:
    """One row of logits [vocab] (float32) -> the next token id."""
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return int(np.argmax(logits))
    best = int(np.argmax(logits))
    # shifted so the largest is 0 before dividing: a tiny temperature then sends the others to -inf, never +inf
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the largest to -inf, as it should
        scaled = (logits.astype(np.float64) - logits[best]) / cfg.temperature
    scaled = filter_top_p(filter_top_k(scaled, cfg.top_k), cfg.top_p)
    probs = softmax(scaled)
    if not np.isfinite(probs).all() or probs.sum() <= 0:  # nothing finite left (logits that were not finite)
        return best
    assert rng is not None
    return int(rng.choice(probs.shape[0], p=probs))


def repeated_tail(tokens: Sequence[int], limit: int, max_n: int) -> int:
    """If the end of ``tokens`` is one n-gram (n <= max_n) repeated ``limit`` times in a row, return n, else 0.

    The shortest such n wins, so "a a a a" is a repeated 1-gram, not a repeated 2-gram."""
    total = len(tokens)
    for n in range(1, max_n + 1):
        span = n * limit
        if span > total:
            break
        tail = list(tokens[total - span:])
        unit = tail[-n:]
        if tail == unit * limit:
            return n
    return 0
