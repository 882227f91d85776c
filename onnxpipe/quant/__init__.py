"""quantize: int8 (dynamic, static QDQ), int4 weight-only and fp16 model directories, each with a quality report.

    from onnxpipe.quant import quantize_model
    quantize_model("out/llama-stdlib", "out/llama-stdlib-int8", mode="dynamic")

    from onnxpipe.quant import Int4Config, QuantizeConfig
    quantize_model("out/llama-stdlib", "out/llama-stdlib-int4", config=QuantizeConfig(Int4Config(algo="rtn")))
"""

from onnxpipe.quant.config import DynamicInt8Config, Fp16Config, Int4Config, QuantizeConfig, StaticInt8Config
from onnxpipe.quant.pipeline import MODES, QuantizeResult, describe_result, quantize_model

__all__ = ["MODES", "DynamicInt8Config", "Fp16Config", "Int4Config", "QuantizeConfig", "QuantizeResult",
           "StaticInt8Config", "describe_result", "quantize_model"]
