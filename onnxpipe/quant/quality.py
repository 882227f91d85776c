"""How much a quantized model lost: perplexity on held-out text, top-1 agreement and KL against its input model.

Both models run in ONNX Runtime (CPU, default graph optimizations: the quantized kernels are what is measured)
through the manifest's I/O names. The token stream is cut into non-overlapping windows of ``context`` tokens,
each a prefill from an empty KV cache; every token of a window but the first is scored, as
scripts/perplexity.py does with its default stride, so the fp32 figure can be checked against PyTorch's.
Top-1 agreement and KL(input || quantized) are taken over the same scored positions.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onnxpipe.artifact import Manifest
from onnxpipe.errors import OnnxpipeError

DEFAULT_CONTEXT = 256


@dataclass
class QualityReport:
    eval_file: str | None
    eval_tokens: int  # tokens scored (each window's first token has no context and is not scored)
    windows: int
    context: int
    ppl_before: float
    ppl_after: float
    ppl_change_pct: float  # (after / before - 1) * 100
    top1_agreement: float  # fraction of scored positions where both models' argmax agree
    mean_kl: float  # mean over scored positions of KL(p_before || p_after), nats
    size_before: int  # bytes of the model files (model.onnx + external data)
    size_after: int
    size_ratio: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"perplexity {self.ppl_before:.3f} -> {self.ppl_after:.3f} ({self.ppl_change_pct:+.2f}%) on "
            f"{self.eval_tokens} tokens; top-1 agreement {self.top1_agreement:.1%}; mean KL {self.mean_kl:.3g}; "
            f"size {self.size_before / 1e6:.2f} MB -> {self.size_after / 1e6:.2f} MB ({self.size_ratio:.2f}x)"
        )


def measure_session(model_path: str | Path, threads: int = 0) -> Any:
    """An ORT CPU session as a user would run it (all graph optimizations on)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own types for graphs it cannot load or run
        raise OnnxpipeError(f"{model_path}: ONNX Runtime cannot load this model: {str(e).strip().splitlines()[0][:300]}") from None


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


def compare_on_text(
    before: Any,
    after: Any,
    manifest_before: Manifest,
    manifest_after: Manifest,
    token_ids: np.ndarray,
    context: int,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Perplexity of both sessions on ``token_ids`` and their agreement; windows of one length are batched."""
    starts = window_starts(len(token_ids), context)
    if not starts:
        raise OnnxpipeError(f"the eval text has {len(token_ids)} tokens; at least 2 are needed")
    logits_before, logits_after = manifest_before.graph["logits"], manifest_after.graph["logits"]
    nll_b = nll_a = kl = 0.0
    agree = scored = 0
    groups: dict[int, list[int]] = {}
    for b in starts:
        groups.setdefault(min(b + context, len(token_ids)) - b, []).append(b)
    done = 0
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            ids = np.stack([token_ids[b:b + length] for b in group[i:i + batch_size]])
            lp_b = log_softmax(before.run([logits_before], prefill_feed(manifest_before, ids))[0][:, :-1])
            lp_a = log_softmax(after.run([logits_after], prefill_feed(manifest_after, ids))[0][:, :-1])
            targets = ids[:, 1:, None]
            nll_b -= float(np.take_along_axis(lp_b, targets, -1).sum())
            nll_a -= float(np.take_along_axis(lp_a, targets, -1).sum())
            kl += float((np.exp(lp_b) * (lp_b - lp_a)).sum())
            agree += int((lp_b.argmax(-1) == lp_a.argmax(-1)).sum())
            scored += targets.size
            done += ids.shape[0]
            if progress:
                progress(done, len(starts))
    ppl_b, ppl_a = math.exp(nll_b / scored), math.exp(nll_a / scored)
    return {
        "eval_tokens": scored,
        "windows": len(starts),
        "ppl_before": ppl_b,
        "ppl_after": ppl_a,
        "ppl_change_pct": (ppl_a / ppl_b - 1.0) * 100.0,
        "top1_agreement": agree / scored,
        "mean_kl": kl / scored,
    }


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
) -> QualityReport:
    start = time.perf_counter()
    stats = compare_on_text(
        measure_session(before_path), measure_session(after_path), manifest_before, manifest_after,
        token_ids, context, progress=progress,
    )
    size_b, size_a = model_bytes(before_path), model_bytes(after_path)
    return QualityReport(
        eval_file=eval_file,
        context=context,
        size_before=size_b,
        size_after=size_a,
        size_ratio=size_a / size_b,
        seconds=round(time.perf_counter() - start, 2),
        **stats,
    )


def default_context(manifest: Manifest) -> int:
    return int(min(DEFAULT_CONTEXT, manifest.model.get("max_position_embeddings") or DEFAULT_CONTEXT))
