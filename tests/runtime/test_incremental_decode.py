"""A streamed row's text is decoded a window at a time (RowState.decode_prefix): at every step it equals decoding
all of the row's tokens, and a step decodes a bounded number of tokens however long the row is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from runtime.conftest import streamed_pieces

from onnxpipe.runtime.generate import DECODE_WINDOW, PROMPT_CONTEXT, RowState, TextTokenizer
from onnxpipe.runtime.sampling import SamplingConfig

pytestmark = pytest.mark.fast
MODELS = Path(__file__).resolve().parents[2] / "models"


class CountingTokenizer:
    """A tokenizer that counts the tokens it is asked to decode."""

    def __init__(self, tok: TextTokenizer):
        self.tok, self.decoded = tok, 0

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.tok.decode(ids)


def _ids(tok: TextTokenizer, rng: np.random.Generator, n: int) -> list[int]:
    """Real text with multi-byte characters, and random ids (byte tokens cut characters anywhere)."""
    text = "def f(x):\n    return x * 2  # café → 世界 😀 naïve, 'quoted' words. " * 4
    real = tok.encode(text)
    vocab = tok.backend.get_vocab_size()
    return (real + rng.integers(0, vocab, n).tolist())[: len(real) + n]


@pytest.mark.parametrize("model", ["gpt2-stdlib", "llama-stdlib"])
def test_windowed_decode_equals_the_whole_decode_at_every_step(model):
    tok = TextTokenizer.from_dir(MODELS / model)
    rng = np.random.default_rng(0)
    for trial in range(3):
        prompt = tok.encode("Once upon a time") if trial else []
        ids = _ids(tok, rng, 120)
        row = RowState(0, prompt, SamplingConfig(max_new_tokens=len(ids)), set(), len(ids), tok)
        for n, t in enumerate(ids, start=1):
            row.tokens.append(t)
            assert row.decode_prefix(n) == row.decode(row.tokens[:n]), (model, trial, n)


def test_a_streamed_row_decodes_a_bounded_window_per_step():
    tok = TextTokenizer.from_dir(MODELS / "gpt2-stdlib")
    counting = CountingTokenizer(tok)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40)[:400]
    row = RowState(0, tok.encode("Hello"), SamplingConfig(max_new_tokens=len(ids) + 1), set(), len(ids) + 1, tok)
    row.tok = counting  # type: ignore[assignment]
    pieces = streamed_pieces(row, ids)
    per_step = counting.decoded / len(ids)
    assert per_step <= 2 * (DECODE_WINDOW + PROMPT_CONTEXT + 1)  # the whole decode: ~200 tokens a step here
    assert "".join(pieces) == row.decode(row.tokens)
