#!/usr/bin/env python3
"""GPU decode speed, side by side on one random-weight model: PyTorch eager ``generate``, transformers with a
static cache + torch.compile, ONNX Runtime GenAI (its model builder on the same HF directory; with and without
CUDA graphs) and onnxpipe (export -> optimize level 3 -> runtime).

    python3 scripts/bench_gpu.py --out $OUT                        # on the GPU machine: Llama-3.2-1B shape, fp16
    python scripts/bench_gpu.py --device cpu --tiny --out /tmp/b   # smoke test here: tiny config, fp32
    python scripts/bench_gpu.py --render OUT/bench_gpu.json --write-docs docs/benchmarks.md

One process (this one) orchestrates; every anchor runs in a child process of its own, so its GPU memory is its own
(peak read per process through NVML) and a child that overruns the budget is killed without losing the others.
Builds (onnxpipe export + optimize, GenAI's builder) run in the background on their own CPU cores while the
PyTorch anchors run on the GPU. Every result is printed and written to OUT/bench_gpu.json as soon as it exists;
when the time budget (--budget-s) is spent the remaining rows are skipped and said so.

Timing, the same for every anchor: a row's prompt is B x 128 random token ids, greedy, 128 new tokens, no early
stop. prefill ms = start of the call until the first new token is on the host; decode ms = time between the first
and the last new token / 127 (each step ends with its token ids on the host); tokens/s = B x 128 / the whole call.
One warm-up call, then --repeats timed calls; the table shows the median.
Floors: decode step >= (weight bytes + KV bytes read at the mean length) / measured device copy bandwidth;
prefill >= max(bytes / bandwidth, 2 x params x tokens / measured fp16 matmul rate).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPES = {  # Llama-3.2-1B's dimensions (random weights); GPT-2 small's; tiny runs in seconds on a laptop CPU
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=4096,
                     tie_word_embeddings=True),
    "gpt2-small": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024, tie_word_embeddings=True),
}


def dims(shape: str) -> dict:
    """layers, KV heads and head size of a SHAPES entry, whatever its config calls them."""
    sh = SHAPES[shape]
    if sh.get("model_type") == "gpt2":
        return {"layers": sh["n_layer"], "kv_heads": sh["n_head"], "head_dim": sh["n_embd"] // sh["n_head"]}
    return {"layers": sh["num_hidden_layers"], "kv_heads": sh["num_key_value_heads"],
            "head_dim": sh["hidden_size"] // sh["num_attention_heads"]}


ANCHORS = {  # run in this order: onnxpipe after eager, whose tokens it is compared with
    "torch_eager": "PyTorch eager generate",
    "torch_compile": "transformers static cache + torch.compile",
    "onnxpipe": "onnxpipe (export -> optimize L3 -> runtime)",
    "onnxpipe_fullhead": "onnxpipe, LM head on every prompt position",
    "onnxpipe_graph": "onnxpipe + CUDA graphs",
    "onnxpipe_graph_hostfed": "onnxpipe + CUDA graphs, inputs uploaded each step",
    "onnxpipe_graph_xqa": "onnxpipe + CUDA graphs + XQA decode kernel",
    "onnxpipe_int4_graph": "onnxpipe int4 (symmetric RTN) + CUDA graphs",
    "genai": "ORT GenAI",
    "genai_graph": "ORT GenAI + CUDA graphs",
    "genai_int4": "ORT GenAI int4",
    "genai_int4_graph": "ORT GenAI int4 + CUDA graphs",
}
LABELS = {**ANCHORS, "onnxpipe_profile": "onnxpipe, ORT-profiled decode"}
PRIORITY = ["torch_eager", "onnxpipe", "onnxpipe_fullhead", "onnxpipe_graph", "onnxpipe_graph_hostfed", "onnxpipe_graph_xqa", "genai", "genai_graph",
            "onnxpipe_int4_graph", "genai_int4", "genai_int4_graph", "torch_compile"]  # eager first: its tokens are the
# reference for onnxpipe's agreement; torch.compile (no build to wait for) fills the GPU while the builds run
RESULT = "@@RESULT "


# ----------------------------------------------------------------------------------------------- children
def emit(kind: str, **fields) -> None:
    print(RESULT + json.dumps({"kind": kind, **fields}), flush=True)


def child_setup(spec: dict) -> None:
    """Build the HF directory (random weights, made on the device) and measure the two ceilings."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    dev, dtype = spec["device"], getattr(torch, spec["torch_dtype"])
    hf = Path(spec["hf"])
    torch.manual_seed(0)
    # a wider init than the default 0.02 so logits are not near-uniform: greedy ties would say nothing
    sh = dict(SHAPES[spec["shape"]])
    cfg = AutoConfig.for_model(sh.pop("model_type", "llama"), **sh, initializer_range=0.1, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0)
    t = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(hf)
    # a small word-level tokenizer: the GenAI builder and the exporter want tokenizer files; ids are fed directly
    vocab = {f"t{i}": i for i in range(256)}
    vocab["<unk>"] = 256
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(hf)
    build_s = time.perf_counter() - t
    del model
    emit("setup", params=params, weight_bytes=weight_bytes, build_s=round(build_s, 1), **ceilings(dev, dtype))


def ceilings(dev: str, dtype) -> dict:
    """Device copy bandwidth (bytes read + written) and dense matmul rate, measured here."""
    import torch

    if dev == "cpu":
        x = torch.randn((64 << 20) // 4)
        y = torch.empty_like(x)
        t = time.perf_counter()
        for _ in range(5):
            y.copy_(x)
        return {"copy_bw_GBs": 2 * x.nbytes * 5 / (time.perf_counter() - t) / 1e9, "matmul_TFLOPs": None}
    n = 1 << 30  # 2 GiB of fp16 per buffer
    x = torch.randn(n, device=dev, dtype=torch.float16)
    y = torch.empty_like(x)
    bw = [_event_ms(lambda: y.copy_(x)) for _ in range(20)]
    del x, y
    a = torch.randn(8192, 8192, device=dev, dtype=dtype)
    b = torch.randn(8192, 8192, device=dev, dtype=dtype)
    mm = [_event_ms(lambda: a @ b) for _ in range(20)]
    del a, b
    torch.cuda.empty_cache()
    bw_ms, mm_ms = statistics.median(bw[3:]), statistics.median(mm[3:])
    return {"copy_bw_GBs": 2 * n * 2 / (bw_ms / 1e3) / 1e9, "matmul_TFLOPs": 2 * 8192**3 / (mm_ms / 1e3) / 1e12,
            "gpu": torch.cuda.get_device_name(0)}


def _event_ms(fn) -> float:
    import torch

    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def child_build_onnxpipe(spec: dict) -> None:
    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import optimize_model

    t = time.perf_counter()
    export_decoder(spec["hf"], spec["exported"], dtype=spec["dtype"], verify=False, force=True)
    export_s = time.perf_counter() - t
    emit("build", stage="export", seconds=round(export_s, 1))
    op_check = "this onnxruntime's kernel registry"
    if spec["target"] == "cuda":
        # onnxruntime-gpu 1.31.1 on the device segfaulted in get_all_opkernel_def() (which optimize's target-op
        # check calls) right after failing to load the TensorRT provider library: use optimize's documented CUDA
        # op list instead, the path it takes for --target cuda --skip-verify without a CUDA EP.
        from onnxpipe.fusion import pipeline

        pipeline.supported_ops = lambda target: None
        op_check = "documented CUDA op list (kernel registry query crashes here)"
    t = time.perf_counter()
    res = optimize_model(spec["exported"], spec["optimized"], level=3, target=spec["target"], verify=False,
                         force=True, log=lambda m: print(m, flush=True))
    g = res.model_dir.manifest.graph
    emit("build", stage="optimize", seconds=round(time.perf_counter() - t, 1), fused_ops=g.get("fused_ops"),
         op_check=op_check,
         shares_buffer=g["kv"].get("shares_buffer"), padding_side=g.get("padding_side"),
         passes={p.name: {"status": p.status, **{k: str(v) for k, v in p.fused.items()}} for p in res.passes})


def child_build_onnxpipe_int4(spec: dict) -> None:
    """int4 weights (symmetric RTN, block 32, MatMulNBits without zero points, fp16 scales and activations, LM head
    included, as GenAI's int4 does) from the
    optimized fp16 CUDA form; waits for that build. Its quality report runs on the CPU over a short eval text."""
    from onnxpipe.quant import quantize_model

    deadline = time.time() + 400
    while not (Path(spec["optimized"]) / "onnxpipe.json").is_file():
        if time.time() > deadline:
            emit("build", stage="onnxpipe_int4", error="the optimized model never appeared")
            return
        time.sleep(2)
    t = time.perf_counter()
    res = quantize_model(spec["optimized"], spec["int4"], "int4", force=True, algo="rtn", block_size=32,
                         symmetric=True, lm_head="int4", max_eval_tokens=64, log=lambda m: print(m, flush=True))
    q = res.step.get("quality", {})
    emit("build", stage="onnxpipe_int4", seconds=round(time.perf_counter() - t, 1),
         size_MB=round(q.get("size_after", 0) / 1e6, 1), ppl_change_pct=q.get("ppl_change_pct"))


def child_build_genai(spec: dict, stage: str = "genai") -> None:
    import importlib.util

    found = importlib.util.find_spec("onnxruntime_genai")
    if found is None:
        emit("build", stage=stage, error="onnxruntime_genai is not installed")
        return
    builder = Path(found.origin).parent / "models" / "builder.py"
    t = time.perf_counter()
    cmd = [sys.executable, str(builder), "-i", spec["hf"], "-o", spec["genai"], "-p", spec["genai_precision"],
           "-e", spec["genai_ep"], "-c", spec["genai"] + "-cache"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        emit("build", stage=stage, error=(p.stderr or p.stdout).strip().splitlines()[-1][:300] if (p.stderr or p.stdout).strip() else f"rc {p.returncode}")
        return
    emit("build", stage=stage, seconds=round(time.perf_counter() - t, 1), command=" ".join(cmd[1:]))


def prompts(spec: dict, batch: int):
    import numpy as np

    rng = np.random.default_rng(1234)  # the same rows for every anchor: row i of batch 8 is row i of batch 32
    return rng.integers(3, spec["vocab"], (max(batch, 32), spec["prompt"]))[:batch]


def summarize(runs: list[dict], batch: int, new: int) -> dict:
    """runs: {"start", "times": host time of each new token} -> the three figures (median over runs)."""
    pre = [(r["times"][0] - r["start"]) * 1e3 for r in runs]
    dec = [(r["times"][-1] - r["times"][0]) * 1e3 / (new - 1) for r in runs]
    tps = [batch * new / (r["times"][-1] - r["start"]) for r in runs]
    return {"prefill_ms": statistics.median(pre), "decode_ms": statistics.median(dec),
            "tok_s": statistics.median(tps), "runs": {"prefill_ms": pre, "decode_ms": dec, "tok_s": tps}}


def child_torch(spec: dict, compiled: bool) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    dev, dtype = spec["device"], getattr(torch, spec["torch_dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.do_sample = None, 0, False
    new = spec["new"]

    class Clock(BaseStreamer):
        def __init__(self):
            self.stamps: list[float] = []

        def put(self, value):  # generate hands every token over as a host tensor: the step is done
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    extra: dict = {}
    note = "eager, sdpa, DynamicCache"
    if compiled:
        extra["cache_implementation"] = "static"
        if dev == "cpu":  # transformers compiles only on accelerators; the CPU smoke test runs the static cache alone
            extra["disable_compile"] = True
            note = "static cache, not compiled (cpu smoke test)"
        else:
            note = "static cache, transformers' auto-compile (CompileConfig defaults: inductor, reduce-overhead)"

    def once(ids):
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 streamer=clock, **extra)
        torch.cuda.synchronize() if dev != "cpu" else None
        assert out.shape[1] == ids.shape[1] + new, out.shape
        # stamps[0] is the prompt, handed over before the prefill
        return {"start": start, "times": clock.stamps[1:]}, out[:, ids.shape[1]:].tolist()

    for batch in spec["batches"]:
        ids = torch.tensor(prompts(spec, batch), device=dev)
        t = time.perf_counter()
        once(ids)  # warm-up (and, compiled, the compilation)
        warm_s = time.perf_counter() - t
        if dev != "cpu":
            torch.cuda.reset_peak_memory_stats()
        runs, tokens = [], None
        for _ in range(spec["repeats"]):
            r, tokens = once(ids)
            runs.append(r)
        info = {"note": note, "warmup_s": round(warm_s, 1)}
        if dev != "cpu":
            info["torch_max_allocated_MB"] = round(torch.cuda.max_memory_allocated() / 2**20)
        if compiled:
            from torch._dynamo.utils import counters

            info["dynamo_unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
        gaps = None
        if not compiled and batch <= 8:  # the reference: each step's top-1 minus top-2 logit, to tell near-ties
            with torch.no_grad():
                g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                   output_logits=True, return_dict_in_generate=True)
            top2 = torch.stack(g.logits, 1).float().topk(2, dim=-1).values  # [B, new, 2]
            gaps = (top2[..., 0] - top2[..., 1]).tolist()
            # the reference is this run's tokens, whose margins these are (at batch 8 a rerun's tokens can differ)
            info["reference_run_equals_timed_run"] = g.sequences[:, ids.shape[1]:].tolist() == tokens
            rerun = g.sequences[:, ids.shape[1]:ids.shape[1] + spec["agree_steps"]].cpu().numpy()
            timed = np.array([t[:spec["agree_steps"]] for t in tokens])
            info["torch_rerun_free_running_equal"] = float((rerun == timed).mean())  # PyTorch against itself
            tokens = g.sequences[:, ids.shape[1]:].tolist()
            info["torch_self_agreement"] = self_agreement(spec, model, g.sequences, ids.shape[1])
        emit("row", batch=batch, **summarize(runs, batch, new), info=info,
             tokens=tokens if batch <= 8 else None, gaps=gaps)


_FP32 = {}


def self_agreement(spec: dict, model, seq, prompt: int) -> dict:
    """How far PyTorch agrees with its own greedy tokens, teacher-forced over the first agree_steps: the same model
    in one full forward over prompt + tokens (no cache), and the same weights in fp32. The precision's own noise,
    to read onnxpipe's agreement against."""
    import torch
    from transformers import AutoModelForCausalLM

    steps = spec["agree_steps"]
    want = seq[:, prompt:prompt + steps]
    out = {}
    if "model" not in _FP32:
        _FP32["model"] = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32,
                                                              attn_implementation="sdpa").to(spec["device"]).eval()
    for name, m in (("full_forward", model), ("fp32", _FP32["model"])):
        with torch.no_grad():
            logits = m(seq[:, :prompt + steps - 1], attention_mask=torch.ones_like(seq[:, :prompt + steps - 1])).logits
        got = logits[:, prompt - 1:prompt - 1 + steps].argmax(-1)
        out[name] = float((got == want).float().mean())
        del logits
    return out


def child_onnxpipe(spec: dict) -> None:

    from onnxpipe.runtime.generate import load

    from onnxpipe.errors import OnnxpipeError

    graph = ("optimized (level 3)" + (", int4 RTN" if spec["optimized"] == spec.get("int4") else "")
             + (", CUDA graphs" if spec.get("cuda_graph") else "")
             + (", ORT_ENABLE_XQA=1" if os.environ.get("ORT_ENABLE_XQA") == "1" else ""))
    try:
        if spec.get("full_head"):  # the graph's LM head on every prompt position (no last-position gather)
            from onnxpipe.runtime.generate import LanguageModel
            from onnxpipe.runtime.session import DecoderSession

            lm = LanguageModel(DecoderSession(spec["optimized"], spec["provider"], announce=lambda m: print(m, flush=True),
                                              last_position=False), None)
            graph += ", LM head on every position"
        elif spec.get("host_fed"):  # the decode step's inputs uploaded every step (no step tail): the baseline
            from onnxpipe.runtime.generate import LanguageModel
            from onnxpipe.runtime.session import DecoderSession

            lm = LanguageModel(DecoderSession(spec["optimized"], spec["provider"], announce=lambda m: print(m, flush=True),
                                              cuda_graph=True, feed_back=False), None)
            graph += ", inputs uploaded each step"
        else:
            lm = load(spec["optimized"], spec["provider"], announce=lambda m: print(m, flush=True),
                      cuda_graph=bool(spec.get("cuda_graph")))
            if getattr(lm.session, "fed", False) and lm.session.cuda_graph:
                graph += ", steps feed themselves (greedy)"
            graph += (", LM head at the read position only" if getattr(lm.session, "last_position", False)
                      else f", LM head on every position ({getattr(lm.session, 'last_position_why_not', '?')})")
    except OnnxpipeError as e:  # measure the exported graph rather than nothing, and say so in every row
        if spec.get("cuda_graph"):
            raise
        print(f"the optimized graph does not load: {e}", flush=True)
        lm = load(spec["exported"], spec["provider"], announce=lambda m: print(m, flush=True))
        graph = f"exported, unfused: the optimized graph did not load ({str(e)[-160:]})"
    new = spec["new"]
    cfg = lm._config({"max_new_tokens": new, "stop_token_ids": []})

    def once(batch_ids):
        rows = lm._rows([list(map(int, r)) for r in batch_ids], cfg)
        start, times = time.perf_counter(), []
        for _ in lm._decode(rows, cfg):  # yields once per step, after that step's token ids are on the host
            times.append(time.perf_counter())
        return {"start": start, "times": times}, [r.tokens for r in rows]

    ref = _read_json(spec.get("reference_tokens"))
    for batch in spec["batches"]:
        ids = prompts(spec, batch)
        t = time.perf_counter()
        once(ids)
        warm_s = time.perf_counter() - t
        runs, tokens = [], None
        for _ in range(spec["repeats"]):
            r, tokens = once(ids)
            runs.append(r)
        info = {"provider": lm.provider, "graph": graph, "warmup_s": round(warm_s, 1),
                "cuda_graph_runs": {f"b{k[0]}x{k[1]}": v.runs for k, v in lm.session._graphs.items()},
                "transfers_per_step": lm.session.transfers.per_step(), "step_split_ms": step_split(lm, once, ids)}
        if ref and str(batch) in ref:
            info["agreement_vs_torch"] = agreement(lm, ids, tokens, ref[str(batch)], spec["agree_steps"],
                                                   ref.get(f"gaps{batch}"))
        emit("row", batch=batch, **summarize(runs, batch, new), info=info)


def child_onnxpipe_xqa(spec: dict) -> None:
    """ORT's XQA GroupQueryAttention decode kernel (shared buffer, one token, no window) is opt-in for fp16 caches;
    the kernel reads the variable when the session is made, so this child sets it first."""
    os.environ["ORT_ENABLE_XQA"] = "1"
    child_onnxpipe(dict(spec, cuda_graph=True))


class _Timed:
    """An InferenceSession whose run_with_iobinding calls are timed (onnxruntime synchronizes the device at the
    end of a run, so the host clock covers the graph's work)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_with_iobinding(self, io, *rest):
        t = time.perf_counter()
        self.inner.run_with_iobinding(io, *rest)
        self.calls.append(time.perf_counter() - t)


def step_split(lm, once, ids) -> dict:
    """One extra, untimed-for-the-table run: a decode step's time split into the decoder graph's run, the
    last-token head's run (argmax on the device) and everything else (binding, uploads, Python)."""
    s = lm.session
    graph, head = _Timed(s.session), _Timed(s._head)
    s.session, s._head = graph, head
    try:
        r, _ = once(ids)
    finally:
        s.session, s._head = graph.inner, head.inner
    steps = len(r["times"]) - 1
    step_ms = (r["times"][-1] - r["times"][0]) * 1e3 / steps
    g = sum(graph.calls[1:]) * 1e3 / steps
    h = sum(head.calls[1:]) * 1e3 / steps
    return {"step": round(step_ms, 3), "decoder_run": round(g, 3), "head_run": round(h, 3),
            "other": round(step_ms - g - h, 3), "prefill_decoder_run": round(graph.calls[0] * 1e3, 3)}


def child_onnxpipe_profile(spec: dict) -> None:
    """onnxruntime's profiler over one batch-1 generation: kernel time per op type in a decode step."""
    import collections

    import onnxruntime as ort

    from onnxpipe.runtime.generate import LanguageModel
    from onnxpipe.runtime.session import DecoderSession

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(spec["work"]) / "ort_profile")
    so.log_severity_level = 3
    from onnxpipe.errors import OnnxpipeError

    graph = "optimized (level 3)"
    try:
        s = DecoderSession(spec["optimized"], spec["provider"], session_options=so, announce=lambda m: None)
    except OnnxpipeError:  # as child_onnxpipe: the exported graph rather than nothing
        s = DecoderSession(spec["exported"], spec["provider"], session_options=so, announce=lambda m: None)
        graph = "exported, unfused"
    lm = LanguageModel(s, None)
    ids = [list(map(int, r)) for r in prompts(spec, 1)]
    steps = spec["profile_steps"]
    lm.generate(ids, max_new_tokens=steps, stop_token_ids=[])  # warm-up, profiled too: dropped below
    lm.generate(ids, max_new_tokens=steps, stop_token_ids=[])
    events = json.loads(Path(s.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    decode = runs[-(steps - 1):]  # the second generation's decode steps
    lo, hi = decode[0][0], decode[-1][1]
    by_op: dict = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and lo <= e["ts"] <= hi:
            by_op[e["args"].get("op_name", "?")] += e["dur"]
    n = len(decode)
    per_step = {k: round(v / n / 1e3, 4) for k, v in by_op.most_common()}
    emit("profile", batch=1, steps=n, graph=graph, model_run_ms=round(sum(b - a for a, b in decode) / n / 1e3, 4),
         kernel_ms_by_op=per_step, kernel_ms_total=round(sum(per_step.values()), 4))


def agreement(lm, ids, ours: list[list[int]], theirs: list[list[int]], steps: int, gaps=None) -> dict:
    """Free-running: share of positions where our greedy tokens equal PyTorch's, and each row's first divergence.
    Teacher-forced: feed PyTorch's tokens through our prefill + decode steps and count argmax matches, so one early
    near-tie does not decide the rest. gaps: PyTorch's top-1 minus top-2 logit per (row, step): where the
    teacher-forced argmaxes differ, how close PyTorch's own choice was, against the median margin."""
    import numpy as np

    a, b = np.array([r[:steps] for r in ours]), np.array([r[:steps] for r in theirs])
    first = [int(np.argmax(x != y)) if (x != y).any() else steps for x, y in zip(a, b)]
    cfg = lm._config({"max_new_tokens": steps, "stop_token_ids": []})
    rows = lm._rows([list(map(int, r)) for r in ids], cfg)
    mask, _, cache, out = lm.prefill(rows, ids.shape[1] + steps, "argmax")
    hits = [out == b[:, 0]]
    for k in range(1, steps):
        mask, out = lm.decode_step(b[:, k - 1], mask, cache, "argmax")
        hits.append(out == b[:, k])
    out = {"steps": steps, "rows": len(a), "free_running_equal": float((a == b).mean()),
           "first_divergence": first, "teacher_forced": float(np.mean(hits))}
    if gaps is not None:
        gap = np.array([r[:steps] for r in gaps], np.float64)  # [rows, steps]
        miss = ~np.stack(hits, axis=1)
        out["torch_margin_median"] = float(np.median(gap))
        out["torch_margin_at_misses"] = sorted(round(float(x), 5) for x in gap[miss])
    return out


def child_genai(spec: dict, graphs: bool) -> None:
    import numpy as np
    import onnxruntime_genai as og

    cfg = og.Config(spec["genai"])
    if spec["device"] != "cpu":
        cfg.clear_providers()
        cfg.append_provider("cuda")
        cfg.set_provider_option("cuda", "enable_cuda_graph", "1" if graphs else "0")
    else:
        cfg.clear_providers()
    model = og.Model(cfg)
    new, plen = spec["new"], spec["prompt"]

    def once(ids):
        p = og.GeneratorParams(model)
        p.set_search_options(max_length=plen + new, min_length=plen + new, do_sample=False, batch_size=ids.shape[0])
        g = og.Generator(model, p)
        start, times, toks = time.perf_counter(), [], []
        g.append_tokens(ids.astype(np.int32))
        while not g.is_done():
            g.generate_next_token()
            toks.append(np.array(g.get_next_tokens()))  # on the host: this step is done
            times.append(time.perf_counter())
        assert len(times) == new, len(times)
        return {"start": start, "times": times}, np.stack(toks, 1).tolist()

    for batch in spec["batches"]:
        ids = prompts(spec, batch)
        t = time.perf_counter()
        once(ids)
        warm_s = time.perf_counter() - t
        runs = [once(ids)[0] for _ in range(spec["repeats"])]
        emit("row", batch=batch, **summarize(runs, batch, new),
             info={"cuda_graph": graphs, "warmup_s": round(warm_s, 1), "genai": og.__version__})


def _read_json(path: str | None):
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


CHILDREN = {
    "setup": child_setup,
    "build_onnxpipe": child_build_onnxpipe,
    "build_genai": child_build_genai,
    "torch_eager": lambda s: child_torch(s, compiled=False),
    "torch_compile": lambda s: child_torch(s, compiled=True),
    "onnxpipe": child_onnxpipe,
    "onnxpipe_fullhead": lambda s: child_onnxpipe(dict(s, full_head=True)),
    "onnxpipe_graph": lambda s: child_onnxpipe(dict(s, cuda_graph=True)),
    "onnxpipe_graph_hostfed": lambda s: child_onnxpipe(dict(s, cuda_graph=True, host_fed=True)),
    "onnxpipe_graph_xqa": lambda s: child_onnxpipe_xqa(s),
    "onnxpipe_profile": child_onnxpipe_profile,
    "onnxpipe_int4_graph": lambda s: child_onnxpipe(dict(s, cuda_graph=True, optimized=s["int4"])),
    "build_onnxpipe_int4": lambda s: child_build_onnxpipe_int4(s),
    "build_genai_int4": lambda s: child_build_genai(dict(s, genai=s["genai_int4"], genai_precision="int4"),
                                                    stage="genai_int4"),
    "genai_int4": lambda s: child_genai(dict(s, genai=s["genai_int4"]), graphs=False),
    "genai_int4_graph": lambda s: child_genai(dict(s, genai=s["genai_int4"]), graphs=True),
    "genai": lambda s: child_genai(s, graphs=False),
    "genai_graph": lambda s: child_genai(s, graphs=True),
}


# ----------------------------------------------------------------------------------------------- orchestration
class MemoryWatch:
    """Peak device memory per process id, read through NVML every 50 ms (falls back to the device's total in use,
    less what was in use at the start, when NVML lists no processes)."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nv = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.peak: dict[int, int] = {}
        self.total_peak = 0
        self.method = "nvml per process"
        self._stop = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while not self._stop:
            try:
                for p in self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if p.usedGpuMemory:
                        self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.usedGpuMemory)
                self.total_peak = max(self.total_peak, self.nv.nvmlDeviceGetMemoryInfo(self.handle).used - self.baseline)
            except Exception:  # a process that ends between the listing and the read
                pass
            time.sleep(0.05)

    def reset_total(self):
        self.total_peak = 0

    def of(self, pid: int) -> tuple[int, str]:
        if pid in self.peak:
            return self.peak[pid], "nvml per process"
        return self.total_peak, "nvml device total less idle"


class Child:
    """A child process whose stdout lines are collected by a thread; results are lines starting with RESULT."""

    def __init__(self, name: str, spec: dict, log, cores: set[int] | None):
        self.name = name
        path = Path(spec["work"]) / f"spec-{name}.json"
        path.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        pre = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", name, "--spec", str(path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True, preexec_fn=pre)
        self.results: queue.Queue = queue.Queue()
        self.tail: list[str] = []
        self._log = log
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                self.results.put(json.loads(line[len(RESULT):]))
            else:
                self._log(f"[{self.name}] {line.rstrip()}")
                self.tail = (self.tail + [line.rstrip()])[-5:]
        self.results.put(None)

    def next(self, deadline: float):
        """The next result, None when the child has ended, or "timeout" at the deadline (the child is killed)."""
        try:
            return self.results.get(timeout=max(deadline - time.time(), 0.01))
        except queue.Empty:
            self.kill()
            return "timeout"

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group: the child and what it started
            self.proc.wait()

    def error(self) -> str:
        self.proc.wait()
        return f"exit {self.proc.returncode}: " + " | ".join(self.tail[-2:])


def main_orchestrate(args) -> int:
    t0 = time.time()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logf = (out / "bench_gpu.log").open("a")

    def log(msg: str):
        logf.write(msg + "\n")
        logf.flush()
        if args.verbose:
            print(msg, flush=True)

    cuda = args.device == "cuda"
    shape = "tiny" if args.tiny else args.shape
    spec = {"device": args.device, "shape": shape, "dtype": "fp16" if cuda else "fp32",
            "torch_dtype": "float16" if cuda else "float32", "vocab": SHAPES[shape]["vocab_size"],
            "prompt": args.prompt, "new": args.new_tokens, "repeats": args.repeats, "agree_steps": args.agree_steps,
            "profile_steps": args.profile_steps,
            "work": str(work), "hf": str(work / "hf"), "exported": str(work / "exported"),
            "optimized": str(work / "optimized"), "genai": str(work / "genai"), "int4": str(work / "int4"),
            "genai_int4": str(work / "genai-int4"), "target": args.target or ("cuda" if cuda else "cpu"),
            "provider": "cuda" if cuda else "cpu", "genai_precision": "fp16" if cuda else "fp32",
            "genai_ep": "cuda" if cuda else "cpu", "reference_tokens": str(work / "torch_tokens.json")}
    res = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": " ".join(sys.argv),
           "shape": shape, "dtype": spec["dtype"], "prompt": args.prompt, "new_tokens": args.new_tokens,
           "repeats": args.repeats, "budget_s": args.budget_s, "versions": versions(), "rows": [], "skipped": [],
           "builds": {}, "notes": []}

    def save():
        res["elapsed_s"] = round(time.time() - t0, 1)
        (out / "bench_gpu.json").write_text(json.dumps(res, indent=1))
        (out / "bench_gpu.md").write_text(render(res))

    mem = None
    if cuda:
        try:
            mem = MemoryWatch()
        except Exception as e:  # no NVML: the table says so rather than guessing
            res["notes"].append(f"no peak memory: NVML unavailable ({type(e).__name__}: {e})")
    ncpu = os.cpu_count() or 1
    bench_cores = set(range(min(6, ncpu))) if ncpu >= 12 else None
    build_cores = set(range(6, ncpu)) if ncpu >= 12 else None
    if bench_cores:
        res["notes"].append(f"benchmarks pinned to cores {min(bench_cores)}-{max(bench_cores)}, builds to "
                            f"{min(build_cores)}-{max(build_cores)} (they overlap in time)")

    child = Child("setup", spec, log, None)
    r = child.next(deadline)
    if not isinstance(r, dict):
        res["skipped"].append({"what": "everything", "why": f"setup failed: {child.error() if r is None else r}"})
        save()
        print(render(res))
        return 1
    res["setup"] = r
    print(f"setup: {r['params'] / 1e6:.1f}M params, {r['weight_bytes'] / 1e9:.2f} GB weights, copy "
          f"{r['copy_bw_GBs']:.0f} GB/s, matmul {r.get('matmul_TFLOPs') or 0:.0f} TFLOP/s ({r['build_s']} s)", flush=True)
    save()

    builds = {"onnxpipe": Child("build_onnxpipe", spec, log, build_cores)}
    if ("genai" in args.anchors or "genai_graph" in args.anchors) and (cuda or args.genai_cpu):
        builds["genai"] = Child("build_genai", spec, log, build_cores)
    if "onnxpipe_int4_graph" in args.anchors:
        builds["onnxpipe_int4"] = Child("build_onnxpipe_int4", spec, log, build_cores)
    if ("genai_int4" in args.anchors or "genai_int4_graph" in args.anchors) and (cuda or args.genai_cpu):
        builds["genai_int4"] = Child("build_genai_int4", spec, log, build_cores)
    build_state: dict[str, str | None] = {}  # None: ready; str: why not

    def build_done(name: str, block: bool) -> bool:
        """Read what the build has reported; True once it finished (ready or failed: see build_state)."""
        if name in build_state:
            return True
        c = builds.get(name)
        if c is None:
            build_state[name] = "not requested"
            return True
        want = {"onnxpipe": "optimize", "genai": "genai", "onnxpipe_int4": "onnxpipe_int4",
                "genai_int4": "genai_int4"}[name]
        while True:
            if block:
                r = c.next(deadline - args.reserve_s)
            else:
                try:
                    r = c.results.get_nowait()
                except queue.Empty:
                    return False
            if r == "timeout":
                build_state[name] = "build did not finish within the time budget"
            elif r is None:
                build_state[name] = f"build failed ({c.error()})"
            else:
                res["builds"][r["stage"]] = r
                print(f"build {r['stage']}: {r.get('seconds', '')} s {r.get('error', '')}", flush=True)
                save()
                if "error" in r:
                    build_state[name] = f"build failed: {r['error']}"
                elif r["stage"] == want:
                    build_state[name] = None
            if name in build_state:
                return True

    needs = {"onnxpipe": "onnxpipe", "onnxpipe_fullhead": "onnxpipe", "onnxpipe_graph": "onnxpipe", "onnxpipe_graph_hostfed": "onnxpipe", "onnxpipe_graph_xqa": "onnxpipe",
             "onnxpipe_int4_graph": "onnxpipe_int4", "genai_int4": "genai_int4", "genai_int4_graph": "genai_int4",
             "onnxpipe_profile": "onnxpipe", "genai": "genai",
             "genai_graph": "genai"}
    small = [b for b in args.batches if b <= 8]
    large = [b for b in args.batches if b > 8]
    order = sorted(args.anchors, key=PRIORITY.index)
    plan = [(a, [1] if a in ("genai_graph", "genai_int4_graph") else small) for a in order]
    if "onnxpipe" in args.anchors and args.profile_steps > 1:
        plan.append(("onnxpipe_profile", [1]))
    plan += [(a, large) for a in order if a not in ("genai_graph", "genai_int4_graph")]
    for graphs in ("genai_graph", "genai_int4_graph"):  # GenAI captures CUDA graphs only at batch 1
        if graphs in args.anchors:
            res["skipped"] += [{"what": f"{ANCHORS[graphs]} b{b}", "why": "GenAI's CUDA graphs are for batch 1"}
                               for b in args.batches if b != 1]
    plan = [(a, bs) for a, bs in plan if bs]
    while plan:
        # the first row in priority order whose model is built; when every left row waits on a build, wait
        ready = [item for item in plan if item[0] not in needs or build_done(needs[item[0]], block=False)]
        anchor, batches = ready[0] if ready else plan[0]
        plan.remove((anchor, batches))
        if anchor.startswith("genai") and not cuda and not args.genai_cpu:
            res["skipped"].append({"what": f"{LABELS[anchor]} b{batches}", "why": "cpu run without --genai-cpu"})
            continue
        why = None
        if anchor in needs:
            build_done(needs[anchor], block=True)
            why = build_state[needs[anchor]]
        if why is None and time.time() > deadline - args.reserve_s:
            why = "time budget spent"
        if why is not None:
            res["skipped"].append({"what": f"{LABELS[anchor]} b{batches}", "why": why})
            print(f"skip {anchor} {batches}: {why}", flush=True)
            save()
            continue
        if mem:
            mem.reset_total()
        started = time.time()
        c = Child(anchor, dict(spec, batches=batches), log, bench_cores)
        # one slow anchor (a long compile) must not eat the rows after it: each child gets a cap of its own
        child_deadline = min(deadline, time.time() + args.cap_s * (2 if anchor == "torch_compile" else 1))
        done = set()
        while True:
            r = c.next(child_deadline)
            if r == "timeout" or r is None:
                left = [b for b in batches if b not in done]
                if left:
                    why = (f"time budget spent (killed after {time.time() - started:.0f} s)" if r == "timeout"
                           else f"failed: {c.error()}")
                    res["skipped"].append({"what": f"{LABELS[anchor]} b{left}", "why": why})
                    print(f"skip {anchor} {left}: {why}", flush=True)
                break
            done.add(r["batch"])
            if r["kind"] == "profile":
                res["profile"] = r
                print(f"profile b1: model_run {r['model_run_ms']} ms/step, kernels {r['kernel_ms_total']} ms: "
                      + ", ".join(f"{k} {v}" for k, v in list(r["kernel_ms_by_op"].items())[:6]), flush=True)
                save()
                continue
            row = {"anchor": anchor, **{k: v for k, v in r.items() if k not in ("kind", "tokens", "gaps")}}
            if mem:
                row["peak_mem_MB"], row["mem_method"] = (round(x / 2**20) if isinstance(x, int) else x for x in mem.of(c.proc.pid))
            if anchor == "torch_eager" and r.get("tokens"):
                ref = _read_json(spec["reference_tokens"]) or {}
                ref[str(r["batch"])] = r["tokens"]
                if r.get("gaps"):
                    ref[f"gaps{r['batch']}"] = r["gaps"]
                Path(spec["reference_tokens"]).write_text(json.dumps(ref))
            res["rows"].append(row)
            print(f"{anchor} b{r['batch']}: prefill {r['prefill_ms']:.2f} ms, decode {r['decode_ms']:.3f} ms/step, "
                  f"{r['tok_s']:.0f} tok/s, peak {row.get('peak_mem_MB', '-')} MB", flush=True)
            save()
        c.kill()
    for c in builds.values():
        c.kill()
    save()
    print()
    print(render(res))
    return 0


def versions() -> dict:
    import importlib.metadata as md

    v = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai-cuda",
                 "onnxruntime-genai", "onnxscript", "onnx-ir"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        import onnxruntime as ort

        v["onnxruntime (imported)"] = ort.__version__
    except Exception:  # not installed where the smoke test runs without it
        pass
    return v


# ----------------------------------------------------------------------------------------------- table
def floors(res: dict, batch: int, int4: bool = False) -> dict | None:
    """The memory-bandwidth floor; for int4 rows the weight bytes are onnxpipe's int4 directory's size."""
    s = res.get("setup")
    if not s:
        return None
    if int4:
        size = (res.get("builds", {}).get("onnxpipe_int4") or {}).get("size_MB")
        if not size:
            return None
        s = dict(s, weight_bytes=size * 1e6)
    d = dims(res["shape"])
    kv_per_token = 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * (2 if res["dtype"] == "fp16" else 4)
    bw = s["copy_bw_GBs"] * 1e9
    mean_len = res["prompt"] + res["new_tokens"] / 2
    decode_s = (s["weight_bytes"] + batch * mean_len * kv_per_token) / bw
    prefill_s = s["weight_bytes"] / bw
    if s.get("matmul_TFLOPs"):
        prefill_s = max(prefill_s, 2 * s["params"] * batch * res["prompt"] / (s["matmul_TFLOPs"] * 1e12))
    return {"decode_ms": decode_s * 1e3, "prefill_ms": prefill_s * 1e3, "tok_s": batch / decode_s}


def render(res: dict) -> str:
    rows = res["rows"]
    lines = []
    s = res.get("setup", {})
    if s:
        lines.append(f"Model: {res['shape']} ({s['params'] / 1e6:.1f}M params, {s['weight_bytes'] / 1e9:.2f} GB of "
                     f"{res['dtype']} weights); prompt {res['prompt']}, {res['new_tokens']} new tokens, greedy, median "
                     f"of {res['repeats']} timed runs. Measured ceilings: device copy {s['copy_bw_GBs']:.0f} GB/s "
                     f"(read + write), matmul {s.get('matmul_TFLOPs') or 0:.0f} TFLOP/s.")
        lines.append("")
    lines.append("| anchor | batch | prefill ms | decode ms/step | tokens/s | peak GPU MB | decode vs fastest anchor "
                 "| decode vs floor | tok/s vs floor | prefill vs fastest |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    # "fastest anchor": the fastest of the others (not onnxpipe's rows), int4 rows against int4 anchors
    anchors = [r for r in rows if not r["anchor"].startswith("onnxpipe")]
    for batch, int4 in sorted({(r["batch"], "int4" in r["anchor"]) for r in rows}):
        here = [r for r in rows if r["batch"] == batch and ("int4" in r["anchor"]) == int4]
        mine = [r for r in anchors if r["batch"] == batch and ("int4" in r["anchor"]) == int4]
        best_dec = min((r["decode_ms"] for r in mine), default=None)
        best_pre = min((r["prefill_ms"] for r in mine), default=None)
        f = floors(res, batch, int4)
        for r in sorted(here, key=lambda r: list(ANCHORS).index(r["anchor"])):
            ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
            lines.append(
                f"| {ANCHORS[r['anchor']]} | {batch} | {r['prefill_ms']:.1f} | {r['decode_ms']:.3f} | {r['tok_s']:,.0f} | "
                f"{r.get('peak_mem_MB', '-')} | {ratio(r['decode_ms'], best_dec)} | "
                f"{ratio(r['decode_ms'], f['decode_ms']) if f else '-'} | "
                f"{ratio(r['tok_s'], f['tok_s']) if f else '-'} | {ratio(r['prefill_ms'], best_pre)} |")
        if f:
            lines.append(f"| *floor{' (int4 bytes)' if int4 else ''}* | {batch} | {f['prefill_ms']:.2f} | "
                         f"{f['decode_ms']:.3f} | {f['tok_s']:,.0f} | | | | | |")
    for r in rows:
        sa = r.get("info", {}).get("torch_self_agreement")
        if sa:
            lines.append("")
            lines.append(f"PyTorch against its own {res['dtype']} greedy tokens (batch {r['batch']}, teacher-forced): "
                         f"its {res['dtype']} model in one full forward {sa['full_forward']:.1%}; the same weights in "
                         f"fp32 {sa['fp32']:.1%}; its own rerun, free-running, "
                         f"{r['info'].get('torch_rerun_free_running_equal', float('nan')):.1%} of positions equal.")
    said: dict[str, list[str]] = {}  # the same figures from several onnxpipe rows are said once, naming them all
    for r in rows:
        ag = r.get("info", {}).get("agreement_vs_torch")
        if ag:
            int4 = "int4" in r["anchor"]
            text = (f"(batch {r['batch']}, {ag['steps']} steps x {ag['rows']} rows): free-running "
                    f"{ag['free_running_equal']:.1%} of positions equal (first divergence per row "
                    f"{ag['first_divergence']}); teacher-forced {ag['teacher_forced']:.1%}." + (
                        f" Where the teacher-forced argmaxes differ, PyTorch's own top-1 led its top-2 by at most "
                        f"{max(ag['torch_margin_at_misses']):.4f} (median margin over all positions "
                        f"{ag['torch_margin_median']:.4f})." if ag.get("torch_margin_at_misses") and not int4 else "")
                    + (" int4 weights: this measures the quantization of random weights (see the int4 build's "
                       "perplexity change), not the runtime." if int4 else ""))
            said.setdefault(text, []).append(ANCHORS[r["anchor"]])
    for text, anchors in said.items():
        lines.append("")
        lines.append(f"Greedy agreement with PyTorch {res['dtype']}'s tokens, {'; '.join(anchors)} {text}")
    for r in rows:
        sp = r.get("info", {}).get("step_split_ms")
        if r.get("info", {}).get("graph", "optimized").startswith("exported"):
            lines.append(f"- onnxpipe b{r['batch']} ran the {_plain(r['info']['graph'], 300)}")
        if sp:
            lines.append(f"- {ANCHORS[r['anchor']]} b{r['batch']}: decode step {sp['step']} ms = decoder graph run "
                         f"{sp['decoder_run']} + argmax head run {sp['head_run']} + host work (bind, upload, read back, "
                         f"Python) {sp['other']}")
    p = res.get("profile")
    if p:
        lines.append(f"- onnxpipe b1 ORT profile ({p.get('graph', 'optimized')} graph, {p['steps']} decode steps): model_run {p['model_run_ms']} ms/step, "
                     f"kernels {p['kernel_ms_total']} ms/step; by op: "
                     + ", ".join(f"{k} {v}" for k, v in list(p["kernel_ms_by_op"].items())[:8]))
    if res["skipped"]:
        lines.append("")
        lines += [f"- skipped: {k['what']}: {_plain(k['why'])}" for k in res["skipped"]]
    b = res.get("builds", {})
    if b:
        lines.append("")
        lines.append("Builds: " + "; ".join(f"{k} {v.get('seconds', '?')} s" + (f" ({v['error']})" if "error" in v else "")
                                          for k, v in b.items()))
        opt = b.get("optimize")
        if opt:
            lines.append(f"onnxpipe graph: fused ops {opt.get('fused_ops')}, KV shares buffer: {opt.get('shares_buffer')}")
    for n in res.get("notes", []):
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def _plain(text: str, limit: int = 400) -> str:
    """A child's error for a markdown line: no terminal colour codes, no pipes, bounded."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text).replace("|", "/")
    return text if len(text) <= limit else text[:limit] + " ..."


def write_docs(res: dict, docs: Path) -> None:
    """Replace (or append) the "## GPU decode" section of docs/benchmarks.md with this run's table."""
    v = res["versions"]
    s = res.get("setup", {})
    body = [
        "## GPU decode: onnxpipe against PyTorch, torch.compile and ORT GenAI",
        "",
        f"`{res['command']}` (scripts/bench_gpu.py; one device call) — {res['date']}, {s.get('gpu', res.get('device', '?'))}.",
        "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
        "",
        render(res).rstrip(),
        "",
    ]
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    head = "## GPU decode"
    start = text.find(head)
    if start >= 0:
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + "\n".join(body) + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + "\n".join(body)
    docs.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama config instead of the 1B shape")
    ap.add_argument("--shape", default="llama-1b", choices=[k for k in SHAPES if k != "tiny"])
    ap.add_argument("--target", choices=["cpu", "cuda"], help="optimize's target (default: the device's)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--anchors", default=",".join(a for a in ANCHORS if a != "onnxpipe_graph_xqa"),
                    help="default: all but onnxpipe_graph_xqa (runs 7-8: level with the default kernel)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--agree-steps", type=int, default=64)
    ap.add_argument("--profile-steps", type=int, default=32, help="decode steps of the ORT-profiled run; 0: none")
    ap.add_argument("--budget-s", type=float, default=500, help="stop starting rows after this; kill what overruns")
    ap.add_argument("--cap-s", type=float, default=110, help="most seconds one anchor's child may run (compile: twice)")
    ap.add_argument("--reserve-s", type=float, default=25, help="leave this much of the budget unstarted")
    ap.add_argument("--genai-cpu", action="store_true", help="run the GenAI rows on the CPU too (smoke test)")
    ap.add_argument("--out", default="out/bench_gpu")
    ap.add_argument("--work", default="/tmp/onnxpipe_bench_gpu")
    ap.add_argument("--verbose", action="store_true", help="echo the children's logs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--render", help="print the table of a bench_gpu.json")
    ap.add_argument("--write-docs", help="with --render: put the table into this markdown file's GPU decode section")
    args = ap.parse_args()
    if args.child:
        CHILDREN[args.child](json.loads(Path(args.spec).read_text()))
        return 0
    if args.render:
        res = json.loads(Path(args.render).read_text())
        print(render(res))
        if args.write_docs:
            write_docs(res, Path(args.write_docs))
        return 0
    args.batches = [int(b) for b in args.batches.split(",")]
    args.anchors = [a for a in args.anchors.split(",") if a]
    unknown = set(args.anchors) - set(ANCHORS)
    if unknown:
        ap.error(f"unknown anchors {sorted(unknown)}; known: {', '.join(ANCHORS)}")
    return main_orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
