"""Progress without a terminal: a batch job's log gets a line when a phase starts, at most one every so often while
it runs, and one when it ends (issue 17: GPTQ of an 8B ran 20 minutes with no line in its log)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxpipe import cli


@pytest.mark.fast
def test_lines_without_a_terminal(monkeypatch, capsys) -> None:  # noqa: ANN001
    clock = iter([0.0, 1.0, 2.0, 31.0, 32.0, 33.0, 100.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    update = cli._progress_bars(every_s=30.0)
    for done in range(6):  # t = 0, 1, 2, 31, 32, 33
        update("gptq layers", done, 10)
    update("gptq layers", 10, 10)  # t = 100: the end, always said
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["gptq layers: 0/10", "gptq layers: 3/10", "gptq layers: 10/10"]


@pytest.mark.fast
def test_a_label_said_again_starts_afresh(monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setattr(cli.time, "monotonic", lambda: 5.0)
    update = cli._progress_bars()
    for label in ("quality report", "quality report"):  # the input model, then the quantized one
        update(label, 0, 2)
        update(label, 1, 2)
        update(label, 2, 2)
    assert capsys.readouterr().err.strip().splitlines() == ["quality report: 0/2", "quality report: 2/2"] * 2


def test_gptq_says_its_layers_in_a_log(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    from click.testing import CliRunner
    from quant.conftest import CALIBRATION

    r = CliRunner().invoke(cli.main, ["quantize", str(tok_model("llama")), "-o", str(tmp_path / "q"), "--mode", "int4",
                                      "--algo", "gptq", "--block-size", "32", "--calibration", str(CALIBRATION),
                                      "--eval", str(small_eval), "--eval-tokens", "600", "--calib-samples", "2",
                                      "--calib-seq-len", "16"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    counts = [ln for ln in r.output.splitlines() if ln.startswith("gptq layers: ")]
    assert counts and counts[-1].split(": ")[1].split("/")[0] == counts[-1].split("/")[1], r.output
