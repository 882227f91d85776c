"""Peak memory of int4 RTN's weight quantization (quant/rtn_stream.py) on a model of a few hundred MB, in a child
process: at most half the fp16 weight bytes W above what the same child holds after its imports alone.

The model is a chain of MatMuls with random fp16 weights (W ~ 300 MB) in an external data file, as a 7-8B export
is. The in-memory path (the whole model parsed, then onnxruntime's quantizer) holds W at least twice over; the
streamed one holds the graph, the int4 weights made so far (~0.27 W) and one weight in flight.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from measure_scale import run_stage  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 1024, 4096, 12  # 12 x 2 x 1024 x 4096 fp16 weights: 201 MB, + the head
VOCAB = 24000  # the LM head [1024, 24000] fp16 (49 MB), left float by default on an fp16 input
MAX_RSS_X = 0.5  # of W, above the child's RSS after its imports

CHILD = r"""
import sys
import onnx_ir as ir
from onnxpipe.quant.config import Int4Config
from onnxpipe.quant.rtn_stream import quantize_rtn_streamed, read_plan, save_streamed
import onnxruntime.capi._pybind_state  # the kernel's module, imported in both runs
if sys.argv[1] == "imports":
    sys.exit(0)
model = ir.load(sys.argv[2])
plan = read_plan(model, "logits")
cfg = Int4Config(algo="rtn", block_size=int(sys.argv[1]), lm_head="fp32", embeddings="fp32")
details = quantize_rtn_streamed(model, plan, cfg)
save_streamed(model, __import__("pathlib").Path(sys.argv[3]), external=True)
print(details["quantized_nodes"])
"""


def _chain_model(path: Path) -> int:
    """x -> (MatMul [H, I], MatMul [I, H]) x LAYERS -> MatMul [H, V] = logits, fp16, weights in model.onnx.data.
    Returns the weight bytes."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape(["batch", HIDDEN]), type=ir.TensorType(ir.DataType.FLOAT16))
    nodes, inits, value = [], [], x
    shapes = [(HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)] * LAYERS + [(HIDDEN, VOCAB)]
    for i, shape in enumerate(shapes):
        w = ir.Value(name=f"w{i}", const_value=ir.tensor((rng.standard_normal(shape) * 0.02).astype(np.float16),
                                                          name=f"w{i}"))
        w.shape, w.type = ir.Shape(shape), ir.TensorType(ir.DataType.FLOAT16)
        inits.append(w)
        node = ir.node("MatMul", [value, w], name=f"layer{i}/MatMul")
        value = node.outputs[0]
        nodes.append(node)
    value.name = "logits"
    graph = ir.Graph([x], [value], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="chain")
    ir.save(ir.Model(graph, ir_version=9), str(path), external_data="model.onnx.data")
    return sum(v.const_value.nbytes for v in inits if v.const_value is not None)


def test_streamed_rtn_holds_at_most_half_the_weights(tmp_path: Path) -> None:
    import onnx

    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    weights = _chain_model(src)
    assert 200e6 < weights < 320e6
    out = tmp_path / "out"
    out.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-c", CHILD]
    base = run_stage(cmd + ["imports"], work, REPO, tmp_path / "imports.log")
    run = run_stage(cmd + ["32", str(src), str(out / "model.onnx")], work, REPO, tmp_path / "quantize.log")
    assert base["rc"] == 0 and run["rc"] == 0, (tmp_path / "quantize.log").read_text()[-2000:]
    assert (tmp_path / "quantize.log").read_text().split()[-1] == str(2 * LAYERS)
    added = run["peak_rss"] - base["peak_rss"]
    print(f"W {weights / 1e6:.0f} MB; imports {base['peak_rss'] / 1e6:.0f} MB; quantize +{added / 1e6:.0f} MB "
          f"({added / weights:.2f} W)", file=sys.stderr)
    assert added <= MAX_RSS_X * weights, f"streamed RTN held {added / weights:.2f} x W above its imports"
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in proto.graph.node].count("MatMulNBits") == 2 * LAYERS
    # the int4 body (1/4 of its fp16 bytes, plus scales and zero points) and the fp16 head
    assert (out / "model.onnx.data").stat().st_size < 0.45 * weights
