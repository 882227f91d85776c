"""The experts pass: each MoE rule variant alone (attributes, numerics, what the report says about a block left
unfused), then the tiny exports of every mixture-of-experts type through `optimize` with the per-pass check.

rule_cases.CASES holds each rule's smallest graph and its near-misses (tests/fusion/moe_cases.py), run by
test_fusion_rules.py; this file covers what those generic tests do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from fusion.moe_cases import INFO, experts_block

from onnxpipe.fusion import moe
from onnxpipe.fusion.rules import PassContext


def _fused(text: str, info: dict | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    original = onnx.parser.parse_model(text)
    model = ir.from_proto(original)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.ShapeInferencePass()(model)
    report = moe.fuse_experts(model, PassContext(model_info=INFO if info is None else info))
    common_passes.RemoveUnusedNodesPass()(model)
    return original, ir.to_proto(model), report


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        ["y"], feeds)[0]


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((5, 8)).astype(np.float32),
            "logits": (rng.standard_normal((5, 4)) * 2).astype(np.float32)}


def _moe_node(proto: onnx.ModelProto) -> onnx.NodeProto:
    nodes = [n for n in proto.graph.node if n.op_type == "MoE"]
    assert len(nodes) == 1, [n.op_type for n in proto.graph.node]
    return nodes[0]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.fast
@pytest.mark.parametrize("routing,normalize", [("softmax_topk_norm", 1), ("softmax_topk", 0)])
def test_swiglu_block_fuses_with_its_routing(routing: str, normalize: int) -> None:
    """Mixtral's renormalized routing and Qwen3-MoE's plain one (norm_topk_prob false) both fuse, each with its own
    normalize_routing_weights (a block without the renormalization never gets MoE's), and compute what the block
    computed (two input draws)."""
    original, fused, report = _fused(experts_block(routing=routing))
    assert report["experts fused"] == "1/1" and "experts left" not in report
    attrs = _attrs(_moe_node(fused))
    assert attrs["k"] == 2 and attrs["normalize_routing_weights"] == normalize
    assert attrs["activation_type"] == b"swiglu" and attrs["swiglu_fusion"] == 1
    assert attrs["activation_alpha"] == 1.0 and attrs["activation_beta"] == 0.0 and "swiglu_limit" not in attrs
    assert not any(n.op_type in ("TopK", "GatherND", "Softmax") for n in fused.graph.node)
    for seed in (0, 1):
        feeds = _feeds(seed)
        np.testing.assert_allclose(_run(fused, feeds), _run(original, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.fast
def test_clamped_swiglu_block_keeps_alpha_beta_limit_and_biases() -> None:
    """gpt-oss's block: top-k then softmax becomes MoE's softmax-top-k-renormalize, the clamp (0.5 here, so that it
    bites) and alpha/beta become swiglu_limit/activation_alpha/activation_beta, and both biases are inputs."""
    original, fused, report = _fused(experts_block(clamped=True))
    assert report["experts fused"] == "1/1"
    node = _moe_node(fused)
    attrs = _attrs(node)
    assert attrs["normalize_routing_weights"] == 1 and attrs["swiglu_fusion"] == 1
    assert attrs["swiglu_limit"] == pytest.approx(0.5) and attrs["activation_alpha"] == pytest.approx(1.702)
    assert attrs["activation_beta"] == pytest.approx(1.0)
    assert node.input[3] and node.input[5], "fc1/fc2 biases dropped"
    for seed in (0, 1):
        feeds = _feeds(seed)
        np.testing.assert_allclose(_run(fused, feeds), _run(original, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("routing,casts,clamped", [
    ("softmax_topk_norm", moe.MIXTRAL_HALF, False),
    ("softmax_topk_norm", moe.QWEN3_HALF, False),
    ("softmax_topk", moe.QWEN3_HALF, False),
    ("topk_softmax", moe.GPT_OSS_HALF, True),
])
def test_the_casts_of_an_fp16_export_are_matched(routing: str, casts: tuple, clamped: bool) -> None:
    """Each fp16 export's Casts (routing and sum in fp32; gpt-oss's gate clamp a Min), here to fp32 so that they
    change nothing: the block fuses and computes the same."""
    text = experts_block(clamped=clamped, routing=routing, casts=dict.fromkeys(casts, 1), gate_min=clamped)
    original, fused, report = _fused(text)
    assert report["experts fused"] == "1/1", report
    assert not any(n.op_type in ("TopK", "Cast", "Min") for n in fused.graph.node)
    feeds = _feeds()
    np.testing.assert_allclose(_run(fused, feeds), _run(original, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.fast
def test_a_cast_back_to_another_dtype_is_not_matched() -> None:
    """The block's result cast to fp16 in an fp32 graph: MoE would return fp32, so the block stays."""
    _, fused, report = _fused(experts_block(casts={"logits": 1, "down": 1, "out": 10}))
    assert report["experts fused"] == "0/1" and "the out cast is not to FLOAT" in report["experts left"]


@pytest.mark.fast
@pytest.mark.parametrize("kwargs,reason", [
    (dict(largest=0), "top-k takes the smallest values"),
    (dict(clip_hi=2), "expert indices are not clamped to [0, 3]"),
    (dict(clamped=True, up_clip=(-0.4, 0.5)), "not one symmetric limit"),
])
def test_a_block_left_unfused_is_counted_with_its_reason(kwargs: dict, reason: str) -> None:
    original, fused, report = _fused(experts_block(**kwargs))
    assert report["experts fused"] == "0/1"
    assert reason in report["experts left"]
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in original.graph.node if n.op_type != "Constant"]


@pytest.mark.fast
def test_a_model_without_experts_reports_nothing() -> None:
    _, fused, report = _fused(experts_block(), info={"num_layers": 1})
    assert report == {} and not any(n.op_type == "MoE" for n in fused.graph.node)


# ---- the tiny exports through optimize, each pass checked against its input ----

@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """exported(model_type, **config overrides) -> the tiny model's parity-checked export (cached)."""
    from export.tiny_archs import make_arch_model

    from onnxpipe.export import export_decoder

    cache: dict[str, Path] = {}

    def build(model_type: str, dtype: str = "fp32", **overrides) -> Path:
        key = f"{model_type}-{dtype}-{sorted(overrides.items())}"
        if key not in cache:
            out = tmp_path_factory.mktemp(f"moe-{model_type}")
            export_decoder(make_arch_model(model_type, out / "hf", **overrides), out / "onnx", dtype=dtype)
            cache[key] = out / "onnx"
        return cache[key]

    return build


@pytest.mark.parametrize("model_type,dtype,overrides,rule,level", [
    ("gpt_oss", "fp32", {}, "moe_clamped_swiglu", None),
    ("qwen3_moe", "fp32", {}, "moe_swiglu", None),  # norm_topk_prob false: the routing weights are not renormalized
    # the default run takes one fp32 form of each rule; fp16 gpt-oss (~27 s) with the slow tier
    pytest.param("gpt_oss", "fp16", {}, "moe_clamped_swiglu", None, marks=pytest.mark.slow),
    pytest.param("qwen3_moe", "fp32", {"norm_topk_prob": True}, "moe_swiglu", None, marks=pytest.mark.slow),
    pytest.param("mixtral", "fp32", {}, "moe_swiglu", 3, marks=pytest.mark.slow),  # after norms/rotary
    pytest.param("mixtral", "fp16", {}, "moe_swiglu", None, marks=pytest.mark.slow),
    pytest.param("qwen3_moe", "fp16", {}, "moe_swiglu", None, marks=pytest.mark.slow),
    pytest.param("qwen3_moe", "fp16", {"norm_topk_prob": True}, "moe_swiglu", None, marks=pytest.mark.slow),
])
def test_exported_experts_fuse_and_pass_the_check(exported, tmp_path: Path, model_type: str, dtype: str,
                                                  overrides: dict, rule: str, level: int | None) -> None:
    """The experts pass (alone, or in the whole level-3 pipeline for Mixtral) fuses both blocks and passes its
    check: prefill and decode steps against its input, within 1e-4 (fp32) or 1e-2 (fp16; on the CPU EP the fp16 MoE
    runs through Casts onnxruntime inserts, and the report says so)."""
    from onnxpipe.fusion import optimize_model

    src = exported(model_type, dtype, **overrides)
    result = optimize_model(src, tmp_path / "opt", level=level or 3, passes=None if level else ["experts"])
    report = next(p for p in result.passes if p.name == "experts")
    assert report.status == "kept", report.reason
    assert report.fused["experts fused"] == "2/2" and report.fused[rule] == 2
    assert report.check["passed"] and report.check["rel_err"] <= (1e-4 if dtype == "fp32" else 1e-2)
    assert report.op_counts.get("MoE") == 2 and "TopK" not in report.op_counts
    assert result.check is None or result.check.passed


def test_cuda_form_fuses_the_experts_too(exported, tmp_path: Path) -> None:
    """--target cuda (no CUDA EP here: ORT's documented kernel list, no check) writes the same MoE."""
    from onnxpipe.fusion import optimize_model

    src = exported("gpt_oss")
    result = optimize_model(src, tmp_path / "opt", target="cuda", passes=["experts"], verify=False)
    report = next(p for p in result.passes if p.name == "experts")
    assert report.status == "kept" and report.fused["experts fused"] == "2/2"


@pytest.mark.fast
def test_an_fp16_block_left_unfused_says_so() -> None:
    """A block left unfused in an fp16 graph: the report names the dtype with the reason."""
    model = ir.from_proto(onnx.parser.parse_model(experts_block(largest=0)))
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.ShapeInferencePass()(model)
    report = moe.fuse_experts(model, PassContext(model_info=INFO, dtype="fp16"))
    assert report["experts fused"] == "0/1"
    assert report["experts left"].startswith("fp16 graph: top-k takes")
