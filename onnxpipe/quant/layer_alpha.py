"""SmoothQuant's migration strength chosen per smoothing group by that group's own int8 output error
(``--smoothquant auto``, static int8).

A smoothing group is the set of linear MatMuls that read one activation X (q/k/v, gate/up, one o_proj, ...).
For each candidate alpha the group is smoothed (X' = X / s, W' = diag(s) W, s as in smoothquant.py) and quantized
the way static int8 writes it: X' fake-quantized to uint8 with the range the calibrator would give it (minmax:
the min and max of X'; percentile: ORT's symmetric 99.999th percentile of |X'| clipped to them; entropy is
approximated by minmax), each W' to int8 per output channel, symmetric. The group's loss is

    sum_i ||X W_i - fq(X') q(W'_i)||^2 / sum_i ||X W_i||^2

on float calibration activations (prefills and decode steps, as the static calibration sees them), and the least
is kept: the layer-wise auto-tuning of Intel Neural Compressor's SmoothQuant, written here from its description,
not the whole model's KL.

Against over-fitting the calibration text: s and the activation range are fitted on some batches of calibration
windows and the loss is measured on the others (FOLDS-fold over the batches, the folds' losses averaged), so a
choice is rewarded for what carries over to tokens its ranges were not fitted on. Fitting and measuring on the
same tokens rewards the largest alphas, whose flat activations fit their own range best (on gpt2-stdlib that
choice was worse than plain static int8 on the eval text; docs/quantization.md). The written model is smoothed and
calibrated on every window, as always.

"Off" (the group left unsmoothed, s = 1; the formula's alpha = 0, s = 1 / max|W|, is not the same thing) is a
candidate per group; a model where every group chose it is not SmoothQuant, so then each group takes its best
smoothed alpha instead (``all_off_fallback`` in the record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from onnxpipe.quant.smoothquant import activation_groups, smoothing_scales, with_outputs

GRID = tuple(i / 20 for i in range(1, 20))  # 0.05 .. 0.95
OFF = 0.0  # the group left unsmoothed
FOLDS = 4
PERCENTILE = 99.999  # ORT's default for CalibrationMethod.Percentile
MAX_KEPT_VALUES = 64_000_000  # calibration rows kept for the losses, all groups together (float32: 256 MB)


@dataclass
class Fit:
    """What a static calibration would see of one group's input: per-channel min and max over every row, and the
    rows kept (all of them, unless the model is too large to keep them; then an even subsample)."""

    cmin: np.ndarray
    cmax: np.ndarray
    rows: np.ndarray

    @staticmethod
    def of(batches: list[Fit]) -> Fit:
        return Fit(np.min([b.cmin for b in batches], 0), np.max([b.cmax for b in batches], 0),
                   np.concatenate([b.rows for b in batches]))


@dataclass
class GroupChoice:
    activation: str
    matmuls: list[str]
    alpha: float  # OFF: unsmoothed
    losses: dict[float, float]  # candidate alpha -> held-out loss

    def to_json(self) -> dict[str, Any]:
        return {"activation": self.activation, "matmuls": self.matmuls, "alpha": self.alpha,
                "loss": float(f"{self.losses[self.alpha]:.4g}"),
                "loss_unsmoothed": float(f"{self.losses[OFF]:.4g}") if OFF in self.losses else None,
                "losses": {str(a): float(f"{v:.4g}") for a, v in self.losses.items()}}


@dataclass
class LayerAlphaChoice:
    groups: list[GroupChoice]
    method: str
    folds: int
    allow_off: bool
    rows_per_group: int = 0
    all_off_fallback: bool = False

    @property
    def alphas(self) -> dict[str, float]:
        return {g.activation: g.alpha for g in self.groups}

    def to_json(self) -> dict[str, Any]:
        fit = (f"scales and ranges fitted on {self.folds - 1} of {self.folds} folds of the calibration batches, "
               "loss on the other, averaged over the folds") if self.folds > 1 else "fitted and measured on every row"
        return {"by": "per smoothing group: least relative output error of the group's int8 form (activation "
                      "fake-quantized with its calibrated range, weights int8 per channel) against float; " + fit,
                "method": self.method, "folds": self.folds, "grid": list(GRID), "allow_off": self.allow_off,
                "rows_per_group": self.rows_per_group, "groups": len(self.groups),
                "groups_off": sum(g.alpha == OFF for g in self.groups), "all_off_fallback": self.all_off_fallback,
                "alphas": [g.to_json() for g in self.groups]}

    def summary(self) -> str:
        smoothed = [g.alpha for g in self.groups if g.alpha != OFF]
        spread = f"alpha {min(smoothed):g}-{max(smoothed):g} (median {np.median(smoothed):g})" if smoothed else "none"
        fallback = " (every group preferred none: each took its best alpha)" if self.all_off_fallback else ""
        return (f"{len(self.groups)} groups, {len(smoothed)} smoothed ({spread}), "
                f"{len(self.groups) - len(smoothed)} left unsmoothed{fallback}")


def collect_fits(proto: Any, linears: list[str], feeds: Iterable[dict[str, np.ndarray]],
                 feeds_total: int) -> dict[str, list[Fit]]:
    """Each group's input X from the float model, one Fit per batch of calibration windows (a prefill and the
    decode steps that follow it); a batch's rows are thinned (evenly) as soon as it ends, so that what is held
    stays within MAX_KEPT_VALUES."""
    from onnxpipe.quant.graph import float_session, initializer_map

    groups = activation_groups(proto, linears)
    names = list(groups)
    inits = initializer_map(proto.graph)
    width = sum(inits[nodes[0].input[1]].dims[0] for nodes in groups.values())
    rows_per_feed = max(16, MAX_KEPT_VALUES // (width * max(feeds_total, 1)))
    session = float_session(with_outputs(proto, names))
    fits: dict[str, list[Fit]] = {n: [] for n in names}
    batch: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def close_batch() -> None:
        for name, parts in batch.items():
            if parts:
                x = np.concatenate(parts)
                keep = rows_per_feed * len(parts)
                rows = x if len(x) <= keep else x[np.linspace(0, len(x) - 1, keep).astype(int)]
                fits[name].append(Fit(x.min(0), x.max(0), rows.astype(np.float32)))
                parts.clear()

    for feed in feeds:
        if feed["input_ids"].shape[1] > 1:  # a prefill starts a batch; its decode steps follow it
            close_batch()
        for name, value in zip(names, session.run(names, feed)):
            batch[name].append(value.reshape(-1, value.shape[-1]))
    close_batch()
    return fits


def fake_quant_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """x through uint8 with ORT's asymmetric parameters for the range [lo, hi] (widened to include 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return ((np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def quant_weight_per_channel(w: np.ndarray) -> np.ndarray:
    """W [K, N] through int8, symmetric, one scale per output column (as quantize_static writes it)."""
    scale = np.abs(w).max(0) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


def smoothed_range(fit: Fit, s: np.ndarray, method: str) -> tuple[float, float]:
    """The range ORT's calibrator would give X / s."""
    lo, hi = float((fit.cmin / s).min()), float((fit.cmax / s).max())
    if method == "percentile":
        t = float(np.percentile(np.abs(fit.rows / s), PERCENTILE))
        return max(-t, lo), min(t, hi)
    return lo, hi


def group_loss(fit: Fit, x_eval: np.ndarray, weights: list[np.ndarray], alpha: float, method: str,
               y_eval: list[np.ndarray] | None = None) -> float:
    """Relative output error of the group's int8 form under ``alpha``: scales and range from ``fit``, measured on
    ``x_eval`` (whose float outputs ``y_eval`` may be given)."""
    if alpha == OFF:
        s = np.ones(fit.cmax.shape[0], np.float32)
    else:
        act_max = np.maximum(np.abs(fit.cmin), np.abs(fit.cmax)).astype(np.float64)
        s = smoothing_scales(act_max, weights, alpha).astype(np.float32)
    lo, hi = smoothed_range(fit, s, method)
    xq = fake_quant_uint8(x_eval / s, lo, hi)
    err = ref = 0.0
    for i, w in enumerate(weights):
        y = x_eval @ w if y_eval is None else y_eval[i]
        d = y - xq @ quant_weight_per_channel(w * s[:, None])
        err += float(np.square(d, dtype=np.float64).sum())
        ref += float(np.square(y, dtype=np.float64).sum())
    return err / max(ref, 1e-30)


def fold_splits(batches: list[Fit], folds: int) -> list[tuple[Fit, np.ndarray]]:
    """(what the scales and range are fitted on, the rows the loss is measured on), one pair per fold: batch i is
    measured in fold i % k and fitted in the others. With one fold (or one batch), both are every batch."""
    k = min(folds, len(batches))
    if k <= 1:
        every = Fit.of(batches)
        return [(every, every.rows)]
    return [(Fit.of([b for i, b in enumerate(batches) if i % k != f]),
             np.concatenate([b.rows for i, b in enumerate(batches) if i % k == f])) for f in range(k)]


def choose_group_alphas(proto: Any, linears: list[str], feeds: Iterable[dict[str, np.ndarray]], feeds_total: int,
                        method: str = "minmax", folds: int = FOLDS, allow_off: bool = True,
                        grid: tuple[float, ...] = GRID) -> LayerAlphaChoice:
    """The alpha of each smoothing group of ``linears`` (the layers static int8 quantizes), by its int8 output
    error on calibration batches its scales and range were not fitted on (``folds`` = 1: on the same ones)."""
    from onnx import numpy_helper

    from onnxpipe.quant.graph import initializer_map

    inits = initializer_map(proto.graph)
    fits = collect_fits(proto, linears, feeds, feeds_total)
    candidates = ((OFF,) if allow_off else ()) + tuple(grid)
    choices, kept = [], 0
    for name, nodes in activation_groups(proto, linears).items():
        batches = fits[name]
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        splits = fold_splits(batches, folds)
        outputs = [[x @ w for w in weights] for _, x in splits]
        losses = {a: float(np.mean([group_loss(fit, x, weights, a, method, y) for (fit, x), y in zip(splits, outputs)]))
                  for a in candidates}
        choices.append(GroupChoice(name, [n.name for n in nodes], min(losses, key=losses.get), losses))
        kept = max(kept, sum(len(b.rows) for b in batches))
    used = min(folds, min((len(b) for b in fits.values()), default=1))  # fewer batches than folds: one per fold
    choice = LayerAlphaChoice(choices, method, max(used, 1), allow_off, rows_per_group=kept)
    if choices and all(g.alpha == OFF for g in choices):
        for g in choices:
            g.alpha = min((a for a in g.losses if a != OFF), key=g.losses.get)
        choice.all_off_fallback = True
    return choice
