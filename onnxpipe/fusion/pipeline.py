"""Levels, pass order, and the per-pass check: every pass is run, counted and checked alone, and rolled back if it
breaks equivalence with its input.

A pass rewrites an onnx_ir model in place. The pipeline keeps the pass's input as a ``Snapshot``: the graph
serialized with its large initializers as placeholders, plus those initializers' tensor objects themselves, shared
with the model (memory-mapped from the input's external data where it has one) and with every other snapshot. Passes
replace tensors, they never write into one, so a snapshot costs the graph's bytes and the initializers a pass
created or changed, never a copy of the weights, and nothing on disk. The snapshot is the reference side of the
pass's parity check (ORT, graph optimizations off, fed the shared tensors as external initializers) and what a
rolled-back pass restores. The candidate side runs with ORT's graph optimizations on (ORT_ENABLE_ALL, as the runtime
does), so the check also covers what ORT itself does to the fused graph. The two sessions are made one after the
other, never held together.

Only a numerical mismatch, or ORT failing to load or run the pass's graph, rolls a pass back. Running out of disk or
memory (ENOSPC, MemoryError, an ORT allocation failure) stops the run with a ``ResourceError`` naming the pass and
what was being done: such a pass was never judged.
"""

from __future__ import annotations

import collections
import errno
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from onnxpipe.errors import OnnxpipeError
from onnxpipe.fusion import attention, cleanup, gelu, layerwise, moe, norms, packing, rotary
from onnxpipe.fusion.rules import TARGETS, PassContext, using_context
from onnxpipe.runtime.layerwise import one_cast_at_a_time as cast_by_cast
from onnxpipe.runtime.sessions import open_session

PassFn = Callable[[ir.Model, PassContext], "dict[str, Any] | None"]


@dataclass(frozen=True)
class FusionPass:
    name: str
    level: int
    run: PassFn
    description: str
    needs_shapes: bool = False  # refresh shape inference first: the rules' checks read shapes
    in_levels: bool = True  # False: run only when named in --passes


PASSES: tuple[FusionPass, ...] = (
    FusionPass("fold_constants", 1, cleanup.fold_constants, "constant folding"),
    FusionPass("simplify_shapes", 1, cleanup.simplify_shapes, "shape-subgraph simplification"),
    FusionPass("remove_dead_nodes", 1, cleanup.remove_dead_nodes, "identity and dead-node removal"),
    FusionPass("cse", 1, cleanup.eliminate_common_subexpressions, "common-subexpression elimination"),
    FusionPass("dedup_initializers", 1, cleanup.deduplicate_initializers, "initializer deduplication"),
    FusionPass("norms", 2, norms.fuse_norms, "RMSNorm/LayerNorm and Skip forms", needs_shapes=True),
    FusionPass("gelu", 2, gelu.fuse_gelu, "GELU -> FastGelu/Gelu/BiasGelu", needs_shapes=True),
    FusionPass("rotary", 2, rotary.fuse_rotary, "RoPE -> RotaryEmbedding with cos/sin caches", needs_shapes=True),
    FusionPass("experts", 2, moe.fuse_experts, "mixture-of-experts blocks -> MoE", needs_shapes=True),
    FusionPass("attention", 3, attention.fuse_attention, "attention -> MultiHeadAttention/GroupQueryAttention",
               needs_shapes=True),
    # Measured on the 2-core CPU (Llama 100M, decode): 5-7% slower than unpacked; on the H100 (1B, CUDA graphs)
    # 1.006-1.010x: opt-in (--passes) only.
    FusionPass("pack_projections", 3, packing.pack_projections, "MatMuls reading one activation -> one MatMul + Split",
               needs_shapes=True, in_levels=False),
    FusionPass("tidy", 2, cleanup.tidy, "fold, CSE and dead-node sweep over what the fusions left"),
)
PASS_NAMES = tuple(p.name for p in PASSES)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# The contrib ops CUDA has kernels for (onnxruntime docs/OperatorKernels.md); used only when this onnxruntime has
# no CUDA EP to ask, which --target cuda allows only with --skip-verify.
CUDA_DOCUMENTED_OPS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
                       "FastGelu", "Gelu", "BiasGelu", "RotaryEmbedding", "MultiHeadAttention", "GroupQueryAttention",
                       "MoE"}


def supported_ops(target: str) -> dict[str, set[str]] | None:
    """Ops outside the default ONNX domain (plus ORT's SimplifiedLayerNormalization) that the target EP of this
    onnxruntime has kernels for, with the float types each takes; None when this onnxruntime has no such EP or
    could not be asked (capabilities.py)."""
    from onnxpipe.fusion.capabilities import onnxruntime_capabilities

    caps = onnxruntime_capabilities()
    provider = PROVIDERS[target]
    if caps is None or provider not in caps["providers"]:
        return None
    return {op: set(types) for op, types in caps["kernels"].get(provider, {}).items()}


FLOAT_TYPES = {"fp32": "tensor(float)", "fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}


def select_passes(level: int, names: list[str] | None) -> list[FusionPass]:
    if level not in (1, 2, 3):
        raise OnnxpipeError(f"unknown level {level}; choose 1, 2 or 3")
    if names is None:
        return [p for p in PASSES if p.level <= level and p.in_levels]
    if not names:  # `--passes ""` (an unset shell variable): an error, not a copy of the input called optimized
        raise OnnxpipeError(f"--passes names no pass; name one or more of: {', '.join(PASS_NAMES)}")
    unknown = [n for n in names if n not in PASS_NAMES]
    if unknown:
        raise OnnxpipeError(f"unknown pass{'es' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"valid passes: {', '.join(PASS_NAMES)}")
    return [p for p in PASSES if p.name in names]


@dataclass
class PassReport:
    name: str
    level: int
    status: str  # "kept" | "unchanged" | "rolled_back"
    seconds: float
    nodes_before: int
    nodes_after: int
    op_counts: dict[str, int]
    op_delta: dict[str, int]
    fused: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def op_counts(model: ir.Model) -> dict[str, int]:
    counts = collections.Counter(n.op_type for n in model.graph.all_nodes())
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class Checker:
    """Runs the parity check of a candidate graph against a reference graph (both ``Snapshot``s)."""

    manifest: Any
    dtype: str
    providers: list[str]
    decode_steps: int = 4
    ctx: PassContext | None = None  # its graph_notes["padding_side"] says how the candidate is padded
    log: Callable[[str], None] = lambda msg: None
    form: str = "whole"  # or "layerwise": each side run one layer's segment at a time (layerwise.py)

    def check(self, reference: Snapshot, candidate: Snapshot, reference_padding_side: str | None = None) -> Any:
        """reference_padding_side: how the reference graph pads (default: the source directory's side). The
        reference session is made, run and released before the candidate's is made."""
        from onnxpipe.parity import TOLERANCE, check_decoders, lazy_ort_step_fn

        if self.form == "layerwise":
            return self._check_layerwise(reference, candidate, reference_padding_side).judge(TOLERANCE[self.dtype])
        ref = lazy_ort_step_fn(lambda: _session(reference, self.providers, optimized=False), self.manifest,
                               on_open=lambda: self.log("    check: reference session (ORT optimizations off)"))
        cand = lazy_ort_step_fn(lambda: _session(candidate, self.providers, optimized=True), self.manifest,
                                on_open=lambda: self.log("    check: candidate session (ORT optimizations on)"))
        kv_dtype = np.float16 if self.dtype == "fp16" else np.float32
        report = check_decoders(ref, cand, self.manifest, kv_dtype=kv_dtype, decode_steps=self.decode_steps,
                                padding_side=(self.ctx.graph_notes if self.ctx else {}).get("padding_side", "left"),
                                reference_padding_side=reference_padding_side or self.manifest.graph.get(
                                    "padding_side", "left"))
        return report.judge(TOLERANCE[self.dtype])

    def _check_layerwise(self, reference: Snapshot, candidate: Snapshot, reference_padding_side: str | None) -> Any:
        def session(graph: bytes, tensors: dict[str, Any], optimized: bool, data_dir: str | None) -> Any:
            return _session(Snapshot(graph, tensors), self.providers, optimized, one_cast_at_a_time=True,
                            external_data_dir=data_dir)

        kv_dtype = np.float16 if self.dtype == "fp16" else np.float32
        return layerwise.check_layerwise(
            (reference.graph, reference.tensors), (candidate.graph, candidate.tensors), self.manifest, session,
            kv_dtype=np.dtype(kv_dtype), decode_steps=self.decode_steps,
            padding_side=(self.ctx.graph_notes if self.ctx else {}).get("padding_side", "left"),
            reference_padding_side=reference_padding_side or self.manifest.graph.get("padding_side", "left"),
            log=self.log)


def _session(model: Snapshot | bytes | str | Path, providers: list[str], optimized: bool,
             one_cast_at_a_time: bool = False, external_data_dir: str | None = None) -> Any:
    """An ORT session over a snapshot (its shared tensors handed to ORT as external initializers, not copied), a
    serialized model or a model file. MatMul weight prepacking is off: it would copy every weight for a session
    that runs a dozen steps, and it does not change the graph the check is about."""
    initializers: dict[str, Any] = {}
    if isinstance(model, Snapshot):
        initializers = {n: _ort_value(t) for n, t in model.tensors.items()}
        model = model.graph
    # onnxruntime's own exception comes through: resource_error tells running out of memory from a bad graph
    return open_session(model, providers, optimization="all" if optimized else "off",
                        purpose=f"the {'candidate' if optimized else 'reference'} of a pass check",
                        config={"session.disable_prepacking": "1"}, external_initializers=initializers,
                        session_options=cast_by_cast() if one_cast_at_a_time and not optimized else None,
                        external_data_dir=external_data_dir, raw_errors=True)


def _ort_value(tensor: Any) -> Any:
    import onnxruntime as ort

    array = tensor.numpy()
    if tensor.dtype == ir.DataType.BFLOAT16:  # numpy has no bfloat16 of its own: hand ORT the bits
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(array).view(np.uint16),
                                                               int(ir.DataType.BFLOAT16))
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


SNAPSHOT_INLINE_BYTES = 4096  # initializers smaller than this are copied into a snapshot's graph (shape constants)
PLACEHOLDER = "onnxpipe-snapshot-placeholder"  # the external-data location of a shared initializer in a snapshot
# weights: the dtypes shared with ORT as external initializers. Integer tensors (shapes, axes, indices) are copied
# into the graph whatever their size: ORT's shape inference reads their values, and cannot read a placeholder's
_SHAREABLE = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8,
              ir.DataType.UINT8}


@dataclass(frozen=True)
class Snapshot:
    """A model at one point of the pipeline, without a copy of its weights: ``graph`` is the model serialized with
    each large initializer as a placeholder, ``tensors`` those initializers' tensor objects by name, shared with
    the model and with the other snapshots (a pass that changes an initializer makes a new tensor)."""

    graph: bytes
    tensors: dict[str, Any]

    def same_as(self, other: "Snapshot") -> bool:
        return (self.graph == other.graph and self.tensors.keys() == other.tensors.keys()
                and all(t is other.tensors[n] for n, t in self.tensors.items()))

    def new_bytes(self, other: "Snapshot") -> int:
        """Bytes of this snapshot's tensors that ``other`` does not share: what a pass added."""
        return len(self.graph) + sum(t.nbytes for n, t in self.tensors.items() if other.tensors.get(n) is not t)


def snapshot(model: ir.Model) -> Snapshot:
    """The model as a ``Snapshot`` (its large initializers shared, not copied)."""
    shared: dict[str, Any] = {}
    swapped = []
    try:
        for v in model.graph.initializers.values():
            t = v.const_value
            if t is None or v.name is None:
                continue
            if t.dtype not in _SHAREABLE or t.nbytes < SNAPSHOT_INLINE_BYTES:
                if isinstance(t, ir.ExternalTensor):  # a reference to the input's data file means nothing to ORT
                    v.const_value = ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name)  # here: copy it in
                    swapped.append((v, t))
                continue
            shared[v.name] = t
            v.const_value = ir.ExternalTensor(PLACEHOLDER, 0, t.nbytes, t.dtype, shape=t.shape, name=v.name)
            swapped.append((v, t))
        graph = ir.to_proto(model).SerializeToString()
    finally:
        for v, t in swapped:
            v.const_value = t
    return Snapshot(graph, shared)


def restore(snap: Snapshot) -> ir.Model:
    """The model a snapshot was taken of: its graph parsed again, its shared tensors put back by name."""
    model = ir.from_proto(_parse(snap.graph))
    for name, t in snap.tensors.items():
        model.graph.initializers[name].const_value = t
    return model


def own_weights(model: ir.Model) -> None:
    """Give every tensor read from the protobuf (initializers and Constant attributes) its own array, once. A
    protobuf-backed tensor copies its bytes out of the message on every read (each check session would hold its own
    copy of the weights), and any one of them keeps the whole parsed message alive; once none is left, the message
    is freed. External tensors stay memory-mapped, except small or integer ones (shapes, axes): the rules and ORT's
    shape inference read their values from a serialized graph, where a reference to the input's file means nothing.
    """
    def own(t: Any) -> Any:
        if t.dtype == ir.DataType.STRING:
            return t
        if isinstance(t, ir.ExternalTensor) and (t.dtype in _SHAREABLE and t.nbytes >= SNAPSHOT_INLINE_BYTES):
            return t
        if not isinstance(t, (ir.serde.TensorProtoTensor, ir.ExternalTensor)):
            return t
        return ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name)

    for v in model.graph.initializers.values():
        if v.const_value is not None:
            v.const_value = own(v.const_value)
    for node in model.graph.all_nodes():
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.serde.TensorProtoTensor):
                node.attributes[name] = ir.AttrTensor(name, own(attr.value))


def save_inline(model: ir.Model, path: Path) -> None:
    """Write the model as one protobuf file (weights inside, as below artifact.EXTERNAL_DATA_THRESHOLD) one weight
    at a time, never the whole message in memory: the graph without its large initializers, then each of those as
    its own ``initializer`` field appended to the graph (protobuf merges repeated fields in any order)."""
    import onnx

    snap = snapshot(model)
    proto = _parse(snap.graph)
    fields = []  # (TensorProto without its data, the tensor) of each shared initializer, in graph order
    for i in reversed(range(len(proto.graph.initializer))):
        init = proto.graph.initializer[i]
        if init.name in snap.tensors and init.data_location == onnx.TensorProto.EXTERNAL:
            meta = onnx.TensorProto()
            meta.CopyFrom(init)
            meta.ClearField("external_data")
            meta.ClearField("data_location")
            fields.append((meta.SerializeToString(), snap.tensors[init.name]))
            del proto.graph.initializer[i]
    fields.reverse()
    graph_head = proto.graph.SerializeToString()
    proto.ClearField("graph")
    sizes = [len(m) + 1 + _varint_len(t.nbytes) + t.nbytes for m, t in fields]  # raw_data: field 9, length-delimited
    graph_len = len(graph_head) + sum(1 + _varint_len(size) + size for size in sizes)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        f.write(b"\x3a" + _varint(graph_len))  # ModelProto.graph: field 7, length-delimited
        f.write(graph_head)
        for (meta, t), size in zip(fields, sizes):
            f.write(b"\x2a" + _varint(size))  # GraphProto.initializer: field 5, length-delimited
            f.write(meta)
            f.write(b"\x4a" + _varint(t.nbytes))  # TensorProto.raw_data: field 9, length-delimited
            data = t.tobytes()
            if len(data) != t.nbytes:
                raise OnnxpipeError(f"internal error: initializer {t.name} has {len(data)} bytes, not {t.nbytes}")
            f.write(data)
            del data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint_len(n: int) -> int:
    return len(_varint(n))


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


class ResourceError(OnnxpipeError):
    """The machine ran out of disk or memory: the run stops; the pass it happened in was never judged."""


_ORT_ALLOCATION = ("failed to allocate memory", "bad_alloc", "bad allocation", "out of memory",
                   "cudaerrormemoryallocation", "cuda_error_out_of_memory")


def resource_error(e: BaseException, doing: str, pass_name: str | None, need_bytes: int,
                   path: str | Path | None = None) -> ResourceError | None:
    """``e`` as a one-line ResourceError if it is a disk or memory failure (None otherwise): what was being done,
    in which pass, and roughly how much it needed."""
    where = f" (pass {pass_name})" if pass_name else ""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        path = getattr(e, "filename", None) or path
        free = ""
        if path is not None:
            try:
                probe = Path(path)
                while not probe.exists() and probe != probe.parent:
                    probe = probe.parent
                free = f", {shutil.disk_usage(probe).free / 1e9:.1f} GB free"
            except OSError:
                pass
        return ResourceError(f"optimize: no space left on device {doing}{f' {path}' if path else ''}{where}: "
                             f"need ~{_gb(need_bytes)}{free}")
    text = str(e).lower()
    if isinstance(e, MemoryError) or (type(e).__module__.startswith("onnxruntime")
                                      and any(k in text for k in _ORT_ALLOCATION)):
        detail = f" ({_first_line(e)})" if not isinstance(e, MemoryError) and _first_line(e) else ""
        return ResourceError(f"optimize: out of memory {doing}{where}: the weights alone are ~{_gb(need_bytes)}"
                             f"{detail}")
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def run_passes(
    model: ir.Model,
    passes: list[FusionPass],
    ctx: PassContext,
    checker: Checker | None,
    log: Callable[[str], None] = lambda msg: None,
    initial: Snapshot | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[ir.Model, list[PassReport]]:
    """Run ``passes`` in order; a pass that fails to run, to load in ORT, or the parity check is rolled back. A
    disk or memory failure raises ResourceError instead. ``initial``: the model's snapshot, if already taken;
    ``progress(label, done, total)`` is called after each pass."""
    reports = []
    weights = weight_bytes(model)
    current = initial or take_snapshot(model, "snapshotting the input", None, weights)
    for i, p in enumerate(passes, 1):
        start = time.perf_counter()
        log(f"  [{i}/{len(passes)}] {p.name}: {p.description}")
        before = op_counts(model)
        notes_before = dict(ctx.graph_notes)
        fused, candidate, reason = _apply(p, model, ctx, weights)
        changed = candidate is not None and not candidate.same_as(current)
        check = None
        if changed and checker is not None:
            log(f"  [{i}/{len(passes)}] {p.name}: checking (prefill + {checker.decode_steps} decode steps)")
            # the reference is the previous snapshot: padded the way the notes said before this pass
            check, reason = _check(checker, current, candidate, notes_before.get("padding_side", "left"), p.name,
                                   weights)
        if reason is not None:
            model, status = restore(current), "rolled_back"
            ctx.graph_notes.clear()  # what the rolled-back pass noted (padding side, op requirements) goes too
            ctx.graph_notes.update(notes_before)
        else:
            status = "kept" if changed else "unchanged"
            current = candidate if changed else current
        after = before if status == "rolled_back" else op_counts(model)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))
                 if after.get(k, 0) != before.get(k, 0)}
        reports.append(PassReport(p.name, p.level, status, round(time.perf_counter() - start, 3),
                                  sum(before.values()), sum(after.values()), after, delta, fused, check, reason))
        log(_pass_line(reports[-1]))
        if progress is not None:
            progress("optimize passes", i, len(passes))
    return model, reports


def take_snapshot(model: ir.Model, doing: str, pass_name: str | None, weights: int) -> Snapshot:
    """``snapshot(model)``, a disk or memory failure raised as ResourceError (``doing``, in ``pass_name``)."""
    try:
        return snapshot(model)
    except (OSError, MemoryError) as e:
        err = resource_error(e, doing, pass_name, weights)
        if err is None:
            raise
        raise err from None


def _apply(p: FusionPass, model: ir.Model, ctx: PassContext, weights: int
           ) -> tuple[dict[str, Any], Snapshot | None, str | None]:
    """Run one pass in place: (what it reports, the snapshot of its result, why it failed or None)."""
    import onnx_ir.passes.common as common_passes

    fused: dict[str, Any] = {}
    try:
        with using_context(ctx):
            if p.needs_shapes:
                cleanup.infer_shapes(model, ctx)
            fused = dict(p.run(model, ctx) or {})
            common_passes.RemoveUnusedNodesPass()(model)
            cast_ops = _check_target_ops(model, ctx)
            if cast_ops:
                fused["runs through inserted Casts"] = ", ".join(cast_ops)
    except Exception as e:  # a rule that breaks the graph is a rolled-back pass, not a crashed stage
        err = resource_error(e, "running the pass", p.name, weights)
        if err is not None:  # ... but running out of disk or memory says nothing about the rule
            raise err from None
        return fused, None, f"{type(e).__name__}: {_first_line(e)}"
    return fused, take_snapshot(model, "snapshotting the result", p.name, weights), None


def _check(checker: Checker, reference: Snapshot, candidate: Snapshot, reference_padding_side: str,
           pass_name: str | None = None, weights: int = 0) -> tuple[dict | None, str | None]:
    """(the parity report, why the candidate fails or None). Disk and memory failures raise ResourceError."""
    try:
        report = checker.check(reference, candidate, reference_padding_side)
    except Exception as e:  # ORT refused the graph or failed to run it
        err = resource_error(e, "checking the result", pass_name, weights)
        if err is not None:
            raise err from None
        return None, f"ORT could not run the result: {type(e).__name__}: {_first_line(e)}"
    return report.to_json(), None if report.passed else f"parity failed: {report.summary()}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _parse(data: bytes) -> Any:
    import onnx

    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    return proto


def _check_target_ops(model: ir.Model, ctx: PassContext) -> list[str]:
    """A fused op the target EP has no kernel for fails the pass (which is then rolled back). Returns the fused
    ops that have a kernel only for another float type: ORT runs those through Casts it inserts (slower)."""
    if ctx.target not in TARGETS:
        raise OnnxpipeError(f"unknown target {ctx.target!r}; choose one of {', '.join(TARGETS)}")
    runnable = supported_ops(ctx.target)
    if runnable is None:  # no such EP here (--target cuda --skip-verify), or onnxruntime could not be asked
        ctx.graph_notes["target_op_check"] = "documented op list (this onnxruntime's kernel registry unavailable)"
        runnable = {op: {"fp32", "fp16"} for op in CUDA_DOCUMENTED_OPS}
    fused = {n.op_type for n in model.graph.all_nodes()
             if n.domain == "com.microsoft" or n.op_type == "SimplifiedLayerNormalization"}
    foreign = sorted(fused - set(runnable))
    if foreign:
        raise OnnxpipeError(f"the pass emitted {', '.join(foreign)}, which the {ctx.target} EP has no kernel for")
    other_type = sorted(op for op in fused if ctx.dtype not in runnable[op])
    if other_type and ctx.target == "cuda":  # ORT would place these on the CPU EP, copying around each
        raise OnnxpipeError(f"the pass emitted {', '.join(other_type)}, which the cuda EP has no {ctx.dtype} "
                            "kernel for")
    return other_type  # the CPU EP runs these through Casts ORT inserts


def _pass_line(r: PassReport) -> str:
    fused = ", ".join(f"{k} {v}" for k, v in r.fused.items() if isinstance(v, str))
    check = ""
    if r.check:
        check = f"rel err {r.check['rel_err']:.2g}, greedy {r.check['greedy_agreement']:.0%}"
    text = f"  {r.name:<18} {r.status:<11} nodes {r.nodes_before:>5} -> {r.nodes_after:<5} {check}"
    if fused:
        text += f"  [{fused}]"
    if r.reason:
        text += f"  ({r.reason})"
    return text
