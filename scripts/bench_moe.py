#!/usr/bin/env python3
"""The experts pass's speed: a small Qwen3-MoE-like model optimized with and without it, timed in one run.

A random-weight qwen3_moe (defaults: hidden 256, 4 layers, 32 experts, top-4, expert width 128, 8 heads / 4 KV
heads of 64, vocab 256 so that a byte tokenizer fits) is exported, then optimized twice for ``--provider``:

  fused      optimize --level 3 (the experts pass writes ONNX Runtime's MoE)
  unfused    the same passes but experts: transformers' batched_mm form (per-token gathered weights, batched MatMuls)

Both run through onnxpipe's runtime (``onnxpipe.runtime.load`` + ``bench``: seeded random prompts, greedy decode,
one untimed run then ``--repeats`` timed ones, medians): prefill ms, decode ms/step and tokens/s at each batch size.
The table ends with unfused/fused ratios (above 1: the fused form is faster).

    nice -n 10 python scripts/bench_moe.py                       # CPU
    python scripts/bench_moe.py --provider cuda --dtype fp16     # the GPU host (optimize --target cuda)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_hf(out: Path, args: argparse.Namespace) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.expert_width, num_experts=args.experts, num_experts_per_tok=args.top_k,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    _byte_tokenizer(out)
    return out


def _byte_tokenizer(out: Path) -> None:
    """A byte-level BPE with no merges: exactly the model's 256 tokens (the runtime needs a tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))


def build_forms(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import optimize_model
    from onnxpipe.fusion.pipeline import select_passes

    hf = build_hf(work / "hf", args)
    exported = work / "export"
    export_decoder(hf, exported, dtype=args.dtype)
    shutil.copy(hf / "tokenizer.json", exported / "tokenizer.json")
    level3 = [p.name for p in select_passes(3, None)]
    forms = {"fused": level3, "unfused": [n for n in level3 if n != "experts"]}
    out = {}
    for name, passes in forms.items():
        result = optimize_model(exported, work / name, target=args.provider, passes=passes)
        experts = next((p for p in result.passes if p.name == "experts"), None)
        if name == "fused" and (experts is None or experts.status != "kept"):
            raise SystemExit(f"the experts pass did not fuse: {experts.reason if experts else 'not run'}")
        shutil.copy(hf / "tokenizer.json", work / name / "tokenizer.json")
        print(f"{name}: {result.model_dir.path} ({', '.join(f'{k} {v}' for p in result.passes for k, v in p.fused.items() if isinstance(v, str))})")
        out[name] = work / name
    return out


def time_forms(forms: dict[str, Path], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    from onnxpipe.runtime import load
    from onnxpipe.runtime.bench import bench

    results = {}
    for name, path in forms.items():
        lm = load(path, provider=args.provider, threads=args.threads, cuda_graph=args.cuda_graph)
        if lm.provider != args.provider:  # load falls back from cuda to cpu: that would time the wrong thing
            raise SystemExit(f"{name}: asked for {args.provider}, running on {lm.provider}")
        rows = bench(lm, batches=args.batches, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                     repeats=args.repeats)
        results[name] = [r.as_dict() for r in rows]
        del lm
    return results


def render(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = ["| form | batch | prefill ms | decode ms/step | tokens/s |", "|---|---|---|---|---|"]
    for name, rows in results.items():
        lines += [f"| {name} | {r['batch']} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {r['tokens_per_s']:,.0f} |"
                  for r in rows]
    lines += ["", "| batch | prefill unfused/fused | decode unfused/fused |", "|---|---|---|"]
    for fused, unfused in zip(results["fused"], results["unfused"]):
        lines.append(f"| {fused['batch']} | {unfused['prefill_ms'] / fused['prefill_ms']:.2f}x | "
                     f"{unfused['decode_ms'] / fused['decode_ms']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                        help="the EP timed and the optimize target")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="export dtype")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--expert-width", type=int, default=128, help="moe_intermediate_size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    parser.add_argument("--cuda-graph", action="store_true", help="replay decode steps as CUDA graphs (cuda only)")
    parser.add_argument("--work", type=Path, default=None, help="keep the models here (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args()

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        forms = build_forms(work, args)
        results = time_forms(forms, args)
    import onnxruntime

    env = {"onnxruntime": onnxruntime.__version__, "machine": platform.machine(), "python": platform.python_version(),
           "provider": args.provider, "dtype": args.dtype, "seconds": round(time.perf_counter() - start, 1)}
    shape = (f"qwen3_moe hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-{args.top_k}, "
             f"expert width {args.expert_width}; prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
             f"{args.repeats} repeats")
    print(f"\n{shape}; {json.dumps(env)}\n")
    print(render(results, args))
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "env": env, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
