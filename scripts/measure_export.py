"""Export time and peak RSS for random-weight models of real shapes (GPT-2 small, a ~1B Llama).

Each model is built from a config with random weights, saved as a Hugging Face directory, then exported by
`python -m onnxpipe export` in a child process whose wall time and peak RSS (ru_maxrss) are measured.

    python scripts/measure_export.py [--models gpt2-small,llama-1b] [--dtype fp32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "gpt2-small": ("gpt2", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)),
    "llama-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                               tie_word_embeddings=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                               "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192})),
}


def build(name: str, out: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = SHAPES[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def measure(hf_dir: Path, out: Path, dtype: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxpipe", "export", str(hf_dir), "-o", str(out), "--dtype", dtype,
                           "--force"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest child so far: run one export per process
    if proc.returncode != 0:
        raise SystemExit(f"export failed: {proc.stderr.strip().splitlines()[-1]}")
    manifest = json.loads((out / "onnxpipe.json").read_text())
    check = manifest["steps"][-1]["check"]
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(peak_kb / 1024**2, 2), "rel_err": check["rel_err"],
            "greedy_agreement": check["greedy_agreement"],
            "onnx_gb": round(sum(f.stat().st_size for f in out.iterdir()) / 1e9, 2),
            "external_data": manifest["graph"]["external_data"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-small,llama-1b")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model in this (fresh) process
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="onnxpipe-measure-"))
    if args.one:
        hf = work / f"{args.one}-hf"
        params = build(args.one, hf)
        result = {"model": args.one, "params_m": round(params / 1e6, 1), "dtype": args.dtype,
                  **measure(hf, work / f"{args.one}-onnx", args.dtype)}
        shutil.rmtree(hf, ignore_errors=True)
        shutil.rmtree(work / f"{args.one}-onnx", ignore_errors=True)
        print(json.dumps(result))
        return
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'model':<12} {'params':>8} {'dtype':>5} {'export s':>9} {'peak RSS':>9} {'onnx GB':>8} {'rel err':>9}")
    for name in args.models.split(","):
        # a fresh process per model, so that RUSAGE_CHILDREN's maximum belongs to this model's export alone
        line = subprocess.run([sys.executable, __file__, "--one", name, "--dtype", args.dtype, "--workdir", str(work)],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        print(f"{r['model']:<12} {r['params_m']:>7}M {r['dtype']:>5} {r['wall_s']:>9} {r['peak_rss_gb']:>8}G "
              f"{r['onnx_gb']:>8} {r['rel_err']:>9.2g}")


if __name__ == "__main__":
    main()
