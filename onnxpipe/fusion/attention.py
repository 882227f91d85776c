"""Level 3: the exporter's attention block -> MultiHeadAttention (GPT-2 on the CPU target) or GroupQueryAttention (the
RoPE families; every family with --target cuda), with the KV cache flowing through the fused op (past in, present
out, BNSH, names unchanged).

The exporter writes each block as

    q, k, v      = Transpose(Reshape(x_BSD), [0, 2, 1, 3])             (x_BSD: after RotaryEmbedding for q and k)
    present_k/v  = Concat(past_k/v, k/v, axis=-2)                      (graph outputs)
    k/v_rep      = Reshape(Expand(Unsqueeze(present, 2)))              (GQA only: repeat kv heads)
    scores       = MatMul(q * s, K^T * s) + mask_bias                  (K^T as one Transpose or Reshape/Transpose/Reshape)
    out_BSD      = Reshape(Transpose(MatMul(Softmax(scores) [NaN -> 0], v_rep)))

Models traced through transformers' eager attention scale the product instead, MatMul(q, K^T) * s, and two of them
add a step the fused op has an input or attribute for (measured equal on ORT 1.32's CPU kernel, with a bias):
- soft-capping (Gemma 2): cap * Tanh(scores * s / cap), before the mask -> GroupQueryAttention's softcap = cap,
  scale = s (the op computes softcap * tanh(scale * qk / softcap), then adds attention_bias);
- attention sinks (gpt-oss): a per-head logit appended as one more key column, the softmax taken over it and the
  column dropped -> GroupQueryAttention's head_sink input (one value per head, in the softmax's denominator).
A block without grouped heads that has either is GroupQueryAttention with groups of one (MultiHeadAttention has
neither). A q/k/v input that is [B, S, ...] of more than 3 dims (Falcon's 5-D [B, S, kv groups, heads per group,
head_dim] slices) is flattened to [B, S, heads x head_dim] when the block's Reshape to heads keeps B and S.

Padding. The model's own mask (mask_bias = Where(bool_mask, 0, -inf), [B, 1, S, T]: causal, padding and sliding
window together) is kept and passed as the fused op's attention_bias, with -inf replaced by the dtype's lowest
finite value so a fully padded row averages instead of turning NaN. GroupQueryAttention gets seqlens_k = T - 1
for every row and total_sequence_length = T (T = attention_mask's width): every row is treated as full length, the
new KV rows land at [P, T) exactly as the Concat did, and left padding is handled by the bias. Measured on ORT
1.32 CPU (tests/fusion/test_gqa_padding.py): identical to a reference with a left-padded batch, and
local_window_size = W admits keys with i - j < W, HF's sliding_window semantics; it is set from the manifest so
the kernel can skip keys outside the window. GroupQueryAttention also gets query_seqlens = S for every row, without which ORT's CPU kernel rejects a
multi-token step with a past for batch > 1. GroupQueryAttention's own rotary (do_rotary) is not used: in the
prompt it reads only the first position id of each row, which is wrong for left-padded rows.

--target cuda. ORT's CUDA GroupQueryAttention has no attention_bias ("not supported in GroupQueryAttention cuda
kernel"), so the CUDA form carries padding the way that kernel expects: rows are RIGHT-padded (the manifest says
``padding_side: right`` and the runtime pads so), seqlens_k = ReduceSum(attention_mask) - 1 per row and
total_sequence_length = the mask's width; a decode step writes row r's new key/value at its own length. The mask's
layout then no longer matters, only its row sums. With right padding GroupQueryAttention's own rotary is right
(positions 0..n-1 in the prompt, the row's length after), so the two RotaryEmbedding nodes fold into the op
(do_rotary=1 with the same cos/sin caches) and q, k, v projections of one input pack into one MatMul (packed QKV):
the form ORT's CUDA kernel and GenAI's builder use, three fewer kernels per layer. This also keeps ORT's own
CUDA-only GroupQueryAttentionFusion away (it skips do_rotary nodes; on nodes with more than 9 inputs, as our CPU
form has, it breaks the graph: "The sum of input arg count is not equal to size of input defs").

A block without grouped heads (GPT-2; any family exported with kv heads = heads) gets the same CUDA form as
GroupQueryAttention with kv_num_heads = num_heads (groups of one), so that it too gets the shared in-place KV buffer
that CUDA graphs need (MultiHeadAttention's past and present are separate tensors). GPT-2 has no rotary
(do_rotary=0; its learned positions come from the position_ids input, which the runtime feeds as the row's count of
real tokens before each one, right padding or not), and its c_attn is already packed: one Gemm with its bias, reshaped
to [B, S, 3 hidden] and split three ways; that tensor feeds the op as the packed query (_split_qkv).
"""

from __future__ import annotations

import math
import re

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from onnxpipe.fusion.rules import PassContext, add_initializer, count_ops, current_context, register

ATTENTION_MASK = "attention_mask"
ATTENTION_OPS = ("MultiHeadAttention", "GroupQueryAttention")
# how the scores are scaled: sdpa (q and k each), eager (the product), soft-capped: then Tanh (a cap of 1), then
# Tanh and times the cap, or divided by the cap, Tanh and times the cap (transformers' eager form, cap != 1)
SCORE_FORMS = ("qk", "eager", "softcap", "softcap_scaled", "softcap_div")


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


class AttentionFusion(pattern.RewriteRuleClassBase):
    """One rule class for both ops; ``grouped`` says whether the pattern has the repeat-kv Expand."""

    def __init__(self, name: str, grouped: bool, transpose_3d: bool, nan_guard: bool, scores: str = "qk",
                 sinks: bool = False):
        # remove_nodes=False: present_key/value are graph outputs with other readers (Shape nodes of the old
        # block); the old nodes are left for the dead-node sweep after the pass.
        super().__init__(name, remove_nodes=False)
        if scores not in SCORE_FORMS:
            raise ValueError(f"unknown scores form {scores!r}")
        self._grouped, self._transpose_3d, self._nan_guard = grouped, transpose_3d, nan_guard
        self._scores, self._sinks = scores, sinks

    def pattern(self, op, query_BSD, key_BSD, value_BSD, past_key, past_value, q_scale, k_scale, mask_bias,
                repeat_axes, out_shape, cap_div, sinks, sink_start, sink_end, sink_axes, sink_steps, max_axes):
        def heads_first(x_BSD):
            return op.Transpose(op.Reshape(x_BSD, pattern.ANY_VALUE), perm=[0, 2, 1, 3])

        present_key = op.Concat(past_key, heads_first(key_BSD), axis=-2, _outputs=["present_key"])
        present_value = op.Concat(past_value, heads_first(value_BSD), axis=-2, _outputs=["present_value"])
        key_all, value_all = present_key, present_value
        if self._grouped:
            key_all = op.Reshape(op.Expand(op.Unsqueeze(present_key, repeat_axes), pattern.ANY_VALUE), pattern.ANY_VALUE)
            value_all = op.Reshape(op.Expand(op.Unsqueeze(present_value, repeat_axes), pattern.ANY_VALUE),
                                   pattern.ANY_VALUE)
        if self._transpose_3d:
            key_t = op.Reshape(op.Transpose(op.Reshape(key_all, pattern.ANY_VALUE), perm=[0, 2, 1]), pattern.ANY_VALUE)
        else:
            key_t = op.Transpose(key_all, perm=[0, 1, 3, 2])
        if self._scores == "qk":  # sdpa: q and k each scaled by sqrt(scale)
            scores = op.MatMul(op.Mul(heads_first(query_BSD), q_scale), op.Mul(key_t, k_scale))
        else:  # eager: the product scaled (q_scale); soft-capped: then Tanh, then times the cap (k_scale)
            scores = op.Mul(op.MatMul(heads_first(query_BSD), key_t), q_scale)
            if self._scores == "softcap_div":
                scores = op.Div(scores, cap_div)
            if self._scores.startswith("softcap"):
                scores = op.Tanh(scores)
            if self._scores in ("softcap_scaled", "softcap_div"):
                scores = op.Mul(scores, k_scale)
        masked = op.Add(scores, mask_bias)
        if self._sinks:  # a per-head sink logit appended as one more key column, dropped after the softmax
            with_sink = op.Concat(masked, op.Expand(sinks, pattern.ANY_VALUE), axis=-1)
            shifted = op.Sub(with_sink, op.ReduceMax(with_sink, max_axes, keepdims=1))
            probs = op.Slice(op.Softmax(shifted, axis=-1), sink_start, sink_end, sink_axes, sink_steps)
        else:
            probs = op.Softmax(masked, axis=-1)
        if self._nan_guard:
            probs = op.Where(op.IsNaN(probs), 0.0, probs)
        context = op.MatMul(probs, value_all)
        out = op.Reshape(op.Transpose(context, perm=[0, 2, 1, 3]), out_shape, _outputs=["out"])
        return out, present_key, present_value

    def check(self, context, query_BSD, key_BSD, value_BSD, past_key, past_value, q_scale, mask_bias, k_scale=None,
              repeat_axes=None, out=None, present_key=None, present_value=None, cap_div=None, sinks=None, sink_start=None,
              sink_end=None, sink_axes=None, sink_steps=None, max_axes=None, **_):
        result = pattern.MatchResult()
        ctx = current_context()
        info = ctx.model_info
        heads, kv_heads = int(info["num_attention_heads"]), int(info["num_kv_heads"])
        if self._grouped != (kv_heads != heads):
            return result.fail(f"{'grouped' if self._grouped else 'plain'} pattern, model has {heads}/{kv_heads} heads")
        if self._grouped and _ints(repeat_axes) != [2]:
            return result.fail("kv heads are not repeated along axis 2", repeat_axes)
        self._flatten = {}
        for name, value in (("query", query_BSD), ("key", key_BSD), ("value", value_BSD)):
            if value.shape is not None and value.shape.rank() != 3:
                if not _heads_of_leading_bs(context, value):
                    return result.fail(f"{name} input is not [B, S, hidden], nor [B, S, ...] reshaped to heads", value)
                self._flatten[name] = True  # e.g. Falcon's [B, S, kv groups, heads per group, H]: flattened
        failure = self._check_scale(result, q_scale, k_scale, cap_div)
        if failure is not None:
            return failure
        self._sink_values = None
        if self._sinks:
            failure = self._check_sinks(result, sinks, (sink_start, sink_end, sink_axes, sink_steps), max_axes, heads)
            if failure is not None:
                return failure
        escaped = _escaping_value(context, keep=[present_key, present_value, out])
        if escaped is not None:
            return result.fail(f"{escaped.name} is read outside the attention block", escaped)
        mask_node = mask_bias.producer()
        if mask_node is None or mask_node.op_type != "Where":
            return result.fail("mask is not Where(bool_mask, 0, -inf)", mask_bias)
        zero, low = (_ir_utils.get_singleton_value(v) for v in mask_node.inputs[1:3])
        if zero != 0 or low is None or not (np.isneginf(low) or float(low) <= -65504.0):  # fp16's lowest or below
            return result.fail("mask is not Where(bool_mask, 0, -inf)", mask_bias)
        graph = context.graph_or_function
        attention_mask = next((v for v in graph.inputs if v.name == ATTENTION_MASK), None)
        if attention_mask is None:
            return result.fail("the graph has no attention_mask input")
        for past, present_name in ((past_key, "present_key"), (past_value, "present_value")):
            if not any(past is v for v in graph.inputs):
                return result.fail(f"{present_name}'s past is not a graph input", past)
        self._bool_mask, self._attention_mask = mask_node.inputs[0], attention_mask
        self._input_ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
        self._query_seqlens = query_seqlens_supported()
        self._heads, self._kv_heads = heads, kv_heads
        self._window = _layer_window(info, present_key)
        if self._window is None:
            return result.fail("the model mixes sliding and full layers and this block's layer is not known from its "
                               "present key's name", present_key)
        self._target, self._graph = ctx.target, graph
        # GPT-2 reshapes the attention output straight to 2-D [B*S, hidden] for its Gemm: keep that Reshape.
        self._keep_reshape = out is None or out.shape is None or out.shape.rank() != 3
        return result

    def _check_scale(self, result, q_scale, k_scale, cap_div):
        """Sets the op's scale and softcap from the scale constants; a failed MatchResult when they are not."""
        if self._scores == "qk":
            scales = [_ir_utils.get_singleton_value(s) for s in (q_scale, k_scale)]
            if not all(isinstance(s, float) for s in scales):
                return result.fail("query/key scales are not scalar constants", q_scale)
            self._scale, self._softcap = float(scales[0] * scales[1]), 0.0
            return None
        pre = _ir_utils.get_singleton_value(q_scale)
        cap = _ir_utils.get_singleton_value(k_scale) if self._scores in ("softcap_scaled", "softcap_div") else 1.0
        div = _ir_utils.get_singleton_value(cap_div) if self._scores == "softcap_div" else 1.0
        if not all(isinstance(v, float) for v in (pre, cap, div)):
            return result.fail("the scores' scale (or soft cap) is not a scalar constant", q_scale)
        if self._scores == "eager":
            self._scale, self._softcap = float(pre), 0.0
            return None
        # cap * tanh(scores * pre / div) is the op's cap * tanh(scores * scale / cap) with scale = pre / div * cap
        if cap <= 0 or div == 0:
            return result.fail(f"soft cap {cap} (divisor {div}) is not positive", k_scale)
        self._scale, self._softcap = float(pre / div * cap), float(cap)
        return None

    def _check_sinks(self, result, sinks, slice_inputs, max_axes, heads):
        """The sink logits: constant, one per head, appended as the last column and sliced off after the softmax."""
        if sinks is None or sinks.const_value is None:
            return result.fail("the sink logits are not a constant", sinks)
        values = np.asarray(sinks.const_value.numpy())
        dims = [d for d in values.shape]
        if values.size != heads or len(dims) > 4 or dims != [1] * (len(dims) - 3) + [heads, 1, 1][-len(dims):]:
            return result.fail(f"the sink logits {dims} are not one per head, broadcast over [B, N, S, 1]", sinks)
        if _ints(max_axes) not in ([-1], [3]):
            return result.fail("the softmax's shift is not a max over the last axis", max_axes)
        start, end, axes, steps = slice_inputs
        if _ints(axes) not in ([-1], [3]) or _ints(start) != [0] or _ints(end) != [-1] or _ints(steps) != [1]:
            return result.fail("the sink column is not sliced off as [..., :-1]", end)
        self._sink_values = values.reshape(heads)
        return None

    def rewrite(self, op, query_BSD, key_BSD, value_BSD, past_key, past_value, mask_bias, out_shape, **_):
        flat = [op.Reshape(v, op.Constant(value_ints=[0, 0, -1])) if self._flatten.get(name) else v
                for name, v in (("query", query_BSD), ("key", key_BSD), ("value", value_BSD))]
        out, present_key, present_value = self._fused(op, *flat, past_key, past_value, mask_bias)
        if self._keep_reshape:
            out = op.Reshape(out, out_shape)
        return out, present_key, present_value

    def _extras(self, op, dtype: ir.DataType | None) -> tuple[ir.Value | None, dict]:
        """The head_sink input (or None) and the softcap attribute, for either GroupQueryAttention form."""
        sink = None
        if self._sink_values is not None:
            np_dtype = dtype.numpy() if dtype is not None else np.float32
            sink = op.Constant(value=ir.tensor(self._sink_values.astype(np_dtype)))
        return sink, ({"softcap": self._softcap} if self._softcap else {})

    def _fused(self, op, query_BSD, key_BSD, value_BSD, past_key, past_value, mask_bias):
        low = float(np.finfo(mask_bias.dtype.numpy() if mask_bias.dtype is not None else np.float32).min)
        bias = op.Where(self._bool_mask, op.Constant(value=ir.tensor(np.array(0, dtype=mask_bias.dtype.numpy()))),
                        op.Constant(value=ir.tensor(np.array(low, dtype=mask_bias.dtype.numpy()))))
        if self._target == "cuda":  # grouped or not: a plain block is GroupQueryAttention with groups of 1
            return self._gqa_cuda(op, query_BSD, key_BSD, value_BSD, past_key, past_value, mask_bias.dtype)
        sink, capped = self._extras(op, mask_bias.dtype)
        if not self._grouped and sink is None and not capped:
            return op.MultiHeadAttention(
                query_BSD, key_BSD, value_BSD, None, None, bias, past_key, past_value,
                num_heads=self._heads, scale=self._scale, _domain="com.microsoft", _outputs=3,
            )
        # MultiHeadAttention has neither sinks nor a soft cap: a plain block with them is GroupQueryAttention with
        # groups of one
        total_1d = op.Shape(self._attention_mask, start=1, end=2)
        batch_1d = op.Shape(self._attention_mask, start=0, end=1)
        seqlens_k = op.Cast(op.Expand(op.Sub(total_1d, op.Constant(value_ints=[1])), batch_1d), to=ir.DataType.INT32)
        total = op.Cast(op.Squeeze(total_1d), to=ir.DataType.INT32)
        extra: list = [sink] if sink is not None else []
        if self._query_seqlens:
            # query_seqlens = S for every row: without it the CPU kernel refuses batch > 1 with S > 1 and a past
            # (a multi-token step after the prompt); with it every row's S new tokens go to [T - S, T) as before.
            new_tokens = self._input_ids if self._input_ids is not None else query_BSD  # input_ids: shared by layers
            query_seqlens = op.Cast(op.Expand(op.Shape(new_tokens, start=1, end=2), batch_1d), to=ir.DataType.INT32)
            extra = [sink, None, None, None, None, query_seqlens]
        return op.GroupQueryAttention(
            query_BSD, key_BSD, value_BSD, past_key, past_value, seqlens_k, total, None, None, None, bias, *extra,
            num_heads=self._heads, kv_num_heads=self._kv_heads, scale=self._scale,
            local_window_size=self._window, do_rotary=0, **capped, _domain="com.microsoft", _outputs=3,
        )

    def _gqa_cuda(self, op, query_BSD, key_BSD, value_BSD, past_key, past_value, dtype):
        """The CUDA form: no attention_bias (ORT's CUDA kernel has none), right padding, rotary and QKV packing
        folded into the op where the graph allows (see the module's docstring, "--target cuda")."""
        current_context().graph_notes["padding_side"] = "right"
        mask = self._attention_mask
        count = op.ReduceSum(mask, op.Constant(value_ints=[1]), keepdims=0)
        seqlens_k = op.Cast(op.Sub(count, op.Constant(value=ir.tensor(np.array(1, dtype=np.int64)))),
                            to=ir.DataType.INT32)
        total = op.Cast(op.Squeeze(op.Shape(mask, start=1, end=2)), to=ir.DataType.INT32)
        head_dim = int(current_context().model_info["head_dim"])
        rotary = _foldable_rotary(query_BSD, key_BSD, head_dim)
        query, key, value, extra, attrs = query_BSD, key_BSD, value_BSD, [], {}
        if rotary is not None:
            query, key, cos_cache, sin_cache, interleaved = rotary
            extra, attrs = [cos_cache, sin_cache], {"rotary_interleaved": interleaved}
        sink, capped = self._extras(op, dtype)
        if sink is not None:  # head_sink is input 11: after position_ids and attention_bias, both unused here
            extra = (extra or [None, None]) + [None, None, sink]
        dq, dkv = self._heads * head_dim, self._kv_heads * head_dim
        packed = (_packed_projection(op, self._graph, query, key, value) or _sliced_qkv(query, key, value, dq, dkv)
                  or _split_qkv(query, key, value, dq, dkv))
        if packed is not None:
            query, key, value = packed, None, None
        return op.GroupQueryAttention(
            query, key, value, past_key, past_value, seqlens_k, total, *extra,
            num_heads=self._heads, kv_num_heads=self._kv_heads, scale=self._scale,
            local_window_size=self._window, do_rotary=int(rotary is not None), **attrs, **capped,
            _domain="com.microsoft", _outputs=3,
        )


def _foldable_rotary(query_BSD: ir.Value, key_BSD: ir.Value, head_dim: int):
    """(q, k, cos, sin, interleaved) when query and key are RotaryEmbedding outputs GroupQueryAttention can compute
    itself (do_rotary): the same position_ids and caches, full rotary, head_dim a multiple of 16. Else None.
    The op then takes positions from seqlens_k (right padding), not from position_ids: equal for real tokens."""
    q_rot, k_rot = query_BSD.producer(), key_BSD.producer()
    if q_rot is None or k_rot is None or head_dim % 16:
        return None
    for node, out in ((q_rot, query_BSD), (k_rot, key_BSD)):
        if node.op_type != "RotaryEmbedding" or node.domain != "com.microsoft" or len(node.inputs) != 4:
            return None
        if any(a in node.attributes for a in ("rotary_embedding_dim", "num_heads", "is_packed_batching")):
            return None
        if len(out.uses()) != 1:  # the rotated tensor is read elsewhere too: keep the op
            return None
    if any(a is not b for a, b in zip(q_rot.inputs[1:], k_rot.inputs[1:])):
        return None
    interleaved = [n.attributes.get_int("interleaved", 0) for n in (q_rot, k_rot)]
    cos_cache, sin_cache = q_rot.inputs[2], q_rot.inputs[3]
    if interleaved[0] != interleaved[1] or cos_cache.shape is None or cos_cache.shape[-1] != head_dim // 2:
        return None
    return q_rot.inputs[0], k_rot.inputs[0], cos_cache, sin_cache, interleaved[0]


def _projection(value: ir.Value):
    """(x, weight, bias or None) when ``value`` = MatMul(x, W) [+ b] with constant 2-D W (and 1-D b), read once."""
    node = value.producer()
    bias = None
    if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        b = next((v for v in node.inputs if v is not None and v.const_value is not None), None)
        other = next((v for v in node.inputs if v is not None and v is not b), None)
        if b is None or other is None or b.shape is None or b.shape.rank() != 1 or len(other.uses()) != 1:
            return None
        bias, node = b, other.producer()
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(value.uses()) != 1:
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or weight.shape is None or weight.shape.rank() != 2:
        return None
    return node.inputs[0], weight, bias


def _packed_projection(op, graph: ir.Graph, query: ir.Value, key: ir.Value, value: ir.Value):
    """One MatMul [B, S, Dq + 2 Dkv] for q, k and v when all three project the same input by constant weights
    (with biases on all three or none): GroupQueryAttention's packed-QKV input. Else None."""
    parts = [_projection(v) for v in (query, key, value)]
    if any(p is None for p in parts) or len({id(p[0]) for p in parts}) != 1:
        return None
    if len({p[2] is None for p in parts}) != 1 or len({p[1].dtype for p in parts}) != 1:
        return None
    x = parts[0][0]
    base = query.name or "qkv"
    weight = add_initializer(graph, f"{base}.qkv_weight",
                          np.concatenate([np.asarray(p[1].const_value.numpy()) for p in parts], axis=1))
    packed = op.MatMul(x, weight)
    if parts[0][2] is not None:
        bias = add_initializer(graph, f"{base}.qkv_bias",
                            np.concatenate([np.asarray(p[2].const_value.numpy()) for p in parts]))
        packed = op.Add(packed, bias)
    return packed


def _sliced_qkv(query: ir.Value, key: ir.Value, value: ir.Value, dq: int, dkv: int) -> ir.Value | None:
    """The packed tensor when q, k and v are the consecutive last-axis slices [0, dq), [dq, dq + dkv),
    [dq + dkv, end) of one [B, S, dq + 2 dkv] tensor, each read only there (Phi-3 exports its fused qkv_proj so).
    Else None."""
    spans = []
    for v in (query, key, value):
        node = v.producer()
        if node is None or node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(v.uses()) != 1:
            return None
        ints = [_ints(x) if x is not None else None for x in node.inputs[1:5]]
        if len(ints) < 3 or any(i is None or len(i) != 1 for i in ints[:3]):
            return None
        starts, ends, axes = ints[0][0], ints[1][0], ints[2][0]
        steps = ints[3] if len(ints) > 3 and ints[3] is not None else [1]
        source = node.inputs[0]
        rank = source.shape.rank() if source.shape is not None else None
        if steps != [1] or rank != 3 or axes not in (2, -1):
            return None
        spans.append((source, starts, ends))
    if len({id(sp[0]) for sp in spans}) != 1:
        return None
    source = spans[0][0]
    width = source.shape[2]
    expected = [(0, dq), (dq, dq + dkv), (dq + dkv, dq + 2 * dkv)]
    got = [(sp[1], min(sp[2], dq + 2 * dkv)) for sp in spans]
    if got != expected or width != dq + 2 * dkv:
        return None
    return source


def _split_qkv(query: ir.Value, key: ir.Value, value: ir.Value, dq: int, dkv: int) -> ir.Value | None:
    """The packed tensor when q, k and v are the three outputs, in order, of one last-axis Split of a
    [B, S, dq + 2 dkv] tensor into widths dq, dkv, dkv, each read only there (GPT-2 exports its c_attn so: one Gemm,
    bias included, reshaped to [B, S, 3 hidden] and split). Else None."""
    node = query.producer()
    if node is None or node.op_type != "Split" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 3:
        return None
    if any(a is not b or len(a.uses()) != 1 for a, b in zip(node.outputs, (query, key, value))):
        return None
    source = node.inputs[0]
    if source is None or source.shape is None or source.shape.rank() != 3 or source.shape[2] != dq + 2 * dkv:
        return None
    if node.attributes.get_int("axis", 0) not in (2, -1):
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = _ints(node.inputs[1])
    elif "split" in node.attributes:  # opset < 13
        sizes = list(node.attributes.get_ints("split"))
    else:  # equal parts
        sizes = [(dq + 2 * dkv) // 3] * 3
    return source if sizes == [dq, dkv, dkv] else None


def _heads_of_leading_bs(context, value: ir.Value) -> bool:
    """True when ``value`` is [B, S, ...] and the matched Reshape reading it makes [B, S, N, H] of it (same leading
    dims): Reshape(value, [0, 0, -1]) is then the [B, S, N*H] input the fused op takes."""
    matched = {id(n) for n in context.nodes}
    shape = value.shape
    if shape is None or shape.rank() < 3:
        return False
    for user, _ in value.uses():
        if id(user) not in matched or user.op_type != "Reshape":
            continue
        out = user.outputs[0].shape
        if out is None or out.rank() != 4:
            return False
        same = all(_same_dim(a, b) for a, b in zip(shape[:2], out[:2]))
        trailing = [d for d in shape[2:] if isinstance(d, int)]
        if len(trailing) != shape.rank() - 2 or not isinstance(out[2], int) or not isinstance(out[3], int):
            return False
        return same and math.prod(trailing) == out[2] * out[3]
    return False


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def _layer_window(info: dict, present_key: ir.Value | None) -> int | None:
    """local_window_size for one block: the model's sliding window on a sliding-attention layer, -1 on a full one.
    With mixed layers (Gemma 2/3: sliding and global alternate) the layer is the N of the block's present.N.key
    output, looked up in the manifest's layer_types; None when that name does not say."""
    window = int(info.get("sliding_window") or -1)
    types = info.get("layer_types") or []
    if window < 0 or len(set(types)) < 2:
        return window
    match = re.fullmatch(r"present\.(\d+)\.key", (present_key.name or "") if present_key is not None else "")
    if match is None or int(match.group(1)) >= len(types):
        return None
    return window if types[int(match.group(1))] == "sliding_attention" else -1


def query_seqlens_supported() -> bool:
    """GroupQueryAttention's query_seqlens input is new in onnxruntime 1.32 (older ones reject a node that has it:
    INVALID_GRAPH, seen with 1.31.1); use it only where this onnxruntime's schema has it."""
    from onnxpipe.fusion.capabilities import op_inputs

    names = op_inputs("GroupQueryAttention")
    return names is not None and len(names) > 16 and names[16] == "query_seqlens"


def _escaping_value(context, keep: list) -> ir.Value | None:
    """A value inside the match (not one of its outputs) that something outside the match reads, or None.
    The rule keeps the old nodes (remove_nodes=False), so such a match would duplicate work instead of fusing it."""
    matched = {id(n) for n in context.nodes}
    keep_ids = {id(v) for v in keep if v is not None}
    graph_outputs = {id(v) for v in context.graph_or_function.outputs}
    for node in context.nodes:
        for value in node.outputs:
            if id(value) in keep_ids:
                continue
            # a Shape read is fine: it only fed the shape arithmetic of the matched Reshapes, which dies with them
            outside = [user for user, _ in value.uses() if id(user) not in matched and user.op_type != "Shape"]
            if id(value) in graph_outputs or outside:
                return value
    return None


def _variants(prefix: str, grouped: bool | None = None, scores: tuple[str, ...] = ("qk",), sinks: bool = False
              ) -> list:
    """One rule per form: 3-D or 4-D key transpose, with or without the NaN guard, each scores form; grouped or
    plain heads (None: both)."""
    groups = (True, False) if grouped is None else (grouped,)
    return [AttentionFusion.rule(f"{prefix}{'G' if g else 'P'}{form}{'3d' if t3 else '4d'}{'Nan' if nan else ''}",
                                 grouped=g, transpose_3d=t3, nan_guard=nan, scores=form, sinks=sinks)
            for g in groups for form in scores for t3 in (True, False) for nan in (True, False)]


# the exporter's sdpa form (q and k scaled)
register("mha", *_variants("MultiHeadAttention", grouped=False))
register("gqa", *_variants("GroupQueryAttention", grouped=True))
# eager attention with logit soft-capping (Gemma 2): GroupQueryAttention's softcap
register("softcap_attention", *_variants("SoftcapAttention", scores=("softcap", "softcap_scaled", "softcap_div")))
# eager attention with a sink logit per head (gpt-oss): GroupQueryAttention's head_sink
register("sink_attention", *_variants("SinkAttention", scores=("eager",), sinks=True))
ATTENTION_RULES = ("gqa", "mha", "softcap_attention", "sink_attention")


def fuse_attention(model: ir.Model, ctx: PassContext) -> dict[str, str | int]:
    from onnxpipe.fusion.rules import apply_rules

    counts = apply_rules(model, list(ATTENTION_RULES))
    fused = count_ops(model, *ATTENTION_OPS)
    why = unfused_reason(model, list(ATTENTION_RULES)) if fused < ctx.num_layers else None
    ctx.graph_notes.setdefault("padding_side", "left")
    if count_ops(model, "GroupQueryAttention"):
        # what the runtime may feed: without query_seqlens, ORT's CPU kernel takes a multi-token step after a
        # past (chunked prefill, speculative decoding) only at batch 1; the prompt and 1-token steps work at any batch
        with_seqlens = query_seqlens_supported()
        ctx.graph_notes["multi_token_steps_with_past"] = "any batch" if with_seqlens else "batch 1 only"
        ctx.graph_notes["requires_onnxruntime"] = ">=1.32" if with_seqlens else None
    if ctx.graph_notes.get("padding_side") == "right":
        # the CUDA form: the cache can be one preallocated buffer written in place (past = present), and the mask is
        # read only for its row sums and width, so the runtime may feed a fixed-width mask (CUDA graph replay)
        ctx.graph_notes["shares_buffer"] = True
        mask = next((v for v in model.graph.inputs if v.name == ATTENTION_MASK), None)
        uses = {user.op_type for user, _ in mask.uses()} if mask is not None else set()
        ctx.graph_notes["attention_mask_use"] = "row sums and width" if uses <= {"ReduceSum", "Shape"} else "values"
    report: dict[str, str | int] = {**counts, "attention blocks fused": f"{fused}/{ctx.num_layers}"}
    if why is not None:
        report["not fused because"] = why
    return report


def unfused_reason(model: ir.Model, names: list[str]) -> str:
    """Why the named rules leave a block unfused, in words: the closest match's failed check (the rule's own
    reason), else how far the closest pattern got. Matching only: a rule that would fire now is not applied."""
    from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

    from onnxpipe.fusion.rules import RULES

    tracer = MatchingTracer()
    for name in names:
        for rule in RULES[name]:
            for node in list(model.graph):
                rule.match(model, model.graph, node, check_nodes_are_removable=rule.remove_nodes, tracer=tracer)
    best = None
    for rule, matches in tracer.best_matches_map.items():
        for info in matches:
            key = (info.status == MatchStatus.CONDITION_FAILED, len(info.match_result.nodes))
            if best is None or key > best[0]:
                best = (key, rule, info)
    if best is None:
        return "no attention pattern matched any node"
    _, rule, info = best
    reason = info.match_result.reason or "no reason given"
    if info.status == MatchStatus.CONDITION_FAILED:
        return f"{reason} ({rule.name})"
    return f"the closest pattern ({rule.name}) matched {len(info.match_result.nodes)} nodes, then: {reason}"
