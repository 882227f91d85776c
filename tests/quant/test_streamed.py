"""The streamed forms (quant/rtn_stream.py, gptq_stream.py, dynamic_stream.py) write the same model, bit for bit, as
the in-memory paths: int4 RTN as onnxruntime's MatMulNBitsQuantizer (fp32 and fp16 weights, blocks 32 and 128, with
and without zero points), GPTQ as gptq.gptq_quantize_graph (in one pass or one layer input per pass), dynamic int8
per token as dynamic.quantize_per_token; the input's external data read lazily, the output's written to a file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxpipe.artifact import ModelDir
from onnxpipe.quant.config import Int4Config
from onnxpipe.quant.graph import WeightPlan, expose_weights
from onnxpipe.quant.int4 import _nbits, _set_accuracy_level
from onnxpipe.quant.rtn_stream import quantize_block, quantize_rtn_streamed, read_plan, save_streamed

CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"


def _fp16(src: Path, dst: Path) -> Path:
    """A copy of the model directory with its float weights in fp16 (graph types untouched: only the weights are
    compared, never run)."""
    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / "model.onnx"))
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    onnx.save_model(proto, str(dst / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return dst


def _in_memory(model_path: Path, cfg: Int4Config, logits: str) -> onnx.ModelProto:
    """int4.quantize_int4's RTN path: the whole model to ORT's quantizer, the LM head left float."""
    proto = onnx.load(str(model_path))
    plan = expose_weights(proto, logits)
    body = [n for n in plan.linears if n != plan.lm_head]
    all_matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    proto = _nbits(proto, 4, cfg.block_size, body, all_matmuls, cfg.accuracy_level, "rtn", cfg.symmetric)
    _set_accuracy_level(proto, cfg.accuracy_level)
    return proto


def _tensors(proto: onnx.ModelProto, base: Path) -> dict[str, np.ndarray]:
    onnx.load_external_data_for_model(proto, str(base))
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def _nodes(proto: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, n.name, tuple(n.input), tuple(n.output),
             tuple(sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute)))
            for n in proto.graph.node]


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("block_size, symmetric", [(32, False), (128, False), (32, True)])
def test_streamed_rtn_is_ort_quantizers_model(tok_model, tmp_path: Path, fp16: bool, block_size: int,  # noqa: ANN001
                                              symmetric: bool) -> None:
    src = ModelDir.open(tok_model("llama"))
    model_path = _fp16(src.path, tmp_path / "in").joinpath("model.onnx") if fp16 else src.model_path
    logits = src.manifest.graph["logits"]
    cfg = Int4Config(algo="rtn", block_size=block_size, symmetric=symmetric, lm_head="fp32", embeddings="fp32")

    model = ir.load(str(model_path))
    plan = read_plan(model, logits)
    events: list[tuple[str, int, int]] = []
    details = quantize_rtn_streamed(model, WeightPlan(plan.linears, plan.lm_head, plan.embeddings), cfg,
                                    lambda *e: events.append(e))
    out = tmp_path / "out"
    out.mkdir()
    save_streamed(model, out / "model.onnx", external=True, progress=lambda *e: events.append(e))
    assert (out / "model.onnx.data").is_file() and details["quantized_nodes"] == len(plan.linears) - 1 == 14
    # each phase counts up to its total: the weights quantized, then the tensors written
    for label in ("int4 rtn: quantizing weights", "writing the weights"):
        counts = [(done, total) for what, done, total in events if what == label]
        assert counts and counts[-1][0] == counts[-1][1] and [d for d, _ in counts] == list(range(1, len(counts) + 1))

    streamed = onnx.load(str(out / "model.onnx"), load_external_data=False)
    reference = _in_memory(model_path, cfg, logits)
    assert _nodes(streamed) == _nodes(reference)
    got, want = _tensors(streamed, out), _tensors(reference, model_path.parent)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
    assert dict((o.domain, o.version) for o in streamed.opset_import) == \
        dict((o.domain, o.version) for o in reference.opset_import)


def test_quantize_block_pads_k_to_whole_blocks() -> None:
    """K = 40 with block 32: two blocks, the second padded with zeros, as onnxruntime's quantizer pads."""
    w = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    packed, scales, zero_points = quantize_block(w, 32, False)
    assert packed.shape == (6, 2, 16) and scales.shape == (6, 2) and zero_points.shape == (6, 1)
    q = np.stack([packed & 15, packed >> 4], -1).reshape(6, 64).astype(np.float32)
    zp = np.stack([zero_points & 15, zero_points >> 4], -1).reshape(6, 2).astype(np.float32)
    dq = ((q.reshape(6, 2, 32) - zp[..., None]) * scales[..., None]).reshape(6, 64)[:, :40].T
    assert np.abs(dq - w).max() <= scales.max() / 2 + 1e-6  # round to nearest: within half a step


def _samples(model_dir: Path) -> tuple[np.ndarray, object]:
    from onnxpipe.quant.calibration import CalibrationConfig, calibration_samples
    from onnxpipe.quant.text import load_tokenizer

    calib = CalibrationConfig(max_samples=4, prefill_len=32, decode_steps=0, batch_size=2)
    return calibration_samples(load_tokenizer(model_dir), CALIBRATION, calib), calib


def _external(src: Path, dst: Path) -> Path:
    """A copy of the model directory with its weights in model.onnx.data."""
    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / "model.onnx"))
    onnx.save_model(proto, str(dst / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return dst / "model.onnx"


@pytest.mark.parametrize("budget, external", [(1 << 40, False), (1, True)])  # one pass; one input's per pass
def test_streamed_gptq_is_the_in_memory_gptq(tok_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                             budget: int, external: bool) -> None:
    """gptq_stream (Hessians chunk by chunk, weights read lazily) writes gptq.gptq_quantize_graph's model."""
    import onnxpipe.quant.gptq_stream as gptq_stream
    from onnxpipe.quant.gptq_stream import counted_feeds, quantize_gptq_streamed
    from onnxpipe.quant.int4 import _gptq
    from onnxpipe.quant.quality import prefill_feed

    monkeypatch.setattr(gptq_stream, "HESSIAN_BYTES", budget)
    src = ModelDir.open(tok_model("llama"))
    logits = src.manifest.graph["logits"]
    samples, calib = _samples(src.path)
    cfg = Int4Config(algo="gptq", block_size=32, calibration=CALIBRATION, calib=calib, lm_head="fp32",
                     embeddings="fp32")
    model_path = _external(src.path, tmp_path / "in") if external else src.model_path

    model = ir.load(str(model_path))
    plan = read_plan(model, logits)
    feeds = counted_feeds(lambda: (prefill_feed(src.manifest, samples[b:b + 2]) for b in range(0, len(samples), 2)),
                          2, None)
    passes: list[str] = []
    details = quantize_gptq_streamed(model, plan, cfg, lambda label: (passes.append(label), feeds(label))[1],
                                     tmp_path / "work", form="whole")  # the layer-by-layer form: test_gptq_layerwise
    assert not (tmp_path / "work").exists()  # the activation model is gone
    assert len(passes) == details["gptq"]["passes"] == (1 if budget > 1 else details["gptq"]["hessians"])
    out = tmp_path / "out"
    out.mkdir()
    save_streamed(model, out / "model.onnx", external=True)

    proto = onnx.load(str(model_path))
    body = expose_weights(proto, logits)
    reference_details = _gptq(proto, [n for n in body.linears if n != body.lm_head], src.manifest, samples, cfg, None)
    _set_accuracy_level(proto, cfg.accuracy_level)
    streamed = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert _nodes(streamed) == _nodes(proto)
    got, want = _tensors(streamed, out), _tensors(proto, model_path.parent)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert np.array_equal(got[name], value), name
    assert details["gptq"]["proxy_loss_vs_rtn"] == pytest.approx(reference_details["proxy_loss_vs_rtn"], rel=1e-12)
    assert details["gptq"]["proxy_loss_vs_rtn"] < 1  # it compensated something


@pytest.mark.fast
def test_hessian_chunks_fit_the_budget() -> None:
    from onnxpipe.quant.gptq_stream import hessian_chunks

    sizes = {"a": 10, "b": 10, "c": 20, "d": 5}  # 800, 800, 3200, 200 bytes
    assert hessian_chunks(sizes, 1600) == [["a", "b"], ["c"], ["d"]]
    assert hessian_chunks(sizes, 1 << 20) == [["a", "b", "c", "d"]]
    assert hessian_chunks(sizes, 1) == [["a"], ["b"], ["c"], ["d"]]
    assert hessian_chunks({}, 1) == []


@pytest.mark.parametrize("external", [False, True])
def test_streamed_dynamic_token_is_the_in_memory_rewrite(tok_model, tmp_path: Path, external: bool) -> None:  # noqa: ANN001
    """dynamic_stream (int8 weights written to a spill file as they are made) writes dynamic.py's per-token model."""
    from onnxpipe.quant.dynamic import quantize_dynamic_int8
    from onnxpipe.quant.dynamic_stream import quantize_dynamic_streamed
    from onnxpipe.quant.rtn_stream import Spill

    src = ModelDir.open(tok_model("llama"))
    logits = src.manifest.graph["logits"]
    model_path = _external(src.path, tmp_path / "in") if external else src.model_path
    model = ir.load(str(model_path))
    plan = read_plan(model, logits)
    body = WeightPlan([n for n in plan.linears if n != plan.lm_head], None, plan.embeddings, plan.rewrites)
    out = tmp_path / "out"
    out.mkdir()
    spill = Spill(out / "model.onnx.spill")
    details = quantize_dynamic_streamed(model, body, "auto", spill)
    spill.close()
    save_streamed(model, out / "model.onnx", external=True)
    spill.remove()
    assert not (out / "model.onnx.spill").exists() and details["quantized_nodes"] == 14
    assert spill.bytes > 0

    proto = onnx.load(str(model_path))
    whole = expose_weights(proto, logits)
    ref_out = tmp_path / "ref"
    ref_out.mkdir()
    reference = quantize_dynamic_int8(proto, ref_out / "model.onnx", WeightPlan(
        [n for n in whole.linears if n != whole.lm_head], None, whole.embeddings), activations="token")
    assert {k: details[k] for k in reference} == reference
    written = onnx.load(str(ref_out / "model.onnx"), load_external_data=False)
    streamed = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert _nodes(streamed) == _nodes(written)
    got, want = _tensors(streamed, out), _tensors(written, ref_out)
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name


@pytest.mark.parametrize("mode, options, module", [
    ("int4", {"algo": "rtn", "block_size": 32}, "rtn_stream"),
    ("dynamic", {"activations": "token"}, "dynamic_stream"),
])
def test_streamed_command_writes_the_in_memory_model(tok_model, small_eval: Path, tmp_path: Path,  # noqa: ANN001
                                                     monkeypatch: pytest.MonkeyPatch, mode: str, options: dict,
                                                     module: str) -> None:
    """quantize_model end to end, the 8-bit vocabulary tables included (the default on an fp32 input: made on the
    streamed model before it is written, instead of on the written model reloaded): the same graph and weights."""
    import importlib

    from onnxpipe.quant import quantize_model

    fast = dict(eval_file=small_eval, eval_context=64, max_ppl_increase=1000, min_greedy_agreement=0)
    src = tok_model("llama")
    streamed = quantize_model(src, tmp_path / "streamed", mode, **fast, **options)
    monkeypatch.setattr(importlib.import_module(f"onnxpipe.quant.{module}"), "streams", lambda cfg: False)
    whole = quantize_model(src, tmp_path / "whole", mode, **fast, **options)
    assert "streamed" in streamed.step["details"] and "streamed" not in whole.step["details"]
    assert streamed.step["details"]["vocab_tables"] == whole.step["details"]["vocab_tables"]
    a = onnx.load(str(tmp_path / "streamed" / "model.onnx"))
    b = onnx.load(str(tmp_path / "whole" / "model.onnx"))
    assert _nodes(a) == _nodes(b)
    got, want = _tensors(a, tmp_path / "streamed"), _tensors(b, tmp_path / "whole")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert np.array_equal(got[name], value), name
    assert streamed.step["quality"]["ppl_after"] == whole.step["quality"]["ppl_after"]
