"""onnxpipe: a Hugging Face decoder-only LLM to a fast, verified ONNX model, and its runtime."""

from typing import Any

__version__ = "0.1.0"

from onnxpipe.errors import OnnxpipeError  # noqa: E402

__all__ = ["OnnxpipeError", "__version__", "load"]


def __getattr__(name: str) -> Any:  # `onnxpipe.load` without importing onnxruntime on `import onnxpipe`
    if name == "load":
        from onnxpipe.runtime.generate import load

        return load
    raise AttributeError(f"module 'onnxpipe' has no attribute {name!r}")
