"""The OpenAI API's request fields, checked, and its response shapes (completions, chat completions, their stream
chunks, errors). Every bad field is an ``ApiError`` naming it, answered with a 4xx and OpenAI's error body:
``{"error": {"message", "type", "param", "code"}}``.

Extensions beside OpenAI's fields, as vLLM takes them: ``top_k``, ``repetition_penalty`` and ``ignore_eos`` (generate
``max_tokens`` whatever the model says; for load tests).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from onnxpipe.runtime.generate import GenerationResult

MAX_STOP = 4  # stop strings per request, as OpenAI allows
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions' default max_tokens (OpenAI's)
FINISH = {"eos": "stop", "stop_string": "stop", "repetition": "stop", "length": "length"}
# fields that would change what is generated or returned, which this server does not do: refused with a 400 naming
# the field unless at their no-op value (null, false, 0, "", [] or {}), never ignored. OpenAI's, then vLLM's
# extensions (a client written for vLLM sends them).
UNSUPPORTED = ("logprobs", "echo", "top_logprobs", "suffix", "tools", "logit_bias", "min_p", "min_tokens",
               "prompt_logprobs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "continue_final_message", "chat_template", "chat_template_kwargs", "documents",
               "include_stop_str_in_output", "stop_token_ids", "bad_words", "allowed_token_ids",
               "truncate_prompt_tokens", "use_beam_search")
# vLLM's fields whose default is true: refused when false
UNSUPPORTED_FALSE = ("add_generation_prompt", "skip_special_tokens")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers  # of the response beside the body (a 429's Retry-After)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    """A checked request: its prompt (text, token ids, or messages) and its options for ``LanguageModel.prepare``."""

    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None  # None: the default of the endpoint
    stream: bool = False
    include_usage: bool = False


def check_content_type(value: str | None) -> None:
    """A body is read as JSON when it says it is (``application/json`` or ``application/*+json``). Anything else,
    no Content-Type included, is a 415: a form, ``text/plain`` or a body without a type is what a web page may send
    to a local server without asking (no CORS preflight); a form is also what ``curl -d`` sends when ``-H
    'Content-Type: application/json'`` was left out."""
    kind = (value or "").split(";", 1)[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        got = repr(value[:80]) if value is not None else "none"
        raise ApiError(415, f"Content-Type must be application/json, got {got}")


def parse_json(raw: bytes) -> Any:
    """The body as JSON; whatever json refuses is a 400 (an integer of more than Python's 4300 digits and a nesting
    deeper than its recursion limit are refused by a ValueError and a RecursionError: they were 500s)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is not JSON this server reads (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ApiError(400, f"the request body is not JSON ({getattr(e, 'msg', None) or e})") from None


def parse_request(body: Any, model_name: str, chat: bool) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # null is "not given", as OpenAI's nullable fields take it
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string (GET /v1/models lists the one served)", "model")
    if model != model_name:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{model_name}`", "model",
                       code="model_not_found")
    out = ParsedRequest()
    if chat:
        out.messages = _messages(body.get("messages"))
    else:
        out.prompt = _prompt(body.get("prompt"))
    tokens_field = "max_completion_tokens" if chat and "max_tokens" not in body else "max_tokens"
    out.max_tokens = _int(body.get(tokens_field), tokens_field, 1, optional=True)
    temperature = _number(body.get("temperature", 1.0), "temperature", 0.0, 2.0)  # OpenAI's default: sampling
    out.options = {"temperature": temperature,
                   "top_p": _number(body.get("top_p", 1.0), "top_p", 0.0, 1.0, low_open=True),
                   "top_k": _int(body.get("top_k", 0), "top_k", 0),
                   "repetition_penalty": _number(body.get("repetition_penalty", 1.0), "repetition_penalty", 0.01, 100.0),
                   "seed": _int(body.get("seed"), "seed", 0, optional=True),
                   "stop_strings": _stop(body.get("stop"))}
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body.get(name, 0.0), name, -2.0, 2.0) != 0.0:
            raise ApiError(400, f"{name} is not supported here (use repetition_penalty)", name)
    if _int(body.get("n", 1), "n", 1) != 1:
        raise ApiError(400, "n must be 1 (one choice per request)", "n")
    for name in UNSUPPORTED:
        if not _no_op(body.get(name)):
            raise ApiError(400, f"{name} is not supported by this server", name)
    for name in UNSUPPORTED_FALSE:
        if body.get(name, True) is not True:
            raise ApiError(400, f"{name} other than true is not supported by this server", name)
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of is not supported by this server", "best_of")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise ApiError(400, "response_format is not supported by this server (only {\"type\": \"text\"})",
                       "response_format")
    if body.get("tool_choice") not in (None, "none", "auto"):  # no tools here: "required" or a named one cannot be met
        raise ApiError(400, "tool_choice: this server calls no tools (tools are not supported)", "tool_choice")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "ignore_eos must be true or false", "ignore_eos")
    if ignore_eos:  # run to max_tokens (load tests); stop strings still apply
        out.options["stop_token_ids"] = []
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    out.stream = stream
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed with stream true", "stream_options")
    if stream_options is not None:
        include_usage = stream_options.get("include_usage") if isinstance(stream_options, dict) else "not an object"
        if include_usage is not None and not isinstance(include_usage, bool):
            raise ApiError(400, "stream_options must be an object with include_usage true or false", "stream_options")
        out.include_usage = bool(include_usage)
    return out


def _no_op(value: Any) -> bool:
    return value is None or value is False or (type(value) in (int, float) and value == 0) or value in ("", [], {})


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ApiError(400, f"messages[{i}] must be an object with a role string", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        out.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    return out


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return stops


def _number(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {_type(value)}", name)
    if not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value}", name)
    if value < low or value > high or (low_open and value == low):
        raise ApiError(400, f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def _int(value: Any, name: str, low: int, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {_type(value)}", name)
    if value < low:
        raise ApiError(400, f"{name} must be at least {low}, got {value}", name)
    return value


def _type(value: Any) -> str:
    return {type(None): "null", str: "a string", bool: "a boolean", list: "a list", dict: "an object",
            float: "a number"}.get(type(value), type(value).__name__)


# ---- responses ----
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, chat: bool, result: GenerationResult) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH[result.finish_reason], "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(len(result.prompt_token_ids), len(result.token_ids))}


class TextChunks:
    """``json.dumps(chunk(rid, model, chat, text), ensure_ascii=False)`` of a stream's text pieces (non-empty, no
    finish reason), from a template made once per stream: a stream writes one such chunk per token, and building
    and encoding the whole chunk each time was most of what a token cost the event loop. Every chunk of the stream
    carries the template's ``created`` (as OpenAI's chunks of one stream do)."""

    _MARK = "\x00onnxpipe-text\x00"

    def __init__(self, rid: str, model: str, chat: bool):
        self.rid, self.model, self.chat = rid, model, chat
        whole = json.dumps(chunk(rid, model, chat, self._MARK), ensure_ascii=False)
        mark = json.dumps(self._MARK, ensure_ascii=False)
        # a model name holding the mark itself would cut the template wrongly: such a stream's chunks are made whole
        self._parts = whole.split(mark) if whole.count(mark) == 1 else None

    def __call__(self, text: str) -> str:
        if self._parts is None:
            return json.dumps(chunk(self.rid, self.model, self.chat, text), ensure_ascii=False)
        return self._parts[0] + json.dumps(text, ensure_ascii=False) + self._parts[1]


def chunk(rid: str, model: str, chat: bool, text: str | None, finish_reason: str | None = None,
          role: bool = False, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One stream chunk; ``text`` None with ``usage_``: the final usage chunk (no choices)."""
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": int(time.time()), "model": model}
    if usage_ is not None:
        out["choices"], out["usage"] = [], usage_
        return out
    finish = FINISH[finish_reason] if finish_reason else None
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text:
            delta["content"] = text
        elif role:
            delta["content"] = ""
        out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        out["choices"] = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    return out
