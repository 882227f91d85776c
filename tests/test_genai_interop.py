"""ONNX Runtime GenAI loads every stage's output (export, optimize level 3 for the CPU and for CUDA, dynamic int8,
int4) through the genai_config.json the stage wrote, and its greedy tokens equal onnxpipe's runtime's, at batch 1 and
for a padded batch of 2.

GenAI 0.18 masks only trailing pad tokens (it scans each row from the end; onnxpipe/genai_config.py), so its padded
batches are right-padded; a left-padded batch is tested for what holds there: the row with no padding.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from tiny import save_byte_tokenizer

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.genai_config import GENAI_CONFIG, genai_config

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the genai extra) is not installed")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 33, 9, 40, 41, 7], [8, 100, 3]]  # the second is the padded row of the batch
NEW = 12
EOS = 2  # the tiny models' eos_token_id (tests/tiny.py)
FORMS = ["export", "level3", "cuda", "int8", "int4"]


@pytest.fixture(scope="module")
def forms(tiny_hf: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import optimize_model
    from onnxpipe.quant import quantize_model
    from onnxpipe.quant.pipeline import QuantizeConfig

    root = tmp_path_factory.mktemp("genai")
    hf = root / "hf"
    shutil.copytree(tiny_hf("llama"), hf)
    save_byte_tokenizer(hf)
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    evaluation = root / "eval.txt"
    evaluation.write_text((REPO / "data" / "eval.txt").read_text()[:3000])
    out = {name: root / name for name in FORMS}
    export_decoder(hf, out["export"])
    optimize_model(out["export"], out["level3"], level=3)
    optimize_model(out["export"], out["cuda"], level=3, target="cuda")
    # a random-weight model is no language model: the quality gate is not what this test is about
    fields = {f.name for f in dataclasses.fields(QuantizeConfig)}
    ungated = {k: v for k, v in (("max_ppl_increase", 1e9), ("min_greedy_agreement", 0.0)) if k in fields}
    common = dict(eval_file=evaluation, eval_context=64, **ungated)
    quantize_model(out["export"], out["int8"], "dynamic", activations="tensor", **common)
    quantize_model(out["export"], out["int4"], "int4", algo="rtn", block_size=32, **common)
    return out


def _ours(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    from onnxpipe.runtime import load

    results = load(path, "cpu").generate(prompts, max_new_tokens=NEW, stop_token_ids=[])
    return [list(r.token_ids) for r in results]


def _genai(path: Path, prompts: list[list[int]], pad_side: str) -> list[list[int]]:
    """GenAI's greedy continuation of each prompt, cut after the first EOS (GenAI stops a row there)."""
    cfg = json.loads((path / GENAI_CONFIG).read_text())["model"]
    pad, eos = cfg["pad_token_id"], cfg["eos_token_id"]
    eos = set(eos) if isinstance(eos, list) else {eos}
    width = max(len(p) for p in prompts)
    rows = [p + [pad] * (width - len(p)) if pad_side == "right" else [pad] * (width - len(p)) + p for p in prompts]
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=width + NEW, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(rows, np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    out = []
    for i in range(len(prompts)):
        tokens = [int(t) for t in gen.get_sequence(i)][width:]
        stop = next((j for j, t in enumerate(tokens) if t in eos), None)
        out.append(tokens if stop is None else tokens[: stop + 1])
    return out


def _same(ours: list[int], theirs: list[int]) -> bool:
    """GenAI's tokens are ours: all NEW of them, or ours up to the EOS where GenAI stopped (ours ran on past it)."""
    ended = len(theirs) == NEW or (0 < len(theirs) < NEW and theirs[-1] == EOS)
    return ended and theirs == ours[: len(theirs)]


@pytest.mark.parametrize("form", FORMS)
def test_genai_greedy_tokens_equal_ours(forms: dict[str, Path], form: str) -> None:
    path = forms[form]
    assert (path / GENAI_CONFIG).is_file()
    ours = _ours(path, PROMPTS)
    assert ours == [_ours(path, [p])[0] for p in PROMPTS]  # our batch rows are our single rows
    for prompt, mine in zip(PROMPTS, ours):
        (theirs,) = _genai(path, [prompt], "right")
        assert _same(mine, theirs), (form, prompt, mine, theirs)
    right = _genai(path, PROMPTS, "right")
    assert all(_same(m, t) for m, t in zip(ours, right)), (form, ours, right)
    left = _genai(path, PROMPTS, "left")
    assert _same(ours[0], left[0]), (form, ours[0], left[0])  # the unpadded row; GenAI does not mask leading pads


def test_config_follows_the_manifest(forms: dict[str, Path]) -> None:
    export = json.loads((forms["export"] / GENAI_CONFIG).read_text())
    cuda = json.loads((forms["cuda"] / GENAI_CONFIG).read_text())
    dec = export["model"]["decoder"]
    md = ModelDir.open(forms["export"])
    assert dec["inputs"]["past_key_names"] == md.manifest.graph["kv"]["past_key"].replace("{i}", "%d")
    assert dec["num_key_value_heads"] == md.manifest.model["num_kv_heads"] == 2
    assert export["model"]["eos_token_id"] == 2 and export["model"]["context_length"] == 128
    assert export["search"]["past_present_share_buffer"] is False
    assert cuda["search"]["past_present_share_buffer"] is True  # the CUDA form's one preallocated KV buffer


def test_config_refuses_what_genai_cannot_read(forms: dict[str, Path]) -> None:
    manifest = ModelDir.open(forms["export"]).manifest
    manifest.graph["kv"]["layout"] = "BSNH"
    with pytest.raises(OnnxpipeError, match="KV layout"):
        genai_config(manifest)
    manifest.graph["kv"].update(layout="BNSH", past_key="past_key")
    with pytest.raises(OnnxpipeError, match="placeholder"):
        genai_config(manifest)


def test_genai_reads_leading_pads_as_tokens(forms: dict[str, Path]) -> None:
    """Why a left-padded batch differs in GenAI: its padded row is continued as if the pads were prompt tokens
    (GenAI masks only trailing pads), exactly as our runtime continues the pads + prompt given unpadded."""
    path = forms["export"]
    pad = json.loads((path / GENAI_CONFIG).read_text())["model"]["pad_token_id"]
    short = PROMPTS[1]
    as_tokens = [pad] * (len(PROMPTS[0]) - len(short)) + short
    left = _genai(path, PROMPTS, "left")
    assert _same(_ours(path, [as_tokens])[0], left[1])
    assert left[1] != _ours(path, [short])[0][: len(left[1])]


def test_optimum_check_refuses_the_cuda_form(forms: dict[str, Path]) -> None:
    """Optimum left-pads and grows its cache by concatenation: the CUDA form (right padding, one preallocated KV
    buffer) would load there and give wrong padded rows, so the interop check refuses it, saying why."""
    import runpy
    import subprocess
    import sys

    script = REPO / "scripts" / "check_optimum_interop.py"
    refusal = runpy.run_path(str(script))["refusal"]
    assert refusal(str(forms["export"])) is None and refusal(str(forms["int8"])) is None
    out = subprocess.run([sys.executable, str(script), str(forms["cuda"])], capture_output=True, text=True)
    assert out.returncode == 1 and "not for Optimum: the CUDA form" in out.stderr, out.stderr


def test_sliding_window_rows(tiny_onnx: Callable[..., Path], cuda_form: Callable[[str], Path]) -> None:
    """Mistral's window (5 in the tiny model) counts cache columns in the export's mask, and GenAI's right padding
    puts pad columns between a short prompt and its new tokens: that row leaves the window early. What holds: batch
    1, the unpadded row, and the CUDA form, whose attention places each row's tokens at its own length."""
    export, cuda = tiny_onnx("mistral"), cuda_form("mistral")
    ours = _ours(export, PROMPTS)
    for prompt, mine in zip(PROMPTS, ours):
        assert _same(mine, _genai(export, [prompt], "right")[0])
    right = _genai(export, PROMPTS, "right")
    assert _same(ours[0], right[0])
    assert not _same(ours[1], right[1])  # the padded row, past the window
    assert all(_same(m, t) for m, t in zip(_ours(cuda, PROMPTS), _genai(cuda, PROMPTS, "right")))


def test_gpt2_loads_as_a_generic_decoder(tiny_onnx: Callable[..., Path]) -> None:
    """GenAI's own "gpt2" model reads one combined past per layer; ours keeps keys and values apart, which its
    generic "decoder" reads (as "gpt2", loading fails: "Model input was not found")."""
    path = tiny_onnx("gpt2")
    assert json.loads((path / GENAI_CONFIG).read_text())["model"]["type"] == "decoder"
    ours = _ours(path, PROMPTS)
    right = _genai(path, PROMPTS, "right")
    assert all(_same(m, t) for m, t in zip(ours, right)), (ours, right)


@pytest.mark.parametrize("form", ["export", "int4"])
def test_genai_tokenizer_reads_the_carried_files(forms: dict[str, Path], form: str) -> None:
    """GenAI's tokenizer reads tokenizer.json and tokenizer_config.json, which every stage carries over."""
    from onnxpipe.runtime.generate import TextTokenizer

    text = "def fib(n):\n    return n"
    theirs = og.Tokenizer(og.Model(str(forms[form])))
    ours = TextTokenizer.from_dir(forms[form])
    assert ours is not None
    ids = ours.encode(text)
    assert [int(t) for t in theirs.encode(text)] == ids and theirs.decode(np.array(ids, np.int32)) == text
