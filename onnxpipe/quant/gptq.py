"""GPTQ (Frantar et al., 2022) for int4 MatMulNBits, in numpy, from Hessians of real calibration activations.

Why our own: the GPTQ bundled with onnxruntime 1.32 (quantization/neural_compressor/weight_only.py) propagates
each column's rounding error along a *column* of the upper Cholesky factor (``Hinv1[i:, i]``), which is zero
below the diagonal, so no error is ever compensated and its result is bit-identical to round-to-nearest
(tests/quant/test_gptq.py shows both). Here the update uses the factor's *row*, as the paper does.

Per linear layer with weight W [K, N] and inputs X [tokens, K]: H = 2/n X^T X (+ 1% mean-diagonal damping);
columns of K are quantized in order, each group of ``group_size`` rows gets its asymmetric 4-bit scale and
zero point from the (already error-corrected) weights, and each row's error is spread over the rows not yet
quantized through the inverse Hessian's Cholesky factor. Hessians come from the float model (not re-collected
after each layer is quantized), like ORT's and most one-shot ONNX GPTQ implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnxpipe.quant.graph import (
    add_initializer,
    drop_unused_initializers,
    ir_model,
    make_node,
    replace_node,
    write_back,
)
from onnxpipe.quant.hessian import input_hessians

MAXQ = 15  # 4 bits, unsigned with a zero point
# Rows whose errors are spread one at a time (a rank-1 update each) before the rest of their block takes them in one
# matrix product. A group's scale is read from its rows when its first row comes; they then carry every earlier
# row's error, since a group either starts a sub-block (the ones before are all applied) or lies inside one.
SUB_BLOCK = 16


@dataclass
class QuantizedWeight:
    q: np.ndarray  # uint8 [N * k_blocks, group_size], values 0..15 (ORT's quant_tensor layout)
    scale: np.ndarray  # float32 [N * k_blocks, 1]
    zero_point: np.ndarray  # uint8 [N * k_blocks, 1]
    k_blocks: int
    # float zero points (the exact min-max grid): the weight is (q - zero_float) * scale. MatMulNBits is given the
    # nearest integer zero_point, and matmulnbits_nodes adds the difference back (``correction``)
    zero_float: np.ndarray | None = None

    def dequantize(self, k: int) -> np.ndarray:
        n = self.q.shape[0] // self.k_blocks
        zero = self.zero_point if self.zero_float is None else self.zero_float
        w = (self.q.astype(np.float64) - zero) * self.scale
        return w.reshape(n, -1)[:, :k].T

    def correction(self) -> np.ndarray | None:
        """C [k_blocks, N] with (q - zero_float) * s = (q - zero_point) * s + C: x @ W = MatMulNBits(x) + block_sums(x) @ C."""
        if self.zero_float is None:
            return None
        n = self.q.shape[0] // self.k_blocks
        c = (self.zero_point.astype(np.float64) - self.zero_float) * self.scale
        return c.reshape(n, self.k_blocks).T.astype(np.float32)


def group_params(w: np.ndarray, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric 4-bit scale and zero point per column of ``w`` [rows, N]. Integer zero points (the default): the
    range always includes 0. ``exact``: the grid spans the column's min and max and the zero point is a float."""
    lo, hi = w.min(0), w.max(0)
    if not exact:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = (hi - lo) / MAXQ
    scale = np.where(scale > 0, scale, 1.0)
    if exact:
        return scale, -lo / scale
    zero = np.clip(np.round(-lo / scale), 0, MAXQ)
    return scale, zero


def inverse_factor(hessian: np.ndarray, k_pad: int, percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): the upper Cholesky factor of the damped inverse Hessian (inv(H) = U^T U), padded to ``k_pad`` rows
    with identity, and the rows whose input never fired. A function of the Hessian alone: layers that read one input
    (q/k/v, gate/up) share it (gptq_quantize_graph and gptq_stream compute it once per input).

    With J the reversal of the order, J H J = L L^T gives inv(H) = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper
    triangular with a positive diagonal: it is U. A Cholesky and a triangular inverse, K^3/3 multiply-adds each,
    both written as blocked matrix products (cholesky_lower, lower_inverse), in place of a general inverse (LU and
    K right-hand sides, ~2.7 K^3) followed by a second Cholesky; the same U up to float64 rounding."""
    k = hessian.shape[0]
    H = np.eye(k_pad) * 1.0  # noqa: N806  (padding rows: identity, never used by the product)
    H[:k, :k] = hessian
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H[np.diag_indices(k_pad)] += percdamp * np.mean(np.diag(H))
    L = cholesky_lower(np.ascontiguousarray(H[::-1, ::-1]))  # noqa: N806
    del H
    return np.ascontiguousarray(lower_inverse(L)[::-1, ::-1]), dead


FACTOR_BLOCK = 256  # rows per panel of the blocked Cholesky and triangular inverse: numpy's own calls below that


def cholesky_lower(a: np.ndarray, block: int = FACTOR_BLOCK) -> np.ndarray:
    """The lower Cholesky factor of the symmetric positive definite ``a`` (overwritten), left-looking by panels of
    ``block`` columns: each panel takes the product of the columns before it (one matrix product), then numpy's
    Cholesky of its diagonal block and the triangular solve below it (as a product with that block's inverse).
    numpy.linalg.cholesky of a whole 4096 x 4096 matrix runs at a fraction of the matrix product's speed."""
    n = a.shape[0]
    for j in range(0, n, block):
        e = min(j + block, n)
        if j:
            a[j:, j:e] -= a[j:, :j] @ a[j:e, :j].T
        diag = np.linalg.cholesky(a[j:e, j:e])
        a[j:e, j:e] = diag
        if e < n:
            a[e:, j:e] = a[e:, j:e] @ np.tril(np.linalg.inv(diag)).T
        a[j:e, e:] = 0.0  # above the diagonal: never read again
    return a


def lower_inverse(lower: np.ndarray, block: int = FACTOR_BLOCK) -> np.ndarray:
    """inv(L) of a lower-triangular L, by halves: inv([[A, 0], [C, D]]) = [[inv(A), 0], [-inv(D) C inv(A), inv(D)]]."""
    n = lower.shape[0]
    if n <= block:
        return np.tril(np.linalg.inv(lower))
    h = (n // 2 + block - 1) // block * block
    out = np.zeros_like(lower)
    a_inv, d_inv = lower_inverse(lower[:h, :h], block), lower_inverse(lower[h:, h:], block)
    out[:h, :h], out[h:, h:] = a_inv, d_inv
    out[h:, :h] = -(d_inv @ (lower[h:, :h] @ a_inv))
    return out


def gptq_weight(weight: np.ndarray, hessian: np.ndarray, group_size: int, percdamp: float = 0.01,
                blocksize: int = 128, exact: bool = False,
                factor: tuple[np.ndarray, np.ndarray] | None = None) -> QuantizedWeight:
    """GPTQ of one weight [K, N] against its input Hessian [K, K] (``exact``: float zero points, group_params).
    ``factor``: inverse_factor(hessian, K padded to whole groups, percdamp), when the caller has it already."""
    k, n = weight.shape
    k_blocks = -(-k // group_size)
    k_pad = k_blocks * group_size
    W = np.zeros((k_pad, n), np.float64)  # noqa: N806
    W[:k] = weight
    U, dead = factor if factor is not None else inverse_factor(hessian, k_pad, percdamp)  # noqa: N806
    W[dead] = 0.0
    q_int = np.zeros((k_pad, n), np.uint8)
    scales = np.zeros((k_blocks, n))
    zeros = np.zeros((k_blocks, n))
    blocksize = max(blocksize - blocksize % group_size, group_size)
    sub = SUB_BLOCK if SUB_BLOCK % group_size == 0 or group_size % SUB_BLOCK == 0 else group_size
    for i1 in range(0, k_pad, blocksize):
        i2 = min(i1 + blocksize, k_pad)
        W1 = W[i1:i2].copy()  # noqa: N806
        E1 = np.zeros_like(W1)  # noqa: N806
        U1 = U[i1:i2, i1:i2]  # noqa: N806
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            _row_steps(W1, E1, U1, q_int, scales, zeros, i1, j1, j2, group_size, exact)
            W1[j2:] -= U1[j1:j2, j2:].T @ E1[j1:j2]
        W[i2:] -= U[i1:i2, i2:].T @ E1
    return _packed(q_int, scales, zeros, group_size, exact)


def _row_steps(W1: np.ndarray, E1: np.ndarray, U1: np.ndarray, q_int: np.ndarray, scales: np.ndarray,  # noqa: N803
               zeros: np.ndarray, i1: int, j1: int, j2: int, group_size: int, exact: bool) -> None:
    """Rows j1..j2 of the block at i1, one at a time: each row rounded on its group's grid, its error spread over
    the sub-block's later rows (W1, a rank-1 update each) and kept (E1). Not split over threads by columns
    (which are independent): each row is a dozen numpy calls on N values, the GIL changes hands at each, and two
    threads of 2,048 columns measured 2.3x slower than one of 4,096 (2 cores with other load on them)."""
    for i in range(j1, j2):
        row = i1 + i
        g = row // group_size
        if row % group_size == 0:  # its rows carry every earlier row's error (see SUB_BLOCK)
            scales[g], zeros[g] = group_params(W1[i:i + group_size], exact)
        w, s, z = W1[i], scales[g], zeros[g]
        # in place, the same operations in the same order: q = clip(round(w / s + z), 0, 15) (= round(w / s) + z
        # for an integer z), err = (w - (q - z) * s) / U[i, i]
        qi = np.divide(w, s)
        qi += z
        np.clip(np.round(qi, out=qi), 0, MAXQ, out=qi)
        q_int[row] = qi
        err = E1[i]
        np.subtract(qi, z, out=err)
        err *= s
        np.subtract(w, err, out=err)
        err /= U1[i, i]
        if j2 > i + 1:
            W1[i + 1:j2] -= U1[i, i + 1:j2, None] * err


def _packed(q_int: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, exact: bool) -> QuantizedWeight:
    """q [K_pad, N], scales and zero points [k_blocks, N] in ORT's layout (rows n * k_blocks + block)."""
    k_blocks, n = scales.shape
    zf = zeros.T.reshape(-1, 1)
    return QuantizedWeight(
        q=q_int.T.reshape(n * k_blocks, group_size),
        scale=scales.T.reshape(-1, 1).astype(np.float32),
        zero_point=np.clip(np.round(zf), 0, MAXQ).astype(np.uint8),
        k_blocks=k_blocks,
        # the correction is computed from the float32 scale the graph holds
        zero_float=zf.astype(np.float64) if exact else None,
    )


def rtn_blocks(weight: np.ndarray, group_size: int, exact: bool = False) -> QuantizedWeight:
    """Round-to-nearest per block of ``group_size`` rows of K (group_params' grid), for matmulnbits_nodes."""
    k, n = weight.shape
    k_blocks = -(-k // group_size)
    W = np.zeros((k_blocks * group_size, n))  # noqa: N806
    W[:k] = weight
    q_int = np.zeros(W.shape, np.uint8)
    scales, zeros = np.zeros((k_blocks, n)), np.zeros((k_blocks, n))
    for g in range(k_blocks):
        rows = slice(g * group_size, (g + 1) * group_size)
        scales[g], zeros[g] = group_params(W[rows], exact)
        q_int[rows] = np.clip(np.round(W[rows] / scales[g] + zeros[g]), 0, MAXQ)
    return _packed(q_int, scales, zeros, group_size, exact)


def exact_grid(shape: tuple[int, int], group_size: int, float_zero_points: bool) -> bool:
    """Float zero points where asked and possible: blocks (not per channel) that tile K exactly, since the
    correction sums each block of the input."""
    return bool(float_zero_points) and group_size > 0 and shape[0] % group_size == 0


def gptq_quantize_graph(proto: Any, nodes: list[str], feeds: Iterable[dict[str, np.ndarray]], group_size: int,
                        accuracy_level: int, float_zero_points: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Replace each named MatMul by a MatMulNBits holding its GPTQ weights; in place. Returns a small report.
    ``progress(done, total)`` after each layer.

    ``group_size`` 0: one group per output channel (the whole of K), written as DequantizeLinear (uint4, per
    axis) -> MatMul instead (``dequantize_linear_ir``): MatMulNBits needs a power-of-two block."""
    from onnxpipe.quant.smoothquant import _session, activation_groups, with_outputs

    groups = activation_groups(proto, nodes)
    hessians = input_hessians(_session(with_outputs(proto, list(groups))), list(groups), feeds)
    model = ir_model(proto)
    graph = model.graph
    by_name = {n.name: n for n in graph}
    reduction = []
    sums: dict[tuple[Any, Any], ir.Value] = {}
    for x, members in groups.items():
        factor = None  # one input's members share it
        for member in members:
            node = by_name[member.name]
            weight = _weight(node).astype(np.float64)
            group = group_size or weight.shape[0]
            if factor is None:
                factor = inverse_factor(hessians[x], -(-weight.shape[0] // group) * group)
            qw = gptq_weight(weight, hessians[x], group, exact=exact_grid(weight.shape, group_size, float_zero_points),
                             factor=factor)
            if group_size:
                new = matmulnbits_ir(graph, node, weight.shape, qw, group, accuracy_level, sums)
            else:
                new = dequantize_linear_ir(graph, node, weight.shape, qw)
            replace_node(graph, node, new)
            reduction.append(_proxy_loss_ratio(weight, qw, hessians[x], group))
            if progress:
                progress(len(reduction), sum(len(m) for m in groups.values()))
    if sums:  # shared block sums sit beside the first layer that read them, which need not come first
        graph.sort()
    if group_size and reduction:
        model.opset_imports.setdefault("com.microsoft", 1)
    drop_unused_initializers(graph)
    write_back(model, proto)
    return {"hessians": len(hessians), "quantized_nodes": len(reduction),
            "proxy_loss_vs_rtn": float(np.mean(reduction)) if reduction else None}


def _weight(node: ir.Node) -> np.ndarray:
    w = node.inputs[1]
    assert w is not None and w.const_value is not None, node.name
    return w.const_value.numpy()


def matmulnbits_ir(graph: ir.Graph, node: ir.Node, shape: tuple[int, int], qw: QuantizedWeight, group_size: int,
                   accuracy_level: int, block_sums: dict[tuple[Any, Any], ir.Value] | None = None) -> list[ir.Node]:
    """The nodes (their initializers registered in ``graph``) that replace ``node``: a MatMulNBits
    (``_matmulnbits``), plus, for float zero points, the correction: y = MatMulNBits(x) + (x @ S) @ C, S [K, blocks]
    the block indicator (x @ S: each block's sum), C [blocks, N] (QuantizedWeight.correction). MatMulNBits reads
    float zero points itself, but onnxruntime's CPU kernel then dequantizes the weights on every call (2.0 ms
    against 37 us for one 576 x 1536 layer at batch 1, onnxruntime 1.32, 2 threads): integer zero points plus a
    [blocks, N] matmul keep the fast int8 path. ``block_sums`` (input, block) -> value: layers reading one input
    (q/k/v, gate/up) share its block sums, made beside the first layer that asks (the caller sorts the graph when
    that is not the first in graph order)."""
    mm = _matmulnbits(graph, node, shape, qw, group_size, accuracy_level)
    c = qw.correction()
    if c is None:
        return [mm]
    base, p, x = node.inputs[1].name, f"{node.name}_Q4F", node.inputs[0]  # type: ignore[union-attr]
    block_sums = {} if block_sums is None else block_sums
    key = (x.name if x is not None else None, group_size)
    nodes = [mm]
    if key not in block_sums:  # x @ S, S [K, blocks] of ones per block: any rank of x (GPT-2's linears are 2-D)
        k = shape[0]
        indicator = f"onnxpipe_q4f_blocks_{k}x{group_size}"  # one per (K, block) in the whole graph
        if ("indicator", indicator) not in block_sums:
            ones = (np.arange(k)[:, None] // group_size == np.arange(qw.k_blocks)[None, :]).astype(np.float32)
            block_sums[("indicator", indicator)] = add_initializer(graph, indicator, ones)
        nodes.append(make_node("MatMul", [x, block_sums[("indicator", indicator)]], f"{p}/block_sums",
                               f"{p}/BlockSums"))
        block_sums[key] = nodes[-1].outputs[0]
    correction = add_initializer(graph, f"{base}_Q4F_correction", c)
    mm.outputs[0].name = f"{p}/int_zero_points"
    nodes.append(make_node("MatMul", [block_sums[key], correction], f"{p}/correction", f"{p}/MatMul"))
    nodes.append(make_node("Add", [mm.outputs[0], nodes[-1].outputs[0]], None, f"{p}/Add"))
    return nodes


def _matmulnbits(graph: ir.Graph, node: ir.Node, shape: tuple[int, int], qw: QuantizedWeight, group_size: int,
                 accuracy_level: int) -> ir.Node:
    """A com.microsoft MatMulNBits (bits=4) in the layout ORT's own quantizer writes: B [N, blocks, group/2] with
    the even element in the low nibble, scales [N, blocks], zero points [N, ceil(blocks/2)] packed per row."""
    k, n = shape
    kb = qw.k_blocks
    q = qw.q.reshape(n, kb, group_size)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zp = qw.zero_point.reshape(n, kb)
    if kb % 2:
        zp = np.concatenate([zp, np.full((n, 1), 8, np.uint8)], axis=1)
    zp_packed = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    base = f"{node.inputs[1].name}_Q4G{group_size}"  # type: ignore[union-attr]
    tensors = [add_initializer(graph, base, packed),
               add_initializer(graph, f"{base}_scales", qw.scale.reshape(n, kb).astype(_scale_dtype(node))),
               add_initializer(graph, f"{base}_zero_points", zp_packed)]
    attrs = {"K": k, "N": n, "bits": 4, "block_size": group_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    return make_node("MatMulNBits", [node.inputs[0], *tensors], None, f"{node.name}_Q4", domain="com.microsoft",
                     **attrs)


def _scale_dtype(node: ir.Node) -> type:
    """The scales' type: the float weight's (MatMulNBits and DequantizeLinear bind their scale to the activations'
    type; an fp16 model's scales are fp16, as onnxruntime's own quantizer writes them), float32 otherwise."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    tensor = weight.const_value if weight is not None else None
    return np.float16 if tensor is not None and tensor.dtype == ir.DataType.FLOAT16 else np.float32


def dequantize_linear_ir(graph: ir.Graph, node: ir.Node, shape: tuple[int, int], qw: QuantizedWeight) -> list[ir.Node]:
    """A per-output-channel 4-bit weight (one group of K) as DequantizeLinear(W uint4 [K, N], scale [N], zero
    point uint4 [N], axis=1) -> MatMul: ONNX opset 21, which the caller must declare. ORT's CPU EP fuses the pair
    into a MatMulNBits at load."""
    k, n = shape
    if qw.k_blocks != 1:
        raise ValueError("dequantize_linear_nodes takes one group per output channel")
    base = f"{node.inputs[1].name}_Q4C"  # type: ignore[union-attr]
    tensors = [add_initializer(graph, base, uint4(qw.q.reshape(n, -1)[:, :k].T)),  # [K, N]
               add_initializer(graph, f"{base}_scale", qw.scale.reshape(n).astype(_scale_dtype(node))),
               add_initializer(graph, f"{base}_zero_point", uint4(qw.zero_point.reshape(n)))]
    dq = make_node("DequantizeLinear", tensors, f"{base}_dequantized", f"{node.name}_Q4C/DequantizeLinear", axis=1)
    return [dq, make_node("MatMul", [node.inputs[0], dq.outputs[0]], None, f"{node.name}_Q4C")]


def uint4(values: np.ndarray) -> ir.PackedTensor:
    """A UINT4 tensor of ``values`` (0..15): two values a byte, the first in the low nibble (the ONNX layout)."""
    flat = np.ascontiguousarray(values, np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return ir.PackedTensor((flat[0::2] | (flat[1::2] << 4)).astype(np.uint8), ir.DataType.UINT4, shape=values.shape)


def _as_protos(node: Any, build: Callable[[ir.Graph, ir.Node], list[ir.Node]]) -> tuple[list[Any], list[Any]]:
    """``build``'s nodes and initializers for one MatMul NodeProto, as protos (for graphs written with onnx.helper)."""
    values = {name: ir.Value(name=name) for name in node.input}
    old = ir.Node(node.domain, node.op_type, [values[i] for i in node.input], name=node.name, num_outputs=1)
    old.outputs[0].name = node.output[0]
    graph = ir.Graph([], [], nodes=[old], opset_imports={"": 21})
    replace_node(graph, old, build(graph, old))
    return ([ir.serde.serialize_node(n) for n in graph],
            [ir.serde.serialize_tensor(v.const_value) for v in graph.initializers.values() if v.const_value is not None])


def matmulnbits_nodes(node: Any, shape: tuple[int, int], qw: QuantizedWeight, group_size: int,
                      accuracy_level: int) -> tuple[list[Any], list[Any]]:
    """matmulnbits_ir for a MatMul NodeProto: (NodeProtos, TensorProtos)."""
    return _as_protos(node, lambda g, n: matmulnbits_ir(g, n, shape, qw, group_size, accuracy_level))


def matmulnbits_node(node: Any, shape: tuple[int, int], qw: QuantizedWeight, group_size: int,
                     accuracy_level: int) -> tuple[Any, list[Any]]:
    """_matmulnbits for a MatMul NodeProto: (the MatMulNBits NodeProto, its TensorProtos)."""
    nodes, tensors = _as_protos(node, lambda g, n: [_matmulnbits(g, n, shape, qw, group_size, accuracy_level)])
    return nodes[0], tensors


def dequantize_linear_nodes(node: Any, shape: tuple[int, int], qw: QuantizedWeight) -> tuple[list[Any], list[Any]]:
    """dequantize_linear_ir for a MatMul NodeProto: (NodeProtos, TensorProtos)."""
    return _as_protos(node, lambda g, n: dequantize_linear_ir(g, n, shape, qw))


def rtn_per_channel(weight: np.ndarray) -> QuantizedWeight:
    """Round-to-nearest, one asymmetric 4-bit scale and zero point per output channel (the grid GPTQ uses)."""
    k, n = weight.shape
    s, z = group_params(weight.astype(np.float64))
    q = np.clip(np.round(weight / s) + z, 0, MAXQ).astype(np.uint8)
    return QuantizedWeight(q=q.T.copy(), scale=s.reshape(-1, 1).astype(np.float32),
                           zero_point=z.reshape(-1, 1).astype(np.uint8), k_blocks=1)


def rtn_weight(weight: np.ndarray, group_size: int, exact: bool = False) -> np.ndarray:
    """Round-to-nearest with the same grid rule, dequantized: the baseline GPTQ must beat."""
    k, n = weight.shape
    k_pad = -(-k // group_size) * group_size
    W = np.zeros((k_pad, n))  # noqa: N806
    W[:k] = weight
    out = np.zeros_like(W)
    for g in range(0, k_pad, group_size):
        s, z = group_params(W[g:g + group_size], exact)
        out[g:g + group_size] = (np.clip(np.round(W[g:g + group_size] / s + z), 0, MAXQ) - z) * s
    return out[:k]


def _proxy_loss_ratio(weight: np.ndarray, qw: QuantizedWeight, hessian: np.ndarray, group_size: int,
                      losses: Callable[[np.ndarray, QuantizedWeight, int], tuple[float, float] | None] | None = None,
                      ) -> float:
    """tr(dW^T H dW) of GPTQ over that of RTN: the output error GPTQ minimises, < 1 when it helped. ``losses``: the
    two traces computed elsewhere (hessian.HessianSums.proxy_losses, on the GPU), or None to compute them here."""
    def loss(dw: np.ndarray) -> float:  # a BLAS product: einsum's three-operand loop took K^2 N scalar steps
        return float(((hessian @ dw) * dw).sum())

    values = losses(weight, qw, group_size) if losses is not None else None
    if values is None:
        values = (loss(weight - qw.dequantize(weight.shape[0])),
                  loss(weight - rtn_weight(weight, group_size, exact=qw.zero_float is not None)))
    gptq, rtn = values
    return gptq / rtn if rtn > 0 else 1.0
