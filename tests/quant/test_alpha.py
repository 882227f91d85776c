"""--smoothquant auto (alpha.py): static int8's SmoothQuant alpha chosen on the calibration prefills."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxpipe.cli import main
from onnxpipe.quant import alpha, quantize_model
from onnxpipe.quant.calibration import CalibrationConfig

CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"


def test_static_auto_keeps_the_least_kl_alpha(tok_model, small_eval: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(alpha, "ALPHAS", (0.25, 0.75))
    res = quantize_model(tok_model("llama"), tmp_path / "q", "static", eval_file=small_eval, eval_context=64,
                         calibration=CALIBRATION, per_channel=True, smoothquant="auto",
                         calib=CalibrationConfig(max_samples=4, prefill_len=32, decode_steps=3, batch_size=2))
    details = res.step["details"]
    search = details["smoothquant_search"]
    assert [c["alpha"] for c in search["candidates"]] == [0.25, 0.75]
    best = min(search["candidates"], key=lambda c: c["calibration_kl"])
    assert search["chosen"] == best["alpha"] == details["smoothquant"]["alpha"]  # the written model is that one
    assert all(c["calibration_kl"] > 0 for c in search["candidates"])
    assert res.step["params"]["smoothquant"] == "auto"
    assert not list(tmp_path.glob("**/.alpha-*"))  # the other candidate is gone


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
