"""bench_gpu.py's timed rows, each run in a child process of its own: PyTorch eager and torch.compile, onnxpipe
(plain, CUDA graphs, inputs uploaded each step, XQA, int4, ORT-profiled) and ORT GenAI, with the greedy agreement
of each against PyTorch fp16's tokens. CHILDREN maps a child's name to the function that runs it."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from bench_gpu_builds import (child_build_genai, child_build_onnxpipe, child_build_onnxpipe_int4, child_setup,
                              emit)

ANCHORS = {  # run in this order: onnxpipe after eager, whose tokens it is compared with
    "torch_eager": "PyTorch eager generate",
    "torch_compile": "transformers static cache + torch.compile",
    "onnxpipe": "onnxpipe (export -> optimize L3 -> runtime)",
    "onnxpipe_fullhead": "onnxpipe, LM head on every prompt position",
    "onnxpipe_graph": "onnxpipe + CUDA graphs",
    "onnxpipe_graph_hostfed": "onnxpipe + CUDA graphs, inputs uploaded each step",
    "onnxpipe_graph_xqa": "onnxpipe + CUDA graphs + XQA decode kernel",
    "onnxpipe_int4_graph": "onnxpipe int4 (symmetric RTN) + CUDA graphs",
    "onnxpipe_int4_graph_fpa": "onnxpipe int4 + CUDA graphs + ORT_FPA_INTB_GEMM=1",
    "onnxpipe_int4_graph_kernels": "onnxpipe int4 + CUDA graphs + onnxpipe kernels (MatMulInt4)",
    "onnxpipe_int4_graph_kernels_nohead": "onnxpipe int4 + CUDA graphs + onnxpipe kernels but the LM head",
    "onnxpipe_int4_graph_kernels_noqkv": "onnxpipe int4 + CUDA graphs + onnxpipe kernels but the packed qkv",
    "onnxpipe_int4_graph_kernels_nofuse": "onnxpipe int4 + CUDA graphs + onnxpipe kernels, gate/up apart",
    "onnxpipe_int4_graph_kernels_hgemv": "onnxpipe int4 + CUDA graphs + onnxpipe kernels, every call the half2 GEMV form",
    "onnxpipe_int4_graph_pairs": "onnxpipe int4 + CUDA graphs, MatMulNBits everywhere, gate/up pairs as one + SiluMul",
    "onnxpipe_graph_kernels": "onnxpipe + CUDA graphs + onnxpipe kernels (gate/up as one, SiluMul)",
    "onnxpipe_graph_kernels_linear": "onnxpipe + CUDA graphs + onnxpipe kernels + every MatMul as Linear (our GEMV)",
    "genai": "ORT GenAI",
    "genai_graph": "ORT GenAI + CUDA graphs",
    "genai_int4": "ORT GenAI int4",
    "genai_int4_graph": "ORT GenAI int4 + CUDA graphs",
    "genai_int4_graph_fpa": "ORT GenAI int4 + CUDA graphs + ORT_FPA_INTB_GEMM=1",
}
LABELS = {**ANCHORS, "onnxpipe_profile": "onnxpipe, ORT-profiled decode"}
PRIORITY = ["torch_eager", "onnxpipe", "onnxpipe_fullhead", "onnxpipe_graph", "onnxpipe_graph_hostfed", "onnxpipe_graph_xqa", "genai", "genai_graph",
            "onnxpipe_int4_graph", "onnxpipe_int4_graph_fpa", "onnxpipe_int4_graph_kernels",
            "onnxpipe_int4_graph_kernels_nohead", "onnxpipe_int4_graph_kernels_noqkv",
            "onnxpipe_int4_graph_kernels_nofuse", "onnxpipe_int4_graph_kernels_hgemv", "onnxpipe_int4_graph_pairs", "onnxpipe_graph_kernels",
            "onnxpipe_graph_kernels_linear", "genai_int4", "genai_int4_graph", "genai_int4_graph_fpa",
            "torch_compile"]  # eager first: its tokens are the
# reference for onnxpipe's agreement; torch.compile (no build to wait for) fills the GPU while the builds run


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
             + (", ORT_ENABLE_XQA=1" if os.environ.get("ORT_ENABLE_XQA") == "1" else "")
             + (", ORT_FPA_INTB_GEMM=1" if os.environ.get("ORT_FPA_INTB_GEMM") == "1" else "")
             + (f", ONNXPIPE_KERNELS={os.environ['ONNXPIPE_KERNELS']}" if os.environ.get("ONNXPIPE_KERNELS") else "")
             + (f", ONNXPIPE_KERNELS_SKIP={os.environ['ONNXPIPE_KERNELS_SKIP']}"
                if os.environ.get("ONNXPIPE_KERNELS") and os.environ.get("ONNXPIPE_KERNELS_SKIP") else ""))
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
            if getattr(lm.session, "kernels", None) is not None and lm.session.kernels.mode != "off":
                graph += f", {lm.session.kernels.line()}"
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
        _int4_tokens(spec, batch, tokens, info)
        emit("row", batch=batch, **summarize(runs, batch, new), info=info)


def child_onnxpipe_xqa(spec: dict) -> None:
    """ORT's XQA GroupQueryAttention decode kernel (shared buffer, one token, no window) is opt-in for fp16 caches;
    the kernel reads the variable when the session is made, so this child sets it first."""
    os.environ["ORT_ENABLE_XQA"] = "1"
    child_onnxpipe(dict(spec, cuda_graph=True))


def _with_fpa(child, spec: dict) -> None:
    """onnxruntime's CUTLASS weight-only (fpA_intB) MatMulNBits kernels are opt-in through this variable, read when a
    session's kernels are made; a child of its own sets it first."""
    os.environ["ORT_FPA_INTB_GEMM"] = "1"
    child(spec)


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


def _int4_tokens(spec: dict, batch: int, tokens: list[list[int]], info: dict) -> None:
    """The plain int4 run keeps its greedy tokens (int4_tokens_out); a run of the same int4 model with other kernels
    (int4_tokens_in) says how many positions equal them, free-running, and each row's first divergence."""
    if spec.get("int4_tokens_out"):
        saved = _read_json(spec["int4_tokens_out"]) or {}
        saved[str(batch)] = [list(map(int, r)) for r in tokens]
        Path(spec["int4_tokens_out"]).write_text(json.dumps(saved))
    theirs = (_read_json(spec.get("int4_tokens_in")) or {}).get(str(batch))
    if theirs:
        n = min(len(theirs[0]), len(tokens[0]), spec["agree_steps"])
        pairs = [(list(a[:n]), list(b[:n])) for a, b in zip(tokens, theirs)]
        info["agreement_vs_int4"] = {
            "steps": n, "rows": len(pairs),
            "free_running_equal": sum(x == y for a, b in pairs for x, y in zip(a, b)) / max(1, n * len(pairs)),
            "first_divergence": [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n) for a, b in pairs]}


def _with_kernels(child, spec: dict, skip: str = "", fuse: str = "on", form: str = "", linear: str = "off") -> None:
    """onnxpipe's own kernels (onnxpipe.runtime.kernels: MatMulNBits -> onnxpipe.MatMulInt4 at load) through the
    variables the decoder session reads, set before the child loads the model; "on": a fallback fails the row.
    ``skip``: the kinds of node left to MatMulNBits (ONNXPIPE_KERNELS_SKIP, e.g. "head": the LM head found from the
    graph), set for every kernels row so a value in the caller's environment never reaches the other one.
    ONNXPIPE_BENCH_KERNELS=reference runs the CPU reference kernels instead (the --device cpu smoke of the wiring).
    ``fuse``: ONNXPIPE_KERNELS_FUSE (gate/up pairs as one MatMulInt4 + SiluMul; "off": apart). ``form``:
    ONNXPIPE_INT4_GEMM_FORM, the int4 GEMM's form for every call ("": by the table and the rule; "hgemv": the half2
    GEMV form, meant for batch 1: past M = 4 it reads the weights again per 4 rows). ``linear``:
    ONNXPIPE_KERNELS_LINEAR (float16 MatMuls by a weight as onnxpipe.Linear: our GEMV at M <= 4, cuBLAS past it)."""
    os.environ["ONNXPIPE_KERNELS"] = os.environ.get("ONNXPIPE_BENCH_KERNELS", "on")
    os.environ["ONNXPIPE_KERNELS_SKIP"] = skip
    os.environ["ONNXPIPE_KERNELS_FUSE"] = fuse
    os.environ["ONNXPIPE_INT4_GEMM_FORM"] = form
    os.environ["ONNXPIPE_KERNELS_LINEAR"] = linear
    child(spec)


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
    "onnxpipe_int4_graph": lambda s: child_onnxpipe(dict(s, cuda_graph=True, optimized=s["int4"],
                                                         int4_tokens_out=str(Path(s["work"]) / "int4_tokens.json"))),
    "onnxpipe_int4_graph_fpa": lambda s: _with_fpa(child_onnxpipe, dict(s, cuda_graph=True, optimized=s["int4"])),
    "onnxpipe_int4_graph_kernels": lambda s: _with_kernels(child_onnxpipe, dict(
        s, cuda_graph=True, optimized=s["int4"], int4_tokens_in=str(Path(s["work"]) / "int4_tokens.json"))),
    "onnxpipe_int4_graph_kernels_nohead": lambda s: _with_kernels(child_onnxpipe, dict(
        s, cuda_graph=True, optimized=s["int4"], int4_tokens_in=str(Path(s["work"]) / "int4_tokens.json")),
        skip="head"),
    "onnxpipe_int4_graph_kernels_noqkv": lambda s: _with_kernels(child_onnxpipe, dict(
        s, cuda_graph=True, optimized=s["int4"], int4_tokens_in=str(Path(s["work"]) / "int4_tokens.json")),
        skip="qkv"),
    "onnxpipe_graph_kernels": lambda s: _with_kernels(child_onnxpipe, dict(s, cuda_graph=True)),
    "onnxpipe_graph_kernels_linear": lambda s: _with_kernels(child_onnxpipe, dict(s, cuda_graph=True), linear="on"),
    "onnxpipe_int4_graph_kernels_nofuse": lambda s: _with_kernels(child_onnxpipe, dict(
        s, cuda_graph=True, optimized=s["int4"], int4_tokens_in=str(Path(s["work"]) / "int4_tokens.json")),
        fuse="off"),
    "onnxpipe_int4_graph_kernels_hgemv": lambda s: _with_kernels(child_onnxpipe, dict(
        s, cuda_graph=True, optimized=s["int4"], int4_tokens_in=str(Path(s["work"]) / "int4_tokens.json")),
        form="hgemv"),
    "onnxpipe_int4_graph_pairs": lambda s: _with_kernels(child_onnxpipe, dict(
        s, cuda_graph=True, optimized=s["int4"], int4_tokens_in=str(Path(s["work"]) / "int4_tokens.json")),
        skip="all"),
    "build_onnxpipe_int4": lambda s: child_build_onnxpipe_int4(s),
    "build_genai_int4": lambda s: child_build_genai(dict(s, genai=s["genai_int4"], genai_precision="int4"),
                                                    stage="genai_int4"),
    "genai_int4": lambda s: child_genai(dict(s, genai=s["genai_int4"]), graphs=False),
    "genai_int4_graph": lambda s: child_genai(dict(s, genai=s["genai_int4"]), graphs=True),
    "genai_int4_graph_fpa": lambda s: _with_fpa(lambda t: child_genai(t, graphs=True), dict(s, genai=s["genai_int4"])),
    "genai": lambda s: child_genai(s, graphs=False),
    "genai_graph": lambda s: child_genai(s, graphs=True),
}


