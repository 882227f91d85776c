"""docs/support.md against the registry, and `optimize --level 3` on every supported type: what fuses is what the
support table says, and every pass that is kept passed its check."""

from __future__ import annotations

import pytest
from support_table import ATTENTION_FUSED, DOC, render

from onnxpipe.artifact import ModelDir
from onnxpipe.export import archs

FAST = ("gemma2", "gemma3_text", "phi", "granite", "smollm3", "falcon")


def _passes(path) -> dict[str, dict]:
    return {p["name"]: p for p in ModelDir.open(path).manifest.steps[-1]["passes"]}


def test_support_page_is_generated_from_the_registry():
    assert set(ATTENTION_FUSED) == set(archs.SUPPORTED)
    assert DOC.read_text() == render(), "docs/support.md is stale: run python tests/export/support_table.py"
    for model_type in archs.SUPPORTED:
        assert f"| `{model_type}` |" in DOC.read_text()


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
