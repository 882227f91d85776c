"""What the attention fusion relies on, measured on this onnxruntime's CPU GroupQueryAttention:

* a left-padded batch works when every row gets seqlens_k = T - 1 and the padding goes in attention_bias;
* local_window_size = W admits key j for query i iff i - j < W (HF's sliding_window semantics);
* with query_seqlens = S, a multi-token step after a past works for batch > 1.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

N, KV, H = 4, 2, 8


def _gqa_session(window: int):
    import onnxruntime as ort

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in [
        ("q", ["B", "S", N * H]), ("k", ["B", "S", KV * H]), ("v", ["B", "S", KV * H]),
        ("pk", ["B", KV, "P", H]), ("pv", ["B", KV, "P", H]), ("bias", ["B", 1, "S", "T"])]]
    ins += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
            helper.make_tensor_value_info("total", TensorProto.INT32, []),
            helper.make_tensor_value_info("qs", TensorProto.INT32, ["B"])]
    inputs = ["q", "k", "v", "pk", "pv", "seqlens_k", "total", "", "", "", "bias", "", "", "", "", "", "qs"]
    node = helper.make_node("GroupQueryAttention", inputs, ["o", "yk", "yv"], domain="com.microsoft",
                            num_heads=N, kv_num_heads=KV, local_window_size=window)
    graph = helper.make_graph([node], "gqa", ins, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                  for n in ("o", "yk", "yv")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _reference(q, k, v, pk, pv, mask, window):
    b, s, _ = q.shape
    keys = np.concatenate([pk, k.reshape(b, s, KV, H).transpose(0, 2, 1, 3)], 2)
    values = np.concatenate([pv, v.reshape(b, s, KV, H).transpose(0, 2, 1, 3)], 2)
    t = keys.shape[2]
    qh = q.reshape(b, s, N, H).transpose(0, 2, 1, 3)
    scores = qh @ np.repeat(keys, N // KV, 1).transpose(0, 1, 3, 2) / np.sqrt(H)
    i, j = np.arange(s)[:, None] + t - s, np.arange(t)[None, :]
    allowed = (j <= i) & ((i - j < window) if window > 0 else True)
    allowed = allowed[None, None] & (mask[:, None, None, :] > 0)
    scores = np.where(allowed, scores, -np.inf)
    with np.errstate(invalid="ignore"):  # fully padded query rows are NaN here; only real rows are compared
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return (p @ np.repeat(values, N // KV, 1)).transpose(0, 2, 1, 3).reshape(b, s, N * H), keys


@pytest.mark.parametrize("window", [-1, 3])
@pytest.mark.parametrize("steps", [(7, 1, 1, 1), (5, 3, 1)])
def test_gqa_left_padding_with_bias(window: int, steps: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    sess = _gqa_session(window)
    batch = 2
    mask = np.zeros((batch, 0), np.int64)
    pk = pv = np.zeros((batch, KV, 0, H), np.float32)
    for n, s in enumerate(steps):
        new = np.ones((batch, s), np.int64)
        if n == 0:
            new[1, :3] = 0  # row 1 is left-padded
        mask = np.concatenate([mask, new], 1)
        t = mask.shape[1]
        q, k, v = (rng.standard_normal((batch, s, d)).astype(np.float32) for d in (N * H, KV * H, KV * H))
        bias = np.where(mask[:, None, None, :] > 0, 0, np.finfo(np.float32).min).astype(np.float32)
        feeds = dict(q=q, k=k, v=v, pk=pk, pv=pv, bias=np.ascontiguousarray(np.broadcast_to(bias, (batch, 1, s, t))),
                     seqlens_k=np.full(batch, t - 1, np.int32), total=np.array(t, np.int32),
                     qs=np.full(batch, s, np.int32))
        out, pk, pv = sess.run(None, feeds)
        want, want_keys = _reference(q, k, v, feeds["pk"], feeds["pv"], mask, window)
        valid = mask[:, -s:] > 0
        assert np.abs(out - want)[valid].max() < 1e-5
        np.testing.assert_array_equal(pk, want_keys)


def test_gqa_window_is_not_w_minus_one() -> None:
    """The check above can fail: the other reading of the window (i - j <= W) disagrees."""
    rng = np.random.default_rng(1)
    sess = _gqa_session(3)
    q, k, v = (rng.standard_normal((1, 7, d)).astype(np.float32) for d in (N * H, KV * H, KV * H))
    empty = np.zeros((1, KV, 0, H), np.float32)
    feeds = dict(q=q, k=k, v=v, pk=empty, pv=empty, bias=np.zeros((1, 1, 7, 7), np.float32),
                 seqlens_k=np.array([6], np.int32), total=np.array(7, np.int32), qs=np.array([7], np.int32))
    out = sess.run(None, feeds)[0]
    wider, _ = _reference(q, k, v, empty, empty, np.ones((1, 7)), 4)
    assert np.abs(out - wider).max() > 1e-3
