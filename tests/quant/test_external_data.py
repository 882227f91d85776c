"""Models past the external-data threshold through the quantizers.

A model over 2 GB cannot be one protobuf: its weights live in model.onnx.data, and an in-memory copy cannot be
serialized to open a session. A tiny model takes the same path here with artifact.EXTERNAL_DATA_THRESHOLD
lowered to 10 kB: the input has external data, the float sessions the quantizers open on their working copy
(activation statistics, GPTQ Hessians) go through a temporary directory, and the output is written with external
data, then loaded and run by the runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from quant.conftest import external_copy

from onnxpipe import artifact
from onnxpipe.artifact import ModelDir
from onnxpipe.quant import quantize_model
from onnxpipe.quant.calibration import CalibrationConfig

CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"
THRESHOLD = 10_000


@pytest.fixture()
def external_model(tok_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: ANN001
    dst = external_copy(tok_model("llama"), tmp_path / "external")
    monkeypatch.setattr(artifact, "EXTERNAL_DATA_THRESHOLD", THRESHOLD)
    return dst


def weights_outside(model_path: Path) -> tuple[int, int]:
    """(initializers stored in external data, bytes of the graph file)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    external = sum(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    return external, model_path.stat().st_size


@pytest.mark.parametrize("mode, options", [
    ("dynamic", {}),  # auto: statistics from a float session on the working copy
    ("int4", {"algo": "rtn", "block_size": 32}),  # ORT's MatMulNBits quantizer
    ("int4", {"algo": "gptq", "block_size": 0}),  # our GPTQ (Hessians from a float session), per channel
])
def test_quantize_a_model_with_external_data(external_model: Path, small_eval: Path, tmp_path: Path, mode: str,
                                             options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxpipe.quant.graph as graph

    assert weights_outside(external_model / "model.onnx")[0] > 0
    opened_from_disk = []
    real_session = graph.float_session

    def spy(proto):  # noqa: ANN001, ANN202
        opened_from_disk.append(graph.needs_external_data(proto))
        return real_session(proto)

    monkeypatch.setattr(graph, "float_session", spy)
    out = tmp_path / "q"
    result = quantize_model(external_model, out, mode, eval_file=small_eval, eval_context=64, calibration=CALIBRATION,
                            calib=CalibrationConfig(max_samples=4, prefill_len=32, decode_steps=3, batch_size=2),
                            **options)
    md = ModelDir.open(out)
    assert md.manifest.graph["external_data"] == "model.onnx.data" and (out / "model.onnx.data").is_file()
    external, graph_bytes = weights_outside(md.model_path)
    assert external > 0 and (out / "model.onnx.data").stat().st_size > THRESHOLD
    onnx.checker.check_model(str(md.model_path))  # by path: reads the external data too
    if mode == "dynamic" or options["algo"] == "gptq":
        assert opened_from_disk and all(opened_from_disk)  # the working copy was too big for one protobuf
    q = result.step["quality"]
    assert q["size_after"] > graph_bytes and np.isfinite(q["ppl_after"]) and q["top1_agreement"] > 0.5

    from onnxpipe import load

    lm = load(out, provider="cpu")
    r = lm.generate([5, 6, 7, 8], max_new_tokens=4)
    assert 1 <= len(r.token_ids) <= 4 and r.finish_reason in ("length", "eos")
