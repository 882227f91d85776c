"""Scores equal transformers' on the same model, whatever the batching; windows and batch plans keep their bounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from score.conftest import hf_loglik, random_records, read_jsonl, write_jsonl

from onnxpipe.score import ScoreConfig, score
from onnxpipe.score.batching import cut_windows, plan_batches

TOL_PER_RECORD = 1e-4  # abs, on a record's natural-log sum (fp32 model, up to ~300 scored tokens)
CONTEXT = 128  # the tiny models' max_position_embeddings


def _run(model_dir: Path, records, tmp_path: Path, name: str, **kw) -> list[dict]:
    inp = write_jsonl(tmp_path / f"{name}.in.jsonl", records)
    out = tmp_path / f"{name}.jsonl"
    score(model_dir, inp, out, ScoreConfig(progress=False, provider="cpu", **kw), log=lambda m: None)
    return read_jsonl(out)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loglik_equals_transformers_whatever_the_batching(family, tiny_hf, tiny_onnx, hf_model, tmp_path):
    records = random_records(24, seed=1)
    records += [{"id": "pc", "prompt_ids": [5, 6, 7, 8], "completion_ids": [9, 10, 11]},
                {"id": "long", "input_ids": np.random.default_rng(2).integers(0, 256, 400).tolist()},
                {"id": "two", "input_ids": [3, 4]}]
    model = hf_model(tiny_hf(family))
    runs = {
        "big-batches": _run(tiny_onnx(family), records, tmp_path, "a", batch_tokens=8192, max_padding=0.5),
        "one-by-one": _run(tiny_onnx(family), records, tmp_path, "b", batch_tokens=1, chunk_records=1),
        "tight": _run(tiny_onnx(family), records, tmp_path, "c", batch_tokens=300, max_padding=0.05, chunk_records=7),
    }
    for rows in runs.values():
        assert [r["id"] for r in rows] == [r["id"] for r in records]
    for rec, *rows in zip(records, *runs.values()):
        tokens = rec.get("input_ids") or rec["prompt_ids"] + rec["completion_ids"]
        start = len(rec["prompt_ids"]) if "prompt_ids" in rec else 1
        ref, n = hf_loglik(model, tokens, start, CONTEXT, CONTEXT // 2)
        for row in rows:
            assert row["tokens"] == n
            assert abs(row["loglik"] - ref) <= TOL_PER_RECORD, (rec["id"], row["loglik"], ref)
            assert row["perplexity"] == pytest.approx(math.exp(-ref / n), rel=1e-5)
    # the same record in other batches: equal to float rounding of the batch shape
    a, b, c = runs.values()
    assert max(abs(x["loglik"] - y["loglik"]) for x, y in zip(a, b)) < 2e-5
    assert max(abs(x["loglik"] - y["loglik"]) for x, y in zip(a, c)) < 2e-5


def test_long_record_does_not_depend_on_its_batch_or_stride_rule(tiny_hf, tiny_onnx, hf_model, tmp_path):
    long = {"id": "long", "input_ids": np.random.default_rng(3).integers(0, 256, 700).tolist()}
    alone = _run(tiny_onnx("gpt2"), [long], tmp_path, "alone", stride=32)
    crowd = _run(tiny_onnx("gpt2"), random_records(40, seed=4) + [long], tmp_path, "crowd", stride=32)
    assert abs(alone[0]["loglik"] - crowd[-1]["loglik"]) < 2e-5
    ref, n = hf_loglik(hf_model(tiny_hf("gpt2")), long["input_ids"], 1, CONTEXT, 32)
    assert alone[0]["tokens"] == n == 699
    assert abs(alone[0]["loglik"] - ref) <= TOL_PER_RECORD


def test_loglik_task_reports_greedy(tiny_hf, tiny_onnx, hf_model, tmp_path):
    import torch

    model = hf_model(tiny_hf("llama"))
    prompt = [5, 17, 33, 2, 9]
    with torch.no_grad():
        greedy_next = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    records = [{"id": "g", "prompt_ids": prompt, "completion_ids": [greedy_next]},
               {"id": "n", "prompt_ids": prompt, "completion_ids": [(greedy_next + 1) % 256]}]
    rows = _run(tiny_onnx("llama"), records, tmp_path, "g", task="loglik")
    assert [r["greedy"] for r in rows] == [True, False]
    assert "greedy" not in _run(tiny_onnx("llama"), records, tmp_path, "p")[0]


@pytest.mark.parametrize("n,context,stride,start", [(1000, 128, 64, 1), (129, 128, 127, 1), (300, 128, 1, 1),
                                                    (500, 128, 100, 260), (5, 128, 64, 4), (2, 8, 4, 1)])
def test_windows_score_every_target_once_with_history(n, context, stride, start):
    seen = []
    for begin, end, first in cut_windows(n, context, stride, start):
        assert end - begin <= context and begin < first < end
        seen += range(first, end)
        if begin > 0:  # every target after the first window has at least context - stride tokens before it
            assert first - begin >= context - stride
    assert seen == list(range(start, n))


def test_batch_plan_keeps_budget_and_padding_bound():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 400, 2000).tolist() + [1000]
    for budget, pad in [(4096, 0.2), (512, 0.05), (1, 0.0), (100_000, 0.5)]:
        batches = plan_batches(lengths, budget, pad)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            width, real = max(lengths[i] for i in b), sum(lengths[i] for i in b)
            if len(b) > 1:  # a single window over the budget runs alone
                assert width * len(b) <= budget
            assert 1 - real / (width * len(b)) <= pad + 1e-12


def test_summary_is_written_and_matches_rows(tiny_onnx, tmp_path):
    rows = _run(tiny_onnx("gpt2"), random_records(30, seed=5), tmp_path, "s")
    summary = json.loads((tmp_path / "s.summary.json").read_text())
    assert summary["records"] == 30 and summary["tokens"] == sum(r["tokens"] for r in rows)
    assert summary["loglik"] == pytest.approx(sum(r["loglik"] for r in rows), abs=1e-9)
    assert summary["perplexity"] == pytest.approx(math.exp(-summary["loglik"] / summary["tokens"]))
    assert summary["provider"].startswith("provider: cpu") and summary["tokens_per_s"] > 0
    assert 0 <= summary["padding_fraction"] <= summary["max_padding"]


@pytest.mark.parametrize("adds_bos", [False, True])
def test_text_and_prompt_completion_records(adds_bos, tiny_text_model, tiny_bos_text_model, tiny_hf, hf_model, tmp_path):
    """Text is tokenized as transformers' tokenizer(text) does (BOS only where the tokenizer adds one) and every
    token after the first is scored; prompt+completion is tokenizer(prompt) + the completion's tokens (no special
    tokens), and only the completion's tokens are scored."""
    from transformers import AutoTokenizer

    model_dir = tiny_bos_text_model if adds_bos else tiny_text_model
    tok = AutoTokenizer.from_pretrained(model_dir)
    long_text = "def f(x):\n    return x * 2  # é\n" * 8  # 280 bytes: longer than the context
    records = [{"text": "hello world"}, {"text": "é"}, {"text": long_text},
               {"prompt": "The answer is", "completion": " 42."}, {"prompt": "", "completion": "abc"}]
    rows = _run(model_dir, records, tmp_path, "t")
    model = hf_model(tiny_hf("gpt2"))
    for rec, row in zip(records, rows):
        if "text" in rec:
            tokens, start = tok(rec["text"])["input_ids"], 1
        else:
            prompt = tok(rec["prompt"])["input_ids"]
            tokens, start = prompt + tok(rec["completion"], add_special_tokens=False)["input_ids"], max(1, len(prompt))
        assert (tokens[0] == 0) == adds_bos
        ref, n = hf_loglik(model, tokens, start, CONTEXT, CONTEXT // 2)
        assert row["tokens"] == n == len(tokens) - start
        assert abs(row["loglik"] - ref) <= TOL_PER_RECORD
    # "é" is two bytes: with BOS in front both are scored, without it the first is context only
    assert rows[1]["tokens"] == (2 if adds_bos else 1)
    summary = json.loads((tmp_path / "t.summary.json").read_text())
    assert summary["special_tokens"].startswith("the tokenizer's own: ")
    assert ("before" in summary["special_tokens"]) == adds_bos


@pytest.mark.parametrize("family,dtype", [("llama", "fp32"), ("gpt2", "fp16")])
def test_device_head_equals_transformers_and_the_numpy_head(family, dtype, tiny_hf, tiny_onnx, hf_model, tmp_path):
    """The log-softmax run by onnxruntime where the logits are (the GPU path; here on the CPU EP, logits bound
    as an OrtValue) gives transformers' log-likelihoods and the numpy head's, greedy flags included."""
    records = random_records(30, seed=5) + [{"id": "pc", "prompt_ids": [5, 6, 7, 8], "completion_ids": [9, 10, 11]}]
    device = _run(tiny_onnx(family, dtype), records, tmp_path, "device", head="device", task="loglik", batch_tokens=2048)
    host = _run(tiny_onnx(family, dtype), records, tmp_path, "host", head="host", task="loglik", batch_tokens=2048)
    assert [r["tokens"] for r in device] == [r["tokens"] for r in host]
    assert [r["greedy"] for r in device] == [r["greedy"] for r in host]
    assert max(abs(d["loglik"] - h["loglik"]) for d, h in zip(device, host)) < 2e-5
    if dtype == "fp32":  # the fp16 graph runs in fp32 on the CPU, but its weights were rounded to fp16
        model = hf_model(tiny_hf(family))
        for rec, row in zip(records, device):
            tokens = rec.get("input_ids") or rec["prompt_ids"] + rec["completion_ids"]
            ref, n = hf_loglik(model, tokens, len(rec.get("prompt_ids", [0])), CONTEXT, CONTEXT // 2)
            assert row["tokens"] == n and abs(row["loglik"] - ref) <= TOL_PER_RECORD, (rec["id"], row["loglik"], ref)


def test_head_choice():
    from onnxpipe.errors import OnnxpipeError

    with pytest.raises(OnnxpipeError, match="logits head"):
        ScoreConfig(head="gpu").check()


def test_gpu_scoring_sessions_use_basic_graph_optimizations(tiny_onnx, monkeypatch):
    """A scoring session bound for a GPU gets ORT_ENABLE_BASIC (the first run of each new batch shape is cheap
    there); the CPU, including a GPU request that fell back to it, keeps onnxruntime's default level."""
    import onnxruntime as ort

    from onnxpipe.runtime import providers
    from onnxpipe.score.scorer import WindowScorer, gpu_session_options

    assert gpu_session_options("cpu") is None
    monkeypatch.setattr(providers, "available_providers", lambda: ["cuda", "cpu"])
    assert gpu_session_options("cuda").graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert gpu_session_options("auto").graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert gpu_session_options("cpu") is None
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return  # the fallback below needs a CUDA EP that does not start
    said: list[str] = []
    scorer = WindowScorer.open(tiny_onnx("llama"), "cuda", announce=said.append)
    assert scorer.head is None and "basic" not in scorer.provider and any("using cpu" in m for m in said)
    assert scorer.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
