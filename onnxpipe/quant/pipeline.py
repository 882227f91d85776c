"""quantize: one model directory in (exported or optimized), one quantized model directory out, with its quality.

The order is: check every input (files, options, tokenizer, calibration text) before any work; make the weights
visible (graph.py); run the mode; measure the result against its input model on held-out text (quality.py) and
on the decode path (parity.py); refuse to write anything if perplexity rose more than allowed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onnxpipe.artifact import (
    MODEL_FILE,
    Manifest,
    ModelDir,
    atomic_output_dir,
    check_output_dir,
    copy_sidecar_files,
    derive_manifest,
    tensor_signature,
    write_manifest,
)
from onnxpipe.errors import OnnxpipeError
from onnxpipe.genai_config import write_genai_config
from onnxpipe.outputs import check_io_paths
from onnxpipe.quant.calibration import CalibrationConfig

MODES = ("dynamic", "static", "int4", "fp16")
METHODS = ("minmax", "entropy", "percentile")
ALGOS = ("rtn", "gptq", "hqq")
ACTIVATION_SCALES = ("auto", "token", "tensor")
LM_HEAD_CHOICES = ("auto", "fp32", "int8", "int4")
EMBEDDING_CHOICES = ("auto", "fp32", "int8")
REPO_ROOT = Path(__file__).resolve().parents[2]

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass
class QuantizeConfig:
    mode: str
    calibration: Path | None = None
    method: str = "minmax"  # static: the activation range calibrator
    per_channel: bool = False  # static: per-output-channel weight scales (dynamic is always per channel)
    static_float_layers: int = 0  # static: leave the N layers with the widest calibrated input range in fp32
    # dynamic: one run-time activation scale per token ("token"), per tensor (ORT's, "tensor"), or chosen per layer
    # from the calibration text's prefills ("auto", dynamic.py)
    activations: str = "auto"
    token_threshold: float | None = None  # dynamic auto: dynamic.TOKEN_THRESHOLD unless set
    # static, dynamic: SmoothQuant migration strength alpha in (0, 1]; static also "auto" (layer_alpha.py: one
    # alpha per smoothing group, chosen by that group's int8 output error on held-out calibration windows)
    smoothquant: float | str | None = None
    block_size: int = 32  # int4: weights per scale along the input dimension; 0: per output channel (int4.py)
    algo: str = "rtn"  # int4: rtn | gptq | hqq
    accuracy_level: int = 4  # int4: MatMulNBits compute type; 4 = int8 activations (fast on CPU)
    symmetric: bool = False  # int4 rtn: a grid centred on 0, no zero points (faster CUDA kernel)
    float_zero_points: bool = False  # int4 rtn/gptq: each block's exact min-max grid (gptq.group_params exact)
    lm_head: str = "auto"  # auto/int8: 8-bit per vocabulary row (embedding.py); fp32; int4 (int4 mode only)
    embeddings: str = "auto"  # auto/int8: token table 8-bit per row, shared with a tied head; fp32
    eval_file: Path | None = None
    max_eval_tokens: int | None = None
    eval_context: int | None = None
    max_ppl_increase: float | None = None  # percent
    calib: CalibrationConfig = field(default_factory=CalibrationConfig)

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"mode": self.mode, "lm_head": self.lm_head, "embeddings": self.embeddings}
        if self.mode == "dynamic":
            p.update(activations=self.activations, smoothquant=self.smoothquant)
            if self.activations == "auto":
                p.update(token_threshold=self.token_threshold)
        if self.mode == "static":
            p.update(method=self.method, per_channel=self.per_channel, smoothquant=self.smoothquant,
                     static_float_layers=self.static_float_layers)
        if self.mode == "int4":
            p.update(algo=self.algo, block_size=self.block_size, accuracy_level=self.accuracy_level,
                     symmetric=self.symmetric, float_zero_points=self.float_zero_points)
        if self.needs_calibration():
            p.update(calibration=str(self.calibration), calibration_config=self.calib.to_json())
        p.update(eval_file=str(self.eval_file) if self.eval_file else None, max_eval_tokens=self.max_eval_tokens,
                 max_ppl_increase=self.max_ppl_increase)
        return p

    def needs_calibration(self) -> bool:
        return (self.mode == "static" or (self.mode == "int4" and self.algo == "gptq")
                or (self.mode == "dynamic" and (self.activations == "auto" or self.smoothquant is not None)))


@dataclass
class QuantizeResult:
    model_dir: ModelDir
    step: dict[str, Any]
    seconds: float


def validate(cfg: QuantizeConfig) -> None:
    """Every option checked before any work; each problem one line."""
    if cfg.mode not in MODES:
        raise OnnxpipeError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    if cfg.method not in METHODS:
        raise OnnxpipeError(f"unknown calibration method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.algo not in ALGOS:
        raise OnnxpipeError(f"unknown int4 algorithm {cfg.algo!r}; choose one of {', '.join(ALGOS)}")
    if cfg.activations not in ACTIVATION_SCALES:
        raise OnnxpipeError(f"unknown activation scale {cfg.activations!r}; choose one of {', '.join(ACTIVATION_SCALES)}")
    if cfg.lm_head not in LM_HEAD_CHOICES:
        raise OnnxpipeError(f"unknown --lm-head {cfg.lm_head!r}; choose one of {', '.join(LM_HEAD_CHOICES)}")
    needs_calibration = cfg.mode == "static" or (cfg.mode == "int4" and cfg.algo == "gptq")
    if needs_calibration and cfg.calibration is None:
        what = "static quantization" if cfg.mode == "static" else "int4 with --algo gptq"
        raise OnnxpipeError(f"{what} needs calibration text: pass --calibration FILE (text or JSONL), e.g. data/calibration.txt")
    if cfg.smoothquant is not None:
        if cfg.mode not in ("static", "dynamic"):
            raise OnnxpipeError("--smoothquant applies to --mode static and dynamic only")
        if cfg.smoothquant == "auto":
            if cfg.mode != "static":
                raise OnnxpipeError("--smoothquant auto applies to --mode static; pass an alpha in (0, 1] for dynamic")
        elif isinstance(cfg.smoothquant, str) or not 0.0 < cfg.smoothquant <= 1.0:
            raise OnnxpipeError(f"--smoothquant alpha must be in (0, 1] or auto, got {cfg.smoothquant}")
    if cfg.block_size != 0 and (cfg.block_size < 16 or cfg.block_size & (cfg.block_size - 1)):
        raise OnnxpipeError(f"--block-size must be a power of two >= 16, or 0 for per channel; got {cfg.block_size}")
    if cfg.mode == "int4" and cfg.block_size == 0 and cfg.algo == "hqq":
        raise OnnxpipeError("--block-size 0 (per channel) supports --algo rtn and gptq, not hqq")
    if cfg.symmetric and not (cfg.mode == "int4" and cfg.algo == "rtn" and cfg.block_size != 0):
        raise OnnxpipeError("--symmetric applies to --mode int4 --algo rtn with a block size (not per channel)")
    if cfg.float_zero_points and not (cfg.mode == "int4" and cfg.algo in ("rtn", "gptq") and cfg.block_size != 0
                                      and not cfg.symmetric):
        raise OnnxpipeError("--zero-points float applies to --mode int4 --algo rtn or gptq with a block size, "
                            "without --symmetric (hqq writes float zero points of its own)")
    if cfg.static_float_layers < 0:
        raise OnnxpipeError(f"--static-float-layers must be >= 0, got {cfg.static_float_layers}")
    if cfg.static_float_layers and cfg.mode != "static":
        raise OnnxpipeError("--static-float-layers applies to --mode static only")
    if cfg.accuracy_level not in (0, 1, 2, 3, 4):
        raise OnnxpipeError(f"--accuracy-level must be 0..4, got {cfg.accuracy_level}")
    if cfg.max_ppl_increase is not None and cfg.max_ppl_increase < 0:
        raise OnnxpipeError(f"--max-ppl-increase must be >= 0 (percent), got {cfg.max_ppl_increase}")
    if cfg.embeddings not in EMBEDDING_CHOICES:
        raise OnnxpipeError(f"unknown --embeddings {cfg.embeddings!r}; choose one of {', '.join(EMBEDDING_CHOICES)}")
    if cfg.mode == "fp16" and "int8" in (cfg.lm_head, cfg.embeddings):
        raise OnnxpipeError("--mode fp16 keeps the LM head and embeddings in fp16; drop --lm-head/--embeddings int8")
    if cfg.lm_head == "int4" and cfg.mode != "int4":
        raise OnnxpipeError("--lm-head int4 applies to --mode int4 only")


def resolve_eval_file(eval_file: Path | None) -> Path:
    """--eval, else data/eval.txt (in the working directory, then in the source tree) when present."""
    if eval_file is not None:
        if not Path(eval_file).is_file():
            raise OnnxpipeError(f"{eval_file}: no such eval file")
        return Path(eval_file)
    for candidate in (Path("data/eval.txt"), REPO_ROOT / "data" / "eval.txt"):
        if candidate.is_file():
            return candidate
    raise OnnxpipeError("no eval text: data/eval.txt is not here; pass --eval FILE (held-out text or JSONL)")


def quantize_model(
    in_dir: str | Path,
    out_dir: str | Path,
    mode: str = "dynamic",
    *,
    force: bool = False,
    log: Log = lambda msg: None,
    progress: Progress | None = None,
    **options: Any,
) -> QuantizeResult:
    """Quantize the model directory ``in_dir`` into ``out_dir``; options are QuantizeConfig's fields."""
    start = time.perf_counter()
    cfg = QuantizeConfig(mode=mode, **options)
    validate(cfg)
    src = ModelDir.open(in_dir)
    refuse_quantized_input(src)
    cfg = _for_input_dtype(cfg, src)
    out_dir = Path(out_dir)
    check_io_paths([src.path], out_dir)
    check_output_dir(out_dir, force)
    samples, eval_ids, context = _read_texts(src, cfg, log)

    with atomic_output_dir(out_dir, force=force, inputs=[src.path]) as tmp:
        details = _run_mode(src, tmp / MODEL_FILE, cfg, samples, log, progress)
        copy_sidecar_files(src.path, tmp)
        manifest = _output_manifest(src.manifest, tmp / MODEL_FILE, cfg)
        check = _decode_check(src, tmp / MODEL_FILE, manifest, cfg)
        log(f"decode-path check vs input: {check.summary()}")
        log(f"measuring quality on {cfg.eval_file} ({len(eval_ids)} tokens, windows of {context})...")
        from onnxpipe.quant.quality import quality_report

        quality = quality_report(
            src.model_path, tmp / MODEL_FILE, src.manifest, manifest, eval_ids, context, str(cfg.eval_file),
            progress=(lambda d, t: progress("evaluating", d, t)) if progress else None,
        )
        log(f"quality: {quality.summary()}")
        if check.passed is False:
            raise OnnxpipeError(
                f"decode-path check failed: rel err {check.rel_err:.3g} > {check.tolerance:g}; nothing was written"
            )
        if cfg.max_ppl_increase is not None and quality.ppl_change_pct > cfg.max_ppl_increase:
            raise OnnxpipeError(
                f"perplexity rose {quality.ppl_change_pct:.2f}% ({quality.ppl_before:.3f} -> {quality.ppl_after:.3f}), "
                f"more than --max-ppl-increase {cfg.max_ppl_increase:g}%; nothing was written"
            )
        step = {
            "stage": "quantize",
            "params": cfg.params(),
            "details": details,
            "quality": quality.to_json(),
            "check": check.to_json(),
            "versions": _versions(),
            "seconds": round(time.perf_counter() - start, 2),
        }
        manifest.steps.append(step)
        write_manifest(tmp, manifest)
        write_genai_config(tmp, manifest)
    return QuantizeResult(ModelDir.open(out_dir), step, time.perf_counter() - start)


def _read_texts(src: ModelDir, cfg: QuantizeConfig, log: Log) -> tuple[np.ndarray | None, np.ndarray, int]:
    """Calibration samples (when the mode needs them) and eval token ids, read and checked before any work."""
    from onnxpipe.quant.calibration import calibration_samples
    from onnxpipe.quant.quality import default_context
    from onnxpipe.quant.text import load_tokenizer, read_documents, tokenize_documents

    cfg.eval_file = resolve_eval_file(cfg.eval_file)
    tokenizer = load_tokenizer(src.path)
    samples = None
    if cfg.mode == "dynamic" and cfg.needs_calibration() and cfg.calibration is None:
        cfg.calibration = default_calibration_file()
    if cfg.calibration is not None and cfg.needs_calibration():
        samples = calibration_samples(tokenizer, cfg.calibration, cfg.calib)
        log(f"calibration: {len(samples)} samples of {cfg.calib.sample_len} tokens from {cfg.calibration}")
    eval_ids = tokenize_documents(tokenizer, read_documents(cfg.eval_file, "eval"), cfg.max_eval_tokens)
    if len(eval_ids) < 2:
        raise OnnxpipeError(f"{cfg.eval_file}: the eval file has {len(eval_ids)} tokens; at least 2 are needed")
    return samples, eval_ids, cfg.eval_context or default_context(src.manifest)


def refuse_quantized_input(src: ModelDir) -> None:
    """An input whose manifest has an integer quantize step (dynamic, static, int4) is refused: quantizing it again
    would quantize quantized weights and measure the result against a quantized model. An fp16 directory (a
    quantize --mode fp16 step) is an ordinary input of int4 (the GPU path) and passes."""
    for i, step in enumerate(src.manifest.steps):
        mode = step.get("params", {}).get("mode") if step.get("stage") == "quantize" else None
        if mode is not None and mode != "fp16":
            raise OnnxpipeError(
                f"{src.path} is already quantized (manifest step {i}: quantize --mode {mode}); quantize the fp32 "
                "directory it came from (export or optimize output) instead")


def _for_input_dtype(cfg: QuantizeConfig, src: ModelDir) -> QuantizeConfig:
    """fp32 input: every mode. fp16 input (the GPU path): int4 only, weights to MatMulNBits with fp16 scales and
    fp16 activations; the LM head and the token table stay fp16 unless --lm-head int4 (the 8-bit vocabulary
    tables are an fp32-graph form)."""
    import dataclasses

    dtype = src.manifest.graph.get("dtype", "fp32")
    if dtype == "fp32":
        return cfg
    if dtype != "fp16" or cfg.mode != "int4":
        raise OnnxpipeError(f"{src.path} is {dtype}; quantize from an fp32 model directory (export or optimize "
                            "with --dtype fp32); an fp16 one takes --mode int4 only")
    if "int8" in (cfg.lm_head, cfg.embeddings):
        raise OnnxpipeError("an fp16 input keeps the LM head and embeddings fp16 or puts the head in int4 "
                            "(--lm-head int4); 8-bit vocabulary tables are for fp32 inputs")
    return dataclasses.replace(cfg, lm_head="fp32" if cfg.lm_head == "auto" else cfg.lm_head,
                               embeddings="fp32" if cfg.embeddings == "auto" else cfg.embeddings)


def _run_mode(src: ModelDir, out_path: Path, cfg: QuantizeConfig, samples: np.ndarray | None, log: Log,
              progress: Progress | None) -> dict[str, Any]:
    import onnx

    from onnxpipe.quant.graph import WeightPlan, expose_weights, op_counts

    proto = onnx.load(str(src.model_path))
    before = op_counts(proto)
    logits = src.manifest.graph["logits"]
    if cfg.mode == "fp16":
        from onnxpipe.quant.fp16 import convert_fp16

        details = convert_fp16(proto, out_path, cfg, logits)
    else:
        plan = expose_weights(proto, logits)
        log(f"linear layers: {len(plan.linears)} (LM head {plan.lm_head or 'not found'}), "
            f"lookup tables: {len(plan.embeddings)}; rewrites {plan.rewrites}")
        head_by_tables = cfg.lm_head in ("auto", "int8") and plan.lm_head is not None
        body = WeightPlan([n for n in plan.linears if n != plan.lm_head], None, plan.embeddings, plan.rewrites) \
            if head_by_tables else plan
        if cfg.mode == "dynamic":
            from onnxpipe.quant.calibration import feed_count
            from onnxpipe.quant.dynamic import quantize_dynamic_int8

            feeds = None
            if cfg.needs_calibration():
                feeds = list(_prefill_feeds(src.manifest, samples, cfg, "calibration prefills", progress))
            smoothing = None
            if cfg.smoothquant is not None:
                proto, smoothing = _smooth(proto, body, cfg.smoothquant, feeds, logits, log)
            details = quantize_dynamic_int8(proto, out_path, body, lm_head=cfg.lm_head, activations=cfg.activations,
                                            feeds=feeds if cfg.activations == "auto" else None,
                                            threshold=cfg.token_threshold, logits=logits)
            if smoothing is not None:
                details["smoothquant"] = smoothing
            if cfg.activations == "auto":
                details["calibration_feeds"] = feed_count(samples, cfg.calib, decode=False)
                _log_activation_choice(details, log)
        elif cfg.mode == "static":
            from onnxpipe.quant.static import quantize_static_int8

            if cfg.smoothquant == "auto":
                details = _static_alpha_search(proto, out_path, body, src, samples, cfg, log, progress)
            else:
                details = quantize_static_int8(proto, out_path, body, src.manifest, samples, cfg, log, progress)
        else:
            from onnxpipe.quant.int4 import quantize_int4

            details = quantize_int4(proto, out_path, body, src.manifest, samples, cfg, log, progress)
        details["plan"] = plan.to_json()
        tables = _vocab_tables(out_path, plan.lm_head if head_by_tables else None, src.manifest, cfg)
        if tables is not None:
            log(f"vocabulary tables: LM head {tables.lm_head or 'left to the mode'}, {len(tables.embeddings)} token "
                f"lookup(s) int8 per row (block {tables.block_size}, max abs err {tables.max_abs_err:.3g})")
            details["vocab_tables"] = tables.to_json()
            details["lm_head"] = tables.lm_head or details.get("lm_head")
            details["embeddings"] = "int8 per row" if tables.embeddings else "float"
    after = op_counts(onnx.load(str(out_path), load_external_data=False))
    details["ops_before"], details["ops_after"] = before, after
    changed = {k: f"{before.get(k, 0)} -> {after.get(k, 0)}" for k in sorted(set(before) | set(after))
               if before.get(k, 0) != after.get(k, 0)}
    log(f"ops changed: {', '.join(f'{k} {v}' for k, v in changed.items()) or 'none'}")
    return details


def _static_alpha_search(proto: Any, out_path: Path, body: Any, src: ModelDir, samples: np.ndarray,
                         cfg: QuantizeConfig, log: Log, progress: Progress | None) -> dict[str, Any]:
    """--smoothquant auto: each smoothing group's alpha chosen by its own int8 output error on calibration
    windows its scales and ranges were not fitted on (layer_alpha.py), then static int8 with those alphas."""
    import dataclasses

    from onnxpipe.quant import layer_alpha
    from onnxpipe.quant.calibration import counted, feed_count, kv_feeds
    from onnxpipe.quant.graph import float_session
    from onnxpipe.quant.static import quantize_static_int8, static_nodes

    total = feed_count(samples, cfg.calib)
    feeds = counted(kv_feeds(float_session(proto), src.manifest, samples, cfg.calib), total,
                    "smoothquant alpha per group", progress)
    choice = layer_alpha.choose_group_alphas(proto, static_nodes(body, cfg), feeds, total, method=cfg.method)
    log(f"SmoothQuant alpha per group ({choice.folds}-fold over the calibration batches): {choice.summary()}")
    details = quantize_static_int8(proto, out_path, body, src.manifest, samples,
                                   dataclasses.replace(cfg, smoothquant=choice.alphas), log, progress)
    details["smoothquant_search"] = choice.to_json()
    return details


def _smooth(proto: Any, body: Any, alpha: float, feeds: list[dict[str, np.ndarray]], logits: str,
            log: Log) -> tuple[Any, dict[str, Any]]:
    """SmoothQuant before dynamic int8: channel outliers moved into the weights (statistics from the calibration
    prefills), checked to leave the float model's logits unchanged."""
    from onnxpipe.quant.smoothquant import smooth_model

    nodes = body.linears
    proto, report = smooth_model(proto, nodes, alpha, feeds, feeds[0], logits)
    log(f"SmoothQuant alpha {alpha}: {report.groups} groups ({report.folded} folded into norms, "
        f"{report.inserted_muls} Mul inserted); worst channel outlier ratio {report.outlier_ratio_before:.1f} -> "
        f"{report.outlier_ratio_after:.1f}; float equivalence rel err {report.equivalence_rel_err:.2g}")
    return proto, report.to_json()


def _log_activation_choice(details: dict[str, Any], log: Log) -> None:
    search = details.get("activation_search")
    if search:
        tried = ", ".join(f"{c['per_token_nodes']} per token"
                          + (f" + {c['float_nodes']} float" if c.get("float_nodes") else "")
                          + f": {c['calibration_ppl_change_pct']:+.2f}%" for c in search["candidates"])
        log(f"activation scales (calibration perplexity vs float; budget {search['budget_pct']:g}%): {tried}")
    t = details["activation_threshold"]
    log(f"activation scales: per token for {details['per_token_nodes']} of {details['quantized_nodes']} layers "
        f"(inputs whose error under one per-tensor scale > {'inf' if t is None else f'{t:g}'}), per tensor for the rest"
        + (f"; left float: {', '.join(details['float_nodes'])}" if details.get("float_nodes") else ""))


def default_calibration_file() -> Path:
    """data/calibration.txt (in the working directory, then in the source tree), for modes that can do without
    --calibration (dynamic with activations="auto")."""
    for candidate in (Path("data/calibration.txt"), REPO_ROOT / "data" / "calibration.txt"):
        if candidate.is_file():
            return candidate
    raise OnnxpipeError("dynamic int8 chooses activation scales from calibration text, and data/calibration.txt is "
                        "not here: pass --calibration FILE, or --activations token|tensor")


def _prefill_feeds(manifest: Manifest, samples: np.ndarray, cfg: QuantizeConfig, label: str,
                   progress: Progress | None) -> Any:
    """The calibration samples' prefills, cfg.calib.batch_size at a time (lazily)."""
    from onnxpipe.quant.calibration import counted, feed_count
    from onnxpipe.quant.quality import prefill_feed

    prefill, batch = cfg.calib.prefill_len, cfg.calib.batch_size
    return counted((prefill_feed(manifest, samples[b:b + batch, :prefill]) for b in range(0, len(samples), batch)),
                   feed_count(samples, cfg.calib, decode=False), label, progress)


def _vocab_tables(model_path: Path, head: str | None, manifest: Manifest, cfg: QuantizeConfig) -> Any:
    """After the mode (which left them alone): the LM head and token lookups as 8-bit per-row tables, one table
    when tied. Done last so that every float check inside a mode (SmoothQuant's equivalence) sees float heads."""
    import onnx

    from onnxpipe.quant.embedding import quantize_vocab_tables
    from onnxpipe.quant.graph import save_quantized

    lookups = cfg.embeddings in ("auto", "int8")
    if head is None and not lookups:
        return None
    proto = onnx.load(str(model_path))
    level = cfg.accuracy_level if cfg.mode == "int4" else 4
    report = quantize_vocab_tables(proto, head, int(manifest.model["vocab_size"]), head is not None, lookups, level)
    save_quantized(proto, model_path)
    return report


def _output_manifest(src: Manifest, model_path: Path, cfg: QuantizeConfig) -> Manifest:
    """The input's manifest with the graph's I/O, opset and dtypes re-read from what was written."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    manifest = derive_manifest(src)
    g = manifest.graph
    g["inputs"] = [tensor_signature(t) for t in proto.graph.input]
    g["outputs"] = [tensor_signature(t) for t in proto.graph.output]
    g["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), g.get("opset"))
    data = MODEL_FILE + ".data"
    g["external_data"] = data if (model_path.parent / data).exists() else None
    if cfg.mode == "fp16":
        g["dtype"] = "fp16"
        g["kv"]["dtype"] = "fp16"
    g["quantization"] = {"dynamic": "int8 weights, dynamic int8 activations", "static": "int8 QDQ",
                         "int4": "int4 weight-only (MatMulNBits)" if cfg.block_size else "int4 weight-only (uint4 DequantizeLinear per channel -> MatMul)", "fp16": "fp16 mixed precision"}[cfg.mode]
    return manifest


def _decode_check(src: ModelDir, model_path: Path, manifest: Manifest, cfg: QuantizeConfig) -> Any:
    """Prefill + decode steps on a padded batch (the input's padding side) against the input model
    (parity.check_decoders).

    fp16 is judged with the fp16 tolerance; integer modes are recorded only, and judged by the quality report.
    """
    from onnxpipe.parity import TOLERANCE, check_decoders, ort_step_fn, reference_session
    from onnxpipe.quant.quality import measure_session

    def kv_dtype(m: Manifest) -> np.dtype:
        dtypes = {t["name"]: t["dtype"] for t in m.graph["inputs"]}
        return np.dtype(dtypes[m.past_names(0)[0]])

    ref = ort_step_fn(reference_session(src.model_path), src.manifest)
    cand = ort_step_fn(measure_session(model_path), manifest)
    side = src.manifest.graph.get("padding_side", "left")  # quantizing keeps the input's padding side
    report = check_decoders(ref, cand, manifest, kv_dtype=kv_dtype(manifest), ref_kv_dtype=kv_dtype(src.manifest),
                            padding_side=side, reference_padding_side=side)
    if cfg.mode == "fp16" and src.manifest.graph.get("dtype") == "fp32":
        report.judge(TOLERANCE["fp16"])
    return report


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    import onnxpipe

    return {"onnxpipe": onnxpipe.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def describe_result(result: QuantizeResult) -> str:
    q = result.step["quality"]
    return (
        f"{result.model_dir.path}: {result.step['params']['mode']}; perplexity {q['ppl_before']:.3f} -> "
        f"{q['ppl_after']:.3f} ({q['ppl_change_pct']:+.2f}%), top-1 agreement {q['top1_agreement']:.1%}, "
        f"mean KL {q['mean_kl']:.3g}, size {q['size_before'] / 1e6:.2f} -> {q['size_after'] / 1e6:.2f} MB"
    )


__all__ = ["MODES", "QuantizeConfig", "QuantizeResult", "describe_result", "quantize_model"]
