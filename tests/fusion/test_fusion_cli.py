"""The optimize command: a table on success, one-line errors on bad input."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from onnxpipe.cli import main


def test_optimize_cli_writes_and_prints_a_table(tiny_onnx, tmp_path: Path) -> None:
    out = tmp_path / "opt"
    result = CliRunner().invoke(main, ["optimize", str(tiny_onnx("qwen2")), "-o", str(out), "--level", "2"])
    assert result.exit_code == 0, result.output
    assert "norms fused 5/5" in result.output and "rotary fused 4/4" in result.output
    assert (out / "onnxpipe.json").is_file() and (out / "model.onnx").is_file()
    again = CliRunner().invoke(main, ["optimize", str(tiny_onnx("qwen2")), "-o", str(out)])
    assert again.exit_code == 1 and "--force" in again.output


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


def test_missing_input_dir(tmp_path: Path) -> None:
    assert "no such model directory" in _one_line_error(["optimize", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])


def test_corrupt_input_dir(tiny_onnx, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_onnx("llama"), bad)
    (bad / "model.onnx").write_bytes(b"not a protobuf at all")
    assert "not a readable ONNX model" in _one_line_error(["optimize", str(bad), "-o", str(tmp_path / "o")])
    (bad / "onnxpipe.json").write_text("{")
    assert "malformed manifest" in _one_line_error(["optimize", str(bad), "-o", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_unknown_pass_lists_the_valid_ones(tiny_onnx, tmp_path: Path) -> None:
    line = _one_line_error(["optimize", str(tiny_onnx("llama")), "-o", str(tmp_path / "o"), "--passes", "norms,fuse_all"])
    assert "unknown pass fuse_all" in line and "attention" in line and "rotary" in line


def test_passes_naming_no_pass_is_refused(tiny_onnx, tmp_path: Path) -> None:
    """`--passes ""` (or ",,") used to write an output with no pass run, exit 0."""
    for empty in ("", " , ,"):
        line = _one_line_error(["optimize", str(tiny_onnx("llama")), "-o", str(tmp_path / "o"), "--passes", empty])
        assert "--passes names no pass" in line and "attention" in line
    assert not (tmp_path / "o").exists()


def test_cuda_target_without_cuda_checks_on_the_cpu(tiny_onnx, tmp_path: Path) -> None:
    """Without a CUDA EP the CUDA form is still checked, on ORT's CPU kernels, and the manifest says so."""
    import json

    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return
    result = CliRunner().invoke(main, ["optimize", str(tiny_onnx("llama")), "-o", str(tmp_path / "o"), "--target", "cuda"])
    assert result.exit_code == 0, result.output
    assert "checked on the CPU EP: this onnxruntime has no CUDA EP" in result.output
    step = json.loads((tmp_path / "o" / "onnxpipe.json").read_text())["steps"][-1]
    assert step["params"]["check_providers"] == ["CPUExecutionProvider"]
    assert step["params"]["check_padding"] == {"reference": "left", "candidate": "right"}
    assert step["check"]["passed"]


