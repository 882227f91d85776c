"""The eager attention forms (soft-capped scores, sink logits) fuse through GroupQueryAttention's own attributes and
inputs, and the attention pass says in words why a block it leaves alone was not fused."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from fusion.rule_cases import CASES, GQA_INFO, eager_attention

from onnxpipe.fusion.attention import fuse_attention
from onnxpipe.fusion.rules import PassContext, using_context

pytestmark = pytest.mark.fast


def _fuse(text: str, info: dict) -> tuple[dict, ir.Model]:
    model = ir.from_proto(onnx.parser.parse_model(text))
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.ShapeInferencePass()(model)
    ctx = PassContext(model_info=info)
    with using_context(ctx):
        report = fuse_attention(model, ctx)
    return report, model


def _gqa(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    return node


@pytest.mark.parametrize("form", ["plain", "scaled", "div"])
def test_soft_cap_is_the_ops_softcap(form: str) -> None:
    """cap * tanh(qk * s / cap) -> softcap = cap, scale = s, whichever of the three ways the exporter wrote it
    (a cap of 1 leaves no multiply behind)."""
    cap = 1.0 if form == "plain" else 2.0
    report, model = _fuse(eager_attention(softcap=form, cap=cap), GQA_INFO)
    assert report["attention blocks fused"] == "1/1" and "not fused because" not in report
    node = _gqa(model)
    assert node.attributes.get_float("softcap") == pytest.approx(cap)
    assert node.attributes.get_float("scale") == pytest.approx(1 / math.sqrt(8))


def test_sink_logits_are_the_ops_head_sink() -> None:
    report, model = _fuse(eager_attention(sinks=True), GQA_INFO)
    assert report["attention blocks fused"] == "1/1"
    node = _gqa(model)
    sink = node.inputs[11]
    assert sink is not None
    producer = sink.producer()
    values = sink.const_value if sink.const_value is not None else producer.attributes["value"].as_tensor()
    np.testing.assert_array_equal(values.numpy(), np.array([0.5, -1.0, 2.0, 0.0], dtype=np.float32))
    assert "softcap" not in node.attributes


@pytest.mark.parametrize("rule,miss,why", [
    ("sink_attention", "the sink column is sliced off the front", "not sliced off as [..., :-1]"),
    ("sink_attention", "the softmax's shift is a max over axis 2", "not a max over the last axis"),
    ("sink_attention", "the sink logits are a graph input", "sink logits are not a constant"),
    ("softcap_attention", "the cap is a graph input, not a constant", "not a scalar constant"),
    ("softcap_attention", "the cap is applied after the mask", "the closest pattern"),
    ("gqa", "kv heads repeated along axis 1", "not repeated along axis 2"),
    ("mha", "probabilities read elsewhere", "read outside the attention block"),
])
def test_an_unfused_block_is_reported_in_words(rule: str, miss: str, why: str) -> None:
    info, _, misses, _ = CASES[rule]
    report, model = _fuse(misses[miss], info)
    assert report["attention blocks fused"] == "0/1"
    assert why in report["not fused because"]
    assert not [n for n in model.graph if n.op_type in ("GroupQueryAttention", "MultiHeadAttention")]
