"""The quantizers' graph construction gives exactly the outputs it gave when it was written with onnx.helper.

A tiny hand-built decoder-shaped graph (token lookup, Gemm layers with and without transB and bias, q/k sharing an
input, an RMSNorm written out as ops, a tied LM head) goes through each graph rewrite of onnxpipe.quant; the
logits of each result on fixed ids are compared, bit for bit, with those recorded in golden/graph_rewrites.npz by
the protobuf implementation (before its rewrite onto onnx_ir), along with each result's op counts.

    python tests/quant/test_graph_equivalence.py --write [NAME...]   # re-record (when a rewrite changes on purpose)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

GOLDEN = Path(__file__).parent / "golden" / "graph_rewrites.npz"
IDS = np.array([[0, 5, 39], [7, 7, 1]], np.int64)
V = 40


def tiny_model(h: int, residual: str = "xn") -> onnx.ModelProto:
    """``residual`` "x2": the norm's output feeds q and k alone (SmoothQuant folds into the norm's weight)."""
    rng = np.random.default_rng(h)

    def w(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.normal(size=shape) * scale / np.sqrt(shape[0])).astype(np.float32)

    inits = {"embed": w(V, h, scale=np.sqrt(V)), "fc.weight": w(h, 2 * h), "fc.bias": w(2 * h),
             "proj.weight": w(h, 2 * h, scale=np.sqrt(2)), "q.weight": w(h, h), "k.weight": w(h, h),
             "down.weight": w(h, h), "norm.weight": (1 + 0.1 * rng.normal(size=h)).astype(np.float32),
             "two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), "axes": np.array([-1], np.int64),
             "flat": np.array([-1, h], np.int64), "shape3": np.array([2, 3, h], np.int64)}
    make = helper.make_node
    nodes = [
        make("Gather", ["embed", "input_ids"], ["x0"], name="/model/embed_tokens/Gather"),
        make("Reshape", ["x0", "flat"], ["x0f"], name="/model/flat/Reshape"),
        make("Gemm", ["x0f", "fc.weight", "fc.bias"], ["x1"], name="/model/layers.0/mlp/fc/Gemm"),
        make("Relu", ["x1"], ["x1r"], name="/model/layers.0/mlp/Relu"),
        make("Gemm", ["x1r", "proj.weight"], ["x2f"], name="/model/layers.0/mlp/proj/Gemm", transB=1),
        make("Reshape", ["x2f", "shape3"], ["x2"], name="/model/unflat/Reshape"),
        make("Pow", ["x2", "two"], ["sq"], name="/model/norm/Pow"),
        make("ReduceMean", ["sq", "axes"], ["ms"], name="/model/norm/ReduceMean"),
        make("Add", ["ms", "eps"], ["mse"], name="/model/norm/Add"),
        make("Sqrt", ["mse"], ["rms"], name="/model/norm/Sqrt"),
        make("Div", ["x2", "rms"], ["xn0"], name="/model/norm/Div"),
        make("Mul", ["xn0", "norm.weight"], ["xn"], name="/model/norm/Mul"),
        make("MatMul", ["xn", "q.weight"], ["q"], name="/model/layers.0/attn/q_proj/MatMul"),
        make("MatMul", ["xn", "k.weight"], ["k"], name="/model/layers.0/attn/k_proj/MatMul"),
        make("Mul", ["q", "k"], ["qk"], name="/model/layers.0/attn/Mul"),
        make("Softmax", ["qk"], ["p"], name="/model/layers.0/attn/Softmax", axis=-1),
        make("MatMul", ["p", "down.weight"], ["d"], name="/model/layers.0/mlp/down_proj/MatMul"),
        make("Add", ["d", residual], ["hidden"], name="/model/layers.0/Add"),
        make("Transpose", ["embed"], ["embed_T"], name="/lm_head/Transpose", perm=[1, 0]),
        make("MatMul", ["hidden", "embed_T"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3, V])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _exposed(h: int) -> tuple[onnx.ModelProto, Any]:
    from onnxpipe.quant.graph import expose_weights

    model = tiny_model(h)
    return model, expose_weights(model, "logits")


def _body(plan: Any) -> list[str]:
    return [n for n in plan.linears if n != plan.lm_head]


def expose(h: int) -> onnx.ModelProto:
    return _exposed(h)[0]


def vocab_tables(h: int) -> onnx.ModelProto:
    from onnxpipe.quant.embedding import quantize_vocab_tables

    model, plan = _exposed(h)
    quantize_vocab_tables(model, plan.lm_head, V, head=True, embeddings=True, accuracy_level=0)
    return model


def per_token(h: int) -> onnx.ModelProto:
    from onnxpipe.quant.dynamic import quantize_per_token

    model, plan = _exposed(h)
    quantize_per_token(model, _body(plan))
    return model


def int4_per_channel(h: int) -> onnx.ModelProto:
    from onnxpipe.quant.int4 import _rtn_per_channel, _use_opset_21

    model, plan = _exposed(h)
    _use_opset_21(model)
    _rtn_per_channel(model, _body(plan))
    return model


def int4_float_zero_points(h: int) -> onnx.ModelProto:
    from onnxpipe.quant.int4 import _rtn_blocks, _set_accuracy_level

    model, plan = _exposed(h)
    _rtn_blocks(model, _body(plan), 16, 0)
    _set_accuracy_level(model, 0)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):  # the vocabulary tables declare it
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def int4_nbits(h: int) -> onnx.ModelProto:
    from onnxpipe.quant.int4 import _nbits, _set_accuracy_level

    model, plan = _exposed(h)
    model = _nbits(model, 4, 16, _body(plan), plan.linears, 0)
    _set_accuracy_level(model, 0)
    return model


def fp16(h: int) -> onnx.ModelProto:
    import tempfile

    from onnxpipe.quant.fp16 import convert_fp16

    with tempfile.TemporaryDirectory() as tmp:
        convert_fp16(tiny_model(h), Path(tmp) / "model.onnx", None, "logits")
        return onnx.load(str(Path(tmp) / "model.onnx"))


def _smoothed(h: int, alpha: Any) -> onnx.ModelProto:
    from onnxpipe.quant.graph import expose_weights
    from onnxpipe.quant.smoothquant import smooth_model

    model = tiny_model(h, residual="x2")
    plan = expose_weights(model, "logits")
    feeds = [{"input_ids": IDS}, {"input_ids": IDS[::-1].copy()}]
    if callable(alpha):
        alpha = alpha(model, _body(plan))
    smoothed, report = smooth_model(model, _body(plan), alpha, feeds, feeds[0], "logits")
    assert report.folded >= 1 and report.inserted_muls >= 1  # both ways of moving 1/s are exercised
    return smoothed


def smoothquant(h: int) -> onnx.ModelProto:
    return _smoothed(h, 0.5)


def smoothquant_per_group(h: int) -> onnx.ModelProto:
    """One alpha per activation (layer_alpha's form), one group at 0 (left alone)."""
    from onnxpipe.quant.smoothquant import activation_groups

    def alphas(model: onnx.ModelProto, body: list[str]) -> dict[str, float]:
        xs = list(activation_groups(model, body))
        return {x: [0.0, 0.3, 0.8][i % 3] for i, x in enumerate(xs)}

    return _smoothed(h, alphas)


def planted_outliers(h: int) -> onnx.ModelProto:
    from onnxpipe.quant.graph import expose_weights
    from onnxpipe.quant.smoothquant import plant_outliers

    model = tiny_model(h, residual="x2")
    plan = expose_weights(model, "logits")
    assert plant_outliers(model, _body(plan), 8.0, 3) == 1  # the group the norm feeds alone
    return model


REWRITES: dict[str, Callable[[int], onnx.ModelProto]] = {
    "expose": expose, "vocab_tables": vocab_tables, "per_token": per_token, "int4_per_channel": int4_per_channel,
    "int4_float_zero_points": int4_float_zero_points, "int4_nbits": int4_nbits, "fp16": fp16,
    "smoothquant": smoothquant, "smoothquant_per_group": smoothquant_per_group, "planted_outliers": planted_outliers,
}
EXACT = {"expose", "smoothquant", "smoothquant_per_group", "planted_outliers"}  # the float function, rounding aside
CASES = [(name, h) for name in REWRITES for h in (32, 320)]


def run(model: onnx.ModelProto, **extra: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": IDS, **extra})[0]


def switchable(h: int) -> dict[str, np.ndarray]:
    """sensitivity.switchable_model (every body layer behind an If; q per token, the rest per tensor): the logits
    with every switch off, every switch on, and each one alone on."""
    from onnxpipe.quant.sensitivity import SWITCH, switchable_model

    model, plan = _exposed(h)
    body = _body(plan)
    sim, order = switchable_model(model, body, token_nodes={body[2]})
    assert order == body
    states = {"off": np.zeros(len(order), np.float32), "on": np.ones(len(order), np.float32)}
    states.update({f"only{i}": np.eye(len(order), dtype=np.float32)[i] for i in range(len(order))})
    return {name: run(sim, **{SWITCH: switch}) for name, switch in states.items()}


def record(name: str, h: int) -> tuple[np.ndarray, dict[str, int]]:
    from onnxpipe.quant.graph import op_counts

    model = REWRITES[name](h)
    return run(model), op_counts(model)


@pytest.mark.parametrize("name, h", CASES)
def test_rewrite_gives_the_recorded_outputs(name: str, h: int) -> None:
    golden = np.load(GOLDEN)
    logits, ops = record(name, h)
    assert ops == json.loads(str(golden[f"{name}/{h}/ops"]))
    np.testing.assert_array_equal(logits, golden[f"{name}/{h}/logits"])
    if name not in EXACT:  # a check that can fail: every quantizing rewrite moves the logits
        assert not np.array_equal(logits, golden[f"expose/{h}/logits"])


@pytest.mark.parametrize("h", [32, 320])
def test_switchable_model_gives_the_recorded_outputs(h: int) -> None:
    golden = np.load(GOLDEN)
    outputs = switchable(h)
    for state, logits in outputs.items():
        np.testing.assert_array_equal(logits, golden[f"switchable/{h}/{state}"])
    np.testing.assert_array_equal(outputs["off"], golden[f"expose/{h}/logits"])  # all off: the float model
    assert not np.array_equal(outputs["on"], outputs["off"])


def test_exposed_graph_is_the_float_model() -> None:
    for h in (32, 320):  # Gemm -> MatMul + Add sums in another order: fp32 rounding only
        ref = run(tiny_model(h))
        assert np.abs(record("expose", h)[0] - ref).max() <= 1e-6 * np.abs(ref).max()


if __name__ == "__main__" and sys.argv[1:2] == ["--write"]:  # --write [NAME...]: those only, the rest kept
    GOLDEN.parent.mkdir(exist_ok=True)
    out: dict[str, Any] = dict(np.load(GOLDEN)) if GOLDEN.exists() and sys.argv[2:] else {}
    for name, h in CASES:
        if sys.argv[2:] and name not in sys.argv[2:]:
            continue
        logits, ops = record(name, h)
        out[f"{name}/{h}/logits"], out[f"{name}/{h}/ops"] = logits, np.array(json.dumps(ops))
        print(name, h, ops)
    for h in (32, 320):
        if not sys.argv[2:] or "switchable" in sys.argv[2:]:
            out.update({f"switchable/{h}/{state}": v for state, v in switchable(h).items()})
    np.savez(GOLDEN, **out)
