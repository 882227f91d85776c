"""The shared past/present buffer path (``graph.kv.shares_buffer``) with right padding, on a one-layer model built
here around ORT's GroupQueryAttention (no stage writes such graphs yet): batched generation in a preallocated,
in-place cache must give the tokens of plain single runs of the same graph with a growing cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxpipe.runtime import load

V, H, KVH, D, MAXPOS = 64, 4, 2, 8, 64
C = H * D


def _graph(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {
        "E": rng.normal(0, 1, (V, C)), "PE": rng.normal(0, 1, (MAXPOS, C)),
        "Wq": rng.normal(0, C ** -0.5, (C, C)), "Wk": rng.normal(0, C ** -0.5, (C, KVH * D)),
        "Wv": rng.normal(0, C ** -0.5, (C, KVH * D)), "Wout": rng.normal(0, 1, (C, V)),
    }
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in w.items()]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("Gather", ["PE", "position_ids"], ["pe"]),
        helper.make_node("Add", ["emb", "pe"], ["x"]),
        helper.make_node("MatMul", ["x", "Wq"], ["q"]),
        helper.make_node("MatMul", ["x", "Wk"], ["k"]),
        helper.make_node("MatMul", ["x", "Wv"], ["v"]),
        helper.make_node("ReduceSum", ["attention_mask", "ax1"], ["len"], keepdims=0),
        helper.make_node("Sub", ["len", "one"], ["len1"]),
        helper.make_node("Cast", ["len1"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["tot1"], start=1, end=2),
        helper.make_node("Squeeze", ["tot1"], ["tot"]),
        helper.make_node("Cast", ["tot"], ["total"], to=TensorProto.INT32),
        helper.make_node("GroupQueryAttention",
                         ["q", "k", "v", "past_key_values.0.key", "past_key_values.0.value", "seqlens_k", "total"],
                         ["attn", "present.0.key", "present.0.value"], domain="com.microsoft", num_heads=H, kv_num_heads=KVH),
        helper.make_node("Add", ["x", "attn"], ["h"]),
        helper.make_node("MatMul", ["h", "Wout"], ["logits"]),
    ]
    kv = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch_size", KVH, s, D])  # noqa: E731
    graph = helper.make_graph(
        nodes, "gqa_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         kv("past_key_values.0.key", "past_sequence_length"), kv("past_key_values.0.value", "past_sequence_length")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", V]),
         kv("present.0.key", "present_sequence_length"), kv("present.0.value", "present_sequence_length")],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    onnx.save_model(model, str(path))


def _model_dir(path, shares_buffer, padding_side):
    path.mkdir()
    _graph(path / "model.onnx")
    manifest = {
        "format_version": 1,
        "model": {"vocab_size": V, "num_kv_heads": KVH, "head_dim": D, "num_layers": 1, "max_position_embeddings": MAXPOS},
        "graph": {"file": "model.onnx", "dtype": "fp32", "logits": "logits", "padding_side": padding_side,
                  "inputs": [], "outputs": [],
                  "kv": {"num_layers": 1, "num_kv_heads": KVH, "head_dim": D, "shares_buffer": shares_buffer,
                         "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
                         "present_key": "present.{i}.key", "present_value": "present.{i}.value"}},
        "tokenizer": {"eos_token_id": []},
    }
    (path / "onnxpipe.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("gqa")
    return _model_dir(base / "plain", False, "left"), _model_dir(base / "shared", True, "right")


PROMPTS = [[5, 9, 12, 3, 7, 33, 20], [44, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def test_shared_buffer_batch_equals_plain_single_runs(dirs):
    plain, shared = dirs
    lm_plain, lm_shared = load(plain, "cpu"), load(shared, "cpu")
    assert lm_shared.session.shares_buffer and lm_shared.session.padding_side == "right"
    singles = [lm_plain.generate(p, max_new_tokens=16).token_ids for p in PROMPTS]
    assert len({tuple(s) for s in singles}) == 3
    for p, want in zip(PROMPTS, singles):
        assert lm_shared.generate(p, max_new_tokens=16).token_ids == want
    batch = lm_shared.generate(PROMPTS, max_new_tokens=16)
    assert [r.token_ids for r in batch] == singles
    # rows stopping at different steps: the cache is compacted on the way
    stop = singles[1][2]
    ragged = lm_shared.generate(PROMPTS, max_new_tokens=16, stop_token_ids=[stop])
    for r, s in zip(ragged, singles):
        assert r.token_ids == (s[: s.index(stop) + 1] if stop in s else s)


def test_shared_buffer_is_written_in_place(dirs):
    _, shared = dirs
    s = load(shared, "cpu").session
    cache = s.new_cache(1, capacity=12)
    before = [v.data_ptr() for v in cache.values]
    s.forward(np.array([[5, 6, 7]]), np.ones((1, 3), np.int64), np.arange(3)[None], cache, want="argmax")
    s.forward(np.array([[8]]), np.ones((1, 4), np.int64), np.array([[3]]), cache, want="argmax")
    assert [v.data_ptr() for v in cache.values] == before and cache.values[0].shape() == [1, KVH, 12, D]
    assert cache.length == 4
