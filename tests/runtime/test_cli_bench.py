"""`onnxpipe bench`: one row per batch size with prefill, decode and tokens/s, JSON beside; bad input in one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from onnxpipe.cli import main
from onnxpipe.runtime import load
from onnxpipe.runtime.bench import bench


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_bench_prints_and_writes_a_row_per_batch(tiny_onnx, tmp_path):
    out = tmp_path / "bench.json"
    r = run("bench", tiny_onnx("llama"), "--provider", "cpu", "--batch", "1,3", "--prompt-tokens", 12,
            "--new-tokens", 5, "--repeats", 2, "--json", out)
    assert r.exit_code == 0, r.output
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [ln.split("|")[1].strip() for ln in table] == ["1", "3"]
    data = json.loads(out.read_text())
    assert data["provider"] == "cpu" and [row["batch"] for row in data["rows"]] == [1, 3]
    for row in data["rows"]:
        assert row["prompt_tokens"] == 12 and row["new_tokens"] == 5 and row["runs"] == 2
        assert row["prefill_ms"] > 0 and row["decode_ms"] > 0 and row["tokens_per_s"] > 0
        # every run generates exactly new_tokens per row: the whole run is at least prefill + 4 steps
        whole_s = row["batch"] * row["new_tokens"] / row["tokens_per_s"]
        assert whole_s * 1e3 >= row["prefill_ms"]


def test_bench_generates_exactly_the_asked_tokens(tiny_onnx, monkeypatch):
    lm = load(tiny_onnx("llama"), "cpu")
    seen = []
    real = lm._decode

    def counting(rows, cfg):
        for step in real(rows, cfg):
            yield step
        seen.append([len(r.tokens) for r in rows])

    monkeypatch.setattr(lm, "_decode", counting)
    bench(lm, [2], prompt_tokens=6, new_tokens=7, repeats=2)
    assert seen == [[7, 7]] * 3  # one untimed run and two timed, no row stopped early


@pytest.mark.parametrize("args,fragment", [
    (["--batch", "1,x"], "not a comma-separated list"),
    (["--batch", "0"], "batch sizes must be >= 1"),
    (["--prompt-tokens", 100000], "exceed the model's"),
])
def test_bench_bad_input_is_one_line(tiny_onnx, args, fragment):
    r = run("bench", tiny_onnx("llama"), "--provider", "cpu", *args)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert fragment in r.output


def test_bench_json_never_lands_in_the_model_directory(tiny_onnx, tmp_path):
    """`--json MODEL/onnxpipe.json` overwrote the model's manifest after the run (exit 0); a directory or an
    unwritable place failed only after the run, as `unexpected IsADirectoryError`. Now refused before any work."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_onnx("llama"), model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    args = ["bench", model, "--provider", "cpu", "--prompt-tokens", 4, "--new-tokens", 2, "--repeats", 1]
    (tmp_path / "link.json").symlink_to(model / "onnxpipe.json")
    (tmp_path / "notes.txt").write_text("a user's file")
    for target, fragment in [(model / "onnxpipe.json", "the output is inside the input"),
                             (model, "the output is the input"), (tmp_path / "link.json", "inside the input"),
                             (tmp_path, "the output contains the input"), (tmp_path / "notes.txt" / "x.json", "not a directory")]:
        r = run(*args, "--json", target)
        assert r.exit_code == 1 and "Traceback" not in r.output and "unexpected" not in r.output, r.output
        errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
        assert len(errors) == 1 and fragment in errors[0], r.output
        assert "provider:" not in r.output  # refused before the model was loaded
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    r = run(*args, "--json", tmp_path / "new" / "dir" / "b.json")  # missing folders are made
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "new" / "dir" / "b.json").read_text())["rows"]
    assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["b.json"]
