"""Memory and disk of export -> optimize -> quantize on a model of a few hundred MB, each stage in a child process:
peak RSS (the child's ru_maxrss) and the most bytes the work directory grew by while it ran, against bounds
measured with headroom (docs/benchmarks.md, "Scale: memory and disk"). The optimize run carries a planted faulty
rule (it doubles one layer's down projection): its per-pass check must roll it back with its numbers at this size.
quantize runs as a 7-8B model's does (checks layer by layer); a quantization with a planted fault (one layer's int4
scales x64) must be refused by the default gate that the sound run's figures pass.

W is the fp32 weight bytes of the model (~250 MB): 2 layers, hidden 768, vocabulary 32000, untied head.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny import save_byte_tokenizer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
# one way to measure a stage: the script's
from measure_scale import dir_bytes as _dir_bytes  # noqa: E402
from measure_scale import run_stage  # noqa: E402

pytestmark = pytest.mark.slow

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
             eos_token_id=2)

# Bounds, as multiples of W, measured on the 2-core CPU (docs/benchmarks.md, "Scale: memory and disk"):
# optimize 2.81x (690a4b7: 6.75x; per-pass snapshots kept as serialized copies, two sessions at once, prepacking);
# export 6.18x, not changed here: its bound guards against a regression. quantize (int4 rtn block 32 and dynamic
# int8 per token, checks layer by layer): 2.59x and 2.56x (before: 6.03x, whole-model sessions side by side); its
# peak is now the 8-bit vocabulary tables of this fp32 input (the head and token table, 40% of W here, read and
# rewritten before the write), the checks 1.6x (0.40 GB, of which ~0.11 GB libraries).
OPTIMIZE_RSS_X = 3.2  # ~0.14 GB of libraries + the weights (parsed once: 2x while loading) + one check session
OPTIMIZE_DISK_SLACK = 0.10  # optimize's peak added disk <= its output + 10% of input + output: no snapshots on disk
EXPORT_RSS_X = 7.0
QUANTIZE_RSS_X = 3.0
QUANTIZE_RUNS = {"quantized": ["--mode", "int4", "--algo", "rtn", "--block-size", "32", "--zero-points", "int"],
                 "dynamic": ["--mode", "dynamic", "--activations", "token"]}

PLANTED = r"""
import json, sys
SHAPE = {SHAPE!r}
import numpy as np
import onnx_ir as ir
from onnxpipe.fusion import optimize_model, pipeline

def double_down_proj(model, ctx):  # the last [intermediate, hidden] weight: layer 1's down projection
    v = [v for v in model.graph.initializers.values() if v.const_value is not None
         and tuple(v.const_value.shape) == (SHAPE["intermediate_size"], SHAPE["hidden_size"])][-1]
    v.const_value = ir.tensor(np.asarray(v.const_value.numpy()) * 2, name=v.name)
    return {"doubled": v.name}

pipeline.PASSES = (pipeline.FusionPass("planted_fault", 1, double_down_proj, "doubles a weight"),) + pipeline.PASSES
pipeline.PASS_NAMES = ("planted_fault",) + pipeline.PASS_NAMES
names = ["planted_fault"] + [p.name for p in pipeline.select_passes(3, None)]
result = optimize_model(sys.argv[1], sys.argv[2], passes=names, log=lambda m: print(m, file=sys.stderr))
json.dump({"passes": [r.to_json() for r in result.passes], "final": result.check.to_json()}, open(sys.argv[3], "w"))
""".replace("{SHAPE!r}", repr(SHAPE))

# quantize with a planted fault (layer 0's down projection's int4 scales x64 after streamed RTN), checks layer by
# layer, the default gate: it must refuse (exit 3) and write nothing
PLANTED_QUANTIZE = r"""
import sys
import numpy as np
import onnx_ir as ir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant import quantize_model, rtn_stream

real = rtn_stream.quantize_rtn_streamed

def broken(model, plan, cfg, progress=None):
    details = real(model, plan, cfg, progress)
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    widest = max(n.attributes["K"].value for n in nbits)  # the down projections read the MLP's width
    scales = [n for n in nbits if n.attributes["K"].value == widest][0].inputs[2]
    scales.const_value = ir.tensor(np.asarray(scales.const_value.numpy()) * 64, name=scales.name)
    return details

rtn_stream.quantize_rtn_streamed = broken
try:
    quantize_model(sys.argv[1], sys.argv[2], "int4", algo="rtn", block_size=32, float_zero_points=False,
                   max_eval_tokens=256, check_form="layerwise", log=lambda m: print(m, file=sys.stderr))
except OnnxpipeError as e:
    print(f"onnxpipe: error: {e}", file=sys.stderr)
    sys.exit(3)
"""


def _measure(cmd: list[str], workdir: Path) -> dict:
    """Run ``cmd`` as scripts/measure_scale.py runs a stage (through its small launcher, so the stage's own peak RSS
    is read); its exit status, peak RSS in bytes, the most bytes ``workdir`` grew by while it ran, and its output."""
    log = workdir.parent / f"{workdir.name}-stage{len(list(workdir.parent.glob('*.log')))}.log"
    run = run_stage(cmd, workdir, REPO, log)
    return {"rc": run["rc"], "rss": run["peak_rss"], "disk": run["peak_disk_added"], "output": log.read_text()}


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    work = tmp_path_factory.mktemp("scale")
    hf = work / "hf"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SHAPE)).save_pretrained(hf)
    save_byte_tokenizer(hf)
    py = [sys.executable, "-m", "onnxpipe"]
    runs = {"export": _measure(py + ["export", str(hf), "-o", str(work / "exported")], work)}
    assert runs["export"]["rc"] == 0, runs["export"]["output"][-2000:]
    print(f"export: rss {runs['export']['rss'] / 1e6:.0f} MB, disk {runs['export']['disk'] / 1e6:.0f} MB",
          file=sys.stderr)
    runs["optimize"] = _measure([sys.executable, "-c", PLANTED, str(work / "exported"), str(work / "optimized"),
                                 str(work / "report.json")], work)
    assert runs["optimize"]["rc"] == 0, runs["optimize"]["output"][-2000:]
    print(f"optimize: rss {runs['optimize']['rss'] / 1e6:.0f} MB, disk {runs['optimize']['disk'] / 1e6:.0f} MB",
          file=sys.stderr)
    # random weights: the quality gate is not what is measured here. quantize takes a 7-8B model's path: its input's
    # weights in external data (the export's output; optimize writes one this small in the graph file), the checks
    # layer by layer (as auto does from 1 GB), the int4 weights streamed (integer zero points, as for fp16)
    gate = ["--eval-tokens", "256", "--min-greedy-agreement", "0", "--max-ppl-increase", "1000",
            "--check-form", "layerwise"]
    for name, mode in QUANTIZE_RUNS.items():
        runs[name] = _measure(py + ["quantize", str(work / "exported"), "-o", str(work / name), *mode, *gate], work)
        assert runs[name]["rc"] == 0, runs[name]["output"][-2000:]
        print(f"{name}: rss {runs[name]['rss'] / 1e6:.0f} MB, disk {runs[name]['disk'] / 1e6:.0f} MB", file=sys.stderr)
    runs["planted"] = _measure([sys.executable, "-c", PLANTED_QUANTIZE, str(work / "exported"), str(work / "planted")],
                               work)
    weights = sum(f.stat().st_size for f in (work / "exported").glob("model.onnx*"))
    sizes = {name: _dir_bytes(work / name) for name in ("hf", "exported", "optimized", *QUANTIZE_RUNS)}
    print(json.dumps({"W": weights, "sizes": sizes,
                      **{k: {"rss": v["rss"], "disk": v["disk"]} for k, v in runs.items()}}), file=sys.stderr)
    return {"work": work, "W": weights, "runs": runs, "sizes": sizes,
            "report": json.loads((work / "report.json").read_text())}


def test_the_model_is_a_few_hundred_mb(stages) -> None:
    assert 200e6 < stages["W"] < 320e6


def test_export_stays_within_rss_and_disk_bounds(stages) -> None:
    W, run = stages["W"], stages["runs"]["export"]
    assert run["rss"] <= EXPORT_RSS_X * W, f"export peak RSS {run['rss'] / W:.2f} x W"
    assert run["disk"] <= stages["sizes"]["exported"] * 1.1


def test_optimize_stays_within_rss_and_disk_bounds(stages) -> None:
    W, run, sizes = stages["W"], stages["runs"]["optimize"], stages["sizes"]
    assert run["rss"] <= OPTIMIZE_RSS_X * W, f"optimize peak RSS {run['rss'] / W:.2f} x W"
    # disk: what optimize added at its peak is its output, within 10% of input + output (no snapshot files)
    slack = OPTIMIZE_DISK_SLACK * (sizes["exported"] + sizes["optimized"])
    assert run["disk"] <= sizes["optimized"] + slack, (run["disk"], sizes)
    assert "[1/" in run["output"] and "checking" in run["output"]  # progress on stderr


def test_the_planted_fault_is_rolled_back_with_its_numbers(stages) -> None:
    passes = {p["name"]: p for p in stages["report"]["passes"]}
    planted = passes["planted_fault"]
    assert planted["status"] == "rolled_back" and planted["reason"].startswith("parity failed")
    assert planted["check"]["rel_err"] > 1e-2 and planted["check"]["passed"] is False
    assert passes["attention"]["status"] == "kept" and passes["norms"]["status"] == "kept"
    assert stages["report"]["final"]["passed"] is True


@pytest.mark.parametrize("name", list(QUANTIZE_RUNS))
def test_quantize_stays_within_rss_bound(stages, name: str) -> None:
    W, run = stages["W"], stages["runs"][name]
    assert run["rss"] <= QUANTIZE_RSS_X * W, f"quantize ({name}) peak RSS {run['rss'] / W:.2f} x W"
    # quantize keeps temporary files while it runs (measured: 0.83x its input at the peak, its output 0.24x)
    assert run["disk"] <= 1.1 * (stages["sizes"][name] + stages["sizes"]["exported"])


def test_quantize_layer_by_layer_refuses_a_planted_fault(stages) -> None:
    """The same gate that the sound int4 run passes (its figures, recorded with the gate open) refuses the planted
    quantization: its greedy text parts from the input's."""
    from onnxpipe.quant.quality import MIN_GREEDY_AGREEMENT, Gate

    run = stages["runs"]["planted"]
    assert run["rc"] == 3 and "failed the quality gate" in run["output"] and "greedy agreement" in run["output"]
    assert not (stages["work"] / "planted").exists()
    sound = json.loads((stages["work"] / "quantized" / "onnxpipe.json").read_text())["steps"][-1]
    gate = Gate(5.0, MIN_GREEDY_AGREEMENT)  # int4's default budget
    q = sound["quality"]
    assert sound["check_form"] == "layerwise"
    assert gate.ppl_check(q["ppl_change_pct"], q["ppl_change_ci95_pct"]).passed
    assert gate.greedy_check(q["greedy_agreement"], q["greedy_agreement_ties"], q["greedy_positions"]).passed
