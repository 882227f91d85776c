"""Choosing the next token from a row of logits, and spotting degenerate repetition. Plain numpy, one row at a time.

The order of the logits processors is Hugging Face's: repetition penalty, then temperature, then top-k, then top-p;
temperature 0 (or ``do_sample=False``) is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from onnxpipe.errors import OnnxpipeError


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
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if self.seed is not None and self.seed < 0:
            problems.append(f"seed must be >= 0 (got {self.seed})")
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1 (got {self.num_beams})")
        if self.num_beams > 1 and not self.greedy:
            problems.append("beam search is deterministic here: use temperature 0 with num_beams > 1")
        if self.repeat_ngram_limit is not None and self.repeat_ngram_limit < 2:
            problems.append(f"repeat_ngram_limit must be >= 2 (got {self.repeat_ngram_limit})")
        if any(not s for s in self.stop_strings):
            problems.append("stop strings must not be empty")
        if problems:
            raise OnnxpipeError("; ".join(problems))
        return self


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF's rule: a seen token's logit is divided by ``penalty`` when positive, multiplied when negative."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
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
    logits = logits.astype(np.float64) / cfg.temperature
    logits = filter_top_k(logits, cfg.top_k)
    logits = filter_top_p(logits, cfg.top_p)
    probs = softmax(logits)
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
