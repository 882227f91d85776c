"""An MLP's gate and up projections as one matrix product and one SiluMul, in a ModelProto, in memory.

The pattern (what export + optimize [+ quantize] give a SwiGLU MLP: Llama, Mistral, Qwen, Phi-3, ...)::

    gate = MatMulNBits(x, Bg, Sg[, Zg])      up = MatMulNBits(x, Bu, Su[, Zu])      (int4)
    gate = MatMul(x, Wg)                     up = MatMul(x, Wu)                     (float: W [K, N])
    s = Sigmoid(gate)   a = Mul(gate, s)     y = Mul(a, up)

becomes ``gu = onnxpipe.MatMulInt4(x, [Bg; Bu], [Sg; Su][, [Zg; Zu]])`` (N = 2 N_gate), or for float weights
``gu = MatMul(x, [Wg | Wu])`` (onnxruntime's own, the weights side by side along N), and ``y = onnxpipe.SiluMul(gu)``:
two kernels where there were five, and one weight read of 2N rows where there were two of N (the small-M kernel
fills the GPU better the more rows it has). MatMulNBits' weights are N-major ([N, blocks, block/2], scales and zero
points per row), so the concatenation along N is the two weights one after the other, and each output row is
computed exactly as before; SiluMul computes silu(g) * u in float and rounds once, where the three ops rounded to
float16 after each (the difference is a rounding, said in runtime.md).

Taken only where every value between the five nodes is used by them alone (none is a graph output or read
elsewhere), both projections have the same input, K, N, block size and zero-point presence, and their weights are
initializers: anything else is left as it was. The weights are read from the model directory (external data, each
file checked to lie inside it) and the merged ones held inline in the proto; the old ones are dropped from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onnxpipe.confine import check_inside
from onnxpipe.errors import OnnxpipeError

DOMAIN = "onnxpipe"
# the merged weights are held inline in the proto onnxruntime is given; past this many bytes the remaining pairs stay
# apart (a proto near protobuf's 2 GiB cannot be serialized, and sessions.py would move it through a temporary folder
# of its own, away from the model directory its other weights are read from)
INLINE_MAX_BYTES = 3 << 29  # 1.5 GiB: a 1B Llama's float16 pairs (1.07 GB) all fit, under sessions.PROTO_INLINE_BYTES


@dataclass
class Pair:
    gate: Any
    up: Any
    sigmoid: Any
    silu: Any
    product: Any


def find_pairs(graph: Any, takes: Callable[[Any], bool]) -> list[Pair]:
    """The gate/up patterns of ``graph`` whose two projections (MatMulNBits, or MatMuls of a weight initializer)
    ``takes`` accepts (the kernels would compute them)."""
    producer = {o: n for n in graph.node for o in n.output if o}
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            if name:
                readers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}

    def only(value: str, op: str) -> Any:
        """The one node reading ``value``, where it is an ``op`` and the value is no graph output; else None."""
        r = readers.get(value, [])
        if value in outputs or len(r) != 1 or r[0].op_type != op or r[0].domain not in ("", "ai.onnx"):
            return None
        return r[0]

    pairs: list[Pair] = []
    used: set[int] = set()
    for sig in graph.node:
        if sig.op_type != "Sigmoid" or sig.domain not in ("", "ai.onnx") or len(sig.input) != 1:
            continue
        gate = producer.get(sig.input[0])
        if gate is None or not _is_projection(gate, inits) or id(gate) in used:
            continue
        g = gate.output[0]
        r = readers.get(g, [])
        if g in outputs or len(r) != 2 or sig not in r:
            continue
        silu = next(n for n in r if n is not sig)
        if silu.op_type != "Mul" or silu.domain not in ("", "ai.onnx") or sorted(silu.input) != sorted([g, sig.output[0]]):
            continue
        if only(sig.output[0], "Mul") is not silu:
            continue
        product = only(silu.output[0], "Mul")
        if product is None or len(product.input) != 2:
            continue
        other = product.input[1] if product.input[0] == silu.output[0] else product.input[0]
        up = producer.get(other)
        if up is None or up is gate or not _is_projection(up, inits) or id(up) in used or only(other, "Mul") is not product:
            continue
        if not _same_shape(gate, up, inits) or gate.input[0] != up.input[0]:
            continue
        if not all(name in inits for n in (gate, up) for name in n.input[1:] if name):
            continue
        if not (takes(gate) and takes(up)):
            continue
        used.update((id(gate), id(up)))
        pairs.append(Pair(gate, up, sig, silu, product))
    return pairs


def pair_bytes(graph: Any, pair: Pair) -> int:
    """The bytes a pair's merged weights take: both projections' weight inputs, from their recorded sizes."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    inits = {t.name: t for t in graph.initializer}
    total = 0
    for node in (pair.gate, pair.up):
        for name in node.input[1:]:
            if not name:
                continue
            t = inits[name]
            size = int(np.prod([int(d) for d in t.dims], dtype=np.int64))
            width = 2 if t.data_type == onnx.TensorProto.BFLOAT16 else np.dtype(tensor_dtype_to_np_dtype(t.data_type)).itemsize
            total += size * width
    return total


def within_budget(graph: Any, pairs: list[Pair], limit: int | None = None) -> tuple[list[Pair], int]:
    """The pairs, in graph order, whose merged weights fit ``limit`` bytes together (default INLINE_MAX_BYTES), and
    how many were left out."""
    limit = INLINE_MAX_BYTES if limit is None else limit
    kept, used = [], 0
    for pair in pairs:
        size = pair_bytes(graph, pair)
        if used + size > limit:
            continue
        kept.append(pair)
        used += size
    return kept, len(pairs) - len(kept)


def merge_pairs(model: Any, pairs: list[Pair], folder: Path | None, op: str, nbits: frozenset[int] | set[int] = frozenset()
                ) -> None:
    """Replace each pair's five nodes by ``op`` (MatMulInt4; MatMul for float weights) of the concatenated weights
    and a SiluMul, in place; a pair whose id is in ``nbits`` becomes a com.microsoft MatMulNBits of 2N rows instead
    (onnxruntime's kernel). ``folder``: where the external weights lie (the model directory)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dropped: set[str] = set()
    for i, p in enumerate(pairs):
        base = p.gate.name or f"gate_up_{i}"
        names = []
        for slot in range(1, 4):
            gname = p.gate.input[slot] if len(p.gate.input) > slot else ""
            uname = p.up.input[slot] if len(p.up.input) > slot else ""
            if not gname and not uname:
                break
            a, b = _array(inits[gname], folder), _array(inits[uname], folder)
            # MatMulNBits: N-major, flat or not (gate's rows, then up's); MatMul: [K, N], side by side along N
            axis = 0 if _is_nbits(p.gate) else 1
            if a.shape[:axis] + a.shape[axis + 1:] != b.shape[:axis] + b.shape[axis + 1:] or a.dtype != b.dtype:
                raise OnnxpipeError(f"{p.gate.name} / {p.up.name}: input {slot} has shapes {a.shape} and {b.shape}")
            merged = np.concatenate([a, b], axis=axis)
            name = f"{base}/gate_up_{slot}"
            graph.initializer.append(numpy_helper.from_array(merged, name))
            names.append(name)
            dropped.update((gname, uname))
        gu = f"{base}/gate_up"
        if _is_nbits(p.gate):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in p.gate.attribute}
            attrs["N"] = 2 * _attr(p.gate, "N")
            keep = id(p) in nbits
            matmul = onnx.helper.make_node("MatMulNBits" if keep else op, [p.gate.input[0], *names], [gu],
                                           name=f"{base}/gate_up", domain="com.microsoft" if keep else DOMAIN, **attrs)
        else:
            matmul = onnx.helper.make_node("MatMul", [p.gate.input[0], *names], [gu], name=f"{base}/gate_up")
        silu_mul = onnx.helper.make_node("SiluMul", [gu], [p.product.output[0]], name=f"{base}/silu_mul",
                                         domain=DOMAIN)
        at = list(graph.node).index(p.product)
        graph.node.insert(at, silu_mul)
        graph.node.insert(at, matmul)
        for node in (p.gate, p.up, p.sigmoid, p.silu, p.product):
            graph.node.remove(node)
        gone = {p.gate.output[0], p.up.output[0], p.sigmoid.output[0], p.silu.output[0]}
        for vi in [v for v in graph.value_info if v.name in gone]:
            graph.value_info.remove(vi)
    still = {name for n in graph.node for name in n.input}
    for t in [t for t in graph.initializer if t.name in dropped and t.name not in still]:
        graph.initializer.remove(t)


def _is_nbits(node: Any) -> bool:
    return bool(node.op_type == "MatMulNBits" and node.domain == "com.microsoft")


def _is_projection(node: Any, inits: dict[str, Any]) -> bool:
    """A MatMulNBits, or a MatMul of an activation by a 2-D weight initializer."""
    if _is_nbits(node):
        return True
    return bool(node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2
                and node.input[1] in inits and len(inits[node.input[1]].dims) == 2)


def _attr(node: Any, name: str) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), -1)


def _same_shape(a: Any, b: Any, inits: dict[str, Any]) -> bool:
    if _is_nbits(a) != _is_nbits(b):
        return False
    if not _is_nbits(a):
        wa, wb = inits[a.input[1]], inits[b.input[1]]
        return bool(list(wa.dims) == list(wb.dims) and wa.data_type == wb.data_type)
    if any(_attr(a, k) != _attr(b, k) for k in ("K", "N", "bits", "block_size")):
        return False
    za = len(a.input) > 3 and bool(a.input[3])
    zb = len(b.input) > 3 and bool(b.input[3])
    return za == zb


def _array(tensor: Any, folder: Path | None) -> np.ndarray:
    """An initializer's values: inline, or read from its external file inside ``folder``."""
    import onnx
    from onnx import numpy_helper
    from onnx.helper import tensor_dtype_to_np_dtype

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    if folder is None or not info.get("location"):
        raise OnnxpipeError(f"initializer {tensor.name!r}: its external data cannot be read here (no folder or location)")
    path = folder / info["location"]
    check_inside(path, folder, "external data")
    dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    length = int(info.get("length", count * dtype.itemsize))
    if length != count * dtype.itemsize:
        raise OnnxpipeError(f"initializer {tensor.name!r} records {length} bytes of external data for {count} values")
    values = np.fromfile(path, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if values.size != count:
        raise OnnxpipeError(f"{path}: initializer {tensor.name!r} is cut short ({values.size} of {count} values)")
    return values.reshape(shape)
