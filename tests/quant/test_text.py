"""Calibration and eval files: every bad input is one line that names the file (and the line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant.calibration import CalibrationConfig, calibration_samples, feed_count
from onnxpipe.quant.text import read_documents, tokenize_documents


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text: str, **_: object) -> dict:
        return {"input_ids": [ord(c) % 200 + 1 for c in text]}


def test_plain_text_is_one_document(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("def f():\n    return 1\n")
    assert read_documents(p, "calibration") == ["def f():\n    return 1\n"]


def test_jsonl_documents_and_strings(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps("plain") + "\n")
    assert read_documents(p, "calibration") == ["a b", "plain"]
    ids = tokenize_documents(CharTokenizer(), ["ab", "c"])
    assert ids.tolist() == [ord("a") % 200 + 1, ord("b") % 200 + 1, 0, ord("c") % 200 + 1]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", "is empty"),
        ("blank.txt", "  \n\n", "is empty"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: malformed JSONL"),
        ("list.jsonl", "[1, 2]\n", 'list.jsonl:1: each line of a JSONL calibration file must be an object'),
        ("notext.jsonl", '{"body": "x"}\n', 'without a "text" string'),
        ("emptytexts.jsonl", '{"text": ""}\n', 'no non-empty "text" values'),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(OnnxpipeError, match=message.replace("(", r"\(")) as e:
        read_documents(p, "calibration")
    assert "\n" not in str(e.value) and name in str(e.value)


def test_missing_and_binary(tmp_path: Path) -> None:
    with pytest.raises(OnnxpipeError, match="no such calibration file"):
        read_documents(tmp_path / "nope.txt", "calibration")
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(OnnxpipeError, match="not UTF-8"):
        read_documents(p, "eval")


def test_too_short_for_one_sample(tmp_path: Path) -> None:
    p = tmp_path / "short.txt"
    p.write_text("x" * 20)
    with pytest.raises(OnnxpipeError, match=r"too short: 20 tokens, and one sample needs 36"):
        calibration_samples(CharTokenizer(), p, CalibrationConfig(prefill_len=32, decode_steps=4))


def test_samples_spread_over_the_whole_text(tmp_path: Path) -> None:
    p = tmp_path / "long.txt"
    p.write_text("".join(chr(65 + i % 50) for i in range(10_000)))
    cfg = CalibrationConfig(max_samples=5, prefill_len=16, decode_steps=4, batch_size=2)
    samples = calibration_samples(CharTokenizer(), p, cfg)
    assert samples.shape == (5, 20)
    ids = tokenize_documents(CharTokenizer(), [p.read_text()])
    # the first sample is the start of the text and the last one is the last whole chunk
    assert np.array_equal(samples[0], ids[:20])
    last = (len(ids) // 20 - 1) * 20
    assert np.array_equal(samples[-1], ids[last:last + 20])
    assert feed_count(samples, cfg) == 3 * (1 + 4)
