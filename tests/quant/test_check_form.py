"""quantize's checks layer by layer (--check-form layerwise: runtime/layerwise.py), the form large models take.

The quality report and the decode-path check run each model one layer's segment at a time, the input model first,
then the quantized one (never both); they must give the whole-model form's figures, and still fail a broken
quantization: a planted fault (one layer's int4 scales scaled up after RTN) fails the gate in both forms, and the
layer-by-layer decode check names the first layer whose KV cache differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from quant.conftest import external_copy

from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant import quantize_model
from onnxpipe.quant.quality import DECODE_STEPS

INT4 = {"algo": "rtn", "block_size": 32, "float_zero_points": False}  # one choice: streamed RTN
OPEN = {"min_greedy_agreement": 0.0, "max_ppl_increase": 1000.0, "max_eval_tokens": 256}


@pytest.fixture()
def external_model(tok_model, tmp_path: Path) -> Path:  # noqa: ANN001
    """The tiny Llama with its weights in model.onnx.data, as a large model's are."""
    dst = external_copy(tok_model("llama"), tmp_path / "external")
    return dst


@pytest.mark.parametrize("mode, options, stored", [("int4", INT4, "external"), ("dynamic", {"activations": "token"},
                                                                            "external"), ("int4", INT4, "inline")])
def test_layerwise_checks_give_the_whole_forms_figures(external_model: Path, tok_model, small_eval: Path,  # noqa: ANN001
                                                       tmp_path: Path, mode: str, options: dict, stored: str) -> None:
    """An external-data input (weights mapped from the files) and a single-file one (weights read once, handed to
    each segment's session)."""
    src = external_model if stored == "external" else tok_model("llama")
    steps = {}
    for form in ("whole", "layerwise"):
        out = quantize_model(src, tmp_path / form, mode, eval_file=small_eval, check_form=form, **options, **OPEN)
        steps[form] = out.step
    whole, layerwise = steps["whole"], steps["layerwise"]
    assert whole["check_form"] == "whole" and layerwise["check_form"] == "layerwise"
    for key in ("ppl_before", "ppl_after", "mean_kl", "top1_agreement", "greedy_agreement"):
        assert layerwise["quality"][key] == pytest.approx(whole["quality"][key], rel=1e-3, abs=1e-6), key
    assert layerwise["quality"]["eval_tokens"] == whole["quality"]["eval_tokens"]
    assert layerwise["check"]["form"] == "layerwise" and len(layerwise["check"]["kv_rel_err"]) == 2
    # the decode check's tokens differ (the whole form follows the input's greedy tokens, the layer-by-layer form
    # seeded ones, drawn before the segments run): the same order of error, not the same number
    assert 0.5 < layerwise["check"]["rel_err"] / whole["check"]["rel_err"] < 2
    assert not list((tmp_path / "layerwise").glob(".quality-*")) and not list(tmp_path.glob(".onnxpipe-tmp-*"))


def plant_scaled_scales(monkeypatch: pytest.MonkeyPatch, layer: int = 0, factor: float = 64.0) -> list[str]:
    """After streamed RTN, layer ``layer``'s down projection's int4 scales multiplied by ``factor`` (a broken
    quantization of one weight). Returns the names of the scales changed."""
    import onnx_ir as ir

    from onnxpipe.quant import rtn_stream

    real, planted = rtn_stream.quantize_rtn_streamed, []

    def broken(model, plan, cfg, progress=None):  # noqa: ANN001, ANN202
        details = real(model, plan, cfg, progress)
        # the down projections, in graph order: those reading the MLP's width (the widest K)
        nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
        widest = max(n.attributes["K"].value for n in nbits)
        node = [n for n in nbits if n.attributes["K"].value == widest][layer]
        scales = node.inputs[2]
        scales.const_value = ir.tensor(np.asarray(scales.const_value.numpy()) * factor, name=scales.name)
        planted.append(scales.name)
        return details

    monkeypatch.setattr(rtn_stream, "quantize_rtn_streamed", broken)
    return planted


def test_the_layerwise_checks_pass_a_sound_quantization_and_catch_a_planted_fault(
        external_model: Path, small_eval: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bar: list[tuple[int, int]] = []  # the quality report's progress: windows, greedy steps, windows
    sound = quantize_model(external_model, tmp_path / "sound", "int4", eval_file=small_eval, check_form="layerwise",
                           max_eval_tokens=256, progress=lambda label, d, t: bar.append((d, t))
                           if label == "quality report" else None, **INT4).step
    assert sound["gate"]["passed"] and sound["check_form"] == "layerwise"
    windows = sound["quality"]["windows"]
    assert {t for _, t in bar} == {2 * windows + DECODE_STEPS + 1} and bar[-1][0] == bar[-1][1]
    assert [d for d, _ in bar] == sorted(d for d, _ in bar) and len(bar) >= DECODE_STEPS + 1
    planted = plant_scaled_scales(monkeypatch, layer=0)
    with pytest.raises(OnnxpipeError, match=r"failed the quality gate on the report text: .*FAIL.*nothing was "
                                            r"written"):
        quantize_model(external_model, tmp_path / "q", "int4", eval_file=small_eval, check_form="layerwise",
                       max_eval_tokens=256, **INT4)
    assert planted and not (tmp_path / "q").exists() and not list(tmp_path.glob(".onnxpipe-tmp-*"))
    # with the gate open, the decode check's caches say where: layer 0's are as the sound run's (its K/V come
    # before its down projection), layer 1's are far off
    broken = quantize_model(external_model, tmp_path / "open", "int4", eval_file=small_eval, check_form="layerwise",
                            **INT4, **OPEN).step
    assert broken["check"]["kv_rel_err"][0] == pytest.approx(sound["check"]["kv_rel_err"][0], rel=1e-6)
    assert broken["check"]["kv_rel_err"][1] > 3 * sound["check"]["kv_rel_err"][1]
    assert broken["quality"]["greedy_agreement_ties"] < 0.8 < sound["quality"]["greedy_agreement_ties"]


def test_a_planted_fault_fails_the_gate_in_the_whole_form_too(external_model: Path, small_eval: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    plant_scaled_scales(monkeypatch, layer=0)
    with pytest.raises(OnnxpipeError, match=r"failed the quality gate on the report text: .*FAIL"):
        quantize_model(external_model, tmp_path / "q", "int4", eval_file=small_eval, check_form="whole",
                       max_eval_tokens=256, **INT4)


@pytest.mark.fast
def test_a_segment_prepacks_only_where_it_holds_integer_weights() -> None:
    """MatMulNBits runs its int8 path only on prepacked weights (the quantized model as a user runs it); a float
    segment's weights are not copied by prepacking."""
    from onnx import TensorProto, helper

    from onnxpipe.runtime.layerwise import needs_prepacking

    def graph(dtype: int, values: np.ndarray) -> bytes:
        w = helper.make_tensor("w", dtype, list(values.shape), values.flatten().tolist())
        g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", dtype, list(values.shape))], [w])
        return helper.make_model(g).SerializeToString()

    assert needs_prepacking(graph(TensorProto.UINT8, np.zeros((4, 8), np.uint8)))
    assert needs_prepacking(graph(TensorProto.INT8, np.zeros((4, 8), np.int8)))
    assert not needs_prepacking(graph(TensorProto.FLOAT16, np.zeros((4, 8), np.float16)))
    assert not needs_prepacking(graph(TensorProto.FLOAT, np.zeros((4, 8), np.float32)))
    assert not needs_prepacking(graph(TensorProto.UINT8, np.zeros((2,), np.uint8)))  # a zero point, not a weight


@pytest.mark.fast
def test_the_check_form_is_checked_before_any_work(tmp_path: Path) -> None:
    from onnxpipe.quant.quality import side_form

    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    with pytest.raises(OnnxpipeError, match="unknown check form 'layer'"):
        side_form("layer", model, "cpu")
    with pytest.raises(OnnxpipeError, match="--check-form layerwise runs on the CPU"):
        side_form("layerwise", model, "cuda")
    assert side_form("auto", model, "cuda") == "whole" and side_form("layerwise", model, "cpu") == "layerwise"
