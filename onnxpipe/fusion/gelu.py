"""Level 2: GELU forms -> FastGelu (tanh approximation), Gelu (erf), and their bias forms (BiasGelu / FastGelu
with its bias input) where a 1-D constant bias is added right before.

GPT-2's "gelu_new" is the tanh approximation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))). The rules are
applied with commuted operands, so the order the exporter happened to write each Mul/Add in does not matter; the
constants are checked in ``check`` (a near-miss constant is a different function and must not fuse).
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from onnxpipe.fusion.rules import PassContext, apply_rules, count_ops, register

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _is_const(value: ir.Value | None, expected: float, rel: float = 1e-3) -> bool:
    # 1e-3: fp16 stores 0.044715 and sqrt(2/pi) to ~3e-4; a different function differs by far more
    got = _ir_utils.get_singleton_value(value) if value is not None else None
    return isinstance(got, (int, float)) and math.isclose(float(got), expected, rel_tol=rel, abs_tol=1e-7)


class TanhGeluFusion(pattern.RewriteRuleClassBase):
    """0.5*x * (1 + tanh(c*(x + k*x^3))), with the 0.5 on x (GPT-2 export) or on the bracket."""

    def __init__(self, name: str, half_on_x: bool):
        super().__init__(name)
        self._half_on_x = half_on_x

    def pattern(self, op, x, three, k, c, one, half):
        inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, three), k)), c)
        bracket = op.Add(op.Tanh(inner), one)
        if self._half_on_x:
            return op.Mul(op.Mul(x, half), bracket)
        return op.Mul(x, op.Mul(bracket, half))

    def check(self, context, x, three, k, c, one, half, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for name, value, expected in (("exponent", three, 3.0), ("cubic coefficient", k, 0.044715),
                                      ("sqrt(2/pi)", c, _SQRT_2_OVER_PI), ("one", one, 1.0), ("half", half, 0.5)):
            if not _is_const(value, expected):
                return result.fail(f"{name} is not the constant {expected:g}", value)
        return result

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


class ErfGeluFusion(pattern.RewriteRuleClassBase):
    """0.5*x * (1 + erf(x / sqrt(2)))."""

    def pattern(self, op, x, sqrt2, one, half):
        bracket = op.Add(op.Erf(op.Div(x, sqrt2)), one)
        return op.Mul(op.Mul(x, bracket), half)

    def check(self, context, x, sqrt2, one, half, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for name, value, expected in (("sqrt(2)", sqrt2, math.sqrt(2.0)), ("one", one, 1.0), ("half", half, 0.5)):
            if not _is_const(value, expected):
                return result.fail(f"{name} is not the constant {expected:g}", value)
        return result

    def rewrite(self, op, x, **_):
        return op.Gelu(x, _domain="com.microsoft")


class BiasGeluFusion(pattern.RewriteRuleClassBase):
    """Gelu(x + b) -> BiasGelu(x, b) and FastGelu(x + b) -> FastGelu(x, b), b a 1-D constant of x's last dim."""

    def __init__(self, name: str, fast: bool):
        super().__init__(name)
        self._fast = fast

    def pattern(self, op, x, bias):
        summed = op.Add(x, bias)
        if self._fast:
            return op.FastGelu(summed, _domain="com.microsoft")
        return op.Gelu(summed, _domain="com.microsoft")

    def check(self, context, x, bias, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if bias.const_value is None or bias.shape is None or bias.shape.rank() != 1:
            return result.fail("bias is not a 1-D constant", bias)
        if x.shape is None or x.shape.rank() < 1 or x.shape[-1] != bias.shape[0]:
            return result.fail("bias length differs from the input's last dimension", x)
        return result

    def rewrite(self, op, x, bias, **_):
        if self._fast:
            return op.FastGelu(x, bias, _domain="com.microsoft")
        return op.BiasGelu(x, bias, _domain="com.microsoft")


register("fast_gelu", TanhGeluFusion.rule("FastGeluHalfOnX", half_on_x=True),
         TanhGeluFusion.rule("FastGeluHalfOnBracket", half_on_x=False), commute=True)
register("gelu_erf", ErfGeluFusion.rule("GeluErf"), commute=True)
register("bias_gelu", BiasGeluFusion.rule("BiasFastGelu", fast=True), BiasGeluFusion.rule("BiasGelu", fast=False), commute=True)

GELU_OPS = ("FastGelu", "Gelu", "BiasGelu")


def fuse_gelu(model: ir.Model, ctx: PassContext) -> dict[str, str | int]:
    counts = apply_rules(model, ["fast_gelu", "gelu_erf"])
    counts.update(apply_rules(model, ["bias_gelu"]))
    report: dict[str, str | int] = dict(counts)
    if ctx.model_info.get("mlp") == "gelu":
        report["gelu fused"] = f"{count_ops(model, *GELU_OPS)}/{ctx.num_layers}"
    return report
