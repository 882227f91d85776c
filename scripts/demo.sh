#!/usr/bin/env bash
# The main job on the bundled trained reference model:
#   export (checked against PyTorch) -> optimize (level 3, each pass checked) -> quantize (dynamic int8, with its
#   quality report) -> generate and score with the quantized model.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/llama-stdlib}
OUT=${OUT:-out}
name=$(basename "$MODEL")
if [ "$MODEL" = smollm2 ]; then  # MODEL=smollm2: the SmolLM2-135M GGUF (docs/export.md, "GGUF"); fails if not installed
  MODEL=$(python3 -m onnxpipe.reference smollm2)
fi
onnxpipe export "$MODEL" -o "$OUT/$name" --force
onnxpipe inspect "$OUT/$name"
onnxpipe optimize "$OUT/$name" -o "$OUT/$name-opt" --level 3 --force
onnxpipe quantize "$OUT/$name-opt" -o "$OUT/$name-int8" --mode dynamic --force --eval-tokens 16384
onnxpipe generate "$OUT/$name-int8" --prompt "def fib(n):" --max-new-tokens 48 --temperature 0.7 --top-p 0.9 --seed 0
python3 -c 'import json; t = open("data/eval.txt").read().replace("<|endoftext|>", "\n\n"); ps = [p.strip() for p in t.split("\n\n") if p.strip()][:200]; print("\n".join(json.dumps({"id": i, "text": p}) for i, p in enumerate(ps)))' > "$OUT/eval-texts.jsonl"
onnxpipe score "$OUT/$name-int8" "$OUT/eval-texts.jsonl" -o "$OUT/eval-scores.jsonl" --force --no-progress
onnxpipe bench "$OUT/$name-int8" --batch 1,4 --prompt-tokens 64 --new-tokens 32 --repeats 2
