"""Each mode on a tiny model: a valid model that runs (prefill and decode), the ops it should have, and a
quality report with every field, recorded in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant import quantize_model
from onnxpipe.quant.calibration import CalibrationConfig

CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"

QUALITY_FIELDS = {"ppl_before", "ppl_after", "ppl_change_pct", "top1_agreement", "mean_kl", "size_before",
                  "size_after", "size_ratio", "eval_tokens", "windows", "context", "eval_file"}
SMALL_CALIB = CalibrationConfig(max_samples=4, prefill_len=32, decode_steps=3, batch_size=2)


def quantize(src: Path, out: Path, mode: str, eval_file: Path, **kw) -> ModelDir:  # noqa: ANN003
    quantize_model(src, out, mode, eval_file=eval_file, eval_context=64, calib=SMALL_CALIB, **kw)
    return ModelDir.open(out)


def check_directory(md: ModelDir, mode: str) -> dict:
    onnx.checker.check_model(str(md.model_path))
    step = md.manifest.steps[-1]
    assert step["stage"] == "quantize" and step["params"]["mode"] == mode
    q = step["quality"]
    assert QUALITY_FIELDS <= set(q)
    assert q["eval_tokens"] > 100 and 0.0 <= q["top1_agreement"] <= 1.0 and q["mean_kl"] >= 0.0
    assert np.isfinite(q["ppl_after"]) and q["ppl_after"] > 1.0
    assert abs(q["ppl_change_pct"] - (q["ppl_after"] / q["ppl_before"] - 1) * 100) < 1e-9
    assert step["check"]["decode_steps"] == 4 and step["check"]["greedy_agreement"] > 0.5
    assert md.manifest.steps[0]["stage"] == "export"  # the input's history is kept
    assert (md.path / "tokenizer.json").is_file() and (md.path / "config.json").is_file()
    json.loads((md.path / "onnxpipe.json").read_text())
    return step


def ops(md: ModelDir) -> dict[str, int]:
    from onnxpipe.quant.graph import op_counts

    return op_counts(onnx.load(str(md.model_path)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dynamic(tok_model, small_eval: Path, tmp_path: Path, family: str) -> None:  # noqa: ANN001
    md = quantize(tok_model(family), tmp_path / "q", "dynamic", small_eval)
    step = check_directory(md, "dynamic")
    counts = ops(md)
    details = step["details"]
    assert step["params"]["activations"] == "auto" and details["calibration_feeds"] == 2
    # auto: every body layer input measured and given a scheme; each quantized layer has one integer product
    assert sum(len(c["nodes"]) for c in details["activation_choice"]) == details["quantized_nodes"]
    assert {c["scheme"] for c in details["activation_choice"]} <= {"token", "tensor"}
    # per token everywhere (a row's result does not depend on its batch): QuantizeLinear per input, one
    # MatMulInteger per layer, nothing per tensor
    assert counts.get("MatMulInteger", 0) == details["per_token_nodes"] == details["quantized_nodes"] > 0
    assert counts.get("QuantizeLinear", 0) == len(details["activation_choice"])
    assert "DynamicQuantizeLinear" not in counts and details["batch_independent"] is True
    assert step["details"]["lm_head"].startswith("int8 per row")
    assert step["details"]["embeddings"] == "int8 per row"
    if family == "gpt2":  # tied: one 8-bit table serves the lookup and the head
        assert "shared" in step["details"]["lm_head"]
    assert step["quality"]["size_after"] < 0.5 * step["quality"]["size_before"] + 0.35e6  # + the fixed graph overhead
    assert step["quality"]["top1_agreement"] > 0.8


@pytest.mark.parametrize("budget, expect", [(100.0, "cheapest"), (-1.0, "least loss")])
def test_dynamic_auto_search(tok_model, small_eval: Path, tmp_path: Path, monkeypatch, budget: float,
                             expect: str) -> None:  # noqa: ANN001
    """auto is per token everywhere first; a budget that candidate meets keeps it; one no candidate can meet
    (negative) ranks the layers by effect, bisects over their worst 1, 2, 4, 8 left float, and keeps the one whose
    held-out calibration perplexity rose least."""
    import onnxpipe.quant.dynamic as dynamic

    monkeypatch.setattr(dynamic, "PPL_BUDGET_PCT", budget)
    md = quantize(tok_model("llama"), tmp_path / "q", "dynamic", small_eval)
    details = check_directory(md, "dynamic")["details"]
    search = details["activation_search"]
    tried = search["candidates"]
    assert search["budget_pct"] == budget and search["float_calibration_ppl"] > 1.0 and search["held_out_tokens"] > 0
    assert tried[0]["float_nodes"] == 0 and tried[0]["per_token_nodes"] == 14  # per token everywhere first
    changes = [c["calibration_ppl_change_pct"] for c in tried]
    if expect == "cheapest":
        assert len(tried) == 1 and details["float_nodes"] == [] and search["ranking_tokens"] == 0
    else:
        assert {c["float_nodes"] for c in tried[1:]} <= {1, 2, 4, 8} and len(tried) >= 3
        assert search["within_budget"] is False and len(details["layer_effects"]) == 14
        best = tried[changes.index(min(changes))]
        assert len(details["float_nodes"]) == best["float_nodes"] == search["chosen_float_nodes"]
        assert details["float_nodes"] == [e["node"] for e in details["layer_effects"][:best["float_nodes"]]]
        assert all(name.startswith("layers.") for name in details["float_layers"])
    assert details["quantized_nodes"] + len(details["float_nodes"]) == 14
    assert details["per_token_nodes"] == details["quantized_nodes"] == ops(md).get("MatMulInteger", 0)
    assert ops(md).get("MatMul", 0) >= len(details["float_nodes"])


def test_dynamic_lm_head_fp32_keeps_head_float(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    md = quantize(tok_model("llama"), tmp_path / "q", "dynamic", small_eval, lm_head="fp32", embeddings="fp32",
                  activations="tensor")
    step = check_directory(md, "dynamic")
    assert step["details"]["lm_head"] == "fp32" and "vocab_tables" not in step["details"]
    assert ops(md).get("MatMulInteger") == step["details"]["quantized_nodes"] == 14
    assert "calibration" not in step["params"]  # per tensor everywhere: nothing to measure


def test_dynamic_per_token_everywhere(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    md = quantize(tok_model("llama"), tmp_path / "q", "dynamic", small_eval, activations="token")
    step = check_directory(md, "dynamic")
    assert ops(md).get("MatMulInteger") == step["details"]["per_token_nodes"] == 14
    assert "DynamicQuantizeLinear" not in ops(md) and "com.microsoft::DynamicQuantizeMatMul" not in ops(md)


@pytest.mark.parametrize("method, smooth", [("minmax", None), ("entropy", None), ("percentile", 0.5)])
def test_static(tok_model, small_eval: Path, tmp_path: Path, method: str, smooth: float | None) -> None:  # noqa: ANN001
    md = quantize(tok_model("llama"), tmp_path / "q", "static", small_eval, calibration=CALIBRATION, method=method,
                  per_channel=True, smoothquant=smooth)
    step = check_directory(md, "static")
    counts = ops(md)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    assert step["details"]["calibration_runs"] == 2 * (1 + 3)  # 2 batches: prefill + 3 decode steps each
    assert step["params"]["method"] == method
    if smooth:
        sq = step["details"]["smoothquant"]
        assert sq["groups"] > 0 and sq["equivalence_rel_err"] < 1e-5
    assert step["quality"]["top1_agreement"] > 0.7


@pytest.mark.parametrize("algo", ["rtn", "hqq", "gptq"])
def test_int4(tok_model, small_eval: Path, tmp_path: Path, algo: str) -> None:  # noqa: ANN001
    md = quantize(tok_model("llama"), tmp_path / "q", "int4", small_eval, algo=algo, calibration=CALIBRATION)
    step = check_directory(md, "int4")
    proto = onnx.load(str(md.model_path))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 15  # 14 linear layers + the LM head
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert all(a["accuracy_level"] == 4 for a in attrs)
    assert sorted(a["bits"] for a in attrs) == [4] * 14 + [8]  # the head gets 8 bits per vocabulary row
    assert step["details"]["lm_head"] == "int8 per row" and step["details"]["embeddings"] == "int8 per row"
    if algo == "gptq":
        assert step["details"]["gptq"]["proxy_loss_vs_rtn"] < 1.0


@pytest.mark.parametrize("algo", ["rtn", "gptq"])
def test_int4_per_channel(tok_model, small_eval: Path, tmp_path: Path, algo: str) -> None:  # noqa: ANN001
    """--block-size 0: uint4 DequantizeLinear per output channel -> MatMul (opset 21), fused by ORT into MatMulNBits."""
    import onnxruntime as ort

    md = quantize(tok_model("llama"), tmp_path / "q", "int4", small_eval, algo=algo, block_size=0,
                  calibration=CALIBRATION)
    step = check_directory(md, "int4")
    proto = onnx.load(str(md.model_path))
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == step["details"]["quantized_nodes"] == 14 and step["details"]["block_size"] == "per channel"
    inits = {t.name: t for t in proto.graph.initializer}
    k, n = inits[dq[0].input[0]].dims
    assert inits[dq[0].input[0]].data_type == onnx.TensorProto.UINT4 and list(inits[dq[0].input[1]].dims) == [n]
    assert md.manifest.graph["opset"] == 21
    assert step["quality"]["size_after"] < 0.35 * step["quality"]["size_before"] + 0.35e6
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(md.model_path), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("MatMulNBits") == 15 and "DequantizeLinear" not in fused  # 14 + the 8-bit head
    if algo == "gptq":
        assert step["details"]["gptq"]["proxy_loss_vs_rtn"] < 1.0


def test_int4_gpt2_head_int4(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    md = quantize(tok_model("gpt2"), tmp_path / "q", "int4", small_eval, lm_head="int4", block_size=16)
    check_directory(md, "int4")
    assert ops(md).get("com.microsoft::MatMulNBits") == 9 and "Gemm" not in ops(md)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fp16(tok_model, small_eval: Path, tmp_path: Path, family: str) -> None:  # noqa: ANN001
    md = quantize(tok_model(family), tmp_path / "q", "fp16", small_eval)
    step = check_directory(md, "fp16")
    assert md.manifest.graph["dtype"] == "fp16" and md.manifest.graph["kv"]["dtype"] == "fp16"
    dtypes = {t["name"]: t["dtype"] for t in md.manifest.graph["inputs"] + md.manifest.graph["outputs"]}
    assert dtypes["logits"] == "float16" and dtypes["past_key_values.0.key"] == "float16"
    assert step["check"]["passed"] is True and step["check"]["tolerance"] == 1e-2
    assert step["quality"]["top1_agreement"] > 0.98
    if family == "llama":
        assert step["details"]["fp32_nodes"]["norm_statistics"] >= 5 * 4  # 5 RMSNorms: Pow .. Reciprocal
        assert step["details"]["fp32_nodes"]["rotary_angles"] > 0


def test_ppl_gate_writes_nothing(tok_model, small_eval: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """--max-ppl-increase: a model that lost more than allowed is not written, and an old OUT_DIR survives."""
    import onnxpipe.quant.quality as quality

    real = quality.quality_report

    def worse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        report = real(*args, **kwargs)
        report.ppl_after = report.ppl_before * 1.031
        report.ppl_change_pct = 3.1
        return report

    monkeypatch.setattr(quality, "quality_report", worse)
    out = tmp_path / "q"
    out.mkdir()
    (out / "onnxpipe.json").write_text("{}")  # an earlier output, which --force may replace
    (out / "keep.txt").write_text("old")
    (out / "onnxpipe.json").write_text("{}")  # --force replaces only a directory onnxpipe wrote
    with pytest.raises(OnnxpipeError, match=r"perplexity change .*\+3.10% .* FAIL \(above the budget of \+3%\).*nothing "
                                            r"was written. To accept it: --max-ppl-increase 5$"):
        quantize(tok_model("llama"), out, "dynamic", small_eval, max_ppl_increase=3.0, force=True)
    assert (out / "keep.txt").read_text() == "old" and not list(tmp_path.glob(".onnxpipe-tmp-*"))
    quantize(tok_model("llama"), out, "dynamic", small_eval, max_ppl_increase=3.2, force=True)
    assert (out / "onnxpipe.json").is_file() and not (out / "keep.txt").exists()


def test_fp16_input_takes_int4_only(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """The GPU path: an fp16 directory quantizes to int4 weights with fp16 scales and activations (head and
    table left fp16 by default); the integer-activation modes refuse it with a one-line reason."""
    half = quantize(tok_model("llama"), tmp_path / "half", "fp16", small_eval)
    with pytest.raises(OnnxpipeError, match="is fp16; quantize from an fp32 model directory.*--mode int4 only"):
        quantize(half.path, tmp_path / "again", "dynamic", small_eval)
    with pytest.raises(OnnxpipeError, match="8-bit vocabulary tables are for fp32 inputs"):
        quantize(half.path, tmp_path / "again", "int4", small_eval, lm_head="int8")
    md = quantize(half.path, tmp_path / "int4", "int4", small_eval)
    check_directory(md, "int4")
    assert md.manifest.graph["dtype"] == "fp16"
    proto = onnx.load(str(md.model_path))
    inits = {t.name: t for t in proto.graph.initializer}
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(inits[n.input[2]].data_type == onnx.TensorProto.FLOAT16 for n in nbits)  # fp16 scales
    float_linears = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(float_linears) == 1  # the LM head, left fp16 (the other MatMuls multiply activations)
    assert md.manifest.steps[-1]["quality"]["ppl_change_pct"] < 10.0
