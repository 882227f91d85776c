#!/usr/bin/env python3
"""Where a decode step's time goes on the GPU, kernel by kernel, for onnxpipe and ORT GenAI side by side.

    python3 scripts/profile_decode.py --work /tmp/onnxpipe_bench_gpu --out $OUT/profile   # after bench_gpu.py
    python3 scripts/profile_decode.py --work W --out $OUT/profile --variants onnxpipe_int4_graph,onnxpipe_int4_graph_kernels --batches 1,8 --budget-s 240

It reuses the models scripts/bench_gpu.py built in its work directory (optimized = onnxpipe's CUDA form, int4,
genai, genai-int4). Each variant runs in a child process of its own: a greedy generation's prefill and first step
run untimed, then --steps decode steps run under torch.profiler with CUDA activity only. CUPTI records every kernel
of the process, onnxruntime's included (CUDA-graph replays too, node by node). Per step it reports the wall time,
the device's busy time (the union of kernel and copy intervals), the idle rest, the kernels grouped by name (with
the mean of each one's longest call a step: the LM head's among the int4 GEMMs, which share a kernel), and their
time by kind (KERNEL_GROUPS: the int4 GEMMs, onnxruntime's MatMulNBits, other GEMMs, attention, norms, ...).
Decode variants run at each of --batches (rows of one prompt repeated; GenAI's CUDA graphs at batch 1 only).

onnxpipe_int4_graph_kernels is the int4 model with onnxpipe's own kernels (DecoderSession(kernels="on"):
MatMulNBits -> onnxpipe.MatMulInt4 at load; "reference" with --provider cpu); onnxpipe_int4_graph_kernels_nohead the
same with the LM head left on MatMulNBits (kernel_skip="head"; opt-in: name it in --variants). With both it and onnxpipe_int4_graph
in --variants, a "compare" line per batch puts the two profiles side by side: step, busy time and each kind's time
before and after, and the kernels whose time moved most. --budget-s starts no variant past that many seconds (the
rest are listed as skipped) and gives each child at most what is left (and --cap-s).

The prefill_* variants (name them in --variants: prefill_graph, prefill_nograph, prefill_nograph_fullhead,
prefill_genai) profile a whole prefill of --prompt tokens x --prefill-batch rows the same way.

The chunk_* variants (name them in --variants: chunk_graph, chunk_nograph) profile a long prompt's chunk beside a
decode step of the same slot, as `onnxpipe serve --cuda-graph` reads one: a DecoderSession with CUDA graphs and the
step tail, its slot of --chunk-rows x --chunk-capacity positions, its last row read as a --chunk-prompt-token prompt in
chunks of --chunk-tokens through RowPrefill.run_chunk (chunk_graph: chunk graphs on, that row's graphs captured
ahead as serve's warm-up does; chunk_nograph: off, serve's uncaptured run), the other rows decoding from --prompt
positions, the row read parked at the prompt's length. Profiled, each part on its own: the prompt's first --chunks
chunks ("chunks@0"), its last --chunks ("chunks@end"), the same last chunks again, each then a fed decode step
("iteration@end", serve's iteration while a prompt is read; a chunk rewrites the same entries), and --chunks decode
steps alone ("step"): per chunk (or step) the device's busy time, the kernels, their kinds and the top ones,
then the kinds at the start against near the end (does attention over the long context make the cost?) and a chunk
against a step. The model: --chunk-model (default: WORK/optimized, bench_gpu.py's CUDA form, fp16 on a GPU).

A second part ("levels") times, at onnxruntime's ENABLE_ALL and ENABLE_BASIC optimization levels and with prompts
padded to multiples of 1 or 32 (generate.PREFILL_BUCKET), the first prefill of each new prompt length against a
repeat of the same length, and the fed CUDA-graph decode step.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULT = "@@RESULT "
VARIANTS = ["onnxpipe_graph", "onnxpipe_graph_hostfed", "genai_graph", "onnxpipe_int4_graph",
            "onnxpipe_int4_graph_kernels", "genai_int4_graph", "onnxpipe_nograph", "genai"]
# a kernel's kind, by the first pattern its name matches (ours before onnxruntime's: names are searched, not anchored)
# (run 7's names: MatMulFloat4BitsKernelM1, nvjet_sm90_* and cublasLt::splitKreduce_kernel, H64::grp4_fp16::kernel_mha,
# UnpackRoPEAppend, GetSequenceLengths, SkipLayerNormKernelSmall, _UnaryElementWise<..OP_QuickGelu..>)
KERNEL_GROUPS = [
    ("int4 GEMM (onnxpipe)", r"int4_h?gem[mv](_rows)?_kernel"),  # the mma forms and the batch-1 GEMVs
    ("int4 dequantize (onnxpipe)", r"int4_dequant"),
    ("fp16 GEMV (onnxpipe Linear)", r"linear_gemv_kernel"),  # before the cuBLAS pattern, which "gemv" would take
    ("MatMulNBits (onnxruntime)", r"MatMulFloat4Bits|MatMulFloatInt4|MatMulNBits|Dequantize4Bits|DequantizeBlockwise|"
                                  r"fpA_intB|[Ww]eightOnly|4Bits|[Ii]nt4"),
    ("GEMM (cuBLAS, CUTLASS)", r"gemm|gemv|cutlass|xmma|cublas|nvjet|splitKreduce"),
    ("attention", r"[Aa]ttention|flash|mha|xqa|[Rr]otary|RoPE|ConcatNewToPast|[Kk]v[Cc]ache|SequenceLengths|seqlens"),
    ("norms", r"LayerNorm|RMSNorm|layer_norm|rms_norm|[Ss]kip"),
    ("elementwise", r"ElementWise|Elementwise|elementwise"),
    ("copies and sets", r"^\[gpu_mem"),
]
# (before, after) pairs: each batch where both have a profile gets compare()'s lines
COMPARE = (("onnxpipe_int4_graph", "onnxpipe_int4_graph_kernels"), ("onnxpipe_graph", "onnxpipe_graph_kernels"),
           ("onnxpipe_graph_kernels", "onnxpipe_graph_kernels_linear"))
PREFILL_VARIANTS = ["prefill_graph", "prefill_nograph", "prefill_nograph_fullhead", "prefill_genai"]  # opt-in
CHUNK_VARIANTS = ["chunk_graph", "chunk_nograph"]  # opt-in
CHUNK_PARTS = ("chunks@0", "chunks@end", "iteration@end", "step")
CHUNK_HELP = """where a long prompt's chunk's device time goes (serve's slot, a 4096-token prompt in chunks of 64):
  python3 scripts/profile_decode.py --work W --out $OUT/profile-chunk --variants chunk_graph,chunk_nograph \\
      --chunks 8 --cap-s 200 --budget-s 420      # W: bench_gpu.py's work dir, or --chunk-model DIR (a CUDA form)
  per part (chunks@0, chunks@end, iteration@end, step): device ms and kernels per chunk, the kinds, the top
  kernels; then each variant's kinds at the prompt's start against near its end, and a chunk against a step.
  --chunk-rows 32 --chunk-capacity 4352 --chunk-prompt 4096 --chunk-tokens 64 by default; with --provider cpu a
  smoke test (wall times only)."""


def emit(**fields) -> None:
    print(RESULT + json.dumps(fields), flush=True)


def prompt_ids(n: int, vocab: int = 256, rows: int = 1):
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, size=(1, n)).astype(np.int64).repeat(rows, axis=0)


def kernel_group(name: str) -> str:
    import re

    return next((group for group, pattern in KERNEL_GROUPS if re.search(pattern, name)), "other")


def kernel_table(trace: Path, steps: int, t_wall: float) -> dict:
    """Kernels, copies and sets from a torch.profiler chrome trace, per decode step."""
    events = json.loads(trace.read_text())
    events = events.get("traceEvents", events)
    dev = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_name: dict = collections.defaultdict(lambda: [0.0, 0])
    calls: dict = collections.defaultdict(list)
    for e in dev:
        name = e["name"] if e["cat"] == "kernel" else f"[{e['cat']}] {e['name']}"
        by_name[name][0] += e["dur"]
        by_name[name][1] += 1
        calls[name].append(e["dur"])
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in dev)
    busy, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    rows = sorted(((k, v[0] / steps, v[1] / steps) for k, v in by_name.items()), key=lambda r: -r[1])
    groups: dict = collections.defaultdict(lambda: [0.0, 0.0])
    for k, us, c in rows:
        g = groups[kernel_group(k)]
        g[0] += us
        g[1] += c
    return {"steps": steps, "wall_ms": round(t_wall * 1e3 / steps, 4), "busy_ms": round(busy / 1e3 / steps, 4),
            "kernel_sum_ms": round(sum(r[1] for r in rows) / 1e3, 4), "kernels_per_step": round(sum(r[2] for r in rows), 1),
            "groups": {g: {"us": round(v[0], 2), "count": round(v[1], 2)} for g, v in
                       sorted(groups.items(), key=lambda kv: -kv[1][0])},
            "top": [{"name": k[:160], "us": round(us, 2), "count": round(c, 2), "longest_us": longest(calls[k], steps)}
                    for k, us, c in rows[:40]]}


def longest(durations: list, steps: int) -> float:
    """The mean of a kernel's ``steps`` longest calls: where one call a step outlasts the others of its name (the
    LM head among a step's int4 GEMMs, which share one kernel), its time per call."""
    top = sorted(durations, reverse=True)[:max(1, steps)]
    return round(sum(top) / len(top), 2)


def compare(before: dict, after: dict, moved: int = 6) -> list[str]:
    """Two profiles of one batch side by side (per step): wall and busy ms, each kernel kind's us before -> after,
    and the ``moved`` kernels (of each side's top 40) whose time changed most."""
    b, a = before["batch"], after["batch"]
    out = [f"batch {b}: {before['variant']} -> {after['variant']}: wall {before['wall_ms']:.3f} -> {after['wall_ms']:.3f} "
           f"ms/step, device busy {before['busy_ms']:.3f} -> {after['busy_ms']:.3f} ms "
           f"({(after['busy_ms'] - before['busy_ms']) * 1e3:+.1f} us), kernels/step {before['kernels_per_step']} -> "
           f"{after['kernels_per_step']}" + ("" if a == b else f" (after at batch {a})")]
    kinds = list(dict.fromkeys([*before["groups"], *after["groups"]]))
    for kind in kinds:
        x, y = before["groups"].get(kind, {"us": 0.0, "count": 0}), after["groups"].get(kind, {"us": 0.0, "count": 0})
        out.append(f"  {kind:<28} {x['us']:>9.1f} us x{x['count']:<6g} -> {y['us']:>9.1f} us x{y['count']:<6g} "
                   f"({y['us'] - x['us']:+.1f})")
    us_b = {k["name"]: k["us"] for k in before["top"]}
    us_a = {k["name"]: k["us"] for k in after["top"]}
    deltas = sorted(((us_a.get(n, 0.0) - us_b.get(n, 0.0), n) for n in {*us_b, *us_a}), key=lambda d: -abs(d[0]))
    for d, n in deltas[:moved]:
        out.append(f"  {d:+9.1f} us  {us_b.get(n, 0.0):.1f} -> {us_a.get(n, 0.0):.1f}  {n[:100]}")
    gemms = ("int4 GEMM (onnxpipe)", "MatMulNBits (onnxruntime)")
    longest_call = {side: max((k for k in prof["top"] if kernel_group(k["name"]) in gemms),
                              key=lambda k: k.get("longest_us", 0.0), default=None)
                    for side, prof in (("before", before), ("after", after))}
    if all(longest_call.values()):
        x, y = longest_call["before"], longest_call["after"]
        out.append(f"  the longest int4 GEMM call a step (the LM head): {x['longest_us']:.1f} -> {y['longest_us']:.1f} us "
                   f"({x['name'][:50]} -> {y['name'][:50]})")
    return out


def profiled(step, steps: int, work: Path, name: str, provider: str = "cuda", warm: int = 3) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warm):  # warm (captures, first runs) before the profiled steps
        step()
    if provider == "cpu":  # a smoke test of the script: wall time only
        t = time.perf_counter()
        for _ in range(steps):
            step()
        return {"steps": steps, "wall_ms": round((time.perf_counter() - t) * 1e3 / steps, 4), "top": []}
    torch.cuda.init()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        t_wall = time.perf_counter() - t
    trace = work / f"trace-{name}.json"
    prof.export_chrome_trace(str(trace))
    return kernel_table(trace, steps, t_wall)


def child_onnxpipe(spec: dict, model: str, graph: bool, fed: bool, kernels: str = "off", kernel_skip: str = "") -> None:
    import numpy as np

    from onnxpipe.runtime.generate import LanguageModel
    from onnxpipe.runtime.session import DecoderSession

    if kernels != "off" and spec["provider"] == "cpu":
        kernels = "reference"  # the smoke test: the same wiring on the CPU reference kernels
    s = DecoderSession(model, spec["provider"], cuda_graph=graph, feed_back=fed if graph else False,
                       kernels=kernels, kernel_skip=kernel_skip, announce=lambda m: print(m, flush=True))
    lm = LanguageModel(s, None)
    total = spec["prompt"] + spec["steps"] + 8
    cfg = lm._config({"max_new_tokens": spec["steps"] + 8, "stop_token_ids": []})
    rows = lm._rows(prompt_ids(spec["prompt"], rows=spec.get("batch", 1)).tolist(), cfg)
    mask, _, cache, out = lm.prefill(rows, total, "argmax")
    state = {"mask": mask, "out": out}
    mask, out = lm.decode_step(np.asarray(out, np.int64), mask, cache, "argmax")
    state.update(mask=mask, out=out)

    def step():
        if fed and s.can_feed(cache):
            state["out"] = s.step_fed(cache)
        else:
            state["mask"], state["out"] = lm.decode_step(np.asarray(state["out"], np.int64), state["mask"], cache, "argmax")

    r = profiled(step, spec["steps"] - 4, Path(spec["out"]), f"{spec['variant']}-b{spec.get('batch', 1)}",
                 spec["provider"])
    emit(variant=spec["variant"], batch=spec.get("batch", 1), fed=bool(fed and s.fed), kernels=s.kernels.line(), **r)


def child_genai(spec: dict, model: str, graph: bool) -> None:
    import onnxruntime_genai as og

    cfg = og.Config(model)
    cfg.clear_providers()
    cfg.append_provider("cuda")
    cfg.set_provider_option("cuda", "enable_cuda_graph", "1" if graph else "0")
    m = og.Model(cfg)
    p = og.GeneratorParams(m)
    n = spec["prompt"] + spec["steps"] + 8
    b = spec.get("batch", 1)
    p.set_search_options(max_length=n, min_length=n, do_sample=False, batch_size=b)
    g = og.Generator(m, p)
    g.append_tokens(prompt_ids(spec["prompt"], rows=b).astype("int32"))
    g.generate_next_token()

    def step():
        g.generate_next_token()
        g.get_next_tokens()

    emit(variant=spec["variant"], batch=b,
         **profiled(step, spec["steps"] - 4, Path(spec["out"]), f"{spec['variant']}-b{b}"))


def child_prefill(spec: dict, model: str, graph: bool, last_position: bool) -> None:
    """One 128-token prefill (batch --prefill-batch), profiled like a decode step: what differs between the session
    that captures CUDA graphs (its prefill runs uncaptured), the plain one, and the LM head on every position."""
    from onnxpipe.runtime.generate import LanguageModel
    from onnxpipe.runtime.session import DecoderSession

    s = DecoderSession(model, spec["provider"], cuda_graph=graph, feed_back=graph, last_position=last_position,
                       announce=lambda m: print(m, flush=True))
    lm = LanguageModel(s, None)
    b = spec["prefill_batch"]
    cfg = lm._config({"max_new_tokens": 8, "stop_token_ids": []})
    rows = lm._rows(prompt_ids(spec["prompt"]).repeat(b, axis=0).tolist(), cfg)

    def step():
        lm.prefill(rows, spec["prompt"] + 64, "argmax")

    emit(variant=spec["variant"], batch=b, last_position=s.last_position,
         **profiled(step, spec["steps"] // 4, Path(spec["out"]), spec["variant"], spec["provider"]))


def child_genai_prefill(spec: dict, model: str) -> None:
    import onnxruntime_genai as og

    cfg = og.Config(model)
    cfg.clear_providers()
    cfg.append_provider("cuda")
    m = og.Model(cfg)
    b = spec["prefill_batch"]
    ids = prompt_ids(spec["prompt"]).repeat(b, axis=0).astype("int32")

    def step():
        p = og.GeneratorParams(m)
        p.set_search_options(max_length=spec["prompt"] + 64, do_sample=False, batch_size=b)
        g = og.Generator(m, p)
        g.append_tokens(ids)
        g.get_next_tokens()

    emit(variant=spec["variant"], batch=b, **profiled(step, spec["steps"] // 4, Path(spec["out"]), spec["variant"]))


def chunk_plan(prompt: int, tokens: int, n: int) -> dict[str, list[int]]:
    """The chunks' start positions of a ``prompt``-token prompt read ``tokens`` at a time, by part: the first ``n``
    (profiled, "chunks@0"), the middle ones (read, not profiled), the last ``n`` (profiled alone, "chunks@end"), then
    the same last ``n`` again, each followed by a decode step ("iteration@end": a chunk's run rewrites the same
    entries, so a chunk read twice leaves the row as once)."""
    starts = list(range(0, prompt, tokens))
    return {"chunks@0": starts[:n], "read": starts[n:len(starts) - n], "chunks@end": starts[len(starts) - n:],
            "iteration@end": starts[len(starts) - n:]}


def chunk_args_error(rows: int, capacity: int, prompt: int, tokens: int, n: int, context: int) -> str | None:
    """Why the chunk variants' shape cannot run (None: it can): the prompt a whole number of chunks, at least 2 x
    --chunks of them, and room in the rows for the prompt and the decode rows' context plus the decode steps (each
    moves every row one position on, the parked row too)."""
    steps = 2 * n + 8  # the iterations' steps, the steps alone, the warm-up's
    if rows < 2 or n < 1 or tokens < 1:
        return f"--chunk-rows must be >= 2, --chunks and --chunk-tokens >= 1 (got {rows}, {n}, {tokens})"
    if prompt % tokens or prompt // tokens < 2 * n:
        return (f"--chunk-prompt ({prompt}) must be a multiple of --chunk-tokens ({tokens}) and hold at least 2 x "
                f"--chunks ({2 * n}) chunks")
    if max(prompt, context) + steps > capacity:
        return (f"--chunk-capacity ({capacity}) must hold the longer of --chunk-prompt ({prompt}) and --prompt "
                f"({context}) plus {steps} decode steps")
    return None


def child_chunk(spec: dict, model: str, graph: bool) -> None:
    """A long prompt's chunks in one row of a CUDA-graph slot beside the slot's decode steps (module docstring)."""
    import collections

    import numpy as np

    from onnxpipe.runtime.generate import LanguageModel
    from onnxpipe.runtime.session import DecoderSession
    from onnxpipe.serve.row_prefill import RowPrefill

    s = DecoderSession(model, spec["provider"], cuda_graph=True, feed_back=True,
                       announce=lambda m: print(m, flush=True))
    rows, n, tokens, prompt = spec["chunk_rows"], spec["chunks"], spec["chunk_tokens"], spec["chunk_prompt"]
    cache = s.new_cache(rows, capacity=spec["chunk_capacity"])  # the slot's decode graph captured here
    assert cache.capacity is not None
    rp = RowPrefill(LanguageModel(s, None), cache.values)
    row = rows - 1  # serve's graph rows are the highest
    rp.chunk_graphs, rp.graph_rows = graph, frozenset({row})
    captured = rp.warm([row]) if graph and s.cuda_graph else 0  # serve's warm-up: every width, ahead
    ids = prompt_ids(prompt, vocab=min(s.vocab_size, 32000))[0].tolist()
    how: collections.Counter = collections.Counter()

    def chunk(start: int) -> None:
        how[rp.run_chunk(row, ids[start:start + tokens], start, logits=False)[1]] += 1

    # the decode rows at --prompt positions, the row being read parked at the prompt's length (its first step's)
    places = np.full(rows, spec["prompt"], np.int64)
    places[row] = prompt
    fed: collections.Counter = collections.Counter()

    def step() -> None:
        if s.can_feed(cache):
            s.step_fed(cache)
            fed["fed"] += 1
        else:
            mask = (np.arange(int(places.max()) + 1)[None, :] < places[:, None] + 1).astype(np.int64)
            s.forward(np.full((rows, 1), 5, np.int64), mask, places[:, None].copy(), cache, want="argmax")
            fed["host"] += 1
        places[:] += 1

    plan = chunk_plan(prompt, tokens, n)
    chunk(0)  # untimed: the first run of its shape (a chunk rewrites the same entries)
    how.clear()
    out = Path(spec["out"])
    name = f"{spec['variant']}-b{rows}"
    common = {"variant": spec["variant"], "batch": rows, "capacity": cache.capacity, "chunk_tokens": tokens,
              "prompt": prompt, "context": spec["prompt"], "graphs_captured_ahead": captured}

    def part(label: str, starts: list[int], call) -> None:
        how.clear()
        fed.clear()
        rp.skipped.clear()
        it = iter(starts)
        r = profiled(lambda: call(next(it)), len(starts), out, f"{name}-{label}", spec["provider"], warm=0)
        emit(**common, part=label, offsets=[starts[0], starts[-1]], how=dict(how), skipped=dict(rp.skipped),
             graph_error=rp.graph_error, steps_fed=dict(fed), **r)

    part("chunks@0", plan["chunks@0"], chunk)
    for start in plan["read"]:
        chunk(start)
    part("chunks@end", plan["chunks@end"], chunk)
    for _ in range(3):  # the first step host-fed, then fed on the device
        step()

    def iteration(start: int) -> None:  # serve's while a prompt is read: its chunk, then the rows' step
        chunk(start)
        step()

    part("iteration@end", plan["iteration@end"], iteration)
    part("step", [0] * n, lambda _: step())


def child_levels(spec: dict) -> None:
    """First prefill of each new length vs a repeat, and the fed decode step, at ENABLE_ALL and ENABLE_BASIC."""
    import numpy as np
    import onnxruntime as ort

    from onnxpipe.runtime.generate import LanguageModel
    from onnxpipe.runtime.session import DecoderSession

    out = {}
    for level_name, bucket in (("ENABLE_ALL", 1), ("ENABLE_ALL", 32), ("ENABLE_BASIC", 1)):
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, "ORT_" + level_name)
        t = time.perf_counter()
        s = DecoderSession(spec["optimized"], spec["provider"], cuda_graph=True, session_options=so, announce=lambda m: None)
        load_s = time.perf_counter() - t
        lm = LanguageModel(s, None)
        lm.prefill_bucket = bucket
        first, again = {}, {}
        for n in spec["lengths"]:
            ids = prompt_ids(n).tolist()
            for box in (first, again):
                cfg = lm._config({"max_new_tokens": 8, "stop_token_ids": []})
                rows = lm._rows(ids, cfg)
                t = time.perf_counter()
                lm.prefill(rows, n + 64, "argmax")
                box[n] = round((time.perf_counter() - t) * 1e3, 2)
        cfg = lm._config({"max_new_tokens": min(96, spec["steps"] + 8), "stop_token_ids": []})
        for _ in range(2):  # the first generation captures the graph
            times = [time.perf_counter() for _ in lm._decode(lm._rows(prompt_ids(spec["prompt"]).tolist(), cfg), cfg)]
        step_ms = (times[-1] - times[1]) * 1e3 / (len(times) - 2)
        out[f"{level_name}, prefill bucket {bucket}"] = {"load_s": round(load_s, 2), "first_prefill_ms": first, "repeat_prefill_ms": again,
                           "fed_decode_step_ms": round(step_ms, 4), "fed": s.fed}
    emit(variant="levels", **out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=CHUNK_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/onnxpipe_bench_gpu", help="bench_gpu.py's work directory")
    ap.add_argument("--out", default="out/profile_decode")
    ap.add_argument("--variants", default=",".join(VARIANTS + ["levels"]),
                    help="opt-in besides: " + ", ".join(PREFILL_VARIANTS + CHUNK_VARIANTS + [
                        "onnxpipe_graph_kernels", "onnxpipe_graph_kernels_linear", "onnxpipe_int4_graph_kernels_nohead"]))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--lengths", default="100,117,128,141,163")
    ap.add_argument("--prefill-batch", type=int, default=1, help="rows of the prefill_* variants")
    ap.add_argument("--batches", default="1", help="rows of the decode variants, e.g. 1,8 (each a child of its own)")
    ap.add_argument("--cap-s", type=float, default=120, help="the most one child may run")
    ap.add_argument("--budget-s", type=float, default=None, help="start no child past this many seconds")
    ap.add_argument("--chunks", type=int, default=8, help="chunk_*: chunks (and steps) profiled in each part")
    ap.add_argument("--chunk-rows", type=int, default=32, help="chunk_*: the slot's rows (the last one is read)")
    ap.add_argument("--chunk-capacity", type=int, default=4352, help="chunk_*: the slot's positions a row")
    ap.add_argument("--chunk-prompt", type=int, default=4096, help="chunk_*: the long prompt's tokens")
    ap.add_argument("--chunk-tokens", type=int, default=64, help="chunk_*: tokens a chunk")
    ap.add_argument("--chunk-model", default=None, help="chunk_*: the model (a CUDA form; default: WORK/optimized)")
    ap.add_argument("--provider", default="cuda", help="cpu: a smoke test of the script (wall times only)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.child and any(v in CHUNK_VARIANTS for v in args.variants.split(",")):
        why = chunk_args_error(args.chunk_rows, args.chunk_capacity, args.chunk_prompt, args.chunk_tokens,
                               args.chunks, args.prompt)
        if why:
            ap.error(why)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        w = Path(spec["work"])
        v = args.child
        if v == "levels":
            child_levels(spec)
        elif v in CHUNK_VARIANTS:
            child_chunk(spec, spec["chunk_model"] or str(w / "optimized"), graph=v == "chunk_graph")
        elif v == "prefill_genai":
            child_genai_prefill(spec, str(w / "genai"))
        elif v.startswith("prefill_"):  # prefill_graph, prefill_nograph, prefill_nograph_fullhead
            child_prefill(spec, str(w / "optimized"), graph=v.startswith("prefill_graph"),
                          last_position="fullhead" not in v)
        elif v.startswith("genai"):
            child_genai(spec, str(w / ("genai-int4" if "int4" in v else "genai")), graph=v.endswith("graph"))
        else:
            model = str(w / ("int4" if "int4" in v else "optimized"))
            os.environ["ONNXPIPE_KERNELS_LINEAR"] = "on" if v.endswith("_kernels_linear") else "off"
            child_onnxpipe(spec, model, graph="nograph" not in v, fed="hostfed" not in v, **kernel_options(v))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.work) / "profile_decode"  # traces and specs: big and many, kept off OUT
    scratch.mkdir(parents=True, exist_ok=True)
    logf = (out / "profile_decode.log").open("w")
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
                     "rows": [], "skipped": [], "compare": [], "chunks": []}
    start = time.time()
    for v, batch in runs(args.variants.split(","), [int(b) for b in args.batches.split(",")]):
        label = v if batch == 1 else f"{v} b{batch}"
        left = None if args.budget_s is None else args.budget_s - (time.time() - start)
        if left is not None and left <= 0:
            results["skipped"].append(f"{label}: past --budget-s")
            print(f"{label}: skipped (past --budget-s {args.budget_s:g})", flush=True)
            continue
        if batch > 1 and v in ("genai_graph", "genai_int4_graph"):
            results["skipped"].append(f"{label}: GenAI's CUDA graphs are for batch 1")
            continue
        cap = args.cap_s if left is None else max(1.0, min(args.cap_s, left))
        spec = {"work": args.work, "out": str(scratch), "provider": args.provider, "steps": args.steps, "prompt": args.prompt, "variant": v,
                "optimized": str(Path(args.work) / "optimized"), "lengths": [int(x) for x in args.lengths.split(",")],
                "prefill_batch": args.prefill_batch, "batch": batch, "chunks": args.chunks,
                "chunk_rows": args.chunk_rows, "chunk_capacity": args.chunk_capacity, "chunk_prompt": args.chunk_prompt,
                "chunk_tokens": args.chunk_tokens, "chunk_model": args.chunk_model}
        sp = scratch / f"spec-{v}-b{batch}.json"
        sp.write_text(json.dumps(spec))
        t = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--child", v, "--spec", str(sp)], capture_output=True,
                               text=True, timeout=cap, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            text = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += f"\nkilled after {cap:.0f} s"
        logf.write(f"===== {label}\n{text}\n")
        logf.flush()
        got = [json.loads(ln[len(RESULT):]) for ln in text.splitlines() if ln.startswith(RESULT)]
        if not got:
            tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            results["rows"].append({"variant": v, "batch": batch, "error": tail[0][:300]})
            print(f"{label}: failed: {tail[0][:300]}", flush=True)
        for r in got:
            results["rows"].append(r)
            if "part" in r:
                print(chunk_part_line(r), flush=True)
            elif "busy_ms" in r:
                print(f"{label}: wall {r['wall_ms']} ms/step, device busy {r['busy_ms']}, kernels/step "
                      f"{r['kernels_per_step']}" + (f" [{r['kernels']}]" if r.get("kernels") else "") + "; by kind: "
                      + "; ".join(f"{g} {x['us']}us" for g, x in r.get("groups", {}).items()) + "; top: "
                      + "; ".join(f"{k['name'][:60]} {k['us']}us x{k['count']}" for k in r["top"][:6]), flush=True)
            else:
                print(f"{label}: {json.dumps(r)}", flush=True)
        print(f"  ({time.time() - t:.0f} s)", flush=True)
        results["compare"] = compare_rows(results["rows"])
        (out / "profile_decode.json").write_text(json.dumps(results, indent=1))
    results["compare"] = compare_rows(results["rows"])
    results["chunks"] = chunk_summary(results["rows"])
    (out / "profile_decode.json").write_text(json.dumps(results, indent=1))
    for line in results["compare"] + results["chunks"]:
        print(line, flush=True)
    return 0


def kernel_options(variant: str) -> dict[str, str]:
    """child_onnxpipe's kernels for an onnxpipe variant: ours in ``*_kernels``, ``*_kernels_nohead`` (opt-in, not
    in VARIANTS: the LM head left to MatMulNBits) and ``*_kernels_linear`` (float16 MatMuls as Linear too: the child
    sets ONNXPIPE_KERNELS_LINEAR), none elsewhere."""
    ours = variant.endswith(("_kernels", "_kernels_nohead", "_kernels_linear"))
    return {"kernels": "on" if ours else "off", "kernel_skip": "head" if variant.endswith("_kernels_nohead") else ""}


def runs(variants: list[str], batches: list[int]) -> list[tuple[str, int]]:
    """(variant, batch) in the order they run: each batch's decode variants together (so that a budget cut keeps
    whole before/after pairs at the first batches), the levels and prefill variants once."""
    once = [v for v in variants if v == "levels" or v.startswith("prefill_") or v in CHUNK_VARIANTS]
    decode = [v for v in variants if v not in once]
    return [(v, b) for b in batches for v in decode] + [(v, 1) for v in once]


def chunk_part_line(r: dict) -> str:
    """One part of a chunk_* variant: per chunk (or step) its wall and device time, kernels, how the chunks ran, the
    kinds and the top kernels (busy time and kinds only where CUPTI gave them: not with --provider cpu)."""
    what = "step" if r["part"] == "step" else "iteration" if r["part"].startswith("iteration") else "chunk"
    where = (f"the other rows from position {r['context']}, the row read parked at {r['prompt']}" if what == "step"
             else f"offsets {r['offsets'][0]}-{r['offsets'][-1]} of {r['prompt']}, {r['chunk_tokens']} tokens a chunk")
    head = f"{r['variant']} {r['part']} ({where}; {r['batch']} rows x {r['capacity']}): wall {r['wall_ms']} ms/{what}"
    if "busy_ms" in r:
        head += f", device busy {r['busy_ms']} ms, kernels/{what} {r['kernels_per_step']}"
    ran = "; ".join(f"{k} {v}" for k, v in sorted(r.get("how", {}).items()))
    if ran:
        head += f"; chunks {ran}" + (f" (not through a graph, by why: {r['skipped']})" if r.get("skipped") else "")
    if r.get("steps_fed"):
        head += f"; steps {r['steps_fed']}"
    if r.get("graph_error"):
        head += f"; graph error: {r['graph_error']}"
    if r.get("groups"):
        head += "; by kind: " + "; ".join(f"{g} {x['us']}us x{x['count']:g}" for g, x in r["groups"].items())
    if r.get("top"):
        head += "; top: " + "; ".join(f"{k['name'][:60]} {k['us']}us x{k['count']:g}" for k in r["top"][:6])
    return head


def chunk_summary(rows: list[dict]) -> list[str]:
    """For each chunk_* variant with a kernel profile: its kinds per chunk at the prompt's start against near its end
    (``compare``), where attention stands at each, and a chunk against the slot's decode step and their iteration."""
    parts: dict = collections.defaultdict(dict)
    for r in rows:
        if "part" in r and "groups" in r:
            parts[r["variant"]][r["part"]] = r
    out = []
    for v, got in parts.items():
        start, end, it, step = (got.get(p) for p in CHUNK_PARTS)
        if start and end:
            out += [f"{v}: a chunk at offsets {start['offsets'][0]}-{start['offsets'][-1]} -> "
                    f"{end['offsets'][0]}-{end['offsets'][-1]} (per chunk):"]
            out += compare(dict(start, variant=f"{v} chunks@0"), dict(end, variant=f"{v} chunks@end"))[1:]

            def attention(r: dict) -> str:
                us = r["groups"].get("attention", {"us": 0.0})["us"]
                return f"{us:.1f} us of {r['busy_ms'] * 1e3:.1f} ({us / max(r['busy_ms'] * 1e3, 1e-9):.0%})"

            kind, x = next(iter(end["groups"].items()), ("none", {"us": 0.0}))
            grew = max(end["groups"], key=lambda k: end["groups"][k]["us"] - start["groups"].get(k, {"us": 0.0})["us"],
                       default="none")
            out.append(f"  attention a chunk: {attention(start)} at the start, {attention(end)} near the end; the "
                       f"largest kind near the end: {kind} ({x['us']:.1f} us); the kind that grew most: {grew}")
        if end and step:
            line = (f"  a chunk near the end: {end['busy_ms']:.3f} ms of device time, "
                    f"{end['busy_ms'] / max(step['busy_ms'], 1e-9):.2f} x the {step['batch']}-row decode step's "
                    f"{step['busy_ms']:.3f} ms")
            if it:
                line += (f"; a chunk then a step (iteration@end): {it['busy_ms']:.3f} ms busy, {it['wall_ms']:.3f} ms "
                         f"wall (the two alone: {end['busy_ms'] + step['busy_ms']:.3f} ms)")
            out.append(line)
    return out


def compare_rows(rows: list[dict]) -> list[str]:
    """compare() for each COMPARE pair and batch where both variants have a profile."""
    got = {(r["variant"], r.get("batch", 1)): r for r in rows if "groups" in r}
    out = []
    for before, after in COMPARE:
        for (v, b), r in sorted(got.items(), key=lambda kv: kv[0][1]):
            if v == before and (after, b) in got:
                out += compare(r, got[(after, b)])
    return out


if __name__ == "__main__":
    sys.exit(main())
