"""Levels, pass order, and the per-pass check: every pass is run, counted and checked alone, and rolled back if it
breaks equivalence with its input.

A pass rewrites an onnx_ir model in place. The pipeline keeps the pass's input as a serialized proto: it is the
reference side of the pass's parity check (ORT, graph optimizations off) and what a rolled-back pass restores. The
candidate side runs with ORT's graph optimizations on (ORT_ENABLE_ALL, as the runtime does), so the check also
covers what ORT itself does to the fused graph.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from onnxpipe.errors import OnnxpipeError
from onnxpipe.fusion import attention, cleanup, gelu, norms, packing, rotary
from onnxpipe.fusion.rules import TARGETS, PassContext, using_context

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
                       "FastGelu", "Gelu", "BiasGelu", "RotaryEmbedding", "MultiHeadAttention", "GroupQueryAttention"}


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
    """Runs the parity check of a candidate graph against a reference graph (both serialized protos)."""

    manifest: Any
    dtype: str
    providers: list[str]
    decode_steps: int = 4
    ctx: PassContext | None = None  # its graph_notes["padding_side"] says how the candidate is padded

    def check(self, reference: bytes | Path, candidate: bytes | Path, reference_padding_side: str | None = None) -> Any:
        """reference_padding_side: how the reference graph pads (default: the source directory's side)."""
        from onnxpipe.parity import TOLERANCE, check_decoders, ort_step_fn

        ref = ort_step_fn(_session(reference, self.providers, optimized=False), self.manifest)
        cand = ort_step_fn(_session(candidate, self.providers, optimized=True), self.manifest)
        kv_dtype = np.float16 if self.dtype == "fp16" else np.float32
        report = check_decoders(ref, cand, self.manifest, kv_dtype=kv_dtype, decode_steps=self.decode_steps,
                                padding_side=(self.ctx.graph_notes if self.ctx else {}).get("padding_side", "left"),
                                reference_padding_side=reference_padding_side or self.manifest.graph.get(
                                    "padding_side", "left"))
        return report.judge(TOLERANCE[self.dtype])


def _session(model: bytes | str | Path, providers: list[str], optimized: bool) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    from onnxpipe.runtime.providers import DISABLED_ORT_OPTIMIZERS

    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers,
                                disabled_optimizers=DISABLED_ORT_OPTIMIZERS)


SNAPSHOT_IN_MEMORY_LIMIT = 1_800_000_000  # bytes of weights; protobuf cannot serialize 2 GiB or more


def serialize(model: ir.Model, spill_dir: Path | None = None) -> bytes | Path:
    """The model as bytes, or, past protobuf's limit, as a file (weights as external data) in ``spill_dir``."""
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size < SNAPSHOT_IN_MEMORY_LIMIT or spill_dir is None:
        return ir.to_proto(model).SerializeToString()
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="snapshot-", dir=spill_dir)) / "model.onnx"
    ir.save(model, str(path), external_data="model.onnx.data")
    return path


def restore(snapshot: bytes | Path) -> ir.Model:
    if isinstance(snapshot, Path):
        return ir.load(str(snapshot))
    return ir.from_proto(_parse(snapshot))


def run_passes(
    model: ir.Model,
    passes: list[FusionPass],
    ctx: PassContext,
    checker: Checker | None,
    log: Callable[[str], None] = lambda msg: None,
    spill_dir: Path | None = None,
) -> tuple[ir.Model, list[PassReport]]:
    """Run ``passes`` in order; a pass that fails to run, to load in ORT, or the parity check is rolled back.
    Models past protobuf's 2 GiB limit are snapshotted as files under ``spill_dir``."""
    reports = []
    current = serialize(model, spill_dir)
    for p in passes:
        start = time.perf_counter()
        before = op_counts(model)
        notes_before = dict(ctx.graph_notes)
        fused, candidate, reason = _apply(p, model, ctx, spill_dir)
        # a file snapshot cannot be compared cheaply: treat it as changed and check it
        changed = candidate is not None and (isinstance(candidate, Path) or candidate != current)
        check = None
        if changed and checker is not None:
            # the reference is the previous snapshot: padded the way the notes said before this pass
            check, reason = _check(checker, current, candidate, notes_before.get("padding_side", "left"))
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
    return model, reports


def _apply(p: FusionPass, model: ir.Model, ctx: PassContext, spill_dir: Path | None
           ) -> tuple[dict[str, Any], bytes | Path | None, str | None]:
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
        return fused, serialize(model, spill_dir), None
    except Exception as e:  # a rule that breaks the graph is a rolled-back pass, not a crashed stage
        return fused, None, f"{type(e).__name__}: {_first_line(e)}"


def _check(checker: Checker, reference: bytes | Path, candidate: bytes | Path, reference_padding_side: str
           ) -> tuple[dict | None, str | None]:
    """(the parity report, why the candidate fails or None)."""
    try:
        report = checker.check(reference, candidate, reference_padding_side)
    except Exception as e:  # ORT refused the graph or failed to run it
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
