"""Level 3: projections that read the same activation -> one MatMul and a Split ("packed QKV").

Llama-style blocks project the normed hidden state three times (q, k, v) and the MLP twice (gate, up); each is a
MatMul by a constant [K, N_i] weight. Packing them concatenates the weights along N and splits the product: the
same bytes of weight are read, in one kernel call instead of several, which is what decode (one token, memory
bound) might pay for in per-op overhead. GPT-2 and Phi-3 export their QKV packed already.

It did not pay on this project's 2-core CPU: Llama 100M level 3 decoded 5-7% slower packed (10.63 vs 9.94 ms/token,
15 interleaved rounds; ORT's Split copies its outputs), so the pass is in no level and runs only when named in
--passes. Nor on the H100 (docs/benchmarks.md run 13, the 1B Llama with CUDA graphs, where it packs gate/up, q/k/v
being packed by the attention fusion): 1.006x the default's decode time at batch 1, 1.010x at batch 8.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from onnxpipe.fusion.rules import PassContext, add_initializer


def _packable(node: ir.Node) -> bool:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    weight = node.inputs[1]
    return (weight is not None and weight.const_value is not None and weight.shape is not None
            and weight.shape.rank() == 2 and not node.outputs[0].is_graph_output())


def pack_projections(model: ir.Model, ctx: PassContext) -> dict[str, str | int]:
    graph = model.graph
    groups: dict[int, list[ir.Node]] = collections.defaultdict(list)
    for node in graph:
        if _packable(node):
            groups[id(node.inputs[0])].append(node)
    packed = 0
    for nodes in groups.values():
        weights = [n.inputs[1] for n in nodes]
        if len(nodes) < 2 or len({(w.shape[0], w.dtype) for w in weights}) != 1:
            continue
        _pack(graph, nodes)
        packed += 1
    return {"projection groups packed": str(packed)}


def _pack(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    x = nodes[0].inputs[0]
    arrays = [np.asarray(n.inputs[1].const_value.numpy()) for n in nodes]
    widths = [a.shape[1] for a in arrays]
    base = nodes[0].name or "packed"
    weight = add_initializer(graph, f"{base}.packed_weight", np.concatenate(arrays, axis=1))
    sizes = add_initializer(graph, f"{base}.packed_split", np.array(widths, dtype=np.int64))
    matmul = ir.node("MatMul", [x, weight], name=f"{base}.packed")
    split = ir.node("Split", [matmul.outputs[0], sizes], {"axis": -1}, num_outputs=len(nodes), name=f"{base}.split")
    first = min(nodes, key=lambda n: _position(graph, n))
    graph.insert_before(first, [matmul, split])
    for old, new in zip(nodes, split.outputs):
        new.dtype, new.shape = old.outputs[0].dtype, old.outputs[0].shape
        old.outputs[0].replace_all_uses_with(new)
        graph.remove(old, safe=True)


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    raise ValueError("node not in graph")
