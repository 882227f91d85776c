"""Weight exposure: Gemm -> MatMul + Add and the tied LM head untied, with exactly the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.quant.graph import expose_weights, op_counts


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def gemm_and_tied_head() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 4)).astype(np.float32)
    inits = [
        numpy_helper.from_array(table, "embed"),
        numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "wt"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h0"], name="emb"),
        helper.make_node("Gemm", ["h0", "w", "b"], ["h1"], name="fc"),
        helper.make_node("Gemm", ["h1", "wt"], ["h2"], name="fc_t", transB=1),
        helper.make_node("Gemm", ["h2", "w"], ["h3"], name="scaled", alpha=0.5),  # not plain: left alone
        helper.make_node("Transpose", ["embed"], ["embed_T"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["h3", "embed_T"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 10])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_expose_weights_keeps_outputs() -> None:
    model = gemm_and_tied_head()
    feed = {"input_ids": np.array([1, 5, 9], np.int64)}
    before = run(model, feed)[0]
    plan = expose_weights(model, "logits")
    onnx.checker.check_model(model)
    after = run(model, feed)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    assert plan.rewrites == {"gemm_to_matmul": 2, "lm_head_untied": 1}
    counts = op_counts(model)
    assert counts["Gemm"] == 1 and "Transpose" not in counts  # alpha=0.5 Gemm stays; the head no longer transposes
    assert plan.lm_head == "head"
    assert set(plan.linears) == {"fc/MatMul", "fc_t/MatMul", "head"}
    assert plan.embeddings == ["emb"]
    # the embedding table is still there, unchanged, for the lookup
    assert any(t.name == "embed" for t in model.graph.initializer)


def test_exported_gpt2_head_is_found(tok_model) -> None:  # noqa: ANN001
    from onnxpipe.artifact import ModelDir

    md = ModelDir.open(tok_model("gpt2"))
    model = onnx.load(str(md.model_path))
    plan = expose_weights(model, md.manifest.graph["logits"])
    assert plan.rewrites["gemm_to_matmul"] == 8 and plan.rewrites["lm_head_untied"] == 1
    assert plan.lm_head is not None and len(plan.linears) == 9
