"""The 8-bit vocabulary tables made a block of rows at a time (quant/embedding.py): the int8 values and scales of the
whole-table quantize_rows, bit for bit, on the streamed and the in-memory path, tied and untied; and the memory of a
streamed model's tables (in a child process) a block plus the int8 copies, not the float tables made whole."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from onnxpipe.quant import embedding
from onnxpipe.quant.embedding import quantize_rows, quantize_vocab_tables, rewrite_vocab_tables
from onnxpipe.quant.graph import drop_unused_initializers, expose_weights
from onnxpipe.quant.rtn_stream import read_plan

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from measure_scale import run_stage  # noqa: E402

VOCAB, HIDDEN = 3000, 64  # tiny llama; 256 rows a block below: 12 blocks, the last one partial
BLOCK_ROWS = 256


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    """A tiny llama export with a 3,000-token vocabulary, its weights in model.onnx.data (as a large model's are)."""
    from quant.conftest import external_copy
    from tiny import make_tiny_model

    from onnxpipe.export import export_decoder

    root = tmp_path_factory.mktemp("vocab-blocks")
    hf = make_tiny_model("llama", root / "hf", vocab_size=VOCAB, tie_word_embeddings=request.param)
    export_decoder(hf, root / "onnx")
    return external_copy(root / "onnx", root / "external"), request.param


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items() if v.const_value is not None}


def test_tables_in_blocks_are_the_whole_tables_values(exported: tuple[Path, bool],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src, tied = exported
    monkeypatch.setattr(embedding, "BLOCK_BYTES", BLOCK_ROWS * HIDDEN * 4)
    spans: list[tuple[int, int]] = []
    read = embedding.TableRows.read
    monkeypatch.setattr(embedding.TableRows, "read", lambda self, a, b: spans.append((a, b)) or read(self, a, b))

    float_model = onnx.load(str(src / "model.onnx"))
    floats = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer if VOCAB in t.dims}
    assert len(floats) == (1 if tied else 2)  # tied: the Transpose of the token table is the head

    model = ir.load(str(src / "model.onnx"))  # read lazily, as quantize's streamed modes do
    plan = read_plan(model, "logits")
    report = rewrite_vocab_tables(model, plan.lm_head, VOCAB, head=True, embeddings=True, accuracy_level=4)
    drop_unused_initializers(model.graph)
    assert len(spans) >= 12 and max(b - a for a, b in spans) == BLOCK_ROWS  # in blocks, not whole
    assert report.lm_head == ("int8 per row (shared with the embedding table)" if tied else "int8 per row")
    assert len(report.embeddings) == 1 and report.block_size == 64 and report.blocks_per_row == 1

    streamed = _initializers(model)
    tables = sorted(n for n in streamed if n.endswith("_int8_rows"))
    assert len(tables) == len(floats)
    errors = []
    for name in tables:
        source = name[:-len("_int8_rows")]
        table = floats[source] if floats[source].shape[0] == VOCAB else floats[source].T  # the head is [H, V]
        q, scale, _ = quantize_rows(table)  # the whole table at once, as before
        assert np.array_equal(streamed[name], q) and streamed[name].dtype == np.uint8
        assert np.array_equal(streamed[f"{source}_int8_row_scales"], scale)  # bit for bit: exact equality
        errors.append(np.abs(embedding.dequantize_rows(q, scale, HIDDEN) - table).max())
    assert report.max_abs_err == float(max(errors))

    # the in-memory path (the whole proto, expose_weights' untied head materialised) writes the same tables
    plan = expose_weights(float_model, "logits")
    quantize_vocab_tables(float_model, plan.lm_head, VOCAB, head=True, embeddings=True, accuracy_level=4)
    in_memory = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    for name in tables:
        assert np.array_equal(in_memory[name], streamed[name])
        assert np.array_equal(in_memory[f"{name[:-len('_rows')]}_row_scales"], streamed[f"{name[:-len('_rows')]}_row_scales"])


def test_tied_head_left_float_is_written_as_e_transposed(exported: tuple[Path, bool], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed model whose tied head stays float (--lm-head fp32, an fp16 input): the lazily untied E^T is made
    at the write and holds E's values, transposed; until then it is not made."""
    from onnxpipe.quant.graph import Transposed
    from onnxpipe.quant.rtn_stream import save_streamed

    src, tied = exported
    if not tied:
        pytest.skip("an untied head has its own weight")
    made: list[int] = []
    make = Transposed.__call__
    monkeypatch.setattr(Transposed, "__call__", lambda self: made.append(1) or make(self))
    model = ir.load(str(src / "model.onnx"))
    plan = read_plan(model, "logits")
    head = next(n for n in model.graph if n.name == plan.lm_head)
    lazy = head.inputs[1].const_value
    assert isinstance(lazy, ir.LazyTensor) and isinstance(lazy.raw, Transposed) and not made
    out = tmp_path / "out"
    out.mkdir()
    save_streamed(model, out / "model.onnx", external=True)
    assert made == [1]  # made once, at the write
    written = onnx.load(str(out / "model.onnx"))
    inputs = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src / "model.onnx")).graph.initializer}
    table = next(a for a in inputs.values() if a.shape == (VOCAB, HIDDEN))
    weight = next(numpy_helper.to_array(t) for t in written.graph.initializer if tuple(t.dims) == (HIDDEN, VOCAB))
    assert np.array_equal(weight, table.T)
    assert "Transpose" not in [n.op_type for n in written.graph.node if head.inputs[1].name in n.input]


def test_truncated_data_file_is_a_one_line_error(exported: tuple[Path, bool], tmp_path: Path) -> None:
    import shutil

    from onnxpipe.errors import OnnxpipeError

    src, _ = exported
    bad = Path(shutil.copytree(src, tmp_path / "bad"))
    data = bad / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    model = ir.load(str(bad / "model.onnx"))
    plan = read_plan(model, "logits")
    with pytest.raises(OnnxpipeError, match=r"model\.onnx\.data: the data file ends before initializer .*; the "
                                             "model directory is incomplete"):
        rewrite_vocab_tables(model, plan.lm_head, VOCAB, head=True, embeddings=True, accuracy_level=4)


# --- memory ---------------------------------------------------------------------------------------------------------

MEM_VOCAB, MEM_HIDDEN = 150_000, 256  # one fp32 table: 154 MB
MAX_ADDED = 0.75  # x the float vocabulary tables' bytes, above the child's RSS after its imports

CHILD = r"""
import sys
from pathlib import Path
import onnx_ir as ir
from onnxpipe.quant.embedding import rewrite_vocab_tables
from onnxpipe.quant.graph import drop_unused_initializers
from onnxpipe.quant.rtn_stream import read_plan, save_streamed
import onnxruntime.capi._pybind_state  # imported in both runs
if sys.argv[1] == "imports":
    sys.exit(0)
model = ir.load(sys.argv[2])
plan = read_plan(model, "logits")
report = rewrite_vocab_tables(model, plan.lm_head, int(sys.argv[1]), head=True, embeddings=True, accuracy_level=4)
drop_unused_initializers(model.graph)
save_streamed(model, Path(sys.argv[3]), external=True)
print(report.lm_head)
"""


def _vocab_model(path: Path, tied: bool) -> int:
    """input_ids -> Gather(E [V, H]) -> MatMul(., E^T as Transpose(E) if tied, else its own [H, V]) = logits, fp32,
    the tables in model.onnx.data; the export's two forms of an LM head. Returns the float tables' bytes."""
    rng = np.random.default_rng(0)

    def initializer(name: str, shape: tuple[int, int]) -> ir.Value:
        array = rng.standard_normal(shape, dtype=np.float32) * 0.02
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape, value.type = ir.Shape(shape), ir.TensorType(ir.DataType.FLOAT)
        return value

    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "seq"]), type=ir.TensorType(ir.DataType.INT64))
    table = initializer("embed", (MEM_VOCAB, MEM_HIDDEN))
    lookup = ir.node("Gather", [table, ids], name="embed/Gather")
    nodes, inits = [lookup], [table]
    if tied:
        transpose = ir.node("Transpose", [table], {"perm": [1, 0]}, name="lm_head/Transpose")
        nodes.append(transpose)
        weight = transpose.outputs[0]
    else:
        weight = initializer("lm_head.weight", (MEM_HIDDEN, MEM_VOCAB))
        inits.append(weight)
    head = ir.node("MatMul", [lookup.outputs[0], weight], name="lm_head/MatMul")
    head.outputs[0].name = "logits"
    nodes.append(head)
    graph = ir.Graph([ids], [head.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="vocab")
    ir.save(ir.Model(graph, ir_version=9), str(path), external_data="model.onnx.data")
    return sum(v.const_value.nbytes for v in inits if v.const_value is not None)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_streamed_tables_hold_a_block_not_the_table(tmp_path: Path, tied: bool) -> None:
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    tables = _vocab_model(src, tied)
    (tmp_path / "out").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-c", CHILD]
    base = run_stage(cmd + ["imports"], work, REPO, tmp_path / "imports.log")
    run = run_stage(cmd + [str(MEM_VOCAB), str(src), str(tmp_path / "out" / "model.onnx")], work, REPO,
                    tmp_path / "tables.log")
    log = (tmp_path / "tables.log").read_text()
    assert base["rc"] == 0 and run["rc"] == 0, log[-2000:]
    assert ("shared with the embedding table" in log) == tied
    added = run["peak_rss"] - base["peak_rss"]
    print(f"float tables {tables / 1e6:.0f} MB; imports {base['peak_rss'] / 1e6:.0f} MB; tables "
          f"+{added / 1e6:.0f} MB ({added / tables:.2f}x)", file=sys.stderr)
    assert added <= MAX_ADDED * tables, f"the vocabulary tables held {added / tables:.2f}x their float bytes"
    out = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert sorted(n.op_type for n in out.graph.node if n.op_type in ("Gather", "MatMul", "MatMulNBits")) == \
        ["Gather", "Gather", "MatMulNBits"]  # rows and scales looked up; the head reads the int8 table
    int8 = MEM_VOCAB * MEM_HIDDEN * (1 if tied else 2)
    assert int8 <= (tmp_path / "out" / "model.onnx.data").stat().st_size < int8 * 1.05
