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

A table is read, quantized and written into its int8 copy a block of rows (``BLOCK_BYTES`` of float32) at a time
(TableRows: a table in the input's data file is read with pread, not mapped), so the float table is never held
whole: the peak is a block plus the int8 copy (a quarter of the fp32 table). Per-row scales make the blocks
independent: the values are those of quantize_rows on the whole table, bit for bit. A tied head whose E^T graph.py
left unmade (graph.Transposed, on a model read lazily) reads E's rows and shares E's table without a comparison.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant.graph import (
    Transposed,
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
BLOCK_BYTES = 8 << 20  # float32 bytes of the rows read and quantized at a time


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


class TableRows:
    """A [V, H] vocabulary table held by an initializer, read a block of rows at a time (float32). ``transposed``:
    the initializer is [H, V] (a head's weight). A table in a data file is read with pread, a block's bytes and no
    more (a memory map of the file would keep every page read, and a column block of an [H, V] table maps whole
    rows); one in memory is sliced."""

    def __init__(self, value: ir.Value, transposed: bool) -> None:
        tensor = value.const_value
        assert tensor is not None, value.name
        if transposed and isinstance(tensor, ir.LazyTensor) and isinstance(tensor.raw, Transposed):
            tensor, transposed = tensor.raw.source, False  # E^T not made: read E's rows
        self.name = str(value.name)
        self.tensor, self.transposed = tensor, transposed
        self.stored = tuple(int(d) for d in tensor.shape.numpy())
        self.shape = self.stored[::-1] if transposed else self.stored
        if isinstance(tensor, ir.ExternalTensor):
            try:  # onnx_ir's checks: the path inside the model directory (no symlink out of it), the file long enough
                tensor.numpy()
            except ValueError as err:
                raise OnnxpipeError(_unreadable(tensor, self.name, err)) from None
            tensor.release()  # no page of the map was touched
            self._array = None
        else:
            self._array = tensor.numpy()

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._array is None:
            rows = self._read_file(start, stop)
        else:
            rows = self._array[:, start:stop].T if self.transposed else self._array[start:stop]
        return np.array(rows, dtype=np.float32, order="C")

    def _read_file(self, start: int, stop: int) -> np.ndarray:
        tensor = self.tensor
        assert isinstance(tensor, ir.ExternalTensor)
        dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
        base, n, width = tensor.offset or 0, stop - start, self.stored[1]
        # rows start:stop of [V, H]: one read; of [H, V] (columns start:stop): one read per stored row
        reads = [(base + start * width * dtype.itemsize, n * width)] if not self.transposed else \
            [(base + (r * width + start) * dtype.itemsize, n) for r in range(self.stored[0])]
        out = np.empty(sum(count for _, count in reads), dtype)
        view = memoryview(out.view(np.uint8))
        with open(tensor.path, "rb") as f:
            at = 0
            for offset, count in reads:
                got = os.preadv(f.fileno(), [view[at:at + count * dtype.itemsize]], offset)
                if got != count * dtype.itemsize:
                    raise OnnxpipeError(_unreadable(tensor, self.name, EOFError(f"rows {start}-{stop}")))
                at += got
        return out.reshape(n, width) if not self.transposed else out.reshape(self.stored[0], n).T

    def spans(self) -> list[tuple[int, int]]:
        step = max(1, BLOCK_BYTES // (4 * max(1, self.shape[1])))
        return [(start, min(start + step, self.shape[0])) for start in range(0, self.shape[0], step)]

    def same_values(self, other: TableRows) -> bool:
        """np.array_equal of the two tables, a block at a time (stops at the first block that differs)."""
        return self.shape == other.shape and all(np.array_equal(self.read(a, b), other.read(a, b))
                                                 for a, b in self.spans())

    def reads(self, tensor: Any) -> bool:
        """Whether these are ``tensor``'s rows as stored (a tied head's lazily untied E^T reads E's)."""
        return not self.transposed and self.tensor is tensor


def _unreadable(tensor: ir.ExternalTensor, name: str, err: Exception) -> str:
    need = (tensor.offset or 0) + tensor.nbytes
    have = os.path.getsize(tensor.path) if os.path.isfile(tensor.path) else None
    if have is not None and have < need:
        return (f"{tensor.path}: the data file ends before initializer {name}'s bytes ({have} of {need}); the model "
                "directory is incomplete")
    return f"initializer {name} ({tensor.location}): {err}"


def quantize_table(rows: TableRows) -> tuple[np.ndarray, np.ndarray, int, float]:
    """quantize_rows of the whole table, a block of rows at a time: (q, scales, block, max abs error of the
    dequantized table)."""
    v, h = rows.shape
    block = row_block(h)
    blocks = -(-h // block)
    q = np.empty((v, blocks, block), np.uint8)
    scale = np.empty((v, blocks), np.float32)
    errors = [0.0]
    for start, stop in rows.spans():
        values = rows.read(start, stop)
        q[start:stop], scale[start:stop], _ = quantize_rows(values)
        errors.append(np.abs(dequantize_rows(q[start:stop], scale[start:stop], h) - values).max())
        del values
    return q, scale, block, float(np.max(errors))


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

    def table_for(name: str, rows: TableRows) -> tuple[ir.Value, ir.Value, int, int]:
        if name not in shared:
            q, scale, block, err = quantize_table(rows)
            report.max_abs_err = max(report.max_abs_err, err)
            shared[name] = (add_initializer(graph, f"{name}_int8_rows", q),
                            add_initializer(graph, f"{name}_int8_row_scales", scale), block, rows.shape[1])
            report.block_size, report.blocks_per_row = block, q.shape[1]
        return shared[name]

    if head_node is not None:
        weight = _input(head_node, 1)  # [H, V]
        head_rows = TableRows(weight, transposed=True)
        tied_to = next((t for t in map(_input, lookups) if head_rows.reads(t.const_value)
                        or head_rows.same_values(TableRows(t, transposed=False))), None)
        key = str(tied_to.name if tied_to is not None else weight.name)
        q, s, block, h = table_for(key, head_rows if tied_to is None else TableRows(tied_to, transposed=False))
        replace_node(graph, head_node, [_head_node(head_node, q, s, head_rows.shape[0], h, block, accuracy_level)])
        report.lm_head = "int8 per row (shared with the embedding table)" if tied_to is not None else "int8 per row"
    for g in lookups:
        q, s, block, h = table_for(str(_input(g).name), TableRows(_input(g), transposed=False))
        blocks = -(-h // block)
        new = _lookup_one_block(graph, g, q, s, h, block) if blocks == 1 else \
            _lookup_blocks(graph, g, q, s, h, block, blocks)
        replace_node(graph, g, new)
        report.embeddings.append(str(g.name))
    return report


def _input(node: ir.Node, i: int = 0) -> ir.Value:
    value = node.inputs[i]
    assert value is not None and value.const_value is not None, node.name
    return value


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
