"""Which decoder-only models export, and the architecture facts the manifest records about them.

The export is the same for every model type (transformers' own modelling code traced by torch.export through
FlatKVDecoder), so support is not a list of hand-written graphs but a test of interfaces: a causal LM whose layers
all keep their keys and values in transformers' DynamicCache ([batch, kv_heads, seq, head_dim] per layer) and attend
fully or through a sliding window exports, and the parity check decides whether the export stands. Everything the
manifest records is read from the config and from the loaded model itself (its modules, and the shapes of the KV
cache of one small forward), not from a table per family.

``SUPPORTED`` lists the model types whose export, fusion and generation are tested here (tests/test_archs.py and
tests/test_export.py); docs/support.md is generated from it. An entry declares only what a model type must: a
family name where several types share one, and notes for the support table. A type not listed but built on the
same interfaces takes the same path (the manifest says ``"tested": false``); one that is not gets a one-line
refusal naming what is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from onnxpipe.errors import OnnxpipeError

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
RECURRENT_LAYER_TYPES = ("conv", "linear_attention", "hybrid", "hybrid_sliding", "mamba", "recurrent", "rwkv")
# config.json sizes that must be positive integers where they are numbers (a 0 or negative one was a
# ZeroDivisionError or "negative dimension" out of transformers; a missing or null one is transformers' to fill)
SIZE_KEYS = ("num_hidden_layers", "n_layer", "hidden_size", "n_embd", "num_attention_heads", "n_head",
             "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "vocab_size", "max_position_embeddings",
             "n_positions")


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    family: str = ""  # the manifest's family; the model type itself unless several types share one
    notes: str = ""  # what this type exercises, for the support table

    @property
    def family_name(self) -> str:
        return self.family or self.model_type


SUPPORTED: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("gpt2", notes="learned positions, fused c_attn"),
        ArchSpec("llama", notes="GQA, llama3 rope scaling"),
        ArchSpec("mistral", notes="sliding window"),
        ArchSpec("qwen2", notes="q/k/v bias"),
        ArchSpec("qwen3", notes="qk-norm"),
        ArchSpec("phi3", notes="fused qkv_proj"),
        ArchSpec("gemma", notes="sqrt(hidden) embedding scale, (1 + weight) RMSNorm, GeGLU"),
        ArchSpec("gemma2", notes="attention and final-logit soft-capping, alternating sliding-window layers"),
        ArchSpec("gemma3_text", notes="local/global layers with two rope bases, qk-norm"),
        ArchSpec("granite", notes="embedding, residual, attention and logit multipliers"),
        ArchSpec("olmo2", notes="post-norms, qk-norm over the whole projection"),
        ArchSpec("stablelm", notes="LayerNorm, partial rotary (25%)"),
        ArchSpec("phi", notes="parallel attention/MLP block, partial rotary, q/k/v bias"),
        ArchSpec("gpt_neox", notes="parallel residual, partial rotary, fused query_key_value"),
        ArchSpec("starcoder2", notes="sliding window, LayerNorm, biases"),
        ArchSpec("smollm3", notes="layers without rope"),
        ArchSpec("falcon", notes="parallel attention (new decoder architecture), fused query_key_value"),
        ArchSpec("mixtral", notes="mixture of experts (top-2), traced in transformers' batched_mm experts form"),
        ArchSpec("qwen3_moe", notes="mixture of experts, qk-norm, traced in the batched_mm experts form"),
        ArchSpec("gpt_oss", notes="attention sinks (eager attention), alternating sliding windows, experts with "
                                  "biases and clamped SwiGLU, batched_mm experts form"),
    )
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(SUPPORTED))


def check_config(cfg: dict[str, Any]) -> str:
    """Refuse, up front and from config.json alone, a model that cannot take the export path; returns its
    model_type. What the config cannot show (no KV cache in the standard form) is found by ``probe_cache``."""
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise OnnxpipeError(f"config.json has no model_type; {_supported_line()}")
    for scope, sizes in (("", cfg), ("text_config.", cfg.get("text_config"))):
        for key in SIZE_KEYS if isinstance(sizes, dict) else ():
            value = sizes.get(key)
            if isinstance(value, (int, float)) and (isinstance(value, bool) or not math.isfinite(value) or value < 1
                                                    or value != int(value)):
                raise OnnxpipeError(f"config.json: {scope}{key} must be a positive integer (got {value!r})")
    if model_type in SUPPORTED:
        try:  # a value of the wrong type (rms_norm_eps "nan") was an unexpected error of transformers' validation
            _build_config(cfg)
        except Exception as e:  # transformers raises many types for a config it cannot build
            raise OnnxpipeError(f"config.json: transformers cannot read it ({' '.join(str(e).split())[:300]})") from None
        return model_type
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if cfg.get("is_encoder_decoder"):
        _refuse(model_type, "an encoder-decoder model (export takes decoder-only causal LMs)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        _refuse(model_type, "not a causal LM in this transformers (no AutoModelForCausalLM class)")
    missing = _config_gap(model_type, cfg)
    if missing:
        _refuse(model_type, missing)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # BERT-likes whose causal head is an encoder run as decoder
        _refuse(model_type, "an encoder (masked-LM) model family (export takes decoder-only causal LMs)")
    return model_type


def _config_gap(model_type: str, cfg: dict[str, Any]) -> str | None:
    try:
        config = _build_config(cfg)
    except Exception as e:  # transformers raises many types for a config it cannot build
        return f"a config.json transformers cannot read ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model (export takes decoder-only causal LMs)"
    text = config.get_text_config(decoder=True)
    blocks = [str(b) for b in getattr(text, "block_types", None) or getattr(text, "layers_block_type", None) or []]
    recurrent = sorted({b for b in blocks if b not in ("attention", *ATTENTION_LAYER_TYPES)})
    if recurrent:
        return f"recurrent layers ({', '.join(recurrent)}): they keep a state, not a KV cache"
    types = layer_types(text)
    if types is None:
        return "no attention layers transformers' KV cache knows (no num_hidden_layers / layer types)"
    recurrent = sorted({t for t in types if t in RECURRENT_LAYER_TYPES})
    if recurrent:
        return f"recurrent layers ({', '.join(recurrent)}): they keep a state, not a KV cache"
    other = sorted({t for t in types if t not in ATTENTION_LAYER_TYPES})
    if other:
        return f"layer types {', '.join(other)} (supported: full and sliding-window attention)"
    if int(getattr(text, "num_kv_shared_layers", 0) or 0) > 0:
        return "layers that share another layer's KV cache"
    if getattr(text, "num_attention_heads", None) is None:
        return "no attention heads in the config (no KV cache)"
    return None


def attention_implementation(cfg: dict[str, Any]) -> str:
    """transformers' attention implementation to trace: "sdpa", or "eager" where the model's attention does more
    than sdpa computes (logit soft-capping: transformers' sdpa path drops it, silently) or the model has no sdpa
    path (gpt-oss: attention sinks)."""
    from transformers import AutoModelForCausalLM

    config = _build_config(cfg)
    text = config.get_text_config(decoder=True)  # a default (Gemma 2: 50) counts as much as a value
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        return "eager"
    return "eager" if getattr(text, "attn_logit_softcapping", None) else "sdpa"


def experts_implementation(cfg: dict[str, Any]) -> str | None:
    """For a mixture-of-experts model, transformers' "batched_mm" experts: every token multiplies by its own top-k
    experts' weights, gathered by index, a graph without data-dependent shapes (the default loop over experts
    selects tokens with nonzero(), which the ONNX export cannot take). None for a model without experts.
    The gather costs memory: tokens x top-k x one expert's weights per layer at once."""
    text = _build_config(cfg).get_text_config(decoder=True)
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    return "batched_mm" if experts else None


def _build_config(cfg: dict[str, Any]) -> Any:
    """The transformers config that config.json (already read) describes, defaults included."""
    from transformers import AutoConfig

    return AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})


def layer_types(config: Any) -> list[str] | None:
    """Each layer's attention kind as transformers' own cache sees it (``layer_types``, else inferred from
    ``sliding_window`` / ``attention_chunk_size``), or None when the config has no layer count."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    if getattr(config, "num_hidden_layers", None) is None and getattr(config, "layer_types", None) is None:
        return None
    try:
        types, _ = get_layer_types_and_kwargs(config)
    except Exception:  # a config without the fields the inference reads
        return None
    return [str(t) for t in types]


def probe_cache(model: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) read from the KV cache of one small forward through the same DynamicCache the export
    uses; a model that keeps no such cache is refused here, before tracing."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    model_type = model.config.model_type
    n = int(model.config.get_text_config(decoder=True).num_hidden_layers)
    ids = torch.ones((1, 2), dtype=torch.long)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(),
                        use_cache=True)
    except TypeError as e:
        _refuse(model_type, f"no KV cache in transformers' DynamicCache form ({str(e).splitlines()[0][:160]})")
    cache = getattr(out, "past_key_values", None)
    if not isinstance(cache, DynamicCache):
        _refuse(model_type, "no KV cache in transformers' DynamicCache form (its forward returned "
                            f"{type(cache).__name__})")
    layers = list(cache.layers)
    if len(layers) != n or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        _refuse(model_type, f"a cache of {len(layers)} layers of {', '.join(kinds) or 'nothing'} for {n} decoder "
                            "layers (recurrent or shared layers; expected one key/value cache per layer)")
    shapes = {tuple(layer.keys.shape) for layer in layers} | {tuple(layer.values.shape) for layer in layers}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[2] != ids.shape[1]:
        _refuse(model_type, f"KV tensors of shapes {sorted(shapes)} (expected one [batch, kv_heads, seq, head_dim] "
                            "for every layer)")
    _, kv_heads, _, head_dim = next(iter(shapes))
    return int(kv_heads), int(head_dim)


def describe(config: Any, model: Any = None) -> dict[str, Any]:
    """The architecture facts the manifest records, from the config and (when given) the loaded model."""
    model_type = getattr(config, "model_type", None)
    spec = SUPPORTED.get(model_type)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    if model is not None:
        kv_heads, head_dim = probe_cache(model)
    else:
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    modules = _module_facts(model, int(text.num_hidden_layers)) if model is not None else {}
    types = layer_types(text) or []
    info: dict[str, Any] = {
        "family": spec.family_name if spec else model_type,
        "model_type": model_type,
        "tested": spec is not None,
        "architecture": (getattr(config, "architectures", None) or [None])[0],
        "num_layers": int(text.num_hidden_layers),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(text.vocab_size),
        "max_position_embeddings": int(getattr(text, "max_position_embeddings", 0) or 0),
        "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
        "attention": "gqa" if kv_heads != heads else "mha",
        **modules,
        "layer_types": types,
    }
    eps = next((getattr(text, a) for a in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
                if getattr(text, a, None) is not None), None)
    if eps is not None:
        info["norm_eps"] = float(eps)
    if info.get("positions", "rope" if getattr(text, "rope_parameters", None) else None) == "rope":
        info["rope"] = _rope_info(text, head_dim)
    info["sliding_window"] = int(text.sliding_window) if "sliding_attention" in types else None
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    if experts:
        info["experts"] = {"num": int(experts), "top_k": int(getattr(text, "num_experts_per_tok", 0) or 0)}
    softcap = {k: float(v) for k in ("attn_logit_softcapping", "final_logit_softcapping")
               if (v := getattr(text, k, None))}
    if softcap:
        info["softcapping"] = softcap
    return info


def _module_facts(model: Any, num_layers: int) -> dict[str, Any]:
    """Norm kind and count, qk-norm, MLP form, positions, fused/biased projections: read from the modules of the
    first decoder layer (the ModuleList of ``num_layers`` blocks) and from the model's top-level modules."""
    import torch

    layer = _first_layer(model, num_layers)
    named = dict(layer.named_modules()) if layer is not None else {}
    norms = {name: m for name, m in named.items() if name and _is_norm(m)}
    qk = [n for n in norms if n.rsplit(".", 1)[-1] in ("q_norm", "k_norm", "q_layernorm", "k_layernorm")]
    kinds = {"rmsnorm" if "rms" in type(m).__name__.lower() else "layernorm" for m in norms.values()}
    text = model.config.get_text_config(decoder=True)
    act = next((str(getattr(text, a)) for a in ("hidden_activation", "hidden_act", "activation_function")
                if getattr(text, a, None)), "gelu")
    params = [name for name, _ in layer.named_parameters()] if layer is not None else []
    leaves = {name.rsplit(".", 1)[-1] for name in [*named, *params]}  # fused experts hold parameters, not modules
    gated = bool(leaves & {"gate_proj", "gate_up_proj", "w1", "w3"})
    if gated:
        mlp = {"silu": "swiglu", "swish": "swiglu"}.get(act, "geglu" if act.startswith("gelu") else f"gated {act}")
    else:
        mlp = "gelu" if act.startswith("gelu") else act
    rotary = any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules())
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    learned = len(embeddings) > 1 and not rotary
    fused = bool(leaves & {"qkv_proj", "c_attn", "query_key_value", "Wqkv"})
    biased = [m for name, m in named.items() if name.rsplit(".", 1)[-1] in
              ("q_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv")]
    return {
        "norm": kinds.pop() if len(kinds) == 1 else "+".join(sorted(kinds)) or "none",
        "norms_per_layer": len(norms) - len(qk),
        "positions": "rope" if rotary else ("learned" if learned else "none"),
        "mlp": mlp,
        "qkv_bias": any(getattr(m, "bias", None) is not None for m in biased),
        "qk_norm": bool(qk),
        "fused_qkv": fused,
        "attention_sinks": "sinks" in leaves,
    }


def _first_layer(model: Any, num_layers: int) -> Any:
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
    return lists[0][0] if lists else None


def _is_norm(module: Any) -> bool:
    import torch

    name = type(module).__name__.lower()
    return isinstance(module, torch.nn.LayerNorm) or name.endswith("rmsnorm") or name.endswith("layernorm")


def _rope_info(config: Any, head_dim: int) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    per_type = {k: dict(v) for k, v in params.items() if k in ATTENTION_LAYER_TYPES and isinstance(v, dict)}
    main = per_type.get("full_attention") or next(iter(per_type.values()), None) or params
    theta = main.get("rope_theta", getattr(config, "rope_theta", None))
    partial = float(main.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
    info = {
        "theta": float(theta) if theta is not None else None,
        "type": main.get("rope_type", main.get("type", "default")),
        "rotary_dim": int(head_dim * partial),
        "parameters": _scalars(main),
    }
    if per_type:  # local and global layers with their own bases (Gemma 3)
        info["per_layer_type"] = {k: _scalars(v) for k, v in per_type.items()}
    no_rope = getattr(config, "no_rope_layers", None)
    if no_rope:  # SmolLM3: 1 = this layer applies rope, 0 = it does not
        info["layers"] = [i for i, use in enumerate(no_rope) if use]
    return info


def _scalars(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _supported_line() -> str:
    return f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"


def _refuse(model_type: str, missing: str) -> None:
    raise OnnxpipeError(f"unsupported model_type {model_type!r}: {missing}; {_supported_line()}")
