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
from rule_cases import CASES, HEADER  # noqa: E402

from onnxpipe.fusion.registry import all_rules
from onnxpipe.fusion.rules import PassContext, apply_rules, using_context  # noqa: E402

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


def _projections(n: int, const: bool = True, output_escapes: bool = False) -> str:
    weights = "\n".join(
        f"  w{i} = Constant <value = float[32,{8 * (i + 1)}] {{{','.join(['0.01'] * (32 * 8 * (i + 1)))}}}> ()"
        for i in range(n)) if const else ""
    inputs = "".join(f", float[32,{8 * (i + 1)}] w{i}" for i in range(n)) if not const else ""
    products = "\n".join(f"  p{i} = MatMul (x, w{i})" for i in range(n))
    total = " + ".join(f"p{i}s" for i in range(n))
    sums = "\n".join(f"  p{i}s = ReduceSum <keepdims = 0> (p{i})" for i in range(n))
    out_extra = ", float[2,3,8] p0" if output_escapes else ""
    adds = "  y = Identity (p0s)\n" if n == 1 else "  y = Sum (" + ", ".join(f"p{i}s" for i in range(n)) + ")\n"
    del total
    return HEADER + f"""
g (float[2,3,32] x{inputs}) => (float y{out_extra}) {{
{weights}
{products}
{sums}
{adds}}}"""


@pytest.mark.parametrize("case,packs,matmuls", [("three", 1, 1), ("one", 0, 1), ("weights are inputs", 0, 3),
                                                ("a product is a graph output", 1, 2)])
def test_pack_projections(case: str, packs: int, matmuls: int) -> None:
    """Three projections of x become one MatMul; a lone one, non-constant weights, or a product that is a graph
    output (its name is the contract) stay as they are."""
    from onnxpipe.fusion.packing import pack_projections

    text = {"three": _projections(3), "one": _projections(1), "weights are inputs": _projections(3, const=False),
            "a product is a graph output": _projections(3, output_escapes=True)}[case]
    original = onnx.parser.parse_model(text)
    model = ir.from_proto(original)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.ShapeInferencePass()(model)
    report = pack_projections(model, PassContext(model_info=INFO_FOR_PACKING))
    assert report["projection groups packed"] == str(packs)
    fused = ir.to_proto(model)
    assert sum(n.op_type == "MatMul" for n in fused.graph.node) == matmuls
    assert [o.name for o in fused.graph.output] == [o.name for o in original.graph.output]
    if packs:
        feeds = _feeds(original)
        np.testing.assert_allclose(_run(fused, feeds)[0], _run(original, feeds)[0], rtol=1e-5)


INFO_FOR_PACKING = {"num_layers": 1}
