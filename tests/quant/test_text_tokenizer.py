"""Calibration and eval text are tokenized by onnxpipe.tokenizer (no transformers): the same ids as transformers',
and a whole quantize run (calibration, quality report, gate) works with torch and transformers unimportable; the
one part that needs torch (onnxruntime's HQQ) says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from onnxpipe.quant.text import load_tokenizer, read_documents, tokenize_documents
from onnxpipe.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
DOCS = ["def f(x):\n    return x + 1\n", "x <|endoftext|> y </s> <s>", "  two  spaces\tand a tab\n\n"]


@pytest.mark.fast
@pytest.mark.parametrize("model", ["llama-stdlib", "gpt2-stdlib"])
def test_ids_equal_transformers(model: str) -> None:
    from transformers import AutoTokenizer

    path = REPO / "models" / model
    ours = load_tokenizer(path)
    assert isinstance(ours, Tokenizer)
    theirs = AutoTokenizer.from_pretrained(str(path))
    docs = DOCS + read_documents(REPO / "data" / "eval.txt", "eval")
    for budget in (None, 3000):  # whole documents, and heads cut by the budget
        a = tokenize_documents(ours, docs, budget)
        b = tokenize_documents(theirs, docs, budget)
        assert a.tolist() == b.tolist()
    assert tokenize_documents(ours, ["a", "b"]).tolist().count(theirs.eos_token_id) >= 1  # documents joined by EOS


@pytest.mark.fast
def test_missing_tokenizer_is_one_line(tmp_path: Path) -> None:
    from onnxpipe.errors import OnnxpipeError

    with pytest.raises(OnnxpipeError, match=r"no tokenizer files \(tokenizer.json, or vocab.json \+ merges.txt\)"):
        load_tokenizer(tmp_path)


BLOCKED_RUN = """
import sys
sys.modules["torch"] = None  # an import of either now raises ImportError
sys.modules["transformers"] = None
from onnxpipe.quant import quantize_model
from onnxpipe.quant.calibration import CalibrationConfig
quantize_model(sys.argv[1], sys.argv[2], "dynamic", eval_file=sys.argv[3], max_eval_tokens=600,
               calib=CalibrationConfig(max_samples=2, prefill_len=16))
print("imported:", sorted(m for m in ("torch", "transformers") if sys.modules.get(m) is not None))
"""


def test_quantize_runs_without_torch_or_transformers(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """dynamic int8 with its default activation search: calibration prefills, the quality report and the gate."""
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(tok_model("llama")), str(out), str(small_eval)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imported: []" in r.stdout
    assert (out / "onnxpipe.json").is_file()


def test_hqq_without_torch_is_one_line_before_any_work(tok_model, small_eval: Path, tmp_path: Path,
                                                       monkeypatch) -> None:  # noqa: ANN001
    """onnxruntime's HQQ quantizer is the one part of quantize that imports torch: without torch, --algo hqq is
    refused up front in one line (not onnxruntime's ImportError)."""
    import importlib.util

    import onnxpipe.quant.pipeline as pipeline
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.quant import quantize_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.setattr(pipeline, "_run_mode", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(OnnxpipeError, match=r"--algo hqq runs onnxruntime's HQQ quantizer, which needs torch"):
        quantize_model(tok_model("llama"), tmp_path / "q", "int4", algo="hqq", eval_file=small_eval)
    assert not (tmp_path / "q").exists()
