"""Where a chunk-lane step's time goes, on the GPU: the decode step alone, the chunk read apart, and both in one
lane run, each timed eagerly and as a CUDA-graph replay (IO binding, median of --runs), per chunk width and per
context of the chunk's row.

    python scripts/profile_lane.py /tmp/serve-1b/cuda --batch 32 --contexts 512,4000 --widths 16,64 --json lane.json

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


def timed(session, feed: dict, runs: int, ort, device: str, graph_id: int) -> float:
    """Median ms of a run, eager (graph_id -1) or replaying the CUDA graph captured under ``graph_id``."""
    opts = ort.RunOptions()
    if device == "cuda":
        opts.add_run_config_entry("gpu_graph_id", str(graph_id))
    io = session.io_binding()
    values = {k: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in feed.items()}
    for k, v in values.items():
        io.bind_ortvalue_input(k, v)
    # the presents write in place into the pasts' buffers (the CUDA form's shared KV buffer), as serving binds them
    outputs = [o.name for o in session.get_outputs()]
    past = {name: name.replace("present", "past_key_values") for name in outputs if "present" in name}
    for name in outputs:
        if name in past:
            io.bind_ortvalue_output(name, values[past[name]])
        else:
            io.bind_output(name, device)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--row-context", type=int, default=640)
    ap.add_argument("--contexts", default="512,4000", help="the chunk's row: tokens before the chunk")
    ap.add_argument("--capacity", type=int, default=4736)
    ap.add_argument("--widths", default="16,64")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of the script")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort

    from onnxpipe.runtime.session import DecoderSession

    s = DecoderSession(args.model_dir, args.provider, feed_back=True, chunk_lane=True,
                       cuda_graph=args.provider == "cuda")
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
            for mode in ("eager", "graph"):
                if mode == "graph" and dev != "cuda":
                    continue
                for kind, sess, feed in (("step", s.session, step), ("apart", s.session, apart),
                                         ("lane", s.lane, lane)):
                    gid += 1
                    row[f"{kind}_{mode}_ms"] = round(timed(sess, feed, args.runs, ort, dev,
                                                           -1 if mode == "eager" else gid), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
