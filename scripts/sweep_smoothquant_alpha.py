"""Static int8 (per channel) without SmoothQuant and with each alpha of a grid, on one exported model: the
calibration-prefill KL and perplexity (what ``--smoothquant auto`` chooses by) beside the eval-text figures (what
the choice is judged by), so a reader can see whether the calibration choice carries over.

    flock /tmp/onnxpipe-bench.lock python3 scripts/sweep_smoothquant_alpha.py out/bench-quantize/gpt2-stdlib \
        --method minmax --out docs/quantization-smoothquant-alpha-gpt2-minmax.json
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    if args.fold_only:
        import onnxpipe.quant.smoothquant as smoothquant

        rescale = smoothquant.rescale_group
        smoothquant.rescale_group = lambda graph, x, nodes, s, uses, allow_mul=True: rescale(
            graph, x, nodes, s, uses, allow_mul=False)

    from onnxpipe.artifact import ModelDir
    from onnxpipe.quant import quantize_model
    from onnxpipe.quant.alpha import calibration_divergence
    from onnxpipe.quant.calibration import CalibrationConfig, calibration_samples
    from onnxpipe.quant.quality import measure_session, prefill_feed
    from onnxpipe.quant.text import load_tokenizer

    src = ModelDir.open(args.model)
    logits = src.manifest.graph["logits"]
    calib = CalibrationConfig()
    samples = calibration_samples(load_tokenizer(src.path), args.calibration, calib)
    feeds = [prefill_feed(src.manifest, samples[b:b + calib.batch_size, :calib.prefill_len])
             for b in range(0, len(samples), calib.batch_size)]
    reference = measure_session(src.model_path)
    rows = []
    for alpha in [None] + [float(a) for a in args.alphas.split(",")]:
        t0 = time.time()
        out = args.work / f"{src.path.name}-{args.method}-{alpha or 'plain'}"
        res = quantize_model(src.path, out, "static", force=True, calibration=args.calibration, method=args.method,
                             per_channel=True, smoothquant=alpha, max_eval_tokens=args.eval_tokens, calib=calib)
        kl, ppl = calibration_divergence(reference, measure_session(out / "model.onnx"), feeds, logits)
        q = res.step["quality"]
        row = {"alpha": alpha, "calibration_kl": kl, "calibration_ppl_change_pct": ppl,
               "eval_ppl_change_pct": q["ppl_change_pct"], "eval_kl": q["mean_kl"], "eval_top1": q["top1_agreement"],
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python3 scripts/sweep_smoothquant_alpha.py " + " ".join(sys.argv[1:])}
    args.out.write_text(json.dumps({"env": env, "model": src.path.name, "method": args.method,
                                    "fold_only": args.fold_only,
                                    "eval_tokens": args.eval_tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
