"""Dynamic int8 with per-token activation scales everywhere (``--activations token``), one weight at a time.

The default (``--activations auto``) measures the float model on calibration text and searches for layers to leave
float: it runs float sessions on the whole model (an fp32 session holds the fp32 weights, twice the fp16 bytes),
so it stays on dynamic.py's in-memory path. ``--activations token`` needs no statistics: each linear layer's weight
is read lazily (onnx_ir, external data memory-mapped), made int8 per output channel by dynamic.rewrite_per_token
(the same rewrite as the in-memory path), and its int8 weight and scale are written straight to a file beside the
output (rtn_stream.Spill), so neither the float weights nor the int8 ones (half the fp16 bytes for an fp32
input) are ever all held; the output is then saved from that file and the input's mapping, a tensor at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import onnx_ir as ir

from onnxpipe.quant.config import DynamicInt8Config
from onnxpipe.quant.dynamic import TOKEN_DESCRIPTION, _counts, rewrite_per_token
from onnxpipe.quant.graph import WeightPlan
from onnxpipe.quant.rtn_stream import Spill


def streams(cfg: DynamicInt8Config) -> bool:
    """Whether ``cfg`` is quantized here: per-token scales everywhere, no SmoothQuant."""
    return cfg.activations == "token" and cfg.smoothquant is None


def quantize_dynamic_streamed(model: ir.Model, plan: WeightPlan, lm_head: str, spill: Spill,
                              progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """dynamic.quantize_dynamic_int8(activations="token") on a lazily read model, in place, its new weights in
    ``spill``. ``plan``: the layers left to this mode (the head removed where embedding.py makes it 8-bit)."""
    nodes = [n for n in plan.linears if lm_head != "fp32" or n != plan.lm_head]
    head = "fp32" if plan.lm_head and plan.lm_head not in nodes else "int8 per channel"
    count = 0

    def done(weight: ir.Value) -> None:
        nonlocal count
        count += 1
        if progress:
            progress("dynamic int8: quantizing weights", count, len(nodes))
        if isinstance(weight.const_value, ir.ExternalTensor):
            weight.const_value.release()
        if not weight.uses() and not weight.is_graph_output() and weight.name is not None:
            model.graph.initializers.pop(weight.name)

    rewritten = rewrite_per_token(model, nodes, spill, done)
    return {"weights": "int8 per output channel", "per_channel": True, "lm_head": head,
            "activations": TOKEN_DESCRIPTION, "batch_independent": True, **_counts(rewritten, len(nodes)),
            "streamed": f"one weight at a time, {spill.bytes / 1e6:.0f} MB of int8 weights and scales written as made"}


def spill_path(out_path: Path) -> Path:
    return out_path.parent / (out_path.name + ".spill")


__all__ = ["quantize_dynamic_streamed", "spill_path", "streams"]
