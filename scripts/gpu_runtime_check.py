#!/usr/bin/env python3
"""The runtime on a real provider: greedy tokens against PyTorch, and what the KV cache costs per step.

    python scripts/gpu_runtime_check.py --provider cuda --out $OUT      # on the GPU machine (fp16)
    python scripts/gpu_runtime_check.py --provider cpu --size tiny      # here (fp32)

1. Builds a small Llama from a config (random weights, seeded) and exports it (fp16 on CUDA, fp32 on CPU).
2. Greedy tokens, free-running: onnxpipe (IO binding) vs transformers' generate on the same device and dtype, on a
   left-padded batch; and teacher-forced: argmax agreement of both over the same token sequences (one pass each), so
   an early fp16 tie does not hide the rest. PyTorch fp32 vs PyTorch in the same dtype is the yardstick.
3. The cache: where its OrtValues live, the bytes the runtime moves per step (up: ids/mask/positions; down: ids),
   onnxruntime's own Memcpy nodes in a profiled decode, and decode speed against the plain numpy path
   (session.run with numpy pasts, which ships the whole cache to the host and back every step).
Prints a table last; writes everything to OUT/gpu_runtime_check.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SIZES = {  # llama configs: "small" is ~150M parameters, "tiny" runs in seconds on a laptop CPU
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024),
}


def build(size: str, dtype: str, work: Path) -> tuple[Path, Path]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from onnxpipe.export import export_decoder

    hf, onnx_dir = work / f"hf-{size}", work / f"onnx-{size}-{dtype}"
    if not hf.exists():
        torch.manual_seed(0)
        # a wider init than the default 0.02 so logits are not near-uniform: greedy ties would say nothing
        cfg = AutoConfig.for_model("llama", **SIZES[size], initializer_range=0.1, bos_token_id=1, eos_token_id=2)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(hf)
    if not onnx_dir.exists():
        t = time.perf_counter()
        export_decoder(hf, onnx_dir, dtype=dtype, verify=False)
        print(f"exported {size} {dtype} in {time.perf_counter() - t:.1f}s", flush=True)
    return hf, onnx_dir


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def torch_greedy(model, batch: list[list[int]], new: int, device: str) -> list[list[int]]:
    import torch

    width = max(map(len, batch))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[:, width:].tolist()


def torch_argmax(model, seqs: list[list[int]], device: str) -> list[np.ndarray]:
    import torch

    res = []
    with torch.no_grad():
        for s in seqs:
            logits = model(torch.tensor([s], device=device)).logits[0].float()
            res.append(logits.argmax(-1).cpu().numpy())
    return res


def ort_argmax(session, manifest, seqs: list[list[int]], kv_dtype) -> list[np.ndarray]:
    m = manifest.model
    res = []
    for s in seqs:
        feed = {"input_ids": np.array([s]), "attention_mask": np.ones((1, len(s)), np.int64),
                "position_ids": np.arange(len(s))[None]}
        for i in range(manifest.num_layers):
            for name in manifest.past_names(i):
                feed[name] = np.zeros((1, m["num_kv_heads"], 0, m["head_dim"]), kv_dtype)
        res.append(session.run(["logits"], feed)[0][0].argmax(-1))
    return res


def first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def profile_decode(onnx_dir: Path, provider: str, batch: list[list[int]], new: int, out: Path) -> dict:
    """Run one generation with onnxruntime's profiler on; count the Memcpy nodes it ran and their bytes."""
    import onnxruntime as ort

    from onnxpipe.runtime.generate import LanguageModel
    from onnxpipe.runtime.session import DecoderSession

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(out / "ort_profile")
    so.log_severity_level = 3
    s = DecoderSession(onnx_dir, provider, session_options=so, announce=lambda m: None)
    LanguageModel(s, None).generate(batch, max_new_tokens=new, stop_token_ids=[])
    devices = sorted({v.device_name() for v in s.new_cache(1).values})
    path = s.session.end_profiling()
    events = json.loads(Path(path).read_text())
    copies = [e for e in events if e.get("cat") == "Node" and "Memcpy" in e.get("args", {}).get("op_name", "")
              and e.get("name", "").endswith("_kernel_time")]
    nbytes = sum(int(e["args"].get("output_size", 0)) for e in copies)
    runs = s.transfers.steps
    kv_bytes = _kv_bytes(s, len(batch), max(map(len, batch)) + new)
    return {"runs": runs, "memcpy_node_runs": len(copies), "memcpy_node_bytes": nbytes,
            "memcpy_ops": sorted({e["args"]["op_name"] for e in copies}),
            "memcpy_bytes_per_run": nbytes / max(runs, 1), "kv_cache_bytes_at_end": kv_bytes,
            "runtime_up_bytes_per_run": s.transfers.up_bytes / max(runs, 1),
            "runtime_down_bytes_per_run": s.transfers.down_bytes / max(runs, 1),
            "cache_device": devices, "profile_file": Path(path).name}


def _kv_bytes(s, batch: int, length: int) -> int:
    return 2 * s.manifest.num_layers * batch * s.num_kv_heads * length * s.head_dim * s.kv_dtype.itemsize


def decode_speed(onnx_dir: Path, provider: str, batch_size: int, prompt_len: int, new: int) -> dict:
    """Decode tokens/s: the runtime (IO binding, cache on the device) vs session.run with numpy pasts."""
    from onnxpipe.parity import ort_step_fn, position_ids_for
    from onnxpipe.runtime.generate import load

    lm = load(onnx_dir, provider, announce=lambda m: None)
    batch = prompts(lm.session.vocab_size, [prompt_len] * batch_size, seed=1)
    lm.generate(batch, max_new_tokens=4, stop_token_ids=[])  # warm-up
    t = time.perf_counter()
    lm.generate(batch, max_new_tokens=new, stop_token_ids=[])
    io_s = time.perf_counter() - t

    s = lm.session
    step = ort_step_fn(s.session, s.manifest)
    ids = np.array(batch)
    mask = np.ones_like(ids)
    past = [(np.zeros((batch_size, s.num_kv_heads, 0, s.head_dim), s.kv_dtype),) * 2 for _ in range(s.manifest.num_layers)]
    t = time.perf_counter()
    logits, past = step(ids, mask, position_ids_for(mask, ids.shape[1]), past)
    for _ in range(new - 1):
        nxt = logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((batch_size, 1), np.int64)], axis=1)
        logits, past = step(nxt, mask, position_ids_for(mask, 1), past)
    np_s = time.perf_counter() - t
    return {"batch": batch_size, "prompt": prompt_len, "new_tokens": new,
            "iobinding_tok_s": batch_size * new / io_s, "numpy_tok_s": batch_size * new / np_s,
            "speedup": np_s / io_s, "kv_bytes_at_end": _kv_bytes(s, batch_size, prompt_len + new)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cpu", "tensorrt", "auto"])
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("out/gpu_runtime_check"))
    ap.add_argument("--work", type=Path, default=None, help="where models are built (default: OUT/../work)")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from onnxpipe.runtime.generate import load

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path("/tmp/onnxpipe_gpu_runtime_check")
    work.mkdir(parents=True, exist_ok=True)
    cuda = args.provider != "cpu"
    dtype = "fp16" if cuda else "fp32"
    device = "cuda" if cuda else "cpu"
    hf, onnx_dir = build(args.size, dtype, work)
    results: dict = {"provider_requested": args.provider, "size": args.size, "dtype": dtype,
                     "versions": {"torch": torch.__version__}}
    import onnxruntime as ort

    results["versions"]["onnxruntime"] = ort.__version__
    if cuda:
        results["device"] = torch.cuda.get_device_name(0)

    lines: list[str] = []
    lm = load(onnx_dir, args.provider, announce=lines.append)
    results["provider_used"] = lm.provider
    results["provider_messages"] = lines
    batch = prompts(lm.session.vocab_size, [16, 9, 23, 5])
    ours = [r.token_ids for r in lm.generate(batch, max_new_tokens=args.new_tokens, stop_token_ids=[])]

    tdtype = torch.float16 if cuda else torch.float32
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=tdtype, attn_implementation="sdpa").to(device).eval()
    theirs = torch_greedy(ref, batch, args.new_tokens, device)
    ref32 = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="sdpa").to(device).eval()
    theirs32 = torch_greedy(ref32, batch, args.new_tokens, device)
    seqs = [p + t for p, t in zip(batch, theirs)]
    tf_ours = ort_argmax(lm.session.session, lm.manifest, seqs, lm.session.kv_dtype)
    tf_theirs = torch_argmax(ref, seqs, device)
    tf_32 = torch_argmax(ref32, seqs, device)
    results["greedy"] = {
        "new_tokens": args.new_tokens, "prompt_lengths": [len(p) for p in batch],
        "free_running_first_divergence_ort_vs_torch": [first_divergence(a, b) for a, b in zip(ours, theirs)],
        "free_running_equal_rows_ort_vs_torch": sum(a == b for a, b in zip(ours, theirs)),
        "free_running_first_divergence_torch_vs_torch_fp32": [first_divergence(a, b) for a, b in zip(theirs, theirs32)],
        "teacher_forced_agreement_ort_vs_torch": float(np.mean(np.concatenate([a == b for a, b in zip(tf_ours, tf_theirs)]))),
        "teacher_forced_agreement_torch_vs_torch_fp32": float(np.mean(np.concatenate([a == b for a, b in zip(tf_32, tf_theirs)]))),
        "teacher_forced_agreement_ort_vs_torch_fp32": float(np.mean(np.concatenate([a == b for a, b in zip(tf_ours, tf_32)]))),
    }
    del ref, ref32
    if cuda:
        torch.cuda.empty_cache()
    if cuda:  # what a TensorRT request turns into on this machine (no TensorRT libraries there): said, not silent
        trt_lines: list[str] = []
        try:
            trt = load(onnx_dir, "tensorrt", announce=trt_lines.append)
            results["tensorrt_request"] = {"used": trt.provider, "messages": trt_lines}
            del trt
        except Exception as e:  # record, do not stop the run
            results["tensorrt_request"] = {"error": str(e)[:300], "messages": trt_lines}
    results["copies"] = profile_decode(onnx_dir, args.provider, batch, 32, args.out)
    results["speed"] = [decode_speed(onnx_dir, args.provider, b, p, n)
                        for b, p, n in ([(1, 128, 64), (8, 512, 64)] if cuda else [(1, 32, 32), (4, 128, 32)])]
    (args.out / "gpu_runtime_check.json").write_text(json.dumps(results, indent=2))

    g, c = results["greedy"], results["copies"]
    print(f"\nprovider {results['provider_used']} ({'; '.join(lines)})  model {args.size} {dtype}  "
          f"{results.get('device', 'cpu')}  ort {ort.__version__} torch {torch.__version__}")
    print(f"greedy, free-running {args.new_tokens} tokens, rows equal to PyTorch {dtype}: "
          f"{g['free_running_equal_rows_ort_vs_torch']}/{len(batch)}; first divergence per row "
          f"{g['free_running_first_divergence_ort_vs_torch']} (PyTorch {dtype} vs fp32: {g['free_running_first_divergence_torch_vs_torch_fp32']})")
    print(f"greedy, teacher-forced argmax agreement: ORT vs PyTorch {dtype} {g['teacher_forced_agreement_ort_vs_torch']:.2%}, "
          f"PyTorch {dtype} vs fp32 {g['teacher_forced_agreement_torch_vs_torch_fp32']:.2%}, ORT vs fp32 {g['teacher_forced_agreement_ort_vs_torch_fp32']:.2%}")
    print(f"cache on {c['cache_device']}; per run: runtime up {c['runtime_up_bytes_per_run']:.0f} B, down "
          f"{c['runtime_down_bytes_per_run']:.0f} B; ORT Memcpy nodes {c['memcpy_node_runs']} runs / {c['runs']} runs "
          f"({c['memcpy_bytes_per_run']:.0f} B per run; ops {c['memcpy_ops']}); KV cache at the end {c['kv_cache_bytes_at_end']} B")
    if "tensorrt_request" in results:
        print(f"tensorrt requested -> {results['tensorrt_request']}")
    print("| batch | prompt | new | IO binding tok/s | numpy path tok/s | speedup | KV bytes at end |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results["speed"]:
        print(f"| {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['iobinding_tok_s']:.0f} | {r['numpy_tok_s']:.0f} | "
              f"{r['speedup']:.2f}x | {r['kv_bytes_at_end']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
