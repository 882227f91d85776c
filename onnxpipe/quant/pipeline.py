"""quantize: one model directory in (exported or optimized), one quantized model directory out, with its quality.

The order is: check every input (files, options, tokenizer, calibration text) before any work; make the weights
visible (graph.py); run the mode; measure the result against its input model on held-out text (quality.py) and
on the decode path (parity.py); refuse to write anything if perplexity rose more than allowed.
"""

from __future__ import annotations

import math
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
from onnxpipe.quant.quality import MIN_EVAL_TOKENS

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
    # static: the four below left None are chosen by the default (static.static_candidates); a value pins it
    method: str | None = None  # static: the activation range calibrator
    per_channel: bool | None = None  # static: per-output-channel weight scales (dynamic is always per channel)
    static_float_layers: int | None = None  # static: leave the N layers with the widest calibrated input range in fp32
    # dynamic: one run-time activation scale per token ("token"), per tensor (ORT's, "tensor"), or chosen per layer
    # from the calibration text's prefills ("auto", dynamic.py)
    activations: str = "auto"
    token_threshold: float | None = None  # dynamic auto: dynamic.TOKEN_THRESHOLD unless set
    # static, dynamic: SmoothQuant migration strength alpha in (0, 1]; static also "auto" (layer_alpha.py: one
    # alpha per smoothing group, chosen by that group's int8 output error on held-out calibration windows); "off"
    # pins none (static's default may otherwise choose "auto")
    smoothquant: float | str | None = None
    # int4: the three below left None are chosen by the default (int4.int4_candidates); a value pins it
    block_size: int | None = None  # int4: weights per scale along the input dimension; 0: per output channel (int4.py)
    algo: str | None = None  # int4: rtn | gptq | hqq
    accuracy_level: int = 4  # int4: MatMulNBits compute type; 4 = int8 activations (fast on CPU)
    symmetric: bool = False  # int4 rtn: a grid centred on 0, no zero points (faster CUDA kernel)
    float_zero_points: bool | None = None  # int4 rtn/gptq: each block's exact min-max grid (gptq.group_params exact)
    lm_head: str = "auto"  # auto/int8: 8-bit per vocabulary row (embedding.py); fp32; int4 (int4 mode only)
    embeddings: str = "auto"  # auto/int8: token table 8-bit per row, shared with a tied head; fp32
    eval_file: Path | None = None
    max_eval_tokens: int | None = None  # the report's tokens; quality.DEFAULT_EVAL_TOKENS unless set
    eval_context: int | None = None
    max_ppl_increase: float | None = None  # percent; quality.DEFAULT_BUDGET_PCT[mode] unless set
    min_greedy_agreement: float | None = None  # fraction; quality.MIN_GREEDY_AGREEMENT unless set
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
                 max_ppl_increase=self.max_ppl_increase, min_greedy_agreement=self.min_greedy_agreement)
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
    if cfg.method is not None and cfg.method not in METHODS:
        raise OnnxpipeError(f"unknown calibration method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.algo is not None and cfg.algo not in ALGOS:
        raise OnnxpipeError(f"unknown int4 algorithm {cfg.algo!r}; choose one of {', '.join(ALGOS)}")
    if cfg.activations not in ACTIVATION_SCALES:
        raise OnnxpipeError(f"unknown activation scale {cfg.activations!r}; choose one of {', '.join(ACTIVATION_SCALES)}")
    if cfg.lm_head not in LM_HEAD_CHOICES:
        raise OnnxpipeError(f"unknown --lm-head {cfg.lm_head!r}; choose one of {', '.join(LM_HEAD_CHOICES)}")
    needs_calibration = cfg.mode == "static" or (cfg.mode == "int4" and cfg.algo == "gptq")
    if needs_calibration and cfg.calibration is None:
        what = "static quantization" if cfg.mode == "static" else "int4 with --algo gptq"
        raise OnnxpipeError(f"{what} needs calibration text: pass --calibration FILE (text or JSONL), e.g. data/calibration.txt")
    if cfg.smoothquant is not None and cfg.smoothquant != "off":
        if cfg.mode not in ("static", "dynamic"):
            raise OnnxpipeError("--smoothquant applies to --mode static and dynamic only")
        if cfg.smoothquant == "auto":
            if cfg.mode != "static":
                raise OnnxpipeError("--smoothquant auto applies to --mode static; pass an alpha in (0, 1] for dynamic")
        elif isinstance(cfg.smoothquant, str) or not 0.0 < cfg.smoothquant <= 1.0:
            raise OnnxpipeError(f"--smoothquant alpha must be in (0, 1] or auto, got {cfg.smoothquant}")
    if cfg.block_size not in (None, 0) and (cfg.block_size < 16 or cfg.block_size & (cfg.block_size - 1)):
        raise OnnxpipeError(f"--block-size must be a power of two >= 16, or 0 for per channel; got {cfg.block_size}")
    if cfg.mode == "int4" and cfg.block_size == 0 and cfg.algo == "hqq":
        raise OnnxpipeError("--block-size 0 (per channel) supports --algo rtn and gptq, not hqq")
    if cfg.symmetric and not (cfg.mode == "int4" and cfg.algo in (None, "rtn") and cfg.block_size != 0):
        raise OnnxpipeError("--symmetric applies to --mode int4 --algo rtn with a block size (not per channel)")
    if cfg.float_zero_points and not (cfg.mode == "int4" and cfg.algo in (None, "rtn", "gptq") and cfg.block_size != 0
                                      and not cfg.symmetric):
        raise OnnxpipeError("--zero-points float applies to --mode int4 --algo rtn or gptq with a block size, "
                            "without --symmetric (hqq writes float zero points of its own)")
    if cfg.static_float_layers is not None and cfg.static_float_layers < 0:
        raise OnnxpipeError(f"--static-float-layers must be >= 0, got {cfg.static_float_layers}")
    if cfg.smoothquant == "off" and cfg.mode not in ("static", "dynamic"):
        raise OnnxpipeError("--smoothquant applies to --mode static and dynamic only")
    if cfg.static_float_layers and cfg.mode != "static":
        raise OnnxpipeError("--static-float-layers applies to --mode static only")
    if cfg.accuracy_level not in (0, 1, 2, 3, 4):
        raise OnnxpipeError(f"--accuracy-level must be 0..4, got {cfg.accuracy_level}")
    if cfg.max_ppl_increase is not None and not (math.isfinite(cfg.max_ppl_increase) and cfg.max_ppl_increase >= 0):
        raise OnnxpipeError(f"--max-ppl-increase must be a finite number >= 0 (percent), got {cfg.max_ppl_increase}")
    if cfg.min_greedy_agreement is not None and not 0.0 <= cfg.min_greedy_agreement <= 1.0:
        raise OnnxpipeError(f"--min-greedy-agreement must be in [0, 100] (percent), got {cfg.min_greedy_agreement * 100:g}")
    if cfg.max_eval_tokens is not None and cfg.max_eval_tokens < MIN_EVAL_TOKENS:
        raise OnnxpipeError(f"--eval-tokens must be at least {MIN_EVAL_TOKENS} (fewer make the perplexity change "
                            f"mostly noise), got {cfg.max_eval_tokens}")
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
    """Quantize the model directory ``in_dir`` into ``out_dir``; options are QuantizeConfig's fields.

    Options left unset are chosen (int4: int4.int4_candidates; static: static.static_candidates; the first within
    the budget on the selection text); the result must pass the gate (quality.Gate) on the report's text, or nothing is written."""
    start = time.perf_counter()
    cfg = QuantizeConfig(mode=mode, **options)
    if cfg.mode == "int4" and cfg.calibration is None and cfg.algo in (None, "gptq"):
        cfg.calibration = find_calibration_file()  # the default may try GPTQ where calibration text is at hand
    validate(cfg)
    cfg = _with_defaults(cfg)
    src = ModelDir.open(in_dir)
    refuse_quantized_input(src)
    cfg = _for_input_dtype(cfg, src)
    out_dir = Path(out_dir)
    check_io_paths([src.path], out_dir)
    check_output_dir(out_dir, force)
    choices = _choices(cfg, src)
    selecting = len(choices) > 1 or (cfg.mode == "dynamic" and cfg.activations == "auto")
    samples, text = _read_texts(src, cfg, any(c.needs_calibration() for c in choices), selecting, log)
    from onnxpipe.quant.quality import Gate, SelectionJudge, eval_provider, quality_report

    provider = eval_provider(src.manifest)
    gate = Gate(cfg.max_ppl_increase, cfg.min_greedy_agreement)
    log(f"{text.describe()}; on {provider}; budget: perplexity +{gate.max_ppl_increase:g}%, decode-path greedy "
        f"agreement >= {gate.min_greedy_agreement:.0%}")
    judge = None if text.select_ids is None else SelectionJudge(
        src.model_path, src.manifest, text.select_ids, text.context, provider, progress)

    with atomic_output_dir(out_dir, force=force, inputs=[src.path]) as tmp:
        if len(choices) > 1:
            cfg, details, choice = _choose(src, tmp, choices, samples, judge, gate, log, progress)
        else:
            cfg, choice = choices[0], None
            details = _run_mode(src, tmp / MODEL_FILE, cfg, samples, log, progress, selection=judge)
        copy_sidecar_files(src.path, tmp)
        manifest = _output_manifest(src.manifest, tmp / MODEL_FILE, cfg)
        check = _decode_check(src, tmp / MODEL_FILE, manifest, cfg)
        judged = "" if check.passed is not None else (" -- recorded, not judged (random prompts; the quality gate "
                                                      "below judges integer modes)")
        log(f"decode-path check vs input: {check.summary()}{judged}")
        log(f"measuring quality on {len(text.report_ids):,} tokens of {text.file} (windows of {text.context})...")
        quality = quality_report(
            src.model_path, tmp / MODEL_FILE, src.manifest, manifest, text.report_ids, text.context, text.file,
            progress=(lambda d, t: progress("quality report", d, t)) if progress else None, provider=provider,
        )
        checks = gate.judge(quality)
        log("quality (report text):\n" + "\n".join(f"  {c.line()}" for c in checks))
        if check.passed is False:
            raise OnnxpipeError(
                f"decode-path check failed: rel err {check.rel_err:.3g} > {check.tolerance:g}; nothing was written"
            )
        failed = [c for c in checks if c.passed is False]
        if failed:
            raise OnnxpipeError(_refusal(failed, quality, gate, cfg, choice))
        step = {
            "stage": "quantize",
            "params": cfg.params(),
            "details": details,
            "quality": quality.to_json(),
            "gate": {"max_ppl_increase": gate.max_ppl_increase, "min_greedy_agreement": gate.min_greedy_agreement,
                     "checks": [c.to_json() for c in checks], "passed": True},
            "check": check.to_json(),
            "versions": _versions(),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if choice is not None:
            step["choice"] = choice
        manifest.steps.append(step)
        write_manifest(tmp, manifest)
        write_genai_config(tmp, manifest)
    return QuantizeResult(ModelDir.open(out_dir), step, time.perf_counter() - start)


def _with_defaults(cfg: QuantizeConfig) -> QuantizeConfig:
    """The values that unset options stand for: the mode's budget, the greedy floor, the report's tokens."""
    import dataclasses

    from onnxpipe.quant.quality import DEFAULT_BUDGET_PCT, DEFAULT_EVAL_TOKENS, MIN_GREEDY_AGREEMENT

    return dataclasses.replace(
        cfg,
        max_ppl_increase=DEFAULT_BUDGET_PCT[cfg.mode] if cfg.max_ppl_increase is None else cfg.max_ppl_increase,
        min_greedy_agreement=MIN_GREEDY_AGREEMENT if cfg.min_greedy_agreement is None else cfg.min_greedy_agreement,
        max_eval_tokens=DEFAULT_EVAL_TOKENS if cfg.max_eval_tokens is None else cfg.max_eval_tokens,
        smoothquant=None if cfg.smoothquant == "off" and cfg.mode != "static" else cfg.smoothquant,
    )


def _choices(cfg: QuantizeConfig, src: ModelDir) -> list[QuantizeConfig]:
    """Every configuration the default may write, fully set, in the order they are tried (one when the options
    leave nothing to choose)."""
    import dataclasses

    if cfg.mode == "static":
        from onnxpipe.quant.static import static_candidates

        return [dataclasses.replace(cfg, method=c.method, per_channel=c.per_channel, smoothquant=c.smoothquant,
                                    static_float_layers=c.float_layers)
                for c in static_candidates(cfg.method, cfg.per_channel, cfg.smoothquant, cfg.static_float_layers)]
    if cfg.mode != "int4":
        return [cfg]
    from onnxpipe.quant.int4 import int4_candidates

    fp32 = src.manifest.graph.get("dtype", "fp32") == "fp32"
    found = int4_candidates(cfg.algo, cfg.block_size, cfg.float_zero_points, symmetric=cfg.symmetric,
                            calibration=cfg.calibration is not None, fp32_weights=fp32)
    return [dataclasses.replace(cfg, algo=c.algo, block_size=c.block_size, float_zero_points=c.float_zero_points)
            for c in found]


def _choose(src: ModelDir, tmp: Path, choices: list[QuantizeConfig], samples: np.ndarray | None, judge: Any,
            gate: Any, log: Log, progress: Progress | None) -> tuple[QuantizeConfig, dict[str, Any], dict[str, Any]]:
    """Each choice built beside the output and scored on the selection text, in order; the first within the gate
    is moved into ``tmp`` and kept. None within it: an error naming the best and how to accept it."""
    import shutil

    from onnxpipe.quant.int4 import Int4Choice
    from onnxpipe.quant.static import CalibrationCache, StaticChoice

    labels = [StaticChoice(c.method, bool(c.per_channel), c.smoothquant, int(c.static_float_layers or 0))
              if c.mode == "static" else Int4Choice(c.algo, c.block_size, bool(c.float_zero_points)) for c in choices]
    log(f"{choices[0].mode}: trying up to {len(choices)} choices in order, keeping the first within the budget on "
        f"the selection text ({len(judge.token_ids):,} tokens): " + "; ".join(c.label() for c in labels))
    log(f"  {'choice':<38} {'ppl change (95%)':>18} {'top-1':>7} {'greedy (ties)':>15} {'size MB':>8}  verdict")
    rows: list[dict[str, Any]] = []
    cache = CalibrationCache(tmp / "calibration-cache") if choices[0].mode == "static" else None
    try:
        return _try_choices(src, tmp, choices, labels, samples, judge, gate, log, progress, rows, cache)
    finally:
        if cache is not None:
            shutil.rmtree(cache.directory, ignore_errors=True)


def _try_choices(src: ModelDir, tmp: Path, choices: list[QuantizeConfig], labels: list[Any],
                 samples: np.ndarray | None, judge: Any, gate: Any, log: Log, progress: Progress | None,
                 rows: list[dict[str, Any]], cache: Any) -> tuple[QuantizeConfig, dict[str, Any], dict[str, Any]]:
    """_choose's loop: each choice made in ``tmp/choice-i`` and judged; the first within the gate moved into
    ``tmp``; none: the error naming the best."""
    import shutil

    for i, (cfg, label) in enumerate(zip(choices, labels)):
        work = tmp / f"choice-{i}"
        work.mkdir()
        if progress:  # quantizing says what it does (GPTQ also counts its layers)
            progress(f"choice {i + 1}/{len(choices)}: quantizing, {label.label()}", 0, 1)
        lines: list[str] = []  # the mode's own lines, shown for the choice that is kept
        try:
            details = _run_mode(src, work / MODEL_FILE, cfg, samples, lines.append, progress, cache=cache)
            score = judge.score(work / MODEL_FILE, _output_manifest(src.manifest, work / MODEL_FILE, cfg),
                                f"selection text, choice {i + 1}/{len(choices)}")
        except OnnxpipeError as e:  # one choice that cannot be made (or run) leaves the others to try
            rows.append({"choice": label.label(), "options": label.options(), "verdict": f"could not be made: {e}"})
            log(f"  {label.label():<38} could not be made: {e}")
            shutil.rmtree(work)
            continue
        finally:
            if progress:
                progress(f"choice {i + 1}/{len(choices)}: quantizing, {label.label()}", 1, 1)
        ppl = gate.ppl_check(score.ppl_change_pct, score.ppl_change_ci95_pct)
        greedy = gate.greedy_check(score.greedy_agreement, score.greedy_agreement_ties, score.greedy_positions)
        ok = bool(ppl.passed and greedy.passed)
        verdict = "within the budget: chosen" if ok else (
            "over the perplexity budget" if not ppl.passed else "greedy agreement collapsed")
        rows.append({"choice": label.label(), "options": label.options(), **score.to_json(), "verdict": verdict})
        log(f"  {label.label():<38} {score.ppl_change_pct:+8.2f}% ± {score.ppl_change_ci95_pct:5.2f}% "
            f"{score.top1_agreement:7.1%} {score.greedy_agreement:7.1%} ({score.greedy_agreement_ties:4.0%}) "
            f"{score.size / 1e6:8.2f}  {verdict}")
        if ok:
            for f in work.iterdir():
                f.rename(tmp / f.name)
            work.rmdir()
            log(f"chose {label.label()}: the first of the {len(choices)} in order of cost and size within "
                f"+{gate.max_ppl_increase:g}% on the selection text")
            for line in lines:
                log(line)
            return cfg, details, {"selection_tokens": int(len(judge.token_ids)), "tried": rows, "chosen": label.label()}
        shutil.rmtree(work)
    scored = [r for r in rows if "ppl_change_pct" in r]
    if not scored:
        raise OnnxpipeError(f"no {choices[0].mode} choice could be made: " + "; ".join(
            f"{r['choice']}: {r['verdict']}" for r in rows) + "; nothing was written")
    best = min(scored, key=lambda r: r["ppl_change_pct"])
    accept = list(best["options"])  # the report may differ a little from the selection: a margin on each
    if best["ppl_change_pct"] > gate.max_ppl_increase:
        accept.append(f"--max-ppl-increase {math.ceil(best['ppl_change_pct'] + best['ppl_change_ci95_pct']) + 1}")
    if best["greedy_agreement_ties"] < gate.min_greedy_agreement:
        accept.append(f"--min-greedy-agreement {max(0, math.floor(100 * best['greedy_agreement_ties']) - 10)}")
    raise OnnxpipeError(
        f"no {choices[0].mode} choice passed the gate on the selection text (perplexity +{gate.max_ppl_increase:g}%, "
        f"greedy agreement >= {gate.min_greedy_agreement:.0%}); the best was {best['choice']} at "
        f"{best['ppl_change_pct']:+.2f}% (greedy agreement {best['greedy_agreement_ties']:.0%} with near ties); "
        f"nothing was written. To accept it: {' '.join(accept)}")


def _refusal(failed: list[Any], quality: Any, gate: Any, cfg: QuantizeConfig, choice: dict[str, Any] | None) -> str:
    """The one-line error of a result that failed the gate on the report's text, with how to accept it."""
    accept = []
    if choice is not None:
        accept += next(r["options"] for r in choice["tried"] if r["choice"] == choice["chosen"])
    if quality.ppl_change_pct > gate.max_ppl_increase:
        accept.append(f"--max-ppl-increase {math.ceil(quality.ppl_change_pct) + 1}")
    if quality.greedy_agreement_ties is not None and quality.greedy_agreement_ties < gate.min_greedy_agreement:
        accept.append(f"--min-greedy-agreement {math.floor(100 * quality.greedy_agreement_ties)}")
    what = "; ".join(f"{c.name} {c.value}: {c.verdict}" for c in failed)
    return f"the quantized model failed the quality gate on the report text: {what}; nothing was written. " \
           f"To accept it: {' '.join(accept)}"


def _read_texts(src: ModelDir, cfg: QuantizeConfig, calibrate: bool, selecting: bool,
                log: Log) -> tuple[np.ndarray | None, Any]:
    """Calibration samples (when a choice needs them) and the eval text split into the report's tokens and the
    selection's (quality.split_eval), read and checked before any work."""
    from onnxpipe.quant.calibration import calibration_samples
    from onnxpipe.quant.quality import DEFAULT_SELECT_TOKENS, default_context, split_eval
    from onnxpipe.quant.text import load_tokenizer, read_documents, tokenize_documents

    cfg.eval_file = resolve_eval_file(cfg.eval_file)
    tokenizer = load_tokenizer(src.path)
    samples = None
    if cfg.mode == "dynamic" and cfg.needs_calibration() and cfg.calibration is None:
        cfg.calibration = default_calibration_file()
    if cfg.calibration is not None and calibrate:
        samples = calibration_samples(tokenizer, cfg.calibration, cfg.calib)
        used_by = " (for the GPTQ choices, tried after RTN's)" if cfg.mode == "int4" and cfg.algo is None else ""
        log(f"calibration: {len(samples)} samples of {cfg.calib.sample_len} tokens from {cfg.calibration}{used_by}")
    report = int(cfg.max_eval_tokens)
    select = min(DEFAULT_SELECT_TOKENS, report) if selecting else 0
    eval_ids = tokenize_documents(tokenizer, read_documents(cfg.eval_file, "eval"), report + select)
    return samples, split_eval(eval_ids, str(cfg.eval_file), cfg.eval_context or default_context(src.manifest),
                               report, select)


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
              progress: Progress | None, selection: Any = None, cache: Any = None) -> dict[str, Any]:
    """``selection``: a quality.SelectionJudge on the eval text's selection tokens (held out from the calibration
    text and from the report) where a mode chooses something itself (dynamic's activation search), else None.
    ``cache``: a static.CalibrationCache shared by the choices of one run (static), else None."""
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
        log(f"linear layers: {len(plan.linears)} (LM head {'lm_head' if plan.lm_head else 'not found'}), "
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
                                            threshold=cfg.token_threshold, logits=logits, log=log,
                                            progress=progress)
            if smoothing is not None:
                details["smoothquant"] = smoothing
            if cfg.activations == "auto":
                details["calibration_feeds"] = feed_count(samples, cfg.calib, decode=False)
                _log_activation_choice(details, log)
        elif cfg.mode == "static":
            from onnxpipe.quant.static import quantize_static_int8

            if cfg.smoothquant == "auto":
                details = _static_alpha_search(proto, out_path, body, src, samples, cfg, log, progress, cache)
            else:
                details = quantize_static_int8(proto, out_path, body, src.manifest, samples, cfg, log, progress,
                                               cache)
        else:
            from onnxpipe.quant.int4 import quantize_int4

            details = quantize_int4(proto, out_path, body, src.manifest, samples, cfg, log, progress)
        details["plan"] = plan.to_json()
        tables = _vocab_tables(out_path, plan.lm_head if head_by_tables else None, src.manifest, cfg)
        if tables is not None:
            log(f"vocabulary tables: LM head {tables.lm_head or 'left to the mode'}, {len(tables.embeddings)} token "
                f"lookup(s) int8 per row (block {tables.block_size}, max abs err {tables.max_abs_err:.3g} -- recorded, not "
                "judged)")
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
                         cfg: QuantizeConfig, log: Log, progress: Progress | None, cache: Any = None) -> dict[str, Any]:
    """--smoothquant auto: each smoothing group's alpha chosen by its own int8 output error on calibration
    windows its scales and ranges were not fitted on (layer_alpha.py), then static int8 with those alphas. With a
    ``cache`` (static.CalibrationCache), a calibrator's alphas are searched once per run."""
    import dataclasses

    from onnxpipe.quant import layer_alpha
    from onnxpipe.quant.calibration import counted, feed_count, kv_feeds
    from onnxpipe.quant.graph import float_session
    from onnxpipe.quant.static import quantize_static_int8, static_nodes

    choice = cache.alphas.get(cfg.method) if cache is not None else None
    if choice is None:
        total = feed_count(samples, cfg.calib)
        feeds = counted(kv_feeds(float_session(proto), src.manifest, samples, cfg.calib), total,
                        "smoothquant alpha per group", progress)
        choice = layer_alpha.choose_group_alphas(proto, static_nodes(body, cfg), feeds, total, method=cfg.method)
        if cache is not None:
            cache.alphas[cfg.method] = choice
    log(f"SmoothQuant alpha per group ({choice.folds}-fold over the calibration batches): {choice.summary()}")
    details = quantize_static_int8(proto, out_path, body, src.manifest, samples,
                                   dataclasses.replace(cfg, smoothquant=choice.alphas), log, progress, cache)
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
        tried = ", ".join(f"{c['float_nodes']} float: {c['calibration_ppl_change_pct']:+.2f}%"
                          for c in search["candidates"])
        log(f"dynamic int8: held-out calibration perplexity vs float (budget {search['budget_pct']:g}%): {tried}")
    t = details["activation_threshold"]
    scales = (f"per token for all {details['quantized_nodes']} int8 layers" if t is None else
              f"per token for {details['per_token_nodes']} of {details['quantized_nodes']} layers (inputs whose error "
              f"under one per-tensor scale > {t:g}), per tensor for the rest")
    log(f"activation scales: {scales}"
        + (f"; left float: {', '.join(details['float_layers'])}" if details.get("float_layers") else ""))


def find_calibration_file() -> Path | None:
    """data/calibration.txt (in the working directory, then in the source tree), or None."""
    for candidate in (Path("data/calibration.txt"), REPO_ROOT / "data" / "calibration.txt"):
        if candidate.is_file():
            return candidate
    return None


def default_calibration_file() -> Path:
    """find_calibration_file, for modes that can do without --calibration (dynamic with activations="auto")."""
    found = find_calibration_file()
    if found is not None:
        return found
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
    from onnxpipe.parity import TOLERANCE, check_decoders, ort_step_fn
    from onnxpipe.quant.quality import measure_session
    from onnxpipe.runtime.sessions import reference_session

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
    step = result.step
    q = step["quality"]
    chosen = f" ({step['choice']['chosen']}, chosen)" if step.get("choice") else ""
    gate = step.get("gate")
    verdict = f"; passed the gate (+{gate['max_ppl_increase']:g}%)" if gate else ""
    return (
        f"{result.model_dir.path}: {step['params']['mode']}{chosen}; perplexity {q['ppl_before']:.3f} -> "
        f"{q['ppl_after']:.3f} ({q['ppl_change_pct']:+.2f}%), top-1 agreement {q['top1_agreement']:.1%}, "
        f"mean KL {q['mean_kl']:.3g}, size {q['size_before'] / 1e6:.2f} -> {q['size_after'] / 1e6:.2f} MB{verdict}"
    )


__all__ = ["MODES", "QuantizeConfig", "QuantizeResult", "describe_result", "quantize_model"]
