"""Logits for one position per row: the LM head runs on the hidden state generation reads, not on every prompt token.

Added to the decoder graph in memory when a DecoderSession loads it (the model directory is not touched). The
session only ever hands back one position's logits per row (the last prompt token after a prefill, the new token
after a decode step), yet the graph computes the head for all of them: at a 128-token prompt that is 128 x hidden x
vocab multiply-adds and a [batch, 128, vocab] logits tensor, of which one row per prompt is read. With the edit the
graph takes one more input,

    onnxpipe.last_index [batch] int64   the position of each row whose logits are wanted (a decode step: 0)

and gathers that position of the hidden state just before the head (GatherElements on axis 1), so ``logits``
comes out [batch, 1, vocab]. Where the head starts is found by walking back from the logits through ops that act on
each position alone: Cast, Identity, a MatMul / MatMulNBits with constant weights, and elementwise arithmetic with a
constant. The gather goes where that walk stops (the final norm's output), so the numbers of the gathered row are
those of the full graph: the same ops on the same row. Heads the walk cannot prove position-wise (int8 dynamic
quantization, whose activation scale is taken over the whole tensor) are left alone, and the session says why.
"""

from __future__ import annotations

from typing import Any

LAST_INDEX = "onnxpipe.last_index"

# ops that compute each position from that position alone when their other inputs are constants
_POSITIONWISE = {"Cast", "Identity", "MatMul", "MatMulNBits", "Add", "Sub", "Mul", "Div", "Tanh"}
_HEAD_OPS = {"MatMul", "MatMulNBits"}


def gather_last_position(proto: Any, logits: str) -> str | None:
    """Make ``proto`` (a ModelProto, changed in place) compute ``logits`` only at ``onnxpipe.last_index``.
    Returns None when done, or why not (the graph unchanged)."""
    from onnx import TensorProto, helper

    g = proto.graph
    if LAST_INDEX in {i.name for i in g.input}:
        return f"the graph already has an input {LAST_INDEX!r}"
    outputs = {o.name: o for o in g.output}
    if logits not in outputs:
        return f"the graph has no output {logits!r}"
    nodes = list(g.node)
    chain, tensor = head_chain(g, nodes, logits)
    if not any(n.op_type in _HEAD_OPS for n in chain):
        producer = {out: n for n in nodes for out in n.output}
        what = producer[tensor].op_type if tensor in producer else "a graph input"
        return f"no float LM head found before the logits (the walk back stopped at {what})"
    first = chain[-1]  # the head's first node: it reads ``tensor``, the hidden state of every position

    p = "onnxpipe_last/"

    def const(name: str, values: list[int]) -> Any:
        return helper.make_node("Constant", [], [p + name], value=helper.make_tensor(p + name, TensorProto.INT64, [len(values)], values))

    nodes = [
        const("axes12", [1, 2]), const("zero", [0]), const("one", [1]), const("two", [2]), const("three", [3]),
        helper.make_node("Unsqueeze", [LAST_INDEX, p + "axes12"], [p + "index3"]),
        helper.make_node("Shape", [tensor], [p + "shape"]),
        helper.make_node("Slice", [p + "shape", p + "zero", p + "one"], [p + "batch"]),
        helper.make_node("Slice", [p + "shape", p + "two", p + "three"], [p + "hidden"]),
        helper.make_node("Concat", [p + "batch", p + "one", p + "hidden"], [p + "target"], axis=0),
        helper.make_node("Expand", [p + "index3", p + "target"], [p + "index"]),
        helper.make_node("GatherElements", [tensor, p + "index"], [p + "hidden_state"], axis=1),
    ]
    for k, name in enumerate(first.input):
        if name == tensor:
            first.input[k] = p + "hidden_state"
    # the new nodes go before the head's first node: the graph stays topologically sorted
    at = list(g.node).index(first)
    for k, n in enumerate(nodes):
        g.node.insert(at + k, n)
    g.input.append(helper.make_tensor_value_info(LAST_INDEX, TensorProto.INT64, ["batch_size"]))
    dims = outputs[logits].type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].Clear()
        dims[1].dim_value = 1
    for vi in list(g.value_info):  # shapes inferred for the full length no longer hold on the head's path
        if vi.name in {o for n in chain for o in n.output}:
            g.value_info.remove(vi)
    return None


def head_chain(g: Any, nodes: list[Any], logits: str) -> tuple[list[Any], str]:
    """The LM head: the nodes of ``nodes`` (``g``'s, in a list the caller holds) from the last hidden state to
    ``logits`` that act on each position alone, walked back from the logits (the last first), each tensor between
    them read by the next alone and no graph output; and the tensor the walk stopped at (the hidden state)."""
    outputs = {o.name for o in g.output}
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    constant = _constants(g)
    chain, tensor = [], logits
    while True:
        node = producer.get(tensor)
        if node is None or node.op_type not in _POSITIONWISE:
            break
        data = [i for i in node.input if i and i not in constant]
        if len(data) != 1 or (node.op_type in _HEAD_OPS and node.input[0] != data[0]):
            break
        if tensor != logits and (consumers.get(tensor, 0) != 1 or tensor in outputs):
            break  # another reader would see what the caller does to the head's input
        chain.append(node)
        tensor = data[0]
    return chain, tensor


def _constants(g: Any) -> set[str]:
    """Tensors that depend on no graph input: initializers, Constant outputs and what is computed from them only."""
    const = {i.name for i in g.initializer}
    inputs = {i.name for i in g.input} - const
    for n in g.node:  # topological order
        if n.op_type == "Constant" or (n.input and all((not i) or (i in const and i not in inputs) for i in n.input)):
            const.update(n.output)
    return const
