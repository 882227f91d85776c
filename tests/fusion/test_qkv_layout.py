"""GPT-NeoX's per-head q/k/v: the rewrite gives every output as Transpose(Reshape(x_BSD)) of one per-tensor
projection (the form the rotary and attention rules start from), with or without a bias, computing the same."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
import pytest
from fusion.rule_cases import INFO, per_head_qkv

from onnxpipe.fusion.registry import all_rules
from onnxpipe.fusion.rules import PassContext, apply_rules, using_context

pytestmark = pytest.mark.fast
all_rules()


def _run(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("with_bias", [True, False])
def test_per_head_qkv_becomes_per_tensor(with_bias: bool) -> None:
    original = onnx.parser.parse_model(per_head_qkv(with_bias=with_bias))
    model = ir.from_proto(original)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.ShapeInferencePass()(model)
    with using_context(PassContext(model_info={**INFO, "head_dim": 8})):
        assert apply_rules(model, ["per_head_qkv"])["per_head_qkv"] == 1
    common_passes.RemoveUnusedNodesPass()(model)
    for out in model.graph.outputs:  # q, k, v: Transpose(Reshape(one of three last-axis parts of one MatMul))
        transpose = out.producer()
        assert transpose.op_type == "Transpose" and list(transpose.attributes.get_ints("perm")) == [0, 2, 1, 3]
        reshape = transpose.inputs[0].producer()
        assert reshape.op_type == "Reshape" and reshape.inputs[0].producer().op_type == "Split"
    assert sum(n.op_type == "MatMul" for n in model.graph) == 1
    x = np.random.default_rng(0).standard_normal((2, 3, 32)).astype(np.float32)
    for want, got in zip(_run(original, x), _run(ir.to_proto(model), x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
