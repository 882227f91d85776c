"""Dynamic int8: weights int8 per output channel, activations quantized at run time (no calibration).

The MatMuls the plan names are quantized: every linear layer of the body. The LM head
and the token lookup were already made 8-bit per vocabulary row by embedding.py (one shared table when tied),
unless --lm-head/--embeddings fp32 kept them float.
Weights use the full signed range (no reduce_range): the CPUs we target have VNNI, where 8-bit products do not
saturate.

Activation scales are per token by default (``activations="token"``): ORT's DynamicQuantizeMatMul takes one scale
for the whole activation tensor, and a trained model's "massive activations" then ruin a prefill. SmolLM2-135M's
layer-11 down_proj input reaches |x| ~ 3000 on the first token of a window where the median token's maximum is
~1.3: with one scale for the window, every other token rounds to a handful of levels (perplexity +47% from the
body alone, see docs/quantization.md). So each linear layer becomes

    s = ReduceMax(|x|, last axis) / 127;  q = uint8(Round(x / s) + 128)
    y = float(MatMulInteger(q, W_int8, a_zero_point=128)) * s * w_scale

one symmetric scale per token and per output channel. The activations travel as uint8 with zero point 128 because
MatMulInteger with int8 activations took ORT's slow path (decode 6x slower on SmolLM2); uint8 x int8 is MLAS's
fast one. ``activations="tensor"`` keeps ORT's quantize_dynamic (one DynamicQuantizeMatMul per layer, a per-tensor
scale): ~15% faster decode on SmolLM2, and unusable there (docs/quantization.md, "SmolLM2-135M").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.quant.graph import WeightPlan, initializer_map


def quantize_dynamic_int8(proto: Any, out_path: Path, plan: WeightPlan, lm_head: str = "auto",
                          per_channel: bool = True, activations: str = "token") -> dict[str, Any]:
    nodes = [n for n in plan.linears if lm_head != "fp32" or n != plan.lm_head]
    if activations == "token":
        import onnx

        count = quantize_per_token(proto, nodes)
        onnx.save_model(proto, str(out_path), save_as_external_data=proto.ByteSize() > 1_800_000_000,
                        location=out_path.name + ".data")
        return {"weights": "int8 per output channel",
                "activations": "dynamic per token, symmetric int8 levels (uint8, zero point 128)",
                "per_channel": True, "quantized_nodes": count,
                "lm_head": "fp32" if plan.lm_head and plan.lm_head not in nodes else "int8 per channel"}
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_ort():
        quantize_dynamic(
            proto,
            str(out_path),
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            use_external_data_format=proto.ByteSize() > 1_800_000_000,
            extra_options={"MatMulConstBOnly": True},
        )
    return {"weights": "int8", "activations": "uint8, dynamic per tensor", "per_channel": per_channel,
            "quantized_nodes": len(nodes),
            "lm_head": "fp32" if plan.lm_head and plan.lm_head not in nodes else "int8 per channel"}


def quantize_per_token(proto: Any, nodes: list[str]) -> int:
    """Rewrite the named MatMul(x, constant W) nodes into per-token dynamic int8 (see the module note); in place.
    Returns the number of nodes rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = initializer_map(graph)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    wanted = set(nodes)
    shared = "/quant/per_token"
    consts = {f"{shared}/qmax": np.array(127.0, np.float32), f"{shared}/tiny": np.array(1e-30, np.float32),
              f"{shared}/axes": np.array([-1], np.int64), f"{shared}/zero_point": np.array(128, np.uint8),
              f"{shared}/zero_point_f": np.array(128.0, np.float32)}
    new_nodes, count = [], 0
    for node in graph.node:
        if node.name not in wanted or node.op_type != "MatMul" or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # [K, N]
        w_scale = np.abs(w).max(0) / 127.0
        w_scale = np.where(w_scale > 0, w_scale, 1.0).astype(np.float32)
        p = node.name
        wq, ws = f"{p}/W_int8", f"{p}/W_scale"
        graph.initializer.extend([
            numpy_helper.from_array(np.clip(np.round(w / w_scale), -127, 127).astype(np.int8), wq),
            numpy_helper.from_array(w_scale, ws),
        ])
        x = node.input[0]
        reduce = (helper.make_node("ReduceMax", [f"{p}/absx", f"{shared}/axes"], [f"{p}/amax"], name=f"{p}/ReduceMax",
                                   keepdims=1) if opset >= 18 else
                  helper.make_node("ReduceMax", [f"{p}/absx"], [f"{p}/amax"], name=f"{p}/ReduceMax", axes=[-1],
                                   keepdims=1))
        new_nodes += [
            helper.make_node("Abs", [x], [f"{p}/absx"], name=f"{p}/Abs"),
            reduce,
            helper.make_node("Max", [f"{p}/amax", f"{shared}/tiny"], [f"{p}/amax_pos"], name=f"{p}/Max"),
            helper.make_node("Div", [f"{p}/amax_pos", f"{shared}/qmax"], [f"{p}/x_scale"], name=f"{p}/ScaleDiv"),
            helper.make_node("Div", [x, f"{p}/x_scale"], [f"{p}/xs"], name=f"{p}/Div"),
            helper.make_node("Round", [f"{p}/xs"], [f"{p}/xr"], name=f"{p}/Round"),
            helper.make_node("Add", [f"{p}/xr", f"{shared}/zero_point_f"], [f"{p}/xo"], name=f"{p}/Offset"),
            helper.make_node("Cast", [f"{p}/xo"], [f"{p}/xq"], name=f"{p}/CastUint8", to=onnx.TensorProto.UINT8),
            helper.make_node("MatMulInteger", [f"{p}/xq", wq, f"{shared}/zero_point"], [f"{p}/acc"],
                             name=f"{p}/MatMulInteger"),
            helper.make_node("Cast", [f"{p}/acc"], [f"{p}/accf"], name=f"{p}/CastFloat", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}/accf", f"{p}/x_scale"], [f"{p}/y_token"], name=f"{p}/MulTokenScale"),
            helper.make_node("Mul", [f"{p}/y_token", ws], list(node.output), name=f"{p}/MulWeightScale"),
        ]
        count += 1
    if count:
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        graph.ClearField("node")
        graph.node.extend(new_nodes)
        used = {i for n in graph.node for i in n.input}
        for t in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(t)
    return count


class _quiet_ort:
    """ORT's quantization tools log a pre-processing hint on every call and a line per node at INFO; our log says
    what was done instead."""

    def __enter__(self) -> None:
        import logging

        names = ["", "onnxruntime"] + [n for n in logging.root.manager.loggerDict if n.startswith("onnxruntime")]
        self._saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
        for lg, _ in self._saved:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in self._saved:
            lg.setLevel(level)
