"""A/B of optimize pass lists on one exported model: build each variant, then time them interleaved, round by round,
in one process (``onnxpipe.runtime.bench``: prefill ms, decode ms/step, tokens/s), and compare their logits.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/ab_passes.py --exported /tmp/onnxpipe_bench_gpu/exported \\
        --variant base= --variant pack=+pack_projections --cuda-graph --out $OUT

A variant is NAME=PASSES: empty for optimize's level 3, ``+a,b`` for level 3 plus passes outside the levels, or a
plain comma-separated list for exactly those passes. Ratios are against the first variant, from the same rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def passes_of(spec: str) -> list[str] | None:
    from onnxpipe.fusion.pipeline import PASSES

    if not spec:
        return None
    if spec.startswith("+"):
        extra = [p for p in spec[1:].split(",") if p]
        return [p.name for p in PASSES if (p.level <= 3 and p.in_levels) or p.name in extra]
    return [p for p in spec.split(",") if p]


def build(exported: str, out: Path, passes: list[str] | None, target: str) -> dict:
    from onnxpipe.fusion import optimize_model, pipeline

    if target == "cuda":  # as bench_gpu.py: the kernel-registry query crashes on the device's onnxruntime-gpu
        pipeline.supported_ops = lambda target: None
    t = time.perf_counter()
    res = optimize_model(exported, out, level=3, target=target, passes=passes, verify=False, force=True)
    ops = res.model_dir.manifest.graph.get("op_counts") or {}
    return {"seconds": round(time.perf_counter() - t, 1), "passes": passes or "level 3",
            "fused": {p.name: {k: str(v) for k, v in p.fused.items()} for p in res.passes if p.fused},
            "op_counts": ops}


def logits_of(lm, ids: np.ndarray, steps: int) -> np.ndarray:
    """Teacher-forced logits: the prompts, then ``steps`` decode steps fed the argmax of the first variant."""
    cfg = lm._config({"max_new_tokens": steps, "stop_token_ids": []})
    rows = lm._rows([list(map(int, r)) for r in ids], cfg)
    mask, _, cache, out = lm.prefill(rows, ids.shape[1] + steps, "logits")
    got = [np.asarray(out, np.float32).reshape(len(ids), -1)]
    for _ in range(1, steps):
        tok = got[-1].argmax(-1)
        mask, out = lm.decode_step(tok, mask, cache, "logits")
        got.append(np.asarray(out, np.float32).reshape(len(ids), -1))
    return np.stack(got, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exported", required=True)
    ap.add_argument("--work", default="/tmp/onnxpipe_ab")
    ap.add_argument("--variant", action="append", required=True, help="NAME=PASSES (see the module docstring)")
    ap.add_argument("--target", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--provider", default=None, help="default: the target's")
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from onnxpipe.runtime.bench import bench
    from onnxpipe.runtime.generate import load

    variants = dict(v.split("=", 1) for v in args.variant)
    work = Path(args.work)
    builds = {name: build(args.exported, work / name, passes_of(spec), args.target) for name, spec in variants.items()}
    for name, b in builds.items():
        print(f"built {name}: {b['seconds']} s, fused {b['fused']}", flush=True)
    provider = args.provider or args.target
    lms = {name: load(work / name, provider, cuda_graph=args.cuda_graph) for name in variants}
    batches = [int(b) for b in args.batches.split(",")]
    rows: dict[str, list] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            rows[name] += [x.as_dict() | {"round": r} for x in bench(lms[name], batches, args.prompt, args.new_tokens,
                                                                      args.repeats)]
    ids = np.random.default_rng(7).integers(3, lms[next(iter(lms))].session.vocab_size, (max(batches), args.prompt))
    ref_name = next(iter(variants))
    ref = logits_of(lms[ref_name], ids, 8)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "exported": args.exported,
              "provider": lms[ref_name].provider, "cuda_graph": args.cuda_graph, "builds": builds, "rows": rows,
              "summary": {}}
    print(f"\n| variant | batch | prefill ms | decode ms/step | tokens/s | decode vs {ref_name} | max abs logit diff vs "
          f"{ref_name} | argmax agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for name in variants:
        got = ref if name == ref_name else logits_of(lms[name], ids, 8)
        diff = float(np.abs(got - ref).max())
        agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        for b in batches:
            mine = [x for x in rows[name] if x["batch"] == b]
            base = [x for x in rows[ref_name] if x["batch"] == b]
            med = {k: statistics.median(x[k] for x in mine) for k in ("prefill_ms", "decode_ms", "tokens_per_s")}
            ratio = med["decode_ms"] / statistics.median(x["decode_ms"] for x in base)
            report["summary"][f"{name}/b{b}"] = med | {"decode_ratio": ratio, "max_abs_logit_diff": diff,
                                                        "argmax_agreement": agree}
            print(f"| {name} | {b} | {med['prefill_ms']:.2f} | {med['decode_ms']:.3f} | {med['tokens_per_s']:,.0f} | "
                  f"{ratio:.3f}x | {diff:.4f} | {agree:.1%} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ab_passes.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
