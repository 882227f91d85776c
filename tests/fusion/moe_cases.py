"""The smallest expert blocks the MoE rules must fuse, and their near-misses, in ONNX text syntax (the form
transformers' batched_mm experts export to: see onnxpipe/fusion/moe.py). rule_cases.CASES takes these in."""

from __future__ import annotations

import numpy as np

HEADER = '<ir_version: 9, opset_import: ["" : 18, "com.microsoft" : 1]>\n'
TOKENS, HIDDEN, INTER, EXPERTS = 5, 8, 6, 4
INFO = {"num_layers": 1, "experts": {"num": EXPERTS, "top_k": 2}}


def _floats(shape: tuple[int, ...], seed: int, scale: float = 0.4) -> str:
    values = np.random.default_rng(seed).standard_normal(shape) * scale
    return f"float[{','.join(map(str, shape))}] {{{','.join(f'{v:.6f}' for v in values.ravel())}}}"


def _constant(name: str, shape: tuple[int, ...], seed: int, as_input: bool) -> tuple[str, str]:
    """(graph-input declaration, Constant node): one of the two is empty."""
    if as_input:
        return f", float[{','.join(map(str, shape))}] {name}", ""
    return "", f"  {name} = Constant <value = {_floats(shape, seed)}> ()\n"


def _cast(casts: dict[str, int], where: str, value: str) -> tuple[str, str]:
    """(the Cast node's line or "", the name to read): a Cast of ``value`` where ``casts`` puts one."""
    if where not in casts:
        return "", value
    return f"  {value}_c = Cast <to = {casts[where]}> ({value})\n", f"{value}_c"


def _routing(routing: str, k: int, largest: int, softmax_axis: int, divisor: str, probs_out: bool,
             casts: dict[str, int]) -> str:
    topk = f"TopK <axis = -1, largest = {largest}, sorted = 1>"
    text, logits = _cast(casts, "logits", "logits")
    if routing == "topk_softmax":
        return text + f"  top, idx = {topk} ({logits}, k)\n  rw = Softmax <axis = {softmax_axis}> (top)\n"
    if routing == "topk_raw":  # the near-miss: the top-k logits used as weights, no softmax
        return text + f"  top, idx = {topk} ({logits}, k)\n  rw = Identity (top)\n"
    probs = "probs_out" if probs_out else "probs"
    text += f"  {probs} = Softmax <axis = {softmax_axis}> ({logits})\n"
    cast, probs = _cast(casts, "probs", probs)
    text += cast + f"  top, idx = {topk} ({probs}, k)\n"
    if routing == "softmax_topk_norm" and divisor == "sum":
        text += "  tsum = ReduceSum <keepdims = 1> (top, m1)\n  rw = Div (top, tsum)\n"
    elif routing == "softmax_topk_norm":
        text += "  c = Constant <value = float {0.9}> ()\n  rw = Div (top, c)\n"
    return text


def experts_block(clamped: bool = False, routing: str | None = None, k: int = 2, repeat: int | None = None,
                  largest: int = 1, softmax_axis: int = -1, divisor: str = "sum", clip_hi: int = EXPERTS - 1,
                  weights_input: bool = False, bias_input: bool = False, probs_out: bool = False,
                  scaled_sigmoid: bool = False, up_clip: tuple[float, float] = (-0.5, 0.5),
                  gate_start: int = 0, casts: dict[str, int] | None = None, gate_min: bool = False) -> str:
    """One expert block: Mixtral's form (gate|up halves, SiLU; ``routing`` softmax_topk_norm by default) or, with
    ``clamped``, gpt-oss's (biases, interleaved [in, out] weights, SwiGLU clamped at 0.5 so the clamp bites on
    these small values; ``routing`` topk_softmax). ``casts``: {position: ONNX dtype} of the Casts an fp16 export
    puts in the block (moe.UP_CASTS / DOWN_CASTS; to FLOAT here they change nothing); ``gate_min``: the gate clamp
    as Min. The keyword arguments make the near-misses."""
    casts = casts or {}
    routing = routing or ("topk_softmax" if clamped else "softmax_topk_norm")
    repeat = k if repeat is None else repeat
    two_i = 2 * INTER
    if clamped:
        shapes = {"w1": (EXPERTS, HIDDEN, two_i), "w2": (EXPERTS, INTER, HIDDEN)}
    else:
        shapes = {"w1": (EXPERTS, two_i, HIDDEN), "w2": (EXPERTS, HIDDEN, INTER)}
    inputs, consts = "", ""
    for i, (name, shape) in enumerate(shapes.items()):
        decl, node = _constant(name, shape, i + 1, weights_input)
        inputs, consts = inputs + decl, consts + node
    if clamped:
        for i, (name, shape) in enumerate({"b1": (EXPERTS, two_i), "b2": (EXPERTS, HIDDEN)}.items()):
            decl, node = _constant(name, shape, i + 3, bias_input)
            inputs, consts = inputs + decl, consts + node
    outputs = f", float[{TOKENS},{EXPERTS}] probs_out" if probs_out else ""
    rw = "top" if routing == "softmax_topk" else "rw"
    weights_cast, rw = _cast(casts, "weights", rw)
    down_cast, down = _cast(casts, "down", "d")
    grouped_cast, grouped = _cast(casts, "grouped", "so")
    out_type = "float16" if casts.get("out") == 10 else "float"
    out = f"  y = Cast <to = {casts['out']}> (ys)\n" if "out" in casts else "  y = Identity (ys)\n"
    if clamped:
        experts = f"""
  u1 = Unsqueeze (xr, one)
  g1 = GatherND <batch_dims = 0> (w1, ii)
  p1 = MatMul (u1, g1)
  s1 = Squeeze (p1, one)
  gb1 = GatherND <batch_dims = 0> (b1, ii)
  a1 = Add (s1, gb1)
  q1 = Unsqueeze (a1, one)
  gu = Squeeze (q1, one)
  big = Constant <value = int64[1] {{9223372036854775807}}> ()
  two = Constant <value = int64[1] {{2}}> ()
  gs = Constant <value = int64[1] {{{gate_start}}}> ()
  us = Constant <value = int64[1] {{{1 - gate_start}}}> ()
  gate = Slice (gu, gs, big, one, two)
  up = Slice (gu, us, big, one, two)
  lim = Constant <value = float {{0.5}}> ()
  ulo = Constant <value = float {{{up_clip[0]}}}> ()
  uhi = Constant <value = float {{{up_clip[1]}}}> ()
  {"gc = Min (gate, lim)" if gate_min else "gc = Clip (gate, , lim)"}
  uc = Clip (up, ulo, uhi)
  alpha = Constant <value = float {{1.702}}> ()
  ga = Mul (gc, alpha)
  sg = Sigmoid (ga)
  gl = Mul (gc, sg)
  beta = Constant <value = float {{1.0}}> ()
  ub = Add (uc, beta)
  h = Mul (ub, gl)
  u2 = Unsqueeze (h, one)
  g2 = GatherND <batch_dims = 0> (w2, ii)
  p2 = MatMul (u2, g2)
  s2 = Squeeze (p2, one)
  gb2 = GatherND <batch_dims = 0> (b2, ii)
  a2 = Add (s2, gb2)
  q2 = Unsqueeze (a2, one)
  d = Squeeze (q2, one)
"""
    else:
        sigmoid_in = "gs2" if scaled_sigmoid else "gate"
        scaled = "  sc2 = Constant <value = float {1.702}> ()\n  gs2 = Mul (gate, sc2)\n" if scaled_sigmoid else ""
        experts = f"""
  g1 = GatherND <batch_dims = 0> (w1, ii)
  xc = Unsqueeze (xr, m1)
  p1 = MatMul (g1, xc)
  gu = Squeeze (p1, m1)
  gate, up = Split <axis = 1, num_outputs = 2> (gu)
{scaled}  sg = Sigmoid ({sigmoid_in})
  si = Mul (gate, sg)
  h = Mul (si, up)
  g2 = GatherND <batch_dims = 0> (w2, ii)
  hc = Unsqueeze (h, m1)
  p2 = MatMul (g2, hc)
  d = Squeeze (p2, m1)
"""
    return HEADER + f"""
g (float[{TOKENS},{HIDDEN}] x, float[{TOKENS},{EXPERTS}] logits{inputs}) => ({out_type}[{TOKENS},{HIDDEN}] y{outputs}) {{
{consts}  k = Constant <value = int64[1] {{{k}}}> ()
  m1 = Constant <value = int64[1] {{-1}}> ()
  one = Constant <value = int64[1] {{1}}> ()
{_routing(routing, k, largest, softmax_axis, divisor, probs_out, casts)}{weights_cast}
  xu = Unsqueeze (x, one)
  rep = Constant <value = int64[3] {{1, {repeat}, 1}}> ()
  xe = Expand (xu, rep)
  tshape = Constant <value = int64[2] {{-1, {HIDDEN}}}> ()
  xr = Reshape (xe, tshape)
  fi = Reshape (idx, m1)
  lo = Constant <value = int64 {{0}}> ()
  hi = Constant <value = int64 {{{clip_hi}}}> ()
  fc = Clip (fi, lo, hi)
  ii = Unsqueeze (fc, m1)
{experts}{down_cast}
  rf = Reshape ({rw}, m1)
  ru = Unsqueeze (rf, m1)
  sc = Mul ({down}, ru)
  oshape = Constant <value = int64[3] {{-1, {k}, {HIDDEN}}}> ()
  so = Reshape (sc, oshape)
{grouped_cast}  ys = ReduceSum <keepdims = 0> ({grouped}, one)
{out}}}"""


MOE_CASES = {
    "moe_swiglu": (INFO, experts_block(),
                   {"top-3 routing, tokens repeated 2 times (an inconsistent block)": experts_block(k=3, repeat=2),
                    "divided by a constant, not the top-k sum": experts_block(divisor="constant"),
                    "top-k of the smallest probabilities": experts_block(largest=0),
                    "softmax over the tokens axis": experts_block(softmax_axis=0),
                    "expert weights are graph inputs": experts_block(weights_input=True),
                    "indices clamped to 3 of 4 experts": experts_block(clip_hi=EXPERTS - 2),
                    "router probabilities read elsewhere": experts_block(probs_out=True),
                    "sigmoid of 1.702 * gate (not SiLU)": experts_block(scaled_sigmoid=True)},
                   "MoE"),
    "moe_clamped_swiglu": (INFO, experts_block(clamped=True),
                           {"up clamped to [-0.4, 0.5]": experts_block(clamped=True, up_clip=(-0.4, 0.5)),
                            "up first, then gate": experts_block(clamped=True, gate_start=1),
                            "softmax over the tokens axis": experts_block(clamped=True, softmax_axis=0),
                            "biases are graph inputs": experts_block(clamped=True, bias_input=True),
                            "top-k of the smallest logits": experts_block(clamped=True, largest=0),
                            "top-k logits used without a softmax": experts_block(clamped=True, routing="topk_raw")},
                           "MoE"),
}
