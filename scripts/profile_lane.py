"""Where a chunk-lane step's time goes, on the GPU: the decode step alone, the chunk read apart, and both in one
lane run, each timed eagerly and as a CUDA-graph replay (IO binding, median of --runs), per chunk width and per
context of the chunk's row.

    python scripts/profile_lane.py /tmp/serve-1b/cuda --batch 32 --contexts 512,4000 --widths 16,64 --json lane.json

`--kernels N` also runs each eagerly N times under torch.profiler (CUPTI sees onnxruntime's CUDA kernels in the same
process; a replayed graph's are not split out) and prints each run's kernels by name, device ms a run, with the
lane's excess over the step alone kernel by kernel: what the chunk adds to the step it rides on.

The model is an `optimize --target cuda` directory; the step's rows each hold --row-context tokens, the chunk's row
--context tokens before the chunk. Inputs are zeros apart from the ids, masks and indices, which is all the kernels'
cost depends on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def feeds(session, batch: int, capacity: int, row_ctx: int, width: int, chunk_ctx: int, dtype) -> dict:
    """Zeros of each input's shape (dims filled from the sizes above), with meaningful ids, masks and indices."""
    out = {}
    for i in session.get_inputs():
        name = i.name
        chunk = name.startswith("onnxpipe.chunk.")
        b = 1 if chunk else batch
        if name.endswith("input_ids"):
            out[name] = np.full((b, width if chunk else 1), 7, dtype=np.int64)
        elif name.endswith("attention_mask"):
            m = np.zeros((b, capacity), dtype=np.int64)
            m[:, : (chunk_ctx + width if chunk else row_ctx)] = 1
            out[name] = m
        elif name.endswith("position_ids"):
            out[name] = (np.arange(chunk_ctx, chunk_ctx + width)[None] if chunk
                         else np.full((b, 1), row_ctx - 1)).astype(np.int64)
        elif name == "onnxpipe.chunk.last_index":
            out[name] = np.array([batch + width - 1], dtype=np.int64)
        elif name == "onnxpipe.last_index":
            out[name] = np.zeros((batch,), dtype=np.int64)
        elif "past" in name:
            shape = [b] + [d if isinstance(d, int) else capacity for d in i.shape[1:]]
            out[name] = np.zeros(shape, dtype=dtype)
        else:
            raise SystemExit(f"unknown input {name} {i.shape}")
    return out


def spread(feed: dict, row_ctx: int) -> dict:
    """The step's feed with its rows at lengths spread evenly over 1 .. 2 x ``row_ctx`` - 1 (the same mean), as a
    served batch's rows are, where ``generate``'s are all at one length."""
    out = dict(feed)
    mask = np.zeros_like(feed["attention_mask"])
    lengths = np.linspace(1, 2 * row_ctx - 1, mask.shape[0]).astype(np.int64)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    out["attention_mask"] = mask
    if "position_ids" in feed:
        out["position_ids"] = (lengths - 1)[:, None].astype(np.int64)
    return out


def bind(session, feed: dict, ort, device: str):
    """An IO binding of ``feed`` on ``device``, the presents written in place into the pasts' buffers (the CUDA
    form's shared KV buffer, as serving binds them), the other outputs left to onnxruntime on the device; with the
    input values and the presents' pasts."""
    io = session.io_binding()
    values = {k: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in feed.items()}
    for k, v in values.items():
        io.bind_ortvalue_input(k, v)
    outputs = [o.name for o in session.get_outputs()]
    past = {name: name.replace("present", "past_key_values") for name in outputs if "present" in name}
    for name in outputs:
        if name in past:
            io.bind_ortvalue_output(name, values[past[name]])
        else:
            io.bind_output(name, device)
    return io, values, past


def timed(session, feed: dict, runs: int, ort, device: str, graph_id: int) -> float:
    """Median ms of a run, eager (graph_id -1) or replaying the CUDA graph captured under ``graph_id``."""
    opts = ort.RunOptions()
    if device == "cuda":
        opts.add_run_config_entry("gpu_graph_id", str(graph_id))
    io, values, past = bind(session, feed, ort, device)
    outputs = [o.name for o in session.get_outputs()]
    eager = ort.RunOptions()
    if device == "cuda":
        eager.add_run_config_entry("gpu_graph_id", "-1")
    session.run_with_iobinding(io, eager)  # fixed output buffers of the shapes one run gives, for the capture
    got = dict(zip(outputs, io.get_outputs()))
    io.clear_binding_outputs()
    keep = []
    for name in outputs:
        if name in past:
            io.bind_ortvalue_output(name, values[past[name]])
        else:
            v = got[name]
            buf = ort.OrtValue.ortvalue_from_shape_and_type(v.shape(), v.numpy().dtype, device, 0)
            keep.append(buf)
            io.bind_ortvalue_output(name, buf)
    for _ in range(5):
        session.run_with_iobinding(io, opts)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run_with_iobinding(io, opts)
        io.synchronize_outputs()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kernel_table(events: list[tuple[str, float, int]], runs: int) -> dict[str, tuple[float, int]]:
    """Kernels by name from the profiler's (name, device us in all, count in all) over ``runs`` runs: device ms and
    count a run each."""
    out: dict[str, tuple[float, int]] = {}
    for name, us, count in events:
        ms, n = out.get(name, (0.0, 0))
        out[name] = (ms + us / 1e3 / runs, n + count // runs)
    return out


def excess(lane: dict[str, tuple[float, int]], step: dict[str, tuple[float, int]]) -> list[tuple[float, int, str]]:
    """(lane ms - step ms, lane count - step count, name) a run for every kernel name of either, largest first."""
    names = set(lane) | set(step)
    rows = [(lane.get(k, (0.0, 0))[0] - step.get(k, (0.0, 0))[0], lane.get(k, (0.0, 0))[1] - step.get(k, (0.0, 0))[1],
             k) for k in names]
    return sorted(rows, key=lambda r: -abs(r[0]))


def kernels(session, feed: dict, runs: int, ort) -> dict[str, tuple[float, int]]:
    """Kernels of ``runs`` eager runs (bound as ``bind`` binds them), by name."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    opts = ort.RunOptions()
    opts.add_run_config_entry("gpu_graph_id", "-1")
    io, _, _ = bind(session, feed, ort, "cuda")
    for _ in range(3):
        session.run_with_iobinding(io, opts)
    io.synchronize_outputs()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            session.run_with_iobinding(io, opts)
        io.synchronize_outputs()
        torch.cuda.synchronize()
    events = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us:
            events.append((e.key[:100], float(us), int(e.count)))
    return kernel_table(events, runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--row-context", type=int, default=640)
    ap.add_argument("--contexts", default="512,4000", help="the chunk's row: tokens before the chunk")
    ap.add_argument("--capacity", type=int, default=4736)
    ap.add_argument("--widths", default="16,64")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of the script")
    ap.add_argument("--spread", action="store_true",
                    help="also time the step with its rows' lengths spread around --row-context (kind step_spread)")
    ap.add_argument("--kernels", type=int, default=0, help="N: each run's kernels over N eager runs (torch.profiler)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.kernels and args.provider != "cuda":
        raise SystemExit("--kernels profiles the CUDA EP's kernels: give --provider cuda")
    import onnxruntime as ort

    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.runtime.session import DecoderSession

    try:
        s = DecoderSession(args.model_dir, args.provider, feed_back=True, chunk_lane=True,
                           cuda_graph=args.provider == "cuda")
    except OnnxpipeError as e:
        raise SystemExit(f"error: {e}") from None
    if s.lane is None:
        raise SystemExit(f"no lane: {s.lane_why_not}")
    dtype, dev, rows, gid = s.kv_dtype, args.provider, [], 1000
    for context in [int(c) for c in args.contexts.split(",")]:
        for width in [int(w) for w in args.widths.split(",")]:
            step = feeds(s.session, args.batch, args.capacity, args.row_context, width, context, dtype)
            apart = feeds(s.session, 1, args.capacity, context + width, width, context, dtype)
            apart["input_ids"] = np.full((1, width), 7, dtype=np.int64)
            apart["position_ids"] = np.arange(context, context + width)[None].astype(np.int64)
            apart["onnxpipe.last_index"] = np.array([width - 1], dtype=np.int64)
            lane = feeds(s.lane, args.batch, args.capacity, args.row_context, width, context, dtype)
            row: dict = {"context": context, "width": width}
            kinds = [("step", s.session, step), ("apart", s.session, apart), ("lane", s.lane, lane)]
            if args.spread:
                kinds.append(("step_spread", s.session, spread(step, args.row_context)))
            for mode in ("eager", "graph"):
                if mode == "graph" and dev != "cuda":
                    continue
                for kind, sess, feed in kinds:
                    gid += 1
                    row[f"{kind}_{mode}_ms"] = round(timed(sess, feed, args.runs, ort, dev,
                                                           -1 if mode == "eager" else gid), 3)
            if args.kernels:
                tables = {kind: kernels(sess, feed, args.kernels, ort) for kind, sess, feed in kinds}
                for kind, table in tables.items():
                    total = sum(ms for ms, _ in table.values())
                    print(f"== context {context} width {width} {kind}: {sum(n for _, n in table.values())} kernels, "
                          f"{total:.3f} device ms a run", flush=True)
                    for name, (ms, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:12]:
                        print(f"  {ms:7.3f} ms x{n:4d}  {name}", flush=True)
                print(f"== context {context} width {width}: the lane's kernels less the step's, by name", flush=True)
                for ms, n, name in excess(tables["lane"], tables["step"])[:16]:
                    print(f"  {ms:+7.3f} ms {n:+5d}  {name}", flush=True)
                row["kernels"] = {kind: {k: [round(ms, 4), n] for k, (ms, n) in t.items()} for kind, t in tables.items()}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
