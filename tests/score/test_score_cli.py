"""`onnxpipe score` through click: bad input fails in one line; bad records are reported with line numbers."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner
from score.conftest import random_records, read_jsonl, write_jsonl

from onnxpipe.cli import main


def _score(*args: str):
    return CliRunner().invoke(main, ["score", *args, "--provider", "cpu", "--no-progress"])


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_empty_input(tiny_onnx, tmp_path):
    (tmp_path / "in.jsonl").write_text("\n  \n")
    _one_line_error(_score(str(tiny_onnx("gpt2")), str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl")),
                    "no records")
    assert not (tmp_path / "o.jsonl").exists()


def test_malformed_jsonl_fails_in_fail_mode_before_scoring(tiny_onnx, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", random_records(5, seed=0) + ['{"input_ids": [1, 2'] + random_records(2, seed=1))
    r = _score(str(tiny_onnx("gpt2")), str(inp), "-o", str(tmp_path / "o.jsonl"), "--on-bad-record", "fail")
    _one_line_error(r, "in.jsonl:6", "not valid JSON", "--on-bad-record skip")
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_records_are_skipped_with_line_numbers(tiny_onnx, tmp_path):
    lines = random_records(3, seed=0) + [
        "[1, 2]",                                   # 4: not an object
        {"text": "hi", "input_ids": [1, 2]},        # 5: two kinds at once
        {"input_ids": [1, 999]},                    # 6: outside the vocabulary
        {"input_ids": [4]},                         # 7: nothing to score
        {"id": 1.5, "input_ids": [1, 2]},           # 8: id type
        {"prompt_ids": [1, 2], "completion_ids": []},  # 9: empty completion
        "",                                         # 10: blank: not a record
        {"input_ids": [1, 2, 3]},                   # 11: fine, id defaults to the line number
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    r = _score(str(tiny_onnx("gpt2")), str(inp), "-o", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 0, r.output
    for line in (4, 5, 6, 7, 8, 9):
        assert f"in.jsonl:{line}:" in r.output
    assert "in.jsonl:10" not in r.output and "skipped 6 bad record(s)" in r.output
    assert [row["id"] for row in read_jsonl(tmp_path / "o.jsonl")] == ["r0", "r1", "r2", 11]
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert summary["bad_records"] == 6 and [b["where"] for b in summary["bad"]] == [f"in.jsonl:{n}" for n in range(4, 10)]


def test_missing_model_dir(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", random_records(2, seed=0))
    _one_line_error(_score(str(tmp_path / "nope"), str(inp), "-o", str(tmp_path / "o.jsonl")), "no such model directory")


@pytest.mark.parametrize("which", ["input", "output"])
def test_unknown_extension(tiny_onnx, tmp_path, which):
    inp = write_jsonl(tmp_path / ("in.csv" if which == "input" else "in.jsonl"), random_records(2, seed=0))
    out = tmp_path / ("o.csv" if which == "output" else "o.jsonl")
    _one_line_error(_score(str(tiny_onnx("gpt2")), str(inp), "-o", str(out)), f"unknown {which} extension '.csv'")


def test_missing_input_and_existing_output(tiny_onnx, tmp_path):
    model = str(tiny_onnx("gpt2"))
    _one_line_error(_score(model, str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o.jsonl")), "no such input")
    inp = write_jsonl(tmp_path / "in.jsonl", random_records(3, seed=0))
    (tmp_path / "o.jsonl").write_text("precious\n")
    _one_line_error(_score(model, str(inp), "-o", str(tmp_path / "o.jsonl")), "already exists", "--force")
    assert (tmp_path / "o.jsonl").read_text() == "precious\n"
    _one_line_error(_score(model, str(inp), "-o", str(tmp_path / "o.jsonl"), "--resume", "--force"), "contradict")
    assert _score(model, str(inp), "-o", str(tmp_path / "o.jsonl"), "--force").exit_code == 0


def test_text_records_need_a_tokenizer(tiny_onnx, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    _one_line_error(_score(str(tiny_onnx("gpt2")), str(inp), "-o", str(tmp_path / "o.jsonl")), "no tokenizer.json")


@pytest.mark.parametrize("content", [b"", b'{"version": "1.0", "truncated'])
def test_unreadable_tokenizer_is_one_line_naming_it(tiny_onnx, tmp_path, content):
    """An empty or truncated tokenizer.json was `unexpected Exception: EOF while parsing ...` (generate named it)."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_onnx("llama"), model)
    (model / "tokenizer.json").write_bytes(content)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    result = _score(str(model), str(inp), "-o", str(tmp_path / "o.jsonl"))
    _one_line_error(result, str(model / "tokenizer.json"), "not a tokenizer")
    assert "unexpected" not in result.output


def test_a_pipe_as_input_is_refused_not_waited_on(tiny_onnx, tmp_path):
    """`score MODEL fifo.jsonl`: the records were counted from the pipe, then the run opened it again and waited for
    a writer forever. A subprocess, so that the old behaviour fails the test by its timeout instead of hanging it."""
    import os
    import subprocess
    import threading

    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "w") as f:
            f.write(json.dumps({"input_ids": [1, 2, 3]}) + "\n")

    threading.Thread(target=feed, daemon=True).start()
    r = subprocess.run([sys.executable, "-m", "onnxpipe", "score", str(tiny_onnx("gpt2")), str(fifo), "-o",
                        str(tmp_path / "o.jsonl"), "--provider", "cpu", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"Error: {fifo}: not a regular file (a pipe or a device?); score reads its input more " \
                               "than once (to count it, to score it, on --resume): save it to a file first"
    with open(fifo, "rb") as f:  # the run refused before opening the pipe: let the writer finish
        f.read()


def test_stride_must_be_below_context(tiny_onnx, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", random_records(2, seed=0))
    _one_line_error(_score(str(tiny_onnx("gpt2")), str(inp), "-o", str(tmp_path / "o.jsonl"), "--stride", "128"),
                    "--stride must be in 1..127")


def test_parquet_and_sharded_inputs_give_the_jsonl_results(tiny_onnx, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = str(tiny_onnx("gpt2"))
    recs = random_records(30, seed=3, max_len=150)
    write_jsonl(tmp_path / "all.jsonl", recs)
    assert _score(model, str(tmp_path / "all.jsonl"), "-o", str(tmp_path / "ref.jsonl")).exit_code == 0
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", recs[:10])
    pq.write_table(pa.Table.from_pylist(recs[10:]), shards / "b.parquet")
    r = _score(model, str(shards), "-o", str(tmp_path / "o.parquet"), "--chunk-records", "4")
    assert r.exit_code == 0, r.output
    got = pq.read_table(tmp_path / "o.parquet").to_pylist()
    ref = read_jsonl(tmp_path / "ref.jsonl")
    assert [g["id"] for g in got] == [x["id"] for x in ref]
    assert max(abs(g["loglik"] - x["loglik"]) for g, x in zip(got, ref)) < 2e-5
    assert not (tmp_path / "o.parquet.parts").exists()



def test_local_engine_needs_neither_ray_nor_pyarrow(tiny_onnx, tmp_path, monkeypatch):
    for name in ("ray", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` now raises ImportError
    model = str(tiny_onnx("gpt2"))
    inp = write_jsonl(tmp_path / "in.jsonl", random_records(5, seed=0))
    assert _score(model, str(inp), "-o", str(tmp_path / "o.jsonl")).exit_code == 0
    _one_line_error(_score(model, str(inp), "-o", str(tmp_path / "o.parquet")), "Parquet needs pyarrow")
    _one_line_error(_score(model, str(inp), "-o", str(tmp_path / "r.jsonl"), "--engine", "ray"),
                    "--engine ray needs ray and pyarrow")
