"""Helpers for the scoring tests: token-id records for the tiny models, a JSONL writer, and a transformers reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest


def random_records(n: int, seed: int, vocab: int = 256, max_len: int = 300, min_len: int = 2) -> list[dict[str, Any]]:
    """input_ids records of mixed lengths; some longer than the tiny models' context (128) to use the windows."""
    rng = np.random.default_rng(seed)
    return [{"id": f"r{i}", "input_ids": rng.integers(0, vocab, int(rng.integers(min_len, max_len))).tolist()}
            for i in range(n)]


def write_jsonl(path: Path, records: Sequence[Any]) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def hf_loglik(model: Any, tokens: Sequence[int], score_from: int, context: int, stride: int) -> tuple[float, int]:
    """Reference log-likelihood with transformers, written from the rule rather than from the code under test:
    target t is predicted from tokens[k*stride : t], k the first window (begin k*stride, length context) that
    holds t and a token before it: k = 0 if t < context else (t - context) // stride + 1."""
    import torch

    ids = torch.as_tensor(list(tokens), dtype=torch.long)
    by_window: dict[int, list[int]] = {}
    for t in range(max(1, score_from), len(ids)):
        k = 0 if t < context else (t - context) // stride + 1
        by_window.setdefault(k, []).append(t)
    total = 0.0
    with torch.no_grad():
        for k, targets in by_window.items():
            begin = k * stride
            window = ids[begin:min(begin + context, len(ids))]
            logprobs = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            total += sum(float(logprobs[t - begin - 1, ids[t]]) for t in targets)
    return total, sum(len(v) for v in by_window.values())


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(hf_dir) -> the transformers model in fp32 eval mode (cached)."""
    cache: dict[str, Any] = {}

    def load(hf_dir: Path) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        if str(hf_dir) not in cache:
            cache[str(hf_dir)] = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        return cache[str(hf_dir)]

    return load


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges: 256 tokens, one per byte, for the tiny models' 256-token vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="session")
def tiny_text_model(tiny_onnx, tmp_path_factory) -> Path:
    """The tiny GPT-2 export with a byte-level tokenizer.json beside it, so that text records can be scored."""
    import shutil

    out = tmp_path_factory.mktemp("text-model") / "gpt2-bytes"
    shutil.copytree(tiny_onnx("gpt2"), out)
    byte_tokenizer().save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="session")
def tiny_bos_text_model(tiny_onnx, tmp_path_factory) -> Path:
    """The tiny GPT-2 export with a byte-level tokenizer.json whose post-processor puts BOS (id 0) in front of every
    text, as Llama's tokenizers do: scoring must follow it, where it follows no BOS for the byte tokenizer above."""
    import shutil

    from tokenizers import processors

    out = tmp_path_factory.mktemp("text-model-bos") / "gpt2-bytes-bos"
    shutil.copytree(tiny_onnx("gpt2"), out)
    tok = byte_tokenizer()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(out / "tokenizer.json"))
    return out
