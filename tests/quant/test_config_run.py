"""quantize_model with a ready QuantizeConfig: the run records what it derived (the eval file it read, the gate's
defaults) in the manifest step, and leaves the config as it was given."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant import Int4Config, QuantizeConfig, quantize_model
from onnxpipe.quant.calibration import CalibrationConfig

REPO = Path(__file__).resolve().parents[2]


def test_a_config_runs_and_the_derived_values_are_recorded(tok_model, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)  # data/eval.txt is then found in the source tree
    config = QuantizeConfig(Int4Config(algo="rtn", block_size=32, calib=CalibrationConfig(max_samples=2)),
                            max_eval_tokens=600, eval_context=64)
    before = dataclasses.asdict(config)
    result = quantize_model(tok_model("llama"), tmp_path / "q", config=config)
    assert dataclasses.asdict(config) == before
    params = json.loads((tmp_path / "q" / "onnxpipe.json").read_text())["steps"][-1]["params"]
    assert params["eval_file"] == str(REPO / "data" / "eval.txt")  # the file read, for a pinned int4 recipe too
    assert (params["algo"], params["block_size"], params["max_eval_tokens"]) == ("rtn", 32, 600)
    assert params["max_ppl_increase"] == 5.0 and params["min_greedy_agreement"] == 0.8  # the defaults, recorded
    assert "calibration" not in params  # RTN reads no calibration text
    assert result.step["params"] == params


@pytest.mark.fast
def test_a_config_and_options_together_are_refused(tmp_path: Path) -> None:
    config = QuantizeConfig(Int4Config(algo="rtn"))
    with pytest.raises(OnnxpipeError, match="a config or a mode with options, not both"):
        quantize_model(tmp_path / "in", tmp_path / "q", config=config, block_size=32)
    with pytest.raises(OnnxpipeError, match="a config or a mode with options, not both"):
        quantize_model(tmp_path / "in", tmp_path / "q", "dynamic", config=config)
