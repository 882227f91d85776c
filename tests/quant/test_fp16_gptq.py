"""GPTQ and per-channel int4 of an fp16 model (the GPU path's input): the scales are fp16, as the activations are.

MatMulNBits and DequantizeLinear bind their scale to the activations' type; gptq.py wrote float32 scales whatever
the weights, so an fp16 model quantized by GPTQ (streamed or not) or per channel could not be loaded ("Type
parameter (T1) of Optype (MatMulNBits) bound to different types")."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from test_modes import CALIBRATION, check_directory, quantize

from onnxpipe.artifact import ModelDir

GATE_OFF = dict(max_ppl_increase=1000, min_greedy_agreement=0)


@pytest.fixture(scope="module")
def half(tok_model, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    eval_file = tmp_path_factory.mktemp("eval") / "eval.txt"
    eval_file.write_text((Path(__file__).resolve().parents[2] / "data" / "eval.txt").read_text()[:3000])
    return quantize(tok_model("llama"), tmp_path_factory.mktemp("fp16") / "half", "fp16", eval_file).path


@pytest.mark.parametrize("options", [
    dict(algo="gptq", block_size=32),  # gptq_stream
    dict(algo="gptq", block_size=0),  # gptq.py in memory, DequantizeLinear per channel
    dict(algo="rtn", block_size=0),  # int4.py's per-channel RTN, the same writer
])
def test_int4_of_an_fp16_model_has_fp16_scales(half: Path, small_eval: Path, tmp_path: Path, options: dict) -> None:
    md = quantize(half, tmp_path / "q", "int4", small_eval, calibration=CALIBRATION, **GATE_OFF, **options)
    check_directory(md, "int4")
    assert ModelDir.open(md.path).manifest.graph["dtype"] == "fp16"
    proto = onnx.load(str(md.model_path))
    inits = {t.name: t for t in proto.graph.initializer}
    scales = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "MatMulNBits"] + \
        [inits[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert len(scales) == 14 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    assert md.manifest.steps[-1]["quality"]["top1_agreement"] > 0.5
