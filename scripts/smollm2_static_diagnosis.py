"""Static int8 diagnosis on SmolLM2 (throwaway, kept for the record of docs/quantization.md): calibrate once
(minmax, as onnxpipe.quant.static does), then write static QDQ models with only a subset of the 210 body linears
quantized (LM head and embeddings fp32) and score each on the first 8,192 eval tokens. The model is
bench_quantize.py's SmolLM2 export (SMOLLM2_EXPORT overrides); scratch files go to STDIAG_WORK (/tmp/w/stdiag).

    python3 scripts/smollm2_static_diagnosis.py all no-down only-down nodown-11,28,29 toprange-32
"""
import contextlib, io, json, sys, time
from pathlib import Path
import numpy as np, onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data, TensorsData
from onnxpipe.artifact import ModelDir
from onnxpipe.quant.calibration import CalibrationConfig, SingleFeedReader, calibration_samples, kv_feeds
from onnxpipe.quant.graph import expose_weights, save_quantized, producers
from onnxpipe.quant.quality import measure_session, quality_report, default_context
from onnxpipe.quant.text import load_tokenizer, read_documents, tokenize_documents
from onnxpipe.quant.dynamic import _quiet_ort

import os

REPO = Path(__file__).resolve().parents[1]
W = Path(os.environ.get("STDIAG_WORK", "/tmp/w/stdiag"))
W.mkdir(parents=True, exist_ok=True)
SRC = ModelDir.open(os.environ.get("SMOLLM2_EXPORT", REPO / "out" / "bench-quantize-smollm2" / "SmolLM2-135M-Instruct"))
proto = onnx.load(str(SRC.model_path))
plan = expose_weights(proto, SRC.manifest.graph["logits"])
body = [n for n in plan.linears if n != plan.lm_head]
print(len(body), "body linears; head", plan.lm_head, flush=True)
fl = W / "float.onnx"
if not fl.exists():
    save_quantized(proto, fl)
nodes = {n.name: n for n in proto.graph.node}
inp = {n: nodes[n].input[0] for n in body}
cache = W / "ranges.json"
if not cache.exists():
    t = time.time()
    tok = load_tokenizer(SRC.path); cfg = CalibrationConfig()
    samples = calibration_samples(tok, REPO / "data" / "calibration.txt", cfg)
    with _quiet_ort():
        cal = create_calibrator(fl, ["MatMul"], augmented_model_path=str(W / "aug.onnx"),
                                calibrate_method=CalibrationMethod.MinMax, extra_options={"symmetric": False})
    sess = measure_session(fl)
    for feed in kv_feeds(sess, SRC.manifest, samples, cfg):
        with contextlib.redirect_stdout(io.StringIO()):
            cal.collect_data(SingleFeedReader(feed))
    ranges = cal.compute_data()
    save_tensors_data(ranges, cache)
    del cal, sess
    print("calibrated", round(time.time() - t), "s", flush=True)
# ranges per body input
rj = json.loads(cache.read_text())
def rng(name):
    v = rj["data"][name] if "data" in rj else rj[name]
    return v
print(json.dumps({n: str(rng(inp[n]))[:200] for n in body[:7]}, indent=0)[:2000], flush=True)
eval_ids = tokenize_documents(load_tokenizer(SRC.path), read_documents(REPO / "data" / "eval.txt", "eval"), 8192)
ctx = default_context(SRC.manifest)
results = json.loads((W / "results.json").read_text()) if (W / "results.json").exists() else {}
def run(label, quant):
    if label in results:
        print(label, results[label], flush=True); return
    t = time.time()
    out = W / "q.onnx"
    model = onnx.load(str(fl))
    with _quiet_ort():
        quantize_static(model, str(out), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=quant, calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=str(cache),
                        extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False})
    q = quality_report(SRC.model_path, out, SRC.manifest, SRC.manifest, eval_ids, ctx, "data/eval.txt").to_json()
    r = {k: q.get(k) for k in ("ppl_before", "ppl_after", "ppl_change_pct", "top1_agreement", "mean_kl")}
    r.update(n_quantized=len(quant), seconds=round(time.time() - t, 1))
    results[label] = r
    (W / "results.json").write_text(json.dumps(results, indent=1))
    print(label, r, flush=True)
kinds = ["q", "k", "v", "o", "gate", "up", "down"]
def kind(n): return kinds[body.index(n) % 7]
variants = sys.argv[1:]
for v in variants:
    if v == "all": run("all 210", body)
    elif v.startswith("no-"):  # all but a kind
        k = v[3:]; run(f"all but {k}", [n for n in body if kind(n) != k])
    elif v.startswith("only-"):
        k = v[5:]; run(f"only {k}", [n for n in body if kind(n) == k])
    elif v.startswith("toprange-"):  # leave the N body layers with the widest calibrated input range float
        N = int(v[9:])
        def width(n):
            r = rj["data"][inp[n]] if "data" in rj else rj[inp[n]]
            g = lambda a: a["data"][0] if isinstance(a, dict) else a
            return g(r["highest"]) - g(r["lowest"])
        worst = sorted(body, key=width, reverse=True)[:N]
        print("float:", [(body.index(n) // 7, kind(n), round(width(n), 1)) for n in worst], flush=True)
        run(f"all but the {N} widest input ranges", [n for n in body if n not in worst])
    elif v.startswith("nodown-"):  # all but down_proj of listed layers
        ls = [int(x) for x in v[7:].split(",")]
        run(f"all but down_proj of layers {ls}", [n for n in body if not (kind(n) == "down" and body.index(n) // 7 in ls)])
