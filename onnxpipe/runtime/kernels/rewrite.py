"""MatMulNBits (com.microsoft, 4-bit) -> onnxpipe.MatMulInt4 in a ModelProto, in memory.

The new node takes the same inputs, outputs and attributes (MatMulInt4 reads exactly MatMulNBits' bits=4 form), so
the rewrite is a change of op type and domain, plus the ``onnxpipe`` opset import. A node is left as it is, with the
reason, where the kernels would not compute it: other bit widths, g_idx or bias inputs, float zero points, K not a
multiple of the block, a block other than 32/64/128, or (for the CUDA kernel) activations that are not float16.

With ``fuse``, an MLP's gate and up projections (MatMulNBits, or float MatMuls) become one product and an
onnxpipe.SiluMul where the pattern holds (gate_up.py). With ``linear``, the float MatMuls of an activation by a weight
initializer (the merged pairs' included) become onnxpipe.Linear of the transposed weight (linear.py).

A policy can keep more (``skip``, kinds found from the graph, never by name): ``head``, the MatMulNBits whose output
feeds the logits (through shape, cast and elementwise ops only), ``qkv``, a MatMulNBits whose output is an
attention node's packed query/key/value input (GroupQueryAttention after ``optimize --target cuda``), and ``all``,
every MatMulNBits. A kind asked for that the graph does not have is said in the report (``skip_notes``), not an
error. A gate/up pair whose two nodes are both kept still becomes one product, a MatMulNBits of 2N rows (onnxruntime's
kernel, as before), and a SiluMul.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from onnxpipe.runtime.kernels import gate_up
from onnxpipe.runtime.kernels.gate_up import find_pairs, merge_pairs, within_budget
from onnxpipe.runtime.kernels.linear import linear_nodes, to_linear

DOMAIN = "onnxpipe"
OP = "MatMulInt4"
BLOCK_SIZES = (32, 64, 128)
Target = Literal["cuda", "cpu"]  # cpu: the C++ reference kernel (tests, checks), not a fast path

_FLOAT, _UINT8, _FLOAT16 = 1, 2, 10  # onnx.TensorProto data types
SKIP_KINDS = ("head", "qkv", "all")
# ops between the LM head's MatMulNBits and the logits that the walk back from the logits goes through (layout,
# casts, a bias, a soft cap); anything else (a MatMul, a Gather) ends it: then the head is not a MatMulNBits
_TO_LOGITS = {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "Add", "Mul", "Div",
              "Tanh", "Gather", "GatherElements", "Slice"}
_ATTENTION = {"GroupQueryAttention", "MultiHeadAttention", "PackedMultiHeadAttention"}


@dataclass
class RewriteReport:
    """What the rewrite did: how many MatMulNBits nodes it turned into MatMulInt4, and why each other one was not."""

    total: int = 0
    rewritten: int = 0
    kept: dict[str, str] = field(default_factory=dict)  # node name -> reason
    skip_notes: list[str] = field(default_factory=list)  # a kind asked to skip that the graph does not have, and why
    fused: int = 0  # gate/up pairs made one product + SiluMul (gate_up.py); their nodes are counted in rewritten
    fused_kept: int = 0  # of those, pairs of kept nodes: one MatMulNBits (their nodes are counted in kept instead)
    apart: int = 0  # pairs left apart: their merged weights would pass gate_up.INLINE_MAX_BYTES held in memory
    linear: int = 0  # float MatMuls made onnxpipe.Linear (linear.py)

    def line(self) -> str:
        parts = [f"{OP} on {self.rewritten} of {self.total} MatMulNBits"] if self.total else []
        if self.fused or self.apart:
            fused = f"{self.fused} gate/up pairs as one with SiluMul"
            if self.fused_kept:
                fused += f" ({self.fused_kept} as one MatMulNBits)"
            if self.apart:
                fused += (f" ({self.apart} left apart: merged weights past {gate_up.INLINE_MAX_BYTES >> 20} MiB "
                          "held in memory)")
            parts.append(fused)
        if self.linear:
            parts.append(f"{self.linear} MatMul as Linear")
        return f"{DOMAIN} " + (", ".join(parts) or f"{OP} on 0 of 0 MatMulNBits")

    def reasons(self) -> str:
        """The distinct reasons nodes were kept, with their counts ("bits=8 (2 nodes); ...")."""
        counts: dict[str, int] = {}
        for why in self.kept.values():
            counts[why] = counts.get(why, 0) + 1
        return "; ".join(f"{why} ({n} node{'s' if n > 1 else ''})" for why, n in counts.items())


def rewrite_matmul_nbits(model: Any, target: Target = "cuda", *, apply: bool = True, skip: tuple[str, ...] = (),
                         logits: str = "logits", fuse: bool = False, folder: Path | None = None,
                         linear: bool = False) -> RewriteReport:
    """Rewrite the 4-bit MatMulNBits nodes of ``model`` (an onnx.ModelProto, changed in place) that the ``target``
    kernel computes into onnxpipe.MatMulInt4; ``apply=False`` only reports what it would do. ``skip``: kinds of node
    kept as they are (SKIP_KINDS; ``head`` is found from the value named ``logits``). ``fuse``: an MLP's gate and up
    projections become one MatMulInt4 and a SiluMul where the pattern holds (gate_up.py; their weights read from
    ``folder`` where they are external). ``linear``: float MatMuls by a weight initializer become onnxpipe.Linear
    (linear.py). Only the main graph is read (not subgraphs or functions)."""
    if target not in ("cuda", "cpu"):
        raise ValueError(f"unknown kernel target {target!r}")
    unknown = [k for k in skip if k not in SKIP_KINDS]
    if unknown:
        raise ValueError(f"unknown kinds to skip {unknown} (kinds: {', '.join(SKIP_KINDS)})")
    graph = model.graph
    types = _elem_types(graph)
    report = RewriteReport()
    kinds: dict[int, str] = {}  # index of a node in graph.node -> the kind it is skipped as
    for kind in skip:
        found, note = (head_nodes(graph, logits) if kind == "head" else qkv_nodes(graph) if kind == "qkv"
                       else ([i for i, n in enumerate(graph.node) if _is_nbits(n)], "the graph has no MatMulNBits"))
        kinds.update((i, kind) for i in found if i not in kinds)
        if not found:
            report.skip_notes.append(f"skip {kind}: nothing to skip, {note}")
    kept_nodes = [graph.node[i] for i in kinds]  # held: protobuf hands out the same wrapper only while one lives
    skipped = {id(n) for n in kept_nodes}
    weight_types = {t.name: t.data_type for t in graph.initializer}

    def takes(n: Any) -> bool:  # a projection the kernels would compute (a float one: SiluMul's types)
        if _is_nbits(n):
            return why_not(n, types, target) is None
        return weight_types.get(n.input[1]) == _FLOAT16 or (target == "cpu" and weight_types.get(n.input[1]) == _FLOAT)

    # a pair of kept nodes becomes one MatMulNBits, a pair of taken ones one MatMulInt4; one of each stays apart
    pairs = [p for p in find_pairs(graph, takes) if (id(p.gate) in skipped) == (id(p.up) in skipped)] if fuse else []
    if folder is None:  # external weights cannot be read without the model directory: those pairs stay apart
        external = {t.name for t in graph.initializer if t.data_location == 1}  # TensorProto.EXTERNAL
        pairs = [p for p in pairs if not any(name in external for n in (p.gate, p.up) for name in n.input[1:])]
    pairs, report.apart = within_budget(graph, pairs)
    paired = {id(n) for p in pairs for n in (p.gate, p.up)}
    for i, node in enumerate(graph.node):
        if not _is_nbits(node):
            continue
        report.total += 1
        if id(node) in paired and id(node) not in skipped:
            report.rewritten += 1
            continue
        why = why_not(node, types, target) or kinds.get(i)  # a node the kernel would not compute says why first
        if why is not None:
            report.kept[node.name or f"#{i}"] = why
            continue
        if apply:
            node.op_type, node.domain = OP, DOMAIN
        report.rewritten += 1
    report.fused = len(pairs)
    kept_pairs = {id(p) for p in pairs if id(p.gate) in skipped}
    report.fused_kept = len(kept_pairs)
    if apply and pairs:
        merge_pairs(model, pairs, folder, OP, nbits=kept_pairs)
    if linear:
        # after the merge: a merged float pair is one MatMul of [K, 2N]; before it (apply=False), its two MatMuls
        # count as one
        found = linear_nodes(graph, (_FLOAT16,) if target == "cuda" else (_FLOAT, _FLOAT16))
        float_pairs = 0 if apply else sum(1 for p in pairs if not _is_nbits(p.gate))
        report.linear = len(found) - float_pairs
        if apply:
            to_linear(model, found)
    if apply and (report.rewritten or pairs) and not any(o.domain == DOMAIN for o in model.opset_import):
        entry = model.opset_import.add()
        entry.domain, entry.version = DOMAIN, 1
    return report


def _is_nbits(node: Any) -> bool:
    return bool(node.op_type == "MatMulNBits" and node.domain == "com.microsoft")


def head_nodes(graph: Any, logits: str) -> tuple[list[int], str]:
    """The MatMulNBits node(s) computing the LM head: found by walking back from the value ``logits`` through the
    ops of ``_TO_LOGITS`` (their non-constant inputs), stopping at the first MatMulNBits on each path. With none:
    ([], why)."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    if logits not in producer:
        return [], f"no node computes {logits!r}"
    found: list[int] = []
    seen: set[str] = set()
    todo = [logits]
    while todo:
        value = todo.pop()
        if value in seen or value not in producer:
            continue
        seen.add(value)
        i = producer[value]
        node = graph.node[i]
        if _is_nbits(node):
            found.append(i)
        elif node.domain in ("", "ai.onnx") and node.op_type in _TO_LOGITS:
            todo += list(node.input[:1] if node.op_type in ("Gather", "GatherElements", "Slice") else node.input)
    if found:
        return sorted(found), ""
    return [], f"the {logits!r} output does not come from a MatMulNBits (the LM head is not quantized)"


def qkv_nodes(graph: Any) -> tuple[list[int], str]:
    """The MatMulNBits nodes whose output is an attention node's packed query/key/value (its first input, with no
    separate key input): ([], why) where there are none."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    found = sorted({producer[n.input[0]] for n in graph.node
                    if n.op_type in _ATTENTION and n.domain == "com.microsoft" and n.input and n.input[0] in producer
                    and not (len(n.input) > 1 and n.input[1]) and _is_nbits(graph.node[producer[n.input[0]]])})
    return found, "" if found else "no MatMulNBits feeds an attention node's packed query/key/value input"


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
