"""`optimize --level 3 --target cuda` with every pass checked on the CUDA EP, for a tiny fp16 model of each family:
the checks really ran on CUDA, the final check passed, and attention became GroupQueryAttention (GPT-2 too, groups
of one). On an H100 (2026-11-23) all six passed with final rel err 0.00047-0.00102 and greedy agreement 100%,
GPT-2 then still in its MultiHeadAttention form (docs/optimize.md)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_optimize_for_cuda_is_checked_on_the_cuda_ep(tiny_onnx, tmp_path, family):
    from onnxpipe.fusion import optimize_model

    result = optimize_model(tiny_onnx(family, "fp16"), tmp_path / "cuda", level=3, target="cuda")
    step = result.model_dir.manifest.steps[-1]
    assert step["params"]["check_providers"][0] == "CUDAExecutionProvider"
    assert result.check is not None and result.check.passed, result.check
    assert "GroupQueryAttention" in result.model_dir.manifest.graph["fused_ops"]
