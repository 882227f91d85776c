"""Token-level perplexity of a Hugging Face causal LM on a text file, optionally next to a unigram baseline.

    python scripts/perplexity.py models/gpt2-stdlib data/eval.txt
    python scripts/perplexity.py models/gpt2-stdlib data/eval.txt --baseline --max-tokens 8192

The text is tokenized as a whole (no special tokens added; an "<|endoftext|>" in the text is the separator
token) and cut into windows of the model's context length. With the default stride (= context) the windows do
not overlap and each scores all its tokens but the first, which has no context. With a smaller stride, each
window scores only the tokens that no earlier window scored (the Hugging Face "strided" recipe), so every token
after the first is scored once with at least context - stride tokens of history.

The baseline (--baseline) is an add-one smoothed unigram model, estimated on the tokens of the train split
(data/train.txt.xz, tokenized with the same tokenizer) and scored on exactly the same target tokens.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Window:
    begin: int         # first input position
    end: int           # one past the last input position
    first_target: int  # first position whose token is scored (begin < first_target <= end)


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float     # natural-log negative log-likelihood summed over the scored tokens
    n_scored: int      # number of scored (target) tokens
    n_tokens: int      # number of tokens the text was cut to
    n_windows: int
    context: int
    stride: int


def cut_windows(n_tokens: int, context: int, stride: int | None = None) -> list[Window]:
    """Windows over n_tokens positions; every position but 0 is scored exactly once."""
    stride = context if stride is None else stride
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
    windows, begin, scored_up_to = [], 0, 0
    while n_tokens > 1:
        end = min(begin + context, n_tokens)
        first_target = max(scored_up_to, begin + 1)
        if first_target < end:
            windows.append(Window(begin, end, first_target))
        scored_up_to = end
        if end == n_tokens:
            break
        begin += stride
    return windows


def target_positions(windows: list[Window]) -> list[int]:
    return [t for w in windows for t in range(w.first_target, w.end)]


def _result(nll_sum: float, n_scored: int, n_tokens: int, windows: list[Window], context: int,
            stride: int | None) -> PerplexityResult:
    return PerplexityResult(perplexity=math.exp(nll_sum / n_scored), nll_sum=nll_sum, n_scored=n_scored,
                            n_tokens=n_tokens, n_windows=len(windows), context=context,
                            stride=context if stride is None else stride)


@torch.no_grad()
def model_perplexity(model: torch.nn.Module, token_ids: list[int] | torch.Tensor, context: int,
                     stride: int | None = None, batch_size: int = 8) -> PerplexityResult:
    """Perplexity of a causal LM (called as model(input_ids=...).logits) over token_ids, cut by cut_windows."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    windows = cut_windows(len(ids), context, stride)
    if not windows:
        raise ValueError("need at least 2 tokens to measure perplexity")
    model.eval()
    nll_sum, n_scored = 0.0, 0
    by_length: dict[int, list[Window]] = {}
    for w in windows:  # windows of one length are batched together
        by_length.setdefault(w.end - w.begin, []).append(w)
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            inputs_BT = torch.stack([ids[w.begin:w.end] for w in batch])
            logits_BTV = model(input_ids=inputs_BT).logits.float()
            logprobs_BTV = torch.log_softmax(logits_BTV[:, :-1], dim=-1)
            target_logprobs_BT = logprobs_BTV.gather(-1, inputs_BT[:, 1:, None]).squeeze(-1)
            for row, w in enumerate(batch):
                scored = target_logprobs_BT[row, w.first_target - w.begin - 1:]
                nll_sum -= scored.double().sum().item()
                n_scored += scored.numel()
    return _result(nll_sum, n_scored, len(ids), windows, context, stride)


def unigram_perplexity(train_ids: list[int], token_ids: list[int], vocab_size: int, context: int,
                       stride: int | None = None) -> PerplexityResult:
    """Add-one smoothed unigram model from train_ids, scored on the same targets as model_perplexity."""
    counts = torch.bincount(torch.as_tensor(train_ids, dtype=torch.long), minlength=vocab_size).double()
    logprobs = torch.log((counts + 1.0) / (counts.sum() + vocab_size))
    windows = cut_windows(len(token_ids), context, stride)
    targets = torch.as_tensor(token_ids, dtype=torch.long)[target_positions(windows)]
    return _result(-logprobs[targets].sum().item(), len(targets), len(token_ids), windows, context, stride)


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    return (lzma.decompress(raw) if path.suffix == ".xz" else raw).decode("utf-8")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text as one stream, without BOS/EOS added (special tokens in the text are kept)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def model_context(model) -> int:
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot tell the context length of {type(model).__name__}; pass --context")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("text", type=Path, nargs="?", default=REPO_ROOT / "data" / "eval.txt",
                        help="text file to score (default: data/eval.txt)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    parser.add_argument("--context", type=int, default=None, help="window length (default: the model's context)")
    parser.add_argument("--stride", type=int, default=None, help="window stride (default: = context, no overlap)")
    parser.add_argument("--baseline", action="store_true", help="also print the add-one unigram baseline")
    parser.add_argument("--train-text", type=Path, default=REPO_ROOT / "data" / "train.txt.xz",
                        help="text the baseline's unigram counts come from (default: data/train.txt.xz)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args()

    for path in (args.model_dir, args.text) + ((args.train_text,) if args.baseline else ()):
        if not path.exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 1
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model_dir)
    context = args.context or model_context(model)
    ids = encode(tokenizer, read_text(args.text))[:args.max_tokens]
    result = model_perplexity(model, ids, context, args.stride)
    report = {"model_dir": str(args.model_dir), "text": str(args.text), "model": asdict(result)}
    if args.baseline:
        train_ids = encode(tokenizer, read_text(args.train_text))
        baseline = unigram_perplexity(train_ids, ids, len(tokenizer), context, args.stride)
        report["unigram"] = asdict(baseline) | {"train_text": str(args.train_text), "train_tokens": len(train_ids)}
        report["ratio"] = baseline.perplexity / result.perplexity
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{args.model_dir}: perplexity {result.perplexity:.3f} on {result.n_scored} tokens of {args.text} "
          f"({result.n_windows} windows, context {result.context}, stride {result.stride})")
    if args.baseline:
        print(f"unigram baseline (add-one, {len(train_ids)} train tokens): perplexity {baseline.perplexity:.3f} "
              f"on the same tokens; unigram / model = {report['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
