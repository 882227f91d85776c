"""Dynamic int8 "auto" with an outlier channel inside every token: per-token scales cannot help, float can.

SmolLM2-135M's down_proj inputs carry channels far above the token's other channels, in every token; a per-token
scale is then set by that channel and the token's other channels round to nothing. A tiny model with such a
channel planted (x1e4 on one hidden channel, the next layer's weight row divided to match: the same float
function) must make the auto search leave that layer, and only that one, in float, and so get within the budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpipe.quant.dynamic import PPL_BUDGET_PCT, calibration_perplexity, quantize_dynamic_int8
from onnxpipe.quant.graph import plan_weights

V, K, H = 64, 32, 96
PLANTED = "/layers.0/mlp/down_proj/MatMul"


def next_token_model(factor: float, seed: int = 0) -> onnx.ModelProto:
    """input_ids -> lookup -> up (K -> H) -> down (H -> K) -> head (K -> V) predicting token + 1: down(up(x)) = x,
    and the head scores each token by its predecessor's embedding. Hidden channel 7 is ``factor`` times larger,
    down's row 7 ``factor`` times smaller."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((V, K))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    up = np.linalg.qr(rng.standard_normal((H, K)))[0].T  # [K, H], orthonormal rows: up @ up.T = I
    down = up.T.copy()
    up[:, 7] *= factor
    down[7] /= factor
    head = 6.0 * np.roll(emb, 1, axis=0).T  # logit of v: 6 <x, emb[v - 1]>
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["x"], name="/embed/Gather"),
         helper.make_node("MatMul", ["x", "up"], ["h"], name="/layers.0/mlp/up_proj/MatMul"),
         helper.make_node("MatMul", ["h", "down"], ["z"], name=PLANTED),
         helper.make_node("MatMul", ["z", "head"], ["logits"], name="/lm_head/MatMul")], "next_token",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "seq", V])],
        [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
         ((emb, "emb"), (up, "up"), (down, "down"), (head, "head"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def counting_feeds(seed: int, batches: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    start = rng.integers(0, V, size=(batches, 4, 1))
    return [{"input_ids": (s + np.arange(32)) % V} for s in start]


def test_auto_keeps_the_planted_layer_float(tmp_path: Path) -> None:
    proto = next_token_model(factor=1e4)
    plan = plan_weights(proto, "logits")
    feeds = counting_feeds(0)
    details = quantize_dynamic_int8(proto, tmp_path / "q.onnx", plan, feeds=feeds, logits="logits")
    tried = details["activation_search"]["candidates"]
    # per token everywhere loses far more than the budget: the planted channel is in every token
    assert tried[0]["float_nodes"] == 0 and tried[0]["calibration_ppl_change_pct"] > 10 * PPL_BUDGET_PCT
    assert details["layer_effects"][0]["node"] == PLANTED
    assert details["layer_effects"][0]["layer"] == "layers.0.mlp.down_proj"
    # the first float candidate (the worst layer) is within the budget and kept
    assert tried[-1]["float_nodes"] == 1 and tried[-1]["calibration_ppl_change_pct"] <= PPL_BUDGET_PCT
    assert details["activation_search"]["written_calibration_ppl_change_pct"] <= PPL_BUDGET_PCT
    assert details["float_nodes"] == [PLANTED] and details["float_layers"] == ["layers.0.mlp.down_proj"]
    assert details["quantized_nodes"] == len(plan.linears) - 1
    choice = {n: c for c in details["activation_choice"] for n in c["nodes"]}
    assert choice[PLANTED]["float_nodes"] == [PLANTED]
    out = onnx.load(str(tmp_path / "q.onnx"))
    kept = [n for n in out.graph.node if n.name == PLANTED]
    assert len(kept) == 1 and kept[0].op_type == "MatMul"  # the fp32 MatMul, untouched
    assert sum(n.op_type == "MatMul" for n in out.graph.node) == 1
    # and on fresh text it holds: within the budget of the float model, where the best threshold is far off
    fresh = counting_feeds(1)
    float_path = tmp_path / "float.onnx"
    onnx.save(next_token_model(factor=1e4), str(float_path))
    ppl = calibration_perplexity(float_path, fresh, "logits")
    assert calibration_perplexity(tmp_path / "q.onnx", fresh, "logits") <= ppl * (1 + PPL_BUDGET_PCT / 100)


def test_auto_leaves_nothing_float_without_the_outlier(tmp_path: Path) -> None:
    proto = next_token_model(factor=1.0)
    details = quantize_dynamic_int8(proto, tmp_path / "q.onnx", plan_weights(proto, "logits"),
                                    feeds=counting_feeds(0), logits="logits")
    assert details["float_nodes"] == [] and len(details["activation_search"]["candidates"]) == 1
    assert details["per_token_nodes"] == details["quantized_nodes"] == 3  # per token everywhere, the first candidate
    assert details["batch_independent"] is True and details["layer_effects"] == []  # nothing to rank
