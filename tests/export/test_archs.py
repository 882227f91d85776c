"""Every supported model type: export with the parity check, the facts the manifest records, generate against
transformers' own greedy generate, and the refusals of what cannot take the export path.

The fast tier covers the types whose features are new to the path (soft-capping and alternating windows, two rope
bases, parallel blocks with partial rotary, layers without rope, multipliers, fused query_key_value) and one type
outside the registry; `pytest -m slow` covers the rest of the registry.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.export import archs, exporter
from onnxpipe.parity import empty_past, ort_step_fn, position_ids_for
from onnxpipe.runtime.sessions import reference_session
from onnxpipe.runtime import load
from tiny import TINY_CONFIGS
from tiny_archs import ARCH_CONFIGS, WINDOW, make_arch_model

FAST = ("gemma2", "gemma3_text", "phi", "smollm3", "granite", "falcon")
# tests/test_export.py exports tests/tiny.py's six in its fast tier already
EXPORT_ELSEWHERE = tuple(TINY_CONFIGS)


def _types(fast: tuple[str, ...], skip: tuple[str, ...] = ()) -> list:
    return [t if t in fast else pytest.param(t, marks=pytest.mark.slow)
            for t in archs.SUPPORTED_MODEL_TYPES if t not in skip]


# what describe() must read for each type from its config and modules (a subset of the manifest's model facts)
EXPECTED_FACTS: dict[str, dict] = {
    "gemma": {"mlp": "geglu", "norm": "rmsnorm", "tie_word_embeddings": True, "sliding_window": None},
    "gemma2": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"], "norms_per_layer": 4,
               "softcapping": {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 5.0}},
    "gemma3_text": {"qk_norm": True, "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"],
                    "rope": {"per_layer_type": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}},
    "granite": {"mlp": "swiglu", "attention": "gqa"},
    "olmo2": {"qk_norm": True, "norms_per_layer": 2},
    "stablelm": {"norm": "layernorm", "rope": {"rotary_dim": 4}},
    "phi": {"norms_per_layer": 1, "qkv_bias": True, "mlp": "gelu", "attention": "mha", "rope": {"rotary_dim": 8}},
    "gpt_neox": {"fused_qkv": True, "norm": "layernorm", "rope": {"rotary_dim": 4}},
    "starcoder2": {"sliding_window": WINDOW, "layer_types": ["sliding_attention"] * 2, "norm": "layernorm"},
    "smollm3": {"rope": {"layers": [0]}, "mlp": "swiglu"},
    "falcon": {"fused_qkv": True, "norm": "layernorm", "positions": "rope"},
    "mixtral": {"experts": {"num": 4, "top_k": 2}, "mlp": "swiglu"},
    "qwen3_moe": {"experts": {"num": 4, "top_k": 2}, "qk_norm": True},
    "gpt_oss": {"experts": {"num": 4, "top_k": 2}, "attention_sinks": True, "sliding_window": WINDOW,
                "layer_types": ["sliding_attention", "full_attention"]},
    "gpt2": {"positions": "learned", "fused_qkv": True, "attention": "mha"},
    "llama": {"positions": "rope", "rope": {"type": "llama3"}, "attention": "gqa"},
    "mistral": {"sliding_window": 5},
    "qwen2": {"qkv_bias": True, "sliding_window": None},
    "qwen3": {"qk_norm": True},
    "phi3": {"fused_qkv": True},
}


def _subset(expected: dict, got: dict) -> None:
    for key, want in expected.items():
        assert key in got, key
        if isinstance(want, dict):
            _subset(want, got[key])
        else:
            assert got[key] == want, (key, got[key], want)


def test_every_supported_type_has_a_config_and_a_test():
    """The registry test: a type added to archs.SUPPORTED without a tiny config and expected facts fails here."""
    assert set(TINY_CONFIGS).isdisjoint(ARCH_CONFIGS)
    assert set(TINY_CONFIGS) | set(ARCH_CONFIGS) == set(archs.SUPPORTED)
    assert set(EXPECTED_FACTS) == set(archs.SUPPORTED)
    assert set(FAST) <= set(ARCH_CONFIGS)


@pytest.mark.parametrize("model_type", _types(FAST, skip=EXPORT_ELSEWHERE))
def test_export_passes_parity(arch_onnx, model_type):
    md = ModelDir.open(arch_onnx(model_type))
    check = md.manifest.steps[-1]["check"]
    assert check["passed"] is True and check["rel_err"] <= 1e-4
    assert check["batch"] == 2 and len(set(check["prompt_lengths"])) > 1 and check["decode_steps"] >= 3
    # the longer prompt plus its decode steps reaches past a sliding window of 4
    assert max(check["prompt_lengths"]) + check["decode_steps"] > 2 * WINDOW
    model = md.manifest.model
    assert model["model_type"] == model_type and model["tested"] is True
    _subset(EXPECTED_FACTS[model_type], model)


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=pytest.mark.slow) for t in EXPORT_ELSEWHERE])
def test_facts_of_the_first_six(arch_onnx, model_type):
    _subset(EXPECTED_FACTS[model_type], ModelDir.open(arch_onnx(model_type)).manifest.model)


# ---- generate equals transformers ----

PROMPTS = [[5, 9, 12, 3, 7, 100, 20], [44, 3, 9]]  # 7 > WINDOW tokens, and a short one that decodes past it
NEW = 10


def _hf_eager(path):
    """The reference: transformers' eager attention, the form every attention feature is written in."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _hf_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    eos = model.generation_config.eos_token_id
    rows = []
    for r in out[:, width:].tolist():
        if eos in r:
            r = r[: r.index(eos) + 1]
        rows.append(r)
    return rows


@pytest.mark.parametrize("model_type", _types(FAST))
def test_greedy_generate_equals_transformers(arch_hf, arch_onnx, model_type):
    lm = load(arch_onnx(model_type), "cpu")
    hf = _hf_eager(arch_hf(model_type))
    singles = [lm.generate(p, max_new_tokens=NEW).token_ids for p in PROMPTS]
    batch = [r.token_ids for r in lm.generate(PROMPTS, max_new_tokens=NEW)]
    hf_singles = [_hf_greedy(hf, [p], NEW)[0] for p in PROMPTS]
    assert singles == hf_singles
    assert batch == _hf_greedy(hf, PROMPTS, NEW) == hf_singles
    assert len(PROMPTS[1]) + len(singles[1]) > WINDOW + 1 or singles[1][-1] == 2  # decoded past the window


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", pytest.param("starcoder2", marks=pytest.mark.slow)])
def test_the_window_is_what_the_tests_check(arch_hf, arch_onnx, model_type):
    """The test prompts reach past the sliding window: transformers' logits change when the window is widened, and
    the export's prefill logits follow the windowed model, not the widened one."""
    hf = _hf_eager(arch_hf(model_type))
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        windowed = hf(input_ids=ids).logits[0].numpy()
        hf.config.sliding_window = 1000  # the mask is built from the config at each forward
        widened = hf(input_ids=ids).logits[0].numpy()
    assert np.abs(windowed - widened).max() > 1e-3
    md = ModelDir.open(arch_onnx(model_type))
    step = ort_step_fn(reference_session(md.model_path), md.manifest)
    mask = np.ones((1, len(PROMPTS[0])), np.int64)
    logits, _ = step(ids.numpy(), mask, position_ids_for(mask, ids.shape[1]), empty_past(md.manifest, 1, np.float32))
    assert np.abs(logits[0] - windowed).max() <= 1e-4 * np.abs(windowed).max()


def test_softcaps_are_exported(arch_hf, arch_onnx):
    """Gemma 2's attention and final-logit soft-capping are in the graph: the export's logits equal transformers'
    eager forward, and differ both from the sdpa forward (which drops the attention cap) and from the uncapped
    logits."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([PROMPTS[0]])
    hf = _hf_eager(arch_hf("gemma2"))
    with torch.no_grad():
        eager = hf(input_ids=ids).logits[0].numpy()
        sdpa = AutoModelForCausalLM.from_pretrained(arch_hf("gemma2"), dtype=torch.float32,
                                                    attn_implementation="sdpa").eval()(input_ids=ids).logits[0].numpy()
        hf.config.final_logit_softcapping = None
        uncapped = hf(input_ids=ids).logits[0].numpy()
    scale = np.abs(eager).max()
    assert np.abs(sdpa - eager).max() > 1e-2 * scale
    assert np.abs(uncapped - eager).max() > 1e-2 * scale
    md = ModelDir.open(arch_onnx("gemma2"))
    mask = np.ones((1, ids.shape[1]), np.int64)
    step = ort_step_fn(reference_session(md.model_path), md.manifest)
    logits, _ = step(ids.numpy(), mask, position_ids_for(mask, ids.shape[1]), empty_past(md.manifest, 1, np.float32))
    assert np.abs(logits[0] - eager).max() <= 1e-4 * scale


# ---- the generic path and its refusals ----

def test_an_untested_type_takes_the_generic_path(tmp_path):
    """olmo is not in the registry: built on the same interfaces, it exports with the parity check all the same."""
    hf = tmp_path / "hf"
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("olmo", **ARCH_CONFIGS["olmo2"])).save_pretrained(hf)
    assert "olmo" not in archs.SUPPORTED
    md = exporter.export_decoder(hf, tmp_path / "out").model_dir
    assert md.manifest.model["tested"] is False and md.manifest.model["family"] == "olmo"
    assert md.manifest.steps[-1]["check"]["passed"] is True


def _config_dir(tmp_path, cfg: dict):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"")
    return d


@pytest.mark.parametrize("cfg, missing", [
    ({"model_type": "t5"}, "not a causal LM"),
    ({"model_type": "bart"}, "encoder-decoder"),
    ({"model_type": "bert"}, "encoder (masked-LM)"),
    ({"model_type": "mamba"}, "recurrent layers"),
    ({"model_type": "jamba"}, "recurrent layers (mamba)"),
    ({"model_type": "qwen3_next"}, "recurrent layers (linear_attention)"),
    ({"model_type": "recurrent_gemma"}, "recurrent layers (recurrent)"),
    ({"model_type": "rwkv"}, "no attention heads"),
    ({"model_type": "llama4_text"}, "chunked_attention"),
    ({"model_type": "gemma3n_text"}, "share another layer's KV cache"),
    ({"model_type": "no_such_type"}, "not a causal LM"),
    ({"hidden_size": 64}, "no model_type"),
])
def test_refusal_names_what_is_missing_and_the_supported_list(tmp_path, cfg, missing):
    with pytest.raises(OnnxpipeError) as e:
        exporter.export_decoder(_config_dir(tmp_path, cfg), tmp_path / "out")
    text = str(e.value)
    assert missing in text and "\n" not in text
    assert text.endswith("; supported: " + ", ".join(archs.SUPPORTED_MODEL_TYPES))
    assert not (tmp_path / "out").exists()


def test_cli_refusal_is_one_line(tmp_path):
    from click.testing import CliRunner

    from onnxpipe.cli import main

    result = CliRunner().invoke(main, ["export", str(_config_dir(tmp_path, {"model_type": "mamba"})), "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "recurrent layers" in lines[0] and "Traceback" not in result.output


class _NoCacheModel(torch.nn.Module):
    """A causal LM that returns no DynamicCache (the form recurrent models take)."""

    def __init__(self, returns):
        super().__init__()
        from transformers import LlamaConfig

        self.config = LlamaConfig(num_hidden_layers=2)
        self._returns = returns

    def forward(self, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(logits=None, past_key_values=self._returns)


def test_a_model_without_a_kv_cache_is_refused_before_tracing():
    with pytest.raises(OnnxpipeError, match="no KV cache in transformers' DynamicCache form"):
        archs.probe_cache(_NoCacheModel(returns=None))
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), 0)  # one layer's cache for two layers
    with pytest.raises(OnnxpipeError, match="a cache of 1 layers"):
        archs.probe_cache(_NoCacheModel(returns=cache))


def test_attention_implementation_keeps_soft_capping():
    assert archs.attention_implementation({"model_type": "gemma2"}) == "eager"  # the class default cap (50) counts
    assert archs.attention_implementation({"model_type": "gemma2", "attn_logit_softcapping": None}) == "sdpa"
    assert archs.attention_implementation({"model_type": "llama"}) == "sdpa"
