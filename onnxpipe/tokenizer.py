"""The one tokenizer: a model directory's tokenizer through the `tokenizers` library, its special tokens, and its
chat template, with no transformers installed.

    tok = Tokenizer.from_dir("out/smollm2")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    tok.decode(ids)

Chat templates follow Hugging Face's conventions, so the ids equal transformers' ``apply_chat_template``: the
template is ``chat_template.jinja`` (else ``tokenizer_config.json``'s ``chat_template``, a string or a list of named
templates whose ``default`` is taken), rendered with ``messages``, ``add_generation_prompt``, the special tokens
(``bos_token``, ``eos_token``, ...) and any extra keywords, in Jinja's immutable sandbox (the template comes from
an untrusted model directory: no attribute of a Python object outside the sandbox's rules is reachable), with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and HF's
``tojson`` (no HTML escaping, non-ASCII kept). The rendered text is encoded without the tokenizer's own special
tokens (the template writes them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from onnxpipe.confine import check_inside
from onnxpipe.errors import OnnxpipeError, first_line

# end-of-turn tokens of the common chat formats: where one is a special token of the vocabulary and the template
# writes it, a chat stops on it (ChatML, Llama 3, Phi-3, Gemma)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
TEMPLATE_MAX_BYTES = 1 << 20
Message = Mapping[str, Any]


@dataclass
class Tokenizer:
    """Encode/decode, the special tokens of tokenizer_config.json, and the chat template (None where there is none)."""

    backend: Any  # tokenizers.Tokenizer
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as strings
    chat_template: str | None = None
    path: Path | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> "Tokenizer | None":
        """The directory's tokenizer (tokenizer.json, or GPT-2's vocab.json + merges.txt), or None without one."""
        import tokenizers

        path = Path(path)
        if _file(path, "tokenizer.json"):
            try:
                backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # the tokenizers library raises its own exception types
                raise OnnxpipeError(f"{path / 'tokenizer.json'}: not a tokenizer the `tokenizers` library reads "
                                    f"({first_line(e)})") from None
        elif _file(path, "vocab.json") and _file(path, "merges.txt"):
            from tokenizers import decoders, models, pre_tokenizers

            backend = tokenizers.Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        else:
            return None
        config = _read_json(path, "tokenizer_config.json")
        specials = _special_tokens(config)
        for name, value in _special_tokens(_read_json(path, "special_tokens_map.json")).items():
            specials.setdefault(name, value)
        return cls(backend, specials, _chat_template(path, config), path)

    # ---- text ----
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_unicode(text)
        if len(text) > LONG_TEXT_CHARS:  # the same ids, with the GIL released while the library works
            batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return list(batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ---- chat ----
    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The conversation as the model's template writes it (HF's ``apply_chat_template(..., tokenize=False)``)."""
        import jinja2

        if self.chat_template is None:
            raise OnnxpipeError(f"{self.path}: the model directory has no chat template (chat_template.jinja or "
                                "tokenizer_config.json's chat_template); use plain prompts")
        check_messages(messages)
        template = _compile(self.chat_template, str(self.path))
        values = {**self.special_tokens, **kwargs}
        try:
            return template.render(messages=[dict(m) for m in messages], tools=values.pop("tools", None),
                                   documents=values.pop("documents", None),
                                   add_generation_prompt=add_generation_prompt, **values)
        except jinja2.TemplateError as e:  # raise_exception(...) from the template, or a template bug
            raise OnnxpipeError(f"the chat template refused the conversation: {first_line(e)}") from None
        except Exception as e:  # a template error at render time (a missing key, a type error in an expression)
            raise OnnxpipeError(f"the chat template failed on the conversation: {type(e).__name__}: "
                                f"{first_line(e)}") from None

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            **kwargs: Any) -> list[int]:
        """The conversation's token ids, as transformers' ``apply_chat_template(messages, tokenize=True)``."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def end_of_turn_ids(self, eos_ids: Sequence[int] = ()) -> list[int]:
        """The ids a chat reply stops on: the model's end-of-sequence ids, the tokenizer's eos_token, and the
        known end-of-turn tokens (``END_OF_TURN``) that are tokens of this vocabulary and that the template writes."""
        out = [int(i) for i in eos_ids]
        names = [self.special_tokens.get("eos_token")]
        names += [t for t in END_OF_TURN if self.chat_template and t in self.chat_template]
        for name in names:
            i = self.token_id(name) if name else None
            if i is not None and i not in out:
                out.append(i)
        return out


# past this many characters a text is encoded through the tokenizers library's batch call, which releases the GIL
# while it works: its encode holds it throughout (3 s for a 4 MB request body, during which a server's other streams,
# its event loop and its scheduler's thread all stood still); the batch call costs a short text more than it saves
LONG_TEXT_CHARS = 1 << 16


def check_unicode(text: str, what: str = "text") -> None:
    """Refuse a text no tokenizer can take: one holding a lone surrogate, which is what bytes that are not UTF-8
    become on a command line or a terminal (``--prompt $'\\xff'``, a chat line) and what JSON's ``"\\udc80"``
    decodes to. The tokenizers library raised ``TypeError: TextInputSequence must be str``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise OnnxpipeError(f"{what} is not valid Unicode: a lone surrogate (\\u{ord(text[e.start]):04x}) at character "
                            f"{e.start} (bytes that are not UTF-8?)") from None


def check_messages(messages: Any) -> None:
    """A conversation is a non-empty list of {"role": str, "content": str | list, ...}; anything else is refused
    naming the message and the field."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise OnnxpipeError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise OnnxpipeError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m.get("role"):
            raise OnnxpipeError(f"messages[{i}].role must be a non-empty string")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise OnnxpipeError(f"messages[{i}].content must be a string, got {type(content).__name__}")


_TEMPLATES: dict[str, Any] = {}  # compiled templates by source: a server renders one per request


def _compile(source: str, where: str) -> Any:
    if source in _TEMPLATES:
        return _TEMPLATES[source]
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # HF's: no HTML escaping (Jinja's own tojson escapes <, >, &, '), non-ASCII kept
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _generation_tag()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise OnnxpipeError(f"{where}: the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    if len(_TEMPLATES) > 16:
        _TEMPLATES.clear()
    _TEMPLATES[source] = template
    return template


def _generation_tag() -> Any:
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        """HF's ``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): rendered as its
        body, as transformers does when it is not asked for the mask."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    return GenerationTag


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name in SPECIAL_NAMES:
        value = config.get(name)
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    if _file(path, "chat_template.jinja"):
        return _read_text(path, "chat_template.jinja")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise OnnxpipeError(f"{path / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                            "{name, template} objects")
    return template


def _file(path: Path, name: str) -> bool:
    f = path / name
    if not os.path.lexists(f):
        return False
    check_inside(f, path, "a tokenizer file")  # a link out of the model directory is refused, naming it
    return f.is_file()


def _read_text(path: Path, name: str) -> str:
    f = path / name
    if f.stat().st_size > TEMPLATE_MAX_BYTES:
        raise OnnxpipeError(f"{f}: larger than {TEMPLATE_MAX_BYTES >> 20} MiB; not a tokenizer file")
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OnnxpipeError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path: Path, name: str) -> dict[str, Any]:
    if not _file(path, name):
        return {}
    try:
        data = json.loads(_read_text(path, name))
    except json.JSONDecodeError as e:
        raise OnnxpipeError(f"{path / name}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise OnnxpipeError(f"{path / name}: expected a JSON object")
    return data
