"""Chat through the model's own template: the library (chat, chat_stream), `generate --chat` and `onnxpipe chat`."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from click.testing import CliRunner

from onnxpipe.cli import main
from onnxpipe.tokenizer import Tokenizer

USER = [{"role": "user", "content": "def fib(n):"}]


def test_chat_applies_template_and_stops_at_end_of_turn(stdlib_lm, stdlib_model):
    lm = stdlib_lm
    ids = lm.chat_prompt(USER)
    tok = Tokenizer.from_dir(stdlib_model)
    assert ids == tok.encode("def fib(n):\n", add_special_tokens=False)
    two = lm.chat_prompt(USER + [{"role": "assistant", "content": "pass"}, {"role": "user", "content": "x"}])
    assert two == tok.encode("def fib(n):pass", add_special_tokens=False) + [0] + tok.encode("x\n", add_special_tokens=False)
    assert 0 in lm.chat_stop_ids()
    res = lm.chat(USER, max_new_tokens=40)
    same = lm.generate(ids, max_new_tokens=40, stop_token_ids=lm.chat_stop_ids())
    assert (res.token_ids, res.text) == (same.token_ids, same.text) and res.token_ids
    assert res.finish_reason in ("eos", "length")
    if res.finish_reason == "eos":
        assert res.token_ids[-1] == 0 and "<|endoftext|>" not in res.text
    pieces = list(lm.chat_stream(USER, max_new_tokens=40))
    assert "".join(p.text for p in pieces) == res.text and pieces[-1].finish_reason == res.finish_reason


def test_generate_chat_cli(stdlib_lm, stdlib_model, tmp_path):
    want = stdlib_lm.chat([{"role": "system", "content": "Be brief."}] + USER, max_new_tokens=20).text
    r = CliRunner().invoke(main, ["generate", str(stdlib_model), "--chat", "--system", "Be brief.", "--prompt",
                                  "def fib(n):", "--max-new-tokens", "20", "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.stdout == want + "\n"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def fib(n):\nimport os\nclass Stack:\n")
    r = CliRunner().invoke(main, ["generate", str(stdlib_model), "--chat", "--prompts", str(prompts), "--jsonl",
                                  "--batch-size", "2", "--max-new-tokens", "20", "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == [
        stdlib_lm.chat([{"role": "user", "content": p}], max_new_tokens=20).text for p in ("def fib(n):", "import os", "class Stack:")]
    r = CliRunner().invoke(main, ["generate", str(stdlib_model), "--system", "x", "--prompt", "a"])
    assert r.exit_code == 2 and "--system needs --chat" in r.output


def test_chat_console_keeps_the_conversation(stdlib_lm, stdlib_model):
    lm = stdlib_lm
    first = lm.chat(USER, max_new_tokens=12).text
    convo = USER + [{"role": "assistant", "content": first}, {"role": "user", "content": "import os"}]
    second = lm.chat(convo, max_new_tokens=12).text
    r = CliRunner().invoke(main, ["chat", str(stdlib_model), "--max-new-tokens", "12", "--provider", "cpu"],
                           input="def fib(n):\n\nimport os\n/reset\nimport os\n")
    assert r.exit_code == 0, r.output
    alone = lm.chat([{"role": "user", "content": "import os"}], max_new_tokens=12).text
    assert r.stdout == f"{first}\n{second}\n{alone}\n"


def test_chat_console_goes_on_after_a_line_it_cannot_take(stdlib_lm):
    """Bytes that are not UTF-8 on the terminal reach Python as a lone surrogate: that line gets one error, and the
    conversation goes on without it (the next line is answered as if it had not been typed)."""
    from onnxpipe.serve.console import run_console

    lm = stdlib_lm
    first = lm.chat(USER, max_new_tokens=12).text
    second = lm.chat(USER + [{"role": "assistant", "content": first}, {"role": "user", "content": "import os"}],
                     max_new_tokens=12).text
    out: list[str] = []
    notes: list[str] = []
    turns = run_console(lm, ["def fib(n):\n", "ab\udcffcd\n", "import os\n"], out.append, notes.append,
                        max_new_tokens=12)
    assert notes == ["error: the line is not UTF-8 (byte 0xff at character 3); it was not sent"], notes
    assert "".join(out) == f"{first}\n{second}\n"
    assert [t["content"] for t in turns] == ["def fib(n):", first, "import os", second]


def test_chat_without_template_is_one_line(stdlib_model, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(stdlib_model, bare)
    (bare / "chat_template.jinja").unlink()
    for args in (["chat", str(bare)], ["generate", str(bare), "--chat", "--prompt", "a"]):
        r = CliRunner().invoke(main, args + ["--provider", "cpu"], input="hi\n")
        assert r.exit_code == 1 and "no chat template" in r.output and "Traceback" not in r.output, r.output


def test_chat_console_drops_the_oldest_turns_to_fit(stdlib_lm, stdlib_model):
    """With room for 200 new tokens in a 256-position model, three 20-token messages do not fit together: the oldest
    turns go (said on stderr) and every line still gets a reply."""
    line = "import os, sys, re, json, time, math, random, string\n"
    assert 15 < len(stdlib_lm.chat_prompt([{"role": "user", "content": line}])) < 40
    r = CliRunner().invoke(main, ["chat", str(stdlib_model), "--max-new-tokens", "200", "--provider", "cpu"],
                           input=line * 3)
    assert r.exit_code == 0, r.output
    assert "the oldest turn was dropped" in r.stderr
    assert "error" not in r.stderr and r.stdout.strip()


def test_chat_console_refuses_a_message_too_long_for_the_context_and_keeps_the_conversation(stdlib_lm):
    """A message that cannot fit however many turns are dropped is one error, and the turns before it stay: they
    were dropped for nothing before it was refused."""
    from onnxpipe.serve.console import run_console

    lm = stdlib_lm
    first = lm.chat(USER, max_new_tokens=12).text
    second = lm.chat(USER + [{"role": "assistant", "content": first}, {"role": "user", "content": "import os"}],
                     max_new_tokens=12).text
    huge = "x = 1 " * 200
    assert len(lm.chat_prompt([{"role": "user", "content": huge}])) > lm.session.max_positions
    out: list[str] = []
    notes: list[str] = []
    turns = run_console(lm, ["def fib(n):\n", huge + "\n", "import os\n"], out.append, notes.append,
                        max_new_tokens=12)
    assert len(notes) == 1 and "does not fit" in notes[0] and "--max-new-tokens" in notes[0], notes
    assert "".join(out) == f"{first}\n{second}\n"
    assert [t["content"] for t in turns] == ["def fib(n):", first, "import os", second]


def test_chat_console_with_max_new_tokens_past_the_context_keeps_the_conversation(stdlib_lm):
    """--max-new-tokens larger than the context kept no room for the conversation: every line dropped all the turns
    before it. The room kept for a reply is at most half the context (a reply stops at the context's end anyway)."""
    from onnxpipe.serve.console import run_console

    lm = stdlib_lm
    options = dict(max_new_tokens=10 * lm.session.max_positions, stop_strings=["\n"])
    first = lm.chat([{"role": "user", "content": "import os"}], **options).text
    convo = [{"role": "user", "content": "import os"}, {"role": "assistant", "content": first},
             {"role": "user", "content": "import re"}]
    second = lm.chat(convo, **options).text
    assert len(lm.chat_prompt(convo)) < lm.session.max_positions // 2  # it fits beside half the context
    out: list[str] = []
    notes: list[str] = []
    turns = run_console(lm, ["import os\n", "import re\n"], out.append, notes.append, **options)
    assert notes == [] and "".join(out) == f"{first}\n{second}\n"
    assert [t["content"] for t in turns] == ["import os", first, "import re", second]


def test_ctrl_c_during_a_reply_stops_it_and_the_console_goes_on(stdlib_lm):
    """Ctrl-C while a reply streams ends that reply (what was written stays in the conversation); the next line is
    answered. It ended the whole console before."""
    from onnxpipe.serve.console import run_console

    lm = stdlib_lm
    out: list[str] = []
    notes: list[str] = []

    pressed: list[bool] = []

    def write(text: str) -> None:
        if len(out) == 3 and not pressed:  # at the fourth piece of the first reply
            pressed.append(True)
            raise KeyboardInterrupt
        out.append(text)

    turns = run_console(lm, ["def fib(n):\n", "import os\n"], write, notes.append, max_new_tokens=12)
    assert notes == ["(reply interrupted)"]
    assert out[3] == "\n"  # the interrupted reply's line is ended
    partial = "".join(out[:3])
    assert partial and turns[:2] == [{"role": "user", "content": "def fib(n):"},
                                     {"role": "assistant", "content": partial}]
    second = lm.chat(turns[:2] + [{"role": "user", "content": "import os"}], max_new_tokens=12).text
    assert turns[2:] == [{"role": "user", "content": "import os"}, {"role": "assistant", "content": second}]


def test_terminal_lines_prompt_and_end_at_ctrl_d(monkeypatch, capsys):
    from onnxpipe.serve.console import terminal_lines

    typed = iter(["hello", "", "/reset"])
    prompts: list[str] = []

    def fake_input(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert list(terminal_lines()) == ["hello", "", "/reset"]
    assert prompts == ["> "] * 4 and capsys.readouterr().out == "\n"


def test_serve_says_at_start_when_the_model_has_no_chat_template(stdlib_model, tmp_path, monkeypatch):
    """A base model's /v1/chat/completions can only answer 400: that is said once when the server starts, not first
    found by a client. (With --port 0 the start line says a free port is taken, not "http://127.0.0.1:0".)"""
    import uvicorn

    from onnxpipe.serve.app import serve_forever

    def started(self):  # the server "runs" and stops at once: what is checked is what was said before
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", started)
    bare = tmp_path / "bare"
    shutil.copytree(stdlib_model, bare)
    for model, says in ((stdlib_model, False), (bare, True)):
        if model is bare:
            (bare / "chat_template.jinja").unlink()
        lines: list[str] = []
        serve_forever(model, provider="cpu", port=0, announce=lines.append)
        assert any(line.startswith("serving ") and "a free port" in line and ":0 " not in line for line in lines), lines
        assert any("no chat template" in line and "/v1/chat/completions" in line for line in lines) == says, lines


@pytest.mark.fast
def test_generate_with_the_prompt_as_a_bare_word_says_where_it_goes(tmp_path):
    for args, hint in ((["--chat", "What is ONNX?"], "--chat --prompt TEXT"), (["What is ONNX?"], "DIR --prompt TEXT")):
        r = CliRunner().invoke(main, ["generate", str(tmp_path)] + args)
        assert r.exit_code == 2 and "'What is ONNX?'" in r.output and hint in r.output, r.output
        assert "Traceback" not in r.output


class _CtrlCAfter(io.BytesIO):
    """Standard input whose lines run out into a Ctrl-C, as when it is pressed at the console's prompt."""

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data and size != 0:  # read(0) is click's look at the stream's kind
            raise KeyboardInterrupt
        return data

    read1 = read

    def readline(self, size: int | None = -1) -> bytes:
        data = super().readline(size)
        if not data and size != 0:
            raise KeyboardInterrupt
        return data


def test_ctrl_c_at_the_prompt_ends_the_chat_with_130_and_no_nothing_was_written(stdlib_lm, stdlib_model):
    """Ctrl-C while the console waits for a line ends it with exit status 130 and no "interrupted; nothing was
    written", the line of the commands that write outputs (a chat writes none). End of input (Ctrl-D) exits 0."""
    first = stdlib_lm.chat(USER, max_new_tokens=12).text
    args = ["chat", str(stdlib_model), "--max-new-tokens", "12", "--provider", "cpu"]
    r = CliRunner().invoke(main, args, input=_CtrlCAfter(b"def fib(n):\n"))
    assert r.exit_code == 130, (r.exit_code, r.output)
    assert r.stdout == f"{first}\n" and "nothing was written" not in r.stderr and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, args, input="def fib(n):\n")
    assert r.exit_code == 0 and r.stdout == f"{first}\n", r.output


@pytest.mark.fast
def test_terminal_lines_end_the_prompts_line_at_ctrl_c(monkeypatch, capsys):
    """Ctrl-C at the terminal's prompt ends the prompt's line (the shell's next prompt is not left after "> ^C") and
    raises KeyboardInterrupt for the command to end with 130."""
    from onnxpipe.serve.console import terminal_lines

    typed = iter(["hello"])

    def fake_input(prompt: str) -> str:
        try:
            return next(typed)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr("builtins.input", fake_input)
    lines = terminal_lines()
    assert next(lines) == "hello"
    with pytest.raises(KeyboardInterrupt):
        next(lines)
    assert capsys.readouterr().out == "\n"
