"""Each fusion rule alone: its smallest matching graph fuses (and computes the same), its near-misses do not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rule_cases import CASES  # noqa: E402

from onnxpipe.fusion.rules import PassContext, all_rules, apply_rules, using_context  # noqa: E402

all_rules()


def _apply(rule: str, text: str, info: dict) -> tuple[onnx.ModelProto, onnx.ModelProto, int]:
    original = onnx.parser.parse_model(text)  # not onnx.checker: SimplifiedLayerNormalization is ORT's, not ONNX's
    model = ir.from_proto(original)
    # the pipeline's graphs hold constants as initializers (level 1 lifts them); so do these
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.AddDefaultAttributesPass()(model)  # as the norms pass does before its rules
    common_passes.ShapeInferencePass()(model)
    with using_context(PassContext(model_info=info)):
        fired = apply_rules(model, [rule])[rule]
    common_passes.RemoveUnusedNodesPass()(model)
    return original, ir.to_proto(model), fired


def _feeds(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in proto.graph.input:
        t = vi.type.tensor_type
        shape = [d.dim_value for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if vi.name == "position_ids":
            feeds[vi.name] = np.arange(shape[1], dtype=np.int64)[None, :] + 3
        elif vi.name == "attention_mask":
            feeds[vi.name] = np.ones(shape, dtype)
        elif dtype == np.bool_:  # the attention mask: causal over [past 5 | new 3], row 1 left-padded by 2
            total, new = shape[-1], shape[-2]
            causal = np.arange(total)[None, :] <= (np.arange(new)[:, None] + total - new)
            mask = np.broadcast_to(causal, shape).copy()
            mask[1, :, :, :2] = False
            feeds[vi.name] = mask
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_fuses_its_smallest_graph(rule: str) -> None:
    info, text, _, fused_op = CASES[rule]
    original, fused, fired = _apply(rule, text, info)
    ops = [n.op_type for n in fused.graph.node]
    assert fired >= 1 and fused_op in ops, f"{rule} did not fire: {ops}"
    feeds = _feeds(original)
    for want, got in zip(_run(original, feeds), _run(fused, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert [o.name for o in fused.graph.output] == [o.name for o in original.graph.output]


NEAR_MISSES = [(rule, name) for rule in sorted(CASES) for name in CASES[rule][2]]


@pytest.mark.parametrize("rule,miss", NEAR_MISSES, ids=[f"{r}-{m}" for r, m in NEAR_MISSES])
def test_rule_leaves_near_miss_alone(rule: str, miss: str) -> None:
    info, _, misses, fused_op = CASES[rule]
    original, fused, fired = _apply(rule, misses[miss], info)
    assert fired == 0
    assert fused_op not in [n.op_type for n in fused.graph.node if n.op_type not in
                            {n2.op_type for n2 in original.graph.node}]
