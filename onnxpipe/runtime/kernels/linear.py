"""A float MatMul of an activation by a weight initializer as onnxpipe.Linear, in a ModelProto, in memory.

``Y = MatMul(x, W)`` with W a 2-D initializer [K, N] becomes ``Y = onnxpipe.Linear(x, Transpose(W))``: Linear takes
the weight as [N, K] (PyTorch's layout: each output's weights contiguous, which is what a GEMV for the one to four
rows of a decode step reads at full width; csrc/linear.cu), and the Transpose of a constant is folded by
onnxruntime's own constant folding when the session is made (any optimization level from basic), so the model
directory, the proto and Python hold no second copy of the weights: onnxruntime transposes each one once, at load.
Only MatMuls whose weight is an initializer of the kernel's types (float16 for CUDA; float or float16 for the CPU
reference) and used by MatMuls alone are taken (a weight read elsewhere, e.g. tied to an embedding Gather, would
otherwise be held twice).
"""

from __future__ import annotations

from typing import Any

DOMAIN = "onnxpipe"
OP = "Linear"


def linear_nodes(graph: Any, types: tuple[int, ...]) -> list[Any]:
    """The MatMul nodes of ``graph`` that become Linear: the second input a 2-D initializer of one of ``types``
    (onnx.TensorProto element types) read by MatMuls alone, the first not an initializer."""
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            if name:
                readers.setdefault(name, []).append(n)
    found = []
    for n in graph.node:
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        w = inits.get(n.input[1])
        if w is None or n.input[0] in inits or len(w.dims) != 2 or w.data_type not in types:
            continue
        if any(r.op_type != "MatMul" or r.domain not in ("", "ai.onnx") or r.input[0] == n.input[1]
               for r in readers[n.input[1]]):
            continue
        found.append(n)
    return found


def to_linear(model: Any, nodes: list[Any]) -> None:
    """Each of ``nodes`` (MatMuls of ``model``, from linear_nodes) as a Transpose of its weight and an onnxpipe.Linear,
    in place; a weight shared by several of them is transposed once."""
    import onnx

    graph = model.graph
    transposed: dict[str, str] = {}
    for node in nodes:
        weight = node.input[1]
        if weight not in transposed:
            transposed[weight] = f"{weight}/linear_t"
            t = onnx.helper.make_node("Transpose", [weight], [transposed[weight]], name=f"{weight}/linear_transpose",
                                      perm=[1, 0])
            graph.node.insert(list(graph.node).index(node), t)
        node.input[1] = transposed[weight]
        node.op_type, node.domain = OP, DOMAIN
    if nodes and not any(o.domain == DOMAIN for o in model.opset_import):
        entry = model.opset_import.add()
        entry.domain, entry.version = DOMAIN, 1
