"""MatMulNBits (com.microsoft, 4-bit) -> onnxpipe.MatMulInt4 in a ModelProto, in memory.

The new node takes the same inputs, outputs and attributes (MatMulInt4 reads exactly MatMulNBits' bits=4 form), so
the rewrite is a change of op type and domain, plus the ``onnxpipe`` opset import. A node is left as it is, with the
reason, where the kernels would not compute it: other bit widths, g_idx or bias inputs, float zero points, K not a
multiple of the block, a block other than 32/64/128, or (for the CUDA kernel) activations that are not float16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DOMAIN = "onnxpipe"
OP = "MatMulInt4"
BLOCK_SIZES = (32, 64, 128)
Target = Literal["cuda", "cpu"]  # cpu: the C++ reference kernel (tests, checks), not a fast path

_FLOAT, _UINT8, _FLOAT16 = 1, 2, 10  # onnx.TensorProto data types


@dataclass
class RewriteReport:
    """What the rewrite did: how many MatMulNBits nodes it turned into MatMulInt4, and why each other one was not."""

    total: int = 0
    rewritten: int = 0
    kept: dict[str, str] = field(default_factory=dict)  # node name -> reason

    def line(self) -> str:
        return f"{DOMAIN} {OP} on {self.rewritten} of {self.total} MatMulNBits"

    def reasons(self) -> str:
        """The distinct reasons nodes were kept, with their counts ("bits=8 (2 nodes); ...")."""
        counts: dict[str, int] = {}
        for why in self.kept.values():
            counts[why] = counts.get(why, 0) + 1
        return "; ".join(f"{why} ({n} node{'s' if n > 1 else ''})" for why, n in counts.items())


def rewrite_matmul_nbits(model: Any, target: Target = "cuda", *, apply: bool = True) -> RewriteReport:
    """Rewrite the 4-bit MatMulNBits nodes of ``model`` (an onnx.ModelProto, changed in place) that the ``target``
    kernel computes into onnxpipe.MatMulInt4; ``apply=False`` only reports what it would do. Only the main graph is
    read (not subgraphs or functions)."""
    if target not in ("cuda", "cpu"):
        raise ValueError(f"unknown kernel target {target!r}")
    graph = model.graph
    types = _elem_types(graph)
    report = RewriteReport()
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        report.total += 1
        why = why_not(node, types, target)
        if why is not None:
            report.kept[node.name or f"#{i}"] = why
            continue
        if apply:
            node.op_type, node.domain = OP, DOMAIN
        report.rewritten += 1
    if apply and report.rewritten and not any(o.domain == DOMAIN for o in model.opset_import):
        entry = model.opset_import.add()
        entry.domain, entry.version = DOMAIN, 1
    return report


def why_not(node: Any, types: dict[str, int], target: Target) -> str | None:
    """Why MatMulInt4 on ``target`` would not compute this MatMulNBits node, or None where it would."""
    attrs = {a.name: a.i for a in node.attribute if a.type == 2}  # AttributeProto.INT
    bits, block, k = attrs.get("bits", 4), attrs.get("block_size"), attrs.get("K")
    if bits != 4:
        return f"bits={bits} (MatMulInt4 takes 4)"
    if k is None or attrs.get("N") is None or block is None:
        return "an attribute K, N or block_size is missing"
    extra = [name for name in node.input[4:] if name]
    if extra:
        return "it has a g_idx or bias input"
    if block not in BLOCK_SIZES:
        return f"block_size={block} (MatMulInt4 takes {', '.join(map(str, BLOCK_SIZES))})"
    if k % block:
        return f"K={k} is not a multiple of block_size={block}"
    if len(node.input) > 3 and node.input[3]:
        zp = types.get(node.input[3])
        if zp != _UINT8:
            return "its zero points are not packed uint8" + ("" if zp is not None else " (type unknown)")
    float_type = types.get(node.input[2]) or types.get(node.input[0])  # scales have A's type
    if float_type not in (_FLOAT, _FLOAT16):
        return "the type of its activations is unknown" if float_type is None else "its activations are not float"
    if target == "cuda" and float_type != _FLOAT16:
        return "its activations are float32 (the CUDA kernel takes float16)"
    return None


def _elem_types(graph: Any) -> dict[str, int]:
    """Element type by value name, from the initializers, Constant nodes, inputs and recorded value infos."""
    types: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types.setdefault(v.name, v.type.tensor_type.elem_type)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    types.setdefault(node.output[0], a.t.data_type)
    return types
