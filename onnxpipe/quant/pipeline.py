"""quantize: one model directory in (exported or optimized), one quantized model directory out, with its quality.

The order is: check every input (files, options, tokenizer, calibration text) before any work; make the weights
visible (graph.py); run the mode; measure the result against its input model on held-out text (quality.py) and
on the decode path (parity.py); refuse to write anything if perplexity rose more than allowed.

The options come as one frozen config (config.py), checked when made; what the run derives from it (the eval file
found, the gate's defaults: RunSettings) and each candidate recipe it tries (a config of its own) are kept apart
from it, and the manifest step records the written recipe's options with the run's settings (``step_params``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
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
from onnxpipe.quant.config import (
    MODES,
    DynamicInt8Config,
    Fp16Config,
    Int4Config,
    ModeConfig,
    QuantizeConfig,
    StaticInt8Config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass
class QuantizeResult:
    model_dir: ModelDir
    step: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class RunSettings:
    """What a run derives from its QuantizeConfig before any work: the eval text found, and the report's tokens
    and the gate's thresholds with the defaults in for what the config left unset."""

    eval_file: Path
    max_eval_tokens: int
    eval_context: int | None
    max_ppl_increase: float
    min_greedy_agreement: float

    @classmethod
    def of(cls, config: QuantizeConfig) -> "RunSettings":
        from onnxpipe.quant.quality import DEFAULT_BUDGET_PCT, DEFAULT_EVAL_TOKENS, MIN_GREEDY_AGREEMENT

        def default(value: Any, fallback: Any) -> Any:
            return fallback if value is None else value

        return cls(resolve_eval_file(config.eval_file), default(config.max_eval_tokens, DEFAULT_EVAL_TOKENS),
                   config.eval_context, default(config.max_ppl_increase, DEFAULT_BUDGET_PCT[config.mode]),
                   default(config.min_greedy_agreement, MIN_GREEDY_AGREEMENT))


def step_params(cfg: ModeConfig, run: RunSettings) -> dict[str, Any]:
    """The manifest step's parameters: the written choice's options, its calibration, and the report's."""
    p: dict[str, Any] = {"mode": cfg.mode, "lm_head": cfg.lm_head, "embeddings": cfg.embeddings, **cfg.params()}
    if cfg.needs_calibration():
        assert not isinstance(cfg, Fp16Config)
        p.update(calibration=str(cfg.calibration), calibration_config=cfg.calib.to_json())
    p.update(eval_file=str(run.eval_file), max_eval_tokens=run.max_eval_tokens, max_ppl_increase=run.max_ppl_increase,
             min_greedy_agreement=run.min_greedy_agreement)
    return p


def resolve_eval_file(eval_file: Path | None) -> Path:
    """--eval, else data/eval.txt (in the working directory, then in the source tree) when present."""
    if eval_file is not None:
        if not Path(eval_file).is_file():
            raise OnnxpipeError(f"{eval_file}: the eval file is not a regular file" if Path(eval_file).exists() else
                                f"{eval_file}: no such eval file")
        return Path(eval_file)
    for candidate in (Path("data/eval.txt"), REPO_ROOT / "data" / "eval.txt"):
        if candidate.is_file():
            return candidate
    raise OnnxpipeError("no eval text: data/eval.txt is not here; pass --eval FILE (held-out text or JSONL)")


def quantize_model(
    in_dir: str | Path,
    out_dir: str | Path,
    mode: str | None = None,
    *,
    config: QuantizeConfig | None = None,
    force: bool = False,
    log: Log = lambda msg: None,
    progress: Progress | None = None,
    check_form: str = "auto",
    **options: Any,
) -> QuantizeResult:
    """Quantize the model directory ``in_dir`` into ``out_dir``: with ``mode`` (default "dynamic") and options (the
    mode config's fields and QuantizeConfig's, as the command line's flags), or with a ready ``config``.

    Options left unset are chosen (int4: int4.int4_candidates; static: static.static_candidates; the first within
    the budget on the selection text); the result must pass the gate (quality.Gate) on the report's text, or nothing is written.
    ``check_form``: how the decode-path check and the quality report run the two models (quality.side_form: whole
    sessions, or one layer's segment at a time; ``auto``: layerwise on the CPU for large inputs)."""
    start = time.perf_counter()
    if config is None:
        config = QuantizeConfig.from_options(mode or "dynamic", **_default_calibration(mode or "dynamic", options))
    elif options or mode not in (None, config.mode):
        raise OnnxpipeError("quantize_model takes a config or a mode with options, not both")
    src = ModelDir.open(in_dir)
    refuse_quantized_input(src)
    base = _for_input_dtype(config.mode_config, src)
    out_dir = Path(out_dir)
    check_io_paths([src.path], out_dir)
    check_output_dir(out_dir, force)
    run = RunSettings.of(config)
    choices = _choices(base, src)
    if any(isinstance(c, Int4Config) and c.algo == "hqq" for c in choices):
        from onnxpipe.quant.int4 import require_torch_for_hqq

        require_torch_for_hqq()
    selecting = len(choices) > 1 or (isinstance(base, DynamicInt8Config) and base.activations == "auto")
    samples, text = _read_texts(src, base, run, any(c.needs_calibration() for c in choices), selecting, log)
    from onnxpipe.quant.quality import Gate, SelectionJudge, eval_provider, quality_report, side_form

    provider = eval_provider(src.manifest)
    form = side_form(check_form, src.model_path, provider)
    gate = Gate(run.max_ppl_increase, run.min_greedy_agreement)
    log(f"{text.describe()}; on {provider}{', checks layer by layer' if form == 'layerwise' else ''}; budget: "
        f"perplexity +{gate.max_ppl_increase:g}%, decode-path greedy agreement >= {gate.min_greedy_agreement:.0%}")
    judge = None if text.select_ids is None else SelectionJudge(
        src.model_path, src.manifest, text.select_ids, text.context, provider, progress, form=form)

    with atomic_output_dir(out_dir, force=force, inputs=[src.path]) as tmp:
        if len(choices) > 1:
            cfg, details, choice = _choose(src, tmp, choices, samples, judge, gate, log, progress)
        else:
            cfg, choice = choices[0], None
            details = _run_mode(src, tmp / MODEL_FILE, cfg, samples, log, progress, selection=judge)
        copy_sidecar_files(src.path, tmp)
        manifest = _output_manifest(src.manifest, tmp / MODEL_FILE, cfg)
        _release_weights_step()
        log(f"decode-path check vs input: the input model, then the quantized one"
            f"{', layer by layer' if form == 'layerwise' else ''}...")
        check = _decode_check(src, tmp / MODEL_FILE, manifest, cfg, provider, form, log)
        judged = "" if check.passed is not None else (" -- recorded, not judged (random prompts; the quality gate "
                                                      "below judges integer modes)")
        log(f"decode-path check vs input: {check.summary()}{judged}")
        log(_report_line(len(text.report_ids), text, run, provider))
        quality = quality_report(
            src.model_path, tmp / MODEL_FILE, src.manifest, manifest, text.report_ids, text.context, text.file,
            progress=(lambda d, t: progress("quality report", d, t)) if progress else None, provider=provider,
            form=form,
        )
        checks = gate.judge(quality)
        log("quality (report text):\n" + "\n".join(f"  {c.line()}" for c in checks))
        if check.passed is False:
            raise OnnxpipeError(
                f"decode-path check failed: rel err {check.rel_err:.3g} > {check.tolerance:g}; nothing was written"
            )
        failed = [c for c in checks if c.passed is False]
        if failed:
            raise OnnxpipeError(_refusal(failed, quality, gate, choice))
        step = {
            "stage": "quantize",
            "params": step_params(cfg, run),
            "details": details,
            "quality": quality.to_json(),
            "gate": {"max_ppl_increase": gate.max_ppl_increase, "min_greedy_agreement": gate.min_greedy_agreement,
                     "checks": [c.to_json() for c in checks], "passed": True},
            "check": check.to_json(),
            "check_form": form,
            "versions": _versions(),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if choice is not None:
            step["choice"] = choice
        manifest.steps.append(step)
        write_manifest(tmp, manifest)
        write_genai_config(tmp, manifest)
    return QuantizeResult(ModelDir.open(out_dir), step, time.perf_counter() - start)


def _release_weights_step() -> None:
    """Before the checks: the streamed model's graph (onnx_ir's nodes and values refer to one another, so it waits
    for the cycle collector, with the mappings of the input's float weights it copied) and what the C heap kept
    of it go back to the system (0.6B fp16 int4: the checks start at 0.18 GB resident instead of 0.34)."""
    import gc

    from onnxpipe.runtime.layerwise import release_freed_memory

    gc.collect()
    release_freed_memory()


def _report_line(tokens: int, text: Any, run: RunSettings, provider: str) -> str:
    """What the quality report is about to measure: its token budget (the default or --eval-tokens), the file,
    and where its two sessions run."""
    from onnxpipe.quant.quality import DEFAULT_EVAL_TOKENS

    budget = (f"the default budget of {DEFAULT_EVAL_TOKENS:,}" if run.max_eval_tokens == DEFAULT_EVAL_TOKENS
              else f"--eval-tokens {run.max_eval_tokens:,}")
    short = "" if tokens >= run.max_eval_tokens else ", all the file has"
    return (f"quality report: {tokens:,} tokens of {text.file} ({budget}{short}; windows of {text.context}) on "
            f"{provider}, the input model then the quantized one...")


def _default_calibration(mode: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options with data/calibration.txt (where found) as --calibration when a mode may calibrate and none was
    given: int4's default may try GPTQ; dynamic's activation search and SmoothQuant measure on it."""
    if options.get("calibration") is not None:
        return options
    if mode == "int4" and options.get("algo") in (None, "gptq"):
        return {**options, "calibration": find_calibration_file()}
    if mode == "dynamic" and (options.get("activations", "auto") == "auto"
                              or options.get("smoothquant") not in (None, "off")):
        return {**options, "calibration": find_calibration_file()}
    return options


def _choices(cfg: ModeConfig, src: ModelDir) -> list[ModeConfig]:
    """Every configuration the default may write, each a config of its own with every option set, in the order
    they are tried (one when the options leave nothing to choose)."""
    if isinstance(cfg, StaticInt8Config):
        from onnxpipe.quant.static import static_candidates

        return [dataclasses.replace(cfg, method=c.method, per_channel=c.per_channel,
                                    smoothquant="off" if c.smoothquant is None else c.smoothquant,
                                    static_float_layers=c.float_layers)
                for c in static_candidates(cfg.method, cfg.per_channel, cfg.smoothquant, cfg.static_float_layers)]
    if not isinstance(cfg, Int4Config):
        return [cfg]
    from onnxpipe.quant.int4 import int4_candidates

    fp32 = src.manifest.graph.get("dtype", "fp32") == "fp32"
    found = int4_candidates(cfg.algo, cfg.block_size, cfg.float_zero_points, symmetric=cfg.symmetric,
                            calibration=cfg.calibration is not None, fp32_weights=fp32)
    return [dataclasses.replace(cfg, algo=c.algo, block_size=c.block_size, float_zero_points=c.float_zero_points)
            for c in found]


def _choose(src: ModelDir, tmp: Path, choices: list[ModeConfig], samples: np.ndarray | None, judge: Any,
            gate: Any, log: Log, progress: Progress | None) -> tuple[ModeConfig, dict[str, Any], dict[str, Any]]:
    """Each choice built beside the output and scored on the selection text, in order; the first within the gate
    is moved into ``tmp`` and kept. None within it: an error naming the best and how to accept it."""
    import shutil

    from onnxpipe.quant.static import CalibrationCache

    labels = [_label(c) for c in choices]
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


def _label(c: ModeConfig) -> Any:
    """A chosen recipe as the candidate lists name it (its label and the options that pin it)."""
    from onnxpipe.quant.int4 import Int4Choice
    from onnxpipe.quant.static import StaticChoice

    if isinstance(c, StaticInt8Config):
        return StaticChoice(str(c.method), bool(c.per_channel), c.smoothing, int(c.static_float_layers or 0))
    assert isinstance(c, Int4Config) and c.algo is not None and c.block_size is not None
    return Int4Choice(c.algo, c.block_size, bool(c.float_zero_points))


def _try_choices(src: ModelDir, tmp: Path, choices: list[ModeConfig], labels: list[Any],
                 samples: np.ndarray | None, judge: Any, gate: Any, log: Log, progress: Progress | None,
                 rows: list[dict[str, Any]], cache: Any) -> tuple[ModeConfig, dict[str, Any], dict[str, Any]]:
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


def _refusal(failed: list[Any], quality: Any, gate: Any, choice: dict[str, Any] | None) -> str:
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


def _read_texts(src: ModelDir, cfg: ModeConfig, run: RunSettings, calibrate: bool, selecting: bool,
                log: Log) -> tuple[np.ndarray | None, Any]:
    """Calibration samples (when a choice needs them) and the eval text split into the report's tokens and the
    selection's (quality.split_eval), read and checked before any work."""
    from onnxpipe.quant.calibration import calibration_samples
    from onnxpipe.quant.quality import DEFAULT_SELECT_TOKENS, default_context, split_eval
    from onnxpipe.quant.text import load_tokenizer, read_documents, tokenize_documents

    tokenizer = load_tokenizer(src.path)
    samples = None
    if calibrate and not isinstance(cfg, Fp16Config) and cfg.calibration is not None:
        positions = src.manifest.model.get("max_position_embeddings")
        if positions and cfg.calib.prefill_len > positions:  # 8192 on a 256-position model ran out of memory
            raise OnnxpipeError(f"--calib-seq-len {cfg.calib.prefill_len} exceeds the model's {positions} positions; "
                                f"pass --calib-seq-len {positions} or less")
        samples = calibration_samples(tokenizer, cfg.calibration, cfg.calib)
        used_by = " (for the GPTQ choices, tried after RTN's)" if isinstance(cfg, Int4Config) and cfg.algo is None else ""
        log(f"calibration: {len(samples)} samples of {cfg.calib.sample_len} tokens from {cfg.calibration}{used_by}")
    report = run.max_eval_tokens
    select = min(DEFAULT_SELECT_TOKENS, report) if selecting else 0
    eval_ids = tokenize_documents(tokenizer, read_documents(run.eval_file, "eval"), report + select)
    return samples, split_eval(eval_ids, str(run.eval_file), run.eval_context or default_context(src.manifest),
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


def _for_input_dtype(cfg: ModeConfig, src: ModelDir) -> ModeConfig:
    """fp32 input: every mode. fp16 input (the GPU path): int4 only, weights to MatMulNBits with fp16 scales and
    fp16 activations; the LM head and the token table stay fp16 unless --lm-head int4 (the 8-bit vocabulary
    tables are an fp32-graph form): a config of its own with those two set."""
    dtype = src.manifest.graph.get("dtype", "fp32")
    if dtype == "fp32":
        return cfg
    if dtype != "fp16" or not isinstance(cfg, Int4Config):
        raise OnnxpipeError(f"{src.path} is {dtype}; quantize from an fp32 model directory (export or optimize "
                            "with --dtype fp32); an fp16 one takes --mode int4 only")
    if "int8" in (cfg.lm_head, cfg.embeddings):
        raise OnnxpipeError("an fp16 input keeps the LM head and embeddings fp16 or puts the head in int4 "
                            "(--lm-head int4); 8-bit vocabulary tables are for fp32 inputs")
    return dataclasses.replace(cfg, lm_head="fp32" if cfg.lm_head == "auto" else cfg.lm_head,
                               embeddings="fp32" if cfg.embeddings == "auto" else cfg.embeddings)


def _run_mode(src: ModelDir, out_path: Path, cfg: ModeConfig, samples: np.ndarray | None, log: Log,
              progress: Progress | None, selection: Any = None, cache: Any = None) -> dict[str, Any]:
    """``selection``: a quality.SelectionJudge on the eval text's selection tokens (held out from the calibration
    text and from the report) where a mode chooses something itself (dynamic's activation search), else None.
    ``cache``: a static.CalibrationCache shared by the choices of one run (static), else None."""
    import onnx

    from onnxpipe.quant.dynamic_stream import streams as dynamic_streams
    from onnxpipe.quant.gptq_stream import streams as gptq_streams
    from onnxpipe.quant.graph import op_counts
    from onnxpipe.quant.rtn_stream import streams

    if isinstance(cfg, Int4Config) and (streams(cfg) or gptq_streams(cfg)):
        before, details, plan, tables = _stream_int4(src, out_path, cfg, samples, log, progress)
    elif isinstance(cfg, DynamicInt8Config) and dynamic_streams(cfg):
        before, details, plan, tables = _stream_dynamic(src, out_path, cfg, log, progress)
    else:
        proto = onnx.load(str(src.model_path))
        before = op_counts(proto)
        details, plan = _run_in_memory(proto, src, out_path, cfg, samples, log, progress, selection, cache)
        del proto
        tables = None if plan is None else _vocab_tables(out_path, _table_head(plan, cfg), src.manifest, cfg)
    if plan is not None:
        details["plan"] = plan.to_json()
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


def _run_in_memory(proto: Any, src: ModelDir, out_path: Path, cfg: ModeConfig, samples: np.ndarray | None, log: Log,
                   progress: Progress | None, selection: Any, cache: Any) -> tuple[dict[str, Any], Any]:
    """Every mode but rtn_stream's on the whole model in memory: (details, the weight plan; None for fp16)."""
    from onnxpipe.quant.graph import WeightPlan, expose_weights

    logits = src.manifest.graph["logits"]
    if isinstance(cfg, Fp16Config):
        from onnxpipe.quant.fp16 import convert_fp16

        return convert_fp16(proto, out_path, cfg, logits), None
    plan = expose_weights(proto, logits)
    _log_plan(plan, log)
    head_by_tables = cfg.lm_head in ("auto", "int8") and plan.lm_head is not None
    body = WeightPlan([n for n in plan.linears if n != plan.lm_head], None, plan.embeddings, plan.rewrites) \
        if head_by_tables else plan
    if isinstance(cfg, DynamicInt8Config):
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
    elif isinstance(cfg, StaticInt8Config):
        from onnxpipe.quant.static import quantize_static_int8

        assert samples is not None
        if cfg.smoothing == "auto":
            details = _static_alpha_search(proto, out_path, body, src, samples, cfg, log, progress, cache)
        else:
            details = quantize_static_int8(proto, out_path, body, src.manifest, samples, cfg, log, progress,
                                           cache)
    else:
        from onnxpipe.quant.int4 import quantize_int4

        details = quantize_int4(proto, out_path, body, src.manifest, samples, cfg, log, progress)
    return details, plan


def _log_plan(plan: Any, log: Log) -> None:
    log(f"linear layers: {len(plan.linears)} (LM head {'lm_head' if plan.lm_head else 'not found'}), "
        f"lookup tables: {len(plan.embeddings)}; rewrites {plan.rewrites}")


def _stream_int4(src: ModelDir, out_path: Path, cfg: Int4Config, samples: np.ndarray | None, log: Log,
                 progress: Progress | None) -> tuple[dict[str, int], dict[str, Any], Any, Any]:
    """int4 RTN or GPTQ with blocks and integer zero points (rtn_stream.py, gptq_stream.py): the input read lazily,
    one weight quantized at a time (GPTQ: a few layers' Hessians at a time), the output's weights written to
    external data where the input's were. (op counts before, details, the weight plan, the vocabulary tables'
    report or None)."""
    from onnxpipe.quant.rtn_stream import has_external_data, quantize_rtn_streamed, save_streamed

    model, before, plan = _read_lazily(src, log)
    external = has_external_data(model)
    if cfg.algo == "gptq":
        details = _stream_gptq(model, plan, src, out_path, cfg, samples, log, progress)
    else:
        details = quantize_rtn_streamed(model, plan, cfg, progress)
        log(f"int4 rtn: {details['quantized_nodes']} weights quantized {details['streamed']}")
    tables = _tables_before_save(model, plan, src.manifest, cfg)
    log("writing " + ("the weights to external data, one at a time" if external else "the model"))
    save_streamed(model, out_path, external, progress)
    return before, details, plan, tables


def _table_head(plan: Any, cfg: ModeConfig) -> str | None:
    """The LM head the 8-bit vocabulary tables take (embedding.py), or None when the mode (or fp32) keeps it."""
    return plan.lm_head if getattr(cfg, "lm_head", None) in ("auto", "int8") and plan.lm_head is not None else None


def _tables_before_save(model: Any, plan: Any, manifest: Manifest, cfg: ModeConfig) -> Any:
    """_vocab_tables on a streamed model before it is written (its float tables read once, lazily); None when
    neither table is 8-bit. Drops the initializers left unused."""
    from onnxpipe.quant.embedding import rewrite_vocab_tables
    from onnxpipe.quant.graph import drop_unused_initializers

    head, lookups = _table_head(plan, cfg), getattr(cfg, "embeddings", None) in ("auto", "int8")
    report = None
    if head is not None or lookups:
        level = cfg.accuracy_level if isinstance(cfg, Int4Config) else 4
        report = rewrite_vocab_tables(model, head, int(manifest.model["vocab_size"]), head is not None, lookups, level)
    drop_unused_initializers(model.graph)
    return report


def _read_lazily(src: ModelDir, log: Log) -> tuple[Any, dict[str, int], Any]:
    """The input as an onnx_ir model whose external weights are read when used, its op counts, its weight plan
    (graph.expose_weights' rewrites made)."""
    from collections import Counter

    import onnx_ir as ir

    from onnxpipe.quant.rtn_stream import read_plan

    model = ir.load(str(src.model_path))
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph)
    plan = read_plan(model, src.manifest.graph["logits"])
    _log_plan(plan, log)
    return model, dict(sorted(counts.items())), plan


def _stream_dynamic(src: ModelDir, out_path: Path, cfg: DynamicInt8Config, log: Log,
                    progress: Progress | None = None) -> tuple[dict[str, int], dict[str, Any], Any, Any]:
    """--activations token (dynamic_stream.py): one weight at a time, the int8 weights written as they are made;
    the output's weights in external data where the input's were. (As _stream_int4.)"""
    from onnxpipe.quant.dynamic_stream import quantize_dynamic_streamed, spill_path
    from onnxpipe.quant.graph import WeightPlan
    from onnxpipe.quant.rtn_stream import Spill, has_external_data, save_streamed

    model, before, plan = _read_lazily(src, log)
    body = WeightPlan([n for n in plan.linears if n != plan.lm_head], None, plan.embeddings, plan.rewrites) \
        if _table_head(plan, cfg) else plan
    external = has_external_data(model)  # the input's layout (the spilled weights are external tensors too)
    spill = Spill(spill_path(out_path))
    try:
        details = quantize_dynamic_streamed(model, body, cfg.lm_head, spill, progress)
        spill.close()
        log(f"dynamic int8: {details['quantized_nodes']} layers, per-token activation scales; {details['streamed']}")
        tables = _tables_before_save(model, plan, src.manifest, cfg)
        log("writing " + ("the weights to external data, one at a time" if external else "the model"))
        save_streamed(model, out_path, external, progress)
    finally:
        spill.remove()
    return before, details, plan, tables


def _stream_gptq(model: Any, plan: Any, src: ModelDir, out_path: Path, cfg: Int4Config, samples: np.ndarray | None,
                 log: Log, progress: Progress | None) -> dict[str, Any]:
    """gptq_stream on the calibration samples' prefills (made again for each pass), beside the output."""
    from onnxpipe.quant.calibration import feed_count
    from onnxpipe.quant.gptq_stream import counted_feeds, quantize_gptq_streamed
    from onnxpipe.quant.quality import eval_provider, prefill_feed

    assert samples is not None
    prefill, batch = cfg.calib.prefill_len, cfg.calib.batch_size
    feeds = counted_feeds(lambda: (prefill_feed(src.manifest, samples[b:b + batch, :prefill])
                                   for b in range(0, len(samples), batch)),
                          feed_count(samples, cfg.calib, decode=False), progress)
    details = quantize_gptq_streamed(model, plan, cfg, feeds, out_path.parent / "gptq-activations",
                                     eval_provider(src.manifest), log, progress, manifest=src.manifest)
    details["calibration_feeds"] = feed_count(samples, cfg.calib, decode=False)
    return details


def _static_alpha_search(proto: Any, out_path: Path, body: Any, src: ModelDir, samples: np.ndarray,
                         cfg: StaticInt8Config, log: Log, progress: Progress | None, cache: Any = None) -> dict[str, Any]:
    """--smoothquant auto: each smoothing group's alpha chosen by its own int8 output error on calibration
    windows its scales and ranges were not fitted on (layer_alpha.py), then static int8 with those alphas. With a
    ``cache`` (static.CalibrationCache), a calibrator's alphas are searched once per run."""
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
    details = quantize_static_int8(proto, out_path, body, src.manifest, samples, cfg, log, progress, cache,
                                   alphas=choice.alphas)
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


def _prefill_feeds(manifest: Manifest, samples: np.ndarray, cfg: DynamicInt8Config, label: str,
                   progress: Progress | None) -> Any:
    """The calibration samples' prefills, cfg.calib.batch_size at a time (lazily)."""
    from onnxpipe.quant.calibration import counted, feed_count
    from onnxpipe.quant.quality import prefill_feed

    prefill, batch = cfg.calib.prefill_len, cfg.calib.batch_size
    return counted((prefill_feed(manifest, samples[b:b + batch, :prefill]) for b in range(0, len(samples), batch)),
                   feed_count(samples, cfg.calib, decode=False), label, progress)


def _vocab_tables(model_path: Path, head: str | None, manifest: Manifest, cfg: ModeConfig) -> Any:
    """After the mode (which left them alone): the LM head and token lookups as 8-bit per-row tables, one table
    when tied. Done last so that every float check inside a mode (SmoothQuant's equivalence) sees float heads."""
    import onnx

    from onnxpipe import artifact
    from onnxpipe.quant.embedding import quantize_vocab_tables
    from onnxpipe.quant.graph import save_quantized

    lookups = cfg.embeddings in ("auto", "int8")
    if head is None and not lookups:
        return None
    proto = onnx.load(str(model_path))
    level = cfg.accuracy_level if isinstance(cfg, Int4Config) else 4
    report = quantize_vocab_tables(proto, head, int(manifest.model["vocab_size"]), head is not None, lookups, level)
    data = model_path.with_name(model_path.name + ".data")
    if data.exists():  # the weights stay in a data file (rtn_stream keeps the input's layout); onnx would append
        data.unlink()  # to the old one, whose tensors are in memory now
        artifact.save_onnx(proto, model_path.parent, model_path.name, threshold=0)
    else:
        save_quantized(proto, model_path)
    return report


def _output_manifest(src: Manifest, model_path: Path, cfg: ModeConfig) -> Manifest:
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
    int4 = "int4 weight-only (MatMulNBits)" if getattr(cfg, "block_size", None) else \
        "int4 weight-only (uint4 DequantizeLinear per channel -> MatMul)"
    g["quantization"] = {"dynamic": "int8 weights, dynamic int8 activations", "static": "int8 QDQ", "int4": int4,
                         "fp16": "fp16 mixed precision"}[cfg.mode]
    return manifest


def _decode_check(src: ModelDir, model_path: Path, manifest: Manifest, cfg: ModeConfig,
                  provider: str = "cpu", form: str = "whole", log: Log = lambda msg: None) -> Any:
    """Prefill + decode steps on a padded batch (the input's padding side) against the input model
    (parity.check_decoders), on ``provider`` (quality.eval_provider: CUDA where this onnxruntime has it).

    The sessions are made one after the other (parity.lazy_ort_step_fn: the reference's is dropped before the
    candidate's is made): on the CPU the reference of an fp16 input holds its weights widened to fp32 (2x W).
    ``form`` ``layerwise``: both run one layer's segment at a time (runtime.layerwise.check_layerwise: the same
    comparison of the logits, and each layer's KV cache), each segment's session mapping its weights from the
    model's data file.
    fp16 is judged with the fp16 tolerance; integer modes are recorded only, and judged by the quality report.
    """
    from onnxpipe.parity import TOLERANCE, check_decoders, lazy_ort_step_fn
    from onnxpipe.quant.quality import eval_session, measure_session
    from onnxpipe.runtime.sessions import reference_session

    def kv_dtype(m: Manifest) -> np.dtype:
        dtypes = {t["name"]: t["dtype"] for t in m.graph["inputs"]}
        return np.dtype(dtypes[m.past_names(0)[0]])

    side = src.manifest.graph.get("padding_side", "left")  # quantizing keeps the input's padding side
    report: Any
    if form == "layerwise":
        from onnxpipe.runtime.layerwise import check_layerwise, file_graph, segment_session

        report = check_layerwise(file_graph(src.model_path), file_graph(model_path), manifest, segment_session(),
                                 kv_dtype=kv_dtype(manifest), ref_kv_dtype=kv_dtype(src.manifest),
                                 padding_side=side, reference_padding_side=side, log=log)
    else:
        if provider == "cpu":
            ref = lazy_ort_step_fn(lambda: reference_session(src.model_path), src.manifest)
            cand = lazy_ort_step_fn(lambda: measure_session(model_path), manifest)
        else:
            ref = lazy_ort_step_fn(lambda: eval_session(src.model_path, provider)[0], src.manifest)
            cand = lazy_ort_step_fn(lambda: eval_session(model_path, provider)[0], manifest)
        report = check_decoders(ref, cand, manifest, kv_dtype=kv_dtype(manifest),
                                ref_kv_dtype=kv_dtype(src.manifest), padding_side=side, reference_padding_side=side)
        cand.release()  # type: ignore[attr-defined]
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


__all__ = ["MODES", "QuantizeConfig", "QuantizeResult", "RunSettings", "describe_result", "quantize_model"]
