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
  lost least). Per tensor where it costs nothing measurable, per token where it is needed. The figures, the
  candidates tried and the choice go into the manifest. The search holds the float model and one candidate's
  working copy in memory at a time (twice the model), and writes each candidate beside the output.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from onnxpipe.quant.graph import WeightPlan, initializer_map, needs_external_data, save_quantized

ACTIVATION_SCHEMES = ("auto", "token", "tensor")
# auto: layers are ranked by how much one per-tensor scale would cost their inputs (``tensor_error``, the median
# token's relative rms error), and per-token scales go to those above a threshold. The thresholds are tried from
# the cheapest (no layer per token) down, and the first whose model stays within PPL_BUDGET_PCT of the float
# model's perplexity on the calibration prefills is kept; if none does, the one that lost least.
CANDIDATE_THRESHOLDS = (math.inf, 0.1, 0.05, 0.03, 0.0)
PPL_BUDGET_PCT = 1.0
TOKEN_THRESHOLD = 0.03  # without logits to measure (a bare graph), this threshold alone decides


@dataclass
class LayerChoice:
    """The activation scheme of the linear layers that read one input tensor, and why."""

    activation: str
    nodes: list[str]
    scheme: str  # "token" | "tensor"
    tensor_error: float  # max over prefills of the median token's relative rms error under one per-tensor scale
    token_spread: float  # max over prefills of max_t max|x_t| / median_t max|x_t|

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensor_error"], d["token_spread"] = round(self.tensor_error, 5), round(self.token_spread, 2)
        return d


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
    choices, float_ppl = measure_activations(proto, nodes, feeds, logits)
    if logits is None or threshold is not None:
        thresholds: tuple[float, ...] = (TOKEN_THRESHOLD if threshold is None else threshold,)
    else:
        thresholds = CANDIDATE_THRESHOLDS
    search: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=".dynamic-", dir=out_path.parent) as tmp:
        best: tuple[float, int, Path] | None = None
        for t in thresholds:
            token_nodes = [n for c in choices if c.tensor_error > t for n in c.nodes]
            if any(len(token_nodes) == s["per_token_nodes"] for s in search):
                continue  # the same layers as a threshold already tried
            candidate = Path(tmp) / str(len(search)) / out_path.name
            candidate.parent.mkdir()
            work = _copy(proto) if len(thresholds) > 1 else proto
            count = _write_dynamic(work, candidate, nodes, token_nodes, per_channel)
            del work
            entry: dict[str, Any] = {"threshold": t if math.isfinite(t) else None, "per_token_nodes": count}
            change = math.nan
            if len(thresholds) > 1:
                change = (calibration_perplexity(candidate, feeds, logits) / float_ppl - 1.0) * 100.0
                entry["calibration_ppl_change_pct"] = round(change, 3)
            search.append(entry)
            if best is None or change < best[0]:
                best = (change, len(search) - 1, candidate)
            if len(thresholds) == 1 or change <= budget_pct:
                best = (change, len(search) - 1, candidate)
                break
        assert best is not None
        for f in best[2].parent.iterdir():
            os.replace(f, out_path.parent / f.name)
    chosen = search[best[1]]
    t = math.inf if chosen["threshold"] is None else chosen["threshold"]
    for c in choices:
        c.scheme = "token" if c.tensor_error > t else "tensor"
    count = chosen["per_token_nodes"]
    details.update(_counts(count, len(nodes)))
    details["activations"] = f"per layer: {count} per token, {len(nodes) - count} per tensor"
    details["activation_threshold"] = chosen["threshold"]
    details["activation_search"] = {"budget_pct": budget_pct, "float_calibration_ppl": float_ppl,
                                    "candidates": search} if len(thresholds) > 1 else None
    details["activation_choice"] = [c.to_json() for c in choices]
    return details


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
                        logits: str | None = None) -> tuple[list[LayerChoice], float]:
    """Run the float model on ``feeds``: each group of ``nodes`` that reads one input gets its statistics (scheme
    left "tensor"), and with ``logits``, the float model's perplexity on the feeds (else nan)."""
    from onnxpipe.quant.smoothquant import _session, activation_groups, with_outputs

    groups = activation_groups(proto, nodes)
    names = list(groups)
    stats = {x: (0.0, 0.0) for x in names}
    nll, count = 0.0, 0
    if names:
        session = _session(with_outputs(proto, names))
        outputs = names + ([logits] if logits else [])
        for feed in feeds:
            values = session.run(outputs, feed)
            for x, value in zip(names, values):
                err, spread = activation_statistics(value)
                stats[x] = (max(stats[x][0], err), max(stats[x][1], spread))
            if logits:
                s, n = _nll(values[-1], feed["input_ids"])
                nll, count = nll + s, count + n
    choices = [LayerChoice(x, [n.name for n in groups[x]], "tensor", stats[x][0], stats[x][1]) for x in names]
    return choices, math.exp(nll / count) if count else math.nan


def choose_activation_scales(proto: Any, nodes: list[str], feeds: Iterable[dict[str, np.ndarray]],
                             threshold: float = TOKEN_THRESHOLD) -> list[LayerChoice]:
    """The statistics of ``measure_activations`` and per token for the layers whose tensor_error > threshold."""
    choices, _ = measure_activations(proto, nodes, list(feeds))
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
