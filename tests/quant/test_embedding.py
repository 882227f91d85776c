"""The vocabulary tables: 8 bits per row (in blocks of at most 256), one table for a tied lookup and head, the same
values on both paths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.quant.embedding import dequantize_rows, quantize_rows, quantize_vocab_tables
from onnxpipe.quant.graph import expose_weights


def test_rows_error_is_half_a_step_per_row() -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 24)).astype(np.float32) * rng.uniform(0.01, 10, size=(50, 1)).astype(np.float32)
    q, scale, block = quantize_rows(table)
    assert q.shape == (50, 1, 32) and q.dtype == np.uint8 and block == 32
    assert np.all(q[:, 0, 24:] == 128)  # padding dequantizes to 0
    err = np.abs(dequantize_rows(q, scale, 24) - table)
    assert np.all(err <= scale / 2 + 1e-7)  # per-row scale: small rows keep their precision


def tied_model(v: int = 40, h: int = 24) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    table = rng.normal(size=(v, h)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"], name="emb"),
        helper.make_node("Transpose", ["embed"], ["embed_T"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "embed_T"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3, v]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, h])],
        [numpy_helper.from_array(table, "embed")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_tied_table_is_stored_once_and_both_paths_agree() -> None:
    import onnxruntime as ort

    model = tied_model()
    table = numpy_helper.to_array(model.graph.initializer[0])
    plan = expose_weights(model, "logits")
    report = quantize_vocab_tables(model, plan.lm_head, 40, head=True, embeddings=True, accuracy_level=0)
    onnx.checker.check_model(model)
    assert "shared" in report.lm_head and report.embeddings == ["emb"]
    tables = [t for t in model.graph.initializer if t.data_type == TensorProto.UINT8]
    assert len(tables) == 1 and not any(t.data_type == TensorProto.FLOAT and 24 in t.dims for t in model.graph.initializer)
    readers = [n.op_type for n in model.graph.node if tables[0].name in n.input]
    assert sorted(readers) == ["Gather", "MatMulNBits"]
    ids = np.array([[0, 5, 39], [7, 7, 1]], np.int64)
    logits, x = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    q, scale, _ = quantize_rows(table)
    deq = dequantize_rows(q, scale, 24)
    np.testing.assert_allclose(x, deq[ids], atol=1e-6)  # the lookup returns the dequantized rows exactly
    np.testing.assert_allclose(logits, x @ deq.T, rtol=1e-4, atol=1e-4)  # the head uses the same table


@pytest.mark.parametrize("h", [320, 512])
def test_wide_rows_are_blocks_of_at_most_256(h: int) -> None:
    """onnxruntime < 1.32 refuses MatMulNBits blocks over 256: a wider row is split into blocks of 256, one scale
    each, and padded (320 -> 2 x 256) with the zero point."""
    rng = np.random.default_rng(2)
    table = rng.normal(size=(30, h)).astype(np.float32) * rng.uniform(0.01, 10, size=(30, 1)).astype(np.float32)
    q, scale, block = quantize_rows(table)
    blocks = -(-h // 256)
    assert block == 256 and q.shape == (30, blocks, 256) and scale.shape == (30, blocks)
    assert np.all(q.reshape(30, -1)[:, h:] == 128)
    err = np.abs(dequantize_rows(q, scale, h) - table)
    step = np.repeat(scale, 256, axis=1)[:, :h]
    assert np.all(err <= step / 2 + 1e-7)  # half a step of each entry's own block
    assert np.all(err.max(1) <= np.abs(table).max(1) / 254 * (1 + 1e-6))  # no worse than one scale per row


def untied_model(v: int, h: int) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"], name="emb"),
        helper.make_node("MatMul", ["x", "head_w"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", v]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", h])],
        [numpy_helper.from_array(rng.normal(size=(v, h)).astype(np.float32), "embed"),
         numpy_helper.from_array((rng.normal(size=(h, v)) / np.sqrt(h)).astype(np.float32), "head_w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("build, h", [(tied_model, 320), (tied_model, 512), (untied_model, 320)])
def test_wide_model_blocks_load_and_match_the_float_model(build, h: int) -> None:  # noqa: ANN001
    """The head (MatMulNBits over blocks of 256) and the lookup (each block times its scale, then one row) on a
    model wider than 256: the lookup returns the dequantized table's rows, the logits follow the float model's."""
    import onnxruntime as ort

    v = 40
    model = build(v, h)
    float_model = onnx.ModelProto()
    float_model.CopyFrom(model)
    plan = expose_weights(model, "logits")
    report = quantize_vocab_tables(model, plan.lm_head, v, head=True, embeddings=True, accuracy_level=0)
    onnx.checker.check_model(model)
    assert report.block_size == 256 and report.blocks_per_row == -(-h // 256)
    (head,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    assert attrs["block_size"] <= 256 and attrs["K"] == h and attrs["bits"] == 8

    ids = np.array([[0, 5, 39], [7, 7, 1]], np.int64)

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"input_ids": ids})

    logits, x = run(model)
    ref_logits, ref_x = run(float_model)
    inits = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    q, scale, _ = quantize_rows(inits["embed"])
    np.testing.assert_allclose(x, dequantize_rows(q, scale, h)[ids], atol=1e-6)  # lookup: exactly the table's rows
    assert np.abs(x - ref_x).max() <= report.max_abs_err + 1e-6
    assert report.max_abs_err <= np.abs(inits["embed"]).max() / 254 * (1 + 1e-6)
    head_table = inits["embed"] if build is tied_model else inits["head_w"].T
    qh, sh, _ = quantize_rows(head_table)
    np.testing.assert_allclose(logits, x @ dequantize_rows(qh, sh, h).T, rtol=1e-4, atol=1e-4)
    assert np.abs(logits - ref_logits).max() / np.abs(ref_logits).max() < 1e-2  # 8-bit on both ends
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).mean() >= 5 / 6
