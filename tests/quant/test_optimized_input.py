"""The stage accepts any onnxpipe model directory: an optimized one (fused attention, skip norms, packed QKV)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxpipe.artifact import ModelDir
from onnxpipe.quant import quantize_model
from onnxpipe.quant.calibration import CalibrationConfig

CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"


@pytest.fixture(scope="module")
def optimized_llama(tok_model, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    from onnxpipe.fusion import optimize_model

    out = tmp_path_factory.mktemp("opt") / "llama-opt"
    optimize_model(tok_model("llama"), out, level=3)
    return out


@pytest.mark.parametrize("mode, options", [
    ("dynamic", {}),
    ("static", {"calibration": CALIBRATION, "smoothquant": 0.5, "per_channel": True}),
    ("int4", {"calibration": CALIBRATION, "algo": "gptq"}),
    ("fp16", {}),
])
def test_quantize_optimized(optimized_llama: Path, small_eval: Path, tmp_path: Path, mode: str, options: dict) -> None:
    src = ModelDir.open(optimized_llama)
    assert any(s["stage"] != "export" for s in src.manifest.steps)  # it really is an optimized directory
    quantize_model(optimized_llama, tmp_path / "q", mode, eval_file=small_eval, eval_context=64,
                   calib=CalibrationConfig(max_samples=4, prefill_len=32, decode_steps=3, batch_size=2), **options)
    md = ModelDir.open(tmp_path / "q")
    step = md.manifest.steps[-1]
    assert [s["stage"] for s in md.manifest.steps][:-1] == [s["stage"] for s in src.manifest.steps]
    assert step["quality"]["top1_agreement"] > 0.8 and step["check"]["greedy_agreement"] > 0.5
    if mode == "static":
        assert step["details"]["smoothquant"]["folded"] >= 1  # into the fused skip norms
