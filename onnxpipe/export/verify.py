"""Parity of an exported graph against the PyTorch model it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from onnxpipe.artifact import Manifest
from onnxpipe.parity import TOLERANCE, ParityReport, Past, StepFn, check_decoders, ort_step_fn
from onnxpipe.runtime.sessions import open_session


def torch_step_fn(model: torch.nn.Module) -> StepFn:
    """The Hugging Face model itself (not the export wrapper) as a step function: the independent reference."""
    dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def step(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Past):
        cache = DynamicCache()
        for i, (k, v) in enumerate(past):
            cache.update(torch.from_numpy(k).to(dtype), torch.from_numpy(v).to(dtype), i)
        out = model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            position_ids=torch.from_numpy(position_ids),
            past_key_values=cache,
            use_cache=True,
        )
        present = [(layer.keys.numpy(), layer.values.numpy()) for layer in out.past_key_values.layers]
        return out.logits.float().numpy(), present

    return step


def verify_export(
    model: torch.nn.Module, onnx_path: Path, manifest: Manifest, dtype: str, decode_steps: int = 4, seed: int = 0
) -> ParityReport:
    """torch vs ONNX Runtime (CPU EP) on a left-padded batch of 2: prefill then ``decode_steps`` steps."""
    session = open_session(onnx_path, purpose="the export check")
    kv_dtype = np.float16 if dtype == "fp16" else np.float32
    report = check_decoders(
        torch_step_fn(model),
        ort_step_fn(session, manifest),
        manifest,
        kv_dtype=kv_dtype,
        decode_steps=decode_steps,
        seed=seed,
    )
    return report.judge(TOLERANCE[dtype])
