"""--task generate: greedy continuations through the runtime's generate API equal transformers' greedy decoding."""

from __future__ import annotations

import json

import numpy as np
from score.conftest import read_jsonl, write_jsonl

from onnxpipe.score import ScoreConfig, score


def test_generate_rows_equal_transformers_greedy(tiny_hf, tiny_onnx, hf_model, tmp_path):
    import torch

    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 256, int(n)).tolist() for n in (3, 9, 4, 17, 30, 5)]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt_ids": p} for i, p in enumerate(prompts)]
                      + [{"prompt_ids": []}, {"prompt": "x", "completion": "y"}])
    out = tmp_path / "gen.jsonl"
    summary = score(tiny_onnx("llama"), inp, out, ScoreConfig(task="generate", max_new_tokens=8, progress=False,
                                                              provider="cpu", batch_tokens=64), log=lambda m: None)
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == list(range(6)) and summary.bad_records == 2 and summary.perplexity is None
    model = hf_model(tiny_hf("llama"))
    for p, row in zip(prompts, rows):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p):]
        assert row["generated_ids"] == ref.tolist()
        assert row["tokens"] == len(ref) and row["finish_reason"] in ("eos", "length")
    assert json.loads((tmp_path / "gen.summary.json").read_text())["tokens"] == sum(r["tokens"] for r in rows)
