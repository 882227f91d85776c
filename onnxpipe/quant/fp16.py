"""fp16 mixed precision for the GPU path: weights, activations, KV cache and logits in fp16, with fp32 islands.

ORT's converter (onnxruntime.transformers.float16) does the conversion and inserts the Casts at each island's
edge; we choose the islands, the parts of the graph where fp16 is known to go wrong:
- norm statistics written out as ops (RMSNorm: Pow -> ReduceMean -> Add eps -> Sqrt -> Reciprocal/Div):
  x**2 overflows fp16 above 256 and the mean of squares loses the small-variance rows; the fused norm ops
  (LayerNormalization, SimplifiedLayerNormalization, ...) accumulate in fp32 already and are converted.
- rotary angles: everything that computes Cos/Sin from the positions. position * inv_freq in fp16 has a spacing
  of 2 above 2048, so long contexts would rotate by the wrong angle.
- Softmax of an unfused attention (fused attention ops handle their own accumulation).
The graph's float I/O becomes fp16 (KV cache and logits), as ``onnxpipe export --dtype fp16`` writes it, so the
manifest says fp16 and the runtime allocates a half-size cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxpipe.quant.graph import ir_model, needs_external_data, save_quantized, write_back

NORM_STAT_OPS = ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Div")
ANGLE_OPS = ("Cos", "Sin")
ALWAYS_FP32 = ("Softmax",)


def fp32_islands(graph: ir.Graph) -> dict[str, list[str]]:
    """Node names to keep in fp32, by reason."""
    norm: list[str] = []
    for node in graph:
        if node.op_type != "Pow":
            continue
        norm.append(str(node.name))
        frontier, depth = [node], 0
        while frontier and depth < 5:  # Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal (or Div)
            nxt = [use.node for n in frontier for use in n.outputs[0].uses() if use.node.op_type in NORM_STAT_OPS]
            nxt = list(dict.fromkeys(nxt))  # a node reading one value twice is one consumer
            norm.extend(str(c.name) for c in nxt if c.name not in norm)
            frontier, depth = nxt, depth + 1
    angles: list[str] = []
    stack = [n for n in graph if n.op_type in ANGLE_OPS]
    seen: set[str] = set()
    while stack:  # every ancestor of Cos/Sin: the position -> angle computation
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(str(node.name))
        angles.append(str(node.name))
        stack.extend(p for p in (v.producer() if v is not None else None for v in node.inputs) if p is not None)
    other = [str(n.name) for n in graph if n.op_type in ALWAYS_FP32]
    return {"norm_statistics": norm, "rotary_angles": angles, "softmax": other}


def convert_fp16(proto: Any, out_path: Path, cfg: Any, logits_name: str) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = ir_model(proto)
    if _name_unnamed_nodes(model.graph):
        write_back(model, proto)
    islands = fp32_islands(model.graph)
    blocked = sorted({n for names in islands.values() for n in names})
    converted = convert_float_to_float16(
        proto, keep_io_types=False, op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=blocked,
        disable_shape_infer=needs_external_data(proto),
    )
    half = ir_model(converted)
    half.graph.sort()  # the converter appends the Casts it inserts for blocked nodes that read graph inputs at the end
    write_back(half, converted)
    save_quantized(converted, out_path)
    return {"weights": "fp16", "activations": "fp16", "kv_cache": "fp16", "logits": "fp16",
            "fp32_nodes": {k: len(v) for k, v in islands.items()}, "lm_head": "fp16", "embeddings": "fp16"}


def _name_unnamed_nodes(graph: ir.Graph) -> int:
    """node_block_list works by name; give every unnamed node one. Returns how many were named."""
    named = 0
    for i, node in enumerate(graph):
        if not node.name:
            node.name, named = f"{node.op_type}_{i}", named + 1
    return named
