"""One frozen config per mode: only that mode's options, each checked when made (a one-line error naming it);
options of another mode refused; what a run derives recorded apart from its config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant import DynamicInt8Config, Fp16Config, Int4Config, QuantizeConfig, StaticInt8Config
from onnxpipe.quant.calibration import CalibrationConfig
from onnxpipe.quant.pipeline import RunSettings, step_params

pytestmark = pytest.mark.fast
NAN, INF = float("nan"), float("inf")
CAL = Path("data/calibration.txt")


def test_configs_are_frozen_and_hold_only_their_mode() -> None:
    configs = [DynamicInt8Config(activations="token"), StaticInt8Config(calibration=CAL), Int4Config(algo="rtn"),
               Fp16Config(), QuantizeConfig(Fp16Config()), CalibrationConfig()]
    for cfg in configs:
        name = dataclasses.fields(cfg)[0].name if dataclasses.fields(cfg) else "x"
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, name, None)
    fields = {c.__name__: {f.name for f in dataclasses.fields(c)} for c in (DynamicInt8Config, StaticInt8Config,
                                                                            Int4Config, Fp16Config)}
    assert "block_size" not in fields["DynamicInt8Config"] | fields["StaticInt8Config"]
    assert "method" in fields["StaticInt8Config"] and "method" not in fields["Int4Config"]
    assert "activations" in fields["DynamicInt8Config"] and "activations" not in fields["StaticInt8Config"]
    assert fields["Fp16Config"] == set()
    assert isinstance(StaticInt8Config(calibration="c.txt").calibration, Path)  # a str path normalized when made


@pytest.mark.parametrize("make, message", [
    (lambda: DynamicInt8Config(activations="token", smoothquant=NAN), r"--smoothquant alpha must be in \(0, 1\]"),
    (lambda: DynamicInt8Config(activations="token", smoothquant=0.0), r"--smoothquant alpha must be in \(0, 1\]"),
    (lambda: DynamicInt8Config(activations="token", smoothquant="auto"), "--smoothquant auto applies to --mode static"),
    (lambda: DynamicInt8Config(calibration=CAL, token_threshold=NAN), r"token_threshold must be a number in \[0, 1\]"),
    (lambda: DynamicInt8Config(activations="token", token_threshold=0.1), "token_threshold applies to --activations auto"),
    (lambda: DynamicInt8Config(activations="sometimes"), "unknown activation scale 'sometimes'"),
    (lambda: DynamicInt8Config(), "dynamic int8 chooses activation scales from calibration text"),
    (lambda: DynamicInt8Config(activations="token", lm_head="int4"), "--lm-head int4 applies to --mode int4 only"),
    (lambda: DynamicInt8Config(activations="token", embeddings="int4"), "unknown --embeddings 'int4'"),
    (lambda: StaticInt8Config(), "static quantization needs calibration text"),
    (lambda: StaticInt8Config(calibration=CAL, static_float_layers=-1), "--static-float-layers must be an integer"),
    (lambda: StaticInt8Config(calibration=CAL, method="median"), "unknown calibration method 'median'"),
    (lambda: StaticInt8Config(calibration=CAL, per_channel="yes"), "--per-channel/--per-tensor must be true or false"),
    (lambda: StaticInt8Config(calibration=CAL, smoothquant=INF), r"--smoothquant alpha must be in \(0, 1\]"),
    (lambda: Int4Config(block_size=48), "--block-size must be a power of two >= 16"),
    (lambda: Int4Config(block_size=1 << 30), "--block-size must be a power of two >= 16 .at most 65536."),
    (lambda: Int4Config(block_size=True), "--block-size must be a power of two"),
    (lambda: Int4Config(block_size=0, algo="hqq"), "not hqq"),
    (lambda: Int4Config(accuracy_level=7), r"--accuracy-level must be an integer in 0..4, got 7"),
    (lambda: Int4Config(algo="gptq"), "int4 with --algo gptq needs calibration text"),
    (lambda: Int4Config(algo="hqq", symmetric=True), "--symmetric applies to --mode int4 --algo rtn"),
    (lambda: Int4Config(block_size=0, float_zero_points=True), "--zero-points float applies to"),
    (lambda: QuantizeConfig(Fp16Config(), max_ppl_increase=NAN), "--max-ppl-increase must be a finite number >= 0"),
    (lambda: QuantizeConfig(Fp16Config(), max_ppl_increase=INF), "--max-ppl-increase must be a finite number >= 0"),
    (lambda: QuantizeConfig(Fp16Config(), min_greedy_agreement=NAN), r"--min-greedy-agreement must be in \[0, 100\]"),
    (lambda: QuantizeConfig(Fp16Config(), min_greedy_agreement=1.5), r"--min-greedy-agreement .* got 150"),
    (lambda: QuantizeConfig(Fp16Config(), max_eval_tokens=100), "--eval-tokens must be at least 256 .*got 100"),
    (lambda: QuantizeConfig(Fp16Config(), max_eval_tokens=10**12), "--eval-tokens must be at most"),
    (lambda: QuantizeConfig(Fp16Config(), eval_context=0), "eval_context must be an integer in 2.."),
    (lambda: QuantizeConfig(Fp16Config(), eval_file=3), "must be a file path"),
    (lambda: QuantizeConfig("fp16"), "mode_config must be one of"),
    (lambda: CalibrationConfig(max_samples=0), r"calibration max_samples \(--calib-samples\) must be an integer in 1..4096"),
    (lambda: CalibrationConfig(prefill_len=1), r"calibration prefill_len \(--calib-seq-len\)"),
    (lambda: CalibrationConfig(batch_size=2.5), "calibration batch_size must be an integer"),
    (lambda: Int4Config(calib={"max_samples": 2}), "calib must be a CalibrationConfig"),
])
def test_each_bad_field_is_one_line_naming_it(make, message: str) -> None:  # noqa: ANN001
    with pytest.raises(OnnxpipeError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode, options, message", [
    ("int4", {"smoothquant": 0.5}, "--smoothquant applies to --mode static and dynamic only"),
    ("int4", {"smoothquant": "off"}, "--smoothquant applies to --mode static and dynamic only"),
    ("dynamic", {"activations": "token", "static_float_layers": 2}, "--static-float-layers applies to --mode static only"),
    ("dynamic", {"activations": "token", "block_size": 32}, "--block-size applies to --mode int4 only"),
    ("static", {"calibration": CAL, "activations": "token"}, "--activations applies to --mode dynamic only"),
    ("static", {"calibration": CAL, "accuracy_level": 0}, "--accuracy-level applies to --mode int4 only"),
    ("fp16", {"lm_head": "int8"}, "--mode fp16 keeps the LM head and embeddings in fp16"),
    ("fp16", {"lm_head": "int4"}, "--lm-head int4 applies to --mode int4 only"),
    ("fp16", {"per_channel": True}, "--per-channel/--per-tensor applies to --mode static only"),
    ("int8", {}, "unknown mode 'int8'"),
    ("int4", {"blocksize": 32}, "unknown quantize option 'blocksize'"),
])
def test_an_option_of_another_mode_is_refused(mode: str, options: dict, message: str) -> None:
    with pytest.raises(OnnxpipeError, match=message):
        QuantizeConfig.from_options(mode, **options)


def test_the_command_lines_defaults_pass_every_mode() -> None:
    """The command line passes every option: the values that mean "not set" are dropped where a mode lacks them."""
    flags = dict(calibration=None, method=None, per_channel=None, static_float_layers=None, activations="auto",
                 smoothquant=None, block_size=None, algo=None, accuracy_level=4, symmetric=False,
                 float_zero_points=None, lm_head="auto", embeddings="auto", eval_file=None, max_eval_tokens=None,
                 max_ppl_increase=None, calib=CalibrationConfig(max_samples=2), min_greedy_agreement=None)
    assert QuantizeConfig.from_options("fp16", **flags).mode_config == Fp16Config()
    assert QuantizeConfig.from_options("int4", **flags).mode_config == Int4Config(calib=CalibrationConfig(max_samples=2))
    static = QuantizeConfig.from_options("static", **{**flags, "calibration": CAL})
    assert static.mode == "static" and static.mode_config.calib.max_samples == 2
    dynamic = QuantizeConfig.from_options("dynamic", **{**flags, "activations": "tensor", "smoothquant": "off"})
    assert dynamic.mode_config == DynamicInt8Config(activations="tensor", calib=CalibrationConfig(max_samples=2))


def test_recorded_params_are_the_chosen_configs_and_the_runs() -> None:
    run = RunSettings(Path("data/eval.txt"), 8192, None, 5.0, 0.8)
    report = {"eval_file": "data/eval.txt", "max_eval_tokens": 8192, "max_ppl_increase": 5.0,
              "min_greedy_agreement": 0.8}
    chosen = Int4Config(algo="rtn", block_size=128, float_zero_points=False, calibration=CAL)
    assert step_params(chosen, run) == {
        "mode": "int4", "lm_head": "auto", "embeddings": "auto", "algo": "rtn", "block_size": 128,
        "accuracy_level": 4, "symmetric": False, "float_zero_points": False, **report}
    gptq = dataclasses.replace(chosen, algo="gptq")
    assert step_params(gptq, run)["calibration"] == str(CAL)
    assert step_params(gptq, run)["calibration_config"] == CalibrationConfig().to_json()
    static = StaticInt8Config(calibration=CAL, method="minmax", per_channel=True, smoothquant="off",
                              static_float_layers=0)
    p = step_params(static, run)
    assert (p["method"], p["per_channel"], p["smoothquant"], p["static_float_layers"]) == ("minmax", True, None, 0)
    assert step_params(Fp16Config(), run) == {"mode": "fp16", "lm_head": "fp16", "embeddings": "fp16", **report}
    token = step_params(DynamicInt8Config(activations="token"), run)
    assert token["activations"] == "token" and "calibration" not in token and "token_threshold" not in token
