"""Text in, token ids out: reading calibration and evaluation files and tokenizing them with a model's tokenizer
(onnxpipe.tokenizer, the one tokenizer module: the same ids as transformers', without transformers).

A file is plain UTF-8 text, or JSON Lines (``.jsonl`` / ``.ndjson``) with one object per line holding a ``"text"``
string. Every problem is an OnnxpipeError of one line that names the file (and the line, for JSONL).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.errors import OnnxpipeError
from onnxpipe.tokenizer import Tokenizer

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_documents(path: str | Path, what: str) -> list[str]:
    """The documents of a text or JSONL file; ``what`` ("calibration", "eval") names the file in errors."""
    path = Path(path)
    if not path.exists():
        raise OnnxpipeError(f"{path}: no such {what} file")
    if not path.is_file():
        raise OnnxpipeError(f"{path}: the {what} file is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OnnxpipeError(f"{path}: the {what} file is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise OnnxpipeError(f"{path}: the {what} file is empty; give plain text, or JSONL with a \"text\" per line")
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return [text]
    docs = [_jsonl_text(path, lineno, line, what) for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise OnnxpipeError(f"{path}: the {what} file has no non-empty \"text\" values")
    return docs


def _jsonl_text(path: Path, lineno: int, line: str, what: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise OnnxpipeError(f"{path}:{lineno}: malformed JSONL in the {what} file ({e.msg}, column {e.colno})") from None
    if isinstance(row, str):
        return row
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        got = "an object without a \"text\" string" if isinstance(row, dict) else type(row).__name__
        raise OnnxpipeError(
            f"{path}:{lineno}: each line of a JSONL {what} file must be an object with a \"text\" string (got {got})"
        )
    return row["text"]


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer saved in a model directory (onnxpipe.tokenizer: no transformers); its absence is an error that
    says what is missing."""
    model_dir = Path(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)  # a broken tokenizer.json is already a one-line OnnxpipeError
    if tokenizer is None:
        raise OnnxpipeError(
            f"{model_dir}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); the quality report "
            "and calibration tokenize text with the model's own tokenizer"
        )
    return tokenizer


def tokenize_documents(tokenizer: Any, docs: list[str], max_tokens: int | None = None) -> np.ndarray:
    """One stream of token ids (int64), documents joined by the EOS token when the tokenizer has one.

    ``tokenizer``: an onnxpipe.tokenizer.Tokenizer, or anything called as Hugging Face tokenizers are
    (``tok(text, add_special_tokens=False)["input_ids"]``, ``tok.eos_token_id``), which scripts and tests pass.
    No BOS/EOS is added inside a document; special tokens written in the text (``<|endoftext|>``) are kept,
    as scripts/perplexity.py does. With ``max_tokens`` each document is cut to what the budget can still use before
    it is tokenized (see ``document_head``), so one huge document costs memory in proportion to the budget, not to
    its size.
    """
    eos = eos_token_id(tokenizer)
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and eos is not None:
            ids.append(int(eos))
        ids.extend(document_head(tokenizer, doc, None if max_tokens is None else max_tokens - len(ids)))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return np.asarray(ids[:max_tokens] if max_tokens else ids, dtype=np.int64)


def eos_token_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's end-of-sequence token (tokenizer_config.json's eos_token), or None."""
    if isinstance(tokenizer, Tokenizer):
        name = tokenizer.special_tokens.get("eos_token")
        return tokenizer.token_id(name) if name else None
    return getattr(tokenizer, "eos_token_id", None)


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids without the tokenizer's own special tokens (those written in the text are kept)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


CHARS_PER_TOKEN_FIRST_GUESS = 6  # a first cut; tokens of real text average 3-5 characters


def document_head(tokenizer: Any, doc: str, limit: int | None) -> list[int]:
    """The first ``limit`` tokens of ``doc`` (all of them when it has fewer; all of it when ``limit`` is None),
    tokenizing only a head of the text: ``limit`` x 6 characters first, four times more while that gives too few
    tokens. The head is cut before a whitespace character where one is near the cut, and one token more than needed
    must come out of it, so the tokens kept are those of the whole document for tokenizers that split words at
    whitespace (byte-level BPE, SentencePiece); the last token of a head, which may be a fragment, is never kept."""
    encode = lambda text: encode_plain(tokenizer, text)  # noqa: E731
    if limit is None:
        return list(encode(doc))
    if limit <= 0:
        return []
    chars = max(64, limit * CHARS_PER_TOKEN_FIRST_GUESS)
    while True:
        if chars >= len(doc):
            return list(encode(doc))[:limit]
        cut = _whitespace_before(doc, chars)
        ids = encode(doc[:cut])
        if len(ids) > limit:
            return list(ids[:limit])
        chars *= 4


def _whitespace_before(doc: str, chars: int) -> int:
    """A cut at or below ``chars``: just before the last whitespace character that follows a non-space, within the
    last quarter of the head; else ``chars`` itself (text without spaces)."""
    lo = chars - chars // 4
    for k in range(chars, lo, -1):
        if doc[k].isspace() and not doc[k - 1].isspace():
            return k
    return chars
