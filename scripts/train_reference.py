"""Train a small reference decoder LM from scratch on the committed stdlib text, with its own BPE tokenizer.

    python scripts/train_reference.py --family gpt2  --out models/gpt2-stdlib  --seed 0 --steps 1600
    python scripts/train_reference.py --family llama --out models/llama-stdlib --seed 0 --steps 1600

Deterministic given the arguments on one machine (single CPU thread, deterministic algorithms, seeded init and
data order). Writes a Hugging Face directory (config.json, model.safetensors, tokenizer files), plus
train_log.json (the loss curve and timings) and eval.json (perplexity of the saved model, reloaded from disk, on
the first EVAL_SLICE_TOKENS tokens of data/eval.txt). The directory is built beside OUT and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_reference_data import DATA_DIR, DOC_SEPARATOR, read_split_text  # noqa: E402
from perplexity import encode, load_model, model_context, model_perplexity, unigram_perplexity  # noqa: E402

EVAL_SLICE_TOKENS = 8192


@dataclass
class TrainConfig:
    family: str
    seed: int = 0
    steps: int = 1600
    device: str = "cpu"
    vocab_size: int = 4096
    context: int = 256
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2          # llama only: grouped-query attention
    intermediate: int = 352    # llama only: SwiGLU width (about 8/3 * hidden, rounded up to 32)
    batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE (GPT-2 / Llama-3 style) trained on the documents of text; '<|endoftext|>' is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[DOC_SEPARATOR],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(text.split(DOC_SEPARATOR), trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer, context: int):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=DOC_SEPARATOR, eos_token=DOC_SEPARATOR,
                                   unk_token=DOC_SEPARATOR, model_max_length=context, clean_up_tokenization_spaces=False)


def build_model(cfg: TrainConfig, separator_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    common = dict(vocab_size=cfg.vocab_size, bos_token_id=separator_id, eos_token_id=separator_id,
                  tie_word_embeddings=True)
    if cfg.family == "gpt2":
        config = GPT2Config(n_positions=cfg.context, n_embd=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        return GPT2LMHeadModel(config)
    if cfg.family == "llama":
        config = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                             num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                             num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.context,
                             rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                             **common)
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown family {cfg.family!r}; use gpt2 or llama")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def batches(ids: torch.Tensor, cfg: TrainConfig, generator: torch.Generator):
    """Endless (batch, context) input batches: each epoch cuts the stream at a random offset into windows
    of `context` tokens and visits them in a random order."""
    epoch = 0
    while True:
        offset = int(torch.randint(0, cfg.context, (1,), generator=generator))
        n_windows = (len(ids) - offset) // cfg.context
        windows_NT = ids[offset:offset + n_windows * cfg.context].view(n_windows, cfg.context)
        order = torch.randperm(n_windows, generator=generator)
        for i in range(0, n_windows - cfg.batch_size + 1, cfg.batch_size):
            yield epoch, windows_NT[order[i:i + cfg.batch_size]]
        epoch += 1


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 else no_decay).append(param)  # no decay on norms and biases
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: TrainConfig, out: Path, command: str) -> dict:
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    train_text = read_split_text("train")
    eval_text = read_split_text("eval")
    tokenizer = wrap_tokenizer(train_tokenizer(train_text, cfg.vocab_size), cfg.context)
    separator_id = tokenizer.convert_tokens_to_ids(DOC_SEPARATOR)
    train_ids = torch.tensor(encode(tokenizer, train_text), dtype=torch.long)
    eval_ids = encode(tokenizer, eval_text)[:EVAL_SLICE_TOKENS]
    t_data = time.time() - t_start
    print(f"tokenizer: vocab {len(tokenizer)}, train {len(train_ids):,} tokens, "
          f"eval slice {len(eval_ids)} tokens ({t_data:.0f}s)", flush=True)

    model = build_model(cfg, separator_id).to(cfg.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {n_params:,} parameters", flush=True)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(cfg.seed)
    eval_tensor = torch.tensor(eval_ids, dtype=torch.long, device=cfg.device)

    log, t_train, running = [], time.time(), None
    stream = batches(train_ids, cfg, generator)
    for step in range(cfg.steps):
        epoch, inputs_BT = next(stream)
        inputs_BT = inputs_BT.to(cfg.device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        model.train()
        loss = model(input_ids=inputs_BT, labels=inputs_BT).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            eval_ppl = model_perplexity(model, eval_tensor, cfg.context).perplexity
            entry = {"step": step + 1, "epoch": epoch, "train_loss_ema": round(running, 4),
                     "lr": learning_rate(cfg, step), "grad_norm": round(float(grad_norm), 4),
                     "eval_slice_ppl": round(eval_ppl, 3), "seconds": round(time.time() - t_train, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    train_seconds = time.time() - t_train

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to("cpu").save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tokens_seen = cfg.steps * cfg.batch_size * cfg.context
    (tmp / "train_log.json").write_text(json.dumps({
        "command": command,
        "config": asdict(cfg),
        "parameters": n_params,
        "train_tokens_in_split": len(train_ids),
        "training_tokens_seen": tokens_seen,
        "epochs": tokens_seen / len(train_ids),
        "data_prep_seconds": round(t_data, 1),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
        "machine": platform.processor() or platform.machine(),
        "log": log,
    }, indent=1) + "\n")
    write_eval_json(tmp, train_ids.tolist(), shown_as=out)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return json.loads((out / "eval.json").read_text())


def write_eval_json(model_dir: Path, train_ids: list[int], shown_as: Path) -> None:
    """Perplexity of the model as saved (reloaded from model_dir) on the fixed eval slice, and the baseline."""
    model, tokenizer = load_model(model_dir)
    context = model_context(model)
    ids = encode(tokenizer, read_split_text("eval"))[:EVAL_SLICE_TOKENS]
    result = model_perplexity(model, ids, context)
    baseline = unigram_perplexity(train_ids, ids, len(tokenizer), context)
    (model_dir / "eval.json").write_text(json.dumps({
        "text": "data/eval.txt",
        "slice": f"first {EVAL_SLICE_TOKENS} tokens",
        "slice_tokens": len(ids),
        "windows": f"non-overlapping windows of {context} tokens; each scores all its tokens but the first",
        "scored_tokens": result.n_scored,
        "perplexity": result.perplexity,
        "unigram_perplexity": baseline.perplexity,
        "unigram": "add-one smoothed unigram from the train split's tokens, scored on the same tokens",
        "command": f"python scripts/perplexity.py {shown_as.as_posix()} data/eval.txt "
                   f"--max-tokens {EVAL_SLICE_TOKENS} --baseline",
    }, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=["gpt2", "llama"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 1
    if not (DATA_DIR / "manifest.json").exists():
        print(f"error: {DATA_DIR / 'manifest.json'} is missing; run scripts/make_reference_data.py", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(family=args.family, seed=args.seed, steps=args.steps, device=args.device,
                      batch_size=args.batch_size, lr=args.lr)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    result = train(cfg, args.out, command)
    print(f"saved {args.out}: eval-slice perplexity {result['perplexity']:.3f} "
          f"(unigram {result['unigram_perplexity']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
