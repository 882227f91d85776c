"""The small graphs a DecoderSession runs beside the decoder, on the same device: the read position's logits and
argmax out of a step's logits, and the KV cache's rows reordered (beam search, finished rows dropped).

Each is written with onnxscript's graph builder (``build_graph``: the ops traced from a Python function) and
returned as a checked ``onnx.ModelProto`` (opset 18, IR version 9).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import onnx_ir as ir

OPSET = 18
IR_VERSION = 9
FLOAT, INT64 = ir.DataType.FLOAT, ir.DataType.INT64


def head_graph(elem_type: int) -> Any:
    """logits [B, S, V], last_index [B] -> last_logits [B, V] float32 and argmax [B] int64, on the device."""

    def trace(op: Any, logits: ir.Value, last_index: ir.Value) -> tuple[ir.Value, ir.Value]:
        # each row's index repeated over the vocabulary: [B, 1, V], what GatherElements takes along the sequence
        index = op.Expand(op.Unsqueeze(last_index, op.Constant(value_ints=[1, 2])),
                          op.Concat(op.Shape(logits, start=0, end=1), op.Constant(value_ints=[1]),
                                    op.Shape(logits, start=2, end=3), axis=0))
        picked = op.Squeeze(op.GatherElements(logits, index, axis=1), op.Constant(value_ints=[1]))
        last_logits = op.Cast(picked, to=FLOAT)
        return last_logits, op.ArgMax(last_logits, axis=1, keepdims=0)

    return _model(trace, "onnxpipe_head",
                  [_value("logits", elem_type, ["B", "S", "V"]), _value("last_index", INT64, ["B"])],
                  [_value("last_logits", FLOAT, ["B", "V"]), _value("argmax", INT64, ["B"])])


def step_head_graph(elem_type: int, batch: int, vocab: int) -> Any:
    """A decode step's logits [B, 1, V] -> last_logits [B, V] float32 and argmax [B] int64; fixed shapes, no shape
    arithmetic (argmax on the float16 logits equals argmax on their float32 cast: the cast is monotonic)."""

    def trace(op: Any, logits: ir.Value) -> tuple[ir.Value, ir.Value]:
        flat = op.Squeeze(logits, op.Constant(value_ints=[1]))
        return op.Cast(flat, to=FLOAT), op.ArgMax(flat, axis=1, keepdims=0)

    return _model(trace, "onnxpipe_step_head", [_value("logits", elem_type, [batch, 1, vocab])],
                  [_value("last_logits", FLOAT, [batch, vocab]), _value("argmax", INT64, [batch])])


def gather_graph(n: int, elem_type: int) -> Any:
    """rows [R], x0..x{n-1} [B, H, S, D] -> y_i = x_i[rows]: reorders a KV cache on the device."""

    def trace(op: Any, rows: ir.Value, *xs: ir.Value) -> list[ir.Value]:
        return [op.Gather(x, rows, axis=0) for x in xs]

    return _model(trace, "onnxpipe_kv_gather",
                  [_value("rows", INT64, ["R"])] + [_value(f"x{i}", elem_type, ["B", "H", "S", "D"]) for i in range(n)],
                  [_value(f"y{i}", elem_type, ["R", "H", "S", "D"]) for i in range(n)])


def _value(name: str, elem_type: int, shape: Sequence[int | str]) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType(elem_type)), shape=ir.Shape(list(shape)))


def _model(trace: Callable[..., Any], name: str, inputs: list[ir.Value], outputs: list[ir.Value]) -> Any:
    import onnx
    from onnxscript import build_graph

    graph = build_graph(trace, inputs, outputs, opset_imports={"": OPSET}, name=name)
    model = ir.to_proto(ir.Model(graph, ir_version=IR_VERSION))
    onnx.checker.check_model(model)
    return model


def patch_graph(with_positions: bool) -> Any:
    """A decode slot's next inputs with some rows set anew: ids [B, 1], mask [B, C] (and positions [B, 1]), which
    rows (sel [B, 1] bool), and their new token, mask sum and position ([B, 1] int64 each) -> the inputs, those rows
    replaced (the mask's row: new_counts ones from the left), the others as they were. Element by element, so its
    outputs may be bound to the buffers its inputs are read from (as the step tail's are)."""

    def trace(op: Any, ids: ir.Value, mask: ir.Value, sel: ir.Value, new_ids: ir.Value, new_counts: ir.Value,
              *positions: ir.Value) -> list[ir.Value]:
        width = op.Gather(op.Shape(mask), op.Constant(value_int=1))
        columns = op.Unsqueeze(op.Range(op.Constant(value_int=0), width, op.Constant(value_int=1)),
                               op.Constant(value_ints=[0]))
        row_mask = op.Cast(op.Less(columns, new_counts), to=INT64)
        out = [op.Where(sel, new_ids, ids), op.Where(sel, row_mask, mask)]
        if positions:
            out.append(op.Where(sel, positions[1], positions[0]))
        return out

    inputs = [_value("ids", INT64, ["B", 1]), _value("mask", INT64, ["B", "C"]),
              _value("sel", ir.DataType.BOOL, ["B", 1]), _value("new_ids", INT64, ["B", 1]),
              _value("new_counts", INT64, ["B", 1])]
    outputs = [_value("ids_out", INT64, ["B", 1]), _value("mask_out", INT64, ["B", "C"])]
    if with_positions:
        inputs += [_value("positions", INT64, ["B", 1]), _value("new_positions", INT64, ["B", 1])]
        outputs.append(_value("positions_out", INT64, ["B", 1]))
    return _model(trace, "onnxpipe_slot_patch", inputs, outputs)
