"""The token embedding and the LM head as one 8-bit table, shared when the model ties them.

Small decoders spend a large share of their weights on the vocabulary: the reference models' 4096 x 128 table is
40% of their parameters. Leaving it in float would cap what any mode can save; quantizing lookup and head
separately would store it twice. So the table is quantized once, per vocabulary row (one scale per token,
symmetric int8, stored as uint8 with the MatMulNBits default zero point 128) in MatMulNBits' layout
[V, 1, block] (one block per row: block = the next power of two >= hidden size):

- the LM head becomes MatMulNBits(bits=8, block_size=block) over that table (N = V, K = hidden);
- the lookup becomes Gather(table, ids) -> Squeeze -> (Slice) -> Cast -> (q - 128) * Gather(scales, ids): one row
  per token dequantized, nothing else.
A tied model then holds 1 byte per table entry where fp32 held 4 (and the untied graph 8). An untied head gets
its own table, the same way. Per-row scales keep the error at the level of per-channel int8 (ORT's own Gather
quantization uses a single scale for the whole table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxpipe.quant.graph import initializer_map


@dataclass
class TableReport:
    lm_head: str | None = None  # "int8 (shared with the embedding)" | "int8" | None (not touched)
    embeddings: list[str] = field(default_factory=list)  # Gather nodes now reading an int8 table
    block_size: int = 0
    max_abs_err: float = 0.0  # of the dequantized table vs the float one, over all entries

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """[V, H] float -> (uint8 [V, 1, block] with zero point 128, float32 scales [V, 1], block)."""
    v, h = table.shape
    block = max(16, 1 << (h - 1).bit_length())
    scale = np.abs(table).max(1, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.full((v, block), 128, np.uint8)
    q[:, :h] = (np.clip(np.round(table / scale), -127, 127) + 128).astype(np.uint8)
    return q.reshape(v, 1, block), scale, block


def dequantize_rows(q: np.ndarray, scale: np.ndarray, h: int) -> np.ndarray:
    return (q.reshape(q.shape[0], -1)[:, :h].astype(np.float32) - 128.0) * scale


def token_embeddings(proto: Any, vocab_size: int) -> list[Any]:
    inits = initializer_map(proto.graph)
    return [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits
            and tuple(inits[n.input[0]].dims)[:1] == (vocab_size,) and len(inits[n.input[0]].dims) == 2]


def quantize_vocab_tables(proto: Any, head_name: str | None, vocab_size: int, head: bool, embeddings: bool,
                          accuracy_level: int) -> TableReport:
    """Replace the LM head (if ``head``) and the token lookups (if ``embeddings``) by 8-bit per-row tables; in place."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    inits = initializer_map(graph)
    report = TableReport()
    if head and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    head_node = next((n for n in graph.node if n.name == head_name), None) if head else None
    lookups = token_embeddings(proto, vocab_size) if embeddings else []
    shared: dict[str, tuple[str, str, int, int]] = {}  # float table name -> (q name, scale name, block, hidden)

    def table_for(name: str, values: np.ndarray) -> tuple[str, str, int, int]:
        if name not in shared:
            q, scale, block = quantize_rows(values)
            report.max_abs_err = max(report.max_abs_err, float(np.abs(dequantize_rows(q, scale, values.shape[1]) - values).max()))
            qn, sn = f"{name}_int8_rows", f"{name}_int8_row_scales"
            graph.initializer.extend([numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn)])
            shared[name] = (qn, sn, block, values.shape[1])
            report.block_size = block
        return shared[name]

    if head_node is not None:
        weight = numpy_helper.to_array(inits[head_node.input[1]])  # [H, V]
        tied_to = next((g.input[0] for g in lookups
                        if np.array_equal(numpy_helper.to_array(inits[g.input[0]]), weight.T)), None)
        key = tied_to or head_node.input[1]
        qn, sn, block, h = table_for(key, weight.T if tied_to is None else numpy_helper.to_array(inits[tied_to]))
        _replace(graph, head_node, _head_node(head_node, qn, sn, weight.shape[1], h, block, accuracy_level))
        report.lm_head = "int8 per row (shared with the embedding table)" if tied_to else "int8 per row"
    for g in lookups:
        qn, sn, block, h = table_for(g.input[0], numpy_helper.to_array(inits[g.input[0]]))
        _replace(graph, g, *_lookup_nodes(g, qn, sn, h, block))
        report.embeddings.append(g.name)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return report


def _head_node(node: Any, qn: str, sn: str, v: int, h: int, block: int, accuracy_level: int) -> Any:
    import onnx

    attrs = {"K": h, "N": v, "bits": 8, "block_size": block}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    return onnx.helper.make_node("MatMulNBits", [node.input[0], qn, sn], list(node.output), name=f"{node.name}_Q8rows",
                                 domain="com.microsoft", **attrs)


def _lookup_nodes(node: Any, qn: str, sn: str, h: int, block: int) -> list[Any]:
    import onnx
    from onnx import numpy_helper

    p = f"{node.name}/int8rows"
    out = node.output[0]
    nodes = [
        onnx.helper.make_node("Gather", [qn, node.input[1]], [f"{p}/q3"], name=f"{p}/GatherRows", axis=0),
        onnx.helper.make_node("Squeeze", [f"{p}/q3", f"{p}/axis"], [f"{p}/q"], name=f"{p}/Squeeze"),
    ]
    consts = [numpy_helper.from_array(np.array([-2], np.int64), f"{p}/axis"),
              numpy_helper.from_array(np.array(128.0, np.float32), f"{p}/zero_point"),
              numpy_helper.from_array(np.array([-1], np.int64), f"{p}/last")]
    q = f"{p}/q"
    if block != h:
        consts += [numpy_helper.from_array(np.array([0], np.int64), f"{p}/start"),
                   numpy_helper.from_array(np.array([h], np.int64), f"{p}/end")]
        nodes.append(onnx.helper.make_node("Slice", [q, f"{p}/start", f"{p}/end", f"{p}/last"], [f"{p}/qh"], name=f"{p}/Slice"))
        q = f"{p}/qh"
    nodes += [
        onnx.helper.make_node("Cast", [q], [f"{p}/qf"], name=f"{p}/Cast", to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("Sub", [f"{p}/qf", f"{p}/zero_point"], [f"{p}/centered"], name=f"{p}/Sub"),
        onnx.helper.make_node("Gather", [sn, node.input[1]], [f"{p}/scale"], name=f"{p}/GatherScales", axis=0),
        onnx.helper.make_node("Mul", [f"{p}/centered", f"{p}/scale"], [out], name=f"{p}/Mul"),
    ]
    return [nodes, consts]


def _replace(graph: Any, old: Any, new: Any, consts: list[Any] | None = None) -> None:
    index = list(graph.node).index(old)
    graph.node.remove(old)
    for i, n in enumerate(new if isinstance(new, list) else [new]):
        graph.node.insert(index + i, n)
    if consts:
        graph.initializer.extend(consts)
