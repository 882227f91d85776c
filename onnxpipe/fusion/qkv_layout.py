"""Query, key and value projected per head (GPT-NeoX) -> projected per tensor, the layout the rotary and attention
rules take.

GPT-NeoX's query_key_value projection interleaves the three per head: its output, viewed as [B, S, N, 3 H], holds
head n's query, key and value side by side, and the exporter splits them after the head transpose:

    q, k, v = Split(Transpose(Reshape(MatMul(x, W) + b, [B, S, N, 3 H]), [0, 2, 1, 3]), 3, axis=-1)   [B, N, S, H]

The rewrite permutes W's columns (and b) into [all heads' q | all heads' k | all heads' v], so one MatMul gives
[B, S, 3 N H] and each of q, k, v becomes Transpose(Reshape(x_BSD, [B, S, N, H])), the form every other family
is exported in. It computes exactly the same numbers: the same products, reordered.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxpipe.fusion.rules import add_initializer, current_context, register


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


class PerHeadQKVLayout(pattern.RewriteRuleClassBase):
    """``bias``: the projection has a constant bias (an Add after the MatMul)."""

    def __init__(self, name: str, bias: bool):
        super().__init__(name)
        self._bias = bias

    def pattern(self, op, x, weight, bias, heads_shape):
        projected = op.MatMul(x, weight)
        if self._bias:
            projected = op.Add(projected, bias)
        heads = op.Transpose(op.Reshape(projected, heads_shape, _outputs=["per_head"]), perm=[0, 2, 1, 3])
        return op.Split(heads, _allow_other_inputs=True, _outputs=["query", "key", "value"])

    def check(self, context, x, weight, bias=None, per_head=None, query=None, **_):
        result = pattern.MatchResult()
        info = current_context().model_info
        heads, kv_heads, head_dim = (int(info["num_attention_heads"]), int(info["num_kv_heads"]),
                                     int(info["head_dim"]))
        if heads != kv_heads:
            return result.fail(f"{heads} query heads and {kv_heads} kv heads: a per-head triple needs equal counts")
        if weight.const_value is None or weight.shape is None or weight.shape.rank() != 2:
            return result.fail("the projection's weight is not a constant 2-D matrix", weight)
        if weight.shape[1] != 3 * heads * head_dim:
            return result.fail(f"the projection is {weight.shape[1]} wide, not 3 x {heads} x {head_dim}", weight)
        if self._bias and (bias is None or bias.const_value is None or bias.shape is None or bias.shape.rank() != 1):
            return result.fail("the projection's bias is not a constant vector", bias)
        shape = per_head.shape if per_head is not None else None
        if shape is None or shape.rank() != 4 or shape[2] != heads or shape[3] != 3 * head_dim:
            return result.fail(f"the projection is not viewed as [B, S, {heads}, 3 x {head_dim}]", per_head)
        split = query.producer()
        if split.attributes.get_int("axis", 0) not in (3, -1):
            return result.fail("q, k and v are not split along the last axis", query)
        sizes = _ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if sizes is not None and sizes != [head_dim] * 3:
            return result.fail(f"the split sizes {sizes} are not three of {head_dim}", split.inputs[1])
        if sizes is None and split.attributes.get_int("num_outputs", 3) != 3:
            return result.fail("the split is not into three", query)
        self._heads, self._head_dim = heads, head_dim
        return result

    def rewrite(self, op, x, weight, bias=None, **_):
        n, h = self._heads, self._head_dim
        graph = _owning_graph(weight)
        w = np.asarray(weight.const_value.numpy())
        w = w.reshape(w.shape[0], n, 3, h).transpose(0, 2, 1, 3).reshape(w.shape[0], 3 * n * h)
        projected = op.MatMul(x, _permuted(graph, f"{weight.name}.per_tensor", w))
        if self._bias:
            b = np.asarray(bias.const_value.numpy()).reshape(n, 3, h).transpose(1, 0, 2).reshape(-1)
            projected = op.Add(projected, _permuted(graph, f"{bias.name}.per_tensor", b))
        parts = op.Split(projected, op.Constant(value_ints=[n * h] * 3), axis=-1, _outputs=3)
        to_heads = op.Constant(value_ints=[0, 0, n, h])
        return tuple(op.Transpose(op.Reshape(part, to_heads), perm=[0, 2, 1, 3]) for part in parts)


def _permuted(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The initializer ``name`` holding ``array``: the one a previous attempt at this match made, or a new one."""
    existing = graph.initializers.get(name)
    if existing is not None and existing.const_value is not None:
        if np.array_equal(existing.const_value.numpy(), array):
            return existing
        raise ValueError(f"initializer {name} exists with other values")
    return add_initializer(graph, name, array)


def _owning_graph(value: ir.Value) -> ir.Graph:
    """The graph an initializer belongs to (where the permuted copies go)."""
    graph = value.graph
    if graph is None:
        raise ValueError(f"{value.name} is not an initializer of a graph")
    return graph


register("per_head_qkv", PerHeadQKVLayout.rule("PerHeadQKVBias", bias=True),
         PerHeadQKVLayout.rule("PerHeadQKV", bias=False))
