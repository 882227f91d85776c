"""How much a quantized model lost against its input, and whether that is acceptable (the gate).

Both models run in ONNX Runtime through the manifest's I/O names, with default graph optimizations (the quantized
kernels are what is measured), on the GPU where this onnxruntime has CUDA (the runtime's provider choice), else the
CPU; one after the other, never both at once (the input model's logits wait in a file beside the output: ``Side``,
``TextComparison``). A model whose whole-model CPU session would not fit (``--check-form``, ``auto`` from
runtime.layerwise.LAYERWISE_BYTES) runs one layer's segment at a time (``SegmentedSide``): the same numbers, up to
what onnxruntime's fusions across a layer boundary would change. The token stream is cut into non-overlapping windows of ``context`` tokens, each a prefill from an empty KV
cache; every token of a window but the first is scored, as scripts/perplexity.py does with its default stride, so
the fp32 figure can be checked against PyTorch's. Top-1 agreement and KL(input || quantized) are taken over the
same scored positions.

The eval text is split by position (``split_eval``): the report's tokens first (DEFAULT_EVAL_TOKENS unless set),
then, when the command chooses among candidates, the selection tokens right after them. A choice is judged on
text that neither the calibration nor the final report uses, and the report is what the budget is checked on.

The gate (``Gate``): the perplexity change within a budget in percent (DEFAULT_BUDGET_PCT per mode), and the
decode path's greedy agreement (prompts from the text, the input model's greedy continuation teacher-forced into
the quantized one) at least MIN_GREEDY_AGREEMENT. The change carries a 95% interval from the per-token NLL
differences, taken over blocks of SE_BLOCK consecutive tokens (neighbouring tokens are not independent); the
verdict says "noisy" when that interval reaches the budget or is wider than half of it.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from onnxpipe.artifact import Manifest
from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.sessions import open_session

DEFAULT_CONTEXT = 256
DEFAULT_EVAL_TOKENS = 8192  # the report's tokens unless --eval-tokens
DEFAULT_SELECT_TOKENS = 4096  # the selection's, at most as many as the report's
MIN_EVAL_TOKENS = 256  # below this a perplexity change is mostly noise: refused
# int8 with run-time activations and fp16 should cost little; int4 weights alone cost more (llama.cpp's Q4 formats
# lose 1-5% on small models), so it gets more room
DEFAULT_BUDGET_PCT = {"dynamic": 2.0, "static": 2.0, "int4": 5.0, "fp16": 1.0}
MIN_GREEDY_AGREEMENT = 0.8  # below this the quantized model's greedy text parts from its input's: a failed gate
# a greedy token the input model scores within this many nats of its own top token is a near tie, which rounding
# alone flips (random-weight models are all near ties); the judged agreement counts it as agreeing
TIE_NATS = 0.1
SE_BLOCK = 64  # tokens per block of the perplexity change's standard error
Z95 = 1.96
DECODE_PROMPTS, DECODE_PROMPT_LEN, DECODE_STEPS = 4, 32, 16
RECORDED = "recorded, not judged"
POSITION_CHUNK = 32  # positions whose float64 log-probabilities are taken at once (compare_on_text)
LOGITS_BYTES = 256 << 20  # a batch of windows' logits, per session, at most this (logits_batch)


@dataclass
class QualityReport:
    eval_file: str | None
    eval_tokens: int  # tokens scored (each window's first token has no context and is not scored)
    windows: int
    context: int
    ppl_before: float
    ppl_after: float
    ppl_change_pct: float  # (after / before - 1) * 100
    ppl_change_ci95_pct: float  # half-width of its 95% interval (inf when it cannot be estimated)
    top1_agreement: float  # fraction of scored positions where both models' argmax agree
    mean_kl: float  # mean over scored positions of KL(p_before || p_after), nats
    size_before: int  # bytes of the model files (model.onnx + external data)
    size_after: int
    size_ratio: float
    seconds: float
    greedy_agreement: float | None = None  # decode path, prompts from the eval text (greedy_agreement): equal
    greedy_agreement_ties: float | None = None  # equal or a near tie (TIE_NATS): the judged figure
    greedy_positions: int = 0
    provider: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        greedy = "" if self.greedy_agreement is None else f"; decode-path greedy agreement {self.greedy_agreement:.1%}"
        return (
            f"perplexity {self.ppl_before:.3f} -> {self.ppl_after:.3f} ({self.ppl_change_pct:+.2f}% "
            f"± {self.ppl_change_ci95_pct:.2f}%) on {self.eval_tokens} tokens; top-1 agreement "
            f"{self.top1_agreement:.1%}; mean KL {self.mean_kl:.3g}{greedy}; size {self.size_before / 1e6:.2f} MB -> "
            f"{self.size_after / 1e6:.2f} MB ({self.size_ratio:.2f}x)"
        )


def measure_session(model_path: str | Path, threads: int = 0) -> Any:
    """An ORT CPU session as a user would run it (all graph optimizations on)."""
    return open_session(model_path, threads=threads or None, purpose="measuring quality")


def eval_provider(manifest: Manifest) -> str:
    """cuda where this onnxruntime lists it and the graph can run there, else cpu. A graph optimized for the CPU
    whose attention takes a bias cannot run on CUDA (runtime.providers refuses it), so it is measured on the CPU."""
    from onnxpipe.runtime.providers import available_providers

    graph = manifest.graph
    cpu_form = graph.get("target", "cpu") == "cpu" and "GroupQueryAttention" in (graph.get("fused_ops") or [])
    return "cuda" if "cuda" in available_providers() and not cpu_form else "cpu"


def eval_session(model_path: str | Path, provider: str = "cpu") -> tuple[Any, str]:
    """(session, provider it runs on): measure_session on the CPU, runtime.providers' CUDA session otherwise."""
    if provider == "cpu":
        return measure_session(model_path), "cpu"
    from onnxpipe.runtime.providers import create_session

    session, choice = create_session(model_path, provider, fp32_on_cpu=False, announce=lambda msg: None)
    return session, choice.used


def side_form(form: str, model_path: str | Path, provider: str) -> str:
    """The form the checks take (runtime.layerwise.check_form on the input model's bytes): ``layerwise`` on the
    CPU from LAYERWISE_BYTES of weights under ``auto``; on CUDA the weights are not in host memory: ``whole``."""
    from onnxpipe.runtime.layerwise import check_form

    if provider != "cpu":
        if check_form(form, 0) == "layerwise":  # an unknown form fails here too
            raise OnnxpipeError(f"--check-form layerwise runs on the CPU; the checks run on {provider} here: use "
                                "--check-form whole or auto")
        return "whole"
    return check_form(form, model_bytes(Path(model_path)) if form == "auto" else 0)


class Side:
    """One model as the quality report runs it: its windows' prefills (``prefills``: each batch's logits handed to
    ``consume(i, logits)`` as made) and its decode path (``trace``: greedy, or the tokens given). Its sessions are
    made when first used and dropped by ``release``."""

    manifest: Manifest
    provider: str = "cpu"

    def prefills(self, batches: list[np.ndarray], consume: Callable[[int, np.ndarray], None]) -> None:
        raise NotImplementedError

    def trace(self, prompts: np.ndarray, forced: np.ndarray | None = None,
              on_step: Callable[[], None] | None = None) -> Any:
        raise NotImplementedError

    def release(self) -> None:
        pass


class SessionSide(Side):
    """A whole-model session: ``session`` made or given (``make``: a function making it on first use, which
    ``release`` drops)."""

    def __init__(self, manifest: Manifest, session: Any = None, make: Callable[[], tuple[Any, str]] | None = None,
                 provider: str = "cpu") -> None:
        self.manifest, self._session, self._make, self.provider = manifest, session, make, provider

    def session(self) -> Any:
        if self._session is None:
            assert self._make is not None
            self._session, self.provider = self._make()
        return self._session

    def prefills(self, batches: list[np.ndarray], consume: Callable[[int, np.ndarray], None]) -> None:
        for i, ids in enumerate(batches):
            consume(i, _window_logits(self.session(), self.manifest, ids))

    def trace(self, prompts: np.ndarray, forced: np.ndarray | None = None,
              on_step: Callable[[], None] | None = None) -> Any:
        return greedy_trace(self.session(), self.manifest, prompts, forced, on_step)

    def release(self) -> None:
        if self._make is not None:
            self._session = None


class SegmentedSide(Side):
    """A model run one layer's segment at a time (runtime.layerwise), each segment's session mapping its weights
    from the model's data file and made with every graph optimization on (as a user runs the model): the host
    memory is one segment's weights, not the model's (widened to fp32 on the CPU for an fp16 model). The graph
    (runtime.layerwise.file_graph: with a single-file model's weights) is read on first use and dropped by
    ``release``."""

    def __init__(self, model_path: str | Path, manifest: Manifest) -> None:
        from onnxpipe.runtime.layerwise import segment_session

        self.model_path, self.manifest, self.session = Path(model_path), manifest, segment_session()
        self._graph: Any = None
        dtypes = {t["name"]: t["dtype"] for t in manifest.graph["inputs"]}
        self.kv_dtype = np.dtype(dtypes.get(manifest.past_names(0)[0], "float32"))

    @property
    def graph(self) -> Any:
        if self._graph is None:
            from onnxpipe.runtime.layerwise import file_graph

            self._graph = file_graph(self.model_path)
        return self._graph

    def release(self) -> None:
        self._graph = None

    def prefills(self, batches: list[np.ndarray], consume: Callable[[int, np.ndarray], None]) -> None:
        from onnxpipe.runtime.layerwise import run_segmented

        steps = [prefill_feed(self.manifest, ids) for ids in batches]
        run_segmented(self.graph, self.manifest, steps, self.kv_dtype, self.session, True, keep=(), consume=consume)

    def trace(self, prompts: np.ndarray, forced: np.ndarray | None = None,
              on_step: Callable[[], None] | None = None) -> Any:
        """A teacher-forced trace runs each segment once over all its steps (``on_step`` is not called); a greedy
        one step by step, each step through every segment (``on_step()`` after each)."""
        from onnxpipe.runtime.layerwise import forced_trace, segmented_step_fn

        if forced is not None:
            return forced_trace(self.graph, self.manifest, self.session, prompts, forced, self.kv_dtype)
        step = segmented_step_fn(self.graph, self.manifest, self.session, self.kv_dtype)
        return greedy_trace(step, self.manifest, prompts, on_step=on_step)


def model_side(model_path: str | Path, manifest: Manifest, provider: str = "cpu", form: str = "whole") -> Side:
    """The Side of the model at ``model_path`` in a check form (side_form's ``whole`` or ``layerwise``)."""
    if form == "layerwise":
        if provider != "cpu":
            raise OnnxpipeError("the layer-by-layer check form runs on the CPU; use --check-form whole on a GPU")
        return SegmentedSide(model_path, manifest)
    return SessionSide(manifest, make=lambda: eval_session(model_path, provider), provider=provider)


def as_side(x: Any, manifest: Manifest) -> Side:
    """``x`` as a Side: itself, or a session made into one."""
    return x if isinstance(x, Side) else SessionSide(manifest, session=x)


def prefill_feed(manifest: Manifest, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for a prefill from an empty cache: the whole window attended, positions 0..T-1."""
    batch, seq = input_ids.shape
    feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": np.ones((batch, seq), np.int64)}
    if "position_ids" in manifest.input_names:
        feed["position_ids"] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    m = manifest.model
    dtypes = {t["name"]: t["dtype"] for t in manifest.graph["inputs"]}
    for i in range(manifest.num_layers):
        for name in manifest.past_names(i):
            feed[name] = np.zeros((batch, m["num_kv_heads"], 0, m["head_dim"]), np.dtype(dtypes.get(name, "float32")))
    return feed


def window_starts(n_tokens: int, context: int) -> list[int]:
    """Starts of non-overlapping windows; a last window shorter than 2 tokens scores nothing and is dropped."""
    return [b for b in range(0, n_tokens, context) if min(b + context, n_tokens) - b >= 2]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def calibration_divergence(reference: Any, candidate: Any, feeds: list[dict[str, np.ndarray]],
                           logits: str) -> tuple[float, float]:
    """(mean KL(reference || candidate) over every position, candidate's perplexity change in percent) on the
    feeds' prefills (the calibration text's, in scripts/sweep_smoothquant_alpha.py)."""
    kl, nll_ref, nll_cand, positions, scored = 0.0, 0.0, 0.0, 0, 0
    for feed in feeds:
        p = log_softmax(reference.run([logits], feed)[0])
        q = log_softmax(candidate.run([logits], feed)[0])
        kl += float((np.exp(p) * (p - q)).sum())
        positions += p.shape[0] * p.shape[1]
        target = feed["input_ids"][:, 1:, None]
        nll_ref -= float(np.take_along_axis(p[:, :-1], target, -1).sum())
        nll_cand -= float(np.take_along_axis(q[:, :-1], target, -1).sum())
        scored += target.size
    return kl / positions, (np.exp((nll_cand - nll_ref) / scored) - 1.0) * 100.0


def _batches(token_ids: np.ndarray, context: int, batch_size: int) -> Iterator[np.ndarray]:
    """The windows of ``token_ids`` (window_starts), those of one length stacked ``batch_size`` at a time."""
    groups: dict[int, list[int]] = {}
    for b in window_starts(len(token_ids), context):
        groups.setdefault(min(b + context, len(token_ids)) - b, []).append(b)
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            yield np.stack([token_ids[b:b + length] for b in group[i:i + batch_size]])


def _window_logits(session: Any, manifest: Manifest, ids: np.ndarray) -> np.ndarray:
    """The logits [B, T, V] of a batch of windows (the session's own dtype, not widened)."""
    return session.run([manifest.graph["logits"]], prefill_feed(manifest, ids))[0]


def _position_chunks(row_b: np.ndarray, row_a: np.ndarray, ids: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """(log-probs before, after [P, V] float64, targets [P, 1]) over the positions of one window that predict a next
    token, POSITION_CHUNK at a time: the float64 copies of a 128k-256k vocabulary stay tens of MB, not a window's
    (256 positions x 152k x 8 bytes: 311 MB each, several at once)."""
    for s in range(0, len(ids) - 1, POSITION_CHUNK):
        e = min(s + POSITION_CHUNK, len(ids) - 1)
        yield log_softmax(row_b[s:e]), log_softmax(row_a[s:e]), ids[s + 1:e + 1, None]


def logits_batch(context: int, vocab: int, batch_size: int = 4) -> int:
    """Windows a session runs at once: at most ``batch_size``, fewer where a batch's logits [B, context, vocab]
    fp32 would pass LOGITS_BYTES (a 152k vocabulary at context 256: 156 MB a window)."""
    return max(1, min(batch_size, LOGITS_BYTES // max(1, context * vocab * 4)))


def _block_sums(diff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row NLL differences [B, T] cut into blocks of SE_BLOCK tokens: (sums, counts)."""
    sums, counts = [], []
    for row in diff:
        for b in range(0, len(row), SE_BLOCK):
            sums.append(float(row[b:b + SE_BLOCK].sum()))
            counts.append(len(row[b:b + SE_BLOCK]))
    return np.asarray(sums), np.asarray(counts, np.float64)


def change_interval(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """(perplexity change %, half-width % of its 95% interval) from per-block sums of per-token NLL differences
    (after - before): the mean difference m is a ratio over blocks, its standard error by linearisation, and the
    change exp(m) - 1 carries exp(m) times it. inf when fewer than two blocks."""
    n = counts.sum()
    m = sums.sum() / n
    if len(sums) < 2:
        return (math.exp(m) - 1.0) * 100.0, math.inf
    se = math.sqrt(len(sums) / (len(sums) - 1) * float(((sums - m * counts) ** 2).sum())) / n
    return (math.exp(m) - 1.0) * 100.0, math.exp(m) * Z95 * se * 100.0


def compare_on_text(
    before: Any,
    after: Any,
    manifest_before: Manifest,
    manifest_after: Manifest,
    token_ids: np.ndarray,
    context: int,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    spill_dir: str | Path | None = None,
) -> dict[str, float]:
    """Perplexity of both models (Sides, or sessions) on ``token_ids`` and their agreement (TextComparison): the
    input model first, released, then the quantized one."""
    before, after = as_side(before, manifest_before), as_side(after, manifest_after)
    with TextComparison(manifest_before, token_ids, context, batch_size, progress, spill_dir) as text:
        try:
            text.run_before(before)
        finally:
            before.release()
        try:
            return text.run_after(after)
        finally:
            after.release()


class TextComparison:
    """Both models on the windows of ``token_ids`` (window_starts), those of one length batched, one model after
    the other: the input model's logits are written to a file in ``spill_dir`` (a temporary directory of its own,
    removed on exit) in their own dtype as its batches are made (run_before), then the quantized model's batches
    are compared with them, read back a window at a time (run_after). The two models are never in memory at once,
    and the logits held are one batch's (logits_batch) and one window's."""

    def __init__(self, manifest: Manifest, token_ids: np.ndarray, context: int, batch_size: int = 4,
                 progress: Callable[[int, int], None] | None = None, spill_dir: str | Path | None = None) -> None:
        self.windows = len(window_starts(len(token_ids), context))
        if not self.windows:
            raise OnnxpipeError(f"the eval text has {len(token_ids)} tokens; at least 2 are needed")
        batch_size = logits_batch(context, int(manifest.model.get("vocab_size") or 0), batch_size)
        self.batches = list(_batches(token_ids, context, batch_size))
        self.progress, self.done, self.spill_dir = progress, 0, spill_dir
        self._tmp: Any = None
        self._spill: LogitsSpill | None = None

    def __enter__(self) -> "TextComparison":
        self._tmp = tempfile.TemporaryDirectory(prefix=".quality-", dir=self.spill_dir)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._spill is not None:
            self._spill.close()
        self._tmp.cleanup()

    def _count(self, i: int) -> None:
        self.done += self.batches[i].shape[0]
        if self.progress:
            self.progress(self.done, 2 * self.windows)

    def run_before(self, side: "Side") -> None:
        spill = self._spill = LogitsSpill(Path(self._tmp.name) / "logits-before.bin")

        def write(i: int, logits: np.ndarray) -> None:
            spill.write(logits)
            self._count(i)

        side.prefills(self.batches, write)
        spill.close()

    def run_after(self, side: "Side") -> dict[str, float]:
        spill, stats = self._spill, _TextStats()
        if spill is None or len(spill) != len(self.batches):
            raise OnnxpipeError("the quality report compared the quantized model before the input model ran")

        def compare(i: int, logits: np.ndarray) -> None:
            for r, (row, row_a) in enumerate(zip(self.batches[i], logits)):
                stats.add(row, spill.read(i, r), row_a)
            self._count(i)

        side.prefills(self.batches, compare)
        return stats.result(self.windows)


class _TextStats:
    """compare_on_text's sums over the scored positions, window by window."""

    def __init__(self) -> None:
        self.nll_b = self.nll_a = self.kl = 0.0
        self.agree = self.scored = 0
        self.sums: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []

    def add(self, row: np.ndarray, row_b: np.ndarray, row_a: np.ndarray) -> None:
        diffs = []
        for lp_b, lp_a, targets in _position_chunks(row_b, row_a, row):
            tok_b = -np.take_along_axis(lp_b, targets, -1)[:, 0]
            tok_a = -np.take_along_axis(lp_a, targets, -1)[:, 0]
            self.nll_b += float(tok_b.sum())
            self.nll_a += float(tok_a.sum())
            diffs.append(tok_a - tok_b)
            self.kl += float((np.exp(lp_b) * (lp_b - lp_a)).sum())
            self.agree += int((lp_b.argmax(-1) == lp_a.argmax(-1)).sum())
            self.scored += targets.size
        s, c = _block_sums(np.concatenate(diffs)[None])
        self.sums.append(s)
        self.counts.append(c)

    def result(self, windows: int) -> dict[str, float]:
        ppl_b, ppl_a = math.exp(self.nll_b / self.scored), math.exp(self.nll_a / self.scored)
        return {
            "eval_tokens": self.scored,
            "windows": windows,
            "ppl_before": ppl_b,
            "ppl_after": ppl_a,
            "ppl_change_pct": (ppl_a / ppl_b - 1.0) * 100.0,
            "ppl_change_ci95_pct": change_interval(np.concatenate(self.sums), np.concatenate(self.counts))[1],
            "top1_agreement": self.agree / self.scored,
            "mean_kl": self.kl / self.scored,
        }


class LogitsSpill:
    """One model's logits of a sequence of batches, written to ``path`` as they come (each in its own dtype and
    shape) and read back a window (one row of a batch) at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = open(path, "wb")
        self._index: list[tuple[int, np.dtype, tuple[int, ...]]] = []
        self._offset = 0

    def write(self, logits: np.ndarray) -> None:
        logits = np.ascontiguousarray(logits)
        self._file.write(logits.tobytes())
        self._index.append((self._offset, logits.dtype, logits.shape))
        self._offset += logits.nbytes

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self, batch: int, row: int) -> np.ndarray:
        offset, dtype, shape = self._index[batch]
        size = int(np.prod(shape[1:]))
        return np.fromfile(self.path, dtype, size, offset=offset + row * size * dtype.itemsize).reshape(shape[1:])


def decode_prompts(token_ids: np.ndarray) -> np.ndarray:
    """DECODE_PROMPTS prompts of DECODE_PROMPT_LEN tokens spread over the text [P, L] (fewer for a short text)."""
    count = max(1, min(DECODE_PROMPTS, len(token_ids) // DECODE_PROMPT_LEN))
    starts = np.linspace(0, len(token_ids) - DECODE_PROMPT_LEN, count).astype(int)
    return np.stack([token_ids[s:s + DECODE_PROMPT_LEN] for s in starts]).astype(np.int64)


def greedy_trace(session: Any, manifest: Manifest, prompts: np.ndarray, forced: np.ndarray | None = None,
                 on_step: Callable[[], None] | None = None) -> Any:
    """Prefill the prompts, then DECODE_STEPS one-token steps through the KV cache: greedy, or ``forced``.
    ``session``: an onnxruntime session, or a parity.StepFn. ``on_step()`` after each step."""
    from onnxpipe.parity import ort_step_fn, run_trace

    dtypes = {t["name"]: t["dtype"] for t in manifest.graph["inputs"]}
    kv_dtype = np.dtype(dtypes[manifest.past_names(0)[0]])
    step = ort_step_fn(session, manifest) if hasattr(session, "run") else session

    def counted(*args: Any) -> Any:
        out = step(*args)
        if on_step is not None:
            on_step()
        return out

    return run_trace(counted, manifest, prompts, np.ones_like(prompts), DECODE_STEPS, kv_dtype, forced_tokens=forced)


def greedy_agreement(reference: Any, side: Any, manifest: Manifest, prompts: np.ndarray) -> tuple[int, int, int]:
    """(equal, equal or near tie, positions): the input model's greedy continuation (``reference``, greedy_trace)
    teacher-forced into ``side`` (a Side or a session); at the prefill's last position and after every decode
    step, is its argmax the input model's, or one the input model scores within TIE_NATS of its own?"""
    cand = as_side(side, manifest).trace(prompts, forced=reference.tokens)
    ref_lp = np.stack([log_softmax(lg[:, -1]) for lg in reference.logits], 1)  # [B, steps, V]
    ref_next = ref_lp.argmax(-1)
    cand_next = np.stack([lg[:, -1].argmax(-1) for lg in cand.logits], 1)
    gap = np.take_along_axis(ref_lp, ref_next[..., None], -1) - np.take_along_axis(ref_lp, cand_next[..., None], -1)
    return int((ref_next == cand_next).sum()), int((gap[..., 0] <= TIE_NATS).sum()), int(ref_next.size)


def model_bytes(model_path: Path) -> int:
    """Bytes of a model's graph file and its external data files (what quantization shrinks)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    files = {model_path}
    for t in proto.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                files.add(model_path.parent / kv.value)
    return sum(f.stat().st_size for f in files if f.is_file())


def quality_report(
    before_path: Path,
    after_path: Path,
    manifest_before: Manifest,
    manifest_after: Manifest,
    token_ids: np.ndarray,
    context: int,
    eval_file: str | None,
    progress: Callable[[int, int], None] | None = None,
    provider: str = "cpu",
    form: str = "whole",
) -> QualityReport:
    """Both models on ``token_ids`` (TextComparison) and on the decode path from prompts of the same text, one
    model after the other: the input model's windows and greedy continuation, then the quantized model's. ``form``:
    ``whole`` (a session per model) or ``layerwise`` (SegmentedSide). The input model's logits are spilled beside
    ``after_path`` while the report runs (removed after it)."""
    start = time.perf_counter()
    before = model_side(before_path, manifest_before, provider, form)
    after = model_side(after_path, manifest_after, provider, form)
    prompts = decode_prompts(token_ids)
    # one count: the input model's windows, its greedy continuation's steps, the quantized model's windows
    windows, steps = len(window_starts(len(token_ids), context)), [0]
    total = 2 * windows + DECODE_STEPS + 1

    def on_windows(done: int, _: int) -> None:
        if progress:
            progress(done + steps[0], total)

    def on_step() -> None:
        steps[0] += 1
        if progress:
            progress(windows + steps[0], total)

    with TextComparison(manifest_before, token_ids, context, progress=on_windows,
                        spill_dir=Path(after_path).parent) as text:
        try:
            text.run_before(before)
            reference = before.trace(prompts, on_step=on_step)
        finally:
            before.release()
        try:
            stats = text.run_after(after)
            equal, near, positions = greedy_agreement(reference, after, manifest_after, prompts)
        finally:
            after.release()
    size_b, size_a = model_bytes(before_path), model_bytes(after_path)
    return QualityReport(
        eval_file=eval_file,
        context=context,
        size_before=size_b,
        size_after=size_a,
        size_ratio=size_a / size_b,
        seconds=round(time.perf_counter() - start, 2),
        greedy_agreement=equal / positions,
        greedy_agreement_ties=near / positions,
        greedy_positions=positions,
        provider=after.provider,
        **stats,
    )


def default_context(manifest: Manifest) -> int:
    return int(min(DEFAULT_CONTEXT, manifest.model.get("max_position_embeddings") or DEFAULT_CONTEXT))


@dataclass(frozen=True)
class EvalText:
    """The eval file's tokens, split by position: the report's first, then (when a choice is made) the
    selection's, right after them."""

    file: str
    context: int
    report_ids: np.ndarray
    select_ids: np.ndarray | None = None

    def describe(self) -> str:
        n = len(self.report_ids)
        text = f"eval: {n:,} tokens of {self.file} (windows of {self.context})"
        if self.select_ids is not None:
            text += (f"; choices are judged on the {len(self.select_ids):,} tokens after them "
                     f"({n:,}-{n + len(self.select_ids):,})")
        return text


def split_eval(token_ids: np.ndarray, eval_file: str, context: int, report_tokens: int,
               select_tokens: int = 0) -> EvalText:
    """The report's first ``report_tokens`` tokens and the next ``select_tokens`` (0: no selection). A text short
    of both is halved between them. Either part below MIN_EVAL_TOKENS is refused: its verdict would be noise."""
    if select_tokens and len(token_ids) < report_tokens + select_tokens:
        half = len(token_ids) // 2
        report, select = token_ids[:min(half, report_tokens)], token_ids[half:half + select_tokens]
    else:
        report = token_ids[:report_tokens]
        select = token_ids[report_tokens:report_tokens + select_tokens] if select_tokens else None
    parts = [("the quality report", report)] + ([("choosing among candidates", select)] if select is not None else [])
    for what, part in parts:
        if len(part) < MIN_EVAL_TOKENS:
            split = " (it is split in two: the report's tokens, then those that choose)" if select is not None else ""
            raise OnnxpipeError(
                f"{eval_file}: {len(part):,} tokens for {what}, fewer than the {MIN_EVAL_TOKENS} a verdict needs; "
                f"pass a longer --eval file{split}")
    return EvalText(eval_file, context, report, select)


@dataclass(frozen=True)
class Check:
    """One printed check: what was measured, and its verdict against a threshold or RECORDED."""

    name: str
    value: str
    verdict: str
    passed: bool | None = None

    def line(self) -> str:
        return f"{self.name}: {self.value} -- {self.verdict}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Gate:
    """What a quantized model must show on the report's text: its perplexity change within ``max_ppl_increase``
    percent and its decode-path greedy agreement at least ``min_greedy_agreement``."""

    max_ppl_increase: float
    min_greedy_agreement: float = MIN_GREEDY_AGREEMENT

    def noisy(self, change: float, half_width: float) -> bool:
        """The 95% interval reaches the budget (the verdict could go either way) or is wider than half of it."""
        low, high = change - half_width, change + half_width
        return not math.isfinite(half_width) or half_width > self.max_ppl_increase / 2 or low <= self.max_ppl_increase <= high

    def ppl_check(self, change: float, half_width: float, ppl: str = "") -> Check:
        ok = bool(np.isfinite(change) and change <= self.max_ppl_increase)
        verdict = f"pass (budget +{self.max_ppl_increase:g}%)" if ok else f"FAIL (above the budget of +{self.max_ppl_increase:g}%)"
        if self.noisy(change, half_width):
            verdict += (f"; noisy: its 95% interval is {change - half_width:+.2f}% to {change + half_width:+.2f}%; "
                        "more --eval-tokens would firm it up") if math.isfinite(half_width) else \
                "; noisy: too few tokens for an interval"
        return Check("perplexity change", f"{ppl}{change:+.2f}% ± {half_width:.2f}% (95%)", verdict, ok)

    def greedy_check(self, equal: float, near: float, positions: int) -> Check:
        """Judged on ``near`` (equal or a near tie), the share of positions the quantized model continues as its
        input would."""
        ok = near >= self.min_greedy_agreement
        verdict = (f"pass (>= {self.min_greedy_agreement:.0%} with near ties)" if ok else
                   f"FAIL: collapsed below {self.min_greedy_agreement:.0%}: the quantized model's greedy text parts "
                   "from its input's")
        value = f"{equal:.1%} of {positions} positions ({near:.1%} counting near ties within {TIE_NATS:g} nats)"
        return Check("decode-path greedy agreement", value, verdict, ok)

    def judge(self, q: QualityReport) -> list[Check]:
        checks = [
            self.ppl_check(q.ppl_change_pct, q.ppl_change_ci95_pct, f"{q.ppl_before:.3f} -> {q.ppl_after:.3f}, "),
            Check("top-1 agreement", f"{q.top1_agreement:.1%}", RECORDED),
            Check("mean KL", f"{q.mean_kl:.3g} nats", RECORDED),
        ]
        if q.greedy_agreement is not None and q.greedy_agreement_ties is not None:
            checks.append(self.greedy_check(q.greedy_agreement, q.greedy_agreement_ties, q.greedy_positions))
        checks.append(Check("size", f"{q.size_before / 1e6:.2f} MB -> {q.size_after / 1e6:.2f} MB ({q.size_ratio:.2f}x)",
                            RECORDED))
        return checks


@dataclass
class CandidateScore:
    """One candidate on the selection tokens, against the input model."""

    ppl_change_pct: float
    ppl_change_ci95_pct: float
    top1_agreement: float
    greedy_agreement: float
    greedy_agreement_ties: float
    greedy_positions: int
    size: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SelectionJudge:
    """Scores candidates on the selection tokens against the input model, whose per-token figures (NLL, argmax,
    greedy continuation) are computed once, on the first call; each model's sessions are released before the next
    model's are made. ``form``: the check form (side_form's ``whole`` or ``layerwise``)."""

    def __init__(self, model_path: Path, manifest: Manifest, token_ids: np.ndarray, context: int,
                 provider: str = "cpu", progress: Callable[[str, int, int], None] | None = None,
                 batch_size: int = 4, form: str = "whole") -> None:
        self.model_path, self.manifest, self.token_ids, self.context = model_path, manifest, token_ids, context
        self.provider, self.progress, self.batch_size, self.form = provider, progress, batch_size, form
        self._reference: tuple[list[np.ndarray], list[np.ndarray], Any, np.ndarray] | None = None

    def _rows(self, side: Side, label: str, each: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """``each(nll [T-1], argmax [T-1])`` for every window, in order: the negative log-likelihood of each next
        token and the top token at each position that predicts one (log-probabilities taken POSITION_CHUNK
        positions at a time)."""
        batches = list(_batches(self.token_ids, self.context, self.batch_size))
        total = sum(len(b) for b in batches)
        done = [0]

        def consume(i: int, logits: np.ndarray) -> None:
            for row, lg in zip(batches[i], logits):
                nll, top = [], []
                for s in range(0, len(row) - 1, POSITION_CHUNK):
                    lp = log_softmax(lg[s:min(s + POSITION_CHUNK, len(row) - 1)])
                    nll.append(-np.take_along_axis(lp, row[s + 1:s + 1 + len(lp), None], -1)[:, 0])
                    top.append(lp.argmax(-1))
                each(np.concatenate(nll), np.concatenate(top))
            done[0] += len(batches[i])
            if self.progress:
                self.progress(label, done[0], total)

        side.prefills(batches, consume)

    def reference(self) -> tuple[list[np.ndarray], list[np.ndarray], Any, np.ndarray]:
        if self._reference is None:
            side = model_side(self.model_path, self.manifest, self.provider, self.form)
            nll: list[np.ndarray] = []
            argmax: list[np.ndarray] = []

            def each(row_nll: np.ndarray, top: np.ndarray) -> None:
                nll.append(row_nll)
                argmax.append(top)

            try:
                self._rows(side, "selection text, input model", each)
                prompts = decode_prompts(self.token_ids)
                self._reference = nll, argmax, side.trace(prompts), prompts
            finally:
                side.release()
        return self._reference

    def score(self, model_path: Path, manifest: Manifest, label: str = "selection text, candidate") -> CandidateScore:
        start = time.perf_counter()
        ref_nll, ref_argmax, trace, prompts = self.reference()
        side = model_side(model_path, manifest, self.provider, self.form)
        sums, counts, tally = [], [], {"agree": 0, "scored": 0}
        reference = iter(zip(ref_nll, ref_argmax))

        def each(row_nll: np.ndarray, top: np.ndarray) -> None:
            nll_b, arg_b = next(reference)
            s, c = _block_sums((row_nll - nll_b)[None])
            sums.append(s)
            counts.append(c)
            tally["agree"] += int((top == arg_b).sum())
            tally["scored"] += arg_b.size

        try:
            self._rows(side, label, each)
            equal, near, positions = greedy_agreement(trace, side, manifest, prompts)
        finally:
            side.release()
        change, half = change_interval(np.concatenate(sums), np.concatenate(counts))
        return CandidateScore(change, half, tally["agree"] / tally["scored"], equal / positions, near / positions,
                              positions, model_bytes(model_path), round(time.perf_counter() - start, 2))


def prefill_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[:, 1:] under logits[:, :-1] (every row a full prefill)."""
    z = logits[:, :-1].astype(np.float64)
    top = z.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(z - top).sum(-1))
    target = np.take_along_axis(z, ids[:, 1:, None], axis=-1)[..., 0]
    return float((lse - target).sum()), int(target.size)
