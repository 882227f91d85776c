"""`onnxpipe export` freezes the garbage collector for the process's exit only: a caller running the command in its
own process (a test, a notebook) keeps collecting what it frees afterwards."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

from click.testing import CliRunner

from onnxpipe.cli import main


def test_export_leaves_the_callers_collector_as_it_was(tiny_hf: Callable[[str], Path], tmp_path: Path) -> None:
    before = gc.get_freeze_count()
    r = CliRunner().invoke(main, ["export", str(tiny_hf("llama")), "-o", str(tmp_path / "out"), "--no-verify"])
    assert r.exit_code == 0, r.output
    assert gc.get_freeze_count() == before
