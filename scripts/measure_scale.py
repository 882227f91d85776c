"""Peak RSS, peak disk and wall time of export -> optimize -> quantize (and GenAI's builder, stage genai) on a model
shape given by flags.

The checkpoint is built in bf16 on the meta device and materialised in place on the CPU (never in fp32), saved with
save_pretrained, then each stage runs as `python -m onnxpipe ...` in a child process: its peak RSS is the child's
ru_maxrss (os.wait4), its peak disk the largest number of bytes the work directory grew by while it ran (sampled
every 0.2 s: outputs, temporary directories, snapshots), beside the stage's input and output sizes.

    nice -n 10 python scripts/measure_scale.py --layers 24 --hidden 896 --intermediate 4864 --vocab 151936 \
        --heads 14 --kv-heads 2 --dtype fp16 [--stages export,optimize,quantize] [--export-method auto|traced|stamped]
        [--optimize "--check-form whole"] [--repo DIR] [--workdir DIR]

--repo runs the stages from another checkout (e.g. a `git worktree` of an older commit) for a before/after table.
Prints one table: shape, stage, peak RSS, RSS / weights, peak disk added, input and output sizes, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent


def random_bf16_model(cfg: Any, std: float) -> Any:
    """``cfg``'s model in bf16 with seeded random weights (norms 1, the rest normal(0, std)), never held in fp32:
    made on the meta device, materialised empty on the CPU and initialised in place."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each parameter its own storage: tie the LM head to the table again
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            init_weight(name, p, std, gen)
    return model


def init_weight(name: str, t: Any, std: float, gen: Any) -> None:
    """In place, in the order the parameters come: a norm's weight 1, the rest normal(0, std) from ``gen``."""
    if name.endswith("norm.weight") or "layernorm" in name:
        t.fill_(1.0)
    else:
        t.normal_(0.0, std, generator=gen)


def save_streamed(cfg: Any, out: Path, std: float, shard_bytes: int = 2 << 30) -> int:
    """The checkpoint random_bf16_model makes (the same values: one generator, the same order), written one tensor at
    a time into safetensors shards with their index, so that the process holds one tensor and never the model: a 7B
    checkpoint can be built on a machine with less memory than the checkpoint. Returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = list(model.named_parameters())  # tied parameters once, as save_pretrained writes them
    shards: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, p in params:
        nbytes = p.numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, p))
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for name, p in shard:
            t = torch.empty(p.shape, dtype=torch.bfloat16)
            init_weight(name, t, std, gen)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * 2
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.architectures = [type(model).__name__]  # what save_pretrained writes from the model
    cfg.save_pretrained(out)
    return sum(p.numel() for _, p in params)


def build_checkpoint(args: argparse.Namespace, out: Path) -> int:
    """A random bf16 Llama-form checkpoint: built on the meta device, materialised empty on the CPU, initialised in
    place, saved. Returns its parameter count."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        args.model_type, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=args.tied, bos_token_id=1, eos_token_id=2,
        dtype="bfloat16")
    if args.stream_build:
        n = save_streamed(cfg, out, std=0.02)
    else:
        model = random_bf16_model(cfg, std=0.02)
        model.save_pretrained(out)
        n = sum(p.numel() for p in model.parameters())
        del model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # a byte tokenizer: ids 0-255 of the wide vocabulary
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    return n


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass  # removed while we looked
    return total


# Linux keeps a process's RSS high-water mark across fork and exec (what the parent held when it forked is the
# child's floor), so a stage started straight from a large process (pytest or this script after torch) would report
# at least that process's RSS. A small fresh interpreter starts the stage and reports the stage's own peak.
LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_stage(cmd: list[str], workdir: Path, cwd: Path, log: Path) -> dict:
    """Run ``cmd`` as a child; its peak RSS (ru_maxrss of it and the children it waited for) and the most bytes
    ``workdir`` grew by while it ran."""
    base = dir_bytes(workdir)
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], dir_bytes(workdir))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        rss_file = log.with_suffix(".maxrss")
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(rss_file), *cmd], cwd=cwd, stdout=fh,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                    [str(cwd), *filter(None, [os.environ.get("PYTHONPATH")])])})
        sampler.start()
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], dir_bytes(workdir))
    rss = int(rss_file.read_text()) * 1024 if rss_file.is_file() else 0
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss": rss, "peak_disk_added": peak[0] - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="llama", help="the checkpoint's family (llama, mistral, qwen3, ...)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--intermediate", type=int, default=4864)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--tied", action="store_true", help="Tie the token table and the LM head.")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp16", help="Export dtype.")
    ap.add_argument("--export-method", choices=["auto", "traced", "stamped"], default="auto",
                    help="export --method (auto, left out of the command: the stamped export for this "
                         "Llama-form checkpoint, or whatever --repo's export does).")
    ap.add_argument("--stages", default="export,optimize,quantize")
    ap.add_argument("--level", type=int, default=3, help="optimize --level")
    ap.add_argument("--optimize", default="", help="optimize's further arguments (e.g. --check-form whole)")
    ap.add_argument("--quantize", default="--mode int4 --algo rtn --eval-tokens 256",
                    help="quantize's arguments (the quality report kept short by --eval-tokens)")
    ap.add_argument("--repo", type=Path, default=HERE, help="Checkout whose onnxpipe runs the stages.")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--hf-dir", type=Path, default=None, help="Reuse a checkpoint built by an earlier run.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    ap.add_argument("--stream-build", action="store_true",
                    help="write the checkpoint one tensor at a time (the memory of one tensor, not the model's)")
    ap.add_argument("--genai-ep", default="cpu", help="the execution provider GenAI's builder targets (stage genai)")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="measure-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = f"L{args.layers} h{args.hidden} i{args.intermediate} v{args.vocab}"
    hf = args.hf_dir or work / "hf"
    if args.hf_dir is None and not (hf / "config.json").exists():
        n = build_checkpoint(args, hf)
        print(f"built {hf}: {n / 1e6:.0f}M params, bf16 {dir_bytes(hf) / 1e9:.2f} GB", file=sys.stderr)
    exported, optimized, quantized = work / "exported", work / "optimized", work / "quantized"
    py = [sys.executable, "-m", "onnxpipe"]
    qsrc = optimized if "optimize" in args.stages.split(",") or (optimized / "onnxpipe.json").is_file() else exported
    stages = {
        "export": (py + ["export", str(hf), "-o", str(exported), "--dtype", args.dtype, "--force"]
                   + (["--method", args.export_method] if args.export_method != "auto" else []), hf, exported),
        "optimize": (py + ["optimize", str(exported), "-o", str(optimized), "--level", str(args.level), "--force",
                           *args.optimize.split()], exported, optimized),
        # from the optimized model where there is one, else the export (dynamic int8 takes an fp32 export)
        "quantize": (py + ["quantize", str(qsrc), "-o", str(quantized), *args.quantize.split(), "--force"],
                     qsrc, quantized),
        # the anchor: ONNX Runtime GenAI's model builder on the same checkpoint (fp16, fused), through the same launcher
        "genai": ([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(work / "genai"),
                   "-p", "fp16", "-e", args.genai_ep, "-c", str(work / "genai-cache")], hf, work / "genai"),
    }
    rows = []
    for name in args.stages.split(","):
        cmd, src, dst = stages[name]
        print(f"{name}: {' '.join(cmd[2:])}", file=sys.stderr)
        r = run_stage(cmd, work, args.repo, work / f"{name}.log")
        if r["rc"] != 0:
            tail = (work / f"{name}.log").read_text().strip().splitlines()[-1:]
            print(f"{name} failed (exit {r['rc']}): {tail}", file=sys.stderr)
        weights = _weight_bytes(dst if name == "export" else src)  # the ONNX weights the stage reads (or writes)
        label = f"{name} {args.optimize}".strip() if name == "optimize" else name
        rows.append({"shape": shape, "stage": label, "rc": r["rc"], "peak_rss_gb": r["peak_rss"] / 1e9,
                     "rss_x_weights": r["peak_rss"] / weights if weights else float("nan"),
                     "peak_disk_added_gb": r["peak_disk_added"] / 1e9, "input_gb": dir_bytes(src) / 1e9,
                     "output_gb": dir_bytes(dst) / 1e9 if dst.exists() else 0.0, "wall_s": r["wall_s"],
                     "weights_gb": weights / 1e9})
        if r["rc"] != 0:
            break
    head = ("shape", "stage", "peak RSS GB", "RSS/W", "peak disk added GB", "input GB", "output GB", "wall s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        status = "" if r["rc"] == 0 else f" (failed, exit {r['rc']})"
        lines.append(f"| {r['shape']} | {r['stage']}{status} | {r['peak_rss_gb']:.2f} | {r['rss_x_weights']:.2f} | "
                     f"{r['peak_disk_added_gb']:.2f} | {r['input_gb']:.2f} | {r['output_gb']:.2f} | {r['wall_s']:.0f} |")
    print("\n".join(lines))
    print(f"W = the ONNX weight bytes the stage reads (export: writes); workdir {work}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


def _weight_bytes(model_dir: Path) -> int:
    """Bytes of the ONNX model's files (graph + external data): the weights, to within the graph's size."""
    files = list(model_dir.glob("model.onnx*")) or list(model_dir.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


if __name__ == "__main__":
    main()
