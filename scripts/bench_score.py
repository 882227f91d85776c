"""Scoring throughput: `onnxpipe score` (ONNX Runtime) against plain transformers on the same texts, same run.

    flock /tmp/onnxpipe-bench.lock python3 scripts/bench_score.py models/gpt2-stdlib --texts 2000

The texts are the first N pieces of data/eval.txt's paragraphs (1, 2, 3, 6 or 12 lines each, in turn), written as a JSONL of {"id", "text"} records. The ONNX side is the library's `score()` on an fp32 export of the
model directory (exported once into --work). The transformers side does the same work: the same token ids (BOS +
text), the same windows, the same length-bucketed batches with the same token budget, left-padded, fp32,
`torch.no_grad()`, log-softmax and gather. Both run with the same number of threads. tokens/s counts scored tokens
over wall time (model load excluded; for onnxpipe the time includes reading, tokenizing and writing the output).
Per-record log-likelihoods of both sides are compared as a check.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


PIECE_LINES = (1, 2, 3, 6, 12)  # lines per text, in turn: a spread of lengths for the length bucketing


def cut_texts(path: Path, n: int) -> list[str]:
    """Paragraphs (blank-line separated) cut into pieces of 1, 2, 3, 6, 12, 1, ... lines: 2,125 texts from eval.txt."""
    text = path.read_text(encoding="utf-8").replace("<|endoftext|>", "\n\n")
    pieces, turn = [], 0
    for para in (b.strip("\n") for b in text.split("\n\n")):
        lines = para.split("\n")
        i = 0
        while i < len(lines) and para.strip():
            k = PIECE_LINES[turn % len(PIECE_LINES)]
            turn += 1
            piece = "\n".join(lines[i:i + k])
            i += k
            if piece.strip():
                pieces.append(piece)
    if len(pieces) < n:
        raise SystemExit(f"{path} gives only {len(pieces)} texts; ask for fewer --texts")
    return pieces[:n]


def export_once(hf_dir: Path, work: Path) -> Path:
    from onnxpipe.artifact import ModelDir

    out = work / f"{hf_dir.name}-onnx"
    try:
        ModelDir.open(out)
        return out
    except Exception:
        shutil.rmtree(out, ignore_errors=True)
    from onnxpipe.export import export_decoder

    export_decoder(hf_dir, out, dtype="fp32")
    return out


def run_onnxpipe(onnx_dir: Path, records: Path, work: Path, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    from onnxpipe.runtime.score import ScoreConfig, score

    out = work / "scores.jsonl"
    cfg = ScoreConfig(provider="cpu", threads=args.threads, batch_tokens=args.batch_tokens, force=True,
                      progress=False, chunk_records=args.chunk_records)
    t0 = time.perf_counter()
    summary = score(onnx_dir, records, out, cfg, log=lambda m: None)
    wall = time.perf_counter() - t0  # includes opening the session
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {"seconds": summary.seconds, "wall_with_load": wall, "tokens": summary.tokens,
            "padding": summary.padding_fraction, "provider": summary.provider}, rows


def run_transformers(hf_dir: Path, onnx_dir: Path, texts: list[str], args: argparse.Namespace) -> tuple[dict, list[float]]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from onnxpipe.artifact import ModelDir
    from onnxpipe.runtime.score import Encoder, cut_windows, plan_batches
    from onnxpipe.runtime.score_io import Record

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    md = ModelDir.open(onnx_dir)
    context = int(md.manifest.model["max_position_embeddings"])
    stride = context // 2
    t0 = time.perf_counter()
    items = Encoder(md).items([Record(i, str(i), text=t) for i, t in enumerate(texts)])
    windows = [(k, it.tokens[b:e], f - b) for k, it in enumerate(items) for b, e, f in
               cut_windows(len(it.tokens), context, stride, it.score_from)]
    loglik = np.zeros(len(items))
    tokens = 0
    with torch.no_grad():
        for batch in plan_batches([len(w[1]) for w in windows], args.batch_tokens, 0.2):
            width = max(len(windows[i][1]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                seq = windows[i][1]
                ids[r, width - len(seq):] = torch.tensor(seq)
                mask[r, width - len(seq):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            rows, cols, targets, owner = [], [], [], []
            for r, i in enumerate(batch):  # the logit at p predicts the token at p + 1; gather only scored rows
                k, seq, first = windows[i]
                t = np.arange(first, len(seq))
                rows.append(np.full(len(t), r))
                cols.append(width - len(seq) + t - 1)
                targets.append(np.asarray(seq)[t])
                owner.append(np.full(len(t), k))
            rows, cols, targets, owner = (torch.from_numpy(np.concatenate(a)) for a in (rows, cols, targets, owner))
            logprobs = torch.log_softmax(logits[rows, cols].float(), dim=-1)
            picked = logprobs.gather(-1, targets[:, None]).squeeze(-1).double()
            np.add.at(loglik, owner.numpy(), picked.numpy())
            tokens += len(targets)
    return {"seconds": time.perf_counter() - t0, "tokens": tokens}, loglik.tolist()


def versions() -> str:
    import onnxruntime
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_model_dir", type=Path, nargs="?", default=REPO / "models" / "gpt2-stdlib")
    p.add_argument("--onnx-dir", type=Path, default=None, help="an onnxpipe export of the model (default: export it)")
    p.add_argument("--text", type=Path, default=REPO / "data" / "eval.txt")
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--chunk-records", type=int, default=512)
    p.add_argument("--work", type=Path, default=Path("/tmp/onnxpipe-bench-score"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    texts = cut_texts(args.text, args.texts)
    records = args.work / "texts.jsonl"
    records.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    onnx_dir = args.onnx_dir or export_once(args.hf_model_dir, args.work)

    ours, rows = run_onnxpipe(onnx_dir, records, args.work, args)
    ref, ref_loglik = run_transformers(args.hf_model_dir, onnx_dir, texts, args)
    assert ours["tokens"] == ref["tokens"], (ours["tokens"], ref["tokens"])
    diff = max(abs(r["loglik"] - x) for r, x in zip(rows, ref_loglik))
    chars = sum(len(t) for t in texts)
    ours_tps, ref_tps = ours["tokens"] / ours["seconds"], ref["tokens"] / ref["seconds"]

    print(f"# {len(texts)} texts ({chars} chars, {ours['tokens']} scored tokens) from {args.text.name}; "
          f"model {args.hf_model_dir.name}; {args.threads} threads; batch budget {args.batch_tokens} tokens")
    print(f"# {platform.processor() or platform.machine()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {versions()}")
    print("| engine | seconds | scored tokens/s | records/s | vs transformers |")
    print("|---|---|---|---|---|")
    print(f"| transformers (fp32, batched, no_grad) | {ref['seconds']:.2f} | {ref_tps:,.0f} | "
          f"{len(texts) / ref['seconds']:,.1f} | 1.00x |")
    print(f"| onnxpipe score (ORT CPU, fp32) | {ours['seconds']:.2f} | {ours_tps:,.0f} | "
          f"{len(texts) / ours['seconds']:,.1f} | {ours_tps / ref_tps:.2f}x |")
    print(f"# padding {ours['padding']:.1%} of batch slots; max |loglik diff| per record vs transformers {diff:.2e}; "
          f"onnxpipe wall incl. session load {ours['wall_with_load']:.2f}s")
    if args.json:
        args.json.write_text(json.dumps({"onnxpipe": ours, "transformers": ref, "max_abs_loglik_diff": diff,
                                         "texts": len(texts), "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
