"""The LM head run only at the position each row reads (runtime/last_position.py): same logits as the full graph,
[batch, 1, vocab] out of the graph, and heads that are not provably position-wise left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxpipe.runtime import session as session_mod
from onnxpipe.runtime.generate import LanguageModel
from onnxpipe.runtime.last_position import LAST_INDEX, gather_last_position
from onnxpipe.runtime.session import DecoderSession

PROMPTS = [[5, 9, 12, 3, 7, 100, 20], [44, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _steps(lm: LanguageModel, steps: int = 4) -> list[np.ndarray]:
    """Per-row logits of the prefill and of ``steps`` greedy decode steps."""
    cfg = lm._config({"max_new_tokens": steps + 1, "stop_token_ids": []})
    rows = lm._rows(PROMPTS, cfg)
    mask, _, cache, logits = lm.prefill(rows, 32, "logits")
    out = [logits]
    for _ in range(steps):
        mask, logits = lm.decode_step(logits.argmax(-1), mask, cache, "logits")
        out.append(logits)
    return out


@pytest.mark.parametrize("form", ["llama", "gpt2", "mistral", "qwen2", "qwen3", "phi3", "cuda-llama", "cuda-gpt2"])
def test_same_logits_as_the_full_head(tiny_onnx, cuda_form, form):
    """Every family's export (left padding) and the CUDA form (right padding, fused norms and attention)."""
    path = cuda_form(form[5:]) if form.startswith("cuda-") else tiny_onnx(form)
    full = DecoderSession(path, "cpu", last_position=False)
    last = DecoderSession(path, "cpu", last_position=True)
    assert last.last_position, last.last_position_why_not
    assert not full.last_position and LAST_INDEX not in {i.name for i in full.session.get_inputs()}
    out = {o.name: o.shape for o in last.session.get_outputs()}
    assert out[last.logits_name][1] == 1  # the graph's logits: one position per row
    for a, b in zip(_steps(LanguageModel(full, None)), _steps(LanguageModel(last, None))):
        assert a.shape == b.shape == (len(PROMPTS), full.vocab_size)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_the_graph_computes_only_the_asked_positions(tiny_onnx):
    """Fed straight to onnxruntime: the edited graph's logits row r is the full graph's logits at last_index[r]."""
    import onnxruntime as ort

    path = tiny_onnx("llama") / "model.onnx"
    proto = onnx.load(str(path))
    assert gather_last_position(proto, "logits") is None
    full = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    last = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in full.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.array([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]], np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((2, 5), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(5), (2, 1))
        else:
            shape = [2 if d == "batch_size" else 0 if isinstance(d, str) else d for d in i.shape]
            feeds[i.name] = np.zeros(shape, np.float32)
    want = full.run(["logits"], feeds)[0]
    got = last.run(["logits"], {**feeds, LAST_INDEX: np.array([1, 4], np.int64)})[0]
    assert got.shape == (2, 1, want.shape[2])
    np.testing.assert_allclose(got[:, 0], want[[0, 1], [1, 4]], rtol=1e-6, atol=1e-6)


def _graph(tail: str) -> onnx.ModelProto:
    """h = x + x (two readers of one tensor: where a walk back must stop, as at a norm), then a head and ``tail``."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 6], np.ones(24, np.float32).tolist())
    nodes = [helper.make_node("Add", ["x", "x"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["z"])]
    if tail == "softmax over the sequence":
        nodes.append(helper.make_node("Softmax", ["z"], ["logits"], axis=1))
    elif tail == "second reader":
        nodes += [helper.make_node("Identity", ["z"], ["logits"]), helper.make_node("Identity", ["z"], ["also"])]
    elif tail == "no head":
        nodes = [helper.make_node("Add", ["x", "x"], ["h"]), helper.make_node("Mul", ["h", "two"], ["logits"])]
    else:
        nodes.append(helper.make_node("Cast", ["z"], ["logits"], to=TensorProto.FLOAT))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", 6])]
    if tail == "second reader":
        outputs.append(helper.make_tensor_value_info("also", TensorProto.FLOAT, ["B", "S", 6]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 4])], outputs,
                          initializer=[w, helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("tail,why", [("softmax over the sequence", "Softmax"), ("second reader", "MatMul"),
                                      ("no head", "no float LM head")])
def test_heads_not_provably_positionwise_are_left_alone(tail, why):
    proto = _graph(tail)
    before = proto.SerializeToString()
    reason = gather_last_position(proto, "logits")
    assert reason is not None and why in reason
    assert proto.SerializeToString() == before


def test_a_positionwise_head_is_gathered_before_its_matmul():
    proto = _graph("cast")
    assert gather_last_position(proto, "logits") is None
    matmul = next(n for n in proto.graph.node if n.op_type == "MatMul")
    assert matmul.input[0] == "onnxpipe_last/hidden_state"
    onnx.checker.check_model(proto)
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"x": x, LAST_INDEX: np.array([2, 0], np.int64)})[0]
    np.testing.assert_allclose(got[:, 0], (x * 2 @ np.ones((4, 6), np.float32))[[0, 1], [2, 0]], rtol=1e-6)


def test_inline_weights_above_the_limit_are_not_rebuilt(tiny_onnx, monkeypatch):
    monkeypatch.setattr(session_mod, "INLINE_EDIT_BYTES", 0)
    s = DecoderSession(tiny_onnx("llama"), "cpu")
    assert not s.last_position and "inline" in s.last_position_why_not
    assert DecoderSession(tiny_onnx("llama"), "cpu", last_position=True).last_position  # asked for: done anyway


def test_tensorrt_profiles_name_the_gather_index(tiny_onnx, monkeypatch):
    """TensorRT profiles must name every dynamic input: the session hands create_session the graph's inputs plus
    onnxpipe.last_index, and the profile string then carries it at the batch range."""
    from onnxpipe.runtime import providers

    seen = {}
    real = providers.create_session

    def spy(*args, **kw):
        seen["inputs"] = kw.get("graph_inputs")
        return real(*args, **kw)

    monkeypatch.setattr(session_mod, "create_session", spy)
    s = DecoderSession(tiny_onnx("llama"), "cpu", last_position=True)
    assert s.last_position
    names = [i["name"] for i in seen["inputs"]]
    assert names[-1] == LAST_INDEX and names[:-1] == [i["name"] for i in s.manifest.graph["inputs"]]
    shapes = providers.trt_profile_shapes(seen["inputs"], providers.TensorRTOptions())
    assert f"{LAST_INDEX}:" in shapes["trt_profile_max_shapes"]
