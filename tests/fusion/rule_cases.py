"""The smallest graphs each fusion rule should match, and near-misses it must not, in ONNX text syntax.

CASES maps a registered rule name to (model info for the PassContext, the matching graph, {near-miss name: graph},
the fused op the rule must produce). test_fusion_registry.py fails when a registered rule has no entry here.
"""

from __future__ import annotations

import math

HEADER = '<ir_version: 9, opset_import: ["" : 18, "com.microsoft" : 1]>\n'
INFO = {"num_layers": 1, "num_attention_heads": 4, "num_kv_heads": 4, "head_dim": 8, "hidden_size": 32,
        "max_position_embeddings": 64, "positions": "rope", "rope": {"rotary_dim": 8}, "sliding_window": None}
GQA_INFO = {**INFO, "num_kv_heads": 2}


def _model(body: str) -> str:
    return HEADER + body


# ---- norms ----
def rms(axes: str = "-1", eps_const: bool = True, extra_output: bool = False) -> str:
    eps_in = "" if eps_const else ", float eps"
    eps_def = "eps = Constant <value = float {1e-6}> ()" if eps_const else ""
    out_extra = ", float[2,3,32] inv" if extra_output else ""
    inv_name = "inv" if extra_output else "inv_rms"
    return _model(f"""
g (float[2,3,32] x, float[32] w{eps_in}) => (float[2,3,32] y{out_extra}) {{
  two = Constant <value = float {{2.0}}> ()
  {eps_def}
  axes = Constant <value = int64[1] {{{axes}}}> ()
  sq = Pow (x, two)
  ms = ReduceMean <keepdims = 1> (sq, axes)
  mse = Add (ms, eps)
  rms = Sqrt (mse)
  {inv_name} = Reciprocal (rms)
  xn = Mul (x, {inv_name})
  y = Mul (w, xn)
}}""")


def norm_after_transpose(perm: str = "0, 2, 1, 3", escapes: bool = False) -> str:
    dims = [[2, 3, 4, 8][int(i)] for i in perm.split(",")]
    shape = ",".join(map(str, dims))
    extra = f", float[{shape}] t" if escapes else ""
    return _model(f"""
g (float[2,3,4,8] x, float[{dims[-1]}] w) => (float[{shape}] y{extra}) {{
  t = Transpose <perm = [{perm}]> (x)
  y = SimplifiedLayerNormalization <axis = -1, epsilon = 1e-6> (t, w)
}}""")


def norm_cast_back(to: int = 10, scale_const: bool = True, escapes: bool = False) -> str:
    """The fp16 export's RMSNorm once fused: fp16 x, an fp32 scale (values exact in fp16), the fp32 result cast
    back to fp16 (``to``)."""
    out = "float16" if to == 10 else "float"
    scale_in = "" if scale_const else ", float[32] w"
    scale_def = ("w = Constant <value = float[32] {" + ",".join(str(0.5 + 0.25 * (i % 5)) for i in range(32)) + "}> ()"
                 if scale_const else "")
    extra = ", float[2,3,32] n" if escapes else ""
    return _model(f"""
g (float16[2,3,32] x{scale_in}) => ({out}[2,3,32] y{extra}) {{
  {scale_def}
  n = SimplifiedLayerNormalization <axis = -1, epsilon = 1e-6, stash_type = 1> (x, w)
  y = Cast <to = {to}> (n)
}}""")


def skip_norm(op: str, skip_shape: str = "[2,3,32]") -> str:
    beta = ", float[32] b" if op == "LayerNormalization" else ""
    beta_arg = ", b" if op == "LayerNormalization" else ""
    return _model(f"""
g (float[2,3,32] x, float{skip_shape} r, float[32] w{beta}) => (float[2,3,32] y, float[2,3,32] s) {{
  s = Add (x, r)
  y = {op} <axis = -1, epsilon = 1e-5> (s, w{beta_arg})
}}""")


# ---- gelu ----
def tanh_gelu(k: float = 0.044715, tanh_escapes: bool = False) -> str:
    c = math.sqrt(2.0 / math.pi)
    extra = ", float[2,3,32] t" if tanh_escapes else ""
    return _model(f"""
g (float[2,3,32] x) => (float[2,3,32] y{extra}) {{
  half = Constant <value = float {{0.5}}> ()
  three = Constant <value = float {{3.0}}> ()
  k = Constant <value = float {{{k}}}> ()
  c = Constant <value = float {{{c}}}> ()
  one = Constant <value = float {{1.0}}> ()
  xh = Mul (x, half)
  x3 = Pow (x, three)
  kx3 = Mul (x3, k)
  inner = Add (x, kx3)
  scaled = Mul (inner, c)
  t = Tanh (scaled)
  br = Add (t, one)
  y = Mul (xh, br)
}}""")


def erf_gelu(sqrt2: float = math.sqrt(2.0)) -> str:
    return _model(f"""
g (float[2,3,32] x) => (float[2,3,32] y) {{
  s2 = Constant <value = float {{{sqrt2}}}> ()
  one = Constant <value = float {{1.0}}> ()
  half = Constant <value = float {{0.5}}> ()
  d = Div (x, s2)
  e = Erf (d)
  br = Add (e, one)
  xb = Mul (x, br)
  y = Mul (xb, half)
}}""")


def bias_gelu(const_bias: bool = True) -> str:
    bias_in = "" if const_bias else ", float[32] b"
    bias_def = "b = Constant <value = float[32] {" + ",".join(["0.1"] * 32) + "}> ()" if const_bias else ""
    return _model(f"""
g (float[2,3,32] x{bias_in}) => (float[2,3,32] y) {{
  {bias_def}
  xb = Add (x, b)
  y = com.microsoft.FastGelu (xb)
}}""")


# ---- rotary ----
def rotary(half_end: int = 4, cos_input: bool = False) -> str:
    inv_freq = ",".join(f"{10000 ** (-2 * i / 8):.8f}" for i in range(4))
    cos_src = "float[1,1,5,8] cos4" if cos_input else ""
    cos_def = "" if cos_input else """
  pf = Cast <to = 1> (position_ids)
  pu = Unsqueeze (pf, ax_last)
  freqs = Mul (pu, inv_freq)
  emb = Concat <axis = -1> (freqs, freqs)
  cos = Cos (emb)
  cos4 = Unsqueeze (cos, ax1)"""
    return _model(f"""
g (float[1,5,4,8] x_bsnh, int64[1,5] position_ids{', ' + cos_src if cos_src else ''}) => (float[1,4,5,8] y) {{
  inv_freq = Constant <value = float[4] {{{inv_freq}}}> ()
  ax_last = Constant <value = int64[1] {{-1}}> ()
  ax1 = Constant <value = int64[1] {{1}}> ()
  pf2 = Cast <to = 1> (position_ids)
  pu2 = Unsqueeze (pf2, ax_last)
  freqs2 = Mul (pu2, inv_freq)
  emb2 = Concat <axis = -1> (freqs2, freqs2)
  sin = Sin (emb2)
  sin4 = Unsqueeze (sin, ax1){cos_def}
  x = Transpose <perm = [0, 2, 1, 3]> (x_bsnh)
  s0 = Constant <value = int64[1] {{0}}> ()
  s1 = Constant <value = int64[1] {{{half_end}}}> ()
  s2 = Constant <value = int64[1] {{9223372036854775807}}> ()
  ax3 = Constant <value = int64[1] {{3}}> ()
  one = Constant <value = int64[1] {{1}}> ()
  x1 = Slice (x, s0, s1, ax3, one)
  x2 = Slice (x, s1, s2, ax3, one)
  nx2 = Neg (x2)
  rot = Concat <axis = -1> (nx2, x1)
  a = Mul (x, cos4)
  b = Mul (rot, sin4)
  y = Add (a, b)
}}""")


def partial_rotary(pass_start: int = 4, half_end: int = 2) -> str:
    """Rotary on the first 4 of 8 channels per head (Phi's partial_rotary_factor 0.5), the rest passed through."""
    inv_freq = ",".join(f"{10000 ** (-2 * i / 4):.8f}" for i in range(2))
    return _model(f"""
g (float[1,5,4,8] x_bsnh, int64[1,5] position_ids) => (float[1,4,5,{4 + 8 - pass_start}] y) {{
  inv_freq = Constant <value = float[2] {{{inv_freq}}}> ()
  ax_last = Constant <value = int64[1] {{-1}}> ()
  ax1 = Constant <value = int64[1] {{1}}> ()
  pf = Cast <to = 1> (position_ids)
  pu = Unsqueeze (pf, ax_last)
  freqs = Mul (pu, inv_freq)
  emb = Concat <axis = -1> (freqs, freqs)
  cos = Cos (emb)
  sin = Sin (emb)
  cos4 = Unsqueeze (cos, ax1)
  sin4 = Unsqueeze (sin, ax1)
  x = Transpose <perm = [0, 2, 1, 3]> (x_bsnh)
  s0 = Constant <value = int64[1] {{0}}> ()
  sr = Constant <value = int64[1] {{4}}> ()
  sp = Constant <value = int64[1] {{{pass_start}}}> ()
  sh = Constant <value = int64[1] {{{half_end}}}> ()
  s2 = Constant <value = int64[1] {{9223372036854775807}}> ()
  ax3 = Constant <value = int64[1] {{3}}> ()
  one = Constant <value = int64[1] {{1}}> ()
  xr = Slice (x, s0, sr, ax3, one)
  xp = Slice (x, sp, s2, ax3, one)
  x1 = Slice (xr, s0, sh, ax3, one)
  x2 = Slice (xr, sh, s2, ax3, one)
  nx2 = Neg (x2)
  rot = Concat <axis = -1> (nx2, x1)
  a = Mul (xr, cos4)
  b = Mul (rot, sin4)
  r = Add (a, b)
  y = Concat <axis = -1> (r, xp)
}}""")


# ---- attention ----
def attention(grouped: bool, mask_from_where: bool = True, probs_escape: bool = False, repeat_axis: int = 2,
              scale_input: bool = False) -> str:
    n, kv, h = 4, (2 if grouped else 4), 8
    d, dkv = n * h, kv * h
    extra_out = ", float[2,4,3,8] probs" if probs_escape else ""
    scale_in = ", float s" if scale_input else ""
    scale_def = "" if scale_input else "s = Constant <value = float {0.59460355750136}> ()"
    mask_in = "bool[2,1,3,8] mask4d" if mask_from_where else "float[2,1,3,8] mask_bias"
    mask_def = """
  zero = Constant <value = float {0.0}> ()
  neginf = Constant <value = float {-inf}> ()
  mask_bias = Where (mask4d, zero, neginf)""" if mask_from_where else ""
    repeat = f"""
  rax = Constant <value = int64[1] {{{repeat_axis}}}> ()
  k5 = Unsqueeze (present_key, rax)
  v5 = Unsqueeze (present_value, rax)
  rep_shape = Constant <value = int64[5] {{2, {kv}, {n // kv}, 8, {h}}}> ()
  rep_shape_b = Constant <value = int64[5] {{2, {kv}, {n // kv}, 8, {h}}}> ()
  k5e = Expand (k5, rep_shape)
  v5e = Expand (v5, rep_shape_b)
  all_shape = Constant <value = int64[4] {{2, {n}, 8, {h}}}> ()
  k_all = Reshape (k5e, all_shape)
  v_all = Reshape (v5e, all_shape)""" if grouped else ""
    return _model(f"""
g (float[2,3,{d}] q_bsd, float[2,3,{dkv}] k_bsd, float[2,3,{dkv}] v_bsd, float[2,{kv},5,{h}] past_key,
   float[2,{kv},5,{h}] past_value, int64[2,8] attention_mask, {mask_in}{scale_in})
   => (float[2,3,{d}] out, float[2,{kv},8,{h}] present_key, float[2,{kv},8,{h}] present_value{extra_out}) {{
  {scale_def}
  q_shape = Constant <value = int64[4] {{2, 3, {n}, {h}}}> ()
  kv_shape = Constant <value = int64[4] {{2, 3, {kv}, {h}}}> ()
  q4 = Reshape (q_bsd, q_shape)
  q = Transpose <perm = [0, 2, 1, 3]> (q4)
  k4 = Reshape (k_bsd, kv_shape)
  k = Transpose <perm = [0, 2, 1, 3]> (k4)
  v4 = Reshape (v_bsd, kv_shape)
  v = Transpose <perm = [0, 2, 1, 3]> (v4)
  present_key = Concat <axis = -2> (past_key, k)
  present_value = Concat <axis = -2> (past_value, v){repeat}{mask_def}
  kt = Transpose <perm = [0, 1, 3, 2]> ({"k_all" if grouped else "present_key"})
  qs = Mul (q, s)
  kts = Mul (kt, s)
  scores = MatMul (qs, kts)
  masked = Add (scores, mask_bias)
  probs = Softmax <axis = -1> (masked)
  nan = IsNaN (probs)
  pz = Where (nan, zero, probs)
  ctx = MatMul (pz, {"v_all" if grouped else "present_value"})
  ctx_t = Transpose <perm = [0, 2, 1, 3]> (ctx)
  out_shape = Constant <value = int64[3] {{2, 3, {d}}}> ()
  out = Reshape (ctx_t, out_shape)
}}""".replace("  nan = IsNaN (probs)", "  nan = IsNaN (probs)" if mask_from_where else
              "  zero = Constant <value = float {0.0}> ()\n  nan = IsNaN (probs)"))


# rule -> (model info, graph that fuses, near misses, op the fusion produces)
CASES = {
    "rms_norm": (INFO, rms(), {"reduce over axis 1": rms(axes="1"), "epsilon not a constant": rms(eps_const=False),
                               "1/rms read elsewhere": rms(extra_output=True)}, "SimplifiedLayerNormalization"),
    "norm_cast_back": (INFO, norm_cast_back(), {"cast to fp32, not back to x's fp16": norm_cast_back(to=1),
                                                "scale is a graph input": norm_cast_back(scale_const=False),
                                                "the fp32 result is read elsewhere": norm_cast_back(escapes=True)},
                       "SimplifiedLayerNormalization"),
    "norm_before_transpose": (INFO, norm_after_transpose(),
                              {"the transpose moves the last axis": norm_after_transpose(perm="0, 1, 3, 2"),
                               "the transposed tensor is read elsewhere": norm_after_transpose(escapes=True)},
                              "SimplifiedLayerNormalization"),
    "skip_rms_norm": (INFO, skip_norm("SimplifiedLayerNormalization"),
                      {"skip is a broadcast bias": skip_norm("SimplifiedLayerNormalization", "[32]")},
                      "SkipSimplifiedLayerNormalization"),
    "skip_layer_norm": (INFO, skip_norm("LayerNormalization"),
                        {"skip is a broadcast bias": skip_norm("LayerNormalization", "[32]")},
                        "SkipLayerNormalization"),
    "fast_gelu": (INFO, tanh_gelu(), {"cubic coefficient 0.04": tanh_gelu(k=0.04),
                                      "tanh read elsewhere": tanh_gelu(tanh_escapes=True)}, "FastGelu"),
    "gelu_erf": (INFO, erf_gelu(), {"divides by 1.5, not sqrt(2)": erf_gelu(sqrt2=1.5)}, "Gelu"),
    "bias_gelu": (INFO, bias_gelu(), {"bias is not a constant": bias_gelu(const_bias=False)}, "FastGelu"),
    "rotary_embedding": (INFO, rotary(), {"halves split at 3, not 4": rotary(half_end=3),
                                          "cos is a graph input, not f(position_ids)": rotary(cos_input=True)},
                         "RotaryEmbedding"),
    "partial_rotary_embedding": ({**INFO, "rope": {"rotary_dim": 4}}, partial_rotary(),
                                 {"passed-through part starts at 3, not 4": partial_rotary(pass_start=3),
                                  "rotated halves split at 1, not 2": partial_rotary(half_end=1)},
                                 "RotaryEmbedding"),
    "mha": (INFO, attention(grouped=False),
            {"mask is an additive input, not Where(mask, 0, -inf)": attention(grouped=False, mask_from_where=False),
             "probabilities read elsewhere": attention(grouped=False, probs_escape=True),
             "scale is not a constant": attention(grouped=False, scale_input=True)}, "MultiHeadAttention"),
    "gqa": (GQA_INFO, attention(grouped=True),
            {"kv heads repeated along axis 1": attention(grouped=True, repeat_axis=1),
             "probabilities read elsewhere": attention(grouped=True, probs_escape=True)}, "GroupQueryAttention"),
}


# ---- eager attention: soft-capped scores (Gemma 2), sink logits (gpt-oss) ----
def eager_attention(softcap: str | None = None, sinks: bool = False, cap: float = 2.0, cap_input: bool = False,
                    cap_after_mask: bool = False, sink_slice_start: int = 0, max_axis: int = -1,
                    sinks_input: bool = False) -> str:
    """Grouped attention as transformers' eager path writes it: the product of q and K^T scaled, then (softcap)
    Tanh-capped as "plain" (cap 1), "scaled" (Tanh, times the cap) or "div" (divided by the cap, Tanh, times it),
    then the mask; with sinks, one logit per head appended as a last column and sliced off after the softmax."""
    n, kv, h = 4, 2, 8
    d, dkv = n * h, kv * h
    pre = (1 / math.sqrt(h)) / (cap if softcap == "scaled" else 1.0)
    cap_in = ", float c" if cap_input else ""
    sink_in = ", float[1,4,1,1] sinkc" if sinks_input else ""
    cap_def = "" if cap_input else f"c = Constant <value = float {{{cap}}}> ()"
    scores = ["  scaled = Mul (raw, s)"]
    last = "scaled"
    if softcap == "div":
        scores.append("  divided = Div (scaled, c)")
        last = "divided"
    if cap_after_mask:
        scores.append(f"  premask = Add ({last}, mask_bias)")
        last = "premask"
    if softcap:
        scores.append(f"  capped = Tanh ({last})")
        last = "capped"
    if softcap in ("scaled", "div"):
        scores.append("  recapped = Mul (capped, c)")
        last = "recapped"
    if not cap_after_mask:
        scores.append(f"  masked = Add ({last}, mask_bias)")
        last = "masked"
    if sinks:
        sink_def = "" if sinks_input else "sinkc = Constant <value = float[1,4,1,1] {0.5, -1.0, 2.0, 0.0}> ()"
        scores += [f"  {sink_def}", "  sink_shape = Constant <value = int64[4] {2, 4, 3, 1}> ()",
                   "  sink_col = Expand (sinkc, sink_shape)", f"  with_sink = Concat <axis = -1> ({last}, sink_col)",
                   f"  max_axes = Constant <value = int64[1] {{{max_axis}}}> ()",
                   "  row_max = ReduceMax <keepdims = 1> (with_sink, max_axes)",
                   "  shifted = Sub (with_sink, row_max)", "  probs_all = Softmax <axis = -1> (shifted)",
                   f"  sl0 = Constant <value = int64[1] {{{sink_slice_start}}}> ()",
                   f"  sl1 = Constant <value = int64[1] {{{-1 if sink_slice_start == 0 else 9}}}> ()",
                   "  sl_ax = Constant <value = int64[1] {3}> ()", "  sl_step = Constant <value = int64[1] {1}> ()",
                   "  probs = Slice (probs_all, sl0, sl1, sl_ax, sl_step)"]
    else:
        scores.append(f"  probs = Softmax <axis = -1> ({last})")
    body = "\n".join(scores)
    return _model(f"""
g (float[2,3,{d}] q_bsd, float[2,3,{dkv}] k_bsd, float[2,3,{dkv}] v_bsd, float[2,{kv},5,{h}] past_key,
   float[2,{kv},5,{h}] past_value, int64[2,8] attention_mask, bool[2,1,3,8] mask4d{cap_in}{sink_in})
   => (float[2,3,{d}] out, float[2,{kv},8,{h}] present_key, float[2,{kv},8,{h}] present_value) {{
  s = Constant <value = float {{{pre}}}> ()
  {cap_def}
  q_shape = Constant <value = int64[4] {{2, 3, {n}, {h}}}> ()
  kv_shape = Constant <value = int64[4] {{2, 3, {kv}, {h}}}> ()
  q4 = Reshape (q_bsd, q_shape)
  q = Transpose <perm = [0, 2, 1, 3]> (q4)
  k4 = Reshape (k_bsd, kv_shape)
  k = Transpose <perm = [0, 2, 1, 3]> (k4)
  v4 = Reshape (v_bsd, kv_shape)
  v = Transpose <perm = [0, 2, 1, 3]> (v4)
  present_key = Concat <axis = -2> (past_key, k)
  present_value = Concat <axis = -2> (past_value, v)
  rax = Constant <value = int64[1] {{2}}> ()
  k5 = Unsqueeze (present_key, rax)
  v5 = Unsqueeze (present_value, rax)
  rep_shape = Constant <value = int64[5] {{2, {kv}, {n // kv}, 8, {h}}}> ()
  k5e = Expand (k5, rep_shape)
  v5e = Expand (v5, rep_shape)
  all_shape = Constant <value = int64[4] {{2, {n}, 8, {h}}}> ()
  k_all = Reshape (k5e, all_shape)
  v_all = Reshape (v5e, all_shape)
  zero = Constant <value = float {{0.0}}> ()
  neginf = Constant <value = float {{-inf}}> ()
  mask_bias = Where (mask4d, zero, neginf)
  kt = Transpose <perm = [0, 1, 3, 2]> (k_all)
  raw = MatMul (q, kt)
{body}
  ctx = MatMul (probs, v_all)
  ctx_t = Transpose <perm = [0, 2, 1, 3]> (ctx)
  out_shape = Constant <value = int64[3] {{2, 3, {d}}}> ()
  out = Reshape (ctx_t, out_shape)
}}""")


CASES["softcap_attention"] = (
    GQA_INFO, eager_attention(softcap="div"),
    {"the cap is a graph input, not a constant": eager_attention(softcap="div", cap_input=True),
     "the cap is applied after the mask": eager_attention(softcap="scaled", cap_after_mask=True),
     "no cap at all (eager scores)": eager_attention()},
    "GroupQueryAttention")
CASES["sink_attention"] = (
    GQA_INFO, eager_attention(sinks=True),
    {"the sink column is sliced off the front": eager_attention(sinks=True, sink_slice_start=1),
     "the softmax's shift is a max over axis 2": eager_attention(sinks=True, max_axis=2),
     "the sink logits are a graph input": eager_attention(sinks=True, sinks_input=True)},
    "GroupQueryAttention")


# ---- rotary as first/second-half arithmetic (gpt-oss) ----
def split_half_rotary(first_op: str = "Sub", cos_input: bool = False, reverse: bool = False) -> str:
    """x1, x2 = Split(x); Concat(x1 cos - x2 sin, x2 cos + x1 sin) with half-width cos/sin of position_ids."""
    inv_freq = ",".join(f"{10000 ** (-2 * i / 8):.8f}" for i in range(4))
    cos_src = ", float[1,1,5,4] cos4" if cos_input else ""
    cos_def = "" if cos_input else "\n  cos = Cos (freqs)\n  cos4 = Unsqueeze (cos, ax1)"
    return _model(f"""
g (float[1,5,4,8] x_bsnh, int64[1,5] position_ids{cos_src}) => (float[1,4,5,8] y) {{
  inv_freq = Constant <value = float[4] {{{inv_freq}}}> ()
  ax_last = Constant <value = int64[1] {{-1}}> ()
  ax1 = Constant <value = int64[1] {{1}}> ()
  pf = Cast <to = 1> (position_ids)
  pu = Unsqueeze (pf, ax_last)
  freqs = Mul (pu, inv_freq)
  sin = Sin (freqs)
  sin4 = Unsqueeze (sin, ax1){cos_def}
  x = Transpose <perm = [0, 2, 1, 3]> (x_bsnh)
  sizes = Constant <value = int64[2] {{4, 4}}> ()
  x1, x2 = Split <axis = 3> (x, sizes)
  c1 = Mul (x1, cos4)
  s2 = Mul (x2, sin4)
  first = {first_op} (c1, s2)
  c2 = Mul (x2, cos4)
  s1 = Mul (x1, sin4)
  second = Add (c2, s1)
  y = Concat <axis = -1> ({"second, first" if reverse else "first, second"})
}}""")


CASES["split_half_rotary_embedding"] = (
    INFO, split_half_rotary(),
    {"the first half adds the sine term": split_half_rotary(first_op="Add"),
     "the halves concatenated in reverse order": split_half_rotary(reverse=True),
     "cos is a graph input, not f(position_ids)": split_half_rotary(cos_input=True)},
    "RotaryEmbedding")

from fusion.moe_cases import MOE_CASES  # noqa: E402 - the expert blocks are long enough for a module of their own

CASES.update(MOE_CASES)


# ---- q, k, v projected per head (GPT-NeoX) ----
def per_head_qkv(weight_input: bool = False, view: str = "4, 24", axis: int = 3, with_bias: bool = True) -> str:
    """One projection viewed as [B, S, N, 3 H], transposed to heads and split in three along the last axis."""
    w_in = ", float[32,96] w" if weight_input else ""
    w_def = "" if weight_input else "w = Constant <value = float[32,96] {" + ",".join(
        f"{((i * 37) % 101) / 101 - 0.5:.4f}" for i in range(32 * 96)) + "}> ()"
    b_def = "b = Constant <value = float[96] {" + ",".join(f"{i / 96:.4f}" for i in range(96)) + "}> ()"
    dims = [int(d) for d in view.split(",")]
    out = f"float[2,{dims[0]},3,{dims[1] // 3}]"
    projection = "  pb = MatMul (x, w)\n  p = Add (pb, b)" if with_bias else "  p = MatMul (x, w)"
    return _model(f"""
g (float[2,3,32] x{w_in}) => ({out} q, {out} k, {out} v) {{
  {w_def}
  {b_def}
{projection}
  shape = Constant <value = int64[4] {{2, 3, {view}}}> ()
  per_head = Reshape (p, shape)
  heads = Transpose <perm = [0, 2, 1, 3]> (per_head)
  q, k, v = Split <axis = {axis}, num_outputs = 3> (heads)
}}""")


CASES["per_head_qkv"] = (
    {**INFO, "head_dim": 8}, per_head_qkv(),
    {"the weight is a graph input": per_head_qkv(weight_input=True),
     "viewed as [B, S, 3, N H]: already per tensor": per_head_qkv(view="3, 32"),
     "split along the sequence axis": per_head_qkv(axis=2)},
    "Transpose")
