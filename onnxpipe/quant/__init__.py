"""quantize: int8 (dynamic, static QDQ), int4 weight-only and fp16 model directories, each with a quality report.

    from onnxpipe.quant import quantize_model
    quantize_model("out/llama-stdlib", "out/llama-stdlib-int8", mode="dynamic")
"""

from onnxpipe.quant.pipeline import MODES, QuantizeConfig, QuantizeResult, describe_result, quantize_model

__all__ = ["MODES", "QuantizeConfig", "QuantizeResult", "describe_result", "quantize_model"]
