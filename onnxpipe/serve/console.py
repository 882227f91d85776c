"""``onnxpipe chat DIR``: a conversation on the terminal. Each line read is a user message; the reply streams as it
is generated and joins the conversation, so the next line is answered with the whole exchange as context (the model's
own chat template). ``/reset`` starts over; end of input (Ctrl-D) ends it, as Ctrl-C at the prompt does. When the conversation no longer fits the model's
context with room for a reply, its oldest turns are dropped (the system message stays), and that is said."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.generate import LanguageModel

RESET = "/reset"


def conversation(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation: the system message (if any), then ``prompt`` as the user's."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": prompt}]


def terminal_lines(prompt: str = "> ") -> Iterator[str]:
    """Lines typed on a terminal, each after ``prompt`` (so the user sees the console waits), with line editing and
    history where Python has readline; Ctrl-D ends them, and Ctrl-C raises KeyboardInterrupt, each after ending the
    prompt's line."""
    try:
        import readline  # noqa: F401  (input() then edits the line and keeps a history)
    except ImportError:  # not on every platform
        pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()  # end the prompt's line
            return
        except KeyboardInterrupt:
            print()  # the shell's next prompt starts on a line of its own, not after "> ^C"
            raise


def run_console(lm: LanguageModel, lines: Iterable[str], write: Callable[[str], None], note: Callable[[str], None],
                system: str | None = None, **options: Any) -> list[dict[str, str]]:
    """Answer each line of ``lines`` in turn; returns the conversation as it stands at the end. Ctrl-C during a
    reply stops that reply (what was written of it stays in the conversation) and the console goes on; Ctrl-C
    while a line is read ends it: the KeyboardInterrupt of ``lines`` goes to the caller (``onnxpipe chat`` exits 130)."""
    head = [{"role": "system", "content": system}] if system is not None else []
    turns: list[dict[str, str]] = []
    context = lm.session.max_positions
    # room kept for a reply: --max-new-tokens, but never more than half the context (a reply is cut at the context's
    # end anyway, and keeping more room would drop the whole conversation before every line)
    reply_room = min(int(options.get("max_new_tokens", 64)), context // 2)
    limit = context - reply_room
    for line in lines:
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() == RESET:
            turns = []
            note("(conversation reset)")
            continue
        message = {"role": "user", "content": text}
        reply: list[str] = []
        try:
            _check_utf8(text)
            alone = len(lm.chat_prompt(head + [message]))
            if alone > limit:  # no dropping of turns makes it fit: refuse it, and keep the conversation as it is
                with_system = " with the system message" if head else ""
                raise OnnxpipeError(f"the message does not fit: it is {alone} tokens through the template{with_system}, "
                                    f"and the model's context of {context} tokens keeps {reply_room} for the reply "
                                    "(--max-new-tokens); shorten it")
            turns.append(message)
            while len(lm.chat_prompt(head + turns)) > limit and len(turns) > 1:
                del turns[: 2 if len(turns) > 2 else 1]  # the oldest user message and its reply
                note("(the oldest turn was dropped: the conversation no longer fit the model's context)")
            for piece in lm.chat_stream(head + turns, **options):
                write(piece.text)
                reply.append(piece.text)
        except OnnxpipeError as e:  # one message the model cannot take: say why, keep the conversation going
            note(f"error: {e}")
            if turns and turns[-1] is message:
                turns.pop()
            continue
        except KeyboardInterrupt:  # Ctrl-C during the reply: stop it, keep what was said of it
            write("\n")
            note("(reply interrupted)")
            if turns and turns[-1] is message:
                turns.append({"role": "assistant", "content": "".join(reply)})
            continue
        write("\n")
        turns.append({"role": "assistant", "content": "".join(reply)})
    return head + turns


def _check_utf8(text: str) -> None:
    """A line with bytes that are not UTF-8 reaches Python with each such byte as a lone surrogate (U+DC80..DCFF):
    say which byte, where in the line."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            byte = f"byte 0x{ord(ch) - 0xDC00:02x}" if ord(ch) >= 0xDC80 else f"\\u{ord(ch):04x}"
            raise OnnxpipeError(f"the line is not UTF-8 ({byte} at character {i + 1}); it was not sent")
