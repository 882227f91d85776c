"""GPTQ's layer inputs from the float model run one segment at a time (gptq_stream's ``layerwise`` form, the CPU's
default): the same int4 model, bit for bit, as the whole-model session's form (and so as gptq.py in memory,
tests/quant/test_streamed.py), one pass over the calibration prefills, the LM head's product not run; and a memory
bound that the whole-model session's form breaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from quant.test_streamed import CALIBRATION, _external, _nodes, _samples, _tensors

from onnxpipe.errors import OnnxpipeError


def _quantize(src: object, model_path: Path, work: Path, form: str) -> tuple[dict, onnx.ModelProto, Path]:
    """quantize_gptq_streamed on ``model_path`` in ``form``; (its details, the model written, its directory)."""
    import onnx_ir as ir

    from onnxpipe.quant.config import Int4Config
    from onnxpipe.quant.gptq_stream import counted_feeds, quantize_gptq_streamed
    from onnxpipe.quant.quality import prefill_feed
    from onnxpipe.quant.rtn_stream import read_plan, save_streamed

    manifest = src.manifest  # type: ignore[attr-defined]
    samples, calib = _samples(src.path)  # type: ignore[attr-defined]
    cfg = Int4Config(algo="gptq", block_size=32, calibration=CALIBRATION, calib=calib, lm_head="int4",
                     embeddings="fp32")
    model = ir.load(str(model_path))
    feeds = counted_feeds(lambda: (prefill_feed(manifest, samples[b:b + 2]) for b in range(0, len(samples), 2)),
                          2, None)
    passes: list[str] = []
    details = quantize_gptq_streamed(model, read_plan(model, manifest.graph["logits"]), cfg,
                                     lambda label: (passes.append(label), feeds(label))[1], work / f"act-{form}",
                                     manifest=manifest, form=form)
    assert not (work / f"act-{form}").exists()  # the activation model's copy is gone
    assert len(passes) == details["gptq"]["passes"]
    out = work / f"out-{form}"
    out.mkdir()
    save_streamed(model, out / "model.onnx", external=True)
    return details, onnx.load(str(out / "model.onnx"), load_external_data=False), out


@pytest.mark.parametrize("external", [False, True])
def test_layerwise_gives_the_whole_sessions_int4_weights(tok_model, tmp_path: Path, external: bool) -> None:  # noqa: ANN001
    from onnxpipe.artifact import ModelDir

    src = ModelDir.open(tok_model("llama"))
    model_path = _external(src.path, tmp_path / "in") if external else src.model_path
    got_details, got, got_dir = _quantize(src, model_path, tmp_path, "layerwise")
    want_details, want, want_dir = _quantize(src, model_path, tmp_path, "whole")
    g = got_details["gptq"]
    assert g["activations"] == "layerwise" and g["passes"] == 1
    assert g["segments"] >= src.manifest.num_layers
    assert want_details["gptq"]["activations"] == "whole"
    # every linear layer, the LM head too (its input is the final norm's output: its own product is not needed)
    assert g["quantized_nodes"] == want_details["gptq"]["quantized_nodes"] == 15
    assert _nodes(got) == _nodes(want)
    got_t, want_t = _tensors(got, got_dir), _tensors(want, want_dir)
    assert sorted(got_t) == sorted(want_t)
    assert sum(1 for n in got.graph.node if n.op_type == "MatMulNBits") == 15
    for name, value in want_t.items():
        assert got_t[name].dtype == value.dtype and np.array_equal(got_t[name], value), name
    assert g["proxy_loss_vs_rtn"] == want_details["gptq"]["proxy_loss_vs_rtn"] < 1
    # one layer's Hessians at a time, where the whole form held every layer's (its budget fits them all here)
    assert 0 < g["hessian_bytes_at_once"] < want_details["gptq"]["hessian_bytes_at_once"]


@pytest.mark.fast
def test_needed_only_drops_what_the_named_outputs_do_not_need() -> None:
    import onnx_ir as ir

    from onnxpipe.quant.gptq_stream import needed_only

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((4, 4), np.float32), name="w"))
    norm = ir.node("Mul", [x, x], name="norm")
    head = ir.node("MatMul", [norm.outputs[0], w], name="head")
    norm.outputs[0].name, head.outputs[0].name = "normed", "logits"
    graph = ir.Graph([x], [head.outputs[0]], nodes=[norm, head], initializers=[w], opset_imports={"": 18})
    serialized = ir.serde.serialize_model(ir.Model(graph, ir_version=10)).SerializeToString()
    cut = onnx.ModelProto()
    cut.ParseFromString(needed_only(serialized, ["normed"]))
    assert [n.name for n in cut.graph.node] == ["norm"]
    assert [o.name for o in cut.graph.output] == ["normed"]
    whole = onnx.ModelProto()
    whole.ParseFromString(needed_only(serialized, ["normed", "logits"]))
    assert [n.name for n in whole.graph.node] == ["norm", "head"]


@pytest.mark.fast
@pytest.mark.parametrize("form, provider, message", [("sideways", "cpu", "unknown GPTQ activation form 'sideways'"),
                                                     ("layerwise", "cpu", "manifest missing"),
                                                     ("layerwise", "cuda", "provider cuda")])
def test_a_form_that_cannot_run_is_refused(tmp_path: Path, form: str, provider: str, message: str) -> None:
    import onnx_ir as ir

    from onnxpipe.quant.config import Int4Config
    from onnxpipe.quant.gptq_stream import quantize_gptq_streamed
    from onnxpipe.quant.graph import WeightPlan

    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18}), ir_version=10)
    cfg = Int4Config(algo="gptq", block_size=32, calibration=CALIBRATION)
    with pytest.raises(OnnxpipeError, match=message):
        quantize_gptq_streamed(model, WeightPlan([], None, [], []), cfg, lambda label: iter(()), tmp_path / "w",
                               provider, form=form)
    assert not (tmp_path / "w").exists()
