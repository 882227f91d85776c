"""SmoothQuant's migration strength chosen per model on calibration data (``--smoothquant auto``, static int8).

One alpha does not suit every model: where activations carry outlier channels (LLMs past ~1B parameters, or the
planted-outlier models of the benchmark) 0.5 moves most of the difficulty into the weights; where they carry
almost none (gpt2-stdlib) the migration only makes the weights harder. So each alpha of ALPHAS > 0 is tried: the
model is smoothed and quantized with it, and scored on the calibration prefills (never on the eval text) by the
mean KL of its next-token distributions against the float model's; the least is kept. "Off" (no smoothing) is not
a candidate: asking for SmoothQuant gets SmoothQuant, and the benchmark compares the choice with plain static int8.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

ALPHAS = (0.1, 0.25, 0.4, 0.5, 0.65, 0.8)


def choose_alpha(write: Callable[[float, Path], dict[str, Any]], out_path: Path, float_path: Path,
                 feeds: list[dict[str, np.ndarray]], logits: str, log: Callable[[str], None],
                 alphas: tuple[float, ...] | None = None) -> dict[str, Any]:
    """``write(alpha, path)`` quantizes with that alpha into ``path`` and returns its details; the least-KL
    candidate's files are moved beside ``out_path`` and its details returned, with the search under
    ``smoothquant_search``."""
    from onnxpipe.quant.quality import measure_session

    reference = measure_session(float_path)
    alphas = ALPHAS if alphas is None else alphas
    tried: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=".alpha-", dir=out_path.parent) as tmp:
        for alpha in alphas:
            candidate = Path(tmp) / str(alpha) / out_path.name
            candidate.parent.mkdir()
            details = write(alpha, candidate)
            kl, ppl_change = calibration_divergence(reference, measure_session(candidate), feeds, logits)
            tried.append({"alpha": alpha, "calibration_kl": float(f"{kl:.5g}"),
                          "calibration_ppl_change_pct": round(ppl_change, 3), "_details": details, "_path": candidate})
            log(f"SmoothQuant alpha {alpha}: calibration KL {kl:.3g}, perplexity {ppl_change:+.2f}%")
        best = min(tried, key=lambda t: t["calibration_kl"])
        for f in best["_path"].parent.iterdir():
            os.replace(f, out_path.parent / f.name)
    details = best["_details"]
    details["smoothquant_search"] = {"chosen": best["alpha"], "by": "least mean KL vs the float model on the "
                                     "calibration prefills",
                                     "candidates": [{k: v for k, v in t.items() if not k.startswith("_")} for t in tried]}
    return details


def calibration_divergence(reference: Any, candidate: Any, feeds: list[dict[str, np.ndarray]],
                           logits: str) -> tuple[float, float]:
    """(mean KL(reference || candidate) over every position, candidate's perplexity change in percent) on the
    feeds' prefills."""
    from onnxpipe.quant.sensitivity import _log_softmax

    kl, nll_ref, nll_cand, positions, scored = 0.0, 0.0, 0.0, 0, 0
    for feed in feeds:
        p = _log_softmax(reference.run([logits], feed)[0].astype(np.float64))
        q = _log_softmax(candidate.run([logits], feed)[0].astype(np.float64))
        kl += float((np.exp(p) * (p - q)).sum())
        positions += p.shape[0] * p.shape[1]
        target = feed["input_ids"][:, 1:, None]
        nll_ref -= float(np.take_along_axis(p[:, :-1], target, -1).sum())
        nll_cand -= float(np.take_along_axis(q[:, :-1], target, -1).sum())
        scored += target.size
    return kl / positions, (np.exp((nll_cand - nll_ref) / scored) - 1.0) * 100.0
