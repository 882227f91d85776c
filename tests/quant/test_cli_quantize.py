"""`onnxpipe quantize` through click's CliRunner: a working run, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxpipe.cli import main

CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"

FAST = ["--eval-tokens", "600", "--calib-samples", "2", "--calib-seq-len", "16"]


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments: str) -> None:  # noqa: ANN001
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_static_run_prints_the_report(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "q"
    r = invoke("quantize", tok_model("llama"), "-o", out, "--mode", "static", "--calibration", CALIBRATION,
               "--eval", small_eval, "--per-channel", "--method", "entropy", *FAST)
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "top-1 agreement" in r.output and "calibration: 2 samples" in r.output
    step = json.loads((out / "onnxpipe.json").read_text())["steps"][-1]
    assert step["stage"] == "quantize" and step["params"]["method"] == "entropy" and step["params"]["per_channel"]


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("empty.txt", "", ["empty.txt", "the calibration file is empty"]),
        ("short.txt", "def f(): pass\n", ["short.txt", "too short", "one sample needs 20"]),
        ("bad.jsonl", '{"text": "fine"}\nnot json\n', ["bad.jsonl:2:", "malformed JSONL"]),
        ("obj.jsonl", '{"content": "x"}\n', ["obj.jsonl:1:", "\"text\" string"]),
    ],
)
def test_bad_calibration_file(tok_model, small_eval: Path, tmp_path: Path, name: str, content: str,
                              fragments: list[str]) -> None:  # noqa: ANN001
    calib = tmp_path / name
    calib.write_text(content)
    out = tmp_path / "q"
    r = invoke("quantize", tok_model("llama"), "-o", out, "--mode", "static", "--calibration", calib, "--eval",
               small_eval, *FAST)
    one_line_error(r, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("extra, op", [
    (["--mode", "dynamic", "--activations", "tensor"], "MatMulInteger"),  # ORT's quantize_dynamic, unfused
    (["--mode", "int4", "--block-size", "0"], "DequantizeLinear"),
])
def test_activations_and_per_channel_flags(tok_model, small_eval: Path, tmp_path: Path, extra: list[str],
                                           op: str) -> None:  # noqa: ANN001
    import onnx

    out = tmp_path / "q"
    r = invoke("quantize", tok_model("llama"), "-o", out, *extra, "--eval", small_eval, *FAST)
    assert r.exit_code == 0, r.output
    step = json.loads((out / "onnxpipe.json").read_text())["steps"][-1]
    assert step["params"].get("activations", "tensor") == "tensor" and step["details"]["quantized_nodes"] == 14
    if extra[1] == "int4":
        assert step["params"]["block_size"] == 0 and step["details"]["block_size"] == "per channel"
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count(op) == 14


def test_static_without_calibration(tok_model, tmp_path: Path) -> None:  # noqa: ANN001
    one_line_error(invoke("quantize", tok_model("llama"), "-o", tmp_path / "q", "--mode", "static"),
                   "static quantization needs calibration text", "--calibration")


def test_gptq_without_calibration(tok_model, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """--algo gptq takes data/calibration.txt by default; where there is none, a one-line error says what to pass."""
    import onnxpipe.quant.pipeline as pipeline

    monkeypatch.setattr(pipeline, "find_calibration_file", lambda: None)
    one_line_error(invoke("quantize", tok_model("llama"), "-o", tmp_path / "q", "--mode", "int4", "--algo", "gptq"),
                   "--algo gptq needs calibration text")


def test_missing_eval_file(tok_model, tmp_path: Path) -> None:  # noqa: ANN001
    one_line_error(invoke("quantize", tok_model("llama"), "-o", tmp_path / "q", "--mode", "dynamic", "--eval",
                          tmp_path / "nope.txt"), "nope.txt: no such eval file")


def test_missing_calibration_file(tok_model, tmp_path: Path) -> None:  # noqa: ANN001
    one_line_error(invoke("quantize", tok_model("llama"), "-o", tmp_path / "q", "--mode", "static", "--calibration",
                          tmp_path / "none.txt"), "none.txt: no such calibration file")


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--mode", "int4", "--smoothquant", "0.5"], ["--smoothquant applies to --mode static and dynamic only"]),
        (["--mode", "static", "--smoothquant", "1.5", "--calibration", str(CALIBRATION)], ["alpha must be in (0, 1]"]),
        (["--mode", "int4", "--block-size", "48"], ["--block-size must be a power of two", "or 0 for per channel"]),
        (["--mode", "int4", "--block-size", "0", "--algo", "hqq"], ["per channel", "not hqq"]),
        (["--mode", "dynamic", "--max-ppl-increase", "-1"], ["--max-ppl-increase must be a finite number >= 0"]),
        (["--mode", "int4", "--eval-tokens", "100"], ["--eval-tokens must be at least 256", "got 100"]),
        (["--mode", "dynamic", "--lm-head", "int4"], ["--lm-head int4 applies to --mode int4 only"]),
        # beyond the model's positions (8192 on a 256-position model grew until the kernel killed quantize)
        (["--mode", "static", "--calibration", str(CALIBRATION), "--calib-seq-len", "200"],
         ["--calib-seq-len 200 exceeds the model's 128 positions", "--calib-seq-len 128 or less"]),
    ],
)
def test_bad_options(tok_model, tmp_path: Path, extra: list[str], fragments: list[str]) -> None:  # noqa: ANN001
    one_line_error(invoke("quantize", tok_model("llama"), "-o", tmp_path / "q", *extra), *fragments)


def test_not_a_model_dir_and_no_tokenizer(tok_model, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    one_line_error(invoke("quantize", tmp_path, "-o", tmp_path / "q", "--mode", "dynamic"), "not an onnxpipe model directory")
    bare = tmp_path / "bare"
    shutil.copytree(tok_model("llama"), bare)
    (bare / "tokenizer.json").unlink()
    one_line_error(invoke("quantize", bare, "-o", tmp_path / "q", "--mode", "dynamic"), "no tokenizer files")


def test_existing_output_needs_force(tok_model, tmp_path: Path) -> None:  # noqa: ANN001
    (tmp_path / "q").mkdir()
    one_line_error(invoke("quantize", tok_model("llama"), "-o", tmp_path / "q", "--mode", "dynamic"), "--force")


def test_already_quantized_input_is_refused(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """A directory with an integer quantize step in its manifest is not quantized again; nothing is written."""
    first = tmp_path / "q8"
    r = invoke("quantize", tok_model("llama"), "-o", first, "--mode", "dynamic", "--activations", "tensor",
               "--eval", small_eval, *FAST)
    assert r.exit_code == 0, r.output
    for mode in ("int4", "dynamic"):
        out = tmp_path / f"again-{mode}"
        one_line_error(invoke("quantize", first, "-o", out, "--mode", mode, "--eval", small_eval, *FAST),
                       str(first), "is already quantized", "manifest step 1: quantize --mode dynamic")
        assert not out.exists()


def test_check_form_layerwise_from_the_command_line(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "q"
    r = invoke("quantize", tok_model("llama"), "-o", out, "--mode", "int4", "--algo", "rtn", "--block-size", "32",
               "--zero-points", "int", "--check-form", "layerwise", "--eval", small_eval, *FAST)
    assert r.exit_code == 0, r.output
    assert "checks layer by layer" in r.output and "the input model then the quantized one" in r.output
    step = json.loads((out / "onnxpipe.json").read_text())["steps"][-1]
    assert step["check_form"] == "layerwise" and step["check"]["form"] == "layerwise"
    bad = invoke("quantize", tok_model("llama"), "-o", tmp_path / "bad", "--mode", "int4", "--check-form", "segments")
    assert bad.exit_code == 2 and "--check-form" in bad.output and not (tmp_path / "bad").exists()
