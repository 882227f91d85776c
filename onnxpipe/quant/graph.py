"""What a quantizer can see: weights made visible, the LM head and the embeddings named.

ORT's quantizers act on MatMul nodes whose B input is an initializer. Two things in our exports hide weights from
them: GPT-2's Conv1D layers come out as Gemm, and a tied LM head is MatMul(x, Transpose(embedding)). Both are
rewritten here into plain MatMul-with-constant-weight (exactly the same arithmetic) before any mode runs, so one
rule, "MatMul with a 2-D constant weight", finds every linear layer of every family, exported or optimized.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.runtime.sessions import open_session

LINEAR_OPS = ("MatMul",)
PASS_THROUGH = ("Cast", "Reshape", "Identity")  # ops that may sit between the LM head and the logits output


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


def consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    for o in graph.output:
        out.setdefault(o.name, [])
    return out


def producers(graph: Any) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def expose_weights(proto: Any, logits_name: str, untie_lm_head: bool = True) -> WeightPlan:
    """Rewrite Gemm(constant B) into MatMul + Add and a transposed tied LM head into its own constant; in place."""
    graph = proto.graph
    rewrites: Counter = Counter()
    rewrites["gemm_to_matmul"] = _gemm_to_matmul(graph)
    if untie_lm_head:
        rewrites["lm_head_untied"] = _untie_lm_head(graph, logits_name)
    return plan_weights(proto, logits_name, dict(rewrites))


def plan_weights(proto: Any, logits_name: str, rewrites: dict[str, int] | None = None) -> WeightPlan:
    graph = proto.graph
    inits = initializer_map(graph)
    linears = [n.name for n in graph.node if n.op_type in LINEAR_OPS and _const_2d(n.input[1], inits)]
    embeddings = [
        n.name for n in graph.node
        if n.op_type == "Gather" and _const_2d(n.input[0], inits)
    ]
    head = find_lm_head(graph, logits_name)
    return WeightPlan(linears, head.name if head is not None and head.name in linears else None, embeddings,
                      rewrites or {})


def find_lm_head(graph: Any, logits_name: str) -> Any | None:
    """The MatMul that makes the logits, looking back through casts and reshapes."""
    prod = producers(graph)
    name = logits_name
    for _ in range(4):
        node = prod.get(name)
        if node is None:
            return None
        if node.op_type in LINEAR_OPS:
            return node
        if node.op_type not in PASS_THROUGH:
            return None
        name = node.input[0]
    return None


def _const_2d(name: str, inits: dict[str, Any]) -> bool:
    t = inits.get(name)
    return t is not None and len(t.dims) == 2 and t.data_type in (1, 10, 16)  # float, float16, bfloat16


def _gemm_to_matmul(graph: Any) -> int:
    import onnx
    from onnx import numpy_helper

    inits = initializer_map(graph)
    uses = Counter(i for n in graph.node for i in n.input)
    new_nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or not _const_2d(node.input[1], inits):
            new_nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            if uses[weight] > 1:  # shared: transpose a copy, leave the original to its other users
                weight = _unique_name(f"{weight}_T", inits)
            inits[weight] = _replace_initializer(
                graph, inits, node.input[1], weight, numpy_helper.to_array(inits[node.input[1]]).T.copy()
            )
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=f"{node.name}/MatMul"))
        if has_bias:
            new_nodes.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}/Add"))
        count += 1
    if count:
        graph.ClearField("node")
        graph.node.extend(new_nodes)
    return count


def _untie_lm_head(graph: Any, logits_name: str) -> int:
    """MatMul(x, Transpose(E)) -> MatMul(x, E^T as its own constant): the tie is broken on purpose, so the head can
    be quantized for the matrix product while the embedding table stays as it is for the lookup."""
    import onnx
    from onnx import numpy_helper

    head = find_lm_head(graph, logits_name)
    if head is None:
        return 0
    prod = producers(graph)
    tr = prod.get(head.input[1])
    inits = initializer_map(graph)
    if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
        return 0
    perm = [onnx.helper.get_attribute_value(a) for a in tr.attribute if a.name == "perm"]
    if perm and list(perm[0]) != [1, 0]:
        return 0
    table = numpy_helper.to_array(inits[tr.input[0]])
    if table.ndim != 2:
        return 0
    name = _unique_name(f"{tr.input[0]}.lm_head_T", inits)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), name))
    head.input[1] = name
    if not any(tr.output[0] in n.input for n in graph.node if n is not head):
        graph.node.remove(tr)
    return 1


def _replace_initializer(graph: Any, inits: dict[str, Any], old: str, new: str, value: np.ndarray) -> Any:
    from onnx import numpy_helper

    tensor = numpy_helper.from_array(value, new)
    if old == new:
        graph.initializer.remove(inits[old])
    graph.initializer.append(tensor)
    return tensor


def _unique_name(base: str, taken: dict[str, Any]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def op_counts(proto: Any) -> dict[str, int]:
    """Node counts by op type (``domain::Op`` outside the default domain), top-level graph."""
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in proto.graph.node)
    return dict(sorted(counts.items()))


def topological_sort(graph: Any) -> None:
    """Reorder nodes so each comes after the producers of its inputs (ORT's fp16 converter appends the Casts it
    inserts for blocked nodes that read graph inputs at the end, which the ONNX checker rejects); in place."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a dangling input: leave the remainder as it was
            ordered.extend(rest)
            break
        pending = rest
    graph.ClearField("node")
    graph.node.extend(ordered)
