"""The CLI's export and inspect commands, and every bad input: one line, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxpipe.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_export_and_inspect(tiny_hf, tmp_path):
    out = tmp_path / "gpt2-onnx"
    r = run("export", tiny_hf("gpt2"), "-o", out)
    assert r.exit_code == 0, r.output
    assert "parity:" in r.output and "ok" in r.output
    r = run("inspect", out)
    assert r.exit_code == 0, r.output
    for text in ("GPT2LMHeadModel", "export", "input_ids", "present.0.key", "MatMul", "greedy 100.0%"):
        assert text in r.output


def test_missing_dir(tmp_path):
    assert_one_line_error(run("export", tmp_path / "nope", "-o", tmp_path / "o"), "no such directory")


def test_dir_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    assert_one_line_error(run("export", tmp_path / "m", "-o", tmp_path / "o"), "no config.json")


def test_malformed_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    assert_one_line_error(run("export", tmp_path / "m", "-o", tmp_path / "o"), "malformed JSON")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    r = run("export", tmp_path / "m", "-o", tmp_path / "o")
    assert_one_line_error(r, "unsupported model_type 'bert'", "supported:", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3")


@pytest.mark.parametrize(("key", "value"), [("num_attention_heads", 0), ("hidden_size", -64), ("num_hidden_layers", 0),
                                          ("vocab_size", 2.5), ("head_dim", True), ("max_position_embeddings", "Infinity")])
def test_config_size_that_is_not_a_positive_integer(tmp_path, key, value):
    """num_attention_heads 0 was `unexpected ZeroDivisionError`, hidden_size -64 `unexpected RuntimeError: Trying to
    create tensor with negative dimension`; num_hidden_layers 0 surfaced as weights not matching the config."""
    (tmp_path / "m").mkdir()
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, key: value}
    text = json.dumps(cfg).replace('"Infinity"', "Infinity")  # JSON as Python writes and reads it
    (tmp_path / "m" / "config.json").write_text(text)
    r = run("export", tmp_path / "m", "-o", tmp_path / "o")
    assert_one_line_error(r, f"config.json: {key} must be a positive integer")
    assert not (tmp_path / "o").exists()


def test_config_value_of_the_wrong_type(tmp_path):
    """rms_norm_eps "nan" (a string) was `unexpected StrictDataclassFieldValidationError` while loading the weights."""
    (tmp_path / "m").mkdir()
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "rms_norm_eps": "nan"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    r = run("export", tmp_path / "m", "-o", tmp_path / "o")
    assert_one_line_error(r, "config.json: transformers cannot read it", "rms_norm_eps")
    assert "unexpected" not in r.output


@pytest.mark.parametrize("content", ['{"bos_token_id": 1,', "[]"])
def test_malformed_generation_config(tiny_hf, tmp_path, content):
    """A truncated generation_config.json was `unexpected OSError: It looks like the config file ... is not a valid
    JSON file` once transformers loaded the weights; it is refused up front, naming it."""
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_hf("llama"), src)
    (src / "generation_config.json").write_text(content)
    r = run("export", src, "-o", tmp_path / "o")
    assert_one_line_error(r, str(src / "generation_config.json"))
    assert "unexpected" not in r.output and not (tmp_path / "o").exists()


def test_weights_do_not_match_config(tiny_hf, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    for f in tiny_hf("llama").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    r = run("export", src, "-o", tmp_path / "o")
    assert_one_line_error(r, "weights")
    assert not (tmp_path / "o").exists()


def test_missing_weights_file(tiny_hf, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text((tiny_hf("llama") / "config.json").read_text())
    assert_one_line_error(run("export", src, "-o", tmp_path / "o"), "no weights")


@pytest.mark.parametrize(("name", "content"), [("tokenizer.json", ""), ("tokenizer.json", '{"version": "1.0", "mo'),
                                             ("tokenizer_config.json", '{"bos_token": ')])
def test_unreadable_tokenizer_file_refused_before_export(tiny_hf, tmp_path, name, content):
    """An empty or truncated tokenizer file was copied into a complete-looking output (exit 0); generate then
    failed on it. It is refused up front, naming it, and nothing is written."""
    import shutil

    from tiny import save_byte_tokenizer

    src = tmp_path / "m"
    shutil.copytree(tiny_hf("llama"), src)
    save_byte_tokenizer(src)
    (src / name).write_text(content)
    assert_one_line_error(run("export", src, "-o", tmp_path / "o"), str(src / name), "not")
    assert not (tmp_path / "o").exists()


def test_existing_output_without_force(tiny_hf, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert_one_line_error(run("export", tiny_hf("gpt2"), "-o", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "x"


def test_force_replaces_output(tiny_hf, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    (out / "onnxpipe.json").write_text("{}")  # --force replaces only a directory onnxpipe wrote
    r = run("export", tiny_hf("gpt2"), "-o", out, "--force", "--no-verify")
    assert r.exit_code == 0, r.output
    assert not (out / "old.txt").exists() and (out / "onnxpipe.json").exists()
    assert json.loads((out / "onnxpipe.json").read_text())["steps"][0]["check"] is None


def test_interrupt_leaves_nothing(tiny_hf, tmp_path, monkeypatch):
    from onnxpipe.export import exporter

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "_torch_export", interrupted)
    r = run("export", tiny_hf("gpt2"), "-o", tmp_path / "o")
    assert r.exit_code == 130
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_killed_export_leaves_no_partial_output(tiny_hf, tmp_path):
    """kill -9 in the middle of an export: no OUT_DIR; the next run cleans the leftovers and succeeds."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe", "export", str(tiny_hf("llama")), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".onnxpipe-tmp-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".onnxpipe-tmp-*")), "the export never started writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    r = run("export", tiny_hf("llama"), "-o", out, "--no-verify")
    assert r.exit_code == 0, r.output
    assert out.is_dir() and not list(tmp_path.glob(".onnxpipe-tmp-*"))


def test_inspect_not_a_model_dir(tmp_path):
    assert_one_line_error(run("inspect", tmp_path), "not an onnxpipe model directory")


def test_inspect_corrupt_onnx(tiny_onnx, tmp_path):
    src = tiny_onnx("gpt2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "onnxpipe.json").write_text((src / "onnxpipe.json").read_text())
    (bad / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    assert_one_line_error(run("inspect", bad), "not a readable ONNX model")


def test_inspect_malformed_manifest(tmp_path):
    (tmp_path / "onnxpipe.json").write_text("[1, 2")
    assert_one_line_error(run("inspect", tmp_path), "malformed manifest")


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "onnxpipe", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "export" in r.stdout
