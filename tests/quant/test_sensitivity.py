"""Layers ranked by their effect on the model's output (sensitivity.py), not by their own output error.

A tiny model where the two rankings disagree: ``side`` reads an input with a x1e4 outlier channel (its own int8
output error is near 1) but its output reaches the logits scaled by 1e-4; ``down`` reads an input with a milder
outlier channel (a smaller own error) and its output is the logits' whole input. Quantizing ``down`` alone changes
the predictions; quantizing ``side`` alone does not. The auto search must leave ``down`` in float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpipe.quant.dynamic import PPL_BUDGET_PCT, UNIT_SCALE, _write_dynamic, quantize_dynamic_int8
from onnxpipe.quant.graph import float_session, plan_weights
from onnxpipe.quant.sensitivity import SWITCH, layer_effects, switchable_model
from onnxpipe.quant.smoothquant import with_outputs

V, K, H = 64, 32, 96
DOWN, SIDE, UP = "/layers.0/mlp/down_proj/MatMul", "/layers.0/side/MatMul", "/layers.0/mlp/up_proj/MatMul"


def two_layer_model(seed: int = 0) -> onnx.ModelProto:
    """input_ids -> emb -> up -> down (+ 1e-4 side) -> head predicting token + 1 (down(up(x)) = x). Hidden channel
    7 of ``up`` is x250 (``down``'s row divided to match); ``side`` reads emb * c, c's channel 3 at 1e4 (side's row 3
    divided to match)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((V, K))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    up = np.linalg.qr(rng.standard_normal((H, K)))[0].T
    down = up.T.copy()
    up[:, 7] *= 250.0
    down[7] /= 250.0
    c = np.ones(K)
    c[3] = 1e4
    side = rng.standard_normal((K, K)) / np.sqrt(K)
    side[3] /= 1e4  # the outlier channel carries no more than the others: they round to nothing under its scale
    head = 6.0 * np.roll(emb, 1, axis=0).T
    arrays = {"emb": emb, "up": up, "down": down, "c": c, "side": side, "tiny": np.array(1e-4), "head": head}
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["x"], name="/embed/Gather"),
         helper.make_node("MatMul", ["x", "up"], ["h"], name=UP),
         helper.make_node("MatMul", ["h", "down"], ["z"], name=DOWN),
         helper.make_node("Mul", ["x", "c"], ["xc"], name="/layers.0/side/scale"),
         helper.make_node("MatMul", ["xc", "side"], ["s"], name=SIDE),
         helper.make_node("Mul", ["s", "tiny"], ["s_small"], name="/layers.0/side/damp"),
         helper.make_node("Add", ["z", "s_small"], ["zs"], name="/layers.0/add"),
         helper.make_node("MatMul", ["zs", "head"], ["logits"], name="/lm_head/MatMul")], "two_layer",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "seq", V])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def feeds(seed: int, batches: int = 3) -> list[dict[str, np.ndarray]]:
    start = np.random.default_rng(seed).integers(0, V, size=(batches, 4, 1))
    return [{"input_ids": (s + np.arange(32)) % V} for s in start]


def own_output_errors(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, float]:
    """Each layer's relative output error ||xW - q(x)q(W)|| / ||xW|| under per-token int8 (the written grid)."""
    inputs = {SIDE: ("xc", "side"), DOWN: ("h", "down")}
    values = float_session(with_outputs(proto, [x for x, _ in inputs.values()])).run(
        [x for x, _ in inputs.values()], feed)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = {}
    for (node, (_, w_name)), x in zip(inputs.items(), values):
        w = weights[w_name]
        w_scale = np.abs(w).max(0) / 127.0
        wq = np.round(w / w_scale) * w_scale
        m = np.abs(x).max(-1, keepdims=True)
        xq = np.round(x / m / UNIT_SCALE) * UNIT_SCALE * m
        out[node] = float(np.linalg.norm(x @ w - xq @ wq) / np.linalg.norm(x @ w))
    return out


def test_switches_reproduce_the_float_and_the_written_model(tmp_path: Path) -> None:
    proto = two_layer_model()
    body = [n for n in plan_weights(proto, "logits").linears if n != "/lm_head/MatMul"]
    model, order = switchable_model(proto, body, token_nodes={DOWN})
    assert sorted(order) == sorted(body)
    sim, ref = float_session(model), float_session(proto)
    feed = feeds(0)[0]
    want = ref.run(["logits"], feed)[0]
    off = sim.run(["logits"], {**feed, SWITCH: np.zeros(len(order), np.float32)})[0]
    assert np.abs(off - want).max() == 0.0  # every switch off: the float model exactly
    on = sim.run(["logits"], {**feed, SWITCH: np.ones(len(order), np.float32)})[0]
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    _write_dynamic(copy, tmp_path / "q.onnx", body, [DOWN], per_channel=True)
    written = float_session(onnx.load(str(tmp_path / "q.onnx"))).run(["logits"], feed)[0]
    assert np.abs(on - want).max() > 0.05  # int8 changes the logits here ...
    assert np.abs(on - written).max() <= 1e-3 * np.abs(written).max()  # ... as the written model does


def test_effect_ranking_differs_from_own_error_and_drives_the_float_choice(tmp_path: Path) -> None:
    proto = two_layer_model()
    plan = plan_weights(proto, "logits")
    body = [n for n in plan.linears if n != plan.lm_head]
    calib = feeds(0)
    errors = own_output_errors(proto, calib[0])
    assert errors[SIDE] > 2 * errors[DOWN]  # by its own output error, side is the worst layer
    effects = {e.node: e for e in layer_effects(proto, body, set(body), calib, "logits")}
    assert effects[DOWN].kl > 100 * effects[SIDE].kl  # by its effect on the predictions, down is
    details = quantize_dynamic_int8(proto, tmp_path / "q.onnx", plan, feeds=calib, logits="logits")
    assert details["float_nodes"] == [DOWN]
    assert details["layer_effects"][0]["node"] == DOWN
    assert details["activation_search"]["candidates"][-1]["calibration_ppl_change_pct"] <= PPL_BUDGET_PCT
