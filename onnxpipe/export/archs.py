"""One small spec per supported decoder-only family.

The export itself is the same for every family (transformers' own modelling code traced by torch.export); a spec
says which `model_type`s belong to the family and what is special about it, so the manifest can tell later stages
(fusion, runtime) what to expect without re-reading the Hugging Face config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnxpipe.errors import OnnxpipeError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    norm: str  # "layernorm" | "rmsnorm"
    positions: str  # "learned" | "rope"
    mlp: str  # "gelu" | "swiglu"
    qkv_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False
    sliding_window_attr: str | None = None  # config attribute that may hold a sliding window


ARCHS: dict[str, ArchSpec] = {
    spec.family: spec
    for spec in (
        ArchSpec("gpt2", ("gpt2",), norm="layernorm", positions="learned", mlp="gelu", qkv_bias=True, fused_qkv=True),
        ArchSpec("llama", ("llama",), norm="rmsnorm", positions="rope", mlp="swiglu"),
        ArchSpec("mistral", ("mistral",), norm="rmsnorm", positions="rope", mlp="swiglu", sliding_window_attr="sliding_window"),
        ArchSpec("qwen2", ("qwen2",), norm="rmsnorm", positions="rope", mlp="swiglu", qkv_bias=True, sliding_window_attr="sliding_window"),
        ArchSpec("qwen3", ("qwen3",), norm="rmsnorm", positions="rope", mlp="swiglu", qk_norm=True, sliding_window_attr="sliding_window"),
        ArchSpec("phi3", ("phi3",), norm="rmsnorm", positions="rope", mlp="swiglu", fused_qkv=True, sliding_window_attr="sliding_window"),
    )
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(t for spec in ARCHS.values() for t in spec.model_types))


def spec_for(model_type: str | None) -> ArchSpec:
    for spec in ARCHS.values():
        if model_type in spec.model_types:
            return spec
    raise OnnxpipeError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def describe(config: Any) -> dict[str, Any]:
    """The architecture facts the manifest records, read from a transformers config."""
    spec = spec_for(getattr(config, "model_type", None))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    info: dict[str, Any] = {
        "family": spec.family,
        "model_type": config.model_type,
        "architecture": (getattr(config, "architectures", None) or [None])[0],
        "num_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "num_attention_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(config.vocab_size),
        "max_position_embeddings": int(config.max_position_embeddings),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "norm": spec.norm,
        "positions": spec.positions,
        "mlp": spec.mlp,
        "attention": "gqa" if kv_heads != heads else "mha",
        "qkv_bias": bool(getattr(config, "attention_bias", spec.qkv_bias)) if spec.family == "llama" else spec.qkv_bias,
        "qk_norm": spec.qk_norm,
        "fused_qkv": spec.fused_qkv,
    }
    eps = getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_epsilon", None)
    if eps is not None:
        info["norm_eps"] = float(eps)
    if spec.positions == "rope":
        info["rope"] = _rope_info(config, head_dim)
    window = _sliding_window(config, spec)
    info["sliding_window"] = window
    return info


def _rope_info(config: Any, head_dim: int) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    partial = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
    return {
        "theta": float(theta) if theta is not None else None,
        "type": params.get("rope_type", params.get("type", "default")),
        "rotary_dim": int(head_dim * partial),
        "parameters": {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool)) or v is None},
    }


def _sliding_window(config: Any, spec: ArchSpec) -> int | None:
    if spec.sliding_window_attr is None:
        return None
    window = getattr(config, spec.sliding_window_attr, None)
    if spec.family in ("qwen2", "qwen3"):
        layer_types = getattr(config, "layer_types", None) or []
        if "sliding_attention" not in layer_types:
            return None
    return int(window) if window else None
