"""int4 weight-only: MatMulNBits with blocks of ``block_size`` weights per scale (and zero point) along K, or
one scale and zero point per output channel (``block_size`` 0).

Per channel is not a MatMulNBits: its block must be a power of two >= 16, and a hidden size such as SmolLM2's 576
is not one. It is written as DequantizeLinear (uint4 weights, per-axis scale and zero point, ONNX opset 21) feeding
the MatMul: 4 bits a weight on disk, and ORT's CPU EP fuses the pair into a MatMulNBits when the session is made
(its accuracy level then comes from the session option ``session.qdq_matmulnbits_accuracy_level``, 4 by default,
not from ``--accuracy-level``). The grid is asymmetric with the range including 0, as gptq.py's; RTN and GPTQ only.

Algorithms: ``rtn`` round-to-nearest per block (ORT's default blockwise quantizer; asymmetric with a zero point
per block, or with ``symmetric`` a grid centred on 0 and no zero points, which ORT's CUDA MatMulNBits kernel reads
faster (H100, 1B Llama shape, batch-1 decode step: 623 us in MatMulNBits with zero points; 570 us in ORT
GenAI's model of the same shape, which has none); ``gptq``
(data-aware, our own numpy implementation in gptq.py because ORT's bundled one does not compensate errors:
each row's rounding error is spread over the rows not yet quantized through the inverse Hessian of the layer's
inputs, gathered from the calibration text's prefills); ``hqq`` (half-quadratic optimisation of scale and zero point, data-free).
Every MatMulNBits gets ``accuracy_level`` (default 4: activations quantized to int8 inside the kernel, which is
what makes int4 fast on CPU; 0 would dequantize to fp32 and be slow).

The LM head and the embeddings, deliberately: the LM head is the most sensitive matrix (its error lands directly
in the logits and the argmax), so by default it is not put in 4 bits: embedding.py gives it (and the token
lookup, sharing one table when they are tied) 8 bits per vocabulary row, the choice llama.cpp makes for its
output tensor. ``--lm-head int4`` puts it in the same 4-bit pass as the body; ``--lm-head fp32`` leaves it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from onnxpipe.artifact import Manifest
from onnxpipe.quant.calibration import counted, feed_count
from onnxpipe.quant.config import PER_CHANNEL, Int4Config
from onnxpipe.quant.graph import WeightPlan, save_quantized


@dataclass(frozen=True)
class Int4Choice:
    """One int4 recipe: the options the default chooses among."""

    algo: str
    block_size: int
    float_zero_points: bool

    def label(self) -> str:
        block = "per channel" if self.block_size == PER_CHANNEL else f"block {self.block_size}"
        zero = "float zero points" if self.float_zero_points else "integer zero points"
        return f"{self.algo.upper()}, {block}, {zero}"

    def options(self) -> list[str]:
        """The command-line options that pin this choice."""
        return [f"--algo {self.algo}", f"--block-size {self.block_size}",
                f"--zero-points {'float' if self.float_zero_points else 'int'}"]


# The default tries these in order and keeps the first within the budget: the cheapest to make first (RTN, seconds,
# before GPTQ, which runs calibration text through the model), and within each the smallest and fastest to run
# (block 128, then block 32, then float zero points: +12% size and +17% decode time on SmolLM2-135M).
CANDIDATES = (
    Int4Choice("rtn", 128, False),
    Int4Choice("rtn", 32, False),
    Int4Choice("rtn", 32, True),
    Int4Choice("gptq", 128, False),
    Int4Choice("gptq", 32, False),
    Int4Choice("gptq", 32, True),
)


def int4_candidates(algo: str | None, block_size: int | None, float_zero_points: bool | None, *,
                    symmetric: bool, calibration: bool, fp32_weights: bool) -> list[Int4Choice]:
    """The CANDIDATES that the user's options leave open (None: not set), in order. GPTQ only with calibration
    text, float zero points only on fp32 weights (unless set, when the mode's own checks speak). Options outside
    the list (hqq, --symmetric, other block sizes) pin one choice, the unset ones at their plain values (RTN,
    block 32, integer zero points)."""
    single = [Int4Choice(algo or "rtn", 32 if block_size is None else block_size, bool(float_zero_points))]
    if symmetric or algo == "hqq" or block_size not in (None, 32, 128):
        return single
    left = [c for c in CANDIDATES if algo in (None, c.algo) and block_size in (None, c.block_size)
            and float_zero_points in (None, c.float_zero_points)]
    if algo is None and not calibration:
        left = [c for c in left if c.algo != "gptq"]
    if float_zero_points is None and not fp32_weights:
        left = [c for c in left if not c.float_zero_points]
    return left or single

def quantize_int4(
    proto: Any,
    out_path: Path,
    plan: WeightPlan,
    manifest: Manifest,
    samples: np.ndarray | None,
    cfg: Int4Config,
    log: Callable[[str], None],
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    from onnxpipe.quant.dynamic import _quiet_ort

    head = plan.lm_head  # still a MatMul only when --lm-head is fp32 or int4 (else embedding.py took it)
    body = [n for n in plan.linears if n != head or cfg.lm_head == "int4"]
    all_matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    details: dict[str, Any] = {"weights": "int4", "algo": cfg.algo, "block_size": cfg.block_size,
                               "accuracy_level": cfg.accuracy_level,
                               "lm_head": ("int4" if head in body else "fp32") if head else None}
    if cfg.block_size == PER_CHANNEL:
        details["block_size"] = "per channel"
        details["accuracy_level"] = "ORT session option session.qdq_matmulnbits_accuracy_level (default 4)"
        details["format"] = ("QDQ: DequantizeLinear (uint4, axis 1) -> MatMul, opset 21; ORT fuses it into "
                             "MatMulNBits at load (accuracy level from the session, default 4)")
        _use_opset_21(proto)
    if cfg.float_zero_points:
        _refuse_fp16_weights(proto, body)
        details["zero_points"] = ("float per block (the block's exact min-max grid): integer zero points in "
                                  "MatMulNBits plus a [blocks, N] correction matmul of the input's block sums")
    with _quiet_ort():
        if cfg.algo == "gptq":
            details["gptq"] = _gptq(proto, body, manifest, samples, cfg, progress)
            details["calibration_feeds"] = feed_count(samples, cfg.calib, decode=False)
        elif cfg.block_size == PER_CHANNEL:
            _rtn_per_channel(proto, body)
        elif cfg.float_zero_points:
            details["float_zero_point_layers"] = _rtn_blocks(proto, body, cfg.block_size, cfg.accuracy_level)
        else:
            proto = _nbits(proto, bits=4, block_size=cfg.block_size, include=body, all_matmuls=all_matmuls,
                           accuracy_level=cfg.accuracy_level, algo=cfg.algo, symmetric=cfg.symmetric)
            details["zero_points"] = "none (symmetric grid)" if cfg.symmetric else "per block"
    details["matmulnbits"] = _set_accuracy_level(proto, cfg.accuracy_level)
    details["quantized_nodes"] = len(body)
    save_quantized(proto, out_path)
    return details


def _refuse_fp16_weights(proto: Any, body: list[str]) -> None:
    import onnx

    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.quant.graph import initializer_map

    inits, wanted = initializer_map(proto.graph), set(body)
    for node in proto.graph.node:
        if node.name in wanted and node.op_type == "MatMul" and node.input[1] in inits:
            if inits[node.input[1]].data_type != onnx.TensorProto.FLOAT:
                raise OnnxpipeError("--zero-points float needs fp32 weights (its correction matmul is fp32); "
                                    "quantize the fp32 export")


def _rtn_blocks(proto: Any, body: list[str], block_size: int, accuracy_level: int) -> int:
    """Round-to-nearest per block with float zero points (gptq.py's exact grid) as MatMulNBits + correction; in
    place. Layers whose K is not a multiple of the block keep integer zero points. Returns how many got floats."""
    from onnxpipe.quant.gptq import exact_grid, matmulnbits_ir, rtn_blocks

    sums: dict = {}  # in graph order: a shared input's block sums come with its first layer
    exact = 0

    def write(graph: ir.Graph, node: ir.Node, weight: np.ndarray) -> list[ir.Node]:
        nonlocal exact
        grid = exact_grid(weight.shape, block_size, True)
        exact += grid
        return matmulnbits_ir(graph, node, weight.shape, rtn_blocks(weight, block_size, grid), block_size,
                              accuracy_level, sums)

    _replace_matmuls(proto, body, write, "com.microsoft", 1)
    return exact


def _rtn_per_channel(proto: Any, body: list[str]) -> None:
    """Round-to-nearest per output channel as DequantizeLinear -> MatMul (gptq.py's grid and writer); in place."""
    from onnxpipe.quant.gptq import dequantize_linear_ir, rtn_per_channel

    _replace_matmuls(proto, body, lambda g, node, w: dequantize_linear_ir(g, node, w.shape, rtn_per_channel(w)))


def _replace_matmuls(proto: Any, body: list[str], write: Callable[[ir.Graph, ir.Node, np.ndarray], list[ir.Node]],
                     domain: str | None = None, version: int = 1) -> None:
    """Each MatMul of ``body`` with a constant weight becomes ``write(graph, node, weight [K, N] float64)``'s nodes
    (their initializers registered in ``graph``), in the graph's order; initializers left unused are dropped, and
    the opset ``domain`` the new nodes use is declared. In place."""
    from onnxpipe.quant.graph import drop_unused_initializers, ir_model, replace_node, write_back

    model = ir_model(proto)
    graph = model.graph
    wanted = set(body)
    for node in list(graph):
        w = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if node.name not in wanted or w is None or not w.is_initializer() or w.const_value is None:
            continue
        replace_node(graph, node, write(graph, node, w.const_value.numpy().astype(np.float64)))
        if domain is not None:
            model.opset_imports.setdefault(domain, version)
    drop_unused_initializers(graph)
    write_back(model, proto)


def _use_opset_21(proto: Any) -> None:
    """uint4 DequantizeLinear with an axis is opset 21. The ops our graphs use only gained types between 18 and
    21 (GroupNormalization, which changed meaning in 21, is refused rather than reinterpreted)."""
    from onnxpipe.errors import OnnxpipeError

    if any(n.op_type == "GroupNormalization" and n.domain in ("", "ai.onnx") for n in proto.graph.node):
        raise OnnxpipeError("per-channel int4 needs ONNX opset 21, which changed GroupNormalization; "
                            "use a --block-size instead")
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < 21:
            o.version = 21


def _nbits(proto: Any, bits: int, block_size: int, include: list[str], all_matmuls: list[str],
           accuracy_level: int, algo: str = "rtn", symmetric: bool = False) -> Any:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if algo == "hqq":
        require_torch_for_hqq()
        algo_config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, quant_format=QuantFormat.QOperator)
    else:
        algo_config = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level or None,
            quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=bits,
        )
    wanted = set(include)
    quantizer = MatMulNBitsQuantizer(
        proto, bits=bits, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level or None,
        nodes_to_exclude=[n for n in all_matmuls if n not in wanted], algo_config=algo_config,
    )
    quantizer.process()
    return quantizer.model.model


def require_torch_for_hqq() -> None:
    """onnxruntime's HQQ quantizer imports torch (the rest of quantize needs none): without it, one line, not
    onnxruntime's ImportError."""
    import importlib.util

    from onnxpipe.errors import OnnxpipeError

    if importlib.util.find_spec("torch") is None:
        raise OnnxpipeError("--algo hqq runs onnxruntime's HQQ quantizer, which needs torch (not installed): "
                            "install the [export] extra, or use --algo rtn or gptq")


def _gptq(proto: Any, body: list[str], manifest: Manifest, samples: np.ndarray, cfg: Int4Config,
          progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    """GPTQ on ``body`` (gptq.py), with Hessians from prefills of real calibration text; in place."""
    from onnxpipe.quant.gptq import gptq_quantize_graph
    from onnxpipe.quant.quality import prefill_feed

    prefill = cfg.calib.prefill_len
    feeds = counted((prefill_feed(manifest, samples[b:b + cfg.calib.batch_size, :prefill])
                     for b in range(0, len(samples), cfg.calib.batch_size)),
                    feed_count(samples, cfg.calib, decode=False), "gptq hessians", progress)
    return gptq_quantize_graph(proto, body, feeds, cfg.block_size, cfg.accuracy_level, cfg.float_zero_points,
                               progress=(lambda d, t: progress("gptq layers", d, t)) if progress else None)


def _set_accuracy_level(proto: Any, level: int) -> int:
    """Every MatMulNBits gets the same accuracy_level (HQQ's path does not set it at all); in place."""
    from onnxpipe.quant.graph import ir_model, write_back

    model = ir_model(proto)
    count = 0
    for node in model.graph:
        if node.op_type != "MatMulNBits":
            continue
        count += 1
        node.attributes.pop("accuracy_level", None)
        if level:
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
    if count:
        write_back(model, proto)
    return count
