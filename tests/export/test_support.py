"""docs/support.md against the registry, and on every supported type: `optimize --level 3` fuses what the support
table says (every pass that is kept passed its check), `quantize` int8 and int4 record their quality report and pass
the gate, and `export --dtype fp16` passes its parity check."""

from __future__ import annotations

import numpy as np
import pytest
from support_table import ATTENTION_FUSED, DOC, EVAL_CHARS, FP16, QUANTIZED, README, readme_with_table, render

from onnxpipe.artifact import ModelDir
from onnxpipe.export import archs

FAST = ("gemma2", "gemma3_text", "phi", "granite", "smollm3", "falcon")
QUANTIZE_FAST = ("gemma2",)  # the default run quantizes one type; the slow tier sweeps all (~20 s each, 2 cores)
FP16_FAST = ("phi",)


def _passes(path) -> dict[str, dict]:
    return {p["name"]: p for p in ModelDir.open(path).manifest.steps[-1]["passes"]}


def test_support_page_is_generated_from_the_registry():
    assert set(ATTENTION_FUSED) == set(QUANTIZED) == set(FP16) == set(archs.SUPPORTED)
    assert DOC.read_text() == render(), "docs/support.md is stale: run python tests/export/support_table.py"
    for model_type in archs.SUPPORTED:
        assert f"| `{model_type}` |" in DOC.read_text()
    readme = README.read_text()
    assert readme_with_table(readme) == readme, "README.md's support table is stale: run python tests/export/support_table.py"
    for model_type in archs.SUPPORTED:
        assert f"`{model_type}`" in readme


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("model_type", [t if t in FAST else pytest.param(t, marks=pytest.mark.slow)
                                        for t in archs.SUPPORTED_MODEL_TYPES])
def test_attention_fusion_is_what_the_table_says(arch_optimized, model_type, target):
    passes = _passes(arch_optimized(model_type, target))
    want = ATTENTION_FUSED[model_type][0 if target == "cpu" else 1]
    attention = passes["attention"]
    assert attention["fused"]["attention blocks fused"] == want
    assert attention["status"] in ("kept", "unchanged")  # never rolled back: a fused block passed its check
    for p in passes.values():
        assert p["status"] != "kept" or p["check"] is None or p["check"]["passed"] is True


@pytest.fixture(scope="module")
def gemma2_without_cap(tmp_path_factory):
    from tiny_archs import make_arch_model

    from onnxpipe.export import export_decoder

    root = tmp_path_factory.mktemp("gemma2-nocap")
    out = root / "onnx"
    export_decoder(make_arch_model("gemma2", root / "hf", attn_logit_softcapping=None), out)
    return out


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_alternating_windows_fuse_with_each_layers_window(gemma2_without_cap, tmp_path, target):
    """Gemma 2 without the attention cap: sliding and full layers alternate. Each fused block gets its own layer's
    local_window_size (4, then -1) and the pass keeps its parity check; one window for all layers fails it."""
    from onnxpipe.fusion import optimize_model

    assert ModelDir.open(gemma2_without_cap).manifest.model["layer_types"] == ["sliding_attention", "full_attention"]
    optimize_model(gemma2_without_cap, tmp_path / "opt", level=3, target=target)
    attention = _passes(tmp_path / "opt")["attention"]
    assert attention["status"] == "kept" and attention["fused"]["attention blocks fused"] == "2/2"
    windows = {i: next(a.i for a in n.attribute if a.name == "local_window_size")
               for i, n in _gqa_nodes(tmp_path / "opt").items()}
    assert windows == {0: 4, 1: -1}


def test_one_window_for_all_layers_is_caught(gemma2_without_cap, tmp_path):
    """The near-miss of the test above: the manifest without layer_types applies the window to every block, and the
    pass's own parity check rolls it back."""
    import json
    import shutil

    from onnxpipe.fusion import optimize_model

    src = tmp_path / "src"
    shutil.copytree(gemma2_without_cap, src)
    manifest = json.loads((src / "onnxpipe.json").read_text())
    manifest["model"]["layer_types"] = []
    (src / "onnxpipe.json").write_text(json.dumps(manifest))
    optimize_model(src, tmp_path / "opt", level=3, target="cpu")
    attention = _passes(tmp_path / "opt")["attention"]
    assert attention["status"] == "rolled_back" and "parity failed" in attention["reason"]


def _gqa_nodes(path) -> dict[int, object]:
    import onnx

    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    return {int(next(o for o in n.output if o.startswith("present.")).split(".")[1]): n
            for n in graph.node if n.op_type == "GroupQueryAttention"}


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_gemma3_layers_keep_their_windows_and_rope_bases(arch_optimized, target):
    """Gemma 3's local layer (window 4, rope base 1e4) and global layer (no window, base 1e6) fuse each with its
    own window and its own cos/sin tables; the q/k-norm was moved before the head transpose to let them fuse."""
    import onnx

    path = arch_optimized("gemma3_text", target)
    nodes = _gqa_nodes(path)
    windows = {i: next(a.i for a in n.attribute if a.name == "local_window_size") for i, n in nodes.items()}
    assert windows == {0: 4, 1: -1}
    if target == "cuda":  # rotary folded into the op: cos/sin caches are its inputs 7 and 8
        tables = {i: tuple(n.input[7:9]) for i, n in nodes.items()}
    else:
        graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
        tables = {n.name: tuple(n.input[2:4]) for n in graph.node if n.op_type == "RotaryEmbedding"}
    assert len(set(tables.values())) == 2
    assert _passes(path)["norms"]["fused"]["norm_before_transpose"] == 4


def _sweep(fast: tuple[str, ...]) -> list:
    return [t if t in fast else pytest.param(t, marks=pytest.mark.slow) for t in archs.SUPPORTED_MODEL_TYPES]


@pytest.fixture(scope="module")
def tokenized_onnx(arch_hf, tmp_path_factory):
    """tokenized_onnx(model_type) -> its fp32 export with a byte-level tokenizer (the quality report reads text)."""
    import shutil

    from quant.conftest import save_byte_tokenizer

    from onnxpipe.export import export_decoder

    cache: dict[str, object] = {}

    def build(model_type: str):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(f"tok-{model_type}")
            shutil.copytree(arch_hf(model_type), root / "hf")
            save_byte_tokenizer(root / "hf")
            export_decoder(root / "hf", root / "onnx")
            cache[model_type] = root / "onnx"
        return cache[model_type]

    return build


@pytest.fixture(scope="module")
def short_eval(tmp_path_factory):
    from quant.conftest import EVAL

    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(EVAL.read_text()[:EVAL_CHARS])
    return path


def _quantize_outcome(src, out, mode: str, eval_file, **options) -> str:
    """"yes" when the run wrote its model with the quality report, the decode-path check and the passed gate in
    its manifest; else the gate's refusal, which must name the perplexity and agreement it measured."""
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.quant import quantize_model

    try:
        quantize_model(src, out, mode, eval_file=eval_file, eval_context=64, **options)
    except OnnxpipeError as e:
        assert not out.exists()
        return f"refused: {e}"
    step = ModelDir.open(out).manifest.steps[-1]
    quality, gate, check = step["quality"], step["gate"], step["check"]
    assert step["stage"] == "quantize" and step["params"]["mode"] == mode
    assert quality["eval_tokens"] > 500 and quality["eval_file"].endswith("eval.txt")
    assert np.isfinite(quality["ppl_before"]) and np.isfinite(quality["ppl_after"]) and quality["ppl_before"] > 1
    assert abs(quality["ppl_change_pct"] - (quality["ppl_after"] / quality["ppl_before"] - 1) * 100) < 1e-9
    assert 0.0 <= quality["top1_agreement"] <= 1.0 and quality["mean_kl"] >= 0.0
    assert 0.0 <= check["greedy_agreement"] <= 1.0 and check["decode_steps"] == 4
    assert quality["greedy_agreement"] is not None and quality["greedy_positions"] > 0  # decode path, eval prompts
    judged = {c["name"]: c["passed"] for c in gate["checks"]}
    assert judged["perplexity change"] is True and judged["decode-path greedy agreement"] is True
    assert gate["passed"] is True
    return "yes"


@pytest.mark.parametrize("model_type", _sweep(QUANTIZE_FAST))
def test_quantize_records_its_quality_report(tokenized_onnx, short_eval, tmp_path, model_type):
    """int8 (dynamic, per-token activations) and int4 (RTN) of each type's tiny model: the quality report and the
    gate's verdict are recorded, as the table's int8 / int4 column says."""
    src = tokenized_onnx(model_type)
    got = (_quantize_outcome(src, tmp_path / "int8", "dynamic", short_eval, activations="token"),
           _quantize_outcome(src, tmp_path / "int4", "int4", short_eval, algo="rtn"))
    assert got == QUANTIZED[model_type]


@pytest.mark.parametrize("model_type", _sweep(FP16_FAST))
def test_fp16_export_parity(arch_hf, tmp_path, model_type):
    """`export --dtype fp16` of each type's tiny model passes its parity check against PyTorch (rel err <= 1e-2)."""
    from onnxpipe.export import export_decoder

    export_decoder(arch_hf(model_type), tmp_path / "fp16", dtype="fp16")
    manifest = ModelDir.open(tmp_path / "fp16").manifest
    check = manifest.steps[0]["check"]
    assert manifest.steps[0]["params"]["dtype"] == "fp16" and check["tolerance"] == 1e-2
    got = "yes" if check["passed"] is True and check["rel_err"] <= 1e-2 else f"no: rel err {check['rel_err']:.3g}"
    assert got == FP16[model_type]
