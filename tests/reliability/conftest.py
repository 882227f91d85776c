"""Fixtures of the reliability tests (their checks live in cli_checks.py, importable from here)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def model_copy(tiny_onnx: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """model_copy(dest, family="llama") -> a private copy of the tiny exported model at tmp_path/dest."""

    def make(dest: str | Path, family: str = "llama") -> Path:
        out = tmp_path / dest
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tiny_onnx(family), out)
        return out

    return make
