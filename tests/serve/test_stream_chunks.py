"""A stream's text chunks made from a template once per stream (protocol.TextChunks) are the chunks protocol.chunk
makes, encoded as the server encodes them, whatever the text and the model's name."""

from __future__ import annotations

import json

import pytest

from onnxpipe.serve import protocol
from onnxpipe.serve.protocol import TextChunks

pytestmark = pytest.mark.fast

TEXTS = ["t12", " ", 'a "quoted" \\ back\nslash\t', "ünï 漢字 \U0001f600", "\x00\x1f\u2028", '", "text": "x']


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize("model", ["smollm2", 'we"ird\\ name ü', "\x00onnxpipe-text\x00"])
def test_a_template_chunk_is_the_whole_chunk(chat, model):
    chunks = TextChunks("cmpl-abc", model, chat)
    for text in TEXTS:
        want = json.loads(json.dumps(protocol.chunk("cmpl-abc", model, chat, text), ensure_ascii=False))
        got = json.loads(chunks(text))
        assert abs(got.pop("created") - want.pop("created")) <= 1  # the template's second, the stream's start
        assert got == want
        field = got["choices"][0]["delta"]["content"] if chat else got["choices"][0]["text"]
        assert field == text
