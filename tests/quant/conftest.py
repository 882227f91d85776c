"""Tiny exported models that carry a tokenizer: the quality report and calibration tokenize real text.

The shared tiny models (tests/tiny.py) have a 256-token vocabulary and no tokenizer; a byte-level BPE with no
merges has exactly 256 tokens, so it is saved beside each before export and travels into the model directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))

from tiny import make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CALIBRATION = REPO / "data" / "calibration.txt"
EVAL = REPO / "data" / "eval.txt"


def save_byte_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)


@pytest.fixture(scope="session")
def tok_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tok_model(family) -> an exported fp32 onnxpipe model directory with a byte-level tokenizer (cached)."""
    from onnxpipe.export import export_decoder

    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"quant-{family}")
            hf = make_tiny_model(family, root / "hf")
            save_byte_tokenizer(hf)
            export_decoder(hf, root / "onnx")
            cache[family] = root / "onnx"
        return cache[family]

    return build


@pytest.fixture()
def small_eval(tmp_path: Path) -> Path:
    """The first 3 kB of data/eval.txt: enough windows to measure, quick to score."""
    path = tmp_path / "eval.txt"
    path.write_text(EVAL.read_text()[:3000])
    return path


def external_copy(src: Path, dst: Path) -> Path:
    """A copy of the model directory ``src`` at ``dst`` with its weights in model.onnx.data, as a large model's are."""
    import shutil

    import onnx

    from onnxpipe.artifact import ModelDir, write_manifest

    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / "model.onnx"))
    onnx.save_model(proto, str(dst / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    manifest = ModelDir.open(dst).manifest
    manifest.graph["external_data"] = "model.onnx.data"
    write_manifest(dst, manifest)
    return dst
