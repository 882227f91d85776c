"""The inference library: load a model directory, generate text (streamed or not), on the best provider."""

from __future__ import annotations

from typing import Any

__all__ = ["load", "open_session", "create_session", "ProviderChoice", "TensorRTOptions"]


def __getattr__(name: str) -> Any:  # lazy: importing onnxpipe.runtime must not import onnxruntime
    if name == "load":
        from onnxpipe.runtime.generate import load

        return load
    if name in ("create_session", "ProviderChoice", "TensorRTOptions"):
        from onnxpipe.runtime import providers

        return getattr(providers, name)
    if name == "open_session":
        from onnxpipe.runtime.sessions import open_session

        return open_session
    raise AttributeError(f"module 'onnxpipe.runtime' has no attribute {name!r}")
