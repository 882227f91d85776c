"""Where streamed GPTQ's time goes, at a model shape or on a model directory. Prints one table.

Synthetic (no model): each phase of one decoder layer of the shape, on random weights and correlated random
activations of the calibration's token count (32 samples x 128 tokens by default), then x --layers:

    python scripts/time_gptq.py --dry                      # a small shape (hidden 512), about a minute on 2 cores
    python scripts/time_gptq.py --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 --layers 32 \\
        [--tokens 4096] [--block-size 128] [--provider auto|cpu|cuda] [--json FILE]     # Llama-3-8B

phases: ``hessians`` (the layer's four inputs' sums x^T x, fed 512 rows at a time as the calibration batches come,
on the provider, and taken to the host), ``factor`` (gptq.inverse_factor, once per input), ``columns``
(gptq.gptq_weight, per weight), ``proxy_loss`` (GPTQ's and RTN's tr(dW^T H dW), per weight: on the device's sums on
CUDA). The float model's forward passes need a model: ``--model``.

A model directory (an onnxpipe export, e.g. the 8B made by measure_scale.py): quantize_gptq_streamed as the
quantize command runs it (int4, --block-size, the calibration text's prefills), nothing written but its temporary
activation model; prints its phase_seconds (``activations``: the forward passes):

    python scripts/time_gptq.py --model DIR [--block-size 128] [--calib-samples 32] [--calib-seq-len 128] [--provider auto]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent.parent
CALIBRATION = HERE / "data" / "calibration.txt"
BATCH_ROWS = 512  # one calibration batch: 4 prefills of 128 tokens


def layer_inputs(a: argparse.Namespace) -> list[tuple[str, int, list[tuple[str, int]]]]:
    """(input, K, [(weight, N)]) of one Llama-form decoder layer."""
    head_dim = a.hidden // a.heads
    q, kv = a.heads * head_dim, a.kv_heads * head_dim
    return [("attention input", a.hidden, [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]),
            ("o_proj input", q, [("o_proj", a.hidden)]),
            ("mlp input", a.hidden, [("gate_proj", a.intermediate), ("up_proj", a.intermediate)]),
            ("down_proj input", a.intermediate, [("down_proj", a.hidden)])]


def activations(tokens: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Rows with correlated channels and an outlier one, as real layer inputs have (a Hessian far from diagonal)."""
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    x += 0.5 * x[:, :1]
    x[:, 3] *= 10
    return x


def synthetic(a: argparse.Namespace, provider: str) -> dict[str, Any]:
    from onnxpipe.quant.gptq import _proxy_loss_ratio, gptq_weight, inverse_factor
    from onnxpipe.quant.hessian import HessianSums

    rng = np.random.default_rng(0)
    seconds = {"hessians": 0.0, "factor": 0.0, "columns": 0.0, "proxy_loss": 0.0}
    flops = {"hessians": 0.0, "factor": 0.0, "columns": 0.0, "proxy_loss": 0.0}
    rows = []
    for name, k, weights in layer_inputs(a):
        x = activations(a.tokens, k, rng)
        sums = HessianSums(provider)
        start = time.perf_counter()
        for b in range(0, a.tokens, BATCH_ROWS):
            sums.add(name, x[b:b + BATCH_ROWS])
        hessian = sums.take(name)
        spent = {"hessians": time.perf_counter() - start}
        del x
        start = time.perf_counter()
        factor = inverse_factor(hessian, -(-k // a.block_size) * a.block_size)
        spent["factor"] = time.perf_counter() - start
        # 2 T K^2 on CUDA (a general product), T K^2 on the CPU (syrk); Cholesky K^3/3, triangular inverse 2 K^3/3
        flops["hessians"] += (2 if sums.engine == "onnxruntime" else 1) * a.tokens * k * k
        flops["factor"] += k ** 3
        for weight_name, n in weights:
            w = rng.standard_normal((k, n)) * 0.02
            start = time.perf_counter()
            qw = gptq_weight(w, hessian, a.block_size, factor=factor)
            columns = time.perf_counter() - start
            start = time.perf_counter()
            ratio = _proxy_loss_ratio(w, qw, hessian, a.block_size, partial(sums.proxy_losses, name))
            proxy = time.perf_counter() - start
            spent["columns"] = spent.get("columns", 0.0) + columns
            spent["proxy_loss"] = spent.get("proxy_loss", 0.0) + proxy
            flops["columns"] += k * k * n  # the trailing block updates: K^2 N / 2 multiply-adds
            flops["proxy_loss"] += 4 * k * k * n  # two traces of a K x K by K x N product
            rows.append({"weight": weight_name, "K": k, "N": n, "columns_s": round(columns, 2),
                         "proxy_loss_s": round(proxy, 2), "proxy_loss_vs_rtn": round(ratio, 4)})
        sums.release(name)
        for phase, s in spent.items():
            seconds[phase] += s
        rows.append({"input": name, "K": k, "hessians_s": round(spent["hessians"], 2),
                     "factor_s": round(spent["factor"], 2)})
        del hessian, factor
    return {"seconds_per_layer": seconds, "flops_per_layer": flops, "rows": rows}


def on_model(a: argparse.Namespace, provider: str) -> dict[str, Any]:
    import onnx_ir as ir

    from onnxpipe.artifact import ModelDir
    from onnxpipe.quant.calibration import CalibrationConfig, calibration_samples, feed_count
    from onnxpipe.quant.config import Int4Config
    from onnxpipe.quant.gptq_stream import counted_feeds, quantize_gptq_streamed
    from onnxpipe.quant.quality import prefill_feed
    from onnxpipe.quant.rtn_stream import read_plan
    from onnxpipe.quant.text import load_tokenizer

    src = ModelDir.open(a.model)
    if a.provider == "auto":  # as the quantize command chooses it (a CPU-form fused graph stays on the CPU)
        from onnxpipe.quant.quality import eval_provider

        provider = eval_provider(src.manifest)
    calib = CalibrationConfig(max_samples=a.calib_samples, prefill_len=a.calib_seq_len, decode_steps=0)
    samples = calibration_samples(load_tokenizer(src.path), CALIBRATION, calib)
    cfg = Int4Config(algo="gptq", block_size=a.block_size, calibration=CALIBRATION, calib=calib)
    start = time.perf_counter()
    model = ir.load(str(src.model_path))
    plan = read_plan(model, src.manifest.graph["logits"])
    batch = calib.batch_size
    feeds = counted_feeds(lambda: (prefill_feed(src.manifest, samples[b:b + batch, :calib.prefill_len])
                                   for b in range(0, len(samples), batch)),
                          feed_count(samples, calib, decode=False), None)
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        details = quantize_gptq_streamed(model, plan, cfg, feeds, Path(tmp) / "gptq-activations", provider,
                                         log=lambda m: print(m, file=sys.stderr, flush=True), manifest=src.manifest)
    return {"gptq": details["gptq"], "wall_s": round(time.perf_counter() - start, 1),
            "tokens": int(samples.shape[0] * calib.prefill_len)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="A small shape (hidden 512, 2 layers) that runs anywhere.")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32 * 128, help="calibration tokens (samples x prefill length)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--model", type=Path, default=None, help="An onnxpipe model directory: its streamed GPTQ.")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=None, help="Where --model's activation model is written.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    a = ap.parse_args()
    if a.dry:
        a.hidden, a.intermediate, a.heads, a.kv_heads, a.layers = 512, 1792, 8, 2, 2
    from onnxpipe.runtime.providers import available_providers

    provider = a.provider if a.provider != "auto" else ("cuda" if "cuda" in available_providers() else "cpu")
    import onnxruntime as ort

    meta = {"provider": provider, "onnxruntime": ort.__version__, "numpy": np.__version__, "cores": os.cpu_count(),
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.model is not None:
        result = {**meta, "model": str(a.model), **on_model(a, provider)}
        provider = result["provider"] = result["gptq"]["provider"]
        g = result["gptq"]
        print(f"streamed GPTQ of {a.model} on {provider}: {g['seconds']} s ({g['passes']} passes, "
              f"{g['quantized_nodes']} weights, {result['tokens']} calibration tokens; proxy loss "
              f"{g['proxy_loss_vs_rtn']:.4f} of RTN's)")
        print("| phase | seconds | share |\n|---|---|---|")
        for phase, s in g["phase_seconds"].items():
            print(f"| {phase} | {s} | {s / max(g['seconds'], 1e-9):.0%} |")
    else:
        shape = {k: getattr(a, k) for k in ("hidden", "intermediate", "heads", "kv_heads", "layers", "tokens",
                                            "block_size")}
        result = {**meta, "shape": shape, **synthetic(a, provider)}
        per_layer, flops = result["seconds_per_layer"], result["flops_per_layer"]
        total = sum(per_layer.values())
        print(f"GPTQ phases of one layer (hidden {a.hidden}, intermediate {a.intermediate}, kv-heads {a.kv_heads}, "
              f"{a.tokens} tokens, block {a.block_size}) on {provider}, x {a.layers} layers; forward passes not included")
        print("| phase | one layer (s) | x layers (s) | GFLOP per layer | GFLOP/s |\n|---|---|---|---|---|")
        for phase, s in per_layer.items():
            print(f"| {phase} | {s:.2f} | {s * a.layers:.0f} | {flops[phase] / 1e9:.0f} | "
                  f"{flops[phase] / max(s, 1e-9) / 1e9:.1f} |")
        print(f"| total | {total:.2f} | {total * a.layers:.0f} ({total * a.layers / 60:.1f} min) | | |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
