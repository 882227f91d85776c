"""Which MatMulNBits the kernels take: the skip policy (kernel_skip / ONNXPIPE_KERNELS_SKIP) finds the LM head and
the packed qkv projection from the graph (not by name), keeps them on onnxruntime's kernel, counts them in the one
line, says when a kind asked for is not there, and refuses an unknown kind; and the bench anchor that sets it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime.test_kernels import _Options, cpu_library, kernel_cache  # noqa: F401  (fixtures)
from scripts_module import load_script

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.kernels import kernel_skip, plan_kernels
from onnxpipe.runtime.kernels.rewrite import rewrite_matmul_nbits


def _nbits(name: str, a: str, out: str, n: int) -> onnx.NodeProto:
    return helper.make_node("MatMulNBits", [a, "B", "s"], [out], name=name, domain="com.microsoft",
                            K=64, N=n, bits=4, block_size=32)


def _decoder(head: str = "nbits") -> onnx.ModelProto:
    """A decoder's skeleton: a packed qkv projection into GroupQueryAttention, an MLP projection, and the LM head
    (a MatMulNBits, or a plain MatMul with head="matmul") reaching the logits through Reshape and Cast. The names
    lie on purpose: the head is called like a layer's projection, a layer's projection like the head."""
    nodes = [
        _nbits("/model/layers.0/attn/o_proj/MatMul_Q4", "x", "qkv", 192),
        helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "seqlens", "total"], ["att", "k", "v"],
                         name="gqa", domain="com.microsoft", num_heads=2, kv_num_heads=1),
        _nbits("lm_head/MatMul_Q4", "att", "mlp", 64),
        (_nbits("/model/layers.0/mlp/down_proj/MatMul_Q4", "mlp", "head_out", 100) if head == "nbits" else
         helper.make_node("MatMul", ["mlp", "W"], ["head_out"], name="lm_head_fp")),
        helper.make_node("Reshape", ["head_out", "shape"], ["head_3d"], name="r"),
        helper.make_node("Cast", ["head_3d"], ["logits"], name="c", to=TensorProto.FLOAT),
    ]
    inits = [numpy_helper.from_array(np.zeros(4, np.uint8), "B"), numpy_helper.from_array(np.zeros(4, np.float16), "s"),
             numpy_helper.from_array(np.zeros((64, 100), np.float16), "W"),
             numpy_helper.from_array(np.array([1, 1, 100], np.int64), "shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _ops(model: onnx.ModelProto) -> dict[str, str]:
    return {n.name: n.op_type for n in model.graph.node}


def test_head_is_found_from_the_logits_not_by_its_name() -> None:
    model = _decoder()
    report = rewrite_matmul_nbits(model, "cuda", skip=("head",))
    assert report.kept == {"/model/layers.0/mlp/down_proj/MatMul_Q4": "head"}
    assert (report.total, report.rewritten, report.skip_notes) == (3, 2, [])
    ops = _ops(model)
    assert ops["/model/layers.0/mlp/down_proj/MatMul_Q4"] == "MatMulNBits"
    assert ops["lm_head/MatMul_Q4"] == ops["/model/layers.0/attn/o_proj/MatMul_Q4"] == "MatMulInt4"
    # without the policy every one is taken, as before
    assert rewrite_matmul_nbits(_decoder(), "cuda").rewritten == 3


def test_qkv_is_the_attention_nodes_packed_input() -> None:
    model = _decoder()
    report = rewrite_matmul_nbits(model, "cuda", skip=("qkv", "head"))
    assert report.kept == {"/model/layers.0/attn/o_proj/MatMul_Q4": "qkv", "/model/layers.0/mlp/down_proj/MatMul_Q4": "head"}
    assert report.rewritten == 1 and _ops(model)["lm_head/MatMul_Q4"] == "MatMulInt4"
    assert report.reasons() == "qkv (1 node); head (1 node)"


def test_a_head_that_is_not_quantized_is_nothing_to_skip_and_said() -> None:
    model = _decoder(head="matmul")
    report = rewrite_matmul_nbits(model, "cuda", skip=("head",))
    assert (report.total, report.rewritten, report.kept) == (2, 2, {})
    assert report.skip_notes == ["skip head: nothing to skip, the 'logits' output does not come from a MatMulNBits "
                                 "(the LM head is not quantized)"]
    assert rewrite_matmul_nbits(_decoder(), "cuda", skip=("head",), logits="nope").skip_notes == [
        "skip head: nothing to skip, no node computes 'nope'"]


def test_the_line_counts_what_the_policy_kept(cpu_library: Path) -> None:  # noqa: F811
    plan = plan_kernels("reference", ["cpu"], _Options(), skip=("head",))
    plan.edit(_decoder())
    assert plan.line() == ("kernels: onnxpipe MatMulInt4 on 2 of 3 MatMulNBits (kept: head (1 node)) "
                           "[CPU reference kernels]")
    plan = plan_kernels("reference", ["cpu"], _Options(), skip=("head",))
    plan.edit(_decoder(head="matmul"))
    assert plan.line() == ("kernels: onnxpipe MatMulInt4 on 2 of 2 MatMulNBits (skip head: nothing to skip, the "
                           "'logits' output does not come from a MatMulNBits (the LM head is not quantized)) "
                           "[CPU reference kernels]")


def test_kinds_come_from_the_argument_or_the_environment_and_an_unknown_one_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONNXPIPE_KERNELS_SKIP", raising=False)
    assert kernel_skip() == ()
    monkeypatch.setenv("ONNXPIPE_KERNELS_SKIP", " Head, qkv,,head ")
    assert kernel_skip() == ("head", "qkv")
    assert kernel_skip("") == () and kernel_skip(["qkv"]) == ("qkv",)  # the argument wins over the variable
    monkeypatch.setenv("ONNXPIPE_KERNELS_SKIP", "head,lm_head")
    with pytest.raises(OnnxpipeError) as e:
        kernel_skip()
    assert str(e.value) == "ONNXPIPE_KERNELS_SKIP='head,lm_head': unknown kind 'lm_head'; kinds: head, qkv, all"
    with pytest.raises(OnnxpipeError, match=r"^kernel_skip='wide': unknown kind 'wide'; kinds: head, qkv, all$"):
        kernel_skip("wide")
    with pytest.raises(ValueError, match="unknown kinds to skip"):
        rewrite_matmul_nbits(_decoder(), "cuda", skip=("wide",))


def test_the_nohead_bench_anchor_runs_the_kernels_with_the_head_skipped(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    load_script("bench_gpu")  # puts scripts/ on the path for the modules beside it
    import bench_gpu_anchors as anchors

    monkeypatch.setenv("ONNXPIPE_KERNELS", "off")
    monkeypatch.setenv("ONNXPIPE_KERNELS_SKIP", "qkv")  # the caller's values reach no kernels row
    monkeypatch.setenv("ONNXPIPE_INT4_GEMM_FORM", "gemv")
    monkeypatch.delenv("ONNXPIPE_BENCH_KERNELS", raising=False)
    monkeypatch.setenv("ONNXPIPE_KERNELS_LINEAR", "on")
    seen: list[tuple[str, str, str, dict]] = []
    linear: list[str] = []
    monkeypatch.setattr(anchors, "child_onnxpipe", lambda spec: seen.append(
        (os.environ["ONNXPIPE_KERNELS"], os.environ["ONNXPIPE_KERNELS_SKIP"], os.environ["ONNXPIPE_INT4_GEMM_FORM"],
         spec)) or linear.append(os.environ["ONNXPIPE_KERNELS_LINEAR"]))
    spec = {"work": str(tmp_path), "int4": str(tmp_path / "int4"), "optimized": str(tmp_path / "optimized")}
    anchors.CHILDREN["onnxpipe_int4_graph_kernels_nohead"](spec)
    anchors.CHILDREN["onnxpipe_int4_graph_kernels_noqkv"](spec)
    anchors.CHILDREN["onnxpipe_int4_graph_kernels"](spec)
    anchors.CHILDREN["onnxpipe_int4_graph_kernels_hgemv"](spec)
    anchors.CHILDREN["onnxpipe_int4_graph_pairs"](spec)
    assert [(k, s, f) for k, s, f, _ in seen] == [("on", "head", ""), ("on", "qkv", ""), ("on", "", ""),
                                                  ("on", "", "hgemv"), ("on", "all", "")]
    assert linear == ["off"] * 5
    anchors.CHILDREN["onnxpipe_graph_kernels_linear"](spec)
    assert linear[-1] == "on" and seen[-1][1:3] == ("", "") and "optimized" in seen[-1][3]
    seen.pop()
    for _, _, _, got in seen:
        assert got["optimized"] == spec["int4"] and got["cuda_graph"]
        assert got["int4_tokens_in"] == str(tmp_path / "int4_tokens.json")  # compared with the plain int4 run's
    assert "onnxpipe_int4_graph_kernels_nohead" in anchors.ANCHORS and (
        anchors.PRIORITY.index("onnxpipe_int4_graph") < anchors.PRIORITY.index("onnxpipe_int4_graph_kernels_nohead"))
