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
import onnx_ir as ir

from onnxpipe.quant.graph import (
    add_initializer,
    drop_unused_initializers,
    initializer_map,
    ir_model,
    make_node,
    replace_node,
    write_back,
)


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


def _lookups(graph: ir.Graph, vocab_size: int) -> list[ir.Node]:
    """token_embeddings on the IR: Gather nodes reading a [vocab_size, hidden] initializer."""
    out = []
    for n in graph:
        table = n.inputs[0] if n.op_type == "Gather" and n.inputs else None
        if table is not None and table.is_initializer() and table.const_value is not None:
            dims = tuple(table.const_value.shape.numpy())
            if len(dims) == 2 and dims[0] == vocab_size:
                out.append(n)
    return out


def quantize_vocab_tables(proto: Any, head_name: str | None, vocab_size: int, head: bool, embeddings: bool,
                          accuracy_level: int) -> TableReport:
    """Replace the LM head (if ``head``) and the token lookups (if ``embeddings``) by 8-bit per-row tables; in place."""
    model = ir_model(proto)
    report = rewrite_vocab_tables(model, head_name, vocab_size, head, embeddings, accuracy_level)
    drop_unused_initializers(model.graph)
    write_back(model, proto)
    return report


def rewrite_vocab_tables(model: ir.Model, head_name: str | None, vocab_size: int, head: bool, embeddings: bool,
                         accuracy_level: int) -> TableReport:
    """quantize_vocab_tables on an onnx_ir model, in place (unused initializers left for the caller): the float
    tables are read only here, so a model read lazily (rtn_stream) holds just their int8 copies."""
    graph = model.graph
    report = TableReport()
    if head and "com.microsoft" not in model.opset_imports:
        model.opset_imports["com.microsoft"] = 1
    head_node = next((n for n in graph if n.name == head_name), None) if head else None
    lookups = _lookups(graph, vocab_size) if embeddings else []
    shared: dict[str, tuple[ir.Value, ir.Value, int, int]] = {}  # float table name -> (q, scales, block, hidden)

    def table_for(name: str, values: np.ndarray) -> tuple[ir.Value, ir.Value, int, int]:
        if name not in shared:
            q, scale, block = quantize_rows(values)
            report.max_abs_err = max(report.max_abs_err, float(np.abs(dequantize_rows(q, scale, values.shape[1]) - values).max()))
            shared[name] = (add_initializer(graph, f"{name}_int8_rows", q),
                            add_initializer(graph, f"{name}_int8_row_scales", scale), block, values.shape[1])
            report.block_size, report.blocks_per_row = block, q.shape[1]
        return shared[name]

    def array(value: ir.Value | None) -> np.ndarray:
        assert value is not None and value.const_value is not None
        return value.const_value.numpy()

    if head_node is not None:
        weight = array(head_node.inputs[1])  # [H, V]
        tied_to = next((g.inputs[0] for g in lookups if np.array_equal(array(g.inputs[0]), weight.T)), None)
        key = str(tied_to.name if tied_to is not None else head_node.inputs[1].name)  # type: ignore[union-attr]
        q, s, block, h = table_for(key, weight.T if tied_to is None else array(tied_to))
        replace_node(graph, head_node, [_head_node(head_node, q, s, weight.shape[1], h, block, accuracy_level)])
        report.lm_head = "int8 per row (shared with the embedding table)" if tied_to is not None else "int8 per row"
    for g in lookups:
        q, s, block, h = table_for(str(g.inputs[0].name), array(g.inputs[0]))  # type: ignore[union-attr]
        blocks = -(-h // block)
        new = _lookup_one_block(graph, g, q, s, h, block) if blocks == 1 else \
            _lookup_blocks(graph, g, q, s, h, block, blocks)
        replace_node(graph, g, new)
        report.embeddings.append(str(g.name))
    return report


def _head_node(node: ir.Node, q: ir.Value, s: ir.Value, v: int, h: int, block: int, accuracy_level: int) -> ir.Node:
    attrs = {"K": h, "N": v, "bits": 8, "block_size": block}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    return make_node("MatMulNBits", [node.inputs[0], q, s], None, f"{node.name}_Q8rows", domain="com.microsoft",
                     **attrs)


def _lookup_one_block(graph: ir.Graph, node: ir.Node, q: ir.Value, s: ir.Value, h: int, block: int) -> list[ir.Node]:
    """Rows of one block ([V, 1, block]): Squeeze the block axis, drop the padding, dequantize."""
    p = f"{node.name}/int8rows"
    ids = node.inputs[1]
    axis = add_initializer(graph, f"{p}/axis", np.array([-2], np.int64))
    zero = add_initializer(graph, f"{p}/zero_point", np.array(128.0, np.float32))
    nodes = [make_node("Gather", [q, ids], f"{p}/q3", f"{p}/GatherRows", axis=0)]
    nodes.append(make_node("Squeeze", [nodes[-1].outputs[0], axis], f"{p}/q", f"{p}/Squeeze"))
    if block != h:
        bounds = [add_initializer(graph, f"{p}/{k}", np.array([v], np.int64))
                  for k, v in (("start", 0), ("end", h), ("last", -1))]
        nodes.append(make_node("Slice", [nodes[-1].outputs[0], *bounds], f"{p}/qh", f"{p}/Slice"))
    nodes.append(make_node("Cast", [nodes[-1].outputs[0]], f"{p}/qf", f"{p}/Cast", to=ir.DataType.FLOAT.value))
    nodes.append(make_node("Sub", [nodes[-1].outputs[0], zero], f"{p}/centered", f"{p}/Sub"))
    scale = make_node("Gather", [s, ids], f"{p}/scale", f"{p}/GatherScales", axis=0)
    return nodes + [scale, make_node("Mul", [nodes[-1].outputs[0], scale.outputs[0]], None, f"{p}/Mul")]


def _lookup_blocks(graph: ir.Graph, node: ir.Node, q: ir.Value, s: ir.Value, h: int, block: int,
                   blocks: int) -> list[ir.Node]:
    """Rows of several blocks ([V, blocks, block], scales [V, blocks]): each block times its own scale, the blocks
    merged back into one row (Reshape to ids' shape + [-1]), then the padding dropped."""
    p = f"{node.name}/int8rows"
    ids = node.inputs[1]
    padded = blocks * block != h
    zero = add_initializer(graph, f"{p}/zero_point", np.array(128.0, np.float32))
    last = add_initializer(graph, f"{p}/last", np.array([-1], np.int64))
    rows = make_node("Gather", [q, ids], f"{p}/q3", f"{p}/GatherRows", axis=0)  # [..., blocks, block]
    cast = make_node("Cast", [rows.outputs[0]], f"{p}/qf", f"{p}/Cast", to=ir.DataType.FLOAT.value)
    sub = make_node("Sub", [cast.outputs[0], zero], f"{p}/centered", f"{p}/Sub")
    scales = make_node("Gather", [s, ids], f"{p}/block_scales", f"{p}/GatherScales", axis=0)  # [..., blocks]
    unsq = make_node("Unsqueeze", [scales.outputs[0], last], f"{p}/scale", f"{p}/Unsqueeze")
    mul = make_node("Mul", [sub.outputs[0], unsq.outputs[0]], f"{p}/blocks", f"{p}/Mul")
    shape = make_node("Shape", [ids], f"{p}/ids_shape", f"{p}/Shape")
    concat = make_node("Concat", [shape.outputs[0], last], f"{p}/row_shape", f"{p}/Concat", axis=0)
    reshape = make_node("Reshape", [mul.outputs[0], concat.outputs[0]], f"{p}/padded" if padded else None,
                        f"{p}/Reshape")
    nodes = [rows, cast, sub, scales, unsq, mul, shape, concat, reshape]
    if padded:
        bounds = [add_initializer(graph, f"{p}/{k}", np.array([v], np.int64)) for k, v in (("start", 0), ("end", h))]
        nodes.append(make_node("Slice", [reshape.outputs[0], *bounds, last], None, f"{p}/Slice"))
    return nodes
