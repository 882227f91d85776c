"""One bad record never ends a scoring run: a record that fails anywhere (parse, tokenizer, model run, an unreadable
Parquet page) is reported as `file:line: reason` and skipped; the other records are scored as in a clean run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_checks import cli, one_line_error

from onnxpipe.errors import OnnxpipeError
from onnxpipe.score import ScoreConfig, score
from onnxpipe.score.scorer import WindowScorer


@pytest.fixture(scope="module")
def text_model(tiny_onnx, tmp_path_factory) -> Path:
    """The tiny GPT-2 export with a byte-level tokenizer.json (one token per byte), so text records can be scored."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out = tmp_path_factory.mktemp("score-records") / "gpt2-bytes"
    shutil.copytree(tiny_onnx("gpt2"), out)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    return out


def _texts(n: int) -> list[dict]:
    return [{"id": f"t{i}", "text": f"record {i}: " + "abc def " * (i % 7 + 1)} for i in range(n)]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _config(**kw) -> ScoreConfig:
    return ScoreConfig(**{"progress": False, "provider": "cpu", "chunk_records": 16, **kw})


def test_a_run_whose_every_record_is_bad_fails(text_model, tmp_path):
    """Three bad records and no good one: the run printed "generated 0 tokens for 0 records" and exited 0, as if
    it had succeeded. Skipping is for some records, not all: exit 1, naming the input and the first fault."""
    inp = _write_lines(tmp_path / "in.jsonl", ["not json", '{"text": 5}', "[]"])
    r = cli("score", text_model, inp, "-o", tmp_path / "out.jsonl", "--provider", "cpu", "--no-progress")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, r.output
    assert f"{inp}: no record could be scored: all 3 were bad (first: in.jsonl:1: not valid JSON" in errors[0]
    good = _write_lines(tmp_path / "in2.jsonl", ["not json", json.dumps(_texts(1)[0])])  # one good one: a run
    assert cli("score", text_model, good, "-o", tmp_path / "out2.jsonl", "--provider", "cpu", "--no-progress").exit_code == 0


def _assert_as_clean_run(model: Path, tmp_path: Path, records: list[dict], rows: list[dict]) -> None:
    """The rows equal a run over the good records alone (tokens exactly; loglik up to the float rounding of
    another batch composition)."""
    inp = _write_lines(tmp_path / "clean.jsonl", [json.dumps(r) for r in records])
    out = tmp_path / "clean.out.jsonl"
    out.unlink(missing_ok=True)
    score(model, inp, out, _config(), log=lambda m: None)
    clean = _rows(out)
    assert [r["id"] for r in rows] == [c["id"] for c in clean]
    assert [r["tokens"] for r in rows] == [c["tokens"] for c in clean]
    assert max(abs(r["loglik"] - c["loglik"]) for r, c in zip(rows, clean)) < 2e-5


def test_lone_surrogate_is_a_bad_record(text_model, tmp_path):
    """`"\\udc80"` in a JSONL record killed the chunk's batch tokenizer call, and --resume died at the same chunk."""
    good = _texts(30)
    lines = [json.dumps(r) for r in good]
    lines.insert(10, '{"id": "bad", "text": "caf\\udc80 au lait"}')  # JSON's escape of a lone surrogate
    inp = _write_lines(tmp_path / "in.jsonl", lines)
    r = cli("score", text_model, inp, "-o", tmp_path / "o.jsonl", "--provider", "cpu", "--no-progress",
            "--chunk-records", "16")
    assert r.exit_code == 0, r.output
    assert "in.jsonl:11: text is not valid Unicode: a lone surrogate (\\udc80) at character 3" in r.output
    _assert_as_clean_run(text_model, tmp_path, good, _rows(tmp_path / "o.jsonl"))
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert summary["bad_records"] == 1 and summary["bad"][0]["where"] == "in.jsonl:11"


def test_tokenizer_failure_fails_only_its_record(text_model, tmp_path, monkeypatch):
    """Whatever the tokenizer rejects: the batch call is retried text by text, so only the record it rejects is bad."""
    from tokenizers import Tokenizer

    real = Tokenizer.from_file(str(text_model / "tokenizer.json"))

    class Picky:
        def __getattr__(self, name):  # everything else from the real tokenizer
            return getattr(real, name)

        def encode_batch_fast(self, texts, add_special_tokens=True):
            if any("POISON" in t for t in texts):
                raise RuntimeError("tokenizer exploded")
            return real.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

        def encode(self, text, add_special_tokens=True):
            if "POISON" in text:
                raise RuntimeError("tokenizer exploded")
            return real.encode(text, add_special_tokens=add_special_tokens)

    monkeypatch.setattr(Tokenizer, "from_file", staticmethod(lambda path: Picky()))
    good = _texts(20)
    records = good[:5] + [{"id": "p", "text": "POISON"}] + good[5:]
    inp = _write_lines(tmp_path / "in.jsonl", [json.dumps(r) for r in records])
    said: list[str] = []
    summary = score(text_model, inp, tmp_path / "o.jsonl", _config(), log=said.append)
    assert summary.bad == [{"where": "in.jsonl:6", "error": "the tokenizer failed on it (tokenizer exploded)"}]
    assert [row["id"] for row in _rows(tmp_path / "o.jsonl")] == [g["id"] for g in good]


def test_model_run_failure_fails_only_its_record(text_model, tmp_path, monkeypatch):
    """A batch the model run fails on is rerun window by window: the record whose window fails is a bad record,
    the others of its batch are scored as in a clean run. A chunk where every record fails stops the run."""
    poison = 7  # the byte-level id of "(", which none of the text records holds
    real_score = WindowScorer.score

    def flaky(self, windows):
        if any(poison in np.asarray(t) for t, _ in windows):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated")
        return real_score(self, windows)

    monkeypatch.setattr(WindowScorer, "score", flaky)
    good = _texts(20)
    records = good[:8] + [{"id": "p", "input_ids": [1, 2, poison, 3]}] + good[8:]
    inp = _write_lines(tmp_path / "in.jsonl", [json.dumps(r) for r in records])
    summary = score(text_model, inp, tmp_path / "o.jsonl", _config(batch_tokens=100_000), log=lambda m: None)
    assert summary.bad_records == 1 and summary.bad[0]["where"] == "in.jsonl:9"
    assert "the model run failed on it" in summary.bad[0]["error"] and "simulated" in summary.bad[0]["error"]
    monkeypatch.setattr(WindowScorer, "score", real_score)
    _assert_as_clean_run(text_model, tmp_path, good, _rows(tmp_path / "o.jsonl"))

    monkeypatch.setattr(WindowScorer, "score", flaky)
    all_bad = _write_lines(tmp_path / "all.jsonl", [json.dumps({"input_ids": [poison, 1, 2]})] * 3)
    with pytest.raises(OnnxpipeError, match="failed on every record of a chunk"):
        score(text_model, all_bad, tmp_path / "all.out.jsonl", _config(), log=lambda m: None)


def test_deeply_nested_json_is_a_bad_record(text_model, tmp_path):
    lines = [json.dumps(r) for r in _texts(3)] + ["[" * 200_000 + "]" * 200_000]
    r = cli("score", text_model, _write_lines(tmp_path / "in.jsonl", lines), "-o", tmp_path / "o.jsonl",
            "--provider", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "in.jsonl:4: not valid JSON (nested too deeply)" in r.output


def _parquet_with_a_corrupt_row_group(path: Path, records: list[dict], group: int, rows_per_group: int) -> None:
    """Write row groups of ``rows_per_group`` rows, then overwrite the page header of one row group's text page."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=rows_per_group)
    meta = pq.ParquetFile(path).metadata
    column = next(meta.row_group(group).column(c) for c in range(meta.num_columns)
                  if meta.row_group(group).column(c).path_in_schema == "text")
    data = bytearray(path.read_bytes())
    data[column.data_page_offset:column.data_page_offset + 32] = b"\xff" * 32
    path.write_bytes(bytes(data))


def test_parquet_corrupt_data_page_rows_are_bad_records_and_the_rest_is_scored(text_model, tmp_path):
    """A corrupted data page ended the run (and --resume at the same place): its row group's rows are now bad
    records naming the file and the row range, and the other row groups are scored."""
    records = _texts(30)
    inp = tmp_path / "in.parquet"
    _parquet_with_a_corrupt_row_group(inp, records, group=1, rows_per_group=10)
    r = cli("score", text_model, inp, "-o", tmp_path / "o.jsonl", "--provider", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "in.parquet:11: unreadable Parquet data in rows 11-20 (row group 1)" in r.output
    _assert_as_clean_run(text_model, tmp_path, records[:10] + records[20:], _rows(tmp_path / "o.jsonl"))
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert summary["bad_records"] == 10 and summary["records"] == 20


def test_parquet_without_a_known_column_is_an_error(text_model, tmp_path):
    """A Parquet input with none of the record fields "succeeded" with an empty output and exit 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": "hello", "label": 1}] * 3), inp)
    one_line_error(cli("score", text_model, inp, "-o", tmp_path / "o.jsonl", "--provider", "cpu", "--no-progress"),
                   "in.parquet", "no column to score", "text, prompt+completion, input_ids", "body, label")
    assert not (tmp_path / "o.jsonl").exists()


def _json_values():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                                  max_size=4), max_leaves=12)


def test_parsed_records_are_valid_unicode_within_the_cap():
    """Any JSON value, any field holding any value (lone surrogates included): a Record or a BadRecord, and a Record's
    text is valid Unicode (a tokenizer can take it) within the size cap, its ids within the vocabulary. (That the
    parser never raises is also held by test_hostile_inputs.py, over more shapes.)"""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from onnxpipe.score.records import BadRecord, Record, parse_record

    fields = st.sampled_from(["id", "text", "prompt", "completion", "input_ids", "prompt_ids", "completion_ids", "x"])
    values = _json_values() | st.text(alphabet=st.characters(), max_size=30) | st.lists(st.integers(-5, 300), max_size=8)

    @settings(max_examples=100, deadline=None, database=None)
    @given(obj=st.dictionaries(fields, values, max_size=4) | _json_values(), generate=st.booleans())
    def check(obj, generate):
        rec = parse_record(obj, 1, Path("in.jsonl"), False, 256, generate, max_chars=25)
        assert isinstance(rec, (Record, BadRecord))
        if isinstance(rec, Record):
            for t in (rec.text, rec.prompt, rec.completion):
                if t is not None:
                    t.encode("utf-8")
                    assert len(t) <= 25
            for ids in (rec.ids, rec.prompt_ids, rec.completion_ids):
                assert ids is None or all(0 <= i < 256 for i in ids)

    check()

