"""The committed reference models load offline, keep their recorded perplexity, and have the promised shapes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from scripts_module import load_script  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
DATA_DIR = REPO_ROOT / "data"
REFERENCE_MODELS = {"gpt2-stdlib": "GPT2LMHeadModel", "llama-stdlib": "LlamaForCausalLM"}
MODELS_BUDGET_BYTES = 12 * 2**20


perplexity = load_script("perplexity")
reference_data = load_script("make_reference_data")


@pytest.fixture(scope="module", params=sorted(REFERENCE_MODELS))
def reference(request):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = MODELS_DIR / request.param
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return request.param, model_dir, model.eval(), tokenizer


@pytest.fixture(scope="module")
def eval_text() -> str:
    return reference_data.read_split_text("eval")


def test_eval_json_perplexity_reproduces(reference, eval_text):
    name, model_dir, model, tokenizer = reference
    recorded = json.loads((model_dir / "eval.json").read_text())
    ids = perplexity.encode(tokenizer, eval_text)[:recorded["slice_tokens"]]
    assert len(ids) == recorded["slice_tokens"]
    with torch.no_grad():
        result = perplexity.model_perplexity(model, ids, perplexity.model_context(model))
    assert result.n_scored == recorded["scored_tokens"]
    assert result.perplexity == pytest.approx(recorded["perplexity"], rel=0.01)
    # a trained model, not a random one: far below the unigram baseline and below the vocabulary size
    assert result.perplexity < recorded["unigram_perplexity"] / 4
    assert result.perplexity < 0.01 * len(tokenizer)


def test_config_shapes(reference):
    name, model_dir, model, tokenizer = reference
    raw_config = json.loads((model_dir / "config.json").read_text())
    assert raw_config["architectures"] == [REFERENCE_MODELS[name]]
    assert type(model).__name__ == REFERENCE_MODELS[name]
    assert "tie_word_embeddings" in raw_config  # explicit, so exporters need not guess
    assert model.config.tie_word_embeddings == raw_config["tie_word_embeddings"]
    if raw_config["tie_word_embeddings"]:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.vocab_size == len(tokenizer)
    assert perplexity.model_context(model) == tokenizer.model_max_length == 256
    assert model.config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_llama_uses_gqa_and_rope():
    raw_config = json.loads((MODELS_DIR / "llama-stdlib" / "config.json").read_text())
    assert raw_config["model_type"] == "llama"
    heads, kv_heads = raw_config["num_attention_heads"], raw_config["num_key_value_heads"]
    assert kv_heads < heads and heads % kv_heads == 0
    assert raw_config["rope_parameters"]["rope_type"] == "default"
    assert raw_config["rope_parameters"]["rope_theta"] > 0
    # the checkpoint really holds grouped K/V projections
    from safetensors import safe_open
    with safe_open(MODELS_DIR / "llama-stdlib" / "model.safetensors", "pt") as f:
        k_shape = f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()
        q_shape = f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape()
    head_dim = raw_config["hidden_size"] // heads
    assert k_shape == [kv_heads * head_dim, raw_config["hidden_size"]]
    assert q_shape == [heads * head_dim, raw_config["hidden_size"]]


def test_tokenizer_round_trips_code(reference):
    _, _, _, tokenizer = reference
    code = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
    ids = perplexity.encode(tokenizer, code + "<|endoftext|>")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == code
    assert len(ids) < len(code) / 2  # BPE merged something


def test_models_fit_the_size_budget():
    total = sum(p.stat().st_size for p in MODELS_DIR.rglob("*") if p.is_file())
    assert total <= MODELS_BUDGET_BYTES, f"models/ holds {total / 2**20:.2f} MiB"


def test_committed_splits_match_manifest_and_are_disjoint():
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    files = {name: {f["path"] for f in manifest["splits"][name]["files"]} for name in reference_data.SPLITS}
    assert not files["train"] & files["eval"]
    assert not files["train"] & files["calibration"]
    assert not files["eval"] & files["calibration"]
    for name in ("eval", "calibration"):
        text = reference_data.read_split_text(name)  # raises on a sha256 mismatch
        assert text.count("<|endoftext|>") == len(files[name])
        assert len(text.encode()) <= 300_000


@pytest.mark.parametrize("context,stride", [(8, 3), (5, 1), (5, 4)])
def test_strided_windows_score_every_token_but_the_first_once(context, stride):
    for n_tokens in (2, 5, 17, 40):
        windows = perplexity.cut_windows(n_tokens, context, stride)
        assert perplexity.target_positions(windows) == list(range(1, n_tokens))
        assert all(w.end - w.begin <= context for w in windows)


@pytest.mark.parametrize("context", [5, 8])
def test_non_overlapping_windows_score_all_but_each_window_start(context):
    for n_tokens in (2, 5, 17, 40, 41):
        windows = perplexity.cut_windows(n_tokens, context)
        starts = set(range(0, n_tokens, context))
        assert perplexity.target_positions(windows) == [t for t in range(n_tokens) if t not in starts]
        assert [w.begin for w in windows] == [b for b in sorted(starts) if b + 1 < n_tokens]


def test_unigram_perplexity_matches_hand_computation():
    train_ids, vocab_size = [0, 0, 1], 3  # add-one: p = (3, 2, 1) / 6
    result = perplexity.unigram_perplexity(train_ids, [2, 0, 1], vocab_size, context=4)
    expected = math.exp(-(math.log(3 / 6) + math.log(2 / 6)) / 2)  # targets are positions 1 and 2
    assert result.n_scored == 2
    assert result.perplexity == pytest.approx(expected, rel=1e-12)


def test_model_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return type("Output", (), {"logits": torch.zeros(*input_ids.shape, 7)})()

    result = perplexity.model_perplexity(Uniform(), list(range(7)) * 5, context=6, stride=4)
    assert result.n_scored == 34
    assert result.perplexity == pytest.approx(7.0, rel=1e-6)  # float32 log_softmax
