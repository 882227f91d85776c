"""Running out of disk or memory during optimize is an error naming its cause, the pass and the size involved;
never a rolled-back pass (a pass that was never judged), and nothing is written."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxpipe.cli import main
from onnxpipe.errors import OnnxpipeError
from onnxpipe.fusion import optimize_model, pipeline


def _fail_on_call(n: int, exc: BaseException, real):
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)

    return wrapped


def test_no_space_while_snapshotting_a_pass_is_an_error(tiny_onnx, tmp_path: Path, monkeypatch) -> None:
    # call 1 snapshots the input, call 2 the result of the first pass (norms)
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "snap"))
    monkeypatch.setattr(pipeline, "snapshot", _fail_on_call(2, full, pipeline.snapshot))
    with pytest.raises(OnnxpipeError, match=r"^optimize: no space left on device snapshotting the result .*snap "
                                            r"\(pass norms\): need ~\d+ MB, [\d.]+ GB free$"):
        optimize_model(tiny_onnx("llama"), tmp_path / "out", passes=["norms", "rotary"])
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written, no temporary directory, no lock


@pytest.mark.parametrize("exc", [
    MemoryError(),
    "ort",  # an ORT allocation failure, as onnxruntime raises it
], ids=["MemoryError", "ort-allocation"])
def test_out_of_memory_in_a_check_is_an_error(exc, tiny_onnx, tmp_path: Path, monkeypatch) -> None:
    if exc == "ort":
        from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

        exc = RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for "
                               "requested buffer of size 268435456")
    monkeypatch.setattr(pipeline, "_session", _fail_on_call(1, exc, pipeline._session))
    with pytest.raises(OnnxpipeError, match=r"^optimize: out of memory checking the result \(pass norms\): "
                                            r"the weights alone are ~\d+ MB"):
        optimize_model(tiny_onnx("llama"), tmp_path / "out", passes=["norms"])
    assert not (tmp_path / "out").exists()


def test_out_of_memory_in_a_pass_is_an_error(tiny_onnx, tmp_path: Path, monkeypatch) -> None:
    from onnxpipe.fusion import norms

    def exhausted(model, ctx):
        raise MemoryError()

    monkeypatch.setattr(pipeline, "PASSES", tuple(
        pipeline.FusionPass(p.name, p.level, exhausted, p.description, p.needs_shapes) if p.run is norms.fuse_norms
        else p for p in pipeline.PASSES))
    with pytest.raises(OnnxpipeError, match=r"^optimize: out of memory running the pass \(pass norms\)"):
        optimize_model(tiny_onnx("llama"), tmp_path / "out", passes=["norms"])


@pytest.mark.parametrize("layout", ["inline", "external-data"])
def test_no_space_writing_the_output_is_a_one_line_cli_error(layout: str, tiny_onnx, tmp_path: Path,
                                                             monkeypatch) -> None:
    import onnxpipe.artifact as artifact

    def full(model, where, *args, **kwargs):
        where = Path(where)
        raise OSError(errno.ENOSPC, "No space left on device", str(where if where.suffix else where / "model.onnx"))

    if layout == "inline":
        monkeypatch.setattr(pipeline, "save_inline", full)
    else:
        monkeypatch.setattr(artifact, "EXTERNAL_DATA_THRESHOLD", 0)
        monkeypatch.setattr(artifact, "save_onnx", full)
    result = CliRunner().invoke(main, ["optimize", str(tiny_onnx("llama")), "-o", str(tmp_path / "out"),
                                       "--passes", "norms"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: optimize: no space left on device writing ") and "model.onnx" in last, last
    assert "need ~" in last and "Traceback" not in result.output
    assert "rolled_back" not in result.output
    assert "[1/1] norms" in result.output  # progress: the pass, n/m
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-written output, no temporary directory, no lock


def test_a_numerical_fault_is_still_a_rollback(tiny_onnx, tmp_path: Path, monkeypatch) -> None:
    """The other side of the line: an ORT failure to run the pass's graph or a mismatch stays a rollback."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph

    monkeypatch.setattr(pipeline, "_session", _fail_on_call(2, InvalidGraph("[ONNXRuntimeError] : 10 : "
                                                                            "INVALID_GRAPH : bad node"),
                                                            pipeline._session))
    result = optimize_model(tiny_onnx("llama"), tmp_path / "out", passes=["norms"])
    assert result.passes[0].status == "rolled_back" and "ORT could not run the result" in result.passes[0].reason
