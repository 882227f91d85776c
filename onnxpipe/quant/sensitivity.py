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
import onnx_ir as ir

from onnxpipe.quant.graph import (
    UNIT_SCALE,
    UNIT_ZERO,
    add_initializer,
    ir_model,
    make_node,
    per_token_input,
    replace_node,
)
from onnxpipe.quant.quality import prefill_nll
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

    model = ir_model(proto)  # rewritten, then serialized as the copy: ``proto`` is left as it is
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
    wanted = set(nodes)
    shared = "/quant/simulate"
    consts = {k: add_initializer(graph, f"{shared}/{k}", v) for k, v in (
        ("tiny", np.array(1e-30, np.float32)), ("axes", np.array([-1], np.int64)),
        ("unit_scale", np.array(UNIT_SCALE, np.float32)), ("unit_zero", np.array(UNIT_ZERO, np.uint8)),
        ("half", np.array(0.5, np.float32)))}
    switch = ir.Value(name=SWITCH, type=ir.TensorType(ir.DataType.FLOAT))
    order: list[str] = []
    for node in list(graph):
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if node.name not in wanted or weight is None or not weight.is_initializer() or weight.const_value is None:
            continue
        scheme = "token" if node.name in token_nodes else "tensor"
        x, p = node.inputs[0], f"{shared}/{node.name}"
        w = weight.const_value.numpy().astype(np.float32)
        scale = np.abs(w).max(0) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        w_dq = add_initializer(graph, f"{p}/W_dq", (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32))
        index = add_initializer(graph, f"{p}/index", np.array(len(order), np.int64))
        # an If, so that only the branch switched on runs: one effect measurement costs about one float forward
        ops, fq = _fake_quant(x, scheme, f"{p}/fq", consts, opset)
        ops.append(make_node("MatMul", [fq, w_dq], f"{p}/y_int8", f"{p}/MatMul"))
        as_float = make_node(node.op_type, [x, weight], f"{p}/y_float", str(node.name), domain=node.domain)
        gather = make_node("Gather", [switch, index], f"{p}/on", f"{p}/Gather", axis=0)
        greater = make_node("Greater", [gather.outputs[0], consts["half"]], f"{p}/is_on", f"{p}/Greater")
        choose = make_node("If", [greater.outputs[0]], None, f"{p}/If", then_branch=_branch("int8", ops),
                           else_branch=_branch("float", [as_float]))
        replace_node(graph, node, [gather, greater, choose])
        order.append(str(node.name))
    switch.shape = ir.Shape([len(order)])
    graph.inputs.append(switch)
    return ir.serde.serialize_model(model), order


def _branch(name: str, nodes: list[ir.Node]) -> ir.Graph:
    """A branch of an If: ``nodes`` (reading the outer graph's values), its last node's float output its output."""
    out = nodes[-1].outputs[0]
    out.type = ir.TensorType(ir.DataType.FLOAT)
    return ir.Graph([], [out], nodes=nodes, name=name)


def _fake_quant(x: ir.Value | None, scheme: str, q: str, consts: dict[str, ir.Value],
                opset: int) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing x quantized to uint8 and back, with one scale for the tensor or (first) one per token; the
    nodes and their output."""
    if scheme == "token":  # the written form's fixed grid: step 1/127 around zero point 128
        absx, reduce, token_max, unit, xq = per_token_input(x, q, consts, opset)
        scale, zero = consts["unit_scale"], consts["unit_zero"]
        xdq = make_node("DequantizeLinear", [xq.outputs[0], scale, zero], f"{q}/xdq", f"{q}/DQ")
        fq = make_node("Mul", [xdq.outputs[0], token_max.outputs[0]], f"{q}/fq", f"{q}/MulTokenMax")
        return [absx, reduce, token_max, unit, xq, xdq, fq], fq.outputs[0]
    dql = ir.node("DynamicQuantizeLinear", [x], name=f"{q}/DQL", num_outputs=3)
    for value, suffix in zip(dql.outputs, ("xq", "xs", "xz")):
        value.name = f"{q}/{suffix}"
    xdq = make_node("DequantizeLinear", list(dql.outputs), f"{q}/xdq", f"{q}/DQ")
    return [dql, xdq], xdq.outputs[0]


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
