"""Each linear layer's effect on the whole model's output under dynamic int8, measured on calibration prefills.

A layer's own output error does not say what it does to the model's predictions (on SmolLM2-135M the layers with
the largest relative output error were not the ones whose float fallback helped perplexity). So this measures
the effect itself: quantize one layer, leave the rest float, and take the mean KL(float || that model) of the
next-token distributions over calibration prefills (never over the eval text).

Writing one quantized model per layer would cost a model write and a session per layer. Instead one float graph
simulates every layer's int8 form at once, each behind a switch:

    y_i = x W_i + switch[i] * (fq(x) dq(W_i) - x W_i)

``fq(x)`` is x quantized and dequantized as the written layer quantizes it (per tensor: DynamicQuantizeLinear's
uint8 scale and zero point for the whole input; per token: each token divided by its max |x| first, as
dynamic.quantize_per_token does), dq(W) the int8 per-output-channel weights dequantized, and ``switch`` a graph
input of one float per layer. One session then measures any set of layers by its feed. The integer product of the
written model equals fq(x) dq(W) up to float rounding, so the simulation measures what the written layer does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SWITCH = "onnxpipe_quant_switch"
# prefill tokens (rows of the first calibration feeds) each layer's effect is measured on: on SmolLM2-135M a
# measurement of 512 tokens took 4.3 s per layer (913 s for 210, on 2 shared cores); 256 halves that
EFFECT_TOKENS = 256


@dataclass
class LayerEffect:
    """Mean KL(float || float model with only this layer quantized) over the measured positions, in nats."""

    node: str
    scheme: str  # "token" | "tensor": the activation scale the layer is measured (and written) with
    kl: float

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "scheme": self.scheme, "kl": float(f"{self.kl:.4g}")}


def switchable_model(proto: Any, nodes: list[str], token_nodes: set[str]) -> tuple[Any, list[str]]:
    """A copy of the float model in which each named MatMul(x, constant W) is y + switch[i] * (yq - y) (see the
    module note), and the names in switch order (MatMuls without a constant weight are skipped)."""
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
    extra_inits = [numpy_helper.from_array(np.array(1e-30, np.float32), f"{shared}/tiny"),
                   numpy_helper.from_array(np.array([-1], np.int64), f"{shared}/axes")]
    order: list[str] = []
    new_nodes: list[Any] = []
    fake: dict[tuple[str, str], str] = {}  # (x, scheme) -> fq(x), shared by the layers reading x
    for node in graph.node:
        new_nodes.append(node)
        if node.name not in wanted or node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        scheme = "token" if node.name in token_nodes else "tensor"
        x, y, p = node.input[0], node.output[0], f"{shared}/{node.name}"
        if (x, scheme) not in fake:
            fake[(x, scheme)], ops = _fake_quant(x, scheme, f"{shared}/{len(fake)}", shared, opset)
            new_nodes += ops
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        scale = np.abs(w).max(0) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        extra_inits += [numpy_helper.from_array((np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32),
                                                f"{p}/W_dq"),
                        numpy_helper.from_array(np.array(len(order), np.int64), f"{p}/index")]
        node.output[0] = f"{p}/y_float"
        new_nodes += [
            helper.make_node("MatMul", [fake[(x, scheme)], f"{p}/W_dq"], [f"{p}/y_int8"], name=f"{p}/MatMul"),
            helper.make_node("Sub", [f"{p}/y_int8", f"{p}/y_float"], [f"{p}/delta"], name=f"{p}/Sub"),
            helper.make_node("Gather", [SWITCH, f"{p}/index"], [f"{p}/on"], name=f"{p}/Gather", axis=0),
            helper.make_node("Mul", [f"{p}/delta", f"{p}/on"], [f"{p}/delta_on"], name=f"{p}/Mul"),
            helper.make_node("Add", [f"{p}/y_float", f"{p}/delta_on"], [y], name=f"{p}/Add"),
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
    ops += [helper.make_node("DynamicQuantizeLinear", [src], [f"{q}/xq", f"{q}/xs", f"{q}/xz"], name=f"{q}/DQL"),
            helper.make_node("DequantizeLinear", [f"{q}/xq", f"{q}/xs", f"{q}/xz"], [f"{q}/xdq"], name=f"{q}/DQ")]
    if scheme == "token":
        ops.append(helper.make_node("Mul", [f"{q}/xdq", f"{q}/token_max"], [f"{q}/fq"], name=f"{q}/MulTokenMax"))
        return f"{q}/fq", ops
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


def layer_effects(proto: Any, nodes: list[str], token_nodes: set[str], feeds: list[dict[str, np.ndarray]],
                  logits: str, tokens: int = EFFECT_TOKENS) -> list[LayerEffect]:
    """Each node's effect (module note) with the activation scheme it would be written with, worst first."""
    model, order = switchable_model(proto, nodes, token_nodes)
    session = _session(model)
    del model
    sample = effect_feeds(feeds, tokens)
    off = np.zeros(len(order), np.float32)
    reference = [_log_softmax(session.run([logits], {**f, SWITCH: off})[0]) for f in sample]
    effects = []
    for i, name in enumerate(order):
        switch = off.copy()
        switch[i] = 1.0
        kl = [_mean_kl(ref, session.run([logits], {**f, SWITCH: switch})[0]) for ref, f in zip(reference, sample)]
        weights = [f["input_ids"].size for f in sample]
        effects.append(LayerEffect(name, "token" if name in token_nodes else "tensor",
                                   float(np.average(kl, weights=weights))))
    return sorted(effects, key=lambda e: -e.kl)


def _session(model: Any) -> Any:
    """Basic graph optimizations (constant folding of the shared constants); nothing that fuses the simulation."""
    import onnxruntime as ort

    from onnxpipe.quant.graph import float_session, needs_external_data

    if needs_external_data(model):
        return float_session(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _mean_kl(ref_logp: np.ndarray, logits: np.ndarray) -> float:
    logq = _log_softmax(logits)
    return float((np.exp(ref_logp) * (ref_logp - logq)).sum(-1).mean())
