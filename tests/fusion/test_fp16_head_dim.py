"""fp16 exports whose head_dim is not hidden_size / num_attention_heads: Gemma 3 1B's traits at test size.

The fp16 export computes each RMSNorm in fp32 with an fp32 weight and casts the result back. Fused as it stood,
the norm read fp16 x with an fp32 scale and returned fp32, which the Skip forms (gamma of the input's type) could
not take: ORT refused the norms pass, the q/k-norm stayed after the head transpose, and neither rotary nor attention
fused (Gemma 3 1B's shape: 0/N). norms.NormCastBack folds the Cast back into the norm, its scale cast to fp16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxpipe.export.exporter import export_decoder
from onnxpipe.fusion import optimize_model

# Gemma 3 1B (hidden 1152, 4 heads of 256, 1 kv head, query_pre_attn_scalar = head_dim, window < positions,
# 5 sliding layers to 1 full, tied embeddings) with the widths shrunk: 4 x 16 = 64 != hidden 48
GEMMA3_1B_LIKE = ("gemma3_text", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=256,
                                      max_position_embeddings=128, sliding_window=8, query_pre_attn_scalar=16,
                                      tie_word_embeddings=True))


@pytest.fixture(scope="module", params=[pytest.param(2, id="2-layers"),
                                        pytest.param(6, id="6-layers", marks=pytest.mark.slow)])
def gemma3_fp16(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The 1B-like model exported in fp16; 2 layers: one sliding, one full (layer_types set), 6: the 1B's 5 to 1."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    layers = request.param
    model_type, kwargs = GEMMA3_1B_LIKE
    kwargs = {**kwargs, "num_hidden_layers": layers}
    if layers == 2:
        kwargs["layer_types"] = ["sliding_attention", "full_attention"]
    root = tmp_path_factory.mktemp(f"gemma3_fp16_{layers}")
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kwargs, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0)
    assert config.layer_types.count("full_attention") == 1 and "sliding_attention" in config.layer_types
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    export_decoder(root / "hf", root / "onnx", dtype="fp16", verify=False)
    return root / "onnx", layers


def _passes(path: Path) -> dict[str, dict]:
    step = json.loads((path / "onnxpipe.json").read_text())["steps"][-1]
    assert step["check"]["passed"] and step["check"]["greedy_agreement"] == 1.0
    return {p["name"]: p for p in step["passes"]}


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_gemma3_1b_like_fp16_fuses_every_block(gemma3_fp16: tuple[Path, int], tmp_path: Path, target: str) -> None:
    exported, layers = gemma3_fp16
    out = tmp_path / target
    optimize_model(exported, out, level=3, target=target)  # every pass checked (fp16 tolerance)
    passes = _passes(out)
    for name in ("norms", "rotary", "attention"):
        assert passes[name]["status"] == "kept", (name, passes[name]["reason"])
        assert passes[name]["check"]["passed"], name
    assert passes["norms"]["fused"]["norms fused"] == f"{6 * layers + 1}/{6 * layers + 1}"  # 4 + q/k-norm per layer
    assert passes["norms"]["fused"]["skip forms"] == f"{2 * layers}/{2 * layers}"
    assert passes["rotary"]["fused"]["rotary fused"] == f"{2 * layers}/{2 * layers}"
    assert passes["attention"]["fused"]["attention blocks fused"] == f"{layers}/{layers}"
    if target == "cuda":  # the CUDA form: one preallocated KV buffer
        assert json.loads((out / "onnxpipe.json").read_text())["graph"]["kv"]["shares_buffer"] is True
