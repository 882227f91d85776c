"""Size caps: a record over the cap is a bad record with a clear reason, never an hour-long run; a long record under
the cap shows progress that moves (windows counted); a huge calibration or eval document is cut to what the token
budget can use before it is tokenized."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_checks import cli

from onnxpipe.score import ScoreConfig
from onnxpipe.score.encoding import Item
from onnxpipe.score.perplexity import score_items
from onnxpipe.score.scorer import WindowScorer


@pytest.fixture(scope="module")
def text_model(tiny_onnx, tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp_path_factory.mktemp("score-caps") / "gpt2-bytes"
    shutil.copytree(tiny_onnx("gpt2"), out)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(out / "tokenizer.json"))
    return out


def _score(model: Path, lines: list[str], tmp_path: Path, *extra: object):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(line + "\n" for line in lines))
    return cli("score", model, inp, "-o", tmp_path / "o.jsonl", "--provider", "cpu", "--no-progress", *extra)


def test_record_over_the_cap_is_a_bad_record(text_model, tmp_path):
    lines = [json.dumps({"id": "short", "text": "hello there"}), json.dumps({"id": "long", "text": "ab " * 400}),
             json.dumps({"id": "ids", "input_ids": [1] * 1001}), json.dumps({"id": "fits", "input_ids": [1] * 1000})]
    r = _score(text_model, lines, tmp_path, "--max-record-chars", "1000")
    assert r.exit_code == 0, r.output
    assert "in.jsonl:2: record has 1,200 characters of text, over the cap of 1,000 (--max-record-chars)" in r.output
    assert "in.jsonl:3: record has 1,001 token ids, over the cap of 1,000" in r.output
    ids = [json.loads(x)["id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert ids == ["short", "fits"]


def test_default_cap_is_a_million_characters(text_model, tmp_path):
    """One 50 MB record ran for about an hour; the default cap turns a record over 1,000,000 characters away at
    once (this one would be ~15,600 windows on the tiny model)."""
    assert ScoreConfig().max_record_chars == 1_000_000
    lines = [json.dumps({"id": "huge", "text": "x" * 1_000_001}), json.dumps({"id": "ok", "text": "fine"})]
    r = _score(text_model, lines, tmp_path)
    assert r.exit_code == 0, r.output
    assert "record has 1,000,001 characters of text, over the cap of 1,000,000" in r.output
    assert [json.loads(x)["id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == ["ok"]


def test_progress_moves_through_the_windows_of_one_long_record(tiny_onnx):
    """A long record is many windows: progress is reported after every batch with the windows done, while the
    record count moves only when the record is finished."""
    scorer = WindowScorer.open(tiny_onnx("gpt2"), "cpu")
    tokens = np.random.default_rng(0).integers(0, 256, 600).tolist()
    calls: list[tuple[int, int, int, int]] = []
    results, stats = score_items(scorer, [Item(tokens, 1)], 64, 32, 64, 0.2, lambda *a: calls.append(a))
    windows = len(calls)
    assert windows == stats.batches == 18  # (600 - 64) / 32 + 1, rounded up, one window per 64-slot batch
    assert [c[2] for c in calls] == list(range(1, windows + 1)) and {c[3] for c in calls} == {windows}
    assert [c[0] for c in calls] == [0] * (windows - 1) + [1]
    assert sum(c[1] for c in calls) == results[0][1] == 599


class _SpyTokenizer:
    """A transformers tokenizer that records the length of every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.longest = 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kw)


REPO = Path(__file__).resolve().parents[2]


def test_a_huge_document_is_cut_before_it_is_tokenized(tmp_path):
    """One 57 MB calibration line took 9.9 GB: each document was tokenized whole before the budget applied. Now
    only a head of it is tokenized, and the tokens kept are the whole document's first tokens."""
    from transformers import AutoTokenizer

    from onnxpipe.quant.calibration import CALIBRATION_MAX_TOKENS, CalibrationConfig, calibration_samples
    from onnxpipe.quant.text import tokenize_documents

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "llama-stdlib")
    text = (REPO / "data" / "eval.txt").read_text()
    whole = tok(text, add_special_tokens=False)["input_ids"]
    spy = _SpyTokenizer(tok)
    assert tokenize_documents(spy, [text * 40], 5000).tolist() == whole[:5000]
    assert spy.longest < 5000 * 6 * 1.01  # the first head (6 characters a token) was enough

    big = tmp_path / "calibration.jsonl"  # one line of 10 MB
    big.write_text(json.dumps({"text": text * 40}) + "\n")
    spy = _SpyTokenizer(tok)
    samples = calibration_samples(spy, big, CalibrationConfig())
    assert spy.longest <= CALIBRATION_MAX_TOKENS * 6 < len(text) * 40
    assert samples.shape == (32, 132) and samples[0].tolist() == whole[:132]


def test_a_batch_whose_logits_cannot_fit_is_refused_before_it_runs(text_model, tmp_path, monkeypatch):
    """`--batch-tokens 1000000` grew to 6.4 GB on 500 records of a 4,096-token vocabulary (more records, more, until
    the kernel killed the run). A batch whose logits would not fit in the memory available is refused before it
    runs, naming --batch-tokens; a smaller one then scores. (Memory is made to look short here.)"""
    from onnxpipe.runtime import limits

    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 20)  # 1 MiB: 8 windows of 50 tokens need 1.6 MB
    lines = [json.dumps({"id": i, "input_ids": [(i + j) % 256 for j in range(50)]}) for i in range(8)]
    r = _score(text_model, lines, tmp_path, "--batch-tokens", 4096)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "a batch of 8 windows x 50 tokens needs at least" in errors[0], r.output
    assert "use a smaller --batch-tokens (now 4096)" in errors[0]
    r = _score(text_model, lines, tmp_path, "--batch-tokens", 100, "--force")  # 2 windows a batch: 0.4 MB
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 8
