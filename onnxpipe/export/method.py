"""Which export runs: the traced one (exporter.py: the whole model loaded and traced) or the stamped one
(stream.py: a one-layer slice traced, stamped to depth, the weights streamed from the checkpoint).

``auto`` takes the stamped export where it applies (a Hugging Face directory with safetensors weights, a model type
of stamp.STAMPED_MODEL_TYPES, layers of one kind) and the traced one otherwise, and says which and why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from onnxpipe.artifact import check_output_dir, check_sidecar_links
from onnxpipe.errors import OnnxpipeError
from onnxpipe.export import gguf
from onnxpipe.export.checkpoint import has_safetensors
from onnxpipe.export.exporter import ExportResult, export_decoder, hf_source_root, read_hf_config
from onnxpipe.export.stamp import STAMPED_MODEL_TYPES, StampUnsupported
from onnxpipe.export.stream import export_stamped
from onnxpipe.outputs import check_io_paths

METHODS = ("auto", "traced", "stamped")


def stamped_gap(src: Path) -> str | None:
    """Why the stamped export does not apply to ``src`` (None: it does, as far as can be told before tracing)."""
    if gguf.looks_like_gguf(src):
        return "a GGUF source"
    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "no readable config.json"
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in STAMPED_MODEL_TYPES:
        return f"model type {model_type!r} (stamped: {', '.join(STAMPED_MODEL_TYPES)})"
    if not has_safetensors(src):
        return "no safetensors weights"
    return None


def export_model(src: str | Path, out_dir: str | Path, *, method: str = "auto",
                 log: Callable[[str], None] = lambda msg: None, **options: Any) -> ExportResult:
    """export_decoder or stream.export_stamped, as ``method`` says (``auto``: stamped where it applies).
    ``options["progress"]`` (label, done, total) is moved by the stamped export's weight writing."""
    progress = options.pop("progress", None)
    if method not in METHODS:
        raise OnnxpipeError(f"unknown export method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "traced":
        return export_decoder(src, out_dir, log=log, **options)
    src, out_dir = Path(src), Path(out_dir)
    if not gguf.looks_like_gguf(src):  # bad input fails in one line, before any line about the method
        check_sidecar_links(src, hf_source_root(src))
        read_hf_config(src)
        check_io_paths([src], out_dir)
        check_output_dir(out_dir, bool(options.get("force", False)))
    gap = stamped_gap(src)
    if gap is not None:
        if method == "stamped":
            raise OnnxpipeError(f"{src}: the stamped export does not apply: {gap}; use --method traced")
        if not gguf.looks_like_gguf(src):  # a GGUF file is checked inside export_decoder: no line before its error
            log(f"export method: traced ({gap})")
        return export_decoder(src, out_dir, log=log, **options)
    try:  # it says "export method: stamped" once its own checks of the source pass
        return export_stamped(src, out_dir, log=log, progress=progress, **options)
    except StampUnsupported as e:  # raised while tracing the slice, before anything is written
        if method == "stamped":
            raise
        log(f"export method: traced (the stamped export does not apply: {e})")
        return export_decoder(src, out_dir, log=log, **options)
