"""Interop: an onnxpipe export loads in Hugging Face Optimum's ORTModelForCausalLM and decodes the same tokens.

Optimum pins transformers 4.57.6, so it lives in its own environment; this script runs there and compares with the
tokens onnxpipe's runtime produced, which the caller passes (or computes with --ours in the onnxpipe environment).

    python scripts/check_optimum_interop.py --ours out/llama-stdlib            # in onnxpipe's environment: prints ids
    /path/to/optimum-venv/bin/python scripts/check_optimum_interop.py out/llama-stdlib --expect 442,351,...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROMPT = [5, 17, 300, 41, 9]


def refusal(model_dir: str) -> str | None:
    """Why Optimum cannot run this directory, from its manifest; None when it can.

    The `optimize --target cuda` form's attention (GroupQueryAttention) writes each row's new keys and values at
    that row's length in one preallocated KV buffer, so it takes right-padded batches and a fixed-capacity cache
    (manifest: graph.padding_side "right", graph.kv.shares_buffer true). Optimum left-pads batches and grows the
    cache by concatenating presents, so it loads the directory without complaint and gets its padded rows wrong."""
    graph = json.loads((Path(model_dir) / "onnxpipe.json").read_text())["graph"]
    if graph.get("kv", {}).get("shares_buffer") or graph.get("padding_side") == "right":
        return ("the CUDA form (optimize --target cuda) takes right-padded batches in a preallocated KV buffer; Optimum "
                "left-pads and concatenates the cache. Use onnxpipe's runtime or ONNX Runtime GenAI (genai_config.json)")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--ours", action="store_true", help="print onnxpipe's greedy tokens (run in onnxpipe's env)")
    ap.add_argument("--expect", help="comma-separated token ids to compare Optimum's greedy tokens with")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    if args.ours:
        from onnxpipe import load

        print(",".join(map(str, load(args.model_dir, provider="cpu").generate(PROMPT, max_new_tokens=args.new_tokens).token_ids)))
        return
    reason = refusal(args.model_dir)
    if reason:
        raise SystemExit(f"{args.model_dir}: not for Optimum: {reason}")
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(args.model_dir, use_cache=True, use_io_binding=False)
    ids = torch.tensor([PROMPT])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                         pad_token_id=0)
    theirs = out[0, len(PROMPT):].tolist()
    print("optimum:", ",".join(map(str, theirs)))
    if args.expect:
        ours = [int(t) for t in args.expect.split(",")]
        same = sum(a == b for a, b in zip(ours, theirs))
        print(f"equal to onnxpipe's: {same}/{len(ours)}")
        raise SystemExit(0 if theirs[: len(ours)] == ours else 1)


if __name__ == "__main__":
    main()
