"""Opt-in: MatMuls by a constant [K, N] weight -> com.microsoft FusedMatMul(x, W^T, transB=1), the weight stored [N, K].

The same product and the same weight bytes, in the layout PyTorch's Linear keeps ([out, in]). On the CUDA EP the
transposed operand changes which cuBLAS kernel serves the one-token GEMMs of decode, whose speed is the bandwidth
they reach. A weight several MatMuls share is transposed once; the [K, N] original goes when nothing else reads it.
In no level: the runtime's one-position head and quantize's MatMul matching know plain MatMuls.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxpipe.fusion.rules import PassContext, add_initializer

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16}


def _weight(node: ir.Node) -> ir.Value | None:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or not w.is_initializer() or w.shape is None or w.shape.rank() != 2:
        return None
    return w if w.dtype in _FLOATS else None


def transpose_weights(model: ir.Model, ctx: PassContext) -> dict[str, str]:
    graph = model.graph
    users: dict[int, tuple[ir.Value, list[ir.Node]]] = {}
    for node in list(graph):
        w = _weight(node)
        if w is not None:
            users.setdefault(id(w), (w, []))[1].append(node)
    moved = 0
    for w, nodes in users.values():
        array = np.asarray(w.const_value.numpy())
        wt = add_initializer(graph, f"{w.name}.transposed", array.T)
        for node in nodes:
            fused = ir.node("FusedMatMul", [node.inputs[0], wt], {"transA": 0, "transB": 1, "alpha": 1.0},
                            domain="com.microsoft", name=f"{node.name or w.name}.fused")
            fused.outputs[0].dtype, fused.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
            graph.insert_before(node, fused)
            out = node.outputs[0]
            name = out.name
            out.replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)  # the logits keep their name
            graph.remove(node, safe=True)
            fused.outputs[0].name = name
            moved += 1
        if not w.uses():
            graph.initializers.pop(w.name)
    return {"MatMuls with transposed weights": str(moved), "weights transposed": str(len(users))}
