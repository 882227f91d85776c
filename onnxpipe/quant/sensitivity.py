"""Each linear layer's effect on the whole model's output under dynamic int8, measured on calibration prefills.

A layer's own output error does not say what it does to the model's predictions (on SmolLM2-135M the layers with
the largest relative output error were not the ones whose float fallback helped perplexity). So this measures
the effect itself: quantize one layer, leave the rest float, and take the mean KL(float || that model) of the
next-token distributions over calibration prefills (never over the eval text).

Writing one quantized model per layer would cost a model write and a session per layer. Instead one float graph
simulates every layer's int8 form at once, each behind a switch:

    y_i = fq(x) dq(W_i) if switch[i] else x W_i     (an If: only the branch switched on runs)

``fq(x)`` is x quantized and dequantized as the written layer quantizes it (per token: each token divided by its
max |x| and rounded to the fixed grid of dynamic.quantize_per_token; per tensor: DynamicQuantizeLinear's uint8
scale and zero point for the whole input), dq(W) the int8 per-output-channel weights dequantized, and ``switch`` a
graph input of one float per layer. One session then measures any set of layers by its feed: one layer on at a
time for its effect (``Simulation.effects``), every layer but a chosen few on for a candidate with those few left
float (``Simulation.perplexity``). The integer product of the written model equals fq(x) dq(W) up to float
rounding, so the simulation measures what the written layer does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from onnxpipe.runtime.sessions import open_session

SWITCH = "onnxpipe_quant_switch"
# prefill tokens (rows of the first calibration feeds) each layer's effect is measured on. On SmolLM2-135M, on 2
# shared cores, a measurement costs about one float forward of these tokens (one If branch per layer), so 210
# layers x 128 tokens is the search's largest cost
EFFECT_TOKENS = 128
JUDGE_TOKENS = 2048  # held-out prefill tokens (at most) the candidates are judged on


@dataclass
class LayerEffect:
    """Mean KL(float || float model with only this layer quantized) over the measured positions, in nats."""

    node: str
    scheme: str  # "token" | "tensor": the activation scale the layer is measured (and written) with
    kl: float

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "scheme": self.scheme, "kl": float(f"{self.kl:.4g}")}


def switchable_model(proto: Any, nodes: list[str], token_nodes: set[str]) -> tuple[Any, list[str]]:
    """A copy of the float model in which each named MatMul(x, constant W) is its int8 form where switch[i] > 0.5
    and its float self elsewhere (see the module note), and the names in switch order (MatMuls without a constant
    weight are skipped)."""
    import onnx
    from onnx import helper, numpy_helper

    from onnxpipe.quant.graph import initializer_map

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    inits = initializer_map(graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    wanted = set(nodes)
    shared = "/quant/simulate"
    from onnxpipe.quant.dynamic import UNIT_SCALE, UNIT_ZERO

    extra_inits = [numpy_helper.from_array(np.array(1e-30, np.float32), f"{shared}/tiny"),
                   numpy_helper.from_array(np.array([-1], np.int64), f"{shared}/axes"),
                   numpy_helper.from_array(np.array(UNIT_SCALE, np.float32), f"{shared}/unit_scale"),
                   numpy_helper.from_array(np.array(UNIT_ZERO, np.uint8), f"{shared}/unit_zero"),
                   numpy_helper.from_array(np.array(0.5, np.float32), f"{shared}/half")]
    order: list[str] = []
    new_nodes: list[Any] = []
    for node in graph.node:
        if node.name not in wanted or node.op_type != "MatMul" or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        scheme = "token" if node.name in token_nodes else "tensor"
        x, y, p = node.input[0], node.output[0], f"{shared}/{node.name}"
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        scale = np.abs(w).max(0) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        extra_inits += [numpy_helper.from_array((np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32),
                                                f"{p}/W_dq"),
                        numpy_helper.from_array(np.array(len(order), np.int64), f"{p}/index")]
        # an If, so that only the branch switched on runs: one effect measurement costs about one float forward
        fq, ops = _fake_quant(x, scheme, f"{p}/fq", shared, opset)
        int8 = helper.make_graph(ops + [helper.make_node("MatMul", [fq, f"{p}/W_dq"], [f"{p}/y_int8"],
                                                         name=f"{p}/MatMul")],
                                 "int8", [], [helper.make_tensor_value_info(f"{p}/y_int8", onnx.TensorProto.FLOAT, None)])
        float_node = onnx.NodeProto()
        float_node.CopyFrom(node)
        float_node.output[0] = f"{p}/y_float"
        fp32 = helper.make_graph([float_node], "float", [],
                                 [helper.make_tensor_value_info(f"{p}/y_float", onnx.TensorProto.FLOAT, None)])
        new_nodes += [
            helper.make_node("Gather", [SWITCH, f"{p}/index"], [f"{p}/on"], name=f"{p}/Gather", axis=0),
            helper.make_node("Greater", [f"{p}/on", f"{shared}/half"], [f"{p}/is_on"], name=f"{p}/Greater"),
            helper.make_node("If", [f"{p}/is_on"], [y], name=f"{p}/If", then_branch=int8, else_branch=fp32),
        ]
        order.append(node.name)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.initializer.extend(extra_inits)
    graph.input.append(helper.make_tensor_value_info(SWITCH, onnx.TensorProto.FLOAT, [len(order)]))
    return model, order


def _fake_quant(x: str, scheme: str, q: str, shared: str, opset: int) -> tuple[str, list[Any]]:
    """Nodes computing x quantized to uint8 and back, with one scale for the tensor or (first) one per token."""
    from onnx import helper

    ops = []
    src = x
    if scheme == "token":
        reduce = (helper.make_node("ReduceMax", [f"{q}/absx", f"{shared}/axes"], [f"{q}/amax"], name=f"{q}/ReduceMax",
                                   keepdims=1) if opset >= 18 else
                  helper.make_node("ReduceMax", [f"{q}/absx"], [f"{q}/amax"], name=f"{q}/ReduceMax", axes=[-1],
                                   keepdims=1))
        ops += [helper.make_node("Abs", [x], [f"{q}/absx"], name=f"{q}/Abs"), reduce,
                helper.make_node("Max", [f"{q}/amax", f"{shared}/tiny"], [f"{q}/token_max"], name=f"{q}/Max"),
                helper.make_node("Div", [x, f"{q}/token_max"], [f"{q}/unit"], name=f"{q}/Div")]
        src = f"{q}/unit"
    if scheme == "token":  # the written form's fixed grid: step 1/127 around zero point 128
        scale, zero = f"{shared}/unit_scale", f"{shared}/unit_zero"
        ops += [helper.make_node("QuantizeLinear", [src, scale, zero], [f"{q}/xq"], name=f"{q}/Q"),
                helper.make_node("DequantizeLinear", [f"{q}/xq", scale, zero], [f"{q}/xdq"], name=f"{q}/DQ"),
                helper.make_node("Mul", [f"{q}/xdq", f"{q}/token_max"], [f"{q}/fq"], name=f"{q}/MulTokenMax")]
        return f"{q}/fq", ops
    ops += [helper.make_node("DynamicQuantizeLinear", [src], [f"{q}/xq", f"{q}/xs", f"{q}/xz"], name=f"{q}/DQL"),
            helper.make_node("DequantizeLinear", [f"{q}/xq", f"{q}/xs", f"{q}/xz"], [f"{q}/xdq"], name=f"{q}/DQ")]
    return f"{q}/xdq", ops


def effect_feeds(feeds: list[dict[str, np.ndarray]], tokens: int = EFFECT_TOKENS) -> list[dict[str, np.ndarray]]:
    """The first feeds (rows of the first feed when one is enough) holding about ``tokens`` prefill tokens."""
    out, have = [], 0
    for feed in feeds:
        rows, length = feed["input_ids"].shape
        take = min(rows, max(1, math.ceil((tokens - have) / length)))
        out.append({k: v[:take] if v.ndim and v.shape[0] == rows else v for k, v in feed.items()})
        have += take * length
        if have >= tokens:
            break
    return out


class Simulation:
    """One session of ``switchable_model``: each layer's effect, and any set of layers left float, measured by feeds."""

    def __init__(self, proto: Any, nodes: list[str], token_nodes: set[str], logits: str) -> None:
        model, self.order = switchable_model(proto, nodes, token_nodes)
        self.session = _session(model)
        self.logits, self.token_nodes = logits, token_nodes

    def switches(self, float_nodes: Iterable[str] = ()) -> np.ndarray:
        """Every layer int8 but ``float_nodes``."""
        on = np.ones(len(self.order), np.float32)
        kept = set(float_nodes)
        on[[i for i, n in enumerate(self.order) if n in kept]] = 0.0
        return on

    def run(self, feed: dict[str, np.ndarray], switch: np.ndarray) -> np.ndarray:
        return self.session.run([self.logits], {**feed, SWITCH: switch})[0]

    def effects(self, feeds: list[dict[str, np.ndarray]],
                progress: Callable[[int, int], None] | None = None) -> list[LayerEffect]:
        """Each layer's effect (module note) on ``feeds``, worst first."""
        off = np.zeros(len(self.order), np.float32)
        reference = [_log_softmax(self.run(f, off)) for f in feeds]
        weights = [f["input_ids"].size for f in feeds]
        effects = []
        for i, name in enumerate(self.order):
            switch = off.copy()
            switch[i] = 1.0
            kl = [_mean_kl(ref, self.run(f, switch)) for ref, f in zip(reference, feeds)]
            effects.append(LayerEffect(name, "token" if name in self.token_nodes else "tensor",
                                       float(np.average(kl, weights=weights))))
            if progress is not None:
                progress(i + 1, len(self.order))
        return sorted(effects, key=lambda e: -e.kl)

    def perplexity(self, feeds: list[dict[str, np.ndarray]], switch: np.ndarray) -> float:
        """Perplexity on the feeds' prefills (every row a full prefill) with the layers ``switch`` turns on int8."""
        from onnxpipe.quant.dynamic import prefill_nll

        nll, count = 0.0, 0
        for feed in feeds:
            s, n = prefill_nll(self.run(feed, switch), feed["input_ids"])
            nll, count = nll + s, count + n
        return math.exp(nll / count)


def split_feeds(feeds: list[dict[str, np.ndarray]], tokens: int = EFFECT_TOKENS,
                ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """(the first rows of the feeds holding about ``tokens`` prefill tokens, the next rows up to JUDGE_TOKENS): the
    effects are measured on the first part, and the candidates judged on the second, which the effects never saw.
    The second part keeps at least one row."""
    ranked, held, have = [], [], 0
    for feed in feeds:
        rows, length = feed["input_ids"].shape
        take = 0 if have >= tokens else min(rows, max(1, math.ceil((tokens - have) / length)))
        if not held and take == rows and feed is feeds[-1]:
            take = rows - 1  # the last feed: leave one row to judge on
        cut = {k: (v[:take], v[take:]) if v.ndim and v.shape[0] == rows else (v, v) for k, v in feed.items()}
        if take:
            ranked.append({k: a for k, (a, _) in cut.items()})
        if take < rows:
            held.append({k: b for k, (_, b) in cut.items()})
        have += take * length
    held = _first_tokens(held, JUDGE_TOKENS)
    if not ranked or not held:
        raise ValueError("the calibration prefills need at least two rows: one to rank layers on, one to judge on")
    return ranked, held


def _first_tokens(feeds: list[dict[str, np.ndarray]], tokens: int) -> list[dict[str, np.ndarray]]:
    """The first rows of ``feeds`` holding at most ``tokens`` prefill tokens (at least one row)."""
    out, have = [], 0
    for feed in feeds:
        rows, length = feed["input_ids"].shape
        take = min(rows, max(0 if out else 1, (tokens - have) // length))
        if take == 0:
            break
        out.append({k: v[:take] if v.ndim and v.shape[0] == rows else v for k, v in feed.items()})
        have += take * length
    return out


def layer_effects(proto: Any, nodes: list[str], token_nodes: set[str], feeds: list[dict[str, np.ndarray]],
                  logits: str, tokens: int = EFFECT_TOKENS) -> list[LayerEffect]:
    """Each node's effect (module note) with the activation scheme it would be written with, worst first, on the
    first ``tokens`` prefill tokens of ``feeds``."""
    return Simulation(proto, nodes, token_nodes, logits).effects(effect_feeds(feeds, tokens))


def _session(model: Any) -> Any:
    """Basic graph optimizations (constant folding of the shared constants); nothing that fuses the simulation."""
    from onnxpipe.quant.graph import float_session, needs_external_data

    if needs_external_data(model):
        return float_session(model)
    return open_session(model, optimization="basic", purpose="the sensitivity simulation")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _mean_kl(ref_logp: np.ndarray, logits: np.ndarray) -> float:
    logq = _log_softmax(logits)
    return float((np.exp(ref_logp) * (ref_logp - logq)).sum(-1).mean())
