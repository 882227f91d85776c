#!/usr/bin/env bash
# The main job on the bundled trained reference model: export -> inspect (later stages are added as they land).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/llama-stdlib}
OUT=${OUT:-out}
name=$(basename "$MODEL")
onnxpipe export "$MODEL" -o "$OUT/$name" --force
onnxpipe inspect "$OUT/$name"
