"""The stamped export (one layer traced, stamped to depth, weights streamed from the safetensors): the same outputs
as the traced export, the same model-directory contract, and a parity check that fails on a misplaced weight."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.export.checkpoint import Checkpoint
from onnxpipe.parity import left_padded_batch, ort_step_fn, run_trace

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "stablelm", "starcoder2")


def _logits(model_dir: Path) -> list[np.ndarray]:
    """ORT logits of prefill + 4 greedy decode steps on a left-padded batch (graph optimizations off)."""
    from onnxpipe.runtime.sessions import open_session

    md = ModelDir.open(model_dir)
    session = open_session(md.model_path, optimization="off")
    ids, mask = left_padded_batch(md.manifest.model["vocab_size"], (7, 4), seed=3)
    kv = np.float16 if md.manifest.graph["dtype"] == "fp16" else np.float32
    return run_trace(ort_step_fn(session, md.manifest), md.manifest, ids, mask, 4, kv).logits


def test_families_are_the_stamped_ones() -> None:
    from onnxpipe.export.stamp import STAMPED_MODEL_TYPES

    assert set(FAMILIES) == set(STAMPED_MODEL_TYPES)  # a family stamped in `auto` has its equality test here


@pytest.fixture(scope="module")
def stamped(arch_hf: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """stamped(family, dtype="fp32") -> its stamped export, parity-checked (cached)."""
    from onnxpipe.export.stream import export_stamped

    cache: dict[tuple[str, str], Path] = {}

    def build(family: str, dtype: str = "fp32") -> Path:
        if (family, dtype) not in cache:
            out = tmp_path_factory.mktemp(f"stamped-{family}-{dtype}") / "model"
            lines: list[str] = []
            export_stamped(arch_hf(family), out, dtype=dtype, log=lines.append)
            (out.parent / "export.log").write_text("\n".join(lines))  # beside the model directory, not in it
            cache[family, dtype] = out
        return cache[family, dtype]

    return build


# the default run checks two families (one with a q/k-norm); the others, 10-20 s each on 2 cores, with the slow tier
@pytest.mark.parametrize("family", [f if f in ("llama", "qwen3") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_stamped_export_gives_the_traced_exports_logits(family: str, stamped: Callable[..., Path],
                                                        arch_onnx: Callable[[str], Path],
                                                        arch_hf: Callable[[str], Path]) -> None:
    traced, ours = arch_onnx(family), stamped(family)
    for a, b in zip(_logits(traced), _logits(ours)):
        assert a.shape == b.shape
        assert float(np.abs(a - b).max()) <= 1e-5
    mt, ms = ModelDir.open(traced).manifest, ModelDir.open(ours).manifest
    assert ms.model == mt.model  # the architecture facts, read from the slice and the config, are the whole model's
    assert ms.graph["inputs"] == mt.graph["inputs"] and ms.graph["outputs"] == mt.graph["outputs"]
    assert ms.graph["kv"] == mt.graph["kv"] and ms.tokenizer == mt.tokenizer
    assert ms.graph["external_data"] == "model.onnx.data"
    step = ms.steps[-1]
    assert step["params"]["method"] == "stamped" and mt.steps[-1]["params"]["method"] == "traced"
    assert step["check"]["passed"] and step["check"]["scope"] == "truncated" and step["check"]["layers"] == [0, 1]
    with Checkpoint.open(arch_hf(family)) as ckpt:  # every checkpoint tensor written once, each one sampled
        assert step["check"]["placement"]["passed"] and step["check"]["placement"]["tensors"] == len(ckpt.entries)
    assert (ours / "genai_config.json").is_file() and (ours / "config.json").is_file()
    # the weights began before the trace, placed as the modules said: right for every family (written once)
    assert "writing them again" not in (ours.parent / "export.log").read_text()


def test_stamped_fp16_matches_traced_fp16(stamped: Callable[..., Path], tiny_onnx: Callable[..., Path]) -> None:
    ours = stamped("llama", "fp16")
    for a, b in zip(_logits(tiny_onnx("llama", "fp16")), _logits(ours)):
        assert float(np.abs(a - b).max()) <= 1e-5
    step = ModelDir.open(ours).manifest.steps[-1]
    assert step["check"]["passed"] and step["check"]["tolerance"] == 1e-2


def test_weights_on_disk_once(stamped: Callable[..., Path], tiny_hf: Callable[[str], Path]) -> None:
    """The external data holds every weight once (fp32: the checkpoint's bytes, give or take alignment)."""
    ours = stamped("llama")
    data = (ours / "model.onnx.data").stat().st_size
    weights = (tiny_hf("llama") / "model.safetensors").stat().st_size
    assert weights * 0.98 <= data <= weights * 1.05


def test_parity_fails_on_swapped_layers(tiny_hf: Callable[[str], Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A planted fault: the stamped graph's layer 0 gets layer 1's weights and the reverse. The truncated check
    (PyTorch reading the checkpoint by its own names) must catch it, and nothing is written."""
    from onnxpipe.export import stream

    monkeypatch.setattr(stream, "_layer_order", lambda n: list(reversed(range(n))))
    out = tmp_path / "out"
    with pytest.raises(OnnxpipeError, match="parity check failed on layers"):
        stream.export_stamped(tiny_hf("llama"), out)
    assert not out.exists()


def test_placement_check_catches_a_layer_the_truncated_check_skips(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A planted fault in layer 2 of 4 (its down projection holds layer 1's bytes): the truncated check runs
    layers 0, 1 and 3, so only the placement check (sampled bytes of every tensor) can see it."""
    from tiny import make_tiny_model

    from onnxpipe.export import stream

    real_write = stream.write_weights

    def write_then_copy_layer_1_into_2(layout, ckpt, data_path, dtype, log, **kw):  # noqa: ANN001, ANN003, ANN202
        written = real_write(layout, ckpt, data_path, dtype, log, **kw)
        spans = {s.name: s for job in layout.jobs for s in job.spans}
        src, dst = (spans[f"model.model.layers.{i}.mlp.down_proj.weight_T"] for i in (1, 2))
        with open(data_path, "r+b") as fh:
            fh.seek(src.offset)
            data = fh.read(src.length)
            fh.seek(dst.offset)
            fh.write(data)
        return written

    monkeypatch.setattr(stream, "write_weights", write_then_copy_layer_1_into_2)
    hf = make_tiny_model("llama", tmp_path / "hf", num_hidden_layers=4)
    with pytest.raises(OnnxpipeError, match="placement check failed: .*layers.2.mlp.down_proj"):
        stream.export_stamped(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # without it, the fault passes: the truncated check alone does not see layer 2
    from onnxpipe.export.placement import PlacementReport

    monkeypatch.setattr(stream, "check_placement", lambda *a: PlacementReport(0, 0))
    result = stream.export_stamped(hf, tmp_path / "out")
    assert result.model_dir.manifest.steps[-1]["check"]["layers"] == [0, 1, 3]


def test_method_auto_and_refusals(tiny_hf: Callable[[str], Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from onnxpipe.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["export", str(tiny_hf("gpt2")), "-o", str(tmp_path / "g"), "--method", "stamped"])
    assert r.exit_code != 0 and "stamped export does not apply" in r.output and "gpt2" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "g").exists()
    r = runner.invoke(main, ["export", str(tiny_hf("qwen3")), "-o", str(tmp_path / "q"), "--no-verify"])
    assert r.exit_code == 0, r.output
    assert "export method: stamped" in r.output and "stamping 2 layers" in r.output
    assert ModelDir.open(tmp_path / "q").manifest.steps[-1]["params"]["method"] == "stamped"


def test_tied_embeddings_written_once(tmp_path: Path) -> None:
    """A tied LM head reads the table through a Transpose node, as the traced export keeps it: the table is written
    once, and the check (PyTorch with the tie) passes."""
    from tiny import make_tiny_model

    from onnxpipe.export.stream import export_stamped

    hf = make_tiny_model("llama", tmp_path / "hf", tie_word_embeddings=True)
    result = export_stamped(hf, tmp_path / "out")
    step = result.model_dir.manifest.steps[-1]
    assert step["check"]["passed"] and result.model_dir.manifest.model["tie_word_embeddings"]
    data = (tmp_path / "out" / "model.onnx.data").stat().st_size
    assert data <= (hf / "model.safetensors").stat().st_size
