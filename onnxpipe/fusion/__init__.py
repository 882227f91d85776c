"""optimize: an onnxpipe model directory -> a graph-optimized one, each pass counted and checked.

    level 1  cleanup: constant folding, shape simplification, dead nodes, CSE, initializer dedup   (cleanup.py)
    level 2  + norms and their Skip forms, GELU, rotary embedding, experts -> MoE        (norms, gelu, rotary, moe)
    level 3  + attention -> MultiHeadAttention / GroupQueryAttention with the KV cache inside      (attention.py)

The directory's I/O contract (names, BNSH KV layout, left padding) is unchanged at every level.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from onnxpipe.errors import OnnxpipeError, first_line
from onnxpipe.genai_config import write_genai_config

__all__ = ["optimize_model", "OptimizeResult", "PASS_NAMES", "format_table"]


@dataclass
class OptimizeResult:
    model_dir: Any  # artifact.ModelDir
    passes: list[Any]  # pipeline.PassReport
    check: Any  # parity.ParityReport | None
    seconds: float


def optimize_model(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    level: int = 3,
    target: str = "cpu",
    passes: list[str] | None = None,
    verify: bool = True,
    force: bool = False,
    decode_steps: int = 4,
    check_form: str = "auto",
    log: Callable[[str], None] = lambda msg: None,
    progress: Callable[[str, int, int], None] | None = None,
) -> OptimizeResult:
    """Optimize the model directory ``in_dir`` into ``out_dir``; nothing is written if the final check fails.

    check_form: ``whole`` runs each check's two sides as whole-model sessions; ``layerwise`` one layer's segment
    at a time, with an external-data input's weights read from its file as they are needed (layerwise.py: peak
    memory ~ a layer's weights, not ~3x the model's); ``auto``: layerwise from layerwise.LAYERWISE_BYTES."""
    import onnx_ir as ir

    from onnxpipe.artifact import ModelDir, check_output_dir
    from onnxpipe.outputs import check_io_paths, output_lock, remove_stale_temp
    from onnxpipe.fusion import layerwise, pipeline
    from onnxpipe.fusion.rules import TARGETS, PassContext

    start = time.perf_counter()
    src = ModelDir.open(in_dir)
    out_dir = Path(out_dir)
    check_io_paths([src.path], out_dir)
    if target not in TARGETS:
        raise OnnxpipeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    selected = pipeline.select_passes(level, passes)
    layerwise.check_form(check_form, 0)  # an unknown form fails before any work
    check_output_dir(out_dir, force)
    # the output's lock is held from here to the end, before any work is announced: a second run on the same
    # output refuses at once. Pass snapshots share the weights (pipeline.Snapshot): nothing but the output is written
    with output_lock(out_dir):
        providers = _providers(target, verify)
        manifest = src.manifest
        dtype = manifest.graph.get("dtype", "fp32")
        stored = "external data, memory-mapped" if manifest.graph.get("external_data") else "in the graph"
        log(f"loading {src.model_path} (weights {stored})")
        try:  # external data stays on disk, memory-mapped when a tensor is read
            model = ir.load(str(src.model_path))
        except MemoryError as e:
            raise pipeline.resource_error(e, "loading the input", None, src.size_bytes()) from None
        except Exception as e:  # protobuf/onnx raise many types for a corrupt file
            raise OnnxpipeError(f"{src.model_path}: not a readable ONNX model ({first_line(e)})") from None
        pipeline.own_weights(model)
        form = layerwise.check_form(check_form, pipeline.weight_bytes(model))
        if form == "layerwise":
            lazy = layerwise.lazy_weights(model, src.path)
            if lazy:
                log(f"weights read from {src.path.name}'s external data as needed ({lazy / 1e9:.2f} GB)")
        ctx = PassContext(model_info=dict(manifest.model), target=target, dtype=dtype)
        ctx.graph_notes["padding_side"] = manifest.graph.get("padding_side", "left")  # a pass may change it
        # the check feeds the candidate padded on the side its graph notes say (right once attention.py has made the
        # CUDA form); the reference is always left-padded
        checker = pipeline.Checker(manifest, dtype, providers, decode_steps, ctx, log, form) if verify else None
        on = "" if not verify or target == "cpu" or providers[0] != "CPUExecutionProvider" else (
            " on the CPU EP: this onnxruntime has no CUDA EP")
        remove_stale_temp(out_dir)  # what killed runs left beside this output (never a user's directory)
        log(f"optimizing {src.path} at level {level} for {target} ({len(selected)} passes"
            f"{', each checked' + on + (' layer by layer' if form == 'layerwise' else '') if verify else ', unchecked'})")
        model, reports, final = _run(model, selected, ctx, checker, log, progress)
        _check_io_unchanged(model, manifest)
        if final is not None:
            log(f"final check vs {src.path.name}: {final.summary()}")
            if not final.passed:
                raise OnnxpipeError(f"final parity check failed: rel err {final.rel_err:.3g} > {final.tolerance:g}; "
                                    "nothing was written")

        params = {"source": str(src.path.absolute()), "level": level, "target": target,
                  "passes": [p.name for p in selected], "verify": verify,
                  "check_sides": "reference ORT_DISABLE_ALL, candidate ORT_ENABLE_ALL",
                  "check_form": form if verify else None,
                  "check_providers": providers if verify else None,
                  "check_padding": {"reference": "left", "candidate": ctx.graph_notes.get("padding_side", "left")}}
        weights = pipeline.weight_bytes(model)
        log(f"writing {out_dir} (~{weights / 1e9:.2f} GB of weights)")
        try:
            _write_output(model, src, out_dir, force, ctx, params, reports, final, time.perf_counter() - start)
        except (OSError, MemoryError) as e:
            err = pipeline.resource_error(e, "writing", None, weights, out_dir)
            if err is None:
                raise
            raise err from None
    return OptimizeResult(ModelDir.open(out_dir), reports, final, time.perf_counter() - start)


def _write_output(model: Any, src: Any, out_dir: Path, force: bool, ctx: Any, params: dict, reports: list,
                  final: Any, seconds: float) -> None:
    """The output directory: the graph, the input's sidecar files, and its manifest with the optimize step."""
    from onnxpipe.artifact import atomic_output_dir, copy_sidecar_files, derive_manifest, write_manifest

    manifest = derive_manifest(src.manifest)
    notes = dict(ctx.graph_notes)
    shares = notes.pop("shares_buffer", None)
    manifest.graph.update(notes)
    manifest.graph.setdefault("padding_side", "left")
    manifest.graph["kv"].setdefault("shares_buffer", False)
    if shares is not None:
        manifest.graph["kv"]["shares_buffer"] = bool(shares)
    manifest.graph["fused_ops"] = sorted({n.op_type for n in model.graph.all_nodes() if n.domain == "com.microsoft"})
    manifest.graph["target"] = ctx.target
    with atomic_output_dir(out_dir, force=force, inputs=[src.path]) as tmp:
        manifest.graph["external_data"] = _save(model, tmp)
        copy_sidecar_files(src.path, tmp)
        manifest.steps.append({
            "stage": "optimize",
            "params": params,
            "versions": _versions(),
            "seconds": round(seconds, 2),
            "passes": [r.to_json() for r in reports],
            "check": final.to_json() if final is not None else None,
        })
        write_manifest(tmp, manifest)
        write_genai_config(tmp, manifest)


def _save(model: Any, directory: Path) -> str | None:
    """The graph as artifact.save_onnx writes it (external data past its threshold), an inline one streamed one
    weight at a time (pipeline.save_inline) instead of serialized whole. Returns the external data file's name."""
    from onnxpipe import artifact
    from onnxpipe.fusion import pipeline

    if pipeline.weight_bytes(model) > artifact.EXTERNAL_DATA_THRESHOLD:
        return artifact.save_onnx(model, directory, threshold=artifact.EXTERNAL_DATA_THRESHOLD)
    pipeline.save_inline(model, directory / artifact.MODEL_FILE)
    return None


def _run(model: Any, selected: list, ctx: Any, checker: Any, log: Callable[[str], None],
         progress: Callable[[str, int, int], None] | None = None) -> tuple[Any, list, Any]:
    """The passes, then the final check of the result against the input as loaded (the first snapshot, which
    shares the input's tensors: the input is never read twice)."""
    from onnxpipe.fusion import pipeline

    weights = pipeline.weight_bytes(model)
    initial = pipeline.take_snapshot(model, "snapshotting the input", None, weights)
    model, reports = pipeline.run_passes(model, selected, ctx, checker, log=log, initial=initial, progress=progress)
    final = None
    if checker is not None:
        log("final check: the result against the input")
        result = pipeline.take_snapshot(model, "snapshotting the result", None, weights)
        try:
            final = checker.check(initial, result)
        except Exception as e:
            err = pipeline.resource_error(e, "in the final check", None, weights)
            if err is None:
                raise
            raise err from None
    return model, reports, final


def _providers(target: str, verify: bool) -> list[str]:
    import onnxruntime as ort

    if target == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        # the fused CUDA-form ops (GroupQueryAttention with packed QKV and rotary, right padding) also run on ORT's
        # CPU EP: the checks then prove the rewrite's numerics, not the CUDA kernels (the manifest says which EP)
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _check_io_unchanged(model: Any, manifest: Any) -> None:
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    if inputs != manifest.input_names or outputs != manifest.output_names:
        raise OnnxpipeError("internal error: a pass changed the graph's input/output names; nothing was written")


def _versions() -> dict[str, str]:
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript

    import onnxpipe

    return {"onnxpipe": onnxpipe.__version__, "onnx": onnx.__version__, "onnx_ir": onnx_ir.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def format_table(result: OptimizeResult) -> str:
    """A short terminal table: one row per pass."""
    rows = [("pass", "status", "nodes", "fused", "rel err", "greedy")]
    for r in result.passes:
        fused = "; ".join(f"{k} {v}" for k, v in r.fused.items() if isinstance(v, str))
        rel = f"{r.check['rel_err']:.2g}" if r.check else "-"
        greedy = f"{r.check['greedy_agreement']:.0%}" if r.check else "-"
        status = r.status if not r.reason else f"{r.status}: {r.reason[:60]}"
        rows.append((r.name, status, f"{r.nodes_before}->{r.nodes_after}", fused or "-", rel, greedy))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if result.check is not None:
        lines.append(f"final vs input: {result.check.summary()}")
    return "\n".join(lines)


def __getattr__(name: str) -> Any:
    if name == "PASS_NAMES":
        from onnxpipe.fusion.pipeline import PASS_NAMES

        return PASS_NAMES
    raise AttributeError(name)
