"""Records to token ids: what is scored, under the model's own tokenizer's special-token rules.

A ``text`` record is tokenized as the tokenizer encodes a text with its special tokens (tokenizer.json's
post-processor: what transformers' ``tokenizer(text)`` gives), so BOS is in front only where the tokenizer itself adds
one, and every token after the first is scored (the first is context only). A ``prompt``+``completion`` record is
``tokens(prompt)`` (with the tokenizer's special tokens) followed by ``tokens(completion)`` (without), and only the
completion's tokens are scored (the first one too when the prompt gave at least one token). ``input_ids`` records are
taken as they are: every token after the first is scored. The summary's ``special_tokens`` says what the tokenizer
added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.score.records import Record, first_line


@dataclass
class Item:
    """A record ready to score: its tokens and the first scored position (>= 1)."""

    tokens: list[int]
    score_from: int


class Encoder:
    """Turns records into Items with the model directory's tokenizer (tokenizer.json) and its own special-token
    rules: a text is encoded with the special tokens the tokenizer adds (as ``tokenizer(text)`` in transformers)."""

    def __init__(self, md: ModelDir):
        self.path = md.path
        tok = md.path / "tokenizer.json"
        self._tokenizer = None
        if tok.is_file():
            from tokenizers import Tokenizer

            try:
                self._tokenizer = Tokenizer.from_file(str(tok))
            except Exception as e:  # the tokenizers library raises its own exception types
                raise OnnxpipeError(f"{tok}: not a tokenizer the `tokenizers` library reads ({first_line(e)})") from None

    def _require(self) -> Any:
        if self._tokenizer is None:
            raise OnnxpipeError(f"{self.path}: no tokenizer.json, so text records cannot be scored; "
                                "give records with input_ids (or prompt_ids + completion_ids) instead")
        return self._tokenizer

    def encode(self, texts: list[str], special: bool = True) -> list[list[int] | str]:
        """Token ids per text (with the tokenizer's special tokens when ``special``), or why the tokenizer failed
        on it: a batch the tokenizer rejects is encoded text by text, so one bad text fails alone."""
        if not texts:
            return []
        tok = self._require()
        # encode_batch_fast (tokenizers >= 0.21): the same ids without character offsets, ~1.5x faster
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        try:
            return [e.ids for e in encode(texts, add_special_tokens=special)]
        except Exception:  # the tokenizers library raises its own exception types
            pass
        out: list[list[int] | str] = []
        for text in texts:
            try:
                out.append(tok.encode(text, add_special_tokens=special).ids)
            except Exception as e:
                out.append(f"the tokenizer failed on it ({first_line(e)})")
        return out

    def special_tokens(self) -> str:
        """In words: the special tokens the tokenizer adds around a text (the convention text is scored under)."""
        if self._tokenizer is None:
            return "no tokenizer.json (token-id records only)"
        tok = self._tokenizer
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        named = lambda ids: " ".join(f"{tok.id_to_token(i)} ({i})" for i in ids)  # noqa: E731
        parts = [f"{named(full[:at])} before"] if at else []
        parts += [f"{named(full[at + len(plain):])} after"] if len(full) > at + len(plain) else []
        return "the tokenizer's own: " + (", ".join(parts) if parts else "none added") + " (token-id records as given)"

    def items(self, records: Sequence[Record]) -> list[Item | str]:
        """An Item per record, or the reason it has nothing to score (or could not be tokenized)."""
        heads: list[str] = []  # texts and prompts: with the tokenizer's special tokens
        tails: list[str] = []  # completions: without
        for r in records:
            if r.text is not None:
                heads.append(r.text)
            elif r.completion is not None:
                heads.append(r.prompt or "")
                tails.append(r.completion)
        head_ids, tail_ids = iter(self.encode(heads, True)), iter(self.encode(tails, False))
        out: list[Item | str] = []
        for r in records:
            if r.text is not None:
                tokens: list[int] | str = next(head_ids)
                start = 1
            elif r.completion is not None:
                prompt, completion = next(head_ids), next(tail_ids)
                if isinstance(prompt, str) or isinstance(completion, str):  # why the tokenizer failed, prompt first
                    tokens, start = (prompt if isinstance(prompt, str) else str(completion)), 1
                else:
                    tokens, start = prompt + completion, max(1, len(prompt))
            elif r.ids is not None:
                tokens, start = r.ids, 1
            else:  # prompt_ids + completion_ids (records.parse_record sets both)
                prompt_ids, completion_ids = r.prompt_ids or [], r.completion_ids or []
                tokens, start = prompt_ids + completion_ids, max(1, len(prompt_ids))
            if isinstance(tokens, str):
                out.append(tokens)
            else:
                out.append(Item(tokens, start) if len(tokens) > start else f"nothing to score ({len(tokens)} "
                           f"tokens, scoring from position {start})")
        return out

