"""Dynamic int8: weights int8 per output channel, activations quantized at run time (no calibration).

ORT's quantize_dynamic does the work on the MatMuls the plan names: every linear layer of the body. The LM head
and the token lookup were already made 8-bit per vocabulary row by embedding.py (one shared table when tied),
unless --lm-head/--embeddings fp32 kept them float.
Weights use the full signed range (no reduce_range): the CPUs we target have VNNI, where 8-bit products do not
saturate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onnxpipe.quant.graph import WeightPlan


def quantize_dynamic_int8(proto: Any, out_path: Path, plan: WeightPlan, lm_head: str = "auto",
                          per_channel: bool = True) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = [n for n in plan.linears if lm_head != "fp32" or n != plan.lm_head]
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
