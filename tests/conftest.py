"""Shared fixtures: tiny Hugging Face models and their exports, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tiny_hf(family) -> a Hugging Face directory with a random-weight 2-layer model (cached per session)."""
    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_model(family, tmp_path_factory.mktemp(f"hf-{family}"))
        return cache[family]

    return build


@pytest.fixture(scope="session")
def tiny_onnx(tiny_hf: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_onnx(family, dtype="fp32") -> an exported, parity-checked onnxpipe model directory (cached)."""
    from onnxpipe.export import export_decoder

    cache: dict[tuple[str, str], Path] = {}

    def build(family: str, dtype: str = "fp32") -> Path:
        key = (family, dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"onnx-{family}-{dtype}") / "model"
            export_decoder(tiny_hf(family), out, dtype=dtype)
            cache[key] = out
        return cache[key]

    return build


@pytest.fixture(scope="session")
def cuda_form(tiny_onnx: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """cuda_form(family) -> the tiny model's `optimize --level 3 --target cuda` directory (cached)."""
    from onnxpipe.fusion import optimize_model

    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"cuda-{family}") / "model"
            optimize_model(tiny_onnx(family), out, level=3, target="cuda")
            cache[family] = out
        return cache[family]

    return build



# The fast tier (`make test-fast`, `pytest -m fast`) for the edit loop: the tests that build no model. A test builds
# one when it uses a fixture of the tiny_hf chain (tiny_onnx, cuda_form, and the model fixtures of tests/runtime
# and tests/score start there) or when its module (or its directory's conftest.py) calls a model-building function
# itself; both are found here, so a new test needs no marker of its own.
BUILDS_MODEL = ("make_tiny_model", "export_decoder", "optimize_model", "quantize_model", "from_pretrained")
_builds: dict[Path, bool] = {}


def _module_builds_model(path: Path) -> bool:
    if path not in _builds:
        sources = [path] + ([path.parent / "conftest.py"] if path.parent != Path(__file__).parent else [])
        text = "".join(p.read_text() for p in sources if p.is_file())
        _builds[path] = any(name in text for name in BUILDS_MODEL)
    return _builds[path]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        builds = "tiny_hf" in getattr(item, "fixturenames", ()) or _module_builds_model(Path(item.path))
        if not builds and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)
