"""A decode step that also reads a chunk of one long prompt, in the same run: the weights are read once for both.

Serving reads a long prompt a chunk per iteration beside the running batch's decode step (SplitFuse-style). As two
runs, an iteration reads every weight twice, once for the step's [B, 1] tokens and once for the chunk's [1, W]; on a
GPU, where a decode step's cost is reading the weights, the iteration is about two steps, so a running stream's
token comes about 2x later while a prompt is read. Here both go through one run: the decoder graph is edited in
memory (the model directory is untouched) so that its position-wise part (embeddings, projections, MLPs, norms)
runs on the B + W tokens as one sequence, [1, B + W, hidden], and each attention node is split in two: the step's
B tokens as [B, 1] rows over the shared KV buffer, as before, and the chunk's W tokens as one row over the KV of the
row being read (bound by address, as ``serve.row_prefill`` binds it). The step's inputs and outputs keep their names
and meaning (the step tail is added after this edit, as on the plain graph; ``onnxpipe.last_index`` is declared
here, a decode step's one position being its last, and the LM head runs once on the step's rows and the chunk's
last token together, its weight read once); the chunk
adds its own:

    onnxpipe.chunk.input_ids       [1, W]         the chunk (right-padded, as ``row_prefill.chunk_inputs``)
    onnxpipe.chunk.attention_mask  [1, capacity]  read for its row sum and width, as the step's mask
    onnxpipe.chunk.position_ids    [1, W]         only where the graph reads position_ids
    onnxpipe.chunk.last_index      [1]            B + the chunk's last real token: where its logits are taken
    onnxpipe.chunk.<past name>     [1, kv_heads, capacity, head_dim] each: the row's keys / values
    -> onnxpipe.chunk.<present name> (written in place) and onnxpipe.chunk.logits [1, 1, vocab]

A row's numbers come from the same ops on the same rows: every node outside attention and the mask's arithmetic acts
on each position alone (checked: a fixed list of such ops, MatMuls on constant weights, norms over the last axis),
so computing [B + W] positions together gives each the values it gets in its own run, up to a GEMM's rounding at
another M (bit for bit on the CPU's kernels for these shapes, tests/runtime/test_chunk_lane.py; on a GPU, as a
grouped prefill, a kernel may pick another tiling). ``add_chunk_lane`` says why not, and changes nothing, for any
graph outside that form (no GroupQueryAttention, attention reading the ids or positions, ops it cannot prove
position-wise). A Reshape is position-wise where its target keeps the leading [batch, sequence]: a constant
[0, 0, ...], or (Qwen3's per-head q/k norms) a Concat of the inputs' batch, the ids' sequence and constants, whose
leading two the edit takes from the merged tokens' shape instead.

Written by hand on the ModelProto, as the other load-time edits (``step_tail``, ``last_position``): a structural
split of the graph around its attention nodes, which no rewriter pattern expresses (it duplicates the mask's
subgraph and every attention node and renames their inputs graph-wide).
"""

from __future__ import annotations

from typing import Any

from onnxpipe.runtime.last_position import LAST_INDEX, _constants, head_chain

PREFIX = "onnxpipe.chunk."
CHUNK_IDS = PREFIX + "input_ids"
CHUNK_MASK = PREFIX + "attention_mask"
CHUNK_POSITIONS = PREFIX + "position_ids"
CHUNK_LAST = PREFIX + "last_index"
CHUNK_LOGITS = PREFIX + "logits"

# ops that compute each position from that position alone (their other inputs constants or same-position tensors)
_POSITIONWISE = {
    "Cast", "Identity", "Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Relu", "Erf", "Neg", "Sqrt", "Pow",
    "Softplus", "MatMul", "MatMulNBits", "FastGelu", "Gelu", "BiasGelu", "QuickGelu", "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization", "LayerNormalization", "SkipLayerNormalization",
}
_GQA = "GroupQueryAttention"


def _int_values(g: Any, name: str) -> list[int]:
    """The values of an int64 initializer or Constant ``name`` ([] where it is neither)."""
    from onnx import numpy_helper

    for t in g.initializer:
        if t.name == name:
            return [int(v) for v in numpy_helper.to_array(t).ravel()]
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return [int(v) for v in numpy_helper.to_array(a.t).ravel()]
                if a.name == "value_ints":
                    return [int(v) for v in a.ints]
    return []


def _consumers(nodes: list[Any], name: str) -> list[Any]:
    return [n for n in nodes if name in n.input]


def _token_shape_concats(nodes: list[Any], const: set[str], inputs: set[str]) -> dict[int, int]:
    """Concats (axis 0) that build [batch, sequence, constants...] from graph inputs' shapes (the batch from any
    input's first dim: the ids, the mask, a past; the sequence from the ids') and are read only as Reshape targets:
    id -> index of their first constant input."""
    from onnx import helper

    dims: dict[str, tuple[str, int, int]] = {}  # Shape output -> (input, start, end)
    for n in nodes:
        if n.op_type == "Shape" and n.input[0] in inputs:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            dims[n.output[0]] = (n.input[0], int(attrs.get("start", 0)), int(attrs.get("end", 2)))
    found: dict[int, int] = {}
    for n in nodes:
        if n.op_type != "Concat" or {a.name: a.i for a in n.attribute}.get("axis") != 0:
            continue
        lead, k = [], 0
        while k < len(n.input) and n.input[k] in dims:
            src, start, end = dims[n.input[k]]
            lead += [(src, d) for d in range(start, end)]
            k += 1
        # a batch, then the ids' sequence; the rest constants
        if len(lead) != 2 or lead[0][1] != 0 or lead[1] != ("input_ids", 1) or k == len(n.input):
            continue
        if any(i not in const for i in n.input[k:]):
            continue
        readers = _consumers(nodes, n.output[0])
        if readers and all(r.op_type == "Reshape" and list(r.input[1:2]) == [n.output[0]]
                           and n.output[0] not in r.input[:1] for r in readers):
            found[id(n)] = k
    return found


def chunk_name(name: str) -> str:
    """The chunk's input or output for a step's KV input or output ``name``."""
    return PREFIX + name


def add_chunk_lane(proto: Any, logits: str) -> str | None:
    """Edit ``proto`` (a ModelProto, in place) to read a chunk of one row beside its decode step (module docstring).
    Returns None when done, or why not (the graph unchanged)."""
    from onnx import NodeProto, TensorProto, helper

    g = proto.graph
    inputs = {i.name: i for i in g.input}
    outputs = {o.name: o for o in g.output}
    if logits not in outputs:
        return f"the graph has no output {logits!r}"
    if not {"input_ids", "attention_mask"} <= set(inputs):
        return "the graph lacks input_ids or attention_mask"
    if CHUNK_IDS in inputs:
        return f"the graph already has an input {CHUNK_IDS!r}"
    if any(a.type in (helper.AttributeProto.GRAPH, helper.AttributeProto.GRAPHS) for n in g.node
           for a in n.attribute):
        return "the graph has control flow (subgraphs)"
    const = _constants(g)
    nodes = list(g.node)  # held: the identities below are these objects'
    gqas = [n for n in nodes if n.op_type == _GQA]
    if not gqas:
        return "the graph has no GroupQueryAttention (the chunk lane needs the CUDA form of optimize --target cuda)"

    # the mask's arithmetic: nodes computed from attention_mask (and constants) alone
    mask_side = {"attention_mask"}
    mask_nodes: list[Any] = []
    for n in nodes:
        data = [i for i in n.input if i and i not in const]
        if data and all(i in mask_side for i in data):
            mask_nodes.append(n)
            mask_side.update(n.output)
    in_mask = {id(n) for n in mask_nodes}
    for n in gqas:
        extra = [i for i in n.input[9:] if i]
        if extra:
            return f"attention node {n.name or _GQA!r} takes inputs past the rotary caches ({extra})"
        if len(n.input) < 7 or not all(n.input[k] in mask_side for k in (5, 6)):
            return f"attention node {n.name or _GQA!r} does not read its lengths from the attention mask alone"
        for k in (3, 4):
            if len(n.input) <= k or n.input[k] not in inputs:
                return f"attention node {n.name or _GQA!r} does not read its past straight from a graph input"
        for k in (1, 2):
            if len(n.output) <= k or n.output[k] not in outputs:
                return f"attention node {n.name or _GQA!r} does not write its present straight to a graph output"
        if len(n.output) > 3 and any(n.output[3:]):
            return f"attention node {n.name or _GQA!r} has outputs past its presents"
    # reshapes to per-head form and back (Qwen3's q/k norms): a target of the tokens' own [batch, sequence] and
    # constants keeps each position's features together; its leading dims are rebuilt from the merged tokens
    token_shapes = _token_shape_concats(nodes, const, set(inputs))
    shape_only = {id(n) for n in nodes if n.op_type == "Shape" and n.input[0] in inputs
                  and all(id(c) in token_shapes for c in _consumers(nodes, n.output[0]))}
    # every other node: position-wise, reading the ids / positions only where that is a lookup
    positions_read = False
    for n in nodes:
        if id(n) in in_mask or n.op_type == _GQA or all(o in const for o in n.output):
            continue
        name = n.name or n.op_type
        if id(n) in shape_only or id(n) in token_shapes:
            continue
        if n.op_type == "Reshape" and len(n.input) > 1:
            target = n.input[1]
            keeps = (any(target in c.output for c in nodes if id(c) in token_shapes)
                     or (_int_values(g, target)[:2] == [0, 0]
                         and not {a.name: a.i for a in n.attribute}.get("allowzero", 0)))
            if not keeps or n.input[0] in mask_side:
                return f"reshape {name!r} may move features between positions"
            continue
        if "attention_mask" in n.input or any(i in mask_side for i in n.input):
            return f"node {name!r} reads the attention mask outside the attention's lengths"
        if n.op_type == "Gather":
            attrs = {a.name: a.i for a in n.attribute}
            if n.input[0] not in const or attrs.get("axis", 0) != 0 or n.input[1] != "input_ids":
                return f"node {name!r} gathers something other than an embedding row per token"
            continue
        if "input_ids" in n.input:
            return f"node {name!r} reads input_ids other than as an embedding lookup"
        if n.op_type == "RotaryEmbedding":
            if len(n.input) < 2 or n.input[1] != "position_ids" or any(i not in const for i in n.input[2:] if i):
                return f"rotary node {name!r} does not read position_ids and constant caches"
            positions_read = True
            continue
        if "position_ids" in n.input:
            return f"node {name!r} reads position_ids other than as a rotary embedding's positions"
        if n.op_type == "Split":  # a fused projection's parts: on the last axis, each position's alone
            axis = {a.name: a.i for a in n.attribute}.get("axis", 0)
            if axis not in (-1, 2) or any(i not in const for i in n.input[1:] if i):
                return f"split {name!r} is not on the last axis of [batch, sequence, features]"
            continue
        if n.op_type not in _POSITIONWISE:
            return f"node {name!r} ({n.op_type}) is not one the chunk lane knows acts on each position alone"
        if n.op_type in ("MatMul", "MatMulNBits") and n.input[1] not in const:
            return f"node {name!r} multiplies two activations"
        if n.op_type in ("LayerNormalization", "SimplifiedLayerNormalization"):
            axis = {a.name: a.i for a in n.attribute}.get("axis", -1)
            if axis != -1:
                return f"norm {name!r} normalizes over axis {axis}, not the last"

    # the LM head: the position-wise chain from the final hidden state to the logits (last_position's walk)
    chain, hidden = head_chain(g, nodes, logits)
    if not any(n.op_type in ("MatMul", "MatMulNBits") for n in chain):
        return "no LM head found before the logits"

    p = "onnxpipe_lane/"

    def c64(name: str, values: list[int]) -> Any:
        return helper.make_node("Constant", [], [p + name], value=helper.make_tensor(
            p + name, TensorProto.INT64, [len(values)], values))

    head = [
        c64("zero", [0]), c64("one", [1]), c64("two", [2]), c64("row", [1, -1]),
        # [1, B, F] <-> [B, 1, F]: the same bytes (a dim of 1 moves), so a reshape, which onnxruntime runs without a
        # kernel, where a transpose would copy (2 copies a layer fewer with packed q/k/v, 4 with three inputs)
        c64("as_rows", [-1, 1, 0]), c64("as_sequence", [1, -1, 0]),
        helper.make_node("Shape", ["input_ids"], [p + "ids_shape"]),
        helper.make_node("Slice", [p + "ids_shape", p + "zero", p + "one"], [p + "batch"]),
        helper.make_node("Shape", [CHUNK_IDS], [p + "chunk_shape"]),
        helper.make_node("Slice", [p + "chunk_shape", p + "one", p + "two"], [p + "width"]),
        helper.make_node("Concat", [p + "batch", p + "width"], [p + "sizes"], axis=0),
        # the step's [B, 1] ids as one sequence, then the chunk's: [1, B + W]
        helper.make_node("Reshape", ["input_ids", p + "row"], [p + "step_ids"]),
        helper.make_node("Concat", [p + "step_ids", CHUNK_IDS], [p + "ids"], axis=1),
    ]
    if token_shapes:  # [1, B + W]: the merged tokens' batch and sequence, for the per-head reshapes
        head.append(helper.make_node("Shape", [p + "ids"], [p + "tokens_shape"]))
    if positions_read:
        head += [helper.make_node("Reshape", ["position_ids", p + "row"], [p + "step_positions"]),
                 helper.make_node("Concat", [p + "step_positions", CHUNK_POSITIONS], [p + "positions"], axis=1)]
    renamed = {"attention_mask": CHUNK_MASK}  # the chunk's copy of the mask's arithmetic
    new_nodes: list[Any] = list(head)
    for n in nodes:
        if id(n) in in_mask:
            new_nodes.append(n)
            copy = helper.make_node(n.op_type, [renamed.get(i, i) for i in n.input],
                                    [p + "chunk/" + o for o in n.output], name=(p + n.name) if n.name else "",
                                    domain=n.domain)
            copy.attribute.extend(n.attribute)
            renamed.update(zip(n.output, copy.output))
            new_nodes.append(copy)
            continue
        if id(n) in shape_only:
            continue  # its only readers, the token-shape concats, read the merged tokens' shape now
        if id(n) in token_shapes:
            n.input[:] = [p + "tokens_shape"] + list(n.input[token_shapes[id(n)]:])
        if n.op_type == "Gather" and n.input[1] == "input_ids":
            n.input[1] = p + "ids"
        if n.op_type == "RotaryEmbedding":
            n.input[1] = p + "positions"
        if n.op_type != _GQA:
            new_nodes.append(n)
            continue
        k = len(new_nodes)
        tag = p + f"gqa{k}/"
        step_in, chunk_in = list(n.input), list(n.input)
        for j in (0, 1, 2):
            if j < len(n.input) and n.input[j]:
                x = n.input[j]
                new_nodes += [
                    helper.make_node("Split", [x, p + "sizes"], [tag + f"s{j}", tag + f"c{j}"], axis=1),
                    helper.make_node("Reshape", [tag + f"s{j}", p + "as_rows"], [tag + f"t{j}"]),
                ]
                step_in[j], chunk_in[j] = tag + f"t{j}", tag + f"c{j}"
        for j in (3, 4):
            chunk_in[j] = chunk_name(n.input[j])
        for j in (5, 6):
            chunk_in[j] = renamed[n.input[j]]
        out = n.output[0]
        step = helper.make_node(_GQA, step_in, [tag + "step_out", n.output[1], n.output[2]], name=n.name,
                                domain=n.domain)
        chunk = helper.make_node(_GQA, chunk_in, [tag + "chunk_out", chunk_name(n.output[1]),
                                                  chunk_name(n.output[2])],
                                 name=(p + n.name) if n.name else "", domain=n.domain)
        step.attribute.extend(n.attribute)
        chunk.attribute.extend(n.attribute)
        new_nodes += [
            step, chunk,
            helper.make_node("Reshape", [tag + "step_out", p + "as_sequence"], [tag + "step_row"]),
            helper.make_node("Concat", [tag + "step_row", tag + "chunk_out"], [out], axis=1),
        ]
    # the head: the step's B positions as [B, 1] rows (the graph's logits, as before), the chunk's last token alone
    # one head run for both, [B + 1, 1, hidden] -> [B + 1, 1, vocab], its rows then split: the head's weight (a
    # fifth of a 1B Llama's bytes) is read once, where a copy of the head for the chunk would read it again
    first = chain[-1]
    at = next(k for k, n in enumerate(new_nodes) if n is first)
    split = [
        helper.make_node("Slice", [hidden, p + "zero", p + "batch", p + "one"], [p + "step_hidden_row"]),
        helper.make_node("Reshape", [p + "step_hidden_row", p + "as_rows"], [p + "step_hidden"]),
        # the index comes in whole (B + the chunk's last real token): computed here it would mix the shape's
        # host value into a device index, a copy that keeps onnxruntime from capturing the graph
        helper.make_node("Gather", [hidden, CHUNK_LAST], [p + "chunk_hidden"], axis=1),
        helper.make_node("Concat", [p + "step_hidden", p + "chunk_hidden"], [p + "both_hidden"], axis=0),
    ]
    for n in chain:
        n.input[:] = [p + "both_hidden" if i == hidden else i for i in n.input]
        n.output[:] = [p + "both_logits" if o == logits else o for o in n.output]
    new_nodes[at:at] = split
    new_nodes += [
        c64("rows_end", [1 << 62]),
        helper.make_node("Slice", [p + "both_logits", p + "zero", p + "batch", p + "zero"], [logits]),
        helper.make_node("Slice", [p + "both_logits", p + "batch", p + "rows_end", p + "zero"], [CHUNK_LOGITS]),
    ]

    final = []
    for n in new_nodes:  # copies: the originals belong to the container emptied here
        c = NodeProto()
        c.CopyFrom(n)
        final.append(c)
    del g.node[:]
    g.node.extend(final)
    del g.value_info[:]  # shapes inferred for [B, S] no longer hold on the merged tokens
    mask_type = inputs["attention_mask"].type.tensor_type.elem_type
    if LAST_INDEX not in inputs:  # the head is merged here: a decode step's one position is its last
        g.input.append(helper.make_tensor_value_info(LAST_INDEX, TensorProto.INT64, ["batch_size"]))
    g.input.extend([
        helper.make_tensor_value_info(CHUNK_IDS, inputs["input_ids"].type.tensor_type.elem_type, [1, "chunk_width"]),
        helper.make_tensor_value_info(CHUNK_MASK, mask_type, [1, "chunk_total_length"]),
        helper.make_tensor_value_info(CHUNK_LAST, TensorProto.INT64, [1]),
    ])
    if positions_read:
        g.input.append(helper.make_tensor_value_info(CHUNK_POSITIONS, inputs["position_ids"].type.tensor_type.elem_type,
                                                     [1, "chunk_width"]))
    kv_in = [n.input[j] for n in gqas for j in (3, 4)]
    kv_out = [n.output[j] for n in gqas for j in (1, 2)]
    for name in kv_in:
        t = inputs[name].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        g.input.append(helper.make_tensor_value_info(chunk_name(name), t.elem_type, [1] + dims[1:]))
    for name in kv_out:
        t = outputs[name].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        g.output.append(helper.make_tensor_value_info(chunk_name(name), t.elem_type, [1] + dims[1:]))
    g.output.append(helper.make_tensor_value_info(CHUNK_LOGITS, outputs[logits].type.tensor_type.elem_type,
                                                  [1, 1, "vocab"]))
    dims = outputs[logits].type.tensor_type.shape.dim
    if len(dims) == 3:  # [B, 1, vocab]: a decode step's
        dims[1].Clear()
        dims[1].dim_value = 1
    return None
