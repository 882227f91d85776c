"""The stamped export writes its weights on threads while the check's PyTorch side runs: either one failing stops
the other, the first error is the one raised, and nothing is left behind."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from onnxpipe.errors import OnnxpipeError


def _writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("export-writer")]


def test_a_failing_reference_stops_the_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tiny import make_tiny_model

    from onnxpipe.export import stream, writer

    stopped: list[str] = []
    real_job = writer.write_job

    def held_job(fd: int, ckpt: Any, job: Any, dtype: str, stop: Any = None) -> int:
        if "layers.1." in job.source or "layers.2." in job.source:  # not checked: written after the first ones
            stop.wait(10)  # until the failed reference stops the writing
        try:
            return real_job(fd, ckpt, job, dtype, stop)
        except writer.Stopped:
            stopped.append(job.source)
            raise

    def failing_reference(*args: Any, **kwargs: Any) -> Any:
        raise OnnxpipeError("the reference broke")

    monkeypatch.setattr(writer, "write_job", held_job)
    monkeypatch.setattr(writer, "available_cores", lambda: 4)  # enough to overlap: 2 writing, 2 for torch
    monkeypatch.setattr(stream, "reference_trace", failing_reference)
    hf = make_tiny_model("llama", tmp_path / "hf", num_hidden_layers=4)
    out = tmp_path / "out"
    with pytest.raises(OnnxpipeError, match="the reference broke"):
        stream.export_stamped(hf, out, parity_layers=1)  # checks layers 0 and 3
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert stopped and all("layers.1." in s or "layers.2." in s for s in stopped)  # only the unchecked ones
    assert not _writer_threads()


def test_a_failing_writer_is_the_error_raised(tiny_hf: Callable[[str], Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxpipe.export import stream, writer

    called: list[int] = []

    def broken_job(*args: Any, **kwargs: Any) -> int:
        raise OnnxpipeError("weight x: 1 values do not fit fp16")

    monkeypatch.setattr(writer, "write_job", broken_job)
    monkeypatch.setattr(stream, "reference_trace", lambda *a, **k: called.append(1))
    out = tmp_path / "out"
    with pytest.raises(OnnxpipeError, match="do not fit fp16"):
        stream.export_stamped(tiny_hf("llama"), out)
    assert not called  # the reference did not start: the first tensors were never written
    assert not out.exists() and not _writer_threads()


def test_overlapped_and_sequential_exports_agree(tiny_hf: Callable[[str], Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With 4 cores the reference runs while the weights are written, with 2 after: the same bytes, the same
    check."""
    import torch

    from onnxpipe.artifact import ModelDir
    from onnxpipe.export import stream, writer

    threads = torch.get_num_threads()
    results = {}
    for cores in (4, 2):
        monkeypatch.setattr(writer, "available_cores", lambda n=cores: n)
        lines: list[str] = []
        out = tmp_path / f"cores-{cores}"
        stream.export_stamped(tiny_hf("llama"), out, log=lines.append)
        assert any("while the other weights are written" in line for line in lines) == (cores == 4)
        results[cores] = out
    a, b = (ModelDir.open(results[c]) for c in (4, 2))
    assert (results[4] / "model.onnx.data").read_bytes() == (results[2] / "model.onnx.data").read_bytes()
    assert (results[4] / "model.onnx").read_bytes() == (results[2] / "model.onnx").read_bytes()
    check_a, check_b = (m.manifest.steps[-1]["check"] for m in (a, b))
    assert check_a["passed"] and check_a["max_abs_err"] == check_b["max_abs_err"]
    assert torch.get_num_threads() == threads


def test_a_wrong_guess_of_the_layout_is_written_again(tiny_hf: Callable[[str], Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights start before the trace, placed as the modules say; where the traced graph says otherwise (here:
    a guess with every transpose flipped) they are written again, and the export is the one a right guess gives."""
    from onnxpipe.export import stream

    right = tmp_path / "right"
    first: list[str] = []
    stream.export_stamped(tiny_hf("llama"), right, log=first.append)
    assert not any("writing them again" in line for line in first)  # the modules' guess is the traced graph's
    real = stream.check_weights

    def flipped(*args: Any) -> list[tuple[str, str, bool]]:
        return [(name, source, not transpose) for name, source, transpose in real(*args)]

    monkeypatch.setattr(stream, "check_weights", flipped)
    lines: list[str] = []
    again = tmp_path / "again"
    stream.export_stamped(tiny_hf("llama"), again, log=lines.append)
    assert any("writing them again" in line for line in lines)
    for name in ("model.onnx", "model.onnx.data"):
        assert (again / name).read_bytes() == (right / name).read_bytes(), name


def test_a_slice_refused_while_the_weights_are_written_leaves_nothing(tiny_hf: Callable[[str], Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` falls back to the traced export when the slice is refused, which now happens after the weights began
    to be written: the writing stops, its temporary directory goes, and the traced export writes the output."""
    from onnxpipe.export import export_model, stream
    from onnxpipe.export.stamp import StampUnsupported

    def refused(*args: Any) -> Any:
        raise StampUnsupported("a layer of a kind the slice does not cover")

    monkeypatch.setattr(stream, "trace_template", refused)
    lines: list[str] = []
    out = tmp_path / "out"
    export_model(tiny_hf("llama"), out, log=lines.append, verify=False)
    assert any("export method: traced (the stamped export does not apply: a layer" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not _writer_threads()
    from onnxpipe.artifact import ModelDir

    assert ModelDir.open(out).manifest.steps[-1]["params"]["method"] == "traced"
