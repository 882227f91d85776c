"""Fixtures of the architecture tests: tiny models of every supported model type, exported once per session."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import TINY_CONFIGS  # noqa: E402
from tiny_archs import ARCH_CONFIGS, make_arch_model  # noqa: E402


@pytest.fixture(scope="session")
def arch_hf(tiny_hf: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """arch_hf(model_type) -> a tiny Hugging Face directory (tests/tiny.py's six share tiny_hf's cache)."""
    cache: dict[str, Path] = {}

    def build(model_type: str) -> Path:
        if model_type in TINY_CONFIGS:
            return tiny_hf(model_type)
        if model_type not in cache:
            cache[model_type] = make_arch_model(model_type, tmp_path_factory.mktemp(f"hf-{model_type}"))
        return cache[model_type]

    return build


@pytest.fixture(scope="session")
def arch_onnx(tiny_onnx: Callable[..., Path], arch_hf: Callable[[str], Path],
              tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """arch_onnx(model_type) -> its fp32 export, parity-checked (cached)."""
    from onnxpipe.export import export_decoder

    cache: dict[str, Path] = {}

    def build(model_type: str) -> Path:
        if model_type in TINY_CONFIGS:
            return tiny_onnx(model_type)
        if model_type not in cache:
            out = tmp_path_factory.mktemp(f"onnx-{model_type}") / "model"
            export_decoder(arch_hf(model_type), out)
            cache[model_type] = out
        return cache[model_type]

    return build


@pytest.fixture(scope="session")
def arch_optimized(arch_onnx: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory):
    """arch_optimized(model_type, target) -> its `optimize --level 3` directory for target cpu or cuda (cached)."""
    from onnxpipe.fusion import optimize_model

    cache: dict[tuple[str, str], Path] = {}

    def build(model_type: str, target: str) -> Path:
        if (model_type, target) not in cache:
            out = tmp_path_factory.mktemp(f"opt-{model_type}-{target}") / "model"
            optimize_model(arch_onnx(model_type), out, level=3, target=target)
            cache[model_type, target] = out
        return cache[model_type, target]

    return build
