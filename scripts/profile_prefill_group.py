"""How a serving prefill run costs against generate's: ``RowPrefill.run_group`` of k whole prompts into rows of the
slot layout's shared KV buffer, at several k and row capacities, reading back each row's logits [k, vocab] or only
their argmax (what the scheduler asks for a group of greedy requests), beside ``generate``'s prefill of the same k
prompts.

    python scripts/profile_prefill_group.py /tmp/serve-1b/cuda --provider cuda --cuda-graph \
        --groups 1,4,8,16,32 --capacities 256,1024,4096 --json $OUT/prefill-group.json

At 32 streams the served run loses to the offline batch mostly in its group prefill runs (docs/serve.md, run 40):
this times them apart. Each row: the median of --repeats calls after one untimed call (first-use costs), in
milliseconds, and per 1,024 prompt tokens. ``generate`` makes one new token, so its figure is its prefill plus one
decode step and its own set-up (with CUDA graphs: a captured prefill graph replayed). Random prompt ids from a seeded
generator; the model's numbers are not looked at. A group run's time is also split into its parts (medians of the
same calls): onnxruntime's run of the decoder graph (``run_with_iobinding``, synced at its end), the head graph's
pick of the rows' logits or argmax (``DecoderSession._select``) and the rest (inputs built and bound on the host).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np


def ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def timed(call: Any, repeats: int, parts: dict[str, list[float]] | None = None) -> tuple[float, float]:
    """(the median seconds of ``repeats`` calls after a first call, that first call's seconds); ``parts`` (filled by
    wrappers) are emptied after the first call, so they hold the timed calls' pieces. The first call of a shape the
    session has not run yet is the one a server pays when a new group size or prompt width arrives (run 52: on the
    H100 ~13-25 ms against ~6-10 for the same group run again)."""
    began = time.perf_counter()
    call()
    first = time.perf_counter() - began
    if parts is not None:
        for times in parts.values():
            times.clear()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return float(np.median(times)), first


def clocked(obj: Any, name: str, into: list[float]) -> None:
    """``obj.name`` replaced on the instance by a wrapper adding each call's seconds to ``into``."""
    inner = getattr(obj, name)

    def wrapper(*a: Any, **k: Any) -> Any:
        began = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            into.append(time.perf_counter() - began)

    setattr(obj, name, wrapper)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, help="a CUDA-form model directory (optimize --target cuda)")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--groups", type=ints, default=[1, 4, 8, 16, 32], help="prompts in one run (k)")
    p.add_argument("--capacities", type=ints, default=[256, 2048], help="the rows' capacities (--max-length)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.prompt_tokens < 1 or args.repeats < 1:
        p.error("--prompt-tokens and --repeats must be at least 1")

    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.runtime import load
    from onnxpipe.serve.slots import SlotScheduler

    try:
        lm = load(args.model_dir, args.provider, cuda_graph=args.cuda_graph, announce=lambda m: None)
    except OnnxpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    vocab = lm.session.vocab_size
    most = max(args.groups)
    prompts = rng.integers(5, vocab, (most, args.prompt_tokens)).tolist()
    rows: list[dict[str, Any]] = []
    parts: dict[str, list[float]] = {"ort_ms": [], "select_ms": []}
    clocked(lm.session.session, "run_with_iobinding", parts["ort_ms"])
    clocked(lm.session, "_select", parts["select_ms"])
    for capacity in args.capacities:
        if capacity <= args.prompt_tokens:
            print(f"skipped: capacity {capacity} does not hold a {args.prompt_tokens}-token prompt", file=sys.stderr)
            continue
        sched = SlotScheduler(lm, max_batch=most, max_length=capacity, prefill_group=most)
        for k in args.groups:
            for want in ("logits", "argmax"):  # [k, vocab] float32 back, or the greedy rows' first tokens [k]
                group = partial(sched.rows.run_group, 0, prompts[:k], 0, want)
                seconds, first = timed(group, args.repeats, parts)
                row = {"run": f"run_group ({want})", "k": k, "capacity": sched.cache.capacity, "ms": seconds * 1e3,
                       "first_ms": first * 1e3}
                row.update({name: float(np.median(times)) * 1e3 for name, times in parts.items() if times})
                rows.append(row)
        del sched, group
    for k in args.groups:
        seconds, first = timed(partial(lm.generate, prompts[:k], max_new_tokens=1, stop_token_ids=[]), args.repeats)
        rows.append({"run": "generate (prefill + 1 step)", "k": k, "capacity": None, "ms": seconds * 1e3,
                     "first_ms": first * 1e3})
    for row in rows:
        row["ms_per_1024_tokens"] = row["ms"] * 1024 / (row["k"] * args.prompt_tokens)
    print(f"{lm.session.model_dir.path}, provider {lm.provider}, CUDA graphs {lm.session.cuda_graph}, "
          f"{args.prompt_tokens}-token prompts, median of {args.repeats}")
    print("| run | prompts (k) | row capacity | ms | first call ms | ms per 1,024 prompt tokens | onnxruntime run ms | "
          "head pick ms | rest ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        split = "| - | - | - |"
        if "ort_ms" in row:
            rest = row["ms"] - row["ort_ms"] - row.get("select_ms", 0.0)
            split = f"| {row['ort_ms']:.2f} | {row.get('select_ms', 0.0):.2f} | {rest:.2f} |"
        print(f"| {row['run']} | {row['k']} | {row['capacity'] or '-'} | {row['ms']:.2f} | {row['first_ms']:.2f} | "
              f"{row['ms_per_1024_tokens']:.2f} {split}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "model_dir": str(args.model_dir), "provider": lm.provider,
                                         "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
