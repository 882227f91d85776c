"""Export of every supported family: graph I/O, parity with PyTorch, the padded-batch property, external data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxpipe.artifact import ModelDir
from onnxpipe.export import archs, exporter
from onnxpipe.parity import ort_step_fn, position_ids_for, run_trace
from onnxpipe.runtime.sessions import reference_session
from tiny import TINY_CONFIGS


def test_every_tiny_config_is_a_supported_type():
    assert set(TINY_CONFIGS) <= set(archs.SUPPORTED)  # the rest of the registry: tests/export/test_archs.py


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_export_fp32_passes_parity(tiny_onnx, family):
    md = ModelDir.open(tiny_onnx(family))
    step = md.manifest.steps[-1]
    assert step["stage"] == "export"
    check = step["check"]
    assert check["passed"] is True
    assert check["rel_err"] <= 1e-4
    assert check["greedy_agreement"] == 1.0
    assert check["decode_steps"] >= 3 and check["batch"] == 2
    assert len(set(check["prompt_lengths"])) > 1  # the batch was padded

    proto = onnx.load(str(md.model_path), load_external_data=False)
    onnx.checker.check_model(proto)
    n = md.manifest.model["num_layers"]
    names = [i.name for i in proto.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert [o.name for o in proto.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.0.key"][0] == "batch_size" and dims["past_key_values.0.key"][2] == "past_sequence_length"
    assert md.manifest.model["family"] == family


def test_manifest_records_family_specifics(tiny_onnx):
    assert ModelDir.open(tiny_onnx("llama")).manifest.model["rope"]["type"] == "llama3"
    assert ModelDir.open(tiny_onnx("mistral")).manifest.model["sliding_window"] == 5
    assert ModelDir.open(tiny_onnx("llama")).manifest.model["attention"] == "gqa"
    assert ModelDir.open(tiny_onnx("gpt2")).manifest.model["attention"] == "mha"
    assert ModelDir.open(tiny_onnx("qwen3")).manifest.model["qk_norm"] is True


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_fp16_passes_parity(tiny_onnx, family):
    md = ModelDir.open(tiny_onnx(family, "fp16"))
    check = md.manifest.steps[-1]["check"]
    assert md.manifest.graph["dtype"] == "fp16"
    assert check["passed"] is True and check["rel_err"] <= 1e-2
    proto = onnx.load(str(md.model_path), load_external_data=False)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_left_padded_batch_equals_single_runs(tiny_onnx, family):
    """Each row of a left-padded batch gives the logits of the same prompt run alone (prefill + decode)."""
    md = ModelDir.open(tiny_onnx(family))
    step = ort_step_fn(reference_session(md.model_path), md.manifest)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, size=n) for n in (9, 3)]
    width = max(len(p) for p in prompts)
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    forced = rng.integers(3, 256, size=(2, 8))  # past the mistral window (5) to exercise it
    batch = run_trace(step, md.manifest, ids, mask, 8, np.float32, forced_tokens=forced)
    for r, p in enumerate(prompts):
        single = run_trace(step, md.manifest, p[None].astype(np.int64), np.ones((1, len(p)), np.int64), 8,
                           np.float32, forced_tokens=forced[r:r + 1])
        np.testing.assert_allclose(batch.logits[0][r, -1], single.logits[0][0, -1], atol=1e-5)
        for t in range(1, 9):
            np.testing.assert_allclose(batch.logits[t][r], single.logits[t][0], atol=1e-5)


def test_position_ids_skip_padding():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_for(mask, 5).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids_for(mask, 1).tolist() == [[2], [4]]


def test_external_data(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    exporter.export_decoder(tiny_hf("llama"), out)
    md = ModelDir.open(out)
    assert md.manifest.graph["external_data"] == "model.onnx.data"
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    assert md.manifest.steps[-1]["check"]["passed"] is True
    onnx.checker.check_model(str(md.model_path))


def test_failed_parity_writes_nothing(tiny_hf, tmp_path, monkeypatch):
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.export import verify

    monkeypatch.setitem(verify.TOLERANCE, "fp32", 1e-12)
    out = tmp_path / "strict"
    with pytest.raises(OnnxpipeError, match="parity check failed"):
        exporter.export_decoder(tiny_hf("gpt2"), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_manifest_is_complete_json(tiny_onnx):
    path = tiny_onnx("qwen2")
    data = json.loads((path / "onnxpipe.json").read_text())
    assert data["graph"]["kv"]["layout"] == "BNSH"
    assert data["graph"]["opset"] == 18
    assert data["steps"][0]["versions"]["torch"]
    assert (path / "config.json").is_file()
