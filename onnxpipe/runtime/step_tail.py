"""A decode step that writes the next step's inputs itself: greedy decoding with no uploads.

Added to the decoder graph in memory when a session replays CUDA graphs (the model directory is not touched):

    next_input_ids    [B, 1]  argmax of the last position's logits             (bound to the input_ids buffer)
    next_position_ids [B, 1]  the mask's row sums: the position the next token takes (position_ids buffer;
                              only where the graph reads position_ids)
    next_attention_mask [B, W] ones for the first row-sum + 1 places, W the mask's width   (attention_mask buffer)

Each output is bound to the very buffer its input was read from, so after one host-fed step the captured graph
can be replayed again and again with nothing going up; only the next token ids come down. This is only sound when
every write happens after every read of the same buffer. Writes depend on the argmax, i.e. on the logits, so it
holds when every node that reads input_ids, attention_mask or position_ids is an ancestor of the logits:
``add_step_tail`` checks that and says why not otherwise. The mask it writes is the right-padded, contiguous mask
the CUDA form reads only for its row sums and width.
"""

from __future__ import annotations

from typing import Any

NEXT_IDS = "onnxpipe.next_input_ids"
NEXT_POSITIONS = "onnxpipe.next_position_ids"
NEXT_MASK = "onnxpipe.next_attention_mask"


def add_step_tail(proto: Any, logits: str) -> str | None:
    """Add the next-input outputs to ``proto`` (a ModelProto, changed in place; next_position_ids only where the
    graph reads a position_ids input). Returns None when added, or the reason it was not (the graph unchanged)."""
    from onnx import TensorProto, helper

    g = proto.graph
    position_ids = "position_ids" in {i.name for i in g.input}
    if any(a.type in (helper.AttributeProto.GRAPH, helper.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return "the graph has control flow (subgraphs)"
    if logits not in {o.name for o in g.output}:
        return f"the graph has no output {logits!r}"
    feeds = {"input_ids", "attention_mask"} | ({"position_ids"} if position_ids else set())
    if not feeds <= {i.name for i in g.input}:
        return f"the graph lacks one of the inputs {sorted(feeds)}"
    reader = _late_reader(g, logits, feeds)
    if reader is not None:
        return f"node {reader!r} reads a fed input but the logits do not depend on it"

    def const(name: str, values: list[int], shape: list[int] | None = None) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name, TensorProto.INT64, [len(values)] if shape is None else shape, values))

    p = "onnxpipe_tail/"
    positions_read = position_ids and any("position_ids" in n.input for n in g.node)
    sums = _row_sums(g)  # the graph's own ReduceSum of the mask, where it has one: (its output, keepdims)
    nodes = [const(p + "zero", [0], []), const(p + "one", [1], [])]
    count = sums[0] if sums else None
    if sums and not sums[1]:  # [B] -> [B, 1]: a view, no kernel
        count = p + "count"
        nodes += [const(p + "axis1", [1]), helper.make_node("Unsqueeze", [sums[0], p + "axis1"], [count])]
    if count is None:
        count = p + "count"
        nodes += [const(p + "axis1", [1]),
                  helper.make_node("ReduceSum", ["attention_mask", p + "axis1"], [count], keepdims=1)]
    nodes += [
        # decode steps: logits [B, 1, V] -> [B, 1], the shape of input_ids (prefill's [B, S] is never bound)
        helper.make_node("ArgMax", [logits], [NEXT_IDS], axis=-1, keepdims=0),
        # zeros that exist only after the logits do: every write below waits for the whole step
        helper.make_node("Sub", [NEXT_IDS, NEXT_IDS], [p + "after_logits"]),
        helper.make_node("Add", [count, p + "after_logits"], [NEXT_POSITIONS if positions_read else p + "next_pos"]),
        helper.make_node("Add", [NEXT_POSITIONS if positions_read else p + "next_pos", p + "one"], [p + "next_count"]),
        helper.make_node("Shape", ["attention_mask"], [p + "shape"]),
        helper.make_node("Gather", [p + "shape", p + "one"], [p + "width"], axis=0),
        helper.make_node("Range", [p + "zero", p + "width", p + "one"], [p + "places"]),
        helper.make_node("Less", [p + "places", p + "next_count"], [p + "ones"]),
        helper.make_node("Cast", [p + "ones"], [NEXT_MASK], to=TensorProto.INT64),
    ]
    g.node.extend(nodes)
    g.output.append(helper.make_tensor_value_info(NEXT_IDS, TensorProto.INT64, ["batch", "sequence"]))  # [B, 1] decoding
    g.output.append(helper.make_tensor_value_info(NEXT_MASK, TensorProto.INT64, ["batch", "mask_width"]))
    if positions_read:
        g.output.append(helper.make_tensor_value_info(NEXT_POSITIONS, TensorProto.INT64, ["batch", 1]))
    return None


def _row_sums(g: Any) -> tuple[str, bool] | None:
    """A ReduceSum(attention_mask, axes=[1]) already in the graph: (its output, keepdims)."""
    import onnx
    from onnx import helper, numpy_helper

    # small int64 constants only: reading an initializer kept in external data would load (or fail on) the weights
    consts: dict[str, Any] = {i.name: numpy_helper.to_array(i).tolist() for i in g.initializer
                              if i.data_type == onnx.TensorProto.INT64 and len(i.dims) <= 1
                              and i.data_location != onnx.TensorProto.EXTERNAL}
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1:
            v = helper.get_attribute_value(n.attribute[0])
            consts[n.output[0]] = numpy_helper.to_array(v).tolist() if n.attribute[0].name == "value" else v
    consts = {k: v if isinstance(v, list) else [v] for k, v in consts.items()}
    for n in g.node:
        if n.op_type != "ReduceSum" or not n.input or n.input[0] != "attention_mask":
            continue
        attrs = {a.name: a for a in n.attribute}
        keep = attrs["keepdims"].i if "keepdims" in attrs else 1
        axes = consts.get(n.input[1]) if len(n.input) > 1 and n.input[1] else (list(attrs["axes"].ints) if "axes" in attrs else None)
        if axes in ([1], [-1]) and not ("noop_with_empty_axes" in attrs and attrs["noop_with_empty_axes"].i):
            return n.output[0], bool(keep)
    return None


def _late_reader(g: Any, logits: str, feeds: set[str]) -> str | None:
    """The first node reading one of ``feeds`` that the logits do not depend on (it might run after a write)."""
    producer = {out: n for n in g.node for out in n.output}
    ancestors: set[int] = set()
    todo = [logits]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is None or id(node) in ancestors:
            continue
        ancestors.add(id(node))
        todo.extend(i for i in node.input if i)
    for n in g.node:
        if n.op_type in ("Shape", "Size"):  # read only the shape, which the writes keep
            continue
        if id(n) not in ancestors and any(i in feeds for i in n.input):
            return n.name or n.op_type
    return None
