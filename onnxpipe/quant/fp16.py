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

from onnxpipe.quant.graph import consumers, needs_external_data, producers, save_quantized, topological_sort

NORM_STAT_OPS = ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Div")
ANGLE_OPS = ("Cos", "Sin")
ALWAYS_FP32 = ("Softmax",)


def fp32_islands(proto: Any) -> dict[str, list[str]]:
    """Node names to keep in fp32, by reason."""
    graph = proto.graph
    cons, prod = consumers(graph), producers(graph)
    norm: list[str] = []
    for node in graph.node:
        if node.op_type != "Pow":
            continue
        norm.append(node.name)
        frontier, depth = [node], 0
        while frontier and depth < 5:  # Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal (or Div)
            nxt = [c for n in frontier for c in cons.get(n.output[0], []) if c.op_type in NORM_STAT_OPS]
            norm.extend(c.name for c in nxt if c.name not in norm)
            frontier, depth = nxt, depth + 1
    angles: list[str] = []
    stack = [n for n in graph.node if n.op_type in ANGLE_OPS]
    seen: set[str] = set()
    while stack:  # every ancestor of Cos/Sin: the position -> angle computation
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        angles.append(node.name)
        stack.extend(prod[i] for i in node.input if i in prod)
    other = [n.name for n in graph.node if n.op_type in ALWAYS_FP32]
    return {"norm_statistics": norm, "rotary_angles": angles, "softmax": other}


def convert_fp16(proto: Any, out_path: Path, cfg: Any, logits_name: str) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    _name_unnamed_nodes(proto)
    islands = fp32_islands(proto)
    blocked = sorted({n for names in islands.values() for n in names})
    model = convert_float_to_float16(
        proto, keep_io_types=False, op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=blocked,
        disable_shape_infer=needs_external_data(proto),
    )
    topological_sort(model.graph)
    save_quantized(model, out_path)
    return {"weights": "fp16", "activations": "fp16", "kv_cache": "fp16", "logits": "fp16",
            "fp32_nodes": {k: len(v) for k, v in islands.items()}, "lm_head": "fp16", "embeddings": "fp16"}


def _name_unnamed_nodes(proto: Any) -> None:
    """node_block_list works by name; give every unnamed node one."""
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
