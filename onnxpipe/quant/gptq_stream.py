"""GPTQ with a bounded calibration state: the Hessians of a few layers' inputs at a time, each weight read lazily,
quantized and released in turn.

gptq.gptq_quantize_graph gathers every linear input's Hessian in one pass over the calibration prefills, on the
whole model in memory: at the 8B shape that is ~65 GB of float64 Hessians (32 layers x (3 x 4096^2 + 14336^2) x 8
bytes), beside a serialized copy of the model and its float session. Here the model is read with onnx_ir (weights
in an external data file stay unread until used), the float model with every linear input as an extra output is
written once beside the output (temporary: W of disk), and each layer is quantized by gptq.gptq_weight and written
by gptq.matmulnbits_ir once its input's Hessian is in (the same arithmetic as gptq_quantize_graph: the same model,
bit for bit, on the CPU). Two forms give the layer inputs:

- ``layerwise`` (the CPU's): that model cut to the nodes the inputs need and run one layer's segment at a time
  (runtime/layerwise.run_segmented, graph optimizations off, as gptq.py's session) in one pass over the
  calibration prefills; each segment's inputs are summed as it runs, and once it has run its layers are quantized
  and their Hessians let go. Held at once: one segment's session (the CPU EP widens an fp16 layer to fp32: one
  layer, where a whole-model session held every layer widened), the calibration tokens' hidden states, one
  segment's Hessians (one 8B layer's: 2.05 GB).
- ``whole`` (a device's): one session on the whole model on the eval provider, the inputs taken in graph order in
  chunks whose Hessians fit HESSIAN_BYTES, one pass over the calibration prefills per chunk. On CUDA the sums are
  made and held in GPU memory (hessian.py) and come to the host one input at a time, so a chunk is bounded by
  DEVICE_HESSIAN_BYTES instead: fewer passes of the float model over the calibration text.

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
import onnx
import onnx_ir as ir

from onnxpipe.artifact import Manifest
from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant.config import PER_CHANNEL, Int4Config
from onnxpipe.quant.gptq import QuantizedWeight, _proxy_loss_ratio, gptq_weight, inverse_factor, matmulnbits_ir
from onnxpipe.quant.graph import WeightPlan, replace_node
from onnxpipe.quant.hessian import HessianSums
from onnxpipe.runtime.layerwise import release_freed_memory

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
                           progress: Callable[[str, int, int], None] | None = None, *,
                           manifest: Manifest | None = None, form: str = "auto") -> dict[str, Any]:
    """Every MatMul of ``plan.linears`` (less the head unless --lm-head int4) replaced by a MatMulNBits holding its
    GPTQ weights, in graph order; in place. ``workdir``: an empty directory for the activation model (removed
    after the Hessians). ``form``: how the float model gives the layer inputs: ``layerwise`` (one segment's
    session at a time, runtime/layerwise.py; needs ``manifest``), ``whole`` (one session on the whole model, the
    Hessians in chunks of HESSIAN_BYTES, a pass each), ``auto``: layerwise on the CPU, whole on a device. Returns
    int4.quantize_int4's details."""
    assert cfg.block_size
    if form not in ACTIVATION_FORMS:
        raise OnnxpipeError(f"unknown GPTQ activation form {form!r}; choose one of {', '.join(ACTIVATION_FORMS)}")
    on_device = provider != "cpu"
    if form == "auto":
        form = "whole" if on_device else "layerwise"
    if form == "layerwise" and (on_device or manifest is None):
        raise OnnxpipeError("GPTQ's layer-by-layer activations run on the CPU and need the model's manifest "
                            f"(provider {provider}, manifest {'given' if manifest else 'missing'})")
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
    start = time.perf_counter()
    run = _Quantizer(model, groups, sizes, cfg, provider, progress)
    try:
        if form == "layerwise":
            assert manifest is not None
            stats = _layerwise(run, manifest, feeds, workdir, log)
        else:
            stats = _whole(run, feeds, workdir, log)
    finally:
        run.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if run.sums:
        model.graph.sort()
    if run.reduction:
        model.opset_imports.setdefault("com.microsoft", 1)
    reduction = run.reduction
    return {"weights": "int4", "algo": "gptq", "block_size": cfg.block_size, "accuracy_level": cfg.accuracy_level,
            "lm_head": ("int4" if head in body else "fp32") if head else None, "zero_points": "per block",
            "matmulnbits": len(reduction), "quantized_nodes": len(reduction),
            "gptq": {"hessians": len(groups), "quantized_nodes": len(reduction),
                     "proxy_loss_vs_rtn": float(np.mean(reduction)) if reduction else None,
                     **stats, "provider": provider,
                     "seconds": round(time.perf_counter() - start, 1),
                     "phase_seconds": {k: round(v, 1) for k, v in run.clock.items()}}}


ACTIVATION_FORMS = ("auto", "whole", "layerwise")


class _Quantizer:
    """The weights of each layer input quantized against its Hessian once its sums are in (``quantize``), the
    proxy losses against RTN gathered (``reduction``), the time of each phase (``clock``)."""

    def __init__(self, model: ir.Model, groups: dict[str, list[ir.Node]], sizes: dict[str, int], cfg: Int4Config,
                 provider: str, progress: Callable[[str, int, int], None] | None) -> None:
        self.model, self.groups, self.sizes, self.cfg, self.provider = model, groups, sizes, cfg, provider
        self.progress = progress
        self.total = sum(len(m) for m in groups.values())
        self.reduction: list[float] = []
        self.sums: dict[tuple[Any, Any], ir.Value] = {}
        self.clock = dict.fromkeys(PHASES, 0.0)
        self.done: set[str] = set()
        # with the proxy losses on the device (hessian.py), each runs beside the next weight's column loop
        # (onnxruntime lets go of the GIL while it runs)
        self.background = ThreadPoolExecutor(1) if HessianSums(provider).engine == "onnxruntime" else None

    def quantize(self, name: str, hessians: HessianSums) -> None:
        cfg, clock = self.cfg, self.clock
        assert cfg.block_size
        with _timed(clock, "hessians"):
            hessian = hessians.take(name)
        k_pad = -(-self.sizes[name] // cfg.block_size) * cfg.block_size
        with _timed(clock, "factor"):
            factor = inverse_factor(hessian, k_pad)  # shared by the input's layers (q/k/v, gate/up)
        losses = partial(hessians.proxy_losses, name)
        ratios: list[Any] = []
        for node in self.groups[name]:
            dense, qw = _quantize_layer(self.model.graph, node, hessian, factor, cfg, self.sums, clock)
            ratio = partial(_proxy_loss_ratio, dense, qw, hessian, cfg.block_size, losses)
            ratios.append(self.background.submit(ratio) if self.background else _timed_call(clock, ratio))
            if self.progress:
                self.progress("gptq layers", len(self.reduction) + len(ratios), self.total)
            del dense, qw
        with _timed(clock, "proxy_loss"):  # in the background: the wait for it
            self.reduction.extend(r if isinstance(r, float) else r.result() for r in ratios)
        hessians.release(name)
        self.done.add(name)
        del hessian, factor, losses, ratios
        release_freed_memory()  # the factor's and the column loop's float64 temporaries (measured: ~4 MB a layer
        # input stayed in the C heap on a 12-layer model without it)

    def close(self) -> None:
        if self.background:
            self.background.shutdown(cancel_futures=True)


def _whole(run: _Quantizer, feeds: Feeds, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The layer inputs from one session on the whole float model, in chunks whose Hessians fit the budget (on a
    device: DEVICE_HESSIAN_BYTES), one pass over the calibration prefills per chunk."""
    on_device = run.provider != "cpu"
    provider, sizes = run.provider, run.sizes
    chunks = hessian_chunks(sizes, DEVICE_HESSIAN_BYTES if on_device else HESSIAN_BYTES)
    state = max(sum(sizes[x] ** 2 * 8 for x in chunk) for chunk in chunks) if chunks else 0
    log(f"gptq: {len(run.groups)} layer inputs' Hessians in {len(chunks)} pass(es) over the calibration prefills, at most "
        f"{state / 1e9:.2f} GB of them at a time (float64{', on ' + provider + ', one on the host at a time' if on_device else ''}); "
        f"activations from a session on {provider}")
    session = _activation_session(run.model, list(run.groups), workdir, provider)
    try:
        for i, chunk in enumerate(chunks):
            label = f"gptq hessians, pass {i + 1}/{len(chunks)}" if len(chunks) > 1 else "gptq hessians"
            hessians = _chunk_sums(session, chunk, feeds(label), provider, run.clock)
            for name in chunk:
                run.quantize(name, hessians)
    finally:
        del session
    return {"passes": len(chunks), "hessian_bytes_at_once": state, "activations": "whole"}


def _layerwise(run: _Quantizer, manifest: Manifest, feeds: Feeds, workdir: Path,
               log: Callable[[str], None]) -> dict[str, Any]:
    """The layer inputs from the float model run one segment at a time (runtime/layerwise.run_segmented, one
    layer's weights in a session at a time) over every calibration prefill in one pass: each input's products are
    summed as its segment makes it, and once a segment has run, its inputs' weights are quantized and their
    Hessians let go. Held at once: one segment's session, the hidden states of the calibration tokens, and the
    Hessians of one segment's inputs. The same activations (the same kernels, graph optimizations off) and so the
    same Hessians and int4 weights as ``_whole``'s."""
    from onnxpipe.runtime.layerwise import kv_caches, plan_segments, run_segmented, segment_session

    names = list(run.groups)
    graph = _activation_graph(run.model, names, workdir)
    proto = onnx.ModelProto()
    proto.ParseFromString(graph[0])
    segments = plan_segments(proto.graph, kv_caches(manifest))
    del proto
    made = {name: seg.label for seg in segments for name in seg.outputs if name in run.groups}
    missing = [n for n in names if n not in made]
    if missing:
        raise OnnxpipeError(f"gptq: layer input {missing[0]} is not made by the graph's nodes; quantize it with "
                            "the whole model's session (on a device) or with --algo rtn")
    per_segment = {seg.label: sum(run.sizes[n] ** 2 * 8 for n in seg.outputs if n in run.groups) for seg in segments}
    state = max(per_segment.values(), default=0)
    log(f"gptq: {len(names)} layer inputs' Hessians in one pass over the calibration prefills, the float model one "
        f"segment at a time ({len(segments)} segments, on cpu); at most {state / 1e9:.2f} GB of Hessians at a time "
        "(float64: one segment's inputs)")
    steps = list(feeds("gptq hessians, layer by layer"))
    first_past = manifest.past_names(0)[0] if manifest.num_layers else None
    kv_dtype = steps[0][first_past].dtype if steps and first_past in steps[0] else np.dtype(np.float32)
    hessians = HessianSums(run.provider)
    clock = run.clock

    def take(t: int, name: str, x: np.ndarray) -> None:
        with _timed(clock, "hessians"):
            hessians.add(name, x)

    def done(seg: Any) -> None:
        for name in [n for n in names if made[n] == seg.label]:
            run.quantize(name, hessians)

    begun, before = time.perf_counter(), sum(clock.values())
    run_segmented(graph, manifest, steps, kv_dtype, segment_session(("cpu",)), False, keep=(), taken=set(names),
                  take=take, done=done)
    clock["activations"] += time.perf_counter() - begun - (sum(clock.values()) - before)
    assert run.done == set(names), sorted(set(names) - run.done)
    return {"passes": 1, "hessian_bytes_at_once": state, "activations": "layerwise", "segments": len(segments)}


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

    _save_with_outputs(model, names, workdir)
    providers = ("cpu",) if provider == "cpu" else (provider, "cpu")
    return open_session(workdir / "model.onnx", providers, optimization="off", purpose="GPTQ's layer inputs")


def _save_with_outputs(model: ir.Model, names: list[str], workdir: Path) -> None:
    """A copy of ``model`` in ``workdir`` that also outputs the named tensors, its weights in external data
    (written one at a time, then released); ``model`` is left as it was."""
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


def _activation_graph(model: ir.Model, names: list[str], workdir: Path) -> tuple[bytes, dict[str, Any]]:
    """The float ``model`` with the named tensors as its only outputs and the nodes they need, as
    runtime/layerwise.run_segmented takes it: its weights in a copy written in ``workdir`` (external data, one at a
    time), each segment's session mapping its own from there. ``model`` is left as it was."""
    from onnxpipe.runtime.layerwise import file_graph

    _save_with_outputs(model, names, workdir)
    graph, tensors = file_graph(workdir / "model.onnx")
    return needed_only(graph, names), tensors


def needed_only(graph: bytes, outputs: list[str]) -> bytes:
    """A serialized model cut to the nodes the named ``outputs`` need, and those as its only outputs (the LM head
    and the caches' outputs go when no named output needs them)."""
    proto = onnx.ModelProto()
    proto.ParseFromString(graph)
    g = proto.graph
    needed, kept = set(outputs), []
    for node in reversed(g.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(x for x in node.input if x)
            needed.update(_inner_reads(node))
    nodes = [onnx.NodeProto() for _ in kept]
    for copy, node in zip(nodes, reversed(kept)):
        copy.CopyFrom(node)
    del g.node[:]
    g.node.extend(nodes)
    typed = {v.name: v for v in list(g.output) + list(g.value_info)}
    outs = []
    for name in outputs:
        out = onnx.ValueInfoProto()
        if name in typed:
            out.CopyFrom(typed[name])
        else:
            out.name = name
        outs.append(out)
    del g.output[:]
    g.output.extend(outs)
    return proto.SerializeToString()


def _inner_reads(node: Any) -> set[str]:
    """The names a node's subgraphs (If/Loop/Scan bodies) read, their own included (a superset of the outer
    values they need)."""
    reads: set[str] = set()
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in g.node:
                reads.update(x for x in inner.input if x)
                reads |= _inner_reads(inner)
    return reads


def _release_all(model: ir.Model) -> None:
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.release()


def counted_feeds(make: Callable[[], Iterator[dict[str, np.ndarray]]], total: int,
                  progress: Callable[[str, int, int], None] | None) -> Feeds:
    """A Feeds over ``make()`` that reports each pass under its label (calibration.counted)."""
    from onnxpipe.quant.calibration import counted

    return lambda label: counted(make(), total, label, progress)


__all__ = ["ACTIVATION_FORMS", "DEVICE_HESSIAN_BYTES", "HESSIAN_BYTES", "counted_feeds", "hessian_chunks", "needed_only",
           "quantize_gptq_streamed", "streams"]
