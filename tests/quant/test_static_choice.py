"""static int8's default chooses among recipes on held-out text, as int4's does: the first within the gate is kept,
the table of those tried is printed and recorded; none within it fails writing nothing, naming the best and the
options that accept it; a pinned option narrows the list."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from onnxpipe.quant.static import CANDIDATES, StaticChoice, static_candidates

sys.path.insert(0, str(Path(__file__).parent))

from quant.conftest import CALIBRATION  # noqa: E402
from test_cli_quantize import FAST, invoke, one_line_error  # noqa: E402

MINMAX = "minmax, per-channel weights"
MINMAX_SQ = "minmax, per-channel weights, SmoothQuant auto"
PERCENTILE_SQ = "percentile, per-channel weights, SmoothQuant auto"


def test_pinned_options_narrow_the_list_and_values_outside_it_pin_one() -> None:
    assert [c.label() for c in static_candidates(None, None, None, None)] == [
        MINMAX, MINMAX_SQ, PERCENTILE_SQ, f"{PERCENTILE_SQ}, 16 layers fp32", f"{PERCENTILE_SQ}, 32 layers fp32"]
    assert static_candidates("minmax", None, None, None) == list(CANDIDATES[:2])
    assert static_candidates(None, None, "auto", None) == list(CANDIDATES[1:])
    assert static_candidates(None, None, "off", None) == [CANDIDATES[0]]
    assert static_candidates(None, None, None, 0) == list(CANDIDATES[:3])
    assert static_candidates("entropy", None, None, None) == [StaticChoice("entropy", True, None, 0)]
    assert static_candidates(None, False, None, None) == [StaticChoice("minmax", False, None, 0)]
    assert static_candidates("percentile", None, 0.5, 8) == [StaticChoice("percentile", True, 0.5, 8)]
    assert StaticChoice("percentile", True, "auto", 16).options() == [
        "--method percentile", "--per-channel", "--smoothquant auto", "--static-float-layers 16"]


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a sharpened output (final norm x8) and outlier channels planted on every norm output
    that feeds linear layers (x100 on 2 channels, weights divided back: float function unchanged): one calibrated
    range per tensor rounds the ordinary channels away, which SmoothQuant moves into the weights."""
    import onnx
    import torch
    from quant.conftest import save_byte_tokenizer
    from tiny import make_tiny_model
    from transformers import AutoModelForCausalLM

    from onnxpipe.artifact import ModelDir, copy_sidecar_files, derive_manifest, save_onnx, write_manifest
    from onnxpipe.export import export_decoder
    from onnxpipe.quant.graph import expose_weights
    from onnxpipe.quant.smoothquant import plant_outliers

    root = tmp_path_factory.mktemp("static-outliers")
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", root / "random"))
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    model.save_pretrained(root / "hf")
    save_byte_tokenizer(root / "hf")
    export_decoder(root / "hf", root / "onnx")
    md = ModelDir.open(root / "onnx")
    proto = onnx.load(str(md.model_path))
    assert plant_outliers(proto, expose_weights(proto, md.manifest.graph["logits"]).linears, 100.0, 2) >= 3
    out = root / "planted"
    out.mkdir()
    save_onnx(proto, out)
    copy_sidecar_files(md.path, out)
    write_manifest(out, derive_manifest(md.manifest))
    return out


def _static(model: Path, out: Path, small_eval: Path, *options: str):  # noqa: ANN202
    return invoke("quantize", model, "-o", out, "--mode", "static", "--calibration", CALIBRATION, "--eval", small_eval,
                  *FAST, *options)


def test_the_default_keeps_the_first_recipe_within_the_gate(outlier_model: Path, small_eval: Path,
                                                            tmp_path: Path) -> None:
    """Plain minmax fails on the planted outliers (+13.6% on the selection tokens here); SmoothQuant auto, the
    next in order, passes (+8.3%) and is kept: a budget between the two (the tiny model is far from lossless)."""
    out = tmp_path / "q"
    r = _static(outlier_model, out, small_eval, "--max-ppl-increase", "11", "--min-greedy-agreement", "60")
    assert r.exit_code == 0, r.output
    step = json.loads((out / "onnxpipe.json").read_text())["steps"][-1]
    tried = step["choice"]["tried"]
    assert [t["choice"] for t in tried] == [MINMAX, MINMAX_SQ]  # the first within the gate ends the list
    assert [t["verdict"] for t in tried] == ["over the perplexity budget", "within the budget: chosen"]
    assert tried[0]["ppl_change_pct"] > 11 > tried[1]["ppl_change_pct"]
    assert step["choice"]["chosen"] == MINMAX_SQ and step["choice"]["selection_tokens"] == 600
    p = step["params"]
    assert (p["method"], p["per_channel"], p["smoothquant"], p["static_float_layers"]) == ("minmax", True, "auto", 0)
    assert step["details"]["smoothquant_search"] and step["gate"]["passed"]
    assert "static: trying up to 5 choices in order" in r.output and f"chose {MINMAX_SQ}" in r.output
    for t in tried:  # the table printed each choice as it was judged
        assert t["choice"] in r.output


def test_none_within_the_gate_fails_writing_nothing_and_names_how_to_accept_the_best(
        outlier_model: Path, small_eval: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    out.mkdir()
    (out / "onnxpipe.json").write_text("{}")  # an earlier output, which --force may replace
    (out / "keep.txt").write_text("old")
    r = _static(outlier_model, out, small_eval, "--force")
    one_line_error(r, "no static choice passed the gate on the selection text (perplexity +2%",
                   "nothing was written", "To accept it: --method ", "--per-channel --smoothquant auto",
                   "--max-ppl-increase ")
    # the tiny model has 14 linear layers: 16 and 32 in fp32 cannot be made, and say so in the table
    assert "could not be made: --static-float-layers 16 leaves all 14 linear layers in fp32" in r.output
    assert (out / "keep.txt").read_text() == "old" and not list(tmp_path.glob(".onnxpipe-tmp-*"))
    accept = r.output.split("To accept it: ")[1].split()
    ok = _static(outlier_model, out, small_eval, "--force", *accept)  # the named options pin the best and accept it
    assert ok.exit_code == 0, ok.output
    assert "choices in order" not in ok.output  # pinned: judged alone, on the report
    step = json.loads((out / "onnxpipe.json").read_text())["steps"][-1]
    assert "choice" not in step and step["params"]["smoothquant"] == "auto" and not (out / "keep.txt").exists()


def test_a_pinned_recipe_outside_the_list_is_judged_alone(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "q"
    r = _static(tok_model("llama"), out, small_eval, "--per-tensor", "--smoothquant", "off")
    assert r.exit_code == 0, r.output
    assert "choices in order" not in r.output
    step = json.loads((out / "onnxpipe.json").read_text())["steps"][-1]
    p = step["params"]
    assert "choice" not in step and (p["method"], p["per_channel"], p["smoothquant"]) == ("minmax", False, None)
    assert "smoothquant" not in step["details"] and step["details"]["per_channel"] is False


def test_choices_that_differ_only_in_fp32_layers_calibrate_once(outlier_model: Path, small_eval: Path, tmp_path: Path,
                                                               monkeypatch) -> None:  # noqa: ANN001
    """The alphas are searched once per calibrator and the ranges measured once per (calibrator, smoothing): the
    last recipes of the list reuse the one before them (here 4 and 8 layers fp32, which the tiny model can make)."""
    import onnxruntime.quantization.calibrate as calibrate

    import onnxpipe.quant.layer_alpha as layer_alpha
    import onnxpipe.quant.static as static

    monkeypatch.setattr(static, "CANDIDATES", CANDIDATES[:3] + (StaticChoice("percentile", True, "auto", 4),
                                                               StaticChoice("percentile", True, "auto", 8)))
    calls = {"calibrations": 0, "alpha searches": 0}

    def spy(name: str, fn):  # noqa: ANN001, ANN202
        def wrapped(*a, **k):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(calibrate, "create_calibrator", spy("calibrations", calibrate.create_calibrator))
    monkeypatch.setattr(layer_alpha, "choose_group_alphas", spy("alpha searches", layer_alpha.choose_group_alphas))
    r = _static(outlier_model, tmp_path / "q", small_eval, "--min-greedy-agreement", "100")  # none can pass
    one_line_error(r, "no static choice passed the gate")
    for label in (f"{PERCENTILE_SQ}, 4 layers fp32", f"{PERCENTILE_SQ}, 8 layers fp32"):
        line = next(ln for ln in r.output.splitlines() if ln.strip().startswith(label))
        assert "% ± " in line and "could not be made" not in line  # made from the reused ranges, and judged
    assert calls == {"calibrations": 3, "alpha searches": 2}  # 5 without reuse, and 3 searches
    assert not (tmp_path / "q").exists()
