"""bench_gpu.py's model and builds, each run in a child process of its own: the random-weight HF directory and
the device's ceilings (setup), onnxpipe's export -> optimize (and int4) and GenAI's builder. A child reports
through emit(): one line on stdout starting with RESULT, which bench_gpu.py's orchestrator reads."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

# gpt-oss's rope as released (YaRN); GenAI's builder asserts on smaller original lengths
GPT_OSS_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096,
                    rope_theta=150000.0, truncate=False)

SHAPES = {  # Llama-3.2-1B's dimensions (random weights); GPT-2 small's; tiny runs in seconds on a laptop CPU
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=4096,
                     tie_word_embeddings=True),
    # issue #17's generate rows: Llama-3-8B's dimensions (untied head); build its checkpoint with
    # scripts/measure_scale.py (bf16, never fp32) and pass --reuse with the same --work
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=4096,
                      tie_word_embeddings=False),
    "gpt2-small": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    # issue #18's GPU rows: Gemma 3 1B's dimensions (5 local layers of window 512 to 1 global, two rope bases) and a
    # small Qwen3-MoE (32 experts, top 4; ~1.1B parameters, ~0.3B active), with tiny forms for a CPU smoke test
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                      max_position_embeddings=4096, sliding_window=512, query_pre_attn_scalar=256,
                      tie_word_embeddings=True),
    "qwen3-moe-small": dict(model_type="qwen3_moe", hidden_size=1024, intermediate_size=3072, moe_intermediate_size=768,
                            num_experts=32, num_experts_per_tok=4, num_hidden_layers=12, num_attention_heads=16,
                            num_key_value_heads=4, head_dim=64, vocab_size=151936, max_position_embeddings=4096,
                            norm_topk_prob=True, tie_word_embeddings=False),
    # gpt-oss's layout (attention sinks, windows of 128 on alternate layers, YaRN rope as released, experts with
    # biases and clamped SwiGLU) at a small width: 12 layers, hidden 1024, 32 experts of width 768, top 4
    "gpt-oss-small": dict(model_type="gpt_oss", hidden_size=1024, intermediate_size=768, num_local_experts=32,
                          num_experts_per_tok=4, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                          head_dim=64, vocab_size=201088, max_position_embeddings=131072, sliding_window=128,
                          rope_parameters=GPT_OSS_ROPE,
                          tie_word_embeddings=False),
    "gpt-oss-tiny": dict(model_type="gpt_oss", hidden_size=128, intermediate_size=64, num_local_experts=8,
                         num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, vocab_size=4096, max_position_embeddings=131072, sliding_window=16,
                         rope_parameters=GPT_OSS_ROPE,
                         tie_word_embeddings=False),
    "gemma3-tiny": dict(model_type="gemma3_text", hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=4096,
                        max_position_embeddings=1024, sliding_window=64, query_pre_attn_scalar=32,
                        tie_word_embeddings=True),
    "qwen3-moe-tiny": dict(model_type="qwen3_moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                           num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, vocab_size=4096, max_position_embeddings=1024,
                           norm_topk_prob=True, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024, tie_word_embeddings=True),
}


def dims(shape: str) -> dict:
    """layers, KV heads and head size of a SHAPES entry, whatever its config calls them."""
    sh = SHAPES[shape]
    if sh.get("model_type") == "gpt2":
        return {"layers": sh["n_layer"], "kv_heads": sh["n_head"], "head_dim": sh["n_embd"] // sh["n_head"]}
    return {"layers": sh["num_hidden_layers"], "kv_heads": sh["num_key_value_heads"],
            "head_dim": sh.get("head_dim", sh["hidden_size"] // sh["num_attention_heads"])}


RESULT = "@@RESULT "


def emit(kind: str, **fields) -> None:
    print(RESULT + json.dumps({"kind": kind, **fields}), flush=True)


def child_setup(spec: dict) -> None:
    """Build the HF directory (random weights, made on the device) and measure the two ceilings."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    dev, dtype = spec["device"], getattr(torch, spec["torch_dtype"])
    hf = Path(spec["hf"])
    if spec.get("reuse") and (hf / "config.json").is_file():
        # a checkpoint an earlier run built (measure_scale.py's bf16 one at 8B): count it from its safetensors headers
        params = 0
        for f in sorted(hf.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            params += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        emit("setup", params=params, weight_bytes=2 * params, build_s=0.0, reused=str(hf), **ceilings(dev, dtype))
        return
    torch.manual_seed(0)
    # a wider init than the default 0.02 so logits are not near-uniform: greedy ties would say nothing
    sh = dict(SHAPES[spec["shape"]])
    cfg = AutoConfig.for_model(sh.pop("model_type", "llama"), **sh, initializer_range=0.1, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0)
    t = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(hf)
    # a small word-level tokenizer: the GenAI builder and the exporter want tokenizer files; ids are fed directly
    vocab = {f"t{i}": i for i in range(256)}
    vocab["<unk>"] = 256
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(hf)
    build_s = time.perf_counter() - t
    del model
    emit("setup", params=params, weight_bytes=weight_bytes, build_s=round(build_s, 1), **ceilings(dev, dtype))


def ceilings(dev: str, dtype) -> dict:
    """Device copy bandwidth (bytes read + written) and dense matmul rate, measured here."""
    import torch

    if dev == "cpu":
        x = torch.randn((64 << 20) // 4)
        y = torch.empty_like(x)
        t = time.perf_counter()
        for _ in range(5):
            y.copy_(x)
        return {"copy_bw_GBs": 2 * x.nbytes * 5 / (time.perf_counter() - t) / 1e9, "matmul_TFLOPs": None}
    n = 1 << 30  # 2 GiB of fp16 per buffer
    x = torch.randn(n, device=dev, dtype=torch.float16)
    y = torch.empty_like(x)
    bw = [_event_ms(lambda: y.copy_(x)) for _ in range(20)]
    del x, y
    a = torch.randn(8192, 8192, device=dev, dtype=dtype)
    b = torch.randn(8192, 8192, device=dev, dtype=dtype)
    mm = [_event_ms(lambda: a @ b) for _ in range(20)]
    del a, b
    torch.cuda.empty_cache()
    bw_ms, mm_ms = statistics.median(bw[3:]), statistics.median(mm[3:])
    return {"copy_bw_GBs": 2 * n * 2 / (bw_ms / 1e3) / 1e9, "matmul_TFLOPs": 2 * 8192**3 / (mm_ms / 1e3) / 1e12,
            "gpu": torch.cuda.get_device_name(0)}


def _event_ms(fn) -> float:
    import torch

    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def _reused(spec: dict, key: str, stage: str, marker: str = "onnxpipe.json") -> bool:
    """With --reuse, a build an earlier call made (measure_scale.py's, timed there) is taken as it is."""
    if spec.get("reuse") and (Path(spec[key]) / marker).is_file():
        emit("build", stage=stage, seconds=0.0, reused=spec[key])
        return True
    return False


def child_build_onnxpipe(spec: dict) -> None:
    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import optimize_model

    if _reused(spec, "optimized", "optimize"):
        return
    t = time.perf_counter()
    export_decoder(spec["hf"], spec["exported"], dtype=spec["dtype"], verify=False, force=True)
    export_s = time.perf_counter() - t
    emit("build", stage="export", seconds=round(export_s, 1))
    op_check = "this onnxruntime's kernel registry"
    if spec["target"] == "cuda":
        # onnxruntime-gpu 1.31.1 on the device segfaulted in get_all_opkernel_def() (which optimize's target-op
        # check calls) right after failing to load the TensorRT provider library: use optimize's documented CUDA
        # op list instead, the path it takes for --target cuda --skip-verify without a CUDA EP.
        from onnxpipe.fusion import pipeline

        pipeline.supported_ops = lambda target: None
        op_check = "documented CUDA op list (kernel registry query crashes here)"
    t = time.perf_counter()
    res = optimize_model(spec["exported"], spec["optimized"], level=3, target=spec["target"], verify=False,
                         force=True, log=lambda m: print(m, flush=True))
    g = res.model_dir.manifest.graph
    emit("build", stage="optimize", seconds=round(time.perf_counter() - t, 1), fused_ops=g.get("fused_ops"),
         op_check=op_check,
         shares_buffer=g["kv"].get("shares_buffer"), padding_side=g.get("padding_side"),
         passes={p.name: {"status": p.status, **{k: str(v) for k, v in p.fused.items()}} for p in res.passes})


def child_build_onnxpipe_int4(spec: dict) -> None:
    """int4 weights (symmetric RTN, block 32, MatMulNBits without zero points, fp16 scales and activations, LM head
    included, as GenAI's int4 does) from the
    optimized fp16 CUDA form; waits for that build. Its quality report runs on the CPU over a short eval text."""
    from onnxpipe.quant import quantize_model

    if _reused(spec, "int4", "onnxpipe_int4"):
        return
    deadline = time.time() + 400
    while not (Path(spec["optimized"]) / "onnxpipe.json").is_file():
        if time.time() > deadline:
            emit("build", stage="onnxpipe_int4", error="the optimized model never appeared")
            return
        time.sleep(2)
    t = time.perf_counter()
    res = quantize_model(spec["optimized"], spec["int4"], "int4", force=True, algo="rtn", block_size=32,
                         symmetric=True, lm_head="int4", max_eval_tokens=256,
                         # random weights do not survive int4: this build is timed, its quality is not judged
                         max_ppl_increase=1e9, min_greedy_agreement=0.0, log=lambda m: print(m, flush=True))
    q = res.step.get("quality", {})
    emit("build", stage="onnxpipe_int4", seconds=round(time.perf_counter() - t, 1),
         size_MB=round(q.get("size_after", 0) / 1e6, 1), ppl_change_pct=q.get("ppl_change_pct"))


def child_build_genai(spec: dict, stage: str = "genai") -> None:
    import importlib.util

    if _reused(spec, "genai", stage, "genai_config.json"):
        return
    found = importlib.util.find_spec("onnxruntime_genai")
    if found is None:
        emit("build", stage=stage, error="onnxruntime_genai is not installed")
        return
    builder = Path(found.origin).parent / "models" / "builder.py"
    t = time.perf_counter()
    cmd = [sys.executable, str(builder), "-i", spec["hf"], "-o", spec["genai"], "-p", spec["genai_precision"],
           "-e", spec["genai_ep"], "-c", spec["genai"] + "-cache"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        emit("build", stage=stage, error=(p.stderr or p.stdout).strip().splitlines()[-1][:300] if (p.stderr or p.stdout).strip() else f"rc {p.returncode}")
        return
    emit("build", stage=stage, seconds=round(time.perf_counter() - t, 1), command=" ".join(cmd[1:]))


