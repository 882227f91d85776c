"""export: Hugging Face decoder-only model -> ONNX with a flat KV cache, checked against PyTorch."""

from onnxpipe.export.exporter import ExportResult, export_decoder
from onnxpipe.export.method import export_model

__all__ = ["ExportResult", "export_decoder", "export_model"]
