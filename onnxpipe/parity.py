"""Numerical equivalence of two decoders: prefill then decode steps on a left-padded batch.

Both sides are "step functions" with the graph's signature: (input_ids, attention_mask, position_ids, past) ->
(logits, present), numpy in and out. The reference side picks the next tokens (greedy) and both sides are fed the
same tokens, so one early disagreement does not compound; each side keeps its own KV cache.

Relative error is max abs error / largest reference magnitude (per-element relative error explodes near zero).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from onnxpipe.artifact import Manifest

Past = list[tuple[np.ndarray, np.ndarray]]
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, Past], tuple[np.ndarray, Past]]

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}
HIST_EDGES = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class ParityReport:
    max_abs_err: float
    rel_err: float
    ref_max_abs: float
    greedy_agreement: float
    positions: int
    decode_steps: int
    batch: int
    prompt_lengths: list[int]
    tolerance: float | None = None
    passed: bool | None = None
    err_histogram: dict[str, int] = field(default_factory=dict)

    def judge(self, tolerance: float) -> "ParityReport":
        self.tolerance = tolerance
        self.passed = bool(np.isfinite(self.rel_err) and self.rel_err <= tolerance)
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "" if self.passed is None else (" ok" if self.passed else f" FAILED (tolerance {self.tolerance:g})")
        return (
            f"max abs err {self.max_abs_err:.3g}, rel err {self.rel_err:.3g}, "
            f"greedy agreement {self.greedy_agreement:.1%} over {self.positions} positions "
            f"(prefill + {self.decode_steps} decode steps, batch {self.batch}){verdict}"
        )


def left_padded_batch(vocab_size: int, lengths: Sequence[int], seed: int, pad_id: int = 0,
                      side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """Random prompts of the given lengths, padded to the longest on ``side`` (left unless the graph asks for
    right): (input_ids, attention_mask), int64."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for row, n in enumerate(lengths):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = rng.integers(0, vocab_size, size=n)
        mask[row, cols] = 1
    return ids, mask


def position_ids_for(attention_mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Positions of the last ``seq_len`` tokens: count of attended tokens before each, padding at 1 (as HF does)."""
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos = np.where(attention_mask == 0, 1, pos)
    return pos[:, -seq_len:].astype(np.int64)


def empty_past(manifest: Manifest, batch: int, dtype: np.dtype) -> Past:
    m = manifest.model
    shape = (batch, m["num_kv_heads"], 0, m["head_dim"])
    return [(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in range(manifest.num_layers)]


@dataclass
class Trace:
    logits: list[np.ndarray]  # per step: [batch, seq, vocab] float32, prefill first
    valid: list[np.ndarray]  # per step: [batch, seq] bool, which positions are real tokens
    tokens: np.ndarray  # [batch, steps] tokens fed after the prefill


def run_trace(
    step: StepFn,
    manifest: Manifest,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    decode_steps: int,
    kv_dtype: np.dtype,
    forced_tokens: np.ndarray | None = None,
) -> Trace:
    """Prefill then ``decode_steps`` single-token steps; tokens are greedy unless ``forced_tokens`` is given."""
    batch, seq = input_ids.shape
    past = empty_past(manifest, batch, kv_dtype)
    mask = attention_mask.copy()
    logits, past = step(input_ids, mask, position_ids_for(mask, seq), past)
    trace = Trace([logits.astype(np.float32)], [mask.astype(bool)], np.zeros((batch, decode_steps), np.int64))
    for t in range(decode_steps):
        nxt = forced_tokens[:, t] if forced_tokens is not None else trace.logits[-1][:, -1].argmax(-1)
        trace.tokens[:, t] = nxt
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        logits, past = step(nxt[:, None].astype(np.int64), mask, position_ids_for(mask, 1), past)
        trace.logits.append(logits.astype(np.float32))
        trace.valid.append(np.ones((batch, 1), bool))
    return trace


def compare(ref: Trace, cand: Trace, prompt_lengths: Sequence[int]) -> ParityReport:
    ref_vals = np.concatenate([lg[v] for lg, v in zip(ref.logits, ref.valid)])
    # row-major: each row's real positions in order, whichever side its padding is on
    cand_vals = np.concatenate([lg[v] for lg, v in zip(cand.logits, cand.valid)])
    diff = np.abs(ref_vals.astype(np.float64) - cand_vals.astype(np.float64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(diff.max())
    ref_max = float(np.abs(ref_vals).max())
    agree = float((ref_vals.argmax(-1) == cand_vals.argmax(-1)).mean())
    counts, _ = np.histogram(np.clip(diff, 0, 10.0), bins=(0.0, *HIST_EDGES, np.inf))
    labels = [f"<{HIST_EDGES[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(HIST_EDGES, HIST_EDGES[1:])] + [f">={HIST_EDGES[-1]:g}"]
    return ParityReport(
        max_abs_err=max_abs,
        rel_err=max_abs / max(ref_max, 1e-12),
        ref_max_abs=ref_max,
        greedy_agreement=agree,
        positions=int(ref_vals.shape[0]),
        decode_steps=len(ref.logits) - 1,
        batch=int(ref.tokens.shape[0]),
        prompt_lengths=list(prompt_lengths),
        err_histogram={k: int(c) for k, c in zip(labels, counts)},
    )


def check_decoders(
    reference: StepFn,
    candidate: StepFn,
    manifest: Manifest,
    *,
    kv_dtype: np.dtype,
    ref_kv_dtype: np.dtype | None = None,
    prompt_lengths: Sequence[int] = (7, 4),
    decode_steps: int = 4,
    seed: int = 0,
    padding_side: str = "left",
    reference_padding_side: str = "left",
) -> ParityReport:
    """Run both decoders on the same prompts and compare every real position's logits. Each side gets them padded
    on its own graph's side: left for exported and CPU-form graphs, right for the CUDA attention form (which counts
    the mask instead of applying it). A right-padded row's mask has a hole after its decode steps (the new column
    comes after the padding): an exported graph that builds a sliding window from column indices would read that
    wrongly, which is why an exported reference is never fed right-padded."""
    vocab = manifest.model["vocab_size"]
    ids, mask = left_padded_batch(vocab, prompt_lengths, seed, side=reference_padding_side)
    ref = run_trace(reference, manifest, ids, mask, decode_steps, ref_kv_dtype or kv_dtype)
    release = getattr(reference, "release", None)
    if release is not None:  # a lazy step function: its session goes before the candidate's is made
        release()
    if padding_side != reference_padding_side:
        ids, mask = left_padded_batch(vocab, prompt_lengths, seed, side=padding_side)
    cand = run_trace(candidate, manifest, ids, mask, decode_steps, kv_dtype, forced_tokens=ref.tokens)
    return compare(ref, cand, prompt_lengths)


def ort_step_fn(session: Any, manifest: Manifest) -> StepFn:
    """A step function over an onnxruntime InferenceSession with the manifest's I/O names."""
    inputs = set(manifest.input_names)
    presents = [manifest.present_names(i) for i in range(manifest.num_layers)]
    out_names = [manifest.graph["logits"]] + [n for pair in presents for n in pair]

    def step(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Past):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "position_ids" in inputs:
            feed["position_ids"] = position_ids
        for i, (k, v) in enumerate(past):
            pk, pv = manifest.past_names(i)
            feed[pk], feed[pv] = k, v
        outs = session.run(out_names, feed)
        return outs[0], [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(manifest.num_layers)]

    return step


def lazy_ort_step_fn(make_session: Callable[[], Any], manifest: Manifest,
                     on_open: Callable[[], None] | None = None) -> StepFn:
    """``ort_step_fn`` over a session made on the first step; ``step.release()`` drops it. check_decoders releases
    the reference's session before the candidate runs, so the two sessions (each as large as the weights, or twice
    that where ORT widens fp16 to fp32) are never held at once."""
    state: dict[str, Any] = {}

    def step(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Past):
        if "fn" not in state:
            if on_open is not None:
                on_open()
            state["fn"] = ort_step_fn(make_session(), manifest)
        return state["fn"](input_ids, attention_mask, position_ids, past)

    step.release = state.clear  # type: ignore[attr-defined]
    return step
