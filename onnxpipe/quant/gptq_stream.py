"""GPTQ with a bounded calibration state: the Hessians of a few layers' inputs at a time, each weight read lazily,
quantized and released in turn.

gptq.gptq_quantize_graph gathers every linear input's Hessian in one pass over the calibration prefills, on the
whole model in memory: at the 8B shape that is ~65 GB of float64 Hessians (32 layers x (3 x 4096^2 + 14336^2) x 8
bytes), beside a serialized copy of the model and its float session. Here the model is read with onnx_ir (weights
in an external data file stay unread until used), the float model with every linear input as an extra output is
written once beside the output (temporary: W of disk) and opened on the eval provider (CUDA where this
onnxruntime has it, else the CPU with graph optimizations off, as gptq.py's), and the inputs are taken in graph
order in chunks whose Hessians fit HESSIAN_BYTES: one pass over the calibration prefills per chunk, then each
layer of the chunk quantized by gptq.gptq_weight and written by gptq.matmulnbits_ir (the same arithmetic, in the
same order, as gptq_quantize_graph: the same model, bit for bit, on the CPU). One 8B layer's Hessians are 2.05 GB.
On CUDA the sums are made and held in GPU memory (hessian.py) and come to the host one input at a time, so a
chunk is bounded by DEVICE_HESSIAN_BYTES instead: fewer passes of the float model over the calibration text.

Blocks only, integer zero points: per-channel and float zero points go through gptq.py on the model in memory.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx_ir as ir

from onnxpipe.quant.config import PER_CHANNEL, Int4Config
from onnxpipe.quant.gptq import QuantizedWeight, _proxy_loss_ratio, gptq_weight, inverse_factor, matmulnbits_ir
from onnxpipe.quant.graph import WeightPlan, replace_node
from onnxpipe.quant.hessian import HessianSums

HESSIAN_BYTES = 2_200_000_000  # float64 Hessians held at once (the calibration state): one 8B layer's, 2.05 GB
# on CUDA, in GPU memory beside the float model (16 GB at 8B in fp16): four 8B layers' Hessians, 8 passes, not 32
DEVICE_HESSIAN_BYTES = 8_400_000_000

Feeds = Callable[[str], Iterable[dict[str, np.ndarray]]]  # label -> the calibration prefills, again on each call


def streams(cfg: Int4Config) -> bool:
    """Whether ``cfg`` is quantized here: GPTQ with a block size and integer zero points."""
    return cfg.algo == "gptq" and cfg.block_size not in (None, PER_CHANNEL) and not cfg.float_zero_points


def hessian_chunks(sizes: dict[str, int], budget: int) -> list[list[str]]:
    """The inputs (name -> K) in order, cut into runs whose float64 Hessians (K^2 x 8 bytes each) fit ``budget``;
    an input larger than the budget is a run of its own."""
    chunks: list[list[str]] = []
    held = 0
    for name, k in sizes.items():
        need = k * k * 8
        if not chunks or held + need > budget:
            chunks.append([])
            held = 0
        chunks[-1].append(name)
        held += need
    return chunks


def quantize_gptq_streamed(model: ir.Model, plan: WeightPlan, cfg: Int4Config, feeds: Feeds, workdir: Path,
                           provider: str = "cpu", log: Callable[[str], None] = lambda m: None,
                           progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Every MatMul of ``plan.linears`` (less the head unless --lm-head int4) replaced by a MatMulNBits holding its
    GPTQ weights, in graph order; in place. ``workdir``: an empty directory for the activation model (removed
    after the Hessians). Returns int4.quantize_int4's details."""
    assert cfg.block_size
    head = plan.lm_head
    body = {n for n in plan.linears if n != head or cfg.lm_head == "int4"}
    groups: dict[str, list[ir.Node]] = {}
    sizes: dict[str, int] = {}
    for node in model.graph:
        x, w = (node.inputs[0], node.inputs[1]) if len(node.inputs) > 1 else (None, None)
        if node.name in body and node.op_type == "MatMul" and x is not None and x.name and w is not None \
                and w.const_value is not None:
            groups.setdefault(x.name, []).append(node)
            sizes[x.name] = int(w.const_value.shape.numpy()[0])
    on_device = provider != "cpu"
    chunks = hessian_chunks(sizes, DEVICE_HESSIAN_BYTES if on_device else HESSIAN_BYTES)
    state = max(sum(sizes[x] ** 2 * 8 for x in chunk) for chunk in chunks) if chunks else 0
    log(f"gptq: {len(groups)} layer inputs' Hessians in {len(chunks)} pass(es) over the calibration prefills, at most "
        f"{state / 1e9:.2f} GB of them at a time (float64{', on ' + provider + ', one on the host at a time' if on_device else ''}); "
        f"activations from a session on {provider}")
    start = time.perf_counter()
    total = sum(len(m) for m in groups.values())
    reduction: list[float] = []
    sums: dict[tuple[Any, Any], ir.Value] = {}
    clock = dict.fromkeys(PHASES, 0.0)
    # with the proxy losses on the device (hessian.py), each runs beside the next weight's column loop (onnxruntime
    # lets go of the GIL while it runs)
    background = ThreadPoolExecutor(1) if HessianSums(provider).engine == "onnxruntime" else None
    session = _activation_session(model, list(groups), workdir, provider)
    try:
        for i, chunk in enumerate(chunks):
            label = f"gptq hessians, pass {i + 1}/{len(chunks)}" if len(chunks) > 1 else "gptq hessians"
            hessians = _chunk_sums(session, chunk, feeds(label), provider, clock)
            for name in chunk:
                with _timed(clock, "hessians"):
                    hessian = hessians.take(name)
                k_pad = -(-sizes[name] // cfg.block_size) * cfg.block_size
                with _timed(clock, "factor"):
                    factor = inverse_factor(hessian, k_pad)  # shared by the input's layers (q/k/v, gate/up)
                losses = partial(hessians.proxy_losses, name)
                ratios = []
                for node in groups[name]:
                    dense, qw = _quantize_layer(model.graph, node, hessian, factor, cfg, sums, clock)
                    ratio = partial(_proxy_loss_ratio, dense, qw, hessian, cfg.block_size, losses)
                    ratios.append(background.submit(ratio) if background else _timed_call(clock, ratio))
                    if progress:
                        progress("gptq layers", len(reduction) + len(ratios), total)
                    del dense, qw
                with _timed(clock, "proxy_loss"):  # in the background: the wait for it
                    reduction.extend(r if isinstance(r, float) else r.result() for r in ratios)
                hessians.release(name)
                del hessian, factor, ratios
    finally:
        if background:
            background.shutdown(cancel_futures=True)
        del session
        shutil.rmtree(workdir, ignore_errors=True)
    if sums:
        model.graph.sort()
    if reduction:
        model.opset_imports.setdefault("com.microsoft", 1)
    return {"weights": "int4", "algo": "gptq", "block_size": cfg.block_size, "accuracy_level": cfg.accuracy_level,
            "lm_head": ("int4" if head in body else "fp32") if head else None, "zero_points": "per block",
            "matmulnbits": len(reduction), "quantized_nodes": len(reduction),
            "gptq": {"hessians": len(groups), "quantized_nodes": len(reduction),
                     "proxy_loss_vs_rtn": float(np.mean(reduction)) if reduction else None,
                     "passes": len(chunks), "hessian_bytes_at_once": state, "provider": provider,
                     "seconds": round(time.perf_counter() - start, 1),
                     "phase_seconds": {k: round(v, 1) for k, v in clock.items()}}}


# where GPTQ's time goes (details' phase_seconds): the float model's runs that give the layer inputs, the Hessian
# products (and taking them to the host), the inverse Hessian's factor, the column loop (gptq_weight), the proxy
# loss against RTN, and the rest of writing a layer (packing, graph edits)
PHASES = ("activations", "hessians", "factor", "columns", "proxy_loss", "write")


@contextmanager
def _timed(clock: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        clock[phase] += time.perf_counter() - start


def _chunk_sums(session: Any, chunk: list[str], feeds: Iterable[dict[str, np.ndarray]], provider: str,
                clock: dict[str, float]) -> HessianSums:
    """One pass over the calibration prefills: the chunk's inputs taken from the float model, their products
    summed (on the device where the session runs)."""
    sums = HessianSums(provider)
    for feed in feeds:
        with _timed(clock, "activations"):
            outs = session.run(chunk, feed)
        with _timed(clock, "hessians"):
            for name, x in zip(chunk, outs):
                sums.add(name, x)
        del outs
    return sums


def _quantize_layer(graph: ir.Graph, node: ir.Node, hessian: np.ndarray, factor: tuple[np.ndarray, np.ndarray],
                    cfg: Int4Config, sums: dict[tuple[Any, Any], ir.Value],
                    clock: dict[str, float]) -> tuple[np.ndarray, QuantizedWeight]:
    """One MatMul's weight read, GPTQ'd against ``hessian``, written as a MatMulNBits, released; (the float64
    weight, its quantized form) for the proxy loss."""
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None and weight.name is not None and cfg.block_size
    with _timed(clock, "write"):
        w = weight.const_value.numpy().astype(np.float64)
    with _timed(clock, "columns"):
        qw = gptq_weight(w, hessian, cfg.block_size, factor=factor)
    with _timed(clock, "write"):
        replace_node(graph, node, matmulnbits_ir(graph, node, w.shape, qw, cfg.block_size, cfg.accuracy_level, sums))
        if isinstance(weight.const_value, ir.ExternalTensor):
            weight.const_value.release()
        if not weight.uses() and not weight.is_graph_output():
            graph.initializers.pop(weight.name)
    return w, qw


def _timed_call(clock: dict[str, float], ratio: Callable[[], float]) -> float:
    with _timed(clock, "proxy_loss"):
        return ratio()


def _activation_session(model: ir.Model, names: list[str], workdir: Path, provider: str) -> Any:
    """A session on the float ``model`` that also returns the named tensors, from a copy written in ``workdir``
    (its weights in external data, written one at a time); ``model`` is left as it was."""
    from onnxpipe.runtime.sessions import open_session

    values = {v.name: v for n in model.graph for v in n.outputs}
    values.update((v.name, v) for v in model.graph.inputs)
    have = {o.name for o in model.graph.outputs}
    added = 0
    try:
        for name in names:
            if name in have:
                continue
            value = values[name]
            if value.type is None:
                value.type = ir.TensorType(ir.DataType.FLOAT)
            model.graph.outputs.append(value)
            added += 1
        workdir.mkdir(parents=True, exist_ok=False)
        ir.save(model, str(workdir / "model.onnx"), external_data="model.onnx.data")
    finally:
        for _ in range(added):
            model.graph.outputs.pop()
    _release_all(model)
    providers = ("cpu",) if provider == "cpu" else (provider, "cpu")
    return open_session(workdir / "model.onnx", providers, optimization="off", purpose="GPTQ's layer inputs")


def _release_all(model: ir.Model) -> None:
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.release()


def counted_feeds(make: Callable[[], Iterator[dict[str, np.ndarray]]], total: int,
                  progress: Callable[[str, int, int], None] | None) -> Feeds:
    """A Feeds over ``make()`` that reports each pass under its label (calibration.counted)."""
    from onnxpipe.quant.calibration import counted

    return lambda label: counted(make(), total, label, progress)


__all__ = ["DEVICE_HESSIAN_BYTES", "HESSIAN_BYTES", "counted_feeds", "hessian_chunks", "quantize_gptq_streamed", "streams"]
