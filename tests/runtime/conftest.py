"""Runtime fixtures: a tiny model directory with a byte-level tokenizer (token i = byte i, vocab 256), so text,
stop strings and multi-byte characters can be tested on the random-weight tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what the ByteLevel decoder maps back)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="session")
def byte_model(tiny_onnx: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """byte_model(family) -> a copy of tiny_onnx(family) with a byte-level tokenizer.json."""
    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"bytes-{family}") / "model"
            shutil.copytree(tiny_onnx(family), out)
            byte_tokenizer().save(str(out / "tokenizer.json"))
            cache[family] = out
        return cache[family]

    return build


def streamed_pieces(row, ids) -> list[str]:  # noqa: ANN001
    """Feed ``ids`` to a generate RowState one token at a time; the text pieces it streams, in order."""
    pieces = []
    for t in ids:
        row.add(t)
        p = row.piece()
        if p is not None:
            pieces.append(p.text)
    return pieces
