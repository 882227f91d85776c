"""What this onnxruntime can run: contrib-op kernels per EP (with their float types) and contrib-op input names.

Asked in a child process: onnxruntime-gpu 1.31.1 on the GPU machine was seen to segfault in get_all_opkernel_def()
right after failing to load its TensorRT provider library, which must not take the optimize stage down with it.
When the child fails, the answer is None and the caller says so and falls back.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from typing import Any

_QUERY = r"""
import json
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as C
floats = {"fp32": "tensor(float)", "fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}
kernels = {}
for k in C.get_all_opkernel_def():
    if k.domain != "com.microsoft" and k.op_name != "SimplifiedLayerNormalization":
        continue
    types = kernels.setdefault(k.provider, {}).setdefault(k.op_name, [])
    for name, t in floats.items():
        if any(t in allowed for allowed in k.type_constraints.values()) and name not in types:
            types.append(name)
inputs = {s.name: [i.name for i in s.inputs] for s in C.get_all_operator_schema()
          if s.domain == "com.microsoft" and s.name in ("GroupQueryAttention", "MultiHeadAttention", "RotaryEmbedding")}
print(json.dumps({"version": ort.__version__, "providers": ort.get_available_providers(), "kernels": kernels,
                  "inputs": inputs}))
"""


@functools.lru_cache(maxsize=1)
def onnxruntime_capabilities() -> dict[str, Any] | None:
    try:
        proc = subprocess.run([sys.executable, "-c", _QUERY], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def op_inputs(op: str) -> list[str] | None:
    """The input names of a com.microsoft op's schema in this onnxruntime, or None if unknown."""
    caps = onnxruntime_capabilities()
    return None if caps is None else caps["inputs"].get(op)
