"""Level 2: rotate-half rotary embedding -> the RotaryEmbedding contrib op with cos/sin caches.

The exporter writes RoPE on the [B, N, S, H] query/key as

    x * cos + concat(-x[..., H/2:], x[..., :H/2]) * sin        cos, sin: Unsqueeze(f(position_ids), 1)

where f is whatever the rope type computes (default, llama3, longrope, with any attention scaling). Rather than
matching each rope type's arithmetic, the rule checks that cos and sin depend on position_ids alone and tabulates
them by running that subgraph on positions 0..max_position_embeddings-1: the caches hold exactly what the model
computed. RotaryEmbedding takes the graph's own position_ids, so left-padded rows keep their positions.

The rewrite applies the op to the 3-D [B, S, N*H] form (before the head transpose) and transposes after, which is
the form GroupQueryAttention and MultiHeadAttention take their query and key in.

Two more forms: the partial one (the first R < H channels rotated, the rest passed through: rotary_embedding_dim),
and gpt-oss's first/second-half arithmetic, concat(x1 cos - x2 sin, x2 cos + x1 sin) with half-width tables, the
same rotation. GPT-NeoX's per-head q/k/v layout is rewritten first (qkv_layout.py), so that its rope matches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from onnxpipe.fusion import qkv_layout  # noqa: F401 - registers per_head_qkv, applied first by fuse_rotary
from onnxpipe.fusion.cleanup import infer_shapes
from onnxpipe.fusion.rules import PassContext, add_initializer, count_ops, current_context, register
from onnxpipe.runtime.sessions import open_session

POSITION_IDS = "position_ids"


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


class RotaryEmbeddingFusion(pattern.RewriteRuleClassBase):
    def pattern(self, op, x_BSNH, cos_B1SR, sin_B1SR, start1, end1, axes1, start2, end2, axes2):
        x = op.Transpose(x_BSNH, perm=[0, 2, 1, 3])
        x1 = op.Slice(x, start1, end1, axes1, pattern.ANY_VALUE)
        x2 = op.Slice(x, start2, end2, axes2, pattern.ANY_VALUE)
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, cos_B1SR), op.Mul(rotated, sin_B1SR))

    def check(self, context, x_BSNH, cos_B1SR, sin_B1SR, start1, end1, axes1, start2, end2, axes2, **_):
        result = pattern.MatchResult()
        info = current_context().model_info
        head_dim = info.get("head_dim")
        rotary_dim = int((info.get("rope") or {}).get("rotary_dim") or head_dim)
        if rotary_dim != head_dim:
            return result.fail("partial rotary (rotary_dim < head_dim): the partial rule's case", x_BSNH)
        return self._check_rotation(context, result, x_BSNH, cos_B1SR, sin_B1SR, (start1, end1, axes1),
                                    (start2, end2, axes2), rotary_dim)

    def _check_rotation(self, context, result, x_BSNH, cos_B1SR, sin_B1SR, first, second, rotary_dim):
        """The rotate-half arithmetic on the first ``rotary_dim`` channels of each head, cos/sin from position_ids."""
        (start1, end1, axes1), (start2, end2, axes2) = first, second
        half = rotary_dim // 2
        for axes in (axes1, axes2):
            if _ints(axes) not in ([3], [-1]):
                return result.fail("Slice is not along the last axis", axes)
        if _ints(start1) != [0] or _ints(end1) != [half]:
            return result.fail("first half is not x[..., :R/2]", start1)
        if _ints(start2) != [half] or (_ints(end2) or [0])[0] < rotary_dim:
            return result.fail("second half is not x[..., R/2:R]", start2)
        return self._check_tables(context, result, x_BSNH, cos_B1SR, sin_B1SR, rotary_dim, full_width=True)

    def _check_tables(self, context, result, x_BSNH, cos_B1SR, sin_B1SR, rotary_dim, full_width):
        """x is [B, S, N, head_dim]; cos/sin depend on position_ids alone (tabulated into the caches), full_width:
        [.., R] tables with equal halves (rotate-half), else [.., R/2] tables (the first/second-half form)."""
        info = current_context().model_info
        heads, head_dim = info.get("num_attention_heads"), info.get("head_dim")
        kv_heads = info.get("num_kv_heads")
        if x_BSNH.shape is None or x_BSNH.shape.rank() != 4:
            return result.fail("rotated tensor is not 4-D [B, S, N, H]", x_BSNH)
        n, h = x_BSNH.shape[2], x_BSNH.shape[3]
        if h != head_dim or n not in (heads, kv_heads):
            return result.fail(f"rotated tensor is [B, S, {n}, {h}], not [B, S, N, {head_dim}]", x_BSNH)
        position_ids = next((v for v in context.graph_or_function.inputs if v.name == POSITION_IDS), None)
        if position_ids is None:
            return result.fail("the graph has no position_ids input", x_BSNH)
        try:
            self._caches = _rotary_caches(context.model, cos_B1SR, sin_B1SR, int(info["max_position_embeddings"]),
                                          x_BSNH.dtype, rotary_dim, full_width)
        except ValueError as e:
            return result.fail(str(e), cos_B1SR)
        self._position_ids, self._num_heads, self._head_dim = position_ids, int(n), int(h)
        self._rotary_dim = rotary_dim
        return result

    def rewrite(self, op, x_BSNH, **_):
        cos_cache, sin_cache = self._caches
        x_BSD = _merged_heads_source(x_BSNH) or op.Reshape(x_BSNH, op.Constant(value_ints=[0, 0, -1]))
        # the partial form: the op rotates the first rotary_embedding_dim channels of each head, passes the rest
        partial = ({"rotary_embedding_dim": self._rotary_dim, "num_heads": self._num_heads}
                   if self._rotary_dim != self._head_dim else {})
        rotated_BSD = op.RotaryEmbedding(x_BSD, self._position_ids, cos_cache, sin_cache, interleaved=0,
                                         _domain="com.microsoft", **partial)
        rotated_BSD.dtype = x_BSNH.dtype
        if x_BSNH.shape is not None:
            rotated_BSD.shape = ir.Shape([x_BSNH.shape[0], x_BSNH.shape[1], self._num_heads * self._head_dim])
        rotated_BSNH = op.Reshape(rotated_BSD, op.Constant(value_ints=[0, 0, self._num_heads, self._head_dim]))
        return op.Transpose(rotated_BSNH, perm=[0, 2, 1, 3])


class PartialRotaryEmbeddingFusion(RotaryEmbeddingFusion):
    """Rotary on the first R < H channels of each head (Phi, StableLM, GPT-NeoX), the rest passed through:
    Concat(rotate-half(x[..., :R]) with cos/sin, x[..., R:]) -> RotaryEmbedding with rotary_embedding_dim = R."""

    def pattern(self, op, x_BSNH, cos_B1SR, sin_B1SR, start1, end1, axes1, start2, end2, axes2, rot_start, rot_end,
                rot_axes, pass_start, pass_end, pass_axes):
        x = op.Transpose(x_BSNH, perm=[0, 2, 1, 3])
        x_rot = op.Slice(x, rot_start, rot_end, rot_axes, pattern.ANY_VALUE)
        x_pass = op.Slice(x, pass_start, pass_end, pass_axes, pattern.ANY_VALUE)
        x1 = op.Slice(x_rot, start1, end1, axes1, pattern.ANY_VALUE)
        x2 = op.Slice(x_rot, start2, end2, axes2, pattern.ANY_VALUE)
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Concat(op.Add(op.Mul(x_rot, cos_B1SR), op.Mul(rotated, sin_B1SR)), x_pass, axis=-1)

    def check(self, context, x_BSNH, cos_B1SR, sin_B1SR, start1, end1, axes1, start2, end2, axes2, rot_start,
              rot_end, rot_axes, pass_start, pass_end, pass_axes, **_):
        result = pattern.MatchResult()
        info = current_context().model_info
        head_dim = int(info.get("head_dim"))
        rotary_dim = int((info.get("rope") or {}).get("rotary_dim") or head_dim)
        if rotary_dim >= head_dim or rotary_dim % 2:
            return result.fail(f"rotary_dim {rotary_dim} is not a partial rotary of head_dim {head_dim}", x_BSNH)
        for axes in (rot_axes, pass_axes):
            if _ints(axes) not in ([3], [-1]):
                return result.fail("Slice is not along the last axis", axes)
        if _ints(rot_start) != [0] or _ints(rot_end) != [rotary_dim]:
            return result.fail(f"rotated part is not x[..., :{rotary_dim}]", rot_start)
        if _ints(pass_start) != [rotary_dim] or (_ints(pass_end) or [0])[0] < head_dim:
            return result.fail(f"passed-through part is not x[..., {rotary_dim}:]", pass_start)
        return self._check_rotation(context, result, x_BSNH, cos_B1SR, sin_B1SR, (start1, end1, axes1),
                                    (start2, end2, axes2), rotary_dim)


class SplitHalfRotaryFusion(RotaryEmbeddingFusion):
    """Rotary written as first/second-half arithmetic (gpt-oss): x1, x2 = Split(x) into halves,
    Concat(x1 cos - x2 sin, x2 cos + x1 sin) with half-width cos/sin. The same rotation as rotate-half with the
    tables repeated, so RotaryEmbedding (interleaved=0) with these tables as its caches."""

    def pattern(self, op, x_BSNH, cos_B1SR, sin_B1SR):
        x = op.Transpose(x_BSNH, perm=[0, 2, 1, 3])
        x1, x2 = op.Split(x, _allow_other_inputs=True, _outputs=["first", "second"])
        rotated_first = op.Sub(op.Mul(x1, cos_B1SR), op.Mul(x2, sin_B1SR))
        rotated_second = op.Add(op.Mul(x2, cos_B1SR), op.Mul(x1, sin_B1SR))
        return op.Concat(rotated_first, rotated_second, axis=-1)

    def check(self, context, x_BSNH, cos_B1SR, sin_B1SR, first=None, **_):
        result = pattern.MatchResult()
        info = current_context().model_info
        head_dim = int(info.get("head_dim"))
        rotary_dim = int((info.get("rope") or {}).get("rotary_dim") or head_dim)
        if rotary_dim != head_dim:
            return result.fail(f"partial rotary (rotary_dim {rotary_dim} < head_dim {head_dim})", x_BSNH)
        split = first.producer() if first is not None else None
        if split is None or split.attributes.get_int("axis", 0) not in (3, -1):
            return result.fail("the halves are not split along the last axis", x_BSNH)
        sizes = _ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if sizes is not None and sizes != [head_dim // 2] * 2:
            return result.fail(f"the split sizes {sizes} are not two halves of {head_dim}", split.inputs[1])
        if sizes is None and split.attributes.get_int("num_outputs", 2) != 2:
            return result.fail("the split is not into two halves", x_BSNH)
        return self._check_tables(context, result, x_BSNH, cos_B1SR, sin_B1SR, rotary_dim, full_width=False)


def _merged_heads_source(x_BSNH: ir.Value) -> ir.Value | None:
    """x when x_BSNH = Reshape(x [B, S, N*H], [B, S, N, H]): merging the heads back would only undo that Reshape."""
    producer = x_BSNH.producer()
    if producer is None or producer.op_type != "Reshape":
        return None
    source = producer.inputs[0]
    if source is None or source.shape is None or x_BSNH.shape is None or source.shape.rank() != 3:
        return None
    same_leading = all(isinstance(d, (int, ir.SymbolicDim)) and d == e and (isinstance(d, int) or d.value is not None)
                       for d, e in zip(source.shape[:2], x_BSNH.shape[:2]))
    return source if same_leading else None


_CACHE_KEY = "_onnxpipe_rotary_caches"


def _rotary_caches(model: ir.Model, cos: ir.Value, sin: ir.Value, max_positions: int, dtype: Any,
                   rotary_dim: int, full_width: bool = True) -> tuple[ir.Value, ir.Value]:
    """Tabulate cos/sin [max_positions, R/2] by running their subgraph; one pair of initializers per model.
    full_width: the tables are R wide with two equal halves (rotate-half; the first is kept), else R/2 wide."""
    memo = model.meta.setdefault(_CACHE_KEY, {})
    key = (cos.name, sin.name)
    if key in memo:
        return memo[key]
    cos_table, sin_table = _evaluate_on_positions(model, [cos, sin], max_positions)
    width = rotary_dim if full_width else rotary_dim // 2
    half = rotary_dim // 2
    for name, table in (("cos", cos_table), ("sin", sin_table)):
        if table.shape[-1] != width:
            raise ValueError(f"{name} is {table.shape[-1]} wide, not {width}")
        if full_width and not np.allclose(table[..., :half], table[..., half:], rtol=0,
                                          atol=1e-6 * max(1.0, np.abs(table).max())):
            raise ValueError(f"{name} is not rotate-half shaped (its two halves differ)")
    np_dtype = dtype.numpy() if dtype is not None else np.float32
    values = []
    suffix = f"_{len(memo)}" if memo else ""  # a second pair of tables (Gemma 3: local and global rope bases)
    for name, table in (("cos", cos_table), ("sin", sin_table)):
        values.append(add_initializer(model.graph, f"rotary.{name}_cache{suffix}", table[..., :half].astype(np_dtype)))
    memo[key] = (values[0], values[1])
    return memo[key]


def _evaluate_on_positions(model: ir.Model, outputs: list[ir.Value], max_positions: int) -> list[np.ndarray]:
    """Run the subgraph computing ``outputs`` from position_ids alone on positions 0..max_positions-1.
    Raises ValueError when it reads any other graph input."""
    import onnx

    nodes: list[ir.Node] = []
    seen: set[int] = set()
    initializers: dict[str, ir.Value] = {}
    shape_only: dict[str, ir.Value] = {}
    stack = list(outputs)
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is not None and producer.op_type == "Shape" and _is_graph_input(model, producer.inputs[0]):
            shape_only[producer.inputs[0].name] = producer.inputs[0]  # only its shape is read: feed a stand-in
        if producer is None:
            if value.const_value is not None:
                initializers[value.name] = value
            elif value.name != POSITION_IDS:
                raise ValueError(f"cos/sin depend on the graph input {value.name!r}, not only on position_ids")
            continue
        if id(producer) in seen:
            continue
        seen.add(id(producer))
        nodes.append(producer)
        if producer.op_type != "Shape" or producer.inputs[0].name not in shape_only:
            stack.extend(v for v in producer.inputs if v is not None)
    order = {id(n): i for i, n in enumerate(model.graph)}
    nodes.sort(key=lambda n: order.get(id(n), 0))
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        "rotary_tables",
        [onnx.helper.make_tensor_value_info(POSITION_IDS, onnx.TensorProto.INT64, [1, max_positions])]
        + [onnx.helper.make_tensor_value_info(v.name, v.dtype.value, None) for v in shape_only.values()],
        [onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT if v.dtype is None else v.dtype.value, None)
         for v in outputs],
        [ir.serde.serialize_tensor(v.const_value) for v in initializers.values()],
    )
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version)
    session = open_session(proto, purpose="computing the rotary tables", raw_errors=True)
    positions = np.arange(max_positions, dtype=np.int64)[None, :]
    feed = {POSITION_IDS: positions}
    for v in shape_only.values():
        feed[v.name] = np.zeros(_stand_in_shape(v, max_positions), dtype=v.dtype.numpy())
    tables = session.run([v.name for v in outputs], feed)
    # [1, 1, max_positions, R] (or any shape with those trailing dims) -> [max_positions, R]
    return [np.asarray(t, dtype=np.float64).reshape(max_positions, -1) for t in tables]


def _is_graph_input(model: ir.Model, value: ir.Value | None) -> bool:
    return value is not None and any(value is v for v in model.graph.inputs)


def _stand_in_shape(value: ir.Value, max_positions: int) -> list[int]:
    """Batch 1, no past, max_positions new tokens; static dims as declared."""
    dims = []
    for i, d in enumerate(value.shape or []):
        if isinstance(d, int):
            dims.append(d)
        elif i == 0:
            dims.append(1)
        else:
            dims.append(0 if "past" in str(d) else max_positions)
    return dims


register("rotary_embedding", RotaryEmbeddingFusion.rule("RotaryEmbedding"))
register("partial_rotary_embedding", PartialRotaryEmbeddingFusion.rule("PartialRotaryEmbedding"))
register("split_half_rotary_embedding", SplitHalfRotaryFusion.rule("SplitHalfRotaryEmbedding"))


def fuse_rotary(model: ir.Model, ctx: PassContext) -> dict[str, str | int]:
    from onnxpipe.fusion.rules import apply_rules

    if ctx.model_info.get("positions") != "rope":
        return {"rotary": "n/a (learned positions)"}
    # GPT-NeoX's per-head q/k/v first: its rope reads q and k in the layout the rules below take
    counts = apply_rules(model, ["per_head_qkv"])
    if counts["per_head_qkv"]:
        infer_shapes(model, ctx)  # the rotary checks read the new values' shapes
    counts.update(apply_rules(model, ["rotary_embedding", "partial_rotary_embedding", "split_half_rotary_embedding"]))
    model.meta.pop(_CACHE_KEY, None)
    ctx.graph_notes["max_positions"] = int(ctx.model_info["max_position_embeddings"])
    return {**counts, "rotary fused": f"{count_ops(model, 'RotaryEmbedding')}/{2 * ctx.num_layers}"}
