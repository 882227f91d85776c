"""Static int8 in QDQ format: activation ranges calibrated on real text, prefill and decode, KV cache included.

We own the calibration loop and hand ORT the ranges: ORT's quantize_static would keep every run's activations
until the reader is exhausted (its histogram calibrators do), while here the calibrator is given one run at a
time and folds it into its running min/max or histogram before the next run (memory stays at one run's
activations, whatever the number of samples). The ranges go to ORT through its calibration cache file, and
quantize_static then only writes the QDQ graph.

What is quantized: the linear layers of the body (MatMul with a constant weight); the LM head and token lookup
were already made 8-bit per vocabulary row by embedding.py, unless --lm-head/--embeddings fp32.
The attention products (Q K^T, P V) stay in float: their inputs come from a cache whose range grows with the
sequence, which one calibrated range per tensor does not describe. Activations uint8 (asymmetric), weights int8
symmetric, per output channel with --per-channel: U8S8. S8S8 gives the same values (an asymmetric int8 range is
the uint8 one shifted by 128) but ORT's CPU EP left S8S8 DequantizeLinear -> MatMul pairs of our Llama graph
unfused, decoding 3x slower than with U8S8 (measured on llama-stdlib: 1.11 vs 0.36 ms/token, fp32 0.32).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onnxpipe.artifact import Manifest
from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant.calibration import SingleFeedReader, counted, feed_count, kv_feeds
from onnxpipe.quant.config import StaticInt8Config
from onnxpipe.quant.graph import WeightPlan, save_quantized

METHOD_NAMES = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


@dataclass(frozen=True)
class StaticChoice:
    """One static int8 recipe: the options the default chooses among. ``smoothquant`` None is off."""

    method: str
    per_channel: bool
    smoothquant: float | str | None
    float_layers: int

    def label(self) -> str:
        parts = [self.method, "per-channel weights" if self.per_channel else "per-tensor weights"]
        if self.smoothquant is not None:
            parts.append(f"SmoothQuant {self.smoothquant}")
        if self.float_layers:
            parts.append(f"{self.float_layers} layers fp32")
        return ", ".join(parts)

    def options(self) -> list[str]:
        """The command-line options that pin this choice."""
        return [f"--method {self.method}", "--per-channel" if self.per_channel else "--per-tensor",
                f"--smoothquant {'off' if self.smoothquant is None else self.smoothquant}",
                f"--static-float-layers {self.float_layers}"]


# The default tries these in order and keeps the first within the budget: the cheapest to make first (one
# calibration pass; then SmoothQuant's per-group alpha search, which runs the calibration text again; then the
# percentile calibrator, which keeps histograms), and last the ones that leave the widest-range layers in fp32
# (larger and slower to run).
CANDIDATES = (
    StaticChoice("minmax", True, None, 0),
    StaticChoice("minmax", True, "auto", 0),
    StaticChoice("percentile", True, "auto", 0),
    StaticChoice("percentile", True, "auto", 16),
    StaticChoice("percentile", True, "auto", 32),
)


def static_candidates(method: str | None, per_channel: bool | None, smoothquant: float | str | None,
                      float_layers: int | None) -> list[StaticChoice]:
    """The CANDIDATES that the user's options leave open (None: not set; smoothquant "off": set to none), in
    order. A value outside the list (entropy, per-tensor weights, an alpha, another layer count) pins one choice,
    the unset options at the first candidate's values (minmax, per-channel, no SmoothQuant, no fp32 layers)."""
    sq = None if smoothquant == "off" else smoothquant
    first = CANDIDATES[0]
    single = [StaticChoice(method or first.method, first.per_channel if per_channel is None else per_channel,
                           sq if smoothquant is not None else first.smoothquant,
                           first.float_layers if float_layers is None else float_layers)]
    left = [c for c in CANDIDATES if method in (None, c.method) and per_channel in (None, c.per_channel)
            and (smoothquant is None or sq == c.smoothquant) and float_layers in (None, c.float_layers)]
    return left or single


class CalibrationCache:
    """What one choice measured that the next may reuse (the default's choices are tried in turn): SmoothQuant's
    alphas per calibrator, and the last recipe's smoothed float model with its calibrated ranges. Choices that
    differ only in the layers left fp32 (the list's last three) calibrate once. ``directory`` holds the model; its
    owner removes it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.alphas: dict[str, Any] = {}  # method -> layer_alpha's choice
        self.key: tuple[str, str] | None = None
        self.ranges: Any = None
        self.details: dict[str, Any] = {}

    def get(self, key: tuple[str, str]) -> tuple[Path, Any, dict[str, Any]] | None:
        return (self.directory / "float.onnx", self.ranges, self.details) if key == self.key else None

    def put(self, key: tuple[str, str], float_path: Path, ranges: Any, details: dict[str, Any]) -> Path:
        """Moves the model at ``float_path`` in; returns where it now is."""
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        for f in (float_path, float_path.with_name(float_path.name + ".data")):
            if f.exists():
                shutil.move(f, self.directory / f.name)
        self.key, self.ranges, self.details = key, ranges, details
        return self.directory / float_path.name


def quantize_static_int8(
    proto: Any,
    out_path: Path,
    plan: WeightPlan,
    manifest: Manifest,
    samples: np.ndarray,
    cfg: StaticInt8Config,
    log: Callable[[str], None],
    progress: Callable[[str, int, int], None] | None,
    cache: CalibrationCache | None = None,
    alphas: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Static int8 of a chosen recipe ``cfg`` (every option set). ``alphas``: SmoothQuant's alpha per smoothing
    group, as --smoothquant auto's search chose them (layer_alpha.py), in place of ``cfg``'s one alpha."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from onnxpipe.quant.dynamic import _quiet_ort
    from onnxpipe.quant.quality import measure_session

    details: dict[str, Any] = {"weights": "int8", "activations": "uint8 (static, calibrated)", "format": "QDQ",
                               "method": cfg.method, "per_channel": cfg.per_channel}
    nodes = static_nodes(plan, cfg)
    details["lm_head"] = "fp32" if plan.lm_head and plan.lm_head not in nodes else "int8 QDQ"
    smoothing = cfg.smoothing if alphas is None else alphas
    if isinstance(smoothing, str):
        raise ValueError("--smoothquant auto: pass the alphas its search chose (pipeline._static_alpha_search)")
    key = (str(cfg.method), repr(smoothing))
    hit = cache.get(key) if cache is not None else None
    total = feed_count(samples, cfg.calib)
    with tempfile.TemporaryDirectory(prefix="onnxpipe-calib-", dir=out_path.parent) as work:
        work = Path(work)
        float_path = work / "float.onnx"
        method = getattr(CalibrationMethod, METHOD_NAMES[str(cfg.method)])
        if hit is not None:
            float_path, ranges, reused = hit
            details.update(reused)
            details["calibration_reused"] = True
            log("static: the calibrated ranges (and smoothing) of the previous choice reused")
        if hit is None and smoothing is not None:
            from onnxpipe.quant.smoothquant import smooth_model

            kv_session = measure_session(_save(proto, work / "unsmoothed.onnx"))
            stats_feeds = counted(kv_feeds(kv_session, manifest, samples, cfg.calib), feed_count(samples, cfg.calib),
                                  "smoothquant statistics", progress)
            check_feed = next(kv_feeds(kv_session, manifest, samples[:2], cfg.calib, decode=False))
            proto, report = smooth_model(proto, nodes, smoothing, stats_feeds, check_feed, manifest.graph["logits"])
            details["smoothquant"] = report.to_json()
            what = "per group" if isinstance(smoothing, dict) else smoothing
            log(f"SmoothQuant alpha {what}: {report.groups} groups ({report.folded} folded into norms, "
                f"{report.inserted_muls} Mul inserted); worst channel outlier ratio {report.outlier_ratio_before:.1f} -> "
                f"{report.outlier_ratio_after:.1f}; float equivalence rel err {report.equivalence_rel_err:.2g}")
        if hit is None:
            _save(proto, float_path)
            with _quiet_ort():
                calibrator = create_calibrator(
                    float_path, ["MatMul"], augmented_model_path=str(work / "augmented.onnx"), calibrate_method=method,
                    extra_options={"symmetric": cfg.method == "percentile"},
                )
            session = measure_session(float_path)
            for done, feed in enumerate(kv_feeds(session, manifest, samples, cfg.calib), 1):
                with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print on every call
                    calibrator.collect_data(SingleFeedReader(feed))
                if progress:
                    progress("calibrating", done, total)
            with contextlib.redirect_stdout(io.StringIO()):
                ranges = calibrator.compute_data()
            del calibrator, session
            if cache is not None:
                float_path = cache.put(key, float_path, ranges, {k: details[k] for k in ("smoothquant",) if k in details})
        if cfg.static_float_layers:
            if cfg.static_float_layers >= len(nodes):  # ORT reads an empty nodes_to_quantize as "all of them"
                raise OnnxpipeError(f"--static-float-layers {cfg.static_float_layers} leaves all {len(nodes)} "
                                    "linear layers in fp32: nothing to quantize")
            nodes, details["float_nodes"] = widest_inputs_left_float(model_inputs(float_path, nodes), ranges,
                                                                     cfg.static_float_layers)
            log(f"static: {len(details['float_nodes'])} layers with the widest calibrated input ranges left fp32 "
                f"(widest {details['float_nodes'][0]['range']:.4g})")
        ranges_file = work / "ranges.json"
        save_tensors_data(ranges, ranges_file)
        details["calibration_runs"] = total
        details["calibrated_tensors"] = len(ranges.data)
        model = onnx.load(str(float_path))
        with _quiet_ort():
            quantize_static(
                model,
                str(out_path),
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                per_channel=cfg.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                calibrate_method=method,
                calibration_cache_path=str(ranges_file),
                extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False},
            )
    details["quantized_nodes"] = len(nodes)
    return details


def model_inputs(model_path: Path, nodes: list[str]) -> dict[str, str]:
    """Each named node's activation input (its first input), in the order of ``nodes``."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    first = {n.name: n.input[0] for n in graph.node}
    return {n: first[n] for n in nodes}


def widest_inputs_left_float(inputs: dict[str, str], ranges: Any, count: int) -> tuple[list[str], list[dict[str, Any]]]:
    """The nodes to quantize once the ``count`` nodes whose calibrated input range (highest - lowest) is widest are
    left out, and those left out (worst first) with their ranges. One static range per tensor is set by its
    largest values: on SmolLM2-135M a few down_proj inputs span 900-3200 (massive activations on a window's first
    token) against 2-20 for most inputs, so with 256 levels every other token's activations round to a few levels."""
    def width(name: str) -> float:
        lo, hi = ranges.data[inputs[name]].range_value
        return float(np.max(hi) - np.min(lo))

    widths = {n: width(n) for n in inputs}
    worst = sorted(inputs, key=lambda n: -widths[n])[:count]
    kept = [n for n in inputs if n not in set(worst)]
    return kept, [{"node": n, "range": float(f"{widths[n]:.4g}")} for n in worst]


def static_nodes(plan: WeightPlan, cfg: StaticInt8Config) -> list[str]:
    """The MatMuls static int8 quantizes (and SmoothQuant smooths)."""
    return [n for n in plan.linears if cfg.lm_head != "fp32" or n != plan.lm_head]


def _save(proto: Any, path: Path) -> Path:
    save_quantized(proto, path)
    return path
