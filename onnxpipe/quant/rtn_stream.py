"""int4 round-to-nearest, one weight at a time: the input's weights read lazily, never all held at once.

The in-memory path (int4.py's ``_nbits``) loads the whole model as one protobuf and hands it to onnxruntime's
MatMulNBitsQuantizer, which copies each weight out and back: on a 0.6B fp16 model the quantize stage peaked at
5.7x the fp16 weight bytes. Here the graph is read with onnx_ir, whose tensors in an external data file are
memory-mapped on first use; each linear layer's weight is read, quantized by the same onnxruntime kernel the
quantizer calls (``quantize_matmul_4bits``: the same packed blocks, scales and zero points, bit for bit), its
mapping released, and the MatMul replaced by the MatMulNBits the quantizer would write (same names, same
attributes). The output is then saved by onnx_ir, which writes the external data one tensor at a time (the weights
left float are copied from the input's mapping). What is held: the graph, the quantized weights made so far
(about a quarter of the fp16 weights), and one weight being quantized.

Used for ``--algo rtn`` with a block size and integer zero points (symmetric or not), which is the form GPU builds
use (fp16 input); per-channel, float zero points, GPTQ and HQQ go through int4.py on the in-memory model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from onnxpipe.quant.config import PER_CHANNEL, Int4Config
from onnxpipe.quant.graph import WeightPlan, _gemm_to_matmul, _plan, _untie_lm_head, replace_node

MSFT = "com.microsoft"


def streams(cfg: Int4Config) -> bool:
    """Whether ``cfg`` is quantized here: RTN with a block size and integer zero points."""
    return cfg.algo == "rtn" and cfg.block_size not in (None, PER_CHANNEL) and not cfg.float_zero_points


def read_plan(model: ir.Model, logits: str) -> WeightPlan:
    """graph.expose_weights on an onnx_ir model read from disk (its weights still unread): Gemm -> MatMul and the
    tied LM head untied, in place; the linear layers, head and lookups found."""
    rewrites = {"gemm_to_matmul": _gemm_to_matmul(model.graph), "lm_head_untied": _untie_lm_head(model.graph, logits)}
    return _plan(model.graph, logits, rewrites)


def quantize_rtn_streamed(model: ir.Model, plan: WeightPlan, cfg: Int4Config,
                          progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Every MatMul of ``plan.linears`` (less the head unless --lm-head int4) replaced by a MatMulNBits, in graph
    order, each weight read, quantized and released in turn; in place. Returns int4.quantize_int4's details."""
    assert cfg.block_size is not None
    head = plan.lm_head
    body = {n for n in plan.linears if n != head or cfg.lm_head == "int4"}
    nodes = [n for n in model.graph if n.name in body and n.op_type == "MatMul"]
    done: dict[str, tuple[ir.Value, ...]] = {}  # a weight shared by two MatMuls is quantized once
    start = time.perf_counter()
    for i, node in enumerate(nodes):
        weight = node.inputs[1]
        assert weight is not None and weight.const_value is not None and weight.name is not None
        if weight.name not in done:
            done[weight.name] = _quantized_initializers(model.graph, weight, cfg.block_size, cfg.symmetric)
            _release(weight.const_value)
        replace_node(model.graph, node, [_matmulnbits(node, weight, done[weight.name], cfg)])
        if not weight.uses() and not weight.is_graph_output():
            model.graph.initializers.pop(weight.name)
        if progress:
            progress("int4 rtn: quantizing weights", i + 1, len(nodes))
    if nodes:
        model.opset_imports.setdefault(MSFT, 1)
    return {"weights": "int4", "algo": "rtn", "block_size": cfg.block_size, "accuracy_level": cfg.accuracy_level,
            "lm_head": ("int4" if head in body else "fp32") if head else None,
            "zero_points": "none (symmetric grid)" if cfg.symmetric else "per block",
            "matmulnbits": len(nodes), "quantized_nodes": len(nodes),
            "streamed": f"one weight at a time ({len(done)} weights, {time.perf_counter() - start:.1f} s)"}


def quantize_block(weight: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed [N, blocks, block/2] uint8, scales [N, blocks] in the weight's type, zero points [N, ceil(blocks/2)]
    uint8) of ``weight`` [K, N]: onnxruntime's DefaultWeightOnlyQuantizer.qbits_block_quant, its kernel and layout."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rows, cols = weight.shape
    k_blocks = -(-rows // block_size)
    if k_blocks * block_size > rows:
        weight = np.pad(weight, ((0, k_blocks * block_size - rows), (0, 0)), "constant")
    packed = np.zeros((cols, k_blocks, block_size // 2), np.uint8)
    zero_points = np.zeros((cols, (k_blocks + 1) // 2), np.uint8)
    scales = np.zeros((cols, k_blocks), weight.dtype)
    quantize_matmul_4bits(packed, weight, scales, zero_points, block_size, cols, rows, symmetric)
    return packed, scales, zero_points


def _quantized_initializers(graph: ir.Graph, weight: ir.Value, block_size: int,
                            symmetric: bool) -> tuple[ir.Value, ...]:
    """The MatMulNBits inputs of ``weight`` as new initializers named as onnxruntime's quantizer names them."""
    from onnxpipe.quant.graph import add_initializer

    assert weight.const_value is not None
    w = weight.const_value.numpy()
    bfloat16 = w.dtype == "bfloat16"
    packed, scales, zero_points = quantize_block(w.astype(np.float32) if bfloat16 else w, block_size, symmetric)
    if bfloat16:
        import ml_dtypes

        scales = scales.astype(ml_dtypes.bfloat16)
    del w
    name = weight.name
    values = [add_initializer(graph, f"{name}_Q4", packed), add_initializer(graph, f"{name}_scales", scales)]
    if not symmetric:
        values.append(add_initializer(graph, f"{name}_zero_points", zero_points))
    return tuple(values)


def _matmulnbits(node: ir.Node, weight: ir.Value, inputs: tuple[ir.Value, ...], cfg: Int4Config) -> ir.Node:
    assert weight.const_value is not None
    k, n = weight.const_value.shape.numpy()
    attrs: dict[str, Any] = {"K": int(k), "N": int(n), "bits": 4, "block_size": int(cfg.block_size or 0)}
    if cfg.accuracy_level:
        attrs["accuracy_level"] = cfg.accuracy_level
    return ir.node("MatMulNBits", [node.inputs[0], *inputs], attrs, domain=MSFT,
                   name=f"{node.name}_Q4" if node.name else None)


def _release(tensor: Any) -> None:
    """Unmap an external tensor's file (its pages leave the process); in-memory tensors are left as they are."""
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def release_all(model: ir.Model) -> None:
    """Unmap every external tensor of ``model`` (after it was written)."""
    for value in model.graph.initializers.values():
        _release(value.const_value)


def save_streamed(model: ir.Model, out_path: Path, external: bool,
                  progress: Callable[[str, int, int], None] | None = None) -> None:
    """``model`` as ``out_path``: with ``external``, every weight in ``out_path.name + ".data"`` written one tensor
    at a time (the weights left float copied from the input's mapping; ``progress`` counts them); else as
    artifact.save_onnx decides (past artifact.EXTERNAL_DATA_THRESHOLD: external data)."""
    from onnxpipe import artifact

    if external:
        written = [0]

        def count(tensor: Any, info: Any) -> None:
            written[0] += 1
            if progress:
                progress("writing the weights", written[0], info.total)

        ir.save(model, str(out_path), external_data=out_path.name + ".data", callback=count)
    else:
        artifact.save_onnx(model, out_path.parent, out_path.name, threshold=artifact.EXTERNAL_DATA_THRESHOLD)
    release_all(model)


class Spill:
    """New weights written to one file beside the output as they are made, each then an ir.ExternalTensor that is
    read back (memory-mapped) only when the output is saved: a mode whose output weights would not fit the memory
    bound (int8 of an fp32 model: half the fp16 bytes) holds none of them. ``remove`` after the output is saved."""

    ALIGN = 64

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "xb")  # noqa: SIM115 (closed by close())
        self._offset = 0
        self.bytes = 0

    def __call__(self, array: np.ndarray, name: str) -> ir.ExternalTensor:
        data = np.ascontiguousarray(array)
        pad = -self._offset % self.ALIGN
        self._file.write(b"\0" * pad)
        self._offset += pad
        self._file.write(data.tobytes())
        tensor = ir.ExternalTensor(self.path.name, self._offset, data.nbytes, ir.DataType.from_numpy(data.dtype),
                                   shape=ir.Shape(data.shape), name=name, base_dir=str(self.path.parent))
        self._offset += data.nbytes
        self.bytes += data.nbytes
        return tensor

    def close(self) -> None:
        self._file.close()

    def remove(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


__all__ = ["Spill", "quantize_block", "quantize_rtn_streamed", "read_plan", "save_streamed", "streams"]
