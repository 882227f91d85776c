"""Level 2: mixture-of-experts blocks -> ONNX Runtime's MoE (com.microsoft), the routing and every expert in one op.

The export traces transformers' "batched_mm" experts (export/archs.py): router logits [T, E]; top-k routing; each
token repeated k times, its k experts' weights gathered by index (GatherND) and applied by batched MatMuls; the k
outputs scaled by the routing weights and summed. Two forms come out of it:

- ``moe_swiglu`` (Mixtral, Qwen3-MoE): softmax over the E logits, top-k, renormalized to sum 1 (Mixtral; Qwen3-MoE
  with ``norm_topk_prob``) or not; gate_up weights [E, 2I, H] with the gate in the first half; SiLU(gate) * up.
- ``moe_clamped_swiglu`` (gpt-oss): top-k of the logits, softmax over those k; gate_up [E, H, 2I] with gate and up
  interleaved, biases on both projections; gate clamped above at ``limit``, up to [-limit, limit], and
  gate * sigmoid(alpha * gate) * (up + beta).

MoE computes softmax over all E logits, top-k, then (``normalize_routing_weights``) divides by the top-k sum: the
renormalized form exactly, and the top-k-then-softmax form too (softmax over the k largest logits is that same
ratio). Its SwiGLU is gate * sigmoid(alpha * gate) * (up + beta) with an optional clamp (``swiglu_limit``): alpha 1,
beta 0 and no limit is SiLU(gate) * up. The CPU kernel takes only the interleaved gate/up layout
(``swiglu_fusion=1``) and no FC3, so both forms are written that way: the halves are interleaved, gpt-oss's
[in, out] weights transposed to MoE's [out, in]. CUDA takes the same form.

fp16/bf16 exports route and sum in fp32: each model type's Casts sit elsewhere in the block, and each placement is a
rule variant (``casts``) whose check reads every Cast's target type; MoE then takes the half-precision logits.

A rule's ``check`` reads only the matched values; nothing is kept between matches.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import _ir_utils, pattern

from onnxpipe.fusion.rules import COMMUTE, RULES, PassContext, add_initializer, apply_rules, count_ops, register

ROUTINGS = ("softmax_topk", "softmax_topk_norm", "topk_softmax")


def _ints(value: ir.Value | None) -> list[int] | None:
    array = _ir_utils.get_numpy_value(value) if value is not None else None
    if array is None or array.dtype.kind not in "iu" or array.ndim > 1:
        return None
    return [int(v) for v in np.atleast_1d(array)]


def _scalar(value: ir.Value | None) -> float | None:
    got = _ir_utils.get_singleton_value(value) if value is not None else None
    return float(got) if isinstance(got, (int, float)) else None


def _constant_weight(value: ir.Value, rank: int) -> bool:
    return (value.const_value is not None and not value.is_graph_input() and value.shape is not None
            and value.shape.rank() == rank and all(isinstance(d, int) for d in value.shape))


def _dims(value: ir.Value) -> tuple[int, ...]:
    """The static shape of a value ``_constant_weight`` accepted."""
    return tuple(int(d) for d in value.shape or ())  # type: ignore[arg-type]


def _axis_is_last(node: ir.Node, rank: int, default: int = -1) -> bool:
    axis = node.attributes.get_int("axis", default)
    return axis in (-1, rank - 1)


# Where an fp16/bf16 export casts inside the block (transformers routes and sums in fp32): the values cast up to
# fp32 and those cast back to the model's dtype
UP_CASTS = ("logits", "probs", "down", "grouped")
DOWN_CASTS = ("weights", "out")


class ExpertsToMoE(pattern.RewriteRuleClassBase):
    """One expert block of the batched_mm form -> MoE. ``routing``: how the k routing weights come from the
    logits (ROUTINGS); ``clamped``: gpt-oss's form (biases, interleaved [in, out] weights, clamped SwiGLU) rather
    than the gate|up halves with SiLU; ``casts``: the values an fp16/bf16 export casts (UP_CASTS, DOWN_CASTS);
    ``gate_min``: the gate's upper clamp written as Min (gpt-oss's fp16 export) rather than Clip."""

    def __init__(self, name: str, routing: str, clamped: bool, casts: tuple[str, ...] = (), gate_min: bool = False):
        super().__init__(name)
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}")
        unknown = set(casts) - set(UP_CASTS + DOWN_CASTS)
        if unknown:
            raise ValueError(f"unknown cast positions {sorted(unknown)}")
        self._routing = routing
        self._clamped = clamped
        self._casts = tuple(casts)
        self._gate_min = gate_min

    def _cast(self, op, value, where: str):
        if where not in self._casts:
            return value
        return op.Cast(value, _allow_other_attributes=True, _outputs=[f"cast_{where}"])

    # ---- pattern ----
    def pattern(self, op, x, logits, k, repeat, token_shape, clip_lo, clip_hi, w1, w2, out_shape, b1, b2,
                gate_start, up_start, slice_end, slice_axis, slice_step, limit, neg_limit, up_limit, alpha, beta):
        if self._routing == "topk_softmax":
            top, indices = op.TopK(self._cast(op, logits, "logits"), k, _allow_other_attributes=True,
                                   _outputs=["top", "indices"])
            weights = op.Softmax(top, _allow_other_attributes=True, _outputs=["routing"])
        else:
            probs = op.Softmax(self._cast(op, logits, "logits"), _allow_other_attributes=True, _outputs=["probs"])
            top, indices = op.TopK(self._cast(op, probs, "probs"), k, _allow_other_attributes=True,
                                   _outputs=["top", "indices"])
            weights = top
            if self._routing == "softmax_topk_norm":
                total = op.ReduceSum(top, [-1], _allow_other_attributes=True, _outputs=["top_sum"])
                weights = op.Div(top, total)
        weights = self._cast(op, weights, "weights")
        flat = op.Reshape(indices, [-1], _allow_other_attributes=True)
        index = op.Unsqueeze(op.Clip(flat, clip_lo, clip_hi), [-1])
        tokens = op.Reshape(op.Expand(op.Unsqueeze(x, [1]), repeat), token_shape, _allow_other_attributes=True)
        if self._clamped:
            gate_up = self._row_linear(op, tokens, op.GatherND(w1, index, batch_dims=0),
                                       op.GatherND(b1, index, batch_dims=0))
            gate = op.Slice(gate_up, gate_start, slice_end, slice_axis, slice_step, _outputs=["gate"])
            up = op.Slice(gate_up, up_start, slice_end, slice_axis, slice_step, _outputs=["up"])
            gate = op.Min(gate, limit) if self._gate_min else op.Clip(gate, None, limit)
            up = op.Clip(up, neg_limit, up_limit)
            hidden = op.Mul(op.Add(up, beta), op.Mul(gate, op.Sigmoid(op.Mul(gate, alpha))))
            down = self._row_linear(op, hidden, op.GatherND(w2, index, batch_dims=0),
                                    op.GatherND(b2, index, batch_dims=0))
        else:
            gate_up = op.Squeeze(op.MatMul(op.GatherND(w1, index, batch_dims=0), op.Unsqueeze(tokens, [-1])), [-1])
            gate, up = op.Split(gate_up, _allow_other_attributes=True, _allow_other_inputs=True,
                                _outputs=["gate", "up"])
            hidden = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
            down = op.Squeeze(op.MatMul(op.GatherND(w2, index, batch_dims=0), op.Unsqueeze(hidden, [-1])), [-1])
        column = op.Unsqueeze(op.Reshape(weights, [-1], _allow_other_attributes=True), [-1])
        scaled = op.Mul(self._cast(op, down, "down"), column)
        grouped = self._cast(op, op.Reshape(scaled, out_shape, _allow_other_attributes=True), "grouped")
        summed = op.ReduceSum(grouped, [1], keepdims=0, _allow_other_attributes=True)
        return self._cast(op, summed, "out")

    @staticmethod
    def _row_linear(op, rows, weight, bias):
        """[N, in] rows @ gathered [N, in, out] weights + gathered [N, out] biases, as the export writes it (the
        trailing Unsqueeze/Squeeze pair included)."""
        product = op.Squeeze(op.MatMul(op.Unsqueeze(rows, [1]), weight), [1])
        return op.Squeeze(op.Unsqueeze(op.Add(product, bias), [1]), [1])

    # ---- check ----
    def check(self, context, x, logits, k, repeat, token_shape, clip_lo, clip_hi, w1, w2, out_shape, **values):
        result = pattern.MatchResult()
        ks = _ints(k)
        if ks is None or len(ks) != 1 or ks[0] < 1:
            return result.fail("top-k's k is not a constant", k)
        top_k = ks[0]
        for name, value, rank in (("fc1", w1, 3), ("fc2", w2, 3)):
            if not _constant_weight(value, rank):
                return result.fail(f"the {name} expert weights are not a constant [E, ., .] tensor", value)
        experts, hidden = _dims(w1)[0], self._hidden_size(w1)
        if x.shape is None or x.shape.rank() != 2 or x.shape[-1] != hidden:
            return result.fail(f"the tokens are not a 2-D [T, {hidden}] tensor", x)
        if logits.shape is None or logits.shape.rank() != 2 or logits.shape[-1] != experts:
            return result.fail(f"the router logits are not [T, {experts}] for {experts} experts", logits)
        if x.dtype != logits.dtype or x.dtype != w1.dtype:
            return result.fail("tokens, router logits and expert weights differ in dtype", logits)
        for where in self._casts:
            cast = values[f"cast_{where}"]
            want = ir.DataType.FLOAT if where in UP_CASTS else x.dtype
            if cast.producer().attributes.get_int("to", 0) != int(want):
                return result.fail(f"the {where} cast is not to {want.name}", cast)
        if top_k > experts:
            return result.fail(f"top-{top_k} of {experts} experts", k)
        failure = self._check_routing(values, top_k)
        if failure:
            return result.fail(*failure)
        for name, value, want in (("token repeat", repeat, [1, top_k, 1]), ("token reshape", token_shape, [-1, hidden]),
                                  ("output reshape", out_shape, [-1, top_k, hidden])):
            if _ints(value) != want:
                return result.fail(f"the {name} is {_ints(value)}, not {want} for top-{top_k}", value)
        if _scalar(clip_lo) != 0 or _scalar(clip_hi) != experts - 1:
            return result.fail(f"expert indices are not clamped to [0, {experts - 1}]", clip_hi)
        failure = self._check_experts(w1, w2, experts, hidden, values)
        if failure:
            return result.fail(*failure)
        return result

    def _hidden_size(self, w1: ir.Value) -> int:
        return _dims(w1)[1 if self._clamped else 2]

    def _check_routing(self, values: dict[str, Any], top_k: int) -> tuple[str, Any] | None:
        top, indices = values["top"], values["indices"]
        topk = top.producer()
        if topk.attributes.get_int("largest", 1) != 1:
            return "top-k takes the smallest values", top
        if not _axis_is_last(topk, 2):
            return "top-k is not over the experts axis", top
        if self._routing == "topk_softmax":
            if not _axis_is_last(values["routing"].producer(), 2):
                return "the softmax is not over the top-k axis", values["routing"]
        else:
            if not _axis_is_last(values["probs"].producer(), 2):
                return "the softmax is not over the experts axis", values["probs"]
            if self._routing == "softmax_topk_norm":
                total = values["top_sum"].producer()
                if total.attributes.get_int("keepdims", 1) != 1:
                    return "the top-k sum drops its axis", values["top_sum"]
        del indices
        return None

    def _check_experts(self, w1: ir.Value, w2: ir.Value, experts: int, hidden: int, values: dict[str, Any]
                       ) -> tuple[str, Any] | None:
        if self._clamped:
            inter2 = _dims(w1)[2]
            if _dims(w2) != (experts, inter2 // 2, hidden) or inter2 % 2:
                return f"fc2 weights {list(_dims(w2))} do not follow fc1 {list(_dims(w1))}", w2
            for name, bias, width in (("fc1", values["b1"], inter2), ("fc2", values["b2"], hidden)):
                if not _constant_weight(bias, 2) or _dims(bias) != (experts, width):
                    return f"the {name} bias is not a constant [{experts}, {width}]", bias
            if (_ints(values["gate_start"]), _ints(values["up_start"])) != ([0], [1]):
                return "gate and up are not interleaved gate-first", values["gate"]
            if _ints(values["slice_step"]) != [2] or _ints(values["slice_axis"]) not in ([1], [-1]):
                return "gate and up are not every other column", values["gate"]
            end = _ints(values["slice_end"])
            if end is None or end[0] < inter2:
                return "the gate/up slices stop short of the last column", values["gate"]
            limit, low, high = (_scalar(values[n]) for n in ("limit", "neg_limit", "up_limit"))
            if limit is None or not limit > 0 or low != -limit or high != limit:
                return f"gate clamped at {limit}, up to [{low}, {high}]: not one symmetric limit", values["limit"]
            alpha, beta = _scalar(values["alpha"]), _scalar(values["beta"])
            if alpha is None or beta is None or not (math.isfinite(alpha) and math.isfinite(beta)):
                return "the SwiGLU alpha or beta is not a constant", values["alpha"]
            return None
        inter2 = _dims(w1)[1]
        if _dims(w2) != (experts, hidden, inter2 // 2) or inter2 % 2:
            return f"fc2 weights {list(_dims(w2))} do not follow fc1 {list(_dims(w1))}", w2
        gate, up = values["gate"], values["up"]
        split = gate.producer()
        if not _axis_is_last(split, 2, default=0):
            return "gate and up are not split along the features", gate
        widths = [None if v.shape is None else v.shape[-1] for v in (gate, up)]
        if widths != [inter2 // 2, inter2 // 2]:
            return f"gate and up are {widths} wide, not the two halves of {inter2}", gate
        return None

    # ---- rewrite ----
    def rewrite(self, op, x, logits, k, w1, w2, b1=None, b2=None, **values):
        graph = w1.graph
        top_k = (_ints(k) or [0])[0]
        w1_array, w2_array = w1.const_value.numpy(), w2.const_value.numpy()
        attrs: dict[str, Any] = dict(k=top_k, activation_type="swiglu", swiglu_fusion=1,
                                     normalize_routing_weights=int(self._routing != "softmax_topk"))
        if self._clamped:
            fc1 = np.transpose(w1_array, (0, 2, 1))  # [E, H, 2I] -> [E, 2I, H], gate/up already interleaved
            fc2 = np.transpose(w2_array, (0, 2, 1))  # [E, I, H] -> [E, H, I]
            attrs.update(activation_alpha=_scalar(values["alpha"]), activation_beta=_scalar(values["beta"]),
                         swiglu_limit=_scalar(values["limit"]))
        else:
            experts, inter2, hidden = w1_array.shape
            half = inter2 // 2  # [gate | up] rows -> gate0, up0, gate1, up1, ...
            fc1 = np.stack([w1_array[:, :half], w1_array[:, half:]], axis=2).reshape(experts, inter2, hidden)
            fc2 = w2_array
            attrs.update(activation_alpha=1.0, activation_beta=0.0)
        inputs = [x, logits, _initializer(graph, f"{w1.name}.moe_fc1", fc1, w1.dtype),
                  b1, _initializer(graph, f"{w2.name}.moe_fc2", fc2, w2.dtype), b2]
        out = op.MoE(*inputs, _domain="com.microsoft", **attrs)
        out.shape, out.dtype = x.shape, x.dtype  # shape inference does not know ORT's op
        return out


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    """The rearranged weights as an initializer; an earlier block that read the same weights made it already."""
    if name in graph.initializers:
        return graph.initializers[name]
    value = add_initializer(graph, name, np.ascontiguousarray(array))
    if value.dtype != dtype:
        raise ValueError(f"{name}: rearranged weights changed dtype ({value.dtype} != {dtype})")
    return value


# fp16/bf16 exports: Mixtral routes in fp32 from cast logits and sums cast expert outputs; Qwen3-MoE casts the
# probabilities up and the routing weights back, then sums the grouped products in fp32; gpt-oss routes in fp16 and
# sums in fp32, its gate clamp a Min
MIXTRAL_HALF = ("logits", "down", "out")
QWEN3_HALF = ("probs", "weights", "grouped", "out")
GPT_OSS_HALF = ("grouped", "out")
register("moe_swiglu",
         ExpertsToMoE.rule("MoESwiGLURenormalized", routing="softmax_topk_norm", clamped=False),
         ExpertsToMoE.rule("MoESwiGLU", routing="softmax_topk", clamped=False),
         ExpertsToMoE.rule("MoESwiGLURenormalizedHalfLogits", routing="softmax_topk_norm", clamped=False,
                           casts=MIXTRAL_HALF),
         ExpertsToMoE.rule("MoESwiGLURenormalizedHalfProbs", routing="softmax_topk_norm", clamped=False,
                           casts=QWEN3_HALF),
         ExpertsToMoE.rule("MoESwiGLUHalfProbs", routing="softmax_topk", clamped=False, casts=QWEN3_HALF),
         commute=True)
register("moe_clamped_swiglu",
         ExpertsToMoE.rule("MoEClampedSwiGLU", routing="topk_softmax", clamped=True),
         ExpertsToMoE.rule("MoEClampedSwiGLUHalf", routing="topk_softmax", clamped=True, casts=GPT_OSS_HALF,
                           gate_min=True),
         commute=True)

RULE_NAMES = ("moe_swiglu", "moe_clamped_swiglu")


def expert_blocks(model: ir.Model) -> int:
    """Expert blocks in the graph, fused or not: MoE ops plus the top-k routings left (a decoder's graph has no
    other TopK)."""
    return count_ops(model, "MoE", "TopK")


def fuse_experts(model: ir.Model, ctx: PassContext) -> dict[str, str | int]:
    if not ctx.model_info.get("experts"):
        return {}
    common_passes.AddDefaultAttributesPass()(model)
    total = expert_blocks(model)
    counts = apply_rules(model, list(RULE_NAMES))
    fused = count_ops(model, "MoE")
    report: dict[str, str | int] = {**counts, "experts fused": f"{fused}/{total}"}
    if fused < total:
        reason = why_unfused(model)
        if ctx.dtype != "fp32":  # the Casts of an fp16/bf16 block are one more way not to match: say which graph
            reason = f"{ctx.dtype} graph: {reason}"
        report["experts left"] = reason
    return report


def why_unfused(model: ir.Model) -> str:
    """Why the rules did not fire on the blocks left: the failure of the match that got furthest (no change is made
    to the model)."""
    from onnxscript.rewriter import _basics

    tracer = _basics.MatchingTracer()
    for name in RULE_NAMES:
        pattern.RewriteRuleSet(RULES[name], commute=name in COMMUTE).apply_to_model(model, tracer=tracer)
    best = max((m for matches in tracer.best_matches_map.values() for m in matches), key=lambda m: m.score(),
               default=None)
    if best is None:
        return "no expert block of a form the MoE rules know (batched_mm experts)"
    return best.match_result.reason or "no expert block of a form the MoE rules know (batched_mm experts)"
