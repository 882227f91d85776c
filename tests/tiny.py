"""Tiny random-weight models of every supported family, built from transformers configs (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# family -> (model_type, config kwargs): 2 layers, small widths, GQA where the family has it
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
    "llama": ("llama", dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64},
                            bos_token_id=1, eos_token_id=2)),
    "mistral": ("mistral", dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                sliding_window=5, bos_token_id=1, eos_token_id=2)),
    "qwen2": ("qwen2", dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=1, eos_token_id=2)),
    "qwen3": ("qwen3", dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                            bos_token_id=1, eos_token_id=2)),
    "phi3": ("phi3", dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def tiny_config(family: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    model_type, kwargs = TINY_CONFIGS[family]
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})


def make_tiny_model(family: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random-weight model of ``family`` as a Hugging Face directory at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    model.save_pretrained(out)
    return out


def save_byte_tokenizer(out: Path) -> None:
    """A byte-level BPE with no merges, saved as ``out/tokenizer.json``: exactly 256 tokens, the tiny models'
    vocabulary (for tests that need text; written with the ``tokenizers`` package alone)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
