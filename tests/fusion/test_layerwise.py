"""The layer-by-layer form of optimize's check (fusion/layerwise.py) on a 4-layer Llama of the stamped export
(external data, weights named by layer): the segments, agreement with the whole-model form, faults caught and named
by layer, the CUDA form's right padding, and the weights read from the input's file as needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from tiny import make_tiny_model, save_byte_tokenizer

from onnxpipe.errors import OnnxpipeError
from onnxpipe.fusion import layerwise, optimize_model, pipeline

LAYERS = 4


@pytest.fixture(scope="module")
def stamped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnxpipe.export.method import export_model

    work = tmp_path_factory.mktemp("layerwise")
    hf = make_tiny_model("llama", work / "hf", num_hidden_layers=LAYERS)
    save_byte_tokenizer(hf)
    export_model(hf, work / "exported", method="stamped")
    return work / "exported"


def _caches(model_dir: Path) -> dict[str, tuple[int, str]]:
    from onnxpipe.artifact import ModelDir

    return layerwise.kv_caches(ModelDir.open(model_dir).manifest)


def _planted(layer: int, weight: str = "mlp.down_proj") -> pipeline.FusionPass:
    def double(model: ir.Model, ctx) -> dict:  # noqa: ANN001
        v = model.graph.initializers[f"model.model.layers.{layer}.{weight}.weight_T"]
        v.const_value = ir.tensor(np.asarray(v.const_value.numpy()) * 2, name=v.name)
        return {"doubled": v.name}

    return pipeline.FusionPass("planted", 1, double, f"doubles layer {layer}'s {weight}")


def _with_planted(monkeypatch: pytest.MonkeyPatch, planted: pipeline.FusionPass) -> None:
    monkeypatch.setattr(pipeline, "PASSES", (planted,) + pipeline.PASSES)
    monkeypatch.setattr(pipeline, "PASS_NAMES", (planted.name,) + pipeline.PASS_NAMES)


def test_segments_follow_the_layers(stamped: Path) -> None:
    import onnx

    graph = onnx.load(str(stamped / "model.onnx"), load_external_data=False).graph
    segments = layerwise.plan_segments(graph, _caches(stamped))
    assert [s.label for s in segments] == [-1, 0, 1, 2, 3, 4]
    for seg in segments[1:-1]:
        layer_weights = [n for n in seg.initializers if ".layers." in n]
        assert layer_weights and all(f".layers.{seg.label}." in n for n in layer_weights), seg.initializers
        assert {x for x in seg.inputs if x.startswith("past_key_values.")} == {
            f"past_key_values.{seg.label}.key", f"past_key_values.{seg.label}.value"}
        assert {f"present.{seg.label}.key", f"present.{seg.label}.value"} <= set(seg.outputs)
    assert "logits" in segments[-1].outputs and "input_ids" in segments[0].inputs
    # the LM head is a segment of its own (4: after the last layer), with no layer's weights beside it
    head = segments[-1]
    assert [n for n in head.initializers if "lm_head" in n] and not [n for n in head.initializers if ".layers." in n]
    assert any("embed_tokens" in n for n in segments[0].initializers)
    # every node in exactly one segment, in an order where each reads only what earlier ones made
    assert sorted(i for s in segments for i in s.nodes) == list(range(len(graph.node)))
    made = {v.name for v in graph.input}
    for seg in segments:
        assert set(seg.inputs) <= made
        made |= set(seg.outputs)


@pytest.mark.parametrize("weight", ["mlp.down_proj", "self_attn.k_proj"])
def test_a_weight_named_for_a_later_layer_keeps_each_cache_in_order(weight: str, stamped: Path) -> None:
    """A weight read in layer 1 under a name of layer 3 (a weight shared across layers) merges segments, or, where
    it would put a layer's cache after its next step's use, the nodes are labelled by the caches alone."""
    import onnx

    graph = onnx.load(str(stamped / "model.onnx"), load_external_data=False).graph
    old, new = f"model.model.layers.1.{weight}.weight_T", "shared.layers.3.weight"
    next(t for t in graph.initializer if t.name == old).name = new
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
    caches = _caches(stamped)
    segments = layerwise.plan_segments(graph, caches)
    made = {v.name for v in graph.input}
    for seg in segments:
        assert set(seg.inputs) <= made
        made |= set(seg.outputs)
        for past in set(seg.inputs) & set(caches) - set(seg.shape_only):
            assert caches[past][1] in seg.outputs  # step t's past is step t-1's present, made here


def test_weights_left_in_the_input_file_are_mapped_by_onnxruntime(stamped: Path) -> None:
    """A segment's unchanged weights point at the input's data file (onnxruntime maps them, nothing is copied); a
    weight a pass made is handed over from memory."""
    import onnx

    model = ir.load(str(stamped / "model.onnx"))
    pipeline.own_weights(model)
    layerwise.lazy_weights(model, stamped)
    down = model.graph.initializers["model.model.layers.1.mlp.down_proj.weight_T"]
    down.const_value = ir.tensor(np.asarray(down.const_value.numpy()), name=down.name)  # as a pass would
    snap = pipeline.snapshot(model)
    proto = onnx.ModelProto()
    proto.ParseFromString(snap.graph)
    seg = next(s for s in layerwise.plan_segments(proto.graph, _caches(stamped)) if s.label == 1)
    feed = {x: np.zeros((1,) * 4, np.float32) for x in seg.inputs}
    graph, handed, data_dir = layerwise.segment_graph(proto, seg, feed, snap.tensors)
    assert set(handed) == {down.name} and data_dir == str(stamped)
    sub = onnx.ModelProto()
    sub.ParseFromString(graph)
    located = {t.name: {e.key: e.value for e in t.external_data}["location"] for t in sub.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL}
    assert located.pop(down.name) == pipeline.PLACEHOLDER
    assert located and set(located.values()) == {"model.onnx.data"}


def test_layerwise_agrees_with_the_whole_model_check(stamped: Path, tmp_path: Path) -> None:
    results = {form: optimize_model(stamped, tmp_path / form, check_form=form) for form in ("whole", "layerwise")}
    for form, result in results.items():
        assert result.check.passed and result.check.rel_err < 1e-5, (form, result.check.summary())
        assert [r.status for r in result.passes] == [r.status for r in results["whole"].passes]
    final = results["layerwise"].check
    assert final.form == "layerwise" and len(final.kv_rel_err) == LAYERS and max(final.kv_rel_err) < 1e-5
    assert final.positions == results["whole"].check.positions
    manifest = results["layerwise"].model_dir.manifest
    assert manifest.steps[-1]["params"]["check_form"] == "layerwise"
    assert manifest.steps[-1]["check"]["kv_rel_err"] == final.kv_rel_err


@pytest.mark.parametrize(("layer", "weight", "named"), [
    (1, "mlp.down_proj", "first difference in layer 2's KV cache"),
    (2, "self_attn.k_proj", "first difference in layer 2's KV cache"),
    (0, "self_attn.v_proj", "first difference in layer 0's KV cache"),
    (LAYERS - 1, "mlp.down_proj", f"every layer's KV cache agrees: the difference is after layer {LAYERS - 1}'s"),
])
def test_a_fault_is_caught_and_its_layer_named(layer: int, weight: str, named: str, stamped: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _with_planted(monkeypatch, _planted(layer, weight))
    result = optimize_model(stamped, tmp_path / "out", passes=["planted", "norms"], check_form="layerwise")
    planted = result.passes[0]
    assert planted.status == "rolled_back" and planted.reason.startswith("parity failed"), planted.reason
    assert named in planted.reason and planted.check["divergence"] in planted.reason
    assert result.passes[1].status == "kept" and result.check.passed


@pytest.mark.parametrize(("family", "dtype"), [("gpt2", "fp32"), ("phi3", "fp32"), ("qwen3", "fp16")])
def test_other_families_and_fp16_check_layer_by_layer(family: str, dtype: str, tiny_onnx, tmp_path: Path) -> None:
    """Traced exports (one file, weights mostly unnamed: the caches label the layers), GPT-2's MultiHeadAttention
    form, Phi-3's packed projections, an fp16 cache."""
    result = optimize_model(tiny_onnx(family, dtype), tmp_path / "out", check_form="layerwise")
    attention = next(r for r in result.passes if r.name == "attention")
    assert attention.status == "kept" and attention.check["form"] == "layerwise", attention.reason
    assert result.check.passed and len(result.check.kv_rel_err) == 2
    assert max(result.check.kv_rel_err) <= (1e-2 if dtype == "fp16" else 1e-4)


def test_the_whole_model_form_catches_the_same_fault(stamped: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _with_planted(monkeypatch, _planted(LAYERS - 1))
    result = optimize_model(stamped, tmp_path / "out", passes=["planted"], check_form="whole")
    assert result.passes[0].status == "rolled_back" and "divergence" not in result.passes[0].check


def test_the_cuda_form_is_checked_layer_by_layer(stamped: Path, tmp_path: Path) -> None:
    """The CUDA form is fed right-padded (its graph notes say so): the logits are compared at the real positions,
    the caches, laid out differently, are not."""
    result = optimize_model(stamped, tmp_path / "out", target="cuda", check_form="layerwise")
    attention = next(r for r in result.passes if r.name == "attention")
    assert attention.status == "kept" and attention.check["kv_rel_err"] == [None] * LAYERS
    assert result.check.passed and result.model_dir.manifest.graph["padding_side"] == "right"


def test_lazy_weights_read_the_input_file_when_asked(stamped: Path, tmp_path: Path) -> None:
    model = ir.load(str(stamped / "model.onnx"))
    expected = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()
                if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes >= layerwise.LAZY_MIN_BYTES}
    assert layerwise.lazy_weights(model, stamped) == sum(a.nbytes for a in expected.values()) > 0
    for name, array in expected.items():
        t = model.graph.initializers[name].const_value
        assert isinstance(t, ir.LazyTensor) and np.array_equal(t.numpy(), array)
    # a data file cut short is an error naming the tensor, not a short array
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.onnx").write_bytes((stamped / "model.onnx").read_bytes())
    data = (stamped / "model.onnx.data").read_bytes()
    (copy / "model.onnx.data").write_bytes(data[: len(data) // 2])
    model = ir.load(str(copy / "model.onnx"))
    last = max((v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)
                and v.const_value.nbytes >= layerwise.LAZY_MIN_BYTES), key=lambda v: v.const_value.offset or 0)
    layerwise.lazy_weights(model, copy)
    with pytest.raises(OnnxpipeError, match=f"external data of {last.name} ends .* bytes early"):
        last.const_value.numpy()


def test_lazy_weights_refuse_a_data_file_linked_out_of_the_directory(stamped: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.data"
    outside.write_bytes((stamped / "model.onnx.data").read_bytes())
    inside = tmp_path / "model"
    inside.mkdir()
    (inside / "model.onnx").write_bytes((stamped / "model.onnx").read_bytes())
    os.symlink(outside, inside / "model.onnx.data")
    model = ir.load(str(inside / "model.onnx"))
    with pytest.raises(OnnxpipeError, match="symlink leading out of"):
        layerwise.lazy_weights(model, inside)


@pytest.mark.fast
def test_check_form_threshold_and_unknown_form() -> None:
    assert layerwise.check_form("auto", layerwise.LAYERWISE_BYTES - 1) == "whole"
    assert layerwise.check_form("auto", layerwise.LAYERWISE_BYTES) == "layerwise"
    assert layerwise.check_form("whole", 10**12) == "whole" and layerwise.check_form("layerwise", 0) == "layerwise"
    with pytest.raises(OnnxpipeError, match="unknown check form 'bogus'; choose one of auto, whole, layerwise"):
        layerwise.check_form("bogus", 0)


def test_running_out_of_memory_in_a_segment_is_an_error_not_a_rollback(stamped: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = pipeline._session

    def short_of_memory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if kwargs.get("one_cast_at_a_time"):
            raise MemoryError
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_session", short_of_memory)
    with pytest.raises(pipeline.ResourceError, match=r"out of memory checking the result \(pass norms\)"):
        optimize_model(stamped, tmp_path / "out", passes=["norms"], check_form="layerwise")
    assert not (tmp_path / "out").exists()


def test_the_cli_takes_the_check_form(stamped: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from onnxpipe.cli import main

    out = tmp_path / "opt"
    result = CliRunner().invoke(main, ["optimize", str(stamped), "-o", str(out), "--passes", "norms",
                                       "--check-form", "layerwise"])
    assert result.exit_code == 0, result.output
    assert "each checked layer by layer" in result.output
    step = json.loads((out / "onnxpipe.json").read_text())["steps"][-1]
    assert step["params"]["check_form"] == "layerwise" and step["check"]["form"] == "layerwise"
    bad = CliRunner().invoke(main, ["optimize", str(stamped), "-o", str(tmp_path / "x"), "--check-form", "parts"])
    assert bad.exit_code == 2 and "'parts' is not one of 'auto', 'whole', 'layerwise'" in bad.output
    assert not (tmp_path / "x").exists()
