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


# the memory bound: GPTQ's calibration phase alone, in a child process, on a model of many small layers. Measured
# on the 2-core CPU (W = 154 MB of fp32 weights): layer by layer 1.06 W (1.14 before the C heap was trimmed after
# each layer input; in-process sampling put one segment's session at ~0.3 W and the Hessians of one layer with the
# inverse factor's float64 work arrays of the 1536-wide input at ~0.5 W: this shape's fixed part, not a share of W),
# the whole-model session's form 2.30-2.35 W
ADDED_X = 1.6
SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=256)
CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
import onnx_ir as ir
import onnxruntime  # noqa: F401 (its libraries are in the baseline)
from onnxpipe.artifact import ModelDir
from onnxpipe.quant import gptq_stream
from onnxpipe.quant.calibration import CalibrationConfig
from onnxpipe.quant.config import Int4Config
from onnxpipe.quant.quality import prefill_feed
from onnxpipe.quant.rtn_stream import read_plan

def status(key: str) -> int:  # VmHWM, this process's peak (ru_maxrss keeps the forking parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no " + key)

src, form, work, calibration = ModelDir.open(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
samples = np.load(sys.argv[5])  # tokenized by the parent: the tokenizer's libraries are not in this peak
# the whole form's Hessians one layer input at a time: what is compared is the activations' side
gptq_stream.HESSIAN_BYTES = 1
calib = CalibrationConfig(max_samples=8, prefill_len=64, decode_steps=0, batch_size=4)
cfg = Int4Config(algo="gptq", block_size=32, calibration=Path(calibration), calib=calib, lm_head="fp32",
                 embeddings="fp32")
model = ir.load(str(src.model_path))
plan = read_plan(model, src.manifest.graph["logits"])
feeds = gptq_stream.counted_feeds(lambda: (prefill_feed(src.manifest, samples[b:b + 4]) for b in range(0, 8, 4)), 2,
                                  None)
base, peak_before = status("VmRSS"), status("VmHWM")
details = gptq_stream.quantize_gptq_streamed(model, plan, cfg, feeds, work, manifest=src.manifest, form=form)
peak = status("VmHWM")
print(json.dumps({"base": base, "peak_before": peak_before, "peak": peak, "gptq": details["gptq"]}))
"""


def _calibration_phase(model_dir: Path, form: str, work: Path, samples: Path) -> dict:
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), form, str(work), str(CALIBRATION),
                          str(samples)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_layerwise_calibration_holds_one_layer_of_the_float_model(tmp_path: Path) -> None:
    """The memory GPTQ adds while it takes its layer inputs and quantizes (the child's peak RSS over its RSS before
    the call) on an external-data input of 12 small layers: within ADDED_X x W (the fp32 weight bytes) layer by
    layer; the whole-model session's form (the CPU's before) is past that bound on the same model."""
    import os

    from quant.conftest import external_copy, save_byte_tokenizer
    from tiny import make_tiny_model

    from onnxpipe.export import export_decoder
    from onnxpipe.quant.calibration import CalibrationConfig, calibration_samples
    from onnxpipe.quant.text import load_tokenizer

    hf = make_tiny_model("llama", tmp_path / "hf", **SHAPE)
    save_byte_tokenizer(hf)
    export_decoder(hf, tmp_path / "exported")
    external_copy(tmp_path / "exported", tmp_path / "onnx")  # as a large model's: read lazily, a weight at a time
    weights = sum(os.path.getsize(p) for p in (tmp_path / "onnx").glob("model.onnx*"))
    calib = CalibrationConfig(max_samples=8, prefill_len=64, decode_steps=0, batch_size=4)
    np.save(tmp_path / "samples.npy", calibration_samples(load_tokenizer(tmp_path / "onnx"), CALIBRATION, calib))
    added = {}
    for form in ("layerwise", "whole"):
        r = _calibration_phase(tmp_path / "onnx", form, tmp_path / f"work-{form}", tmp_path / "samples.npy")
        assert r["peak_before"] < r["peak"], form  # the peak is the calibration phase's
        assert r["gptq"]["activations"] == form and r["gptq"]["quantized_nodes"] == 7 * SHAPE["num_hidden_layers"]
        added[form] = (r["peak"] - r["base"]) / weights
    print(f"peak RSS added, x W ({weights / 1e6:.0f} MB): {added}")
    assert added["layerwise"] <= ADDED_X, added
    assert added["whole"] > ADDED_X, added  # the bound tells the forms apart
