"""A torch module with flat KV-cache inputs and outputs around a transformers causal LM.

ONNX has no notion of a Cache object: the graph takes `past_key_values.N.key/value` tensors [batch, kv_heads,
past, head_dim] and returns `present.N.key/value` [batch, kv_heads, past + seq, head_dim]. One graph serves prefill
(past length 0) and decode.

Every layer's cache is a plain full-length layer, also for sliding-window models: the window is applied by the
attention mask, so each present tensor has the same length and the runtime keeps one uniform KV layout.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_KEY = "past_key_values.{i}.key"
PAST_VALUE = "past_key_values.{i}.value"
PRESENT_KEY = "present.{i}.key"
PRESENT_VALUE = "present.{i}.value"

# names of the dynamic axes, as Optimum names them (its ORTModelForCausalLM reads the same I/O)
BATCH = "batch_size"
SEQ = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"


def input_names(num_layers: int) -> list[str]:
    names = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    for i in range(num_layers):
        names += [PAST_KEY.format(i=i), PAST_VALUE.format(i=i)]
    return names


def output_names(num_layers: int) -> list[str]:
    names = [LOGITS]
    for i in range(num_layers):
        names += [PRESENT_KEY.format(i=i), PRESENT_VALUE.format(i=i)]
    return names


class FlatKVDecoder(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):  # noqa: ANN001 - traced, not called by users
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = out.past_key_values
        result = [out.logits]
        for i in range(self.num_layers):
            layer = present.layers[i]
            result += [layer.keys, layer.values]
        return tuple(result)


def dynamic_shapes(num_layers: int) -> tuple:
    """torch.export dynamic shapes matching FlatKVDecoder's arguments."""
    from torch.export import Dim

    batch, seq, past, total = Dim(BATCH), Dim(SEQ), Dim(PAST), Dim(TOTAL)
    kv = {0: batch, 2: past}
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple(dict(kv) for _ in range(2 * num_layers)))


def example_inputs(
    num_layers: int, kv_heads: int, head_dim: int, vocab: int, dtype: torch.dtype, batch: int = 2, seq: int = 4, past: int = 3
) -> tuple:
    """Inputs for tracing: sizes other than 0 and 1 so that torch.export keeps every axis dynamic."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, kv_heads, past, head_dim, generator=g).to(dtype) for _ in range(2 * num_layers)]
    return (input_ids, attention_mask, position_ids, *kv)
