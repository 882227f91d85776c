"""The token embedding and the LM head as one 8-bit table, shared when the model ties them.

Small decoders spend a large share of their weights on the vocabulary: the reference models' 4096 x 128 table is
40% of their parameters. Leaving it in float would cap what any mode can save; quantizing lookup and head
separately would store it twice. So the table is quantized once, per vocabulary row (symmetric int8, stored as
uint8 with the MatMulNBits default zero point 128) in MatMulNBits' layout [V, blocks, block]:

- hidden <= 256: one block per row (block = the next power of two >= hidden, at least 16), so one scale per token;
- hidden > 256: blocks of 256 (``MAX_BLOCK``), ceil(hidden / 256) per row, one scale per block. onnxruntime
  before 1.32 refuses MatMulNBits blocks over 256 at load ("Only block sizes 16, 32, 64, 128, and 256 are
  supported"), and the gpu extra allows onnxruntime-gpu 1.31. A block's scale comes from that block's own
  largest magnitude, so the error is at most the one-scale-per-row error.
The row is padded with zero point entries (dequantizing to 0) up to a whole number of blocks. Then:

- the LM head becomes MatMulNBits(bits=8, block_size=block) over that table (N = V, K = hidden);
- the lookup becomes Gather(table, ids) -> Cast -> (q - 128) * Gather(scales, ids) -> (Slice): one row per token
  dequantized, nothing else (with one block: Squeeze the block axis first; with several: each block times its
  scale, then Reshape the blocks back into one row).
A tied model then holds 1 byte per table entry where fp32 held 4 (and the untied graph 8), plus 4 bytes per block
of scale. An untied head gets its own table, the same way. Per-row (per-block) scales keep the error at the level
of per-channel int8 (ORT's own Gather quantization uses a single scale for the whole table).
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
    block_size: int = 0  # entries per scale along the hidden axis
    blocks_per_row: int = 0  # 1 up to hidden 256; ceil(hidden / 256) above it (one scale each)
    max_abs_err: float = 0.0  # of the dequantized table vs the float one, over all entries

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


MAX_BLOCK = 256  # the largest MatMulNBits block_size onnxruntime < 1.32 accepts


def row_block(hidden: int) -> int:
    """The block along the hidden axis: the next power of two >= hidden (at least 16), at most ``MAX_BLOCK``."""
    return min(MAX_BLOCK, max(16, 1 << (hidden - 1).bit_length()))


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """[V, H] float -> (uint8 [V, blocks, block] with zero point 128, float32 scales [V, blocks], block)."""
    v, h = table.shape
    block = row_block(h)
    blocks = -(-h // block)
    padded = np.zeros((v, blocks * block), np.float32)
    padded[:, :h] = table
    padded = padded.reshape(v, blocks, block)
    scale = np.abs(padded).max(2) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = (np.clip(np.round(padded / scale[:, :, None]), -127, 127) + 128).astype(np.uint8)
    return q, scale, block


def dequantize_rows(q: np.ndarray, scale: np.ndarray, h: int) -> np.ndarray:
    """(uint8 [V, blocks, block], scales [V, blocks]) -> float32 [V, h]."""
    rows = (q.astype(np.float32) - 128.0) * scale.reshape(q.shape[0], q.shape[1], 1)
    return rows.reshape(q.shape[0], -1)[:, :h]


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
            report.block_size, report.blocks_per_row = block, q.shape[1]
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
        _replace(graph, g, *_lookup_nodes(g, qn, sn, h, block, -(-h // block)))
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


def _lookup_nodes(node: Any, qn: str, sn: str, h: int, block: int, blocks: int) -> list[Any]:
    """The nodes (and constants) that replace Gather(table, ids) by a lookup of dequantized int8 rows."""
    if blocks == 1:
        return _lookup_one_block(node, qn, sn, h, block)
    return _lookup_blocks(node, qn, sn, h, block, blocks)


def _lookup_one_block(node: Any, qn: str, sn: str, h: int, block: int) -> list[Any]:
    """Rows of one block ([V, 1, block]): Squeeze the block axis, drop the padding, dequantize."""
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


def _lookup_blocks(node: Any, qn: str, sn: str, h: int, block: int, blocks: int) -> list[Any]:
    """Rows of several blocks ([V, blocks, block], scales [V, blocks]): each block times its own scale, the blocks
    merged back into one row (Reshape to ids' shape + [-1]), then the padding dropped."""
    import onnx
    from onnx import numpy_helper

    make = onnx.helper.make_node
    p = f"{node.name}/int8rows"
    ids, out = node.input[1], node.output[0]
    padded = blocks * block != h
    consts = [numpy_helper.from_array(np.array(128.0, np.float32), f"{p}/zero_point"),
              numpy_helper.from_array(np.array([-1], np.int64), f"{p}/last")]
    nodes = [
        make("Gather", [qn, ids], [f"{p}/q3"], name=f"{p}/GatherRows", axis=0),  # [..., blocks, block]
        make("Cast", [f"{p}/q3"], [f"{p}/qf"], name=f"{p}/Cast", to=onnx.TensorProto.FLOAT),
        make("Sub", [f"{p}/qf", f"{p}/zero_point"], [f"{p}/centered"], name=f"{p}/Sub"),
        make("Gather", [sn, ids], [f"{p}/block_scales"], name=f"{p}/GatherScales", axis=0),  # [..., blocks]
        make("Unsqueeze", [f"{p}/block_scales", f"{p}/last"], [f"{p}/scale"], name=f"{p}/Unsqueeze"),
        make("Mul", [f"{p}/centered", f"{p}/scale"], [f"{p}/blocks"], name=f"{p}/Mul"),
        make("Shape", [ids], [f"{p}/ids_shape"], name=f"{p}/Shape"),
        make("Concat", [f"{p}/ids_shape", f"{p}/last"], [f"{p}/row_shape"], name=f"{p}/Concat", axis=0),
        make("Reshape", [f"{p}/blocks", f"{p}/row_shape"], [f"{p}/padded" if padded else out], name=f"{p}/Reshape"),
    ]
    if padded:
        consts += [numpy_helper.from_array(np.array([0], np.int64), f"{p}/start"),
                   numpy_helper.from_array(np.array([h], np.int64), f"{p}/end")]
        nodes.append(make("Slice", [f"{p}/padded", f"{p}/start", f"{p}/end", f"{p}/last"], [out], name=f"{p}/Slice"))
    return [nodes, consts]


def _replace(graph: Any, old: Any, new: Any, consts: list[Any] | None = None) -> None:
    index = list(graph.node).index(old)
    graph.node.remove(old)
    for i, n in enumerate(new if isinstance(new, list) else [new]):
        graph.node.insert(index + i, n)
    if consts:
        graph.initializer.extend(consts)
