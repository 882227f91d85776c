"""``onnxpipe chat DIR``: a conversation on the terminal. Each line read is a user message; the reply streams as it
is generated and joins the conversation, so the next line is answered with the whole exchange as context (the model's
own chat template). ``/reset`` starts over; end of input ends it. When the conversation no longer fits the model's
context with room for a reply, its oldest turns are dropped (the system message stays), and that is said."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.generate import LanguageModel

RESET = "/reset"


def conversation(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation: the system message (if any), then ``prompt`` as the user's."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": prompt}]


def run_console(lm: LanguageModel, lines: Iterable[str], write: Callable[[str], None], note: Callable[[str], None],
                system: str | None = None, **options: Any) -> list[dict[str, str]]:
    """Answer each line of ``lines`` in turn; returns the conversation as it stands at the end."""
    head = [{"role": "system", "content": system}] if system is not None else []
    turns: list[dict[str, str]] = []
    limit = lm.session.max_positions - int(options.get("max_new_tokens", 64))
    for line in lines:
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() == RESET:
            turns = []
            note("(conversation reset)")
            continue
        turns.append({"role": "user", "content": text})
        reply: list[str] = []
        try:  # a line the tokenizer refuses (bytes that are not UTF-8) fails in chat_prompt, before any turn is dropped
            while len(lm.chat_prompt(head + turns)) > limit and len(turns) > 1:
                del turns[: 2 if len(turns) > 2 else 1]  # the oldest user message and its reply
                note("(the oldest turn was dropped: the conversation no longer fit the model's context)")
            for piece in lm.chat_stream(head + turns, **options):
                write(piece.text)
                reply.append(piece.text)
        except OnnxpipeError as e:  # one message the model cannot take: say why, keep the conversation going
            note(f"error: {e}")
            turns.pop()
            continue
        write("\n")
        turns.append({"role": "assistant", "content": "".join(reply)})
    return head + turns
