"""One frozen config per mode, holding only that mode's options, each checked when the config is made.

    DynamicInt8Config   int8 weights, activations quantized at run time (dynamic.py)
    StaticInt8Config    int8 QDQ with calibrated activation ranges (static.py)
    Int4Config          int4 weight-only: rtn, gptq or hqq (int4.py)
    Fp16Config          fp16 mixed precision (fp16.py)

``QuantizeConfig`` is one run as asked: a mode's config and the quality report's options, which every mode shares.
An option left None is chosen by the run (the static and int4 candidates, the gate's defaults); what the run
chooses or derives goes into its own record (pipeline.RunSettings, the manifest step), never back into a config.
A candidate the run tries is a config of its own, made with ``dataclasses.replace`` (and so checked again).

Every problem is an OnnxpipeError of one line naming the option, as the command line spells it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant.calibration import CalibrationConfig
from onnxpipe.quant.quality import MIN_EVAL_TOKENS

MODES = ("dynamic", "static", "int4", "fp16")
METHODS = ("minmax", "entropy", "percentile")
ALGOS = ("rtn", "gptq", "hqq")
ACTIVATION_SCALES = ("auto", "token", "tensor")
INT8_LM_HEAD = ("auto", "fp32", "int8")
INT4_LM_HEAD = ("auto", "fp32", "int8", "int4")
EMBEDDING_CHOICES = ("auto", "fp32", "int8")
MAX_EVAL_TOKENS = 1 << 24
MAX_BLOCK_SIZE = 1 << 16
PER_CHANNEL = 0  # --block-size 0: one scale and zero point per output channel (int4.py)

# the command line's name of each option, for errors
FLAGS = {"method": "--method", "per_channel": "--per-channel/--per-tensor", "static_float_layers": "--static-float-layers",
         "activations": "--activations", "token_threshold": "token_threshold", "smoothquant": "--smoothquant",
         "block_size": "--block-size", "algo": "--algo", "accuracy_level": "--accuracy-level",
         "symmetric": "--symmetric", "float_zero_points": "--zero-points", "lm_head": "--lm-head",
         "embeddings": "--embeddings", "calibration": "--calibration", "calib": "calib"}
# values an option may hold under a mode that does not have it (the command line passes every option)
NEUTRAL: dict[str, tuple[Any, ...]] = {"activations": ("auto",), "accuracy_level": (4,), "symmetric": (False,),
                                       "static_float_layers": (0,), "float_zero_points": (False,),
                                       "lm_head": ("auto",), "embeddings": ("auto",)}


SYMMETRIC_ONLY = "--symmetric applies to --mode int4 --algo rtn with a block size (not per channel)"
FLOAT_ZERO_POINTS_ONLY = ("--zero-points float applies to --mode int4 --algo rtn or gptq with a block size, without "
                          "--symmetric (hqq writes float zero points of its own)")
ONLY = {"symmetric": SYMMETRIC_ONLY, "float_zero_points": FLOAT_ZERO_POINTS_ONLY}


def _choice(name: str, value: Any, allowed: tuple[str, ...], what: str | None = None) -> None:
    if value not in allowed:
        raise OnnxpipeError(f"unknown {what or FLAGS[name]} {value!r}; choose one of {', '.join(allowed)}")


def _int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise OnnxpipeError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


def _optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise OnnxpipeError(f"{FLAGS[name]} must be true or false, got {value!r}")


def _path(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if value is None:
        return
    if not isinstance(value, (str, Path)) or not str(value):
        raise OnnxpipeError(f"{FLAGS.get(name, name)} must be a file path, got {value!r}")
    object.__setattr__(cfg, name, Path(value))  # frozen: normalized once, at construction


def _alpha(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 < value <= 1.0


def _calib(value: Any) -> None:
    if not isinstance(value, CalibrationConfig):
        raise OnnxpipeError(f"calib must be a CalibrationConfig, got {type(value).__name__}")


class _Int8Tables:
    """The checks of the options the integer modes share: the vocabulary tables (embedding.py), calibration."""

    lm_head: str
    embeddings: str
    calib: CalibrationConfig
    calibration: Path | None

    def _check_tables(self, lm_heads: tuple[str, ...]) -> None:
        if self.lm_head == "int4" and lm_heads is INT8_LM_HEAD:
            raise OnnxpipeError("--lm-head int4 applies to --mode int4 only")
        _choice("lm_head", self.lm_head, lm_heads)
        _choice("embeddings", self.embeddings, EMBEDDING_CHOICES)
        _calib(self.calib)
        _path(self, "calibration")


@dataclass(frozen=True)
class DynamicInt8Config(_Int8Tables):
    """int8 weights per output channel; activations quantized at run time per token, per tensor, or chosen per
    layer on calibration prefills (``auto``: dynamic.py)."""

    mode: ClassVar[str] = "dynamic"
    activations: str = "auto"
    token_threshold: float | None = None  # auto: per token above it, per tensor below, no search (dynamic.py)
    smoothquant: float | None = None  # SmoothQuant alpha in (0, 1]; None: none
    calibration: Path | None = None  # text for the activation search and SmoothQuant's statistics
    calib: CalibrationConfig = field(default_factory=CalibrationConfig)
    lm_head: str = "auto"  # auto/int8: 8-bit per vocabulary row (embedding.py); fp32
    embeddings: str = "auto"  # auto/int8: the token table 8-bit per row, shared with a tied head; fp32

    def __post_init__(self) -> None:
        _choice("activations", self.activations, ACTIVATION_SCALES, "activation scale")
        if self.token_threshold is not None:
            if isinstance(self.token_threshold, bool) or not isinstance(self.token_threshold, (int, float)) \
                    or not math.isfinite(self.token_threshold) or not 0.0 <= self.token_threshold <= 1.0:
                raise OnnxpipeError(f"token_threshold must be a number in [0, 1], got {self.token_threshold!r}")
            if self.activations != "auto":
                raise OnnxpipeError("token_threshold applies to --activations auto only")
        if isinstance(self.smoothquant, str) and self.smoothquant == "auto":
            raise OnnxpipeError("--smoothquant auto applies to --mode static; pass an alpha in (0, 1] for dynamic")
        if self.smoothquant is not None and not _alpha(self.smoothquant):
            raise OnnxpipeError(f"--smoothquant alpha must be in (0, 1] or auto, got {self.smoothquant}")
        self._check_tables(INT8_LM_HEAD)
        if self.needs_calibration() and self.calibration is None:
            raise OnnxpipeError("dynamic int8 chooses activation scales from calibration text, and data/calibration.txt "
                                "is not here: pass --calibration FILE, or --activations token|tensor")

    def needs_calibration(self) -> bool:
        return self.activations == "auto" or self.smoothquant is not None

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"activations": self.activations, "smoothquant": self.smoothquant}
        if self.activations == "auto":
            p["token_threshold"] = self.token_threshold
        return p


@dataclass(frozen=True)
class StaticInt8Config(_Int8Tables):
    """int8 QDQ: activation ranges calibrated on real text (static.py). The four recipe options left None are
    chosen (static.static_candidates); ``smoothquant`` "off" pins none, "auto" one alpha per smoothing group."""

    mode: ClassVar[str] = "static"
    calibration: Path | None = None
    method: str | None = None  # the activation range calibrator
    per_channel: bool | None = None  # per-output-channel weight scales
    smoothquant: float | str | None = None
    static_float_layers: int | None = None  # the N layers with the widest calibrated input range left fp32
    calib: CalibrationConfig = field(default_factory=CalibrationConfig)
    lm_head: str = "auto"
    embeddings: str = "auto"

    def __post_init__(self) -> None:
        if self.calibration is None:
            raise OnnxpipeError("static quantization needs calibration text: pass --calibration FILE (text or JSONL), "
                                "e.g. data/calibration.txt")
        if self.method is not None:
            _choice("method", self.method, METHODS, "calibration method")
        _optional_bool("per_channel", self.per_channel)
        if self.smoothquant not in (None, "auto", "off") and not _alpha(self.smoothquant):
            raise OnnxpipeError(f"--smoothquant alpha must be in (0, 1] or auto, got {self.smoothquant}")
        if self.static_float_layers is not None:
            _int("--static-float-layers", self.static_float_layers, 0, 1 << 20)
        self._check_tables(INT8_LM_HEAD)

    @property
    def smoothing(self) -> float | str | None:
        """The alpha (or "auto") of a chosen recipe; None: no SmoothQuant."""
        return None if self.smoothquant == "off" else self.smoothquant

    def needs_calibration(self) -> bool:
        return True

    def params(self) -> dict[str, Any]:
        return {"method": self.method, "per_channel": self.per_channel, "smoothquant": self.smoothing,
                "static_float_layers": self.static_float_layers}


@dataclass(frozen=True)
class Int4Config(_Int8Tables):
    """int4 weight-only (int4.py). The three recipe options left None are chosen (int4.int4_candidates)."""

    mode: ClassVar[str] = "int4"
    algo: str | None = None  # rtn | gptq | hqq
    block_size: int | None = None  # weights per scale along the input axis; 0: per output channel
    accuracy_level: int = 4  # MatMulNBits compute type; 4 = int8 activations (fast on CPU)
    symmetric: bool = False  # rtn: a grid centred on 0, no zero points
    float_zero_points: bool | None = None  # rtn/gptq: each block's exact min-max grid
    calibration: Path | None = None  # GPTQ's Hessians
    calib: CalibrationConfig = field(default_factory=CalibrationConfig)
    lm_head: str = "auto"  # auto/int8: 8-bit per vocabulary row; fp32; int4: in the 4-bit pass with the body
    embeddings: str = "auto"

    def __post_init__(self) -> None:
        if self.algo is not None:
            _choice("algo", self.algo, ALGOS, "int4 algorithm")
        if self.block_size is not None:
            if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or (
                    self.block_size != PER_CHANNEL and (self.block_size < 16 or self.block_size > MAX_BLOCK_SIZE
                                                        or self.block_size & (self.block_size - 1))):
                raise OnnxpipeError(f"--block-size must be a power of two >= 16 (at most {MAX_BLOCK_SIZE}), or 0 for "
                                    f"per channel; got {self.block_size}")
        if self.block_size == PER_CHANNEL and self.algo == "hqq":
            raise OnnxpipeError("--block-size 0 (per channel) supports --algo rtn and gptq, not hqq")
        _int("--accuracy-level", self.accuracy_level, 0, 4)
        _optional_bool("symmetric", self.symmetric)
        if self.symmetric and not (self.algo in (None, "rtn") and self.block_size != PER_CHANNEL):
            raise OnnxpipeError(SYMMETRIC_ONLY)
        _optional_bool("float_zero_points", self.float_zero_points)
        if self.float_zero_points and not (self.algo in (None, "rtn", "gptq") and self.block_size != PER_CHANNEL
                                           and not self.symmetric):
            raise OnnxpipeError(FLOAT_ZERO_POINTS_ONLY)
        self._check_tables(INT4_LM_HEAD)
        if self.algo == "gptq" and self.calibration is None:
            raise OnnxpipeError("int4 with --algo gptq needs calibration text: pass --calibration FILE (text or "
                                "JSONL), e.g. data/calibration.txt")

    def needs_calibration(self) -> bool:
        return self.algo == "gptq"

    def params(self) -> dict[str, Any]:
        return {"algo": self.algo, "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                "symmetric": self.symmetric, "float_zero_points": self.float_zero_points}


@dataclass(frozen=True)
class Fp16Config:
    """fp16 mixed precision with fp32 islands (fp16.py): the LM head and the embeddings are fp16 too."""

    mode: ClassVar[str] = "fp16"
    lm_head: ClassVar[str] = "fp16"
    embeddings: ClassVar[str] = "fp16"
    calibration: ClassVar[None] = None

    def needs_calibration(self) -> bool:
        return False

    def params(self) -> dict[str, Any]:
        return {}


ModeConfig = Union[DynamicInt8Config, StaticInt8Config, Int4Config, Fp16Config]
MODE_CONFIGS: dict[str, Any] = {c.mode: c for c in (DynamicInt8Config, StaticInt8Config, Int4Config, Fp16Config)}


@dataclass(frozen=True)
class QuantizeConfig:
    """One quantize run as asked: the mode's config, and the quality report's options (None: the default)."""

    mode_config: ModeConfig
    eval_file: Path | None = None  # held-out text; data/eval.txt unless set
    max_eval_tokens: int | None = None  # the report's tokens; quality.DEFAULT_EVAL_TOKENS unless set
    eval_context: int | None = None  # window length; quality.default_context unless set
    max_ppl_increase: float | None = None  # percent; quality.DEFAULT_BUDGET_PCT[mode] unless set
    min_greedy_agreement: float | None = None  # fraction; quality.MIN_GREEDY_AGREEMENT unless set

    def __post_init__(self) -> None:
        if not isinstance(self.mode_config, tuple(MODE_CONFIGS.values())):
            raise OnnxpipeError(f"mode_config must be one of {', '.join(c.__name__ for c in MODE_CONFIGS.values())}")
        _path(self, "eval_file")
        m = self.max_ppl_increase
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0):
            raise OnnxpipeError(f"--max-ppl-increase must be a finite number >= 0 (percent), got {m}")
        g = self.min_greedy_agreement
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 <= g <= 1.0):
            shown = f"{g * 100:g}" if isinstance(g, (int, float)) else repr(g)
            raise OnnxpipeError(f"--min-greedy-agreement must be in [0, 100] (percent), got {shown}")
        t = self.max_eval_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < MIN_EVAL_TOKENS):
            raise OnnxpipeError(f"--eval-tokens must be at least {MIN_EVAL_TOKENS} (fewer make the perplexity change "
                                f"mostly noise), got {t}")
        if t is not None and t > MAX_EVAL_TOKENS:
            raise OnnxpipeError(f"--eval-tokens must be at most {MAX_EVAL_TOKENS}, got {t}")
        if self.eval_context is not None:
            _int("eval_context", self.eval_context, 2, 1 << 20)

    @property
    def mode(self) -> str:
        return self.mode_config.mode

    @classmethod
    def from_options(cls, mode: str, **options: Any) -> "QuantizeConfig":
        """The config of ``mode`` from flat options (quantize_model's keywords, the command line's flags): each
        option goes to the mode's config or to the report's; one the mode does not have is refused, unless it holds
        the value that means "not set" (the command line passes every option)."""
        if mode not in MODE_CONFIGS:
            raise OnnxpipeError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        report = {f.name for f in dataclasses.fields(cls)} - {"mode_config"}
        known = report | set(FLAGS)
        unknown = sorted(set(options) - known)
        if unknown:
            raise OnnxpipeError(f"unknown quantize option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        config_cls = MODE_CONFIGS[mode]
        own = {f.name for f in dataclasses.fields(config_cls)}
        mine: dict[str, Any] = {}
        for name, value in options.items():
            if name in report:
                continue
            if mode == "dynamic" and name == "smoothquant" and value == "off":
                value = None  # off: none, which dynamic's default already is
            if name in own:
                mine[name] = value
            elif name in ("calibration", "calib"):
                continue  # calibration text is read by the modes that calibrate (fp16 does not)
            elif value is not None and value not in NEUTRAL.get(name, ()):
                raise OnnxpipeError(_not_here(mode, name, value))
        return cls(config_cls(**mine), **{k: v for k, v in options.items() if k in report})


def _not_here(mode: str, name: str, value: Any) -> str:
    if mode == "fp16" and name in ("lm_head", "embeddings"):
        if value == "int4":
            return "--lm-head int4 applies to --mode int4 only"
        return "--mode fp16 keeps the LM head and embeddings in fp16; drop --lm-head/--embeddings"
    if name in ONLY:
        return ONLY[name]
    having = [m for m in ("static", "dynamic", "int4") if name in {f.name for f in dataclasses.fields(MODE_CONFIGS[m])}]
    return f"{FLAGS[name]} applies to --mode {' and '.join(having)} only"


__all__ = ["DynamicInt8Config", "Fp16Config", "Int4Config", "ModeConfig", "QuantizeConfig", "StaticInt8Config"]
