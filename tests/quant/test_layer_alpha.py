"""--smoothquant auto (layer_alpha.py): static int8's SmoothQuant alpha chosen per smoothing group by that group's
int8 output error on calibration windows its scales and ranges were not fitted on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxpipe.artifact import ModelDir
from onnxpipe.cli import main
from onnxpipe.quant import layer_alpha, quantize_model
from onnxpipe.quant.calibration import CalibrationConfig, feed_count, kv_feeds
from onnxpipe.quant.graph import expose_weights, float_session
from onnxpipe.quant.layer_alpha import OFF, Fit, fake_quant_uint8, group_loss, quant_weight_per_channel
from test_smoothquant import planted_model  # the tiny Llama with outlier channels planted

CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"
CALIB = CalibrationConfig(max_samples=8, prefill_len=32, decode_steps=2, batch_size=2)


def fit_of(x: np.ndarray) -> Fit:
    return Fit(x.min(0), x.max(0), x)


def test_fake_quant_uses_ort_scale_and_zero_point() -> None:
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    rng = np.random.default_rng(0)
    for lo, hi in [(-0.3, 5.0), (0.2, 3.0), (-4.0, -1.0), (-2.0, 2.0)]:
        zp, scale = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), np.array(0, np.uint8),
                                     np.array(255, np.uint8))
        x = rng.uniform(lo, hi, 1000).astype(np.float32)
        want = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
        np.testing.assert_allclose(fake_quant_uint8(x, lo, hi), want, rtol=0, atol=1e-6)
    w = rng.normal(size=(16, 4)).astype(np.float32)
    w[:, 2] *= 100.0
    wq = quant_weight_per_channel(w)
    step = np.abs(w).max(0) / 127.0
    assert np.all(np.abs(wq - w) <= step / 2 + 1e-7)  # one scale per output column, symmetric


def test_group_loss_sees_outlier_channels() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 32)).astype(np.float32)
    x[:, [3, 17]] *= 50.0
    w = [rng.normal(size=(32, 24)).astype(np.float32) / 6]
    losses = {a: group_loss(fit_of(x), x, w, a, "minmax") for a in (OFF,) + layer_alpha.GRID}
    best = min(losses, key=losses.get)
    assert best != OFF and losses[best] < 0.2 * losses[OFF], losses


def test_held_out_loss_uses_the_fitted_range() -> None:
    """The loss measured on rows the range was not fitted on counts their clipping; on the fitted rows it cannot."""
    rng = np.random.default_rng(1)
    fitted = rng.normal(size=(256, 16)).astype(np.float32)
    unseen = rng.normal(size=(256, 16)).astype(np.float32)
    unseen[::8, 5] = 40.0  # beyond anything fitted
    w = [rng.normal(size=(16, 8)).astype(np.float32)]
    in_sample = group_loss(fit_of(fitted), fitted, w, 0.5, "minmax")
    held_out = group_loss(fit_of(fitted), unseen, w, 0.5, "minmax")
    refitted = group_loss(fit_of(np.concatenate([fitted, unseen])), unseen, w, 0.5, "minmax")
    assert held_out > 10 * in_sample and held_out > 10 * refitted


def test_static_auto_records_a_per_group_choice_and_beats_plain_on_outliers(tok_model, small_eval: Path,
                                                                            tmp_path: Path) -> None:  # noqa: ANN001
    planted = planted_model(tok_model, tmp_path)
    kl = {}
    for sq in (None, "auto"):
        res = quantize_model(planted, tmp_path / f"q-{sq}", "static", eval_file=small_eval, eval_context=64,
                             calibration=CALIBRATION, per_channel=True, smoothquant=sq, calib=CALIB,
                             max_eval_tokens=1024)
        kl[sq] = res.step["quality"]["mean_kl"]
    assert kl["auto"] < 0.5 * kl[None], kl
    details = res.step["details"]
    search, smoothing = details["smoothquant_search"], details["smoothquant"]
    assert res.step["params"]["smoothquant"] == "auto"
    assert search["folds"] == layer_alpha.FOLDS and search["groups"] == len(search["alphas"]) >= 6
    for g in search["alphas"]:  # each group's alpha is its least loss, and the written model used it
        assert g["loss"] == min(g["losses"].values())
        assert g["loss_unsmoothed"] == g["losses"]["0.0"]
    written = {g["activation"]: g["alpha"] for g in smoothing["per_group"]}
    assert written == {g["activation"]: g["alpha"] for g in search["alphas"] if g["alpha"] != OFF}
    assert smoothing["alpha"] == "per group" and smoothing["groups"] + smoothing["unsmoothed"] == search["groups"]
    assert smoothing["equivalence_rel_err"] < 1e-5
    assert search["groups_off"] < search["groups"]


def test_every_group_off_falls_back_to_smoothing(tok_model, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """If no group gains from smoothing, the model is still smoothed (each group at its best alpha): asking for
    SmoothQuant never gets a model with none."""
    md = ModelDir.open(tok_model("gpt2"))
    proto = onnx.load(str(md.model_path))
    plan = expose_weights(proto, md.manifest.graph["logits"])
    body = [n for n in plan.linears if n != plan.lm_head]
    samples = np.random.default_rng(0).integers(0, 256, size=(4, CALIB.sample_len))
    monkeypatch.setattr(layer_alpha, "group_loss",
                        lambda fit, x, w, a, method, y=None: 0.0 if a == OFF else 1.0 + abs(a - 0.3))
    choice = layer_alpha.choose_group_alphas(proto, body, kv_feeds(float_session(proto), md.manifest, samples, CALIB),
                                             feed_count(samples, CALIB))
    assert choice.all_off_fallback and choice.groups
    assert all(g.alpha == 0.3 for g in choice.groups)
    assert choice.to_json()["groups_off"] == 0


def test_folds_split_the_calibration_batches(tok_model, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """With k folds each loss is measured on the batches the fit left out (k-1 of k batches fitted); with 1 on the
    fitted rows themselves."""
    md = ModelDir.open(tok_model("llama"))
    proto = onnx.load(str(md.model_path))
    plan = expose_weights(proto, md.manifest.graph["logits"])
    body = [n for n in plan.linears if n != plan.lm_head]
    samples = np.random.default_rng(0).integers(0, 256, size=(8, CALIB.sample_len))  # 4 batches of 2 windows
    seen: list[tuple[int, int, bool]] = []

    def spy(fit, x, w, a, method, y=None):  # noqa: ANN001, ANN202
        seen.append((len(fit.rows), len(x), fit.rows.shape == x.shape and bool(np.array_equal(fit.rows, x))))
        return 1.0

    monkeypatch.setattr(layer_alpha, "group_loss", spy)
    rows = 2 * CALIB.prefill_len + 2 * CALIB.decode_steps  # per batch
    for folds, fit_rows, eval_rows, overlap in [(4, 3 * rows, rows, False), (2, 2 * rows, 2 * rows, False),
                                                (1, 4 * rows, 4 * rows, True)]:
        seen.clear()
        layer_alpha.choose_group_alphas(proto, body, kv_feeds(float_session(proto), md.manifest, samples, CALIB),
                                        feed_count(samples, CALIB), folds=folds, grid=(0.5,))
        assert set(seen) == {(fit_rows, eval_rows, overlap)}, (folds, set(seen))


@pytest.mark.parametrize("extra, fragment", [
    (["--mode", "dynamic", "--smoothquant", "auto"], "--smoothquant auto applies to --mode static"),
])
def test_auto_is_static_only(tok_model, tmp_path: Path, extra: list[str], fragment: str) -> None:  # noqa: ANN001
    r = CliRunner().invoke(main, ["quantize", str(tok_model("llama")), "-o", str(tmp_path / "q"), *extra],
                           catch_exceptions=False)
    assert r.exit_code == 1 and fragment in r.output and "Traceback" not in r.output


def test_smoothquant_neither_number_nor_auto(tok_model, tmp_path: Path) -> None:  # noqa: ANN001
    r = CliRunner().invoke(main, ["quantize", str(tok_model("llama")), "-o", str(tmp_path / "q"), "--mode", "static",
                                  "--smoothquant", "strong"])
    assert r.exit_code == 2 and "neither a number nor 'auto'" in r.output


def test_rows_are_thinned_but_ranges_see_every_row(tok_model, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Past MAX_KEPT_VALUES only an even subsample of each batch's rows is kept for the losses, but the per-channel
    min/max (hence the minmax range and the smoothing scales) still come from every row."""
    md = ModelDir.open(tok_model("llama"))
    proto = onnx.load(str(md.model_path))
    plan = expose_weights(proto, md.manifest.graph["logits"])
    body = [n for n in plan.linears if n != plan.lm_head]
    samples = np.random.default_rng(0).integers(0, 256, size=(4, CALIB.sample_len))
    total = feed_count(samples, CALIB)
    full = layer_alpha.collect_fits(proto, body, kv_feeds(float_session(proto), md.manifest, samples, CALIB), total)
    monkeypatch.setattr(layer_alpha, "MAX_KEPT_VALUES", 1)  # 16 rows a feed
    thin = layer_alpha.collect_fits(proto, body, kv_feeds(float_session(proto), md.manifest, samples, CALIB), total)
    per_batch = 2 * CALIB.prefill_len + 2 * CALIB.decode_steps
    for name in full:
        assert [len(b.rows) for b in full[name]] == [per_batch, per_batch]
        assert [len(b.rows) for b in thin[name]] == [min(per_batch, 16 * (1 + CALIB.decode_steps))] * 2
        for f, t in zip(full[name], thin[name]):
            np.testing.assert_array_equal(f.cmin, t.cmin)
            np.testing.assert_array_equal(f.cmax, t.cmax)
