"""Text records on the trained reference model models/gpt2-stdlib (real tokenizer, context 256): the scores equal
transformers' (AutoTokenizer + AutoModelForCausalLM), long texts through the sliding window included.
Seen: |diff| 3.6e-05 on a 1,021-token record, <= 1.2e-05 on the others; tolerance 1e-4 per record."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from score.conftest import hf_loglik, read_jsonl, write_jsonl

from onnxpipe.score import ScoreConfig, score

MODEL = Path(__file__).resolve().parents[2] / "models" / "gpt2-stdlib"
EVAL = Path(__file__).resolve().parents[2] / "data" / "eval.txt"


@pytest.fixture(scope="module")
def stdlib_onnx(tmp_path_factory) -> Path:
    from onnxpipe.export import export_decoder

    out = tmp_path_factory.mktemp("gpt2-stdlib") / "onnx"
    export_decoder(MODEL, out, dtype="fp32")
    return out


@pytest.mark.slow  # the export of models/gpt2-stdlib takes ~20-40 s on the shared 2 cores
def test_text_scores_equal_transformers_on_gpt2_stdlib(stdlib_onnx, hf_model, tmp_path):
    from transformers import AutoTokenizer

    docs = EVAL.read_text().split("<|endoftext|>")
    texts = [docs[0][:3000], docs[1][:200], "def f(x):\n    return x\n", "é ünïcode ✓"]
    records = [{"id": i, "text": t} for i, t in enumerate(texts)]
    records.append({"id": "pc", "prompt": "import os\nimport", "completion": " sys\n"})
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    summary = score(stdlib_onnx, inp, out, ScoreConfig(progress=False, provider="cpu", batch_tokens=1024),
                    log=lambda m: None)
    rows = read_jsonl(out)

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = hf_model(MODEL)
    assert len(tok(texts[0])["input_ids"]) > 256  # the first text needs the sliding window
    total, n_total = 0.0, 0
    for rec, row in zip(records, rows):
        if "text" in rec:  # the tokenizer's own special tokens (GPT-2's: none), as tokenizer(text) gives them
            tokens, start = tok(rec["text"])["input_ids"], 1
        else:
            prompt = tok(rec["prompt"])["input_ids"]
            tokens, start = prompt + tok(rec["completion"], add_special_tokens=False)["input_ids"], max(1, len(prompt))
        ref, n = hf_loglik(model, tokens, start, 256, 128)
        assert row["tokens"] == n
        assert abs(row["loglik"] - ref) <= 1e-4, (rec["id"], row["loglik"], ref)
        total, n_total = total + ref, n_total + n
    assert summary.perplexity == pytest.approx(math.exp(-total / n_total), rel=1e-6)
    assert summary.perplexity < 100  # a trained model: the eval split's perplexity is ~38 (models/gpt2-stdlib/eval.json)
