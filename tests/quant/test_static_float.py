"""--static-float-layers: static int8 leaves the layers whose calibrated input range is widest in fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.calibrate import TensorData, TensorsData, CalibrationMethod

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant import quantize_model
from onnxpipe.quant.calibration import CalibrationConfig
from onnxpipe.quant.static import widest_inputs_left_float

CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"
SMALL_CALIB = CalibrationConfig(max_samples=4, prefill_len=32, decode_steps=3, batch_size=2)


def test_widest_ranges_are_left_out() -> None:
    ranges = TensorsData(CalibrationMethod.MinMax, {
        "x0": TensorData(lowest=np.array([-1.0], np.float32), highest=np.array([1.0], np.float32)),
        "x1": TensorData(lowest=np.array([-8.0], np.float32), highest=np.array([3000.0], np.float32)),
        "x2": TensorData(lowest=np.array([-2.0], np.float32), highest=np.array([40.0], np.float32)),
    })
    inputs = {"a": "x0", "b": "x1", "c": "x2", "d": "x0"}  # d shares a's input
    kept, left = widest_inputs_left_float(inputs, ranges, 2)
    assert kept == ["a", "d"]
    assert [e["node"] for e in left] == ["b", "c"] and left[0]["range"] == 3008.0


def test_static_float_layers_on_a_tiny_model(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    quantize_model(tok_model("llama"), tmp_path / "q", "static", eval_file=small_eval, eval_context=64,
                   calib=SMALL_CALIB, calibration=CALIBRATION, per_channel=True, static_float_layers=3)
    md = ModelDir.open(tmp_path / "q")
    step = md.manifest.steps[-1]
    details = step["details"]
    assert step["params"]["static_float_layers"] == 3
    assert len(details["float_nodes"]) == 3 and details["quantized_nodes"] == 14 - 3
    widths = [e["range"] for e in details["float_nodes"]]
    assert widths == sorted(widths, reverse=True)
    graph = onnx.load(str(md.model_path)).graph
    by_output = {o: n for n in graph.node for o in n.output}
    for name in (e["node"] for e in details["float_nodes"]):  # still a float MatMul on a float activation
        node = next(n for n in graph.node if n.name == name)
        assert node.op_type == "MatMul" and by_output[node.input[0]].op_type != "DequantizeLinear"
    assert step["quality"]["top1_agreement"] > 0.7


def test_static_float_layers_is_static_only(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(OnnxpipeError, match="--static-float-layers applies to --mode static"):
        quantize_model(tok_model("llama"), tmp_path / "q", "dynamic", eval_file=small_eval, static_float_layers=2)
