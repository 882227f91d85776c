"""The OpenAI request fields as the server reads them (``serve/protocol.py``), without a model: what changes the
answer and is not done here is refused with a 400 naming the field, never ignored; no-op values pass."""

from __future__ import annotations

import pytest

from onnxpipe.serve.protocol import ApiError, check_content_type, parse_request

MODEL = "m"
BASE = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def refused(extra: dict, chat: bool = True) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_request({**BASE, **extra} if chat else {"model": MODEL, "prompt": "a", **extra}, MODEL, chat)
    assert e.value.status == 400 and e.value.message
    return e.value


@pytest.mark.fast
@pytest.mark.parametrize("extra", [
    {"logit_bias": {"50256": -100}},
    {"min_p": 0.1},
    {"min_tokens": 5},
    {"guided_json": {"type": "object"}},
    {"guided_choice": ["yes", "no"]},
    {"prompt_logprobs": 1},
    {"response_format": {"type": "json_object"}},
    {"tool_choice": "required"},
    {"tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"logprobs": True},
    {"top_logprobs": 2},
    {"continue_final_message": True},
    {"add_generation_prompt": False},
    {"chat_template": "{{ messages }}"},
    {"chat_template_kwargs": {"enable_thinking": False}},
    {"include_stop_str_in_output": True},
    {"stop_token_ids": [7]},
    {"skip_special_tokens": False},
    {"use_beam_search": True},
])
def test_fields_that_would_change_the_answer_are_refused_naming_them(extra):
    (name,) = extra
    assert refused(extra).param == name


@pytest.mark.fast
def test_their_no_op_values_and_unknown_fields_pass():
    for extra in ({"logit_bias": {}}, {"logit_bias": None}, {"min_p": 0.0}, {"min_tokens": 0}, {"tools": []},
                  {"tool_choice": "none"}, {"tool_choice": "auto"}, {"response_format": {"type": "text"}},
                  {"logprobs": False}, {"top_logprobs": 0}, {"user": "u1", "metadata": {"a": "b"}, "store": False},
                  {"parallel_tool_calls": False, "some_future_field": [1, 2]},
                  {"add_generation_prompt": True, "skip_special_tokens": True, "continue_final_message": False,
                   "chat_template_kwargs": {}, "stop_token_ids": []}):
        parsed = parse_request({**BASE, **extra}, MODEL, True)
        assert parsed.messages == BASE["messages"], extra
    assert parse_request({"model": MODEL, "prompt": "a", "best_of": 1, "echo": False, "suffix": ""}, MODEL,
                         False).prompt == "a"
    assert refused({"best_of": 2}, chat=False).param == "best_of"
    assert refused({"echo": True}, chat=False).param == "echo"


@pytest.mark.fast
def test_stream_options_need_a_stream():
    assert refused({"stream_options": {"include_usage": True}}).param == "stream_options"
    assert refused({"stream_options": {"include_usage": True}, "stream": False}).param == "stream_options"
    parsed = parse_request({**BASE, "stream": True, "stream_options": {"include_usage": True}}, MODEL, True)
    assert parsed.stream and parsed.include_usage


@pytest.mark.fast
def test_a_body_that_is_not_said_to_be_json_is_a_415():
    for value in ("application/json", "application/json; charset=utf-8", "Application/JSON",
                  "application/vnd.api+json"):
        check_content_type(value)
    for value in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "",
                  "application/jsonp", None):  # None: no header, as fetch() sends a Blob without a type
        with pytest.raises(ApiError) as e:
            check_content_type(value)
        assert e.value.status == 415 and "application/json" in e.value.message


@pytest.mark.fast
def test_a_body_json_cannot_read_is_a_400_not_a_500():
    from onnxpipe.serve.protocol import parse_json

    assert parse_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for raw, says in ((b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                      (b'{"seed": ' + b"9" * 5000 + b"}", "digits"),
                      (b"{not json", "not JSON"), (b"\xff\xfe", "not JSON"), (b"", "not JSON")):
        with pytest.raises(ApiError) as e:
            parse_json(raw)
        assert e.value.status == 400 and says in e.value.message, (raw[:20], e.value.message)


@pytest.mark.fast
def test_null_is_a_field_not_given():
    """OpenAI's optional fields are nullable, and clients send null for "the default": each was a 400 ("must be a
    number, got null") where the field was read with a default."""
    nulls = {name: None for name in ("temperature", "top_p", "top_k", "repetition_penalty", "n", "seed", "stop",
                                     "frequency_penalty", "presence_penalty", "stream", "ignore_eos", "max_tokens",
                                     "logit_bias", "tools", "tool_choice", "response_format", "user")}
    parsed = parse_request({**BASE, **nulls}, MODEL, True)
    assert parsed.options == parse_request(BASE, MODEL, True).options
    assert (parsed.max_tokens, parsed.stream, parsed.include_usage) == (None, False, False)
    streamed = parse_request({**BASE, "stream": True, "stream_options": {"include_usage": None}}, MODEL, True)
    assert streamed.stream and not streamed.include_usage
    assert refused({"temperature": "hot"}).param == "temperature"  # a wrong type still is a 400


@pytest.mark.fast
def test_a_bad_max_completion_tokens_is_named_as_sent():
    assert parse_request({**BASE, "max_completion_tokens": 7}, MODEL, True).max_tokens == 7
    assert parse_request({**BASE, "max_tokens": 5, "max_completion_tokens": 7}, MODEL, True).max_tokens == 5
    assert refused({"max_completion_tokens": 0}).param == "max_completion_tokens"
    assert refused({"max_tokens": 0}).param == "max_tokens"
