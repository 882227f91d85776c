"""What a quantizer can see: weights made visible, the LM head and the embeddings named.

ORT's quantizers act on MatMul nodes whose B input is an initializer. Two things in our exports hide weights from
them: GPT-2's Conv1D layers come out as Gemm, and a tied LM head is MatMul(x, Transpose(embedding)). Both are
rewritten here into plain MatMul-with-constant-weight (exactly the same arithmetic) before any mode runs, so one
rule, "MatMul with a 2-D constant weight", finds every linear layer of every family, exported or optimized.

Rewrites are written on onnx_ir (``ir_model`` / ``write_back``): the quantizers take and change a ModelProto in
place, as ORT's own tools (which they call) do, and the IR model read from it is written back without copying the
weights it left alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpipe.runtime.sessions import open_session

LINEAR_OPS = ("MatMul",)
PASS_THROUGH = ("Cast", "Reshape", "Identity")  # ops that may sit between the LM head and the logits output
FLOAT_WEIGHTS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

# the fixed grid of a per-token int8 activation (x / max|x_t| quantized with scale 1/127, zero point 128), shared by
# dynamic int8's per-token form and the sensitivity simulation of it
UNIT_SCALE = 1.0 / 127.0
UNIT_ZERO = 128


@dataclass
class WeightPlan:
    """The linear layers of a graph, after ``expose_weights``."""

    linears: list[str]  # MatMul nodes with a 2-D constant weight, in graph order (LM head included)
    lm_head: str | None  # the MatMul whose output is the logits
    embeddings: list[str]  # Gather nodes that look rows up in a constant 2-D table (token, position embeddings)
    rewrites: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"linears": len(self.linears), "lm_head": self.lm_head, "embeddings": self.embeddings,
                "rewrites": self.rewrites}


def save_quantized(proto: Any, path: Path) -> None:
    """Save ``proto`` as ``path``; its weights go to ``path.name + ".data"`` past artifact.EXTERNAL_DATA_THRESHOLD
    (read at call time, so a test can lower it)."""
    from onnxpipe import artifact

    artifact.save_onnx(proto, path.parent, path.name, threshold=artifact.EXTERNAL_DATA_THRESHOLD)


def needs_external_data(proto: Any) -> bool:
    from onnxpipe import artifact

    return sum(len(t.raw_data) for t in proto.graph.initializer) > artifact.EXTERNAL_DATA_THRESHOLD


def float_session(proto: Any) -> Any:
    """An ORT CPU session on an in-memory model with graph optimizations off (statistics of the float model). A
    model past the external-data threshold cannot be serialized in one protobuf (2 GiB): it is saved with external
    data in a temporary directory and opened from there."""
    return open_session(proto, optimization="off", purpose="statistics of the float model")


def initializer_map(graph: Any) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer}


def ir_model(proto: Any) -> ir.Model:
    """The IR of ``proto``; its initializers read ``proto``'s tensors (no copy of the weights)."""
    return ir.serde.deserialize_model(proto)


def write_back(model: ir.Model, proto: Any) -> None:
    """``model`` (read from ``proto`` by ``ir_model``, then rewritten) into ``proto``, in place: the nodes in graph
    order, the opset imports, and the initializers: those the IR still reads from ``proto`` stay as they are (no
    copy of their data), new or changed ones are appended, and those the graph no longer has are dropped."""
    graph = proto.graph
    graph.ClearField("node")
    graph.node.extend(ir.serde.serialize_node(n) for n in model.graph)
    wanted = model.graph.initializers
    for i in reversed(range(len(graph.initializer))):
        name = graph.initializer[i].name
        if name not in wanted or not _read_from_proto(wanted[name]):
            del graph.initializer[i]
    kept = {t.name for t in graph.initializer}
    for name, value in wanted.items():
        if name not in kept:
            assert value.const_value is not None, name
            tensor = ir.serde.serialize_tensor(value.const_value)
            tensor.name = name
            graph.initializer.append(tensor)
    versions = dict(model.opset_imports)
    for o in proto.opset_import:
        if o.domain in versions:
            o.version = versions.pop(o.domain)
    for domain, version in versions.items():
        op = proto.opset_import.add()
        op.domain, op.version = domain, version


def _read_from_proto(value: ir.Value) -> bool:
    tensor = value.const_value
    return isinstance(tensor, ir.TensorProtoTensor) and tensor.raw.name == value.name


def add_initializer(graph: ir.Graph, name: str, value: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """A new initializer ``name`` of the graph holding ``value`` (a numpy array, or an IR tensor such as a packed
    uint4 one)."""
    tensor = ir.tensor(value, name=name) if isinstance(value, np.ndarray) else value
    tensor.name = name
    out = ir.Value(name=name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(out)
    return out


def make_node(op_type: str, inputs: list[ir.Value | None], output: str | None, name: str, domain: str = "",
              **attributes: Any) -> ir.Node:
    """One node with one output named ``output`` (None: left for replace_nodes_and_values to name after the value
    it replaces)."""
    node = ir.node(op_type, inputs, attributes, domain=domain, name=name)
    node.outputs[0].name = output
    return node


def replace_node(graph: ir.Graph, old: ir.Node, new: list[ir.Node]) -> None:
    """``new`` in place of ``old`` (at its position); the last new node's output takes over the old output: its
    name, its uses and, if it is one, its place among the graph outputs."""
    ir.convenience.replace_nodes_and_values(graph, old, [old], new, [old.outputs[0]], [new[-1].outputs[0]])


def drop_unused_initializers(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(name)


def unique_name(base: str, taken: Any) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def expose_weights(proto: Any, logits_name: str, untie_lm_head: bool = True) -> WeightPlan:
    """Rewrite Gemm(constant B) into MatMul + Add and a transposed tied LM head into its own constant; in place."""
    model = ir_model(proto)
    rewrites: Counter = Counter()
    rewrites["gemm_to_matmul"] = _gemm_to_matmul(model.graph)
    if untie_lm_head:
        rewrites["lm_head_untied"] = _untie_lm_head(model.graph, logits_name)
    if any(rewrites.values()):
        write_back(model, proto)
    return _plan(model.graph, logits_name, dict(rewrites))


def plan_weights(proto: Any, logits_name: str, rewrites: dict[str, int] | None = None) -> WeightPlan:
    return _plan(ir_model(proto).graph, logits_name, rewrites or {})


def _plan(graph: ir.Graph, logits_name: str, rewrites: dict[str, int]) -> WeightPlan:
    linears = [n.name or "" for n in graph if n.op_type in LINEAR_OPS and len(n.inputs) > 1 and weight_2d(n.inputs[1])]
    embeddings = [n.name or "" for n in graph if n.op_type == "Gather" and n.inputs and weight_2d(n.inputs[0])]
    head = _ir_lm_head(graph, logits_name)
    return WeightPlan(linears, head.name if head is not None and head.name in linears else None, embeddings, rewrites)


def weight_2d(value: ir.Value | None) -> bool:
    """An initializer of two dimensions in a float type: a linear layer's weight."""
    tensor = value.const_value if value is not None and value.is_initializer() else None
    return tensor is not None and len(tensor.shape) == 2 and tensor.dtype in FLOAT_WEIGHTS


def _gemm_to_matmul(graph: ir.Graph) -> int:
    count = 0
    for node in list(graph):
        a = node.attributes
        plain = a.get_float("alpha", 1.0) == 1.0 and a.get_float("beta", 1.0) == 1.0 and not a.get_int("transA", 0)
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or not plain or not weight_2d(node.inputs[1]):
            continue
        x, weight = node.inputs[0], node.inputs[1]
        assert weight is not None and weight.const_value is not None and weight.name is not None
        if a.get_int("transB", 0):
            transposed = weight.const_value.numpy().T.copy()
            if len(weight.uses()) > 1:  # shared: transpose a copy, leave the original to its other users
                weight = add_initializer(graph, unique_name(f"{weight.name}_T", graph.initializers), transposed)
            else:
                weight.const_value = ir.tensor(transposed, name=weight.name)
                weight.shape = ir.Shape(transposed.shape)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        out = node.outputs[0]
        new = [ir.node("MatMul", [x, weight], name=f"{node.name}/MatMul")]
        if bias is not None:
            new[0].outputs[0].name = f"{out.name}_matmul"
            new.append(ir.node("Add", [new[0].outputs[0], bias], name=f"{node.name}/Add"))
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, [out], [new[-1].outputs[0]])
        count += 1
    return count


def _ir_lm_head(graph: ir.Graph, logits_name: str) -> ir.Node | None:
    """The MatMul that makes the logits, looking back through casts and reshapes."""
    value = next((o for o in graph.outputs if o.name == logits_name), None)
    for _ in range(4):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type in LINEAR_OPS:
            return node
        if node.op_type not in PASS_THROUGH:
            return None
        value = node.inputs[0]
    return None


@dataclass(frozen=True)
class Transposed:
    """An untied head's weight E^T. Of a table in a data file, made when first read (an ir.LazyTensor's function,
    cached): the 8-bit vocabulary tables (embedding.py) read E's rows instead, a block at a time, so a model read
    lazily holds E^T whole only if something else reads it."""

    source: Any  # ir.TensorProtocol [V, H]

    def __call__(self) -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(self.source.numpy().T))


def _untie_lm_head(graph: ir.Graph, logits_name: str) -> int:
    """MatMul(x, Transpose(E)) -> MatMul(x, E^T as its own constant): the tie is broken on purpose, so the head can
    be quantized for the matrix product while the embedding table stays as it is for the lookup."""
    head = _ir_lm_head(graph, logits_name)
    tr = head.inputs[1].producer() if head is not None and head.inputs[1] is not None else None
    if head is None or tr is None or tr.op_type != "Transpose":
        return 0
    source = tr.inputs[0]
    if source is None or not source.is_initializer() or source.const_value is None:
        return 0
    perm = tr.attributes.get_ints("perm")
    if perm is not None and list(perm) != [1, 0]:
        return 0
    table = source.const_value
    if len(table.shape) != 2:
        return 0
    rows, cols = table.shape.numpy()
    # read from a file (a model read lazily): E^T made only if something reads it; in memory: made now
    transposed = ir.LazyTensor(Transposed(table), table.dtype, ir.Shape([cols, rows]), cache=True) \
        if isinstance(table, ir.ExternalTensor) else Transposed(table)()
    value = add_initializer(graph, unique_name(f"{source.name}.lm_head_T", graph.initializers), transposed)
    head.replace_input_with(1, value)
    if not tr.outputs[0].uses() and not tr.outputs[0].is_graph_output():
        graph.remove(tr, safe=True)
    return 1


def op_counts(proto: Any) -> dict[str, int]:
    """Node counts by op type (``domain::Op`` outside the default domain), top-level graph."""
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in proto.graph.node)
    return dict(sorted(counts.items()))


def per_token_input(x: ir.Value | None, q: str, shared: dict[str, ir.Value], opset: int) -> list[ir.Node]:
    """x -> (Abs, ReduceMax, Max, Div, QuantizeLinear) on the per-token grid (UNIT_SCALE, UNIT_ZERO), as dynamic
    int8 writes it and its sensitivity simulation fakes it: [2] is the token's max |x|, [-1] the uint8 token."""
    absx = make_node("Abs", [x], f"{q}/absx", f"{q}/Abs")
    reduce = (make_node("ReduceMax", [absx.outputs[0], shared["axes"]], f"{q}/amax", f"{q}/ReduceMax", keepdims=1)
              if opset >= 18 else
              make_node("ReduceMax", [absx.outputs[0]], f"{q}/amax", f"{q}/ReduceMax", axes=[-1], keepdims=1))
    token_max = make_node("Max", [reduce.outputs[0], shared["tiny"]], f"{q}/token_max", f"{q}/Max")
    unit = make_node("Div", [x, token_max.outputs[0]], f"{q}/x_unit", f"{q}/Div")
    quant = make_node("QuantizeLinear", [unit.outputs[0], shared["unit_scale"], shared["unit_zero"]], f"{q}/x_uint8",
                      f"{q}/QuantizeLinear")
    return [absx, reduce, token_max, unit, quant]
