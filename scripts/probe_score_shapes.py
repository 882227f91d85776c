"""Per-batch cost of the scoring path on a GPU: each batch's first run in a session (a new shape) against a second
pass over the same batches, the model alone, and sessions with other onnxruntime options.

    python3 scripts/probe_score_shapes.py MODEL_DIR OUT_DIR      # MODEL_DIR: e.g. bench_score's fp16-opt (CUDA form)

The batches are those `onnxpipe score` makes of bench_score.py's 2,000 texts (chunks of 512, budget 16,384 slots,
padding <= 20%). Each session is the scoring one (WindowScorer, log-softmax on the device) except "model only".
Prints one line per pass; writes OUT_DIR/probe.json with every batch's milliseconds. Found (H100, 2026-11-23):
at onnxruntime's default ORT_ENABLE_ALL each new shape's first run cost ~75 ms; at ORT_ENABLE_BASIC ~1.5 ms.
"""
import json, sys, time, statistics
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import cut_texts
from onnxpipe.artifact import ModelDir
from onnxpipe.runtime.score import Encoder, WindowScorer, cut_windows, plan_batches
from onnxpipe.runtime.score_io import Record
import onnxruntime as ort

md_path = Path(sys.argv[1]); out = Path(sys.argv[2])
md = ModelDir.open(md_path)
ctx = int(md.manifest.model["max_position_embeddings"]); stride = ctx // 2
texts = cut_texts(Path("data/eval.txt"), 2000)
res = {}
batches = []
for c in range(0, 2000, 512):
    items = Encoder(md).items([Record(i, str(i), text=t) for i, t in enumerate(texts[c:c+512])])
    wins = []
    for it in items:
        arr = np.asarray(it.tokens, np.int64)
        for b, e, f in cut_windows(len(arr), ctx, stride, it.score_from):
            wins.append((arr[b:e], f - b))
    for bt in plan_batches([len(w[0]) for w in wins], 16384, 0.2):
        batches.append([wins[i] for i in bt])
print("batches", len(batches), flush=True)

def timed_pass(fn, label):
    ts = []
    for b in batches:
        t = time.perf_counter(); fn(b); ts.append(time.perf_counter() - t)
    res[label] = {"total": sum(ts), "per_batch_ms": [round(x * 1e3, 2) for x in ts]}
    print(f"{label}: total {sum(ts):.3f}s, median {statistics.median(ts)*1e3:.1f} ms, max {max(ts)*1e3:.1f} ms", flush=True)

for head in ("device",):
    scorer = WindowScorer.open(md_path, "cuda", head=head)  # since this change: ORT_ENABLE_BASIC on a GPU
    timed_pass(scorer.score, f"score {head} pass1")
    timed_pass(scorer.score, f"score {head} pass2")
# model only, logits left on the device
sess = scorer.session
def model_only(b):
    width = max(len(t) for t, _ in b); B = len(b)
    ids = np.zeros((B, width), np.int64); mask = np.zeros((B, width), np.int64)
    for r, (t, _) in enumerate(b):
        ids[r, :len(t)] = t; mask[r, :len(t)] = 1
    feed = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in scorer.inputs:
        from onnxpipe.parity import position_ids_for
        feed["position_ids"] = position_ids_for(mask, width)
    empty = np.zeros((B, scorer.kv_shape[0], 0, scorer.kv_shape[1]), scorer.kv_dtype)
    for i in range(md.manifest.num_layers):
        for n in md.manifest.past_names(i):
            feed[n] = empty
    io = sess.io_binding()
    for k, v in feed.items(): io.bind_cpu_input(k, v)
    io.bind_output(scorer.logits, "cuda", 0)
    for o in sess.get_outputs():
        if o.name != scorer.logits: io.bind_output(o.name, "cuda", 0)
    sess.run_with_iobinding(io)
timed_pass(model_only, "model only, all outputs on device")
# a session with other options
for label, so_kw, cuda_kw in [("ORT_ENABLE_ALL, the default", {}, {}), ("mem_pattern off", {"enable_mem_pattern": False}, {}),
                              ("arena kSameAsRequested", {}, {"arena_extend_strategy": "kSameAsRequested"}),
                              ("ORT_ENABLE_BASIC", {"graph_optimization_level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}, {})]:
    try:
        so = ort.SessionOptions(); so.log_severity_level = 3
        for k, v in so_kw.items(): setattr(so, k, v)
        s2 = ort.InferenceSession(str(md.model_path), so, providers=[("CUDAExecutionProvider", {"device_id": "0", **cuda_kw}), "CPUExecutionProvider"], disabled_optimizers=["GroupQueryAttentionFusion"])
        sc2 = WindowScorer(s2, md.manifest, "cuda", head="device", device="cuda")
        timed_pass(sc2.score, f"score device [{label}] pass1")
        timed_pass(sc2.score, f"score device [{label}] pass2")
    except Exception as e:
        print(label, "failed", e)
(out / "probe.json").write_text(json.dumps(res))
