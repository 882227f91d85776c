"""The vocabulary tables: 8 bits per row, one table for a tied lookup and head, the same values on both paths."""

from __future__ import annotations

import numpy as np
import onnx
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
