"""GPTQ's faster arithmetic gives the int4 weights of the plain algorithm: the inverse Hessian's factor by a reversed
Cholesky and a blocked triangular inverse (against numpy's inverse then Cholesky), the column loop with sub-blocks
(against one rank-1 update per column over its whole block), the Hessians summed in gathered products by numpy or
by onnxruntime (against one float64 product per batch), and a tiny model quantized both ways."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxpipe.quant import gptq
from onnxpipe.quant.gptq import (
    MAXQ,
    cholesky_lower,
    gptq_weight,
    group_params,
    inverse_factor,
    lower_inverse,
    rtn_weight,
)
from onnxpipe.quant.hessian import HessianSums, rows_per_product


def reference_factor(hessian: np.ndarray, k_pad: int, percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """The factor as GPTQ's paper writes it: the upper Cholesky factor of inv(H), by numpy's inverse."""
    k = hessian.shape[0]
    h = np.eye(k_pad)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k_pad)] += percdamp * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T, dead


def reference_gptq_weight(weight: np.ndarray, hessian: np.ndarray, group_size: int, percdamp: float = 0.01,
                          blocksize: int = 128, exact: bool = False, factor: tuple | None = None) -> gptq.QuantizedWeight:
    """The column loop as GPTQ's paper writes it: each column's error spread over the rest of its block at once."""
    k, n = weight.shape
    k_blocks = -(-k // group_size)
    k_pad = k_blocks * group_size
    w_all = np.zeros((k_pad, n))
    w_all[:k] = weight
    u, dead = factor if factor is not None else reference_factor(hessian, k_pad, percdamp)
    w_all[dead] = 0.0
    q_int = np.zeros((k_pad, n), np.uint8)
    scales, zeros = np.zeros((k_blocks, n)), np.zeros((k_blocks, n))
    blocksize = max(blocksize - blocksize % group_size, group_size)
    for i1 in range(0, k_pad, blocksize):
        i2 = min(i1 + blocksize, k_pad)
        w1, u1 = w_all[i1:i2].copy(), u[i1:i2, i1:i2]
        e1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            row, g = i1 + i, (i1 + i) // group_size
            if row % group_size == 0:
                scales[g], zeros[g] = group_params(w1[i:i + group_size], exact)
            qi = np.clip(np.round(w1[i] / scales[g] + zeros[g]), 0, MAXQ)
            q_int[row] = qi
            err = (w1[i] - (qi - zeros[g]) * scales[g]) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], err)
            e1[i] = err
        w_all[i2:] -= u[i1:i2, i2:].T @ e1
    return gptq._packed(q_int, scales, zeros, group_size, exact)


def reference_hessians(session, names, feeds) -> dict[str, np.ndarray]:  # noqa: ANN001
    """One float64 product per calibration batch, summed: the Hessians before they were gathered."""
    sums: dict[str, np.ndarray] = {}
    count = 0
    for feed in feeds:
        for name, x in zip(names, session.run(names, feed)):
            x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + x2.T @ x2
        count += x2.shape[0]
    return {name: s * 2.0 / count for name, s in sums.items()}


def hessian(k: int, seed: int = 0, dead: tuple[int, ...] = ()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3 * k, k))
    x[:, 3] *= 10  # an outlier channel, as real activations have
    x = x + 0.5 * x[:, :1]
    x[:, list(dead)] = 0.0  # inputs that never fire
    return 2 * x.T @ x / len(x)


@pytest.mark.fast
@pytest.mark.parametrize("k, block", [(100, 16), (257, 64), (300, 256)])
def test_blocked_cholesky_and_triangular_inverse(k: int, block: int) -> None:
    """Blocks that do not divide K (100 by 16, 257 by 64) and one block that is nearly all of it."""
    h = hessian(k) + np.eye(k)
    lower = cholesky_lower(h.copy(), block)
    np.testing.assert_allclose(lower, np.linalg.cholesky(h), rtol=0, atol=1e-12 * np.abs(lower).max())
    assert not np.triu(lower, 1).any()
    inverse = lower_inverse(lower, block)
    assert not np.triu(inverse, 1).any()
    np.testing.assert_allclose(inverse @ lower, np.eye(k), rtol=0, atol=1e-10)


@pytest.mark.fast
@pytest.mark.parametrize("k, k_pad, dead", [(96, 96, ()), (88, 96, (5, 40)), (300, 320, (0,))])
def test_factor_is_the_upper_cholesky_of_the_inverse(k: int, k_pad: int, dead: tuple[int, ...]) -> None:
    h = hessian(k, dead=dead)
    u, dead_rows = inverse_factor(h, k_pad)
    ref_u, ref_dead = reference_factor(h, k_pad)
    assert np.array_equal(dead_rows, ref_dead) and dead_rows[list(dead)].all()
    assert not np.tril(u, -1).any() and (np.diag(u) > 0).all()
    np.testing.assert_allclose(u, ref_u, rtol=0, atol=1e-11 * np.abs(ref_u).max())


@pytest.mark.fast
@pytest.mark.parametrize("k, n, group, sub", [
    (256, 40, 32, 16),  # groups of two sub-blocks
    (256, 40, 32, 64),  # two groups in each sub-block
    (256, 40, 128, 16),
    (88, 24, 32, 16),  # K padded to whole groups
    (88, 24, 88, 16),  # per channel: one group of K
    (96, 24, 24, 16),  # groups that straddle sub-blocks (neither size divides the other): sub-blocks of a group
    (64, 24, 16, 16),
])
def test_column_loop_gives_the_reference_int4(monkeypatch: pytest.MonkeyPatch, k: int, n: int, group: int,
                                              sub: int) -> None:
    """The same factor in, the same int4 values, scales and zero points out, with integer and float zero points."""
    monkeypatch.setattr(gptq, "SUB_BLOCK", sub)
    rng = np.random.default_rng(1)
    w = rng.normal(size=(k, n)) * 0.05
    h = hessian(k, dead=(7,))
    factor = reference_factor(h, -(-k // group) * group)
    for exact in (False, True):
        got = gptq_weight(w, h, group, exact=exact, factor=factor)
        want = reference_gptq_weight(w, h, group, exact=exact, factor=factor)
        assert np.array_equal(got.q, want.q) and np.array_equal(got.zero_point, want.zero_point)
        np.testing.assert_allclose(got.scale, want.scale, rtol=1e-6)
        if exact:
            np.testing.assert_allclose(got.zero_float, want.zero_float, rtol=1e-9, atol=1e-9)
    # and the whole of it (new factor and loop) against the reference: the same int4 weights
    got, want = gptq_weight(w, h, group), reference_gptq_weight(w, h, group)
    assert np.array_equal(got.q, want.q)


@pytest.mark.fast
@pytest.mark.parametrize("engine", ["numpy", "onnxruntime"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_hessian_sums_are_the_float64_sum(engine: str, dtype: type) -> None:
    """Batches that cross the point where gathered rows are multiplied (rows_per_product), fp32 and fp16
    activations (an fp16 model's), several inputs at once; onnxruntime's proxy losses against numpy's."""
    rng = np.random.default_rng(0)
    sizes = {"a": 64, "b": 40}
    batches = [{name: rng.normal(size=(2, 37, k)).astype(dtype) for name, k in sizes.items()} for _ in range(9)]
    assert 9 * 74 > 2 * rows_per_product(64)  # at least two gathered products and a remainder
    sums = HessianSums("cpu", engine)
    for batch in batches:
        for name, x in batch.items():
            sums.add(name, x)
    for name, k in sizes.items():
        xs = np.concatenate([b[name].reshape(-1, k).astype(np.float64) for b in batches])
        want = 2 * xs.T @ xs / len(xs)
        got = sums.take(name)
        assert got.dtype == np.float64 and sums.rows[name] == len(xs)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
        w = rng.normal(size=(k, 24)) * 0.05  # K = 40: blocks of 16 padded to 48
        qw = gptq_weight(w, want, 16)
        losses = sums.proxy_losses(name, w, qw, 16)
        if engine == "numpy":
            assert losses is None  # computed by the caller, which holds the Hessian
        else:  # GPTQ's and RTN's weights made in the graph, from the int4 values and from the weight
            numpy_losses = [float(((want @ d) * d).sum()) for d in (w - qw.dequantize(k), w - rtn_weight(w, 16))]
            assert losses == pytest.approx(numpy_losses, rel=1e-10) and losses[0] < losses[1]
            assert sums.proxy_losses(name, w, gptq_weight(w, want, 16, exact=True), 16) is None  # float zero points
        sums.release(name)
        assert sums.proxy_losses(name, w, qw, 16) is None


def _int4_tensors(proto: onnx.ModelProto, base: Path) -> dict[str, np.ndarray]:
    onnx.load_external_data_for_model(proto, str(base))
    names = {i for n in proto.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:]}
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in names}


@pytest.mark.parametrize("engine", ["numpy", "onnxruntime"])
def test_tiny_model_gets_the_reference_gptq_weights(tok_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                    engine: str) -> None:
    """gptq_stream on a tiny model (its Hessians by ``engine``) against gptq.py in memory with the reference
    arithmetic throughout (Hessians per batch, numpy's inverse, the per-column loop): the same int4 weights and
    zero points, scales within float32 rounding, the same proxy loss up to float64 rounding."""
    import onnx_ir as ir
    from quant.test_streamed import CALIBRATION, _samples

    import onnxpipe.quant.gptq_stream as gptq_stream
    from onnxpipe.artifact import ModelDir
    from onnxpipe.quant.config import Int4Config
    from onnxpipe.quant.graph import expose_weights
    from onnxpipe.quant.int4 import _gptq
    from onnxpipe.quant.quality import prefill_feed
    from onnxpipe.quant.rtn_stream import read_plan, save_streamed

    src = ModelDir.open(tok_model("llama"))
    logits = src.manifest.graph["logits"]
    samples, calib = _samples(src.path)
    cfg = Int4Config(algo="gptq", block_size=32, calibration=CALIBRATION, calib=calib, lm_head="fp32",
                     embeddings="fp32")
    monkeypatch.setattr(gptq_stream, "HessianSums", functools.partial(HessianSums, engine=engine))
    model = ir.load(str(src.model_path))
    feeds = gptq_stream.counted_feeds(
        lambda: (prefill_feed(src.manifest, samples[b:b + 1]) for b in range(len(samples))), len(samples), None)
    details = gptq_stream.quantize_gptq_streamed(model, read_plan(model, logits), cfg, feeds, tmp_path / "work",
                                                 manifest=src.manifest)
    assert set(details["gptq"]["phase_seconds"]) == set(gptq_stream.PHASES)
    out = tmp_path / "out"
    out.mkdir()
    save_streamed(model, out / "model.onnx", external=True)

    monkeypatch.setattr(gptq, "input_hessians", reference_hessians)
    monkeypatch.setattr(gptq, "inverse_factor", reference_factor)
    monkeypatch.setattr(gptq, "gptq_weight", reference_gptq_weight)
    proto = onnx.load(str(src.model_path))
    body = expose_weights(proto, logits)
    want_details = _gptq(proto, [n for n in body.linears if n != body.lm_head], src.manifest, samples, cfg, None)
    got = _int4_tensors(onnx.load(str(out / "model.onnx"), load_external_data=False), out)
    want = _int4_tensors(proto, src.path)
    assert sorted(got) == sorted(want) and len(want) == 14 * 3
    for name, value in want.items():
        if name.endswith("_scales"):
            np.testing.assert_allclose(got[name], value, rtol=1e-6, err_msg=name)
        else:
            assert np.array_equal(got[name], value), name
    assert details["gptq"]["proxy_loss_vs_rtn"] == pytest.approx(want_details["proxy_loss_vs_rtn"], rel=1e-9)
    assert details["gptq"]["proxy_loss_vs_rtn"] < 1
