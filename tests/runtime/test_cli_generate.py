"""`onnxpipe generate`: text, streaming, JSONL, and the bad inputs (one line, non-zero exit, no traceback)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from onnxpipe.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_generate_prompt_streams_text(byte_model):
    from onnxpipe import load

    d = byte_model("llama")
    want = load(d, "cpu").generate("def fib(n):", max_new_tokens=12, seed=0, temperature=0.8, top_p=0.95).text
    r = run("generate", d, "--prompt", "def fib(n):", "--provider", "cpu", "--max-new-tokens", 12,
            "--temperature", 0.8, "--top-p", 0.95, "--seed", 0)
    assert r.exit_code == 0, r.output
    assert r.stdout == want + "\n"
    assert "provider: cpu" in r.stderr


def test_generate_prompts_file_jsonl(byte_model, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("def fib(n):\n\nimport os\n")
    r = run("generate", byte_model("llama"), "--prompts", f, "--jsonl", "--max-new-tokens", 6, "--provider", "cpu")
    assert r.exit_code == 0, r.output
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [x["prompt"] for x in rows] == ["def fib(n):", "import os"]
    assert all(len(x["token_ids"]) <= 6 and x["finish_reason"] in ("length", "eos") for x in rows)
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "a"}\n"b"\n')
    r = run("generate", byte_model("llama"), "--prompts", j, "--max-new-tokens", 3, "--provider", "cpu", "--batch-size", 1)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("[0] ") and "\n[1] " in r.stdout


def test_unavailable_provider_says_what_was_used(byte_model):
    r = run("generate", byte_model("llama"), "--prompt", "x", "--provider", "cuda", "--max-new-tokens", 2)
    assert r.exit_code == 0, r.output
    assert "cuda was requested" in r.stderr and "using cpu instead" in r.stderr and "provider: cpu" in r.stderr


def test_bad_inputs(byte_model, tiny_onnx, tmp_path):
    assert_one_line_error(run("generate", tmp_path / "nope", "--prompt", "x"), "no such model directory")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_one_line_error(run("generate", byte_model("llama"), "--prompts", empty), "no prompts")
    assert_one_line_error(run("generate", byte_model("llama"), "--prompts", tmp_path / "missing.txt"), "no such prompts file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert_one_line_error(run("generate", byte_model("llama"), "--prompts", bad), "bad.jsonl:1: not JSON")
    r = run("generate", byte_model("llama"))
    assert r.exit_code == 2 and "--prompt TEXT or --prompts FILE" in r.output
    r = run("generate", tiny_onnx("llama"), "--prompt", "x", "--provider", "cpu")
    assert r.exit_code == 1 and "no tokenizer" in r.output and "Traceback" not in r.output


def test_prompt_that_is_not_valid_unicode(byte_model):
    """Bytes that are not UTF-8 on the command line (`--prompt $'ab\\xffcd'`) reach Python as a lone surrogate:
    `unexpected TypeError: TextInputSequence must be str` from the tokenizers library. Now one line saying so."""
    r = run("generate", byte_model("llama"), "--prompt", "ab\udcffcd", "--provider", "cpu", "--max-new-tokens", 2)
    assert r.exit_code == 1 and "Traceback" not in r.output and "unexpected" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert errors == ["Error: text is not valid Unicode: a lone surrogate (\\udcff) at character 2 (bytes that are "
                      "not UTF-8?)"], r.output


def test_stop_option(byte_model):
    from onnxpipe import load
    from onnxpipe.runtime.generate import unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\\n") == "a\\n" and unescape("é\\t") == "é\t"
    d = byte_model("llama")
    full = load(d, "cpu").generate("def", max_new_tokens=20, stop_token_ids=[]).text
    stop = full[6:8]
    r = run("generate", d, "--prompt", "def", "--provider", "cpu", "--max-new-tokens", 20, "--stop", stop)
    assert r.exit_code == 0, r.output
    assert r.stdout == full[: full.index(stop)] + "\n"
