"""genai_config.json: what ONNX Runtime GenAI (``onnxruntime-genai``) needs to load a model directory.

Every stage (export, optimize, quantize) writes it beside its manifest, from the manifest alone: the graph's
input/output names, the KV layout and head counts, the context length and the special token ids. GenAI reads the
tokenizer from the tokenizer files the stages already carry over (tokenizer.json + tokenizer_config.json).

Padding convention (onnxruntime-genai 0.18): for a batch, GenAI derives the attention mask from ``pad_token_id``
scanning each row from its END, so only trailing pad tokens are masked. Right-pad a batch of prompts with
``pad_token_id`` (as written here) and GenAI gives onnxpipe's greedy tokens row for row; left-padded rows are read as
all real tokens (mask of ones) and their continuations differ. A prompt that itself ends in the pad id would have
that token masked, so ``pad_token_id`` is the tokenizer's pad token, else the first EOS id (GenAI's own default).
Our graphs take any 0/1 attention mask, so the difference is GenAI's convention, not the graph's. One limit
follows from it: a sliding window (Mistral) counts cache columns in the export's mask, so a right-padded row leaves
its window as many tokens early as it has pads (the CUDA form places each row's tokens at its own length and is
exact); docs/interop.md.

The ``optimize --target cuda`` form (``kv.shares_buffer``: one preallocated KV buffer, ``padding_side: right``)
loads with ``past_present_share_buffer: true``, which is how GenAI runs its own GroupQueryAttention graphs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from onnxpipe.artifact import Manifest
from onnxpipe.errors import OnnxpipeError

GENAI_CONFIG = "genai_config.json"
# model types GenAI 0.18 runs as decoder-only LLMs with keys and values apart (src/models/model_type.h); others load
# as its generic "decoder". Not "gpt2": GenAI's gpt2 model reads one combined past per layer (past_%d).
GENAI_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def genai_config(manifest: Manifest) -> dict[str, Any]:
    """The genai_config.json document for a directory with this manifest."""
    model, graph, tok = manifest.model, manifest.graph, manifest.tokenizer
    kv = graph["kv"]
    if kv.get("layout", "BNSH") != "BNSH":
        raise OnnxpipeError(f"genai_config.json: KV layout {kv.get('layout')!r}; GenAI reads BNSH "
                            "([batch, kv_heads, sequence, head_dim]) only")
    inputs = set(manifest.input_names)
    names: dict[str, str] = {"input_ids": "input_ids"}
    for role in ("attention_mask", "position_ids"):
        if role in inputs:
            names[role] = role
    names["past_key_names"] = _per_layer(kv["past_key"])
    names["past_value_names"] = _per_layer(kv["past_value"])
    eos = [int(t) for t in tok.get("eos_token_id") or []]
    pad = tok.get("pad_token_id")
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)
    context = int(model.get("max_position_embeddings") or 0)
    if context <= 0:
        raise OnnxpipeError("genai_config.json: the manifest records no model.max_position_embeddings")
    model_type = str(model.get("model_type", ""))
    return {
        "model": {
            "type": model_type if model_type in GENAI_TYPES else "decoder",
            "bos_token_id": int(tok["bos_token_id"]) if tok.get("bos_token_id") is not None else pad,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            "context_length": context,
            "vocab_size": int(model["vocab_size"]),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph.get("file", "model.onnx"),
                "head_size": int(kv["head_dim"]),
                "hidden_size": int(model["hidden_size"]),
                "num_attention_heads": int(model["num_attention_heads"]),
                "num_key_value_heads": int(kv["num_kv_heads"]),
                "num_hidden_layers": int(kv["num_layers"]),
                "inputs": names,
                "outputs": {
                    "logits": graph.get("logits", "logits"),
                    "present_key_names": _per_layer(kv["present_key"]),
                    "present_value_names": _per_layer(kv["present_value"]),
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": context,
            "min_length": 0,
            "past_present_share_buffer": bool(kv.get("shares_buffer", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``directory/genai_config.json`` for ``manifest`` (atomically); returns its path."""
    path = Path(directory) / GENAI_CONFIG
    tmp = path.with_name(GENAI_CONFIG + ".tmp")
    tmp.write_text(json.dumps(genai_config(manifest), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _per_layer(pattern: str) -> str:
    """The manifest's ``past_key_values.{i}.key`` as GenAI's printf form ``past_key_values.%d.key``."""
    if pattern.count("{i}") != 1 or "%" in pattern:
        raise OnnxpipeError(f"genai_config.json: KV name pattern {pattern!r} has no single {{i}} placeholder")
    return pattern.replace("{i}", "%d")
