"""Dynamic int8: weights int8 per output channel, activations quantized at run time.

The MatMuls the plan names are quantized: every linear layer of the body. The LM head
and the token lookup were already made 8-bit per vocabulary row by embedding.py (one shared table when tied),
unless --lm-head/--embeddings fp32 kept them float.
Weights use the full signed range (no reduce_range): the CPUs we target have VNNI, where 8-bit products do not
saturate.

Activations get one run-time scale per tensor or one per token, chosen per layer (``activations="auto"``, the
default) or for all layers (``"tensor"``, ``"token"``):

- per tensor: ORT's quantize_dynamic, one DynamicQuantizeMatMul per layer (uint8, asymmetric, one scale for the
  whole input). One fused kernel: the fastest, faster than fp32 on CPU. But a trained model's "massive
  activations" ruin it: SmolLM2-135M's layer-11 down_proj input reaches |x| ~ 3000 on the first token of a window
  where the median token's maximum is ~1.3, so every other token rounds to a handful of levels (perplexity +47%
  from the body alone, see docs/quantization.md).
- per token: ``quantize_per_token`` below: each token divided by its own max |x|, then the same fused kernel, then
  multiplied back: one scale per token (and per output channel of W). It keeps every token at int8 precision, and
  costs a few small ops per layer, which on small models (128 wide) makes it slower than fp32.
- auto: a float pass over calibration prefills measures, for each linear layer's input X, the relative rms
  error that one per-tensor uint8 scale gives the median token of a prefill (``tensor_error``), and the brief
  statistic behind it, max_t max|x_t| / median_t max|x_t| (``token_spread``), and the float model's perplexity on
  those prefills. Then candidate models are written with per-token scales for the layers above each of
  CANDIDATE_THRESHOLDS in turn, from none (per tensor everywhere, the fastest) down to all, and the first whose
  perplexity on the same prefills is within PPL_BUDGET_PCT of the float model's is kept (none within: the one that
  lost least). Per tensor where it costs nothing measurable, per token where it is needed. If no threshold is
  within the budget, the layers that hurt the model's output most under the least-loss candidate's scales are left
  in float (fp32 MatMul): each layer's effect is measured on the whole model (sensitivity.py: that layer alone
  int8, mean KL of the next-token distributions against the float model on calibration prefills), and the most
  harmful FLOAT_CANDIDATES (1, 2, 4, ... 48) are kept float in turn; the first within the budget is kept (none:
  the least loss of all candidates). The same float pass also records each layer's own output error
  (``LayerError``: int8 weights and activations against the float product, on a subsample of tokens), which ranked
  the layers before: on SmolLM2-135M it did not predict their effect (docs/quantization.md). Per-token scales fix a
  token that dwarfs the others; they do not fix one channel that dwarfs the others inside every token (SmolLM2's
  down_proj inputs), which is what float is for. The figures, the candidates tried and the choice go into the
  manifest. The search holds the float model and one candidate's
  working copy in memory at a time (twice the model; the effect measurement's graph, which holds every weight twice,
  for a while four times), and writes each candidate beside the output.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from onnxpipe.quant.graph import WeightPlan, initializer_map, needs_external_data, save_quantized

ACTIVATION_SCHEMES = ("auto", "token", "tensor")
# auto: layers are ranked by how much one per-tensor scale would cost their inputs (``tensor_error``, the median
# token's relative rms error), and per-token scales go to those above a threshold. The thresholds are tried from
# the cheapest (no layer per token) down, and the first whose model stays within PPL_BUDGET_PCT of the float
# model's perplexity on the calibration prefills is kept; if none does, the one that lost least.
CANDIDATE_THRESHOLDS = (math.inf, 0.1, 0.05, 0.03, 0.0)
PPL_BUDGET_PCT = 1.0
# auto, when no threshold is within the budget: how many layers to leave in float, tried in this order, the most
# harmful first (ranked by their measured effect on the model's output, sensitivity.py); at most 48 of SmolLM2's 210
FLOAT_CANDIDATES = (1, 2, 4, 8, 16, 32, 48)
ERROR_TOKENS_PER_FEED = 64  # tokens of each prefill batch the layer output errors are measured on
TOKEN_THRESHOLD = 0.03  # without logits to measure (a bare graph), this threshold alone decides


@dataclass
class LayerChoice:
    """The activation scheme of the linear layers that read one input tensor, and why."""

    activation: str
    nodes: list[str]
    scheme: str  # "token" | "tensor"
    tensor_error: float  # max over prefills of the median token's relative rms error under one per-tensor scale
    token_spread: float  # max over prefills of max_t max|x_t| / median_t max|x_t|
    float_nodes: list[str] = field(default_factory=list)  # of ``nodes``, those left in float (the scheme is the rest's)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensor_error"], d["token_spread"] = round(self.tensor_error, 5), round(self.token_spread, 2)
        return d


@dataclass
class LayerError:
    """One linear layer's output error under either activation scheme: the mean over sampled tokens of
    ||x W - dq(q(x)) dq(q(W))|| / ||x W||, int8 weights per output channel as written."""

    node: str
    tensor: float  # one uint8 scale for the whole input tensor (ORT's DynamicQuantizeMatMul)
    token: float  # each token scaled to its max |x| first (quantize_per_token)

    def under(self, scheme: str) -> float:
        return self.token if scheme == "token" else self.tensor


def quantize_dynamic_int8(proto: Any, out_path: Path, plan: WeightPlan, lm_head: str = "auto",
                          per_channel: bool = True, activations: str = "auto",
                          feeds: Iterable[dict[str, np.ndarray]] | None = None, threshold: float | None = None,
                          logits: str | None = None, budget_pct: float | None = None) -> dict[str, Any]:
    """``feeds`` (float prefills of calibration text) are needed for ``activations="auto"`` only; with ``logits``
    (the graph's logits output) the thresholds are searched as the module note says, else ``threshold`` (default
    TOKEN_THRESHOLD) decides alone."""
    nodes = [n for n in plan.linears if lm_head != "fp32" or n != plan.lm_head]
    head = "fp32" if plan.lm_head and plan.lm_head not in nodes else "int8 per channel"
    details: dict[str, Any] = {"weights": "int8 per output channel", "per_channel": True, "lm_head": head}
    if activations != "auto":
        count = _write_dynamic(proto, out_path, nodes, nodes if activations == "token" else [], per_channel)
        details["activations"] = {"token": "dynamic per token (each token scaled to its max |x|)",
                                  "tensor": "uint8, dynamic per tensor"}[activations]
        details["per_channel"] = per_channel if activations == "tensor" else True
        details.update(_counts(count, len(nodes)))
        return details
    if feeds is None:
        raise ValueError("activations='auto' needs feeds (prefills) to measure the activations")
    feeds = list(feeds)
    budget_pct = PPL_BUDGET_PCT if budget_pct is None else budget_pct
    searching = logits is not None and threshold is None
    choices, float_ppl, errors = measure_activations(proto, nodes, feeds, logits, layer_errors=searching)
    thresholds: tuple[float, ...] = CANDIDATE_THRESHOLDS if searching else (
        TOKEN_THRESHOLD if threshold is None else threshold,)
    search: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=".dynamic-", dir=out_path.parent) as tmp:
        def attempt(token_nodes: list[str], float_nodes: list[str], t: float) -> dict[str, Any]:
            candidate = Path(tmp) / str(len(search)) / out_path.name
            candidate.parent.mkdir()
            kept = set(float_nodes)
            work = _copy(proto) if searching else proto
            count = _write_dynamic(work, candidate, [n for n in nodes if n not in kept],
                                   [n for n in token_nodes if n not in kept], per_channel)
            del work
            entry: dict[str, Any] = {"threshold": t if math.isfinite(t) else None, "per_token_nodes": count,
                                     "float_nodes": len(float_nodes)}
            if searching:
                change = (calibration_perplexity(candidate, feeds, logits) / float_ppl - 1.0) * 100.0
                entry["calibration_ppl_change_pct"] = round(change, 3)
            entry["_float"], entry["_path"] = list(float_nodes), candidate
            search.append(entry)
            return entry

        best: dict[str, Any] | None = None
        for t in thresholds:
            token_nodes = [n for c in choices if c.tensor_error > t for n in c.nodes]
            if any(len(token_nodes) == s["per_token_nodes"] for s in search):
                continue  # the same layers as a threshold already tried
            entry = attempt(token_nodes, [], t)
            change = entry.get("calibration_ppl_change_pct", math.nan)
            if best is None or change < best["calibration_ppl_change_pct"]:
                best = entry
            if not searching or change <= budget_pct:
                best = entry
                break
        assert best is not None
        effects: list[Any] = []
        if searching and FLOAT_CANDIDATES and not best["calibration_ppl_change_pct"] <= budget_pct:
            effects = _effects_under(best, proto, nodes, choices, feeds, logits)
            best = _keep_worst_in_float(best, choices, [e.node for e in effects], budget_pct, attempt)
        for f in best["_path"].parent.iterdir():
            os.replace(f, out_path.parent / f.name)
    float_nodes = best["_float"]
    for entry in search:
        del entry["_float"], entry["_path"]
    t = math.inf if best["threshold"] is None else best["threshold"]
    for c in choices:
        c.scheme = "token" if c.tensor_error > t else "tensor"
        c.float_nodes = [n for n in c.nodes if n in float_nodes]
    count = best["per_token_nodes"]
    details.update(_counts(count, len(nodes) - len(float_nodes)))
    details["activations"] = (f"per layer: {count} per token, {len(nodes) - len(float_nodes) - count} per tensor"
                              + (f", {len(float_nodes)} left float" if float_nodes else ""))
    details["activation_threshold"] = best["threshold"]
    details["float_nodes"] = float_nodes
    details["activation_search"] = {"budget_pct": budget_pct, "float_calibration_ppl": float_ppl,
                                    "candidates": search} if searching else None
    details["activation_choice"] = [c.to_json() for c in choices]
    if effects:
        details["layer_effects"] = [e.to_json() for e in effects[:max(FLOAT_CANDIDATES) * 2]]
    if errors:
        scheme = {n: c.scheme for c in choices for n in c.nodes}
        ranked = sorted(errors.values(), key=lambda e: -e.under(scheme[e.node]))
        details["layer_errors"] = [{"node": e.node, "scheme": scheme[e.node], "tensor": round(e.tensor, 5),
                                    "token": round(e.token, 5)} for e in ranked[:max(FLOAT_CANDIDATES) * 2]]
    return details


def _effects_under(base: dict[str, Any], proto: Any, nodes: list[str], choices: list[LayerChoice],
                   feeds: list[dict[str, np.ndarray]], logits: str) -> list[Any]:
    """Each layer's effect on the model's output (sensitivity.layer_effects) under ``base``'s activation scales,
    worst first."""
    from onnxpipe.quant.sensitivity import layer_effects

    t = math.inf if base["threshold"] is None else base["threshold"]
    token_nodes = {n for c in choices if c.tensor_error > t for n in c.nodes}
    return layer_effects(proto, nodes, token_nodes, feeds, logits)


def _keep_worst_in_float(base: dict[str, Any], choices: list[LayerChoice], ranked: list[str], budget_pct: float,
                         attempt: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The threshold candidate ``base`` (none was within the budget) with the first layers of ``ranked`` (the most
    harmful first) left in float, for each count in FLOAT_CANDIDATES in turn; returns the first within the budget,
    else the least loss of all tried."""
    t = math.inf if base["threshold"] is None else base["threshold"]
    token_nodes = [n for c in choices if c.tensor_error > t for n in c.nodes]
    best = base
    for k in FLOAT_CANDIDATES:
        if k >= len(ranked):
            break
        entry = attempt(token_nodes, ranked[:k], t)
        if entry["calibration_ppl_change_pct"] < best["calibration_ppl_change_pct"]:
            best = entry
        if entry["calibration_ppl_change_pct"] <= budget_pct:
            break
    return best


def _counts(per_token: int, total: int) -> dict[str, int]:
    return {"per_token_nodes": per_token, "per_tensor_nodes": total - per_token, "quantized_nodes": total}


def _copy(proto: Any) -> Any:
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _write_dynamic(proto: Any, out_path: Path, nodes: list[str], token_nodes: list[str], per_channel: bool) -> int:
    """Per-token scales for ``token_nodes``, ORT's quantize_dynamic (per tensor) for the rest of ``nodes``; writes
    ``out_path``; ``proto`` is changed in place. Returns the per-token node count."""
    wanted = set(token_nodes)
    tensor_nodes = [n for n in nodes if n not in wanted]
    count = quantize_per_token(proto, [n for n in nodes if n in wanted])
    if not tensor_nodes:
        save_quantized(proto, out_path)
        return count
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_ort():
        quantize_dynamic(
            proto,
            str(out_path),
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=tensor_nodes,
            use_external_data_format=needs_external_data(proto),
            extra_options={"MatMulConstBOnly": True},
        )
    return count


def measure_activations(proto: Any, nodes: list[str], feeds: list[dict[str, np.ndarray]],
                        logits: str | None = None, layer_errors: bool = False,
                        ) -> tuple[list[LayerChoice], float, dict[str, LayerError]]:
    """Run the float model on ``feeds``: each group of ``nodes`` that reads one input gets its statistics (scheme
    left "tensor"); with ``logits``, the float model's perplexity on the feeds (else nan); with ``layer_errors``,
    each node's LayerError (else an empty dict)."""
    from onnxpipe.quant.smoothquant import _session, activation_groups, with_outputs

    groups = activation_groups(proto, nodes)
    names = list(groups)
    stats = {x: (0.0, 0.0) for x in names}
    weights = _int8_weights(proto, [n for g in groups.values() for n in g]) if layer_errors else {}
    sums: dict[str, np.ndarray] = {n: np.zeros(2) for n in weights}
    nll, count, sampled = 0.0, 0, 0
    if names:
        session = _session(with_outputs(proto, names))
        outputs = names + ([logits] if logits else [])
        for feed in feeds:
            values = session.run(outputs, feed)
            for x, value in zip(names, values):
                err, spread = activation_statistics(value)
                stats[x] = (max(stats[x][0], err), max(stats[x][1], spread))
                if weights:
                    tokens, errs = _output_errors(value, [(n.name, *weights[n.name]) for n in groups[x]])
                    for name, e in errs.items():
                        sums[name] += e
            if weights:
                sampled += tokens
            if logits:
                s, n = _nll(values[-1], feed["input_ids"])
                nll, count = nll + s, count + n
    choices = [LayerChoice(x, [n.name for n in groups[x]], "tensor", stats[x][0], stats[x][1]) for x in names]
    errors = {n: LayerError(n, float(e[0] / sampled), float(e[1] / sampled)) for n, e in sums.items()} if sampled else {}
    return choices, math.exp(nll / count) if count else math.nan, errors


def _int8_weights(proto: Any, nodes: list[Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """node name -> (W [K, N] float32, W as written: int8 per output channel, dequantized), for MatMuls whose W is
    a constant."""
    from onnx import numpy_helper

    inits = initializer_map(proto.graph)
    out = {}
    for node in nodes:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        scale = np.abs(w).max(0) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        out[node.name] = (w, np.clip(np.round(w / scale), -127, 127) * scale)
    return out


def _uint8_tensor(x: np.ndarray, of: np.ndarray) -> np.ndarray:
    """``of`` quantized and dequantized with the one uint8 scale DynamicQuantizeLinear gives ``x`` (range incl. 0)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(of / scale) + zero, 0, 255) - zero) * scale


def _output_errors(x: np.ndarray, layers: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[int, dict[str, np.ndarray]]:
    """For one activation tensor [..., K] and the layers reading it: (tokens sampled, name -> summed per-token
    relative output error [tensor, token]). The scales come from the whole tensor, as at run time; the error is
    taken on every stride-th token (ERROR_TOKENS_PER_FEED of them, the first of each row included when the stride
    divides the row length)."""
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
    stride = max(1, math.ceil(len(x2) / ERROR_TOKENS_PER_FEED))
    sample = x2[::stride]
    per_tensor = _uint8_tensor(x2, sample)
    token_max = np.maximum(np.abs(x2).max(-1, keepdims=True), 1e-30)
    unit = x2 / token_max
    per_token = _uint8_tensor(unit, unit[::stride]) * token_max[::stride]
    out = {}
    for name, w, wq in layers:
        ref = sample @ w
        norm = np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)
        out[name] = np.array([(np.linalg.norm(ref - q @ wq, axis=-1) / norm).sum() for q in (per_tensor, per_token)])
    return len(sample), out


def choose_activation_scales(proto: Any, nodes: list[str], feeds: Iterable[dict[str, np.ndarray]],
                             threshold: float = TOKEN_THRESHOLD) -> list[LayerChoice]:
    """The statistics of ``measure_activations`` and per token for the layers whose tensor_error > threshold."""
    choices, _, _ = measure_activations(proto, nodes, list(feeds))
    for c in choices:
        c.scheme = "token" if c.tensor_error > threshold else "tensor"
    return choices


def calibration_perplexity(model_path: Path, feeds: list[dict[str, np.ndarray]], logits: str) -> float:
    """Perplexity of a written model on the feeds' prefills, run as a user would (all ORT optimizations)."""
    from onnxpipe.quant.quality import measure_session

    session = measure_session(model_path)
    nll, count = 0.0, 0
    for feed in feeds:
        s, n = _nll(session.run([logits], feed)[0], feed["input_ids"])
        nll, count = nll + s, count + n
    return math.exp(nll / count)


def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[:, 1:] under logits[:, :-1] (every row a full prefill)."""
    z = logits[:, :-1].astype(np.float64)
    top = z.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(z - top).sum(-1))
    target = np.take_along_axis(z, ids[:, 1:, None], axis=-1)[..., 0]
    return float((lse - target).sum()), int(target.size)


def activation_statistics(x: np.ndarray) -> tuple[float, float]:
    """(tensor_error, token_spread) of one activation tensor [..., K], every leading position a token.

    tensor_error: quantize ``x`` as DynamicQuantizeLinear does (uint8, one scale and zero point for the tensor, the
    range including 0), and take the median over tokens of ||x_t - q_t|| / ||x_t||.
    """
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    if x2.size == 0:
        return 0.0, 0.0
    lo, hi = min(float(x2.min()), 0.0), max(float(x2.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    q = (np.clip(np.round(x2 / scale) + zero, 0, 255) - zero) * scale
    power = np.maximum((x2 ** 2).sum(-1), 1e-300)
    err = float(np.median(np.sqrt(((x2 - q) ** 2).sum(-1) / power)))
    token_max = np.abs(x2).max(-1)
    spread = float(token_max.max() / max(float(np.median(token_max)), 1e-30))
    return err, spread


def quantize_per_token(proto: Any, nodes: list[str]) -> int:
    """Rewrite the named MatMul(x, constant W) nodes into per-token dynamic int8 (see the module note); in place.
    Returns the number of nodes rewritten.

    Each token is divided by its own max |x| first, so every token spans [-1, 1]; then ORT's fused
    DynamicQuantizeMatMul (one uint8 scale for the tensor, now the same for every token, and the per-channel weight
    scale) does the integer product, and a Mul by the token's max |x| restores the scale. Per layer: Abs,
    ReduceMax, Max (an all-zero token gets a tiny divisor, not 0/0), Div, shared by the layers that read the same x
    (q/k/v, gate/up), then DynamicQuantizeMatMul and Mul.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = initializer_map(graph)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    wanted = set(nodes)
    shared = "/quant/per_token"
    consts = {f"{shared}/tiny": np.array(1e-30, np.float32), f"{shared}/axes": np.array([-1], np.int64)}
    new_nodes, count, normalized = [], 0, {}
    for node in graph.node:
        if node.name not in wanted or node.op_type != "MatMul" or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # [K, N]
        w_scale = np.abs(w).max(0) / 127.0
        w_scale = np.where(w_scale > 0, w_scale, 1.0).astype(np.float32)
        p = node.name
        wq, ws = f"{p}/W_int8", f"{p}/W_scale"
        graph.initializer.extend([
            numpy_helper.from_array(np.clip(np.round(w / w_scale), -127, 127).astype(np.int8), wq),
            numpy_helper.from_array(w_scale, ws),
        ])
        x = node.input[0]
        if x not in normalized:
            q = f"{p}/per_token"
            reduce = (helper.make_node("ReduceMax", [f"{q}/absx", f"{shared}/axes"], [f"{q}/amax"],
                                       name=f"{q}/ReduceMax", keepdims=1) if opset >= 18 else
                      helper.make_node("ReduceMax", [f"{q}/absx"], [f"{q}/amax"], name=f"{q}/ReduceMax", axes=[-1],
                                       keepdims=1))
            new_nodes += [
                helper.make_node("Abs", [x], [f"{q}/absx"], name=f"{q}/Abs"),
                reduce,
                helper.make_node("Max", [f"{q}/amax", f"{shared}/tiny"], [f"{q}/token_max"], name=f"{q}/Max"),
                helper.make_node("Div", [x, f"{q}/token_max"], [f"{q}/x_unit"], name=f"{q}/Div"),
            ]
            normalized[x] = (f"{q}/x_unit", f"{q}/token_max")
        x_unit, token_max = normalized[x]
        new_nodes += [
            helper.make_node("DynamicQuantizeMatMul", [x_unit, wq, ws], [f"{p}/y_unit"], name=f"{p}/DynamicQuantizeMatMul",
                             domain="com.microsoft"),
            helper.make_node("Mul", [f"{p}/y_unit", token_max], list(node.output), name=f"{p}/MulTokenMax"),
        ]
        count += 1
    if count:
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        graph.ClearField("node")
        graph.node.extend(new_nodes)
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        used = {i for n in graph.node for i in n.input}
        for t in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(t)
    return count


class _quiet_ort:
    """ORT's quantization tools log a pre-processing hint on every call and a line per node at INFO; our log says
    what was done instead."""

    def __enter__(self) -> None:
        import logging

        names = ["", "onnxruntime"] + [n for n in logging.root.manager.loggerDict if n.startswith("onnxruntime")]
        self._saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
        for lg, _ in self._saved:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in self._saved:
            lg.setLevel(level)
