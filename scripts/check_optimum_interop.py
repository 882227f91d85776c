"""Interop: an onnxpipe export loads in Hugging Face Optimum's ORTModelForCausalLM and decodes the same tokens.

Optimum pins transformers 4.57.6, so it lives in its own environment; this script runs there and compares with the
tokens onnxpipe's runtime produced, which the caller passes (or computes with --ours in the onnxpipe environment).

    python scripts/check_optimum_interop.py --ours out/llama-stdlib            # in onnxpipe's environment: prints ids
    /path/to/optimum-venv/bin/python scripts/check_optimum_interop.py out/llama-stdlib --expect 442,351,...
"""

from __future__ import annotations

import argparse

PROMPT = [5, 17, 300, 41, 9]


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
