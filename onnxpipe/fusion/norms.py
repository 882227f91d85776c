"""Level 2: RMSNorm -> SimplifiedLayerNormalization, and residual Add + norm -> the Skip forms.

The patterns are onnxscript's ort_fusions rules (RMSNorm as Pow/ReduceMean(-1)/Add(eps)/Sqrt/Reciprocal/Mul/Mul, the
Skip forms with and without a bias Add); the exporter already emits the ONNX LayerNormalization op for GPT-2's
LayerNorm, so no LayerNorm decomposition rule is needed. Counting: every decoder layer has 2 norms plus the final
one (Qwen3 adds a q and a k norm per layer), and every norm but the first sits after a residual Add.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import rms_normalization, skip_normalization

from onnxpipe.fusion.rules import PassContext, add_initializer, apply_rules, count_ops, register

NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization")
SKIP_OPS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")

class NormBeforeTranspose(pattern.RewriteRuleClassBase):
    """SimplifiedLayerNormalization over the last axis of Transpose(x) -> Transpose(SimplifiedLayerNormalization(x))
    when the transpose keeps the last axis last: the norm works on each last-axis vector alone, so the two commute.
    Gemma 3 applies its q/k-norm after the head transpose ([B, N, S, H]); moved before it, the block has the form
    the rotary and attention rules match (Qwen3's: norm on [B, S, N, H], then the transpose)."""

    def pattern(self, op, x, scale):
        return op.SimplifiedLayerNormalization(op.Transpose(x, _allow_other_attributes=True, _outputs=["moved"]),
                                               scale, _allow_other_attributes=True, _outputs=["normed"])

    def check(self, context, x, scale, moved, normed, **_):
        result = pattern.MatchResult()
        perm = list(moved.producer().attributes.get_ints("perm", []))
        norm = normed.producer()
        if not perm or perm[-1] != len(perm) - 1:
            return result.fail("the transpose moves the last axis", moved)
        if norm.attributes.get_int("axis", -1) not in (-1, len(perm) - 1):
            return result.fail("the norm is not over the last axis", normed)
        if len(moved.uses()) != 1:
            return result.fail("the transposed tensor is read elsewhere", moved)
        if scale.shape is None or scale.shape.rank() != 1:
            return result.fail("the scale is not 1-D", scale)
        return result

    def rewrite(self, op, x, scale, moved, normed, **_):
        norm = normed.producer()
        attrs = {k: v for k, v in norm.attributes.items() if k != "axis"}
        normed_first = op.SimplifiedLayerNormalization(x, scale, axis=-1, **attrs)
        # shape inference does not know ORT's op; its output has the scale's type (V), which is not x's in a
        # mixed-precision norm (fp16 x, fp32 scale: the fp16 export's norms compute in fp32)
        normed_first.shape, normed_first.dtype = x.shape, normed.dtype
        return op.Transpose(normed_first, perm=list(moved.producer().attributes.get_ints("perm")))


class NormCastBack(pattern.RewriteRuleClassBase):
    """Cast(SimplifiedLayerNormalization(x, constant scale), to=x's type) with a scale of another float type ->
    SimplifiedLayerNormalization(x, the scale cast to x's type). The fp16 export computes each RMSNorm in fp32 with
    an fp32 weight (Gemma's 1 + w) and casts the result back: fused, the norm reads fp16 x with an fp32 scale and
    returns fp32 (ORT's op returns the scale's type), and the Skip forms, whose gamma must have the input's type,
    would not type-check. With the scale in x's type the norm returns x's type directly; ORT's op still normalizes
    in fp32 (stash_type 1), so only the scale's own rounding to fp16 is new."""

    def pattern(self, op, x, scale):
        normed = op.SimplifiedLayerNormalization(x, scale, _allow_other_attributes=True, _outputs=["normed"])
        return op.Cast(normed, _allow_other_attributes=True, _outputs=["cast"])

    def check(self, context, x, scale, normed, cast, **_):
        result = pattern.MatchResult()
        floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
        if x.dtype not in floats or scale.dtype not in floats or x.dtype == scale.dtype:
            return result.fail(f"the scale ({scale.dtype}) and x ({x.dtype}) are not two float types", scale)
        if cast.dtype != x.dtype:
            return result.fail(f"the norm is cast to {cast.dtype}, not back to x's {x.dtype}", cast)
        if scale.const_value is None:
            return result.fail("the scale is not a constant", scale)
        if len(normed.uses()) != 1 or any(v.uses() for v in normed.producer().outputs[1:]):
            return result.fail("the norm's fp32 result is read elsewhere", normed)
        graph = context.graph_or_function
        name = f"{scale.name}_as_{x.dtype.name.lower()}"  # norms sharing one scale share its cast copy
        self._scale = graph.initializers.get(name) or add_initializer(
            graph, name, scale.const_value.numpy().astype(x.dtype.numpy()))
        return result

    def rewrite(self, op, x, normed, cast, **_):
        attrs = dict(normed.producer().attributes.items())
        out = op.SimplifiedLayerNormalization(x, self._scale, **attrs)
        out.shape, out.dtype = cast.shape, x.dtype
        return out


register("rms_norm", *rms_normalization.rms_normalization_rules)
register("norm_cast_back", NormCastBack.rule("NormCastBack"))
register("norm_before_transpose", NormBeforeTranspose.rule("NormBeforeTranspose"))
register("skip_rms_norm", *skip_normalization.skip_rms_normalization_ruleset.rules)
register("skip_layer_norm", *skip_normalization.skip_layer_normalization_ruleset.rules)


def expected_norms(ctx: PassContext) -> int:
    # the manifest counts a layer's norms (Gemma 2: 4, Phi: 1); older manifests do not: 2 then
    per_layer = int(ctx.model_info.get("norms_per_layer") or 2) + (2 if ctx.model_info.get("qk_norm") else 0)
    return per_layer * ctx.num_layers + 1


def fuse_norms(model: ir.Model, ctx: PassContext) -> dict[str, str | int]:
    # onnxscript's RMSNorm pattern spells out ReduceMean's keepdims/noop_with_empty_axes; a graph that leaves them
    # at their defaults would not match, so write the defaults out first.
    common_passes.AddDefaultAttributesPass()(model)
    counts = apply_rules(model, ["rms_norm", "norm_cast_back"])
    counts.update(apply_rules(model, ["norm_before_transpose"]))
    counts.update(apply_rules(model, ["skip_rms_norm", "skip_layer_norm"]))
    norms, skips = count_ops(model, *NORM_OPS), count_ops(model, *SKIP_OPS)
    # The first layer's norm reads the embedding directly (GPT-2: the wte + wpe sum, which fuses too).
    skip_expected = 2 * ctx.num_layers + (1 if ctx.model_info.get("positions") == "learned" else 0)
    return {**counts, "norms fused": f"{norms}/{expected_norms(ctx)}", "skip forms": f"{skips}/{skip_expected}"}
