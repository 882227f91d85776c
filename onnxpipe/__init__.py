"""onnxpipe: a Hugging Face decoder-only LLM to a fast, verified ONNX model, and its runtime."""

__version__ = "0.1.0"

from onnxpipe.errors import OnnxpipeError  # noqa: E402

__all__ = ["OnnxpipeError", "__version__"]
