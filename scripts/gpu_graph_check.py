#!/usr/bin/env python3
"""CUDA graphs against no graphs, every way generate decodes: the same tokens or it says where not.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_graph_check.py --out $OUT     # on the GPU machine

Builds the tiny seeded Llama of gpu_runtime_check.py (fp16), optimizes it for CUDA, loads it twice on the CUDA EP
(``cuda_graph`` off and on) and runs the same requests through both: greedy batches of ragged prompts, greedy with
stop ids that end rows at different steps (rows dropped from the cache), several batch sizes in turn (one captured
graph each), sampling with a seed (temperature, top-k, top-p), a repetition penalty (the logits path through the
graph), beam search, and prompts whose lengths cross a capacity bucket. Prints a line per case and writes
OUT/gpu_graph_check.json; exits 1 if any case differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/onnxpipe_graph_check")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from gpu_runtime_check import build, prompts

    from onnxpipe.fusion import optimize_model, pipeline
    from onnxpipe.runtime.generate import load

    work = Path(args.work)
    _, exported = build("tiny", "fp16", work)
    opt = work / "optimized"
    if not opt.exists():
        pipeline.supported_ops = lambda target: None  # as bench_gpu.py: the kernel-registry query crashes there
        optimize_model(exported, opt, level=3, target="cuda", verify=False)
    plain = load(opt, "cuda", cuda_graph=False)
    graphs = load(opt, "cuda", cuda_graph=True)
    if not graphs.session.cuda_graph:
        print("the graph session runs without CUDA graphs: nothing to compare", flush=True)
        return 1
    vocab = plain.session.vocab_size
    ragged = prompts(vocab, [5, 17, 40])
    first = plain.generate(ragged, max_new_tokens=24, stop_token_ids=[])
    stop = int(first[1].token_ids[6])  # row 1 stops at its 7th token; the others run on (or stop where it recurs)
    cases = [
        ("greedy, ragged batch of 3", ragged, dict(max_new_tokens=24, stop_token_ids=[])),
        ("greedy, stop id ends rows at different steps", ragged, dict(max_new_tokens=24, stop_token_ids=[stop])),
        ("greedy, batch 1", ragged[:1], dict(max_new_tokens=16, stop_token_ids=[])),
        ("greedy, batch 5", prompts(vocab, [3, 9, 30, 31, 64], seed=1), dict(max_new_tokens=20, stop_token_ids=[])),
        ("greedy, batch 3 again (its graph replayed)", ragged, dict(max_new_tokens=24, stop_token_ids=[])),
        ("greedy, past a 256-position capacity bucket", prompts(vocab, [250, 120], seed=2),
         dict(max_new_tokens=40, stop_token_ids=[])),
        ("sampling, temperature 0.8, top-k 40, top-p 0.9, seed 7", ragged,
         dict(max_new_tokens=24, temperature=0.8, top_k=40, top_p=0.9, seed=7, stop_token_ids=[])),
        ("greedy, repetition penalty 1.3 (logits through the graph)", ragged,
         dict(max_new_tokens=24, repetition_penalty=1.3, stop_token_ids=[])),
        ("beam search, 3 beams", ragged[1:2], dict(max_new_tokens=16, num_beams=3, stop_token_ids=[])),
    ]
    report, failed = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": []}, 0
    for name, batch, options in cases:
        a = plain.generate(batch, **options)
        b = graphs.generate(batch, **options)
        a = a if isinstance(a, list) else [a]
        b = b if isinstance(b, list) else [b]
        ta, tb = [list(map(int, r.token_ids)) for r in a], [list(map(int, r.token_ids)) for r in b]
        equal = ta == tb
        positions = sum(len(x) for x in ta)
        same = sum(int(x == y) for ra, rb in zip(ta, tb) for x, y in zip(ra, rb))
        failed += not equal
        report["cases"].append({"case": name, "equal": equal, "lengths": [len(x) for x in ta],
                                "positions_equal": f"{same}/{positions}", "plain": ta, "graphs": tb})
        print(f"{'ok  ' if equal else 'DIFF'} {name}: lengths {[len(x) for x in ta]}, {same}/{positions} equal",
              flush=True)
    report["graphs_captured"] = {f"b{k[0]}x{k[1]}": v.runs for k, v in graphs.session._graphs.items()}
    print(f"captured slots (batch x capacity: runs): {report['graphs_captured']}")
    print(f"{len(cases) - failed}/{len(cases)} cases equal")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_graph_check.json").write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
