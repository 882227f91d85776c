"""Tiny random-weight configs of the model types added beyond tests/tiny.py's six: 2 layers, small widths, and the
feature each type is listed for switched on (sliding windows of 4 so that short prompts decode past them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
WINDOW = 4

ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "gemma": dict(_BASE, head_dim=16),
    # weights and caps that make the caps bend this tiny model's scores and logits (with the default init scale
    # and Gemma 2's own caps, 50 and 30, they would change nothing a test could see)
    "gemma2": dict(_BASE, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=1.0,
                   final_logit_softcapping=5.0, query_pre_attn_scalar=16, initializer_range=0.1),
    "gemma3_text": dict(_BASE, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"],
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "granite": dict(_BASE, embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                    attention_multiplier=0.0078125),
    "olmo2": dict(_BASE),
    "stablelm": dict(_BASE, partial_rotary_factor=0.25),
    "phi": dict(_BASE, num_key_value_heads=4, partial_rotary_factor=0.5),
    "gpt_neox": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, bos_token_id=1, eos_token_id=2, rotary_pct=0.25),
    "starcoder2": dict(_BASE, sliding_window=WINDOW),
    "smollm3": dict(_BASE, no_rope_layer_interval=2),
    "falcon": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                   new_decoder_architecture=True, bos_token_id=1, eos_token_id=2),
    "mixtral": dict(_BASE, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_BASE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "gpt_oss": dict(_BASE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False, "original_max_position_embeddings": 32, "rope_theta": 1.5e5}),
}


def make_arch_model(model_type: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random-weight model of ``model_type`` (from ARCH_CONFIGS) as a Hugging Face directory at ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**ARCH_CONFIGS[model_type], **overrides})
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out
