"""Static int8 (per channel) without SmoothQuant, with each alpha of a grid, and with ``--smoothquant auto`` (an
alpha per smoothing group) under several fold counts, on one exported model: the calibration-prefill KL and
perplexity beside the eval-text figures (what a choice is judged by), so a reader can see whether a choice made on
the calibration text carries over.

    flock /tmp/onnxpipe-bench.lock python3 scripts/sweep_smoothquant_alpha.py out/bench-quantize/gpt2-stdlib \
        --method minmax --out benchmarks/results/quantization-smoothquant-alpha-gpt2-minmax.json
    flock /tmp/onnxpipe-bench.lock python3 scripts/sweep_smoothquant_alpha.py out/bench-quantize/gpt2-stdlib \
        --alphas "" --auto 1 2 4 8 --rest-eval --out /tmp/auto-folds.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an exported fp32 onnxpipe model directory")
    parser.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    parser.add_argument("--alphas", default="0.1,0.25,0.4,0.5,0.65,0.8")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--calibration", type=Path, default=REPO / "data" / "calibration.txt")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "sweep-smoothquant")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fold-only", action="store_true",
                        help="smooth only the inputs whose 1/s folds into a norm (no inserted Mul before o_proj / "
                             "down_proj), as the SmoothQuant paper does; a measurement here, not a quantize option")
    parser.add_argument("--auto", nargs="*", type=int, default=[], metavar="FOLDS",
                        help="also run --smoothquant auto (an alpha per smoothing group, layer_alpha.py) with these "
                             "fold counts: 1 = scales, ranges and loss on the same calibration windows; k > 1 = "
                             "fitted on k-1 of k folds of the batches, loss on the other (the default is "
                             "layer_alpha.FOLDS)")
    parser.add_argument("--no-off", action="store_true", help="--auto rows: no group may stay unsmoothed")
    parser.add_argument("--rest-eval", action="store_true",
                        help="also score every row on the eval tokens after the first --eval-tokens (text that "
                             "choices made by looking at the first --eval-tokens have not seen)")
    args = parser.parse_args()
    if args.fold_only:
        import onnxpipe.quant.smoothquant as smoothquant

        rescale = smoothquant.rescale_group
        smoothquant.rescale_group = lambda graph, x, nodes, s, uses, allow_mul=True: rescale(
            graph, x, nodes, s, uses, allow_mul=False)

    from onnxpipe.artifact import ModelDir
    from onnxpipe.quant import quantize_model
    from onnxpipe.quant.calibration import CalibrationConfig, calibration_samples
    from onnxpipe.quant.quality import calibration_divergence, measure_session, prefill_feed
    from onnxpipe.quant.text import load_tokenizer

    src = ModelDir.open(args.model)
    logits = src.manifest.graph["logits"]
    calib = CalibrationConfig()
    samples = calibration_samples(load_tokenizer(src.path), args.calibration, calib)
    feeds = [prefill_feed(src.manifest, samples[b:b + calib.batch_size, :calib.prefill_len])
             for b in range(0, len(samples), calib.batch_size)]
    reference = measure_session(src.model_path)
    rest = None
    if args.rest_eval:
        from onnxpipe.quant.quality import default_context
        from onnxpipe.quant.text import read_documents, tokenize_documents

        rest = tokenize_documents(load_tokenizer(src.path), read_documents(REPO / "data" / "eval.txt", "eval"))
        rest = rest[args.eval_tokens:]
    from onnxpipe.quant import layer_alpha

    choose = layer_alpha.choose_group_alphas
    rows = []
    for alpha in [None] + [float(a) for a in args.alphas.split(",") if a] + [f"auto{k}" for k in args.auto]:
        t0 = time.time()
        folds = None
        if isinstance(alpha, str):
            folds, alpha = int(alpha[4:]), "auto"
            layer_alpha.choose_group_alphas = functools.partial(choose, folds=folds, allow_off=not args.no_off)
        name = f"auto-{folds}fold{'-nooff' if args.no_off else ''}" if folds else alpha or "plain"
        out = args.work / f"{src.path.name}-{args.method}-{name}"
        res = quantize_model(src.path, out, "static", force=True, calibration=args.calibration, method=args.method,
                             per_channel=True, smoothquant=alpha, max_eval_tokens=args.eval_tokens, calib=calib,
                             max_ppl_increase=1e9, min_greedy_agreement=0.0)  # a sweep reports, it does not gate
        kl, ppl = calibration_divergence(reference, measure_session(out / "model.onnx"), feeds, logits)
        q = res.step["quality"]
        row = {"alpha": alpha, "calibration_kl": kl, "calibration_ppl_change_pct": ppl,
               "eval_ppl_change_pct": q["ppl_change_pct"], "eval_kl": q["mean_kl"], "eval_top1": q["top1_agreement"],
               "seconds": round(time.time() - t0, 1)}
        if folds is not None:
            search = res.step["details"]["smoothquant_search"]
            row.update(folds=folds, allow_off=search["allow_off"], groups_off=search["groups_off"],
                       all_off_fallback=search["all_off_fallback"], chosen=[g["alpha"] for g in search["alphas"]])
        if rest is not None:
            from onnxpipe.quant.quality import quality_report

            r = quality_report(src.model_path, out / "model.onnx", src.manifest, ModelDir.open(out).manifest, rest,
                               default_context(src.manifest), "data/eval.txt after the first --eval-tokens")
            row.update(rest_eval_tokens=r.eval_tokens, rest_eval_ppl_change_pct=r.ppl_change_pct,
                       rest_eval_kl=r.mean_kl, rest_eval_top1=r.top1_agreement)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python3 scripts/sweep_smoothquant_alpha.py " + " ".join(sys.argv[1:])}
    args.out.write_text(json.dumps({"env": env, "model": src.path.name, "method": args.method,
                                    "fold_only": args.fold_only, "no_off": args.no_off,
                                    "eval_tokens": args.eval_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
