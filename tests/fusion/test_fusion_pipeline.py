"""optimize_model on the tiny models of every family: everything fuses at level 3, the result matches its input,
greedy decoding agrees over 32 steps, the I/O contract and the manifest say what happened."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxpipe.artifact import ModelDir
from onnxpipe.fusion import optimize_model
from onnxpipe.parity import compare, left_padded_batch, ort_step_fn, run_trace
from onnxpipe.runtime.sessions import reference_session

FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3"]


def _optimized_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _op_counts(path: Path) -> dict[str, int]:
    import collections

    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


@pytest.fixture(scope="module")
def level3(tiny_onnx, tmp_path_factory):
    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"opt-{family}") / "model"
            optimize_model(tiny_onnx(family), out, level=3)
            cache[family] = out
        return cache[family]

    return build


@pytest.mark.parametrize("family", FAMILIES)
def test_level3_fuses_everything_and_keeps_parity(family: str, tiny_onnx, level3) -> None:
    src, out = ModelDir.open(tiny_onnx(family)), ModelDir.open(level3(family))
    layers = src.manifest.num_layers
    ops = _op_counts(out.model_path)
    info = src.manifest.model

    attention = ops.get("GroupQueryAttention", 0) + ops.get("MultiHeadAttention", 0)
    assert attention == layers, ops
    expected_op = "MultiHeadAttention" if family == "gpt2" else "GroupQueryAttention"
    assert ops.get(expected_op) == layers
    norms = sum(ops.get(op, 0) for op in ("LayerNormalization", "SimplifiedLayerNormalization",
                                          "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"))
    assert norms == (4 if info["qk_norm"] else 2) * layers + 1, ops
    assert ops.get("Softmax", 0) == 0 and ops.get("Pow", 0) == 0 and ops.get("ReduceMean", 0) == 0
    if family == "gpt2":
        assert ops.get("FastGelu") == layers and ops.get("Tanh", 0) == 0
    else:
        assert ops.get("RotaryEmbedding") == 2 * layers and ops.get("Neg", 0) == 0

    if family != "gpt2":  # the window goes to the kernel (HF's sliding_window W = ORT's local_window_size W)
        import onnx

        gqa = [n for n in onnx.load(str(out.model_path)).graph.node if n.op_type == "GroupQueryAttention"]
        windows = {a.i for n in gqa for a in n.attribute if a.name == "local_window_size"}
        assert windows == {info["sliding_window"] or -1}

    # the I/O contract is unchanged, and the manifest says what happened
    assert out.manifest.input_names == src.manifest.input_names
    assert out.manifest.output_names == src.manifest.output_names
    assert out.manifest.graph["padding_side"] == "left"
    assert out.manifest.graph["kv"]["layout"] == "BNSH" and out.manifest.graph["kv"]["shares_buffer"] is False
    step = out.manifest.steps[-1]
    assert step["stage"] == "optimize" and step["params"]["level"] == 3
    assert step["check"]["passed"] and step["check"]["rel_err"] <= 1e-4
    by_name = {p["name"]: p for p in step["passes"]}
    assert by_name["attention"]["fused"]["attention blocks fused"] == f"{layers}/{layers}"
    assert by_name["norms"]["fused"]["norms fused"].split("/")[0] == by_name["norms"]["fused"]["norms fused"].split("/")[1]
    assert all(p["status"] != "rolled_back" for p in step["passes"])
    assert all(p["check"]["passed"] for p in step["passes"] if p["check"])

    # greedy decoding over 32 steps: the same tokens, logits within fp32 tolerance
    ids, mask = left_padded_batch(info["vocab_size"], (7, 4), seed=3)
    ref = run_trace(ort_step_fn(reference_session(src.model_path), src.manifest), src.manifest, ids, mask, 32, np.float32)
    cand = run_trace(ort_step_fn(_optimized_session(out.model_path), out.manifest), out.manifest, ids, mask, 32,
                     np.float32)
    np.testing.assert_array_equal(cand.tokens, ref.tokens)
    report = compare(ref, cand, (7, 4))
    assert report.rel_err <= 1e-4, report.summary()


def test_fp16_level3(tiny_onnx, tmp_path: Path) -> None:
    result = optimize_model(tiny_onnx("llama", "fp16"), tmp_path / "out", level=3)
    ops = _op_counts(result.model_dir.model_path)
    assert ops.get("GroupQueryAttention") == 2 and ops.get("RotaryEmbedding") == 4
    assert result.check.passed and result.check.rel_err <= 1e-2


@pytest.mark.parametrize("level,present,absent", [
    (1, [], ["SkipSimplifiedLayerNormalization", "GroupQueryAttention"]),
    (2, ["SkipSimplifiedLayerNormalization", "RotaryEmbedding"], ["GroupQueryAttention"]),
])
def test_lower_levels_stop_where_they_should(level, present, absent, tiny_onnx, tmp_path: Path) -> None:
    result = optimize_model(tiny_onnx("llama"), tmp_path / "out", level=level)
    ops = _op_counts(result.model_dir.model_path)
    assert all(ops.get(op) for op in present) and not any(ops.get(op) for op in absent), ops
    assert result.check.passed


@pytest.mark.parametrize("shared", [True, False], ids=["shared-weights", "weights-in-graph"])
def test_a_breaking_pass_is_rolled_back(shared: bool, tiny_onnx, tmp_path: Path, monkeypatch) -> None:
    """A pass that changes the numbers is caught by its check, rolled back, and reported; the output is the
    input's equivalent. shared-weights: snapshots hand ORT the weights as external initializers (the default);
    weights-in-graph: every initializer copied into the snapshot's graph."""
    import onnx_ir as ir

    from onnxpipe.fusion import pipeline

    if not shared:
        monkeypatch.setattr(pipeline, "SNAPSHOT_INLINE_BYTES", 1 << 62)

    def sabotage(model: ir.Model, ctx) -> dict:
        for node in model.graph.all_nodes():
            if node.op_type == "Softmax":  # attend with the wrong axis
                node.attributes["axis"] = ir.AttrInt64("axis", 2)
        return {"sabotaged": "yes"}

    broken = pipeline.FusionPass("sabotage", 1, sabotage, "breaks attention on purpose")
    monkeypatch.setattr(pipeline, "PASSES", (broken,) + pipeline.PASSES)
    monkeypatch.setattr(pipeline, "PASS_NAMES", ("sabotage",) + pipeline.PASS_NAMES)
    result = optimize_model(tiny_onnx("llama"), tmp_path / "out", passes=["sabotage", "norms"])
    reports = {r.name: r for r in result.passes}
    assert reports["sabotage"].status == "rolled_back" and "parity failed" in reports["sabotage"].reason
    assert reports["norms"].status == "kept"
    assert result.check.passed
    manifest = json.loads((tmp_path / "out" / "onnxpipe.json").read_text())
    assert manifest["steps"][-1]["passes"][0]["status"] == "rolled_back"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no snapshot or temporary directory, no lock file left


def test_a_fused_op_the_target_cannot_run_is_rolled_back(tiny_onnx, tmp_path: Path, monkeypatch) -> None:
    import onnx_ir as ir

    from onnxpipe.fusion import pipeline

    def emit_unknown(model: ir.Model, ctx) -> dict:
        node = next(n for n in model.graph.all_nodes() if n.op_type == "Softmax")
        node.op_type, node.domain = "SoftmaxNoSuchKernel", "com.microsoft"
        return {}

    bad = pipeline.FusionPass("emit_unknown", 1, emit_unknown, "emits an op no EP runs")
    monkeypatch.setattr(pipeline, "PASSES", (bad,) + pipeline.PASSES)
    monkeypatch.setattr(pipeline, "PASS_NAMES", ("emit_unknown",) + pipeline.PASS_NAMES)
    result = optimize_model(tiny_onnx("gpt2"), tmp_path / "out", passes=["emit_unknown"])
    report = result.passes[0]
    assert report.status == "rolled_back" and "no kernel for" in report.reason


def test_pack_projections_is_opt_in(tiny_onnx, tmp_path: Path) -> None:
    from onnxpipe.fusion.pipeline import select_passes

    assert "pack_projections" not in [p.name for p in select_passes(3, None)]
    result = optimize_model(tiny_onnx("llama"), tmp_path / "out", passes=["norms", "rotary", "attention",
                                                                          "pack_projections"])
    packed = {r.name: r for r in result.passes}["pack_projections"]
    assert packed.status == "kept" and packed.fused["projection groups packed"] == "4" and result.check.passed


def test_gqa_without_query_seqlens_for_older_onnxruntime(tiny_onnx, tmp_path: Path, monkeypatch) -> None:
    """onnxruntime < 1.32 has no query_seqlens input (a node with it is INVALID_GRAPH there): the fused graph then
    leaves it out and the manifest says multi-token steps after a past need batch 1."""
    import onnx

    from onnxpipe.fusion import attention

    monkeypatch.setattr(attention, "query_seqlens_supported", lambda: False)
    result = optimize_model(tiny_onnx("qwen2"), tmp_path / "out", level=3)
    gqa = [n for n in onnx.load(str(result.model_dir.model_path)).graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(len(n.input) == 11 for n in gqa)
    graph = result.model_dir.manifest.graph
    assert graph["multi_token_steps_with_past"] == "batch 1 only" and graph["requires_onnxruntime"] is None
    assert result.check.passed


def test_gqa_with_query_seqlens_is_recorded(tiny_onnx, level3) -> None:
    from onnxpipe.fusion.attention import query_seqlens_supported

    graph = ModelDir.open(level3("llama")).manifest.graph
    expected = "any batch" if query_seqlens_supported() else "batch 1 only"
    assert graph["multi_token_steps_with_past"] == expected
