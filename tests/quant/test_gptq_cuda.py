"""GPTQ's device path on CUDA (the GPU host): the Hessians summed and held in GPU memory equal numpy's float64 sum,
the proxy losses made there equal numpy's, and streamed GPTQ of a tiny model runs its activations, Hessians and
proxy losses there. Skipped, with the reason, where onnxruntime's CUDA EP cannot start.

    python -m pytest -q -rs -m gpu tests/quant/test_gptq_cuda.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gpu.conftest import cuda_missing

from onnxpipe.quant.gptq import gptq_weight, rtn_weight
from onnxpipe.quant.hessian import HessianSums

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(cuda_missing() is not None, reason=str(cuda_missing()))]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_sums_and_proxy_losses_are_numpys(dtype: type) -> None:
    rng = np.random.default_rng(0)
    k = 320
    batches = [rng.normal(size=(4, 100, k)).astype(dtype) for _ in range(5)]
    sums = HessianSums("cuda")
    assert sums.engine == "onnxruntime"
    for x in batches:
        sums.add("x", x)
    xs = np.concatenate([b.reshape(-1, k).astype(np.float64) for b in batches])
    want = 2 * xs.T @ xs / len(xs)
    got = sums.take("x")
    assert sums._sums["x"].device_name().lower() == "cuda"  # the sums stay on the GPU for the proxy losses
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    w = rng.normal(size=(k, 48)) * 0.05
    qw = gptq_weight(w, want, 32)
    losses = sums.proxy_losses("x", w, qw, 32)
    numpy_losses = [float(((want @ d) * d).sum()) for d in (w - qw.dequantize(k), w - rtn_weight(w, 32))]
    assert losses == pytest.approx(numpy_losses, rel=1e-9)


def test_streamed_gptq_on_cuda(tok_model, tmp_path: Path) -> None:  # noqa: ANN001
    import onnx_ir as ir
    from quant.test_streamed import CALIBRATION, _samples

    from onnxpipe.artifact import ModelDir
    from onnxpipe.quant.config import Int4Config
    from onnxpipe.quant.gptq_stream import counted_feeds, quantize_gptq_streamed
    from onnxpipe.quant.quality import prefill_feed
    from onnxpipe.quant.rtn_stream import read_plan

    src = ModelDir.open(tok_model("llama"))
    samples, calib = _samples(src.path)
    cfg = Int4Config(algo="gptq", block_size=32, calibration=CALIBRATION, calib=calib, lm_head="fp32",
                     embeddings="fp32")
    model = ir.load(str(src.model_path))
    feeds = counted_feeds(lambda: (prefill_feed(src.manifest, samples[b:b + 2]) for b in range(0, len(samples), 2)),
                          2, None)
    details = quantize_gptq_streamed(model, read_plan(model, src.manifest.graph["logits"]), cfg, feeds,
                                     tmp_path / "work", provider="cuda")
    g = details["gptq"]
    assert g["provider"] == "cuda" and g["passes"] == 1 and g["quantized_nodes"] == 14
    assert 0 < g["proxy_loss_vs_rtn"] < 1
    assert not (tmp_path / "work").exists()
