"""The quality gate: a default that chooses among candidates on held-out text and must pass on the report's text,
a failure that writes nothing and says how to accept it, the noisy verdict, and refusals of budgets and eval texts
that cannot give a verdict."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxpipe.cli import main
from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant import quantize_model
from onnxpipe.quant.quality import MIN_EVAL_TOKENS, Gate, change_interval, split_eval

sys.path.insert(0, str(Path(__file__).parent))

from test_cli_quantize import FAST, invoke, one_line_error  # noqa: E402


def test_split_eval_puts_the_report_first_and_the_selection_after_it() -> None:
    ids = np.arange(10_000)
    text = split_eval(ids, "eval.txt", 64, report_tokens=2000, select_tokens=1000)
    assert list(text.report_ids) == list(range(2000)) and list(text.select_ids) == list(range(2000, 3000))
    short = split_eval(ids[:1200], "eval.txt", 64, report_tokens=2000, select_tokens=1000)  # halved, disjoint
    assert list(short.report_ids) == list(range(600)) and list(short.select_ids) == list(range(600, 1200))
    assert split_eval(ids, "eval.txt", 64, report_tokens=300).select_ids is None
    with pytest.raises(OnnxpipeError, match=r"eval.txt: 250 tokens for the quality report, fewer than the 256 .*split "
                                            r"in two: the report's tokens, then those that choose"):
        split_eval(ids[:500], "eval.txt", 64, report_tokens=256, select_tokens=256)
    with pytest.raises(OnnxpipeError, match=r"eval.txt: 100 tokens for the quality report, fewer than the 256"):
        split_eval(ids[:100], "eval.txt", 64, report_tokens=8192)


def test_change_interval_matches_the_blocks_and_the_noisy_verdict() -> None:
    rng = np.random.default_rng(0)
    diff = rng.normal(0.01, 0.2, 4096)  # per-token NLL differences
    sums, counts = diff.reshape(64, 64).sum(1), np.full(64, 64.0)
    change, half = change_interval(sums, counts)
    assert change == pytest.approx((math.exp(diff.mean()) - 1) * 100)
    se = np.std(diff.reshape(64, 64).mean(1), ddof=1) / 8  # equal blocks: the standard error of their means
    assert half == pytest.approx(math.exp(diff.mean()) * 1.96 * se * 100, rel=1e-9)
    assert change_interval(sums[:1], counts[:1])[1] == math.inf

    gate = Gate(5.0)
    clear = gate.ppl_check(1.0, 0.3)
    assert clear.passed is True and "noisy" not in clear.verdict
    near = gate.ppl_check(4.6, 0.9)  # the interval reaches the budget: either verdict is possible
    assert near.passed is True and "noisy: its 95% interval is +3.70% to +5.50%" in near.verdict
    wide = Gate(2.0).ppl_check(0.2, 1.5)  # wider than half the budget
    assert wide.passed is True and "noisy" in wide.verdict
    over = gate.ppl_check(7.0, 0.5)
    assert over.passed is False and over.verdict.startswith("FAIL (above the budget of +5%)") and "noisy" not in over.verdict
    assert gate.greedy_check(0.5, 0.79, 68).passed is False and gate.greedy_check(0.5, 0.8, 68).passed is True


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0])
def test_a_budget_that_is_not_a_finite_percentage_is_refused_up_front(tok_model, small_eval: Path, tmp_path: Path,
                                                                      monkeypatch, budget: float) -> None:  # noqa: ANN001
    import onnxpipe.quant.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_run_mode", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(OnnxpipeError, match=r"--max-ppl-increase must be a finite number >= 0 \(percent\), got"):
        quantize_model(tok_model("llama"), tmp_path / "q", "int4", eval_file=small_eval, max_ppl_increase=budget)
    assert not (tmp_path / "q").exists()


def test_a_tiny_eval_text_is_refused(tok_model, tmp_path: Path) -> None:  # noqa: ANN001
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("def f(x):\n    return x + 1\n" * 4)  # ~100 byte-level tokens
    r = invoke("quantize", tok_model("llama"), "-o", tmp_path / "q", "--mode", "dynamic", "--activations", "tensor",
               "--eval", tiny)
    one_line_error(r, "tiny.txt: ", "tokens for the quality report, fewer than the 256 a verdict needs",
                   "longer --eval file")
    assert not (tmp_path / "q").exists()
    assert MIN_EVAL_TOKENS == 256


def test_a_pinned_choice_is_judged_alone_and_a_tight_budget_reads_noisy(tok_model, small_eval: Path,
                                                                        tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "q"
    r = invoke("quantize", tok_model("llama"), "-o", out, "--mode", "int4", "--algo", "rtn", "--block-size", "32",
               "--zero-points", "int", "--eval", small_eval, "--max-ppl-increase", "0.01", *FAST)
    assert r.exit_code == 0, r.output
    assert "choices" not in r.output  # nothing to choose: no selection text, no table
    assert "eval: 600 tokens of" in r.output
    step = json.loads((out / "onnxpipe.json").read_text())["steps"][-1]
    assert "choice" not in step and step["gate"]["passed"] is True
    line = next(ln for ln in r.output.splitlines() if "perplexity change:" in ln)
    q = step["quality"]
    assert q["ppl_change_pct"] < 0.01 and q["ppl_change_ci95_pct"] > 0.005  # this tiny model: within, but wide
    assert "pass (budget +0.01%); noisy: its 95% interval is" in line
    assert all(" -- " in ln for ln in r.output.splitlines() if ln.startswith("  ") and ": " in ln)  # every check judged


def _q4_1_grid(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An [out, in] weight on GGUF Q4_1-style grids, min + d * j per block of 32 inputs, with each block's minimum
    half a step off the integer grid through 0: integer zero points round every weight a second time."""
    out_f, in_f = w.shape
    j = rng.integers(0, 16, (out_f, in_f))
    j[:, 0::32], j[:, 1::32] = 0, 15
    d = rng.uniform(0.02, 0.06, (out_f, in_f // 32)).repeat(32, 1)
    steps_below_zero = np.floor(15 * rng.uniform(0.2, 0.8, (out_f, in_f // 32))).repeat(32, 1)
    return -(steps_below_zero + 0.5) * d + d * j


@pytest.fixture(scope="module")
def q4_1_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama with every body linear on a Q4_1-style grid and a sharpened output (final norm x8): the
    SmolLM2-135M case (weights dequantized from GGUF Q4_1) in small."""
    import torch
    from quant.conftest import save_byte_tokenizer
    from tiny import make_tiny_model
    from transformers import AutoModelForCausalLM

    from onnxpipe.export import export_decoder

    root = tmp_path_factory.mktemp("q4_1")
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", root / "random"))
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.weight.copy_(torch.tensor(_q4_1_grid(module.weight.numpy(), rng)))
        model.model.norm.weight.mul_(8.0)
    model.save_pretrained(root / "hf")
    save_byte_tokenizer(root / "hf")
    export_decoder(root / "hf", root / "onnx")
    return root / "onnx"


def test_int4_default_chooses_float_zero_points_where_integer_ones_fail(q4_1_model: Path, small_eval: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "q"
    r = invoke("quantize", q4_1_model, "-o", out, "--mode", "int4", "--eval", small_eval, *FAST)
    assert r.exit_code == 0, r.output
    step = json.loads((out / "onnxpipe.json").read_text())["steps"][-1]
    tried = step["choice"]["tried"]
    assert [t["choice"] for t in tried] == ["RTN, block 128, integer zero points", "RTN, block 32, integer zero points",
                                            "RTN, block 32, float zero points"]
    assert [t["verdict"] for t in tried] == ["greedy agreement collapsed", "greedy agreement collapsed",
                                             "within the budget: chosen"]
    assert step["choice"]["chosen"] == "RTN, block 32, float zero points" and step["choice"]["selection_tokens"] == 600
    assert step["params"]["algo"] == "rtn" and step["params"]["block_size"] == 32 and step["params"]["float_zero_points"]
    assert step["gate"]["passed"] and step["quality"]["greedy_agreement_ties"] >= 0.8
    assert tried[1]["greedy_agreement_ties"] < 0.8 and tried[1]["top1_agreement"] < 0.6  # the integer grid: broken
    assert "chose RTN, block 32, float zero points" in r.output and "choices are judged on the 600 tokens after" in r.output
    for t in tried:  # the table printed each choice as it was judged
        assert t["choice"] in r.output


def test_the_gate_fails_writing_nothing_and_names_the_best_and_how_to_accept_it(q4_1_model: Path, small_eval: Path,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "q"
    out.mkdir()
    (out / "onnxpipe.json").write_text("{}")  # an earlier output, which --force may replace
    (out / "keep.txt").write_text("old")
    args = ["quantize", q4_1_model, "-o", out, "--mode", "int4", "--algo", "rtn", "--zero-points", "int", "--eval",
            small_eval, "--force", *FAST]
    r = invoke(*args)
    one_line_error(r, "no int4 choice passed the gate on the selection text", "the best was RTN, block",
                   "nothing was written", "To accept it: --algo rtn --block-size", "--min-greedy-agreement ")
    assert (out / "keep.txt").read_text() == "old" and not list(tmp_path.glob(".onnxpipe-tmp-*"))
    accept = r.output.split("To accept it: ")[1].split()
    ok = invoke(*args, *accept)  # the named options, appended, pin the best and accept it
    assert ok.exit_code == 0, ok.output
    assert not (out / "keep.txt").exists() and (out / "onnxpipe.json").is_file()


def test_the_library_default_budget_is_the_modes(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    from test_modes import quantize

    md = quantize(tok_model("gpt2"), tmp_path / "q", "int4", small_eval, algo="rtn", block_size=32,
                  float_zero_points=False, max_eval_tokens=512)
    step = md.manifest.steps[-1]
    assert step["params"]["max_ppl_increase"] == 5.0 and step["gate"]["max_ppl_increase"] == 5.0
    assert step["params"]["max_eval_tokens"] == 512 and step["quality"]["eval_tokens"] < 512
    assert {c["verdict"].split(" ")[0] for c in step["gate"]["checks"]} <= {"pass", "recorded,"}


def test_the_report_runs_on_cuda_where_onnxruntime_has_it(monkeypatch) -> None:  # noqa: ANN001
    """The runtime's provider list decides; a graph optimized for the CPU's attention form stays on the CPU."""
    import onnxpipe.runtime.providers as providers
    from onnxpipe.quant.quality import eval_provider

    class Plain:
        graph = {"target": "cpu", "fused_ops": ["SkipSimplifiedLayerNormalization"]}

    class CpuAttention:
        graph = {"target": "cpu", "fused_ops": ["GroupQueryAttention"]}

    monkeypatch.setattr(providers, "available_providers", lambda: ["cuda", "cpu"])
    assert eval_provider(Plain()) == "cuda" and eval_provider(CpuAttention()) == "cpu"
    monkeypatch.setattr(providers, "available_providers", lambda: ["cpu"])
    assert eval_provider(Plain()) == "cpu"


def test_a_collapsed_greedy_agreement_fails_the_report_in_words(q4_1_model: Path, small_eval: Path,
                                                                 tmp_path: Path) -> None:
    """A pinned choice is judged on the report alone; integer zero points on Q4_1-style weights lose the decode
    path's greedy text (whatever their perplexity does on this random-weight model): a failed gate, said in words."""
    out = tmp_path / "q"
    args = ["quantize", q4_1_model, "-o", out, "--mode", "int4", "--algo", "rtn", "--block-size", "32",
            "--zero-points", "int", "--eval", small_eval, *FAST]
    r = invoke(*args)
    one_line_error(r, "failed the quality gate on the report text", "decode-path greedy agreement",
                   "FAIL: collapsed below 80%: the quantized model's greedy text parts from its input's",
                   "nothing was written", "To accept it: --min-greedy-agreement ")
    assert not out.exists()
    line = next(ln for ln in r.output.splitlines() if "decode-path greedy agreement:" in ln)
    assert "FAIL: collapsed" in line  # the report's own line says it too
    accept = r.output.split("To accept it: ")[1].split()
    assert invoke(*args, *accept).exit_code == 0


def test_a_choice_that_cannot_be_made_leaves_the_others(tok_model, small_eval: Path, tmp_path: Path,
                                                        monkeypatch) -> None:  # noqa: ANN001
    import onnxpipe.quant.rtn_stream as rtn_stream  # RTN with blocks: one weight at a time

    real = rtn_stream.quantize_rtn_streamed

    def no_block_128(model, plan, cfg, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if cfg.block_size == 128:
            raise OnnxpipeError("block 128 refused here")
        return real(model, plan, cfg, *a, **k)

    monkeypatch.setattr(rtn_stream, "quantize_rtn_streamed", no_block_128)
    out = tmp_path / "q"
    r = invoke("quantize", tok_model("llama"), "-o", out, "--mode", "int4", "--algo", "rtn", "--eval", small_eval, *FAST)
    assert r.exit_code == 0, r.output
    tried = json.loads((out / "onnxpipe.json").read_text())["steps"][-1]["choice"]["tried"]
    assert tried[0]["verdict"] == "could not be made: block 128 refused here"
    assert tried[1]["choice"] == "RTN, block 32, integer zero points" and tried[1]["verdict"].endswith("chosen")
    assert not [d for d in out.iterdir() if d.is_dir()]  # no choice's directory is left in the output


def test_eval_session_through_the_runtime_says_where_it_runs(tok_model) -> None:  # noqa: ANN001
    """provider "cuda" goes through runtime.providers.create_session; without CUDA it runs on the CPU and says so."""
    import onnxruntime as ort

    from onnxpipe.artifact import ModelDir
    from onnxpipe.quant.quality import eval_session, prefill_feed

    md = ModelDir.open(tok_model("llama"))
    session, used = eval_session(md.model_path, "cuda")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert used == "cpu"
    else:  # listed is not yet loadable: onnxruntime may fall back
        assert used in ("cuda", "cpu") and (used == "cuda") == ("CUDAExecutionProvider" in session.get_providers())
    logits = session.run([md.manifest.graph["logits"]], prefill_feed(md.manifest, np.arange(8)[None]))[0]
    assert logits.shape[:2] == (1, 8) and np.isfinite(logits).all()
