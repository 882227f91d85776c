"""The chunk lane (runtime/chunk_lane.py): one run of the decoder graph that is a decode step of the batch and a chunk
of one row's prompt, against the two runs apart, on the CPU (bit for bit); and the graphs it refuses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxpipe.runtime.chunk_lane import (
    CHUNK_IDS,
    CHUNK_LAST,
    CHUNK_LOGITS,
    CHUNK_MASK,
    CHUNK_POSITIONS,
    add_chunk_lane,
    chunk_name,
)
from onnxpipe.runtime.last_position import LAST_INDEX


def _sessions(path):
    import onnxruntime as ort

    proto = onnx.load(str(path / "model.onnx"))
    plain = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert add_chunk_lane(proto, "logits") is None
    lane = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return plain, lane


def _run(session, feed):
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(None, {k: v for k, v in feed.items() if k in wanted})))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "qwen3"])
def test_a_step_with_a_chunk_in_its_run_gives_exactly_the_step_and_the_chunk_apart(cuda_form, family):
    _check_exact(cuda_form(family))


def _check_exact(path):
    """The lane's run of a decode step with a chunk against the step and the chunk each run apart: bit for bit."""
    plain, lane = _sessions(path)
    past = [i for i in plain.get_inputs() if i.name.startswith("past")]
    _, kv_heads, _, head_dim = past[0].shape
    rng = np.random.default_rng(3)
    batch, capacity, width, start = 4, 64, 8, 16
    cache = {p.name: rng.standard_normal((batch, kv_heads, capacity, head_dim)).astype(np.float32) for p in past}
    row = {p.name: rng.standard_normal((1, kv_heads, capacity, head_dim)).astype(np.float32) for p in past}
    counts = np.array([5, 9, 3, 12])  # each row's length after the step (its new token at count - 1)
    ids = rng.integers(0, 100, (batch, 1))
    mask = (np.arange(capacity)[None] < counts[:, None]).astype(np.int64)
    chunk = rng.integers(0, 100, (1, width))
    chunk_mask = (np.arange(capacity)[None] < start + width).astype(np.int64)[None, 0]
    step = _run(plain, {"input_ids": ids, "attention_mask": mask, "position_ids": counts[:, None] - 1, **cache})
    apart = _run(plain, {"input_ids": chunk, "attention_mask": chunk_mask,
                         "position_ids": np.arange(start, start + width)[None], **row})
    both = _run(lane, {"input_ids": ids, "attention_mask": mask, "position_ids": counts[:, None] - 1, **cache,
                       LAST_INDEX: np.zeros(batch, np.int64),
                       CHUNK_IDS: chunk, CHUNK_MASK: chunk_mask, CHUNK_LAST: np.array([batch + 5]),
                       CHUNK_POSITIONS: np.arange(start, start + width)[None],
                       **{chunk_name(k): v for k, v in row.items()}})
    assert both["logits"].shape == step["logits"].shape == (batch, 1, step["logits"].shape[-1])
    assert np.array_equal(both["logits"], step["logits"])  # bit for bit, not close
    assert np.array_equal(both[CHUNK_LOGITS][0, 0], apart["logits"][0, 5])  # the chunk's token 5, as asked
    presents = [o.name for o in plain.get_outputs() if o.name.startswith("present")]
    for name in presents:
        assert np.array_equal(both[name], step[name])
        assert np.array_equal(both[chunk_name(name)], apart[name])


def test_the_lane_refuses_graphs_it_cannot_prove_and_leaves_them_unchanged(tiny_onnx, cuda_form):
    proto = onnx.load(str(tiny_onnx("llama") / "model.onnx"), load_external_data=False)
    before = proto.SerializeToString()
    assert "GroupQueryAttention" in add_chunk_lane(proto, "logits")  # the export's form: attention unfused
    assert proto.SerializeToString() == before
    assert "no output" in add_chunk_lane(proto, "nope")

    proto = onnx.load(str(cuda_form("llama") / "model.onnx"), load_external_data=False)
    # a node that mixes positions (a ReduceSum over the sequence) between the layers
    node = next(n for n in proto.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
    mixed = onnx.helper.make_node("CumSum", [node.output[0], "lane_test_axis"], ["lane_test_mixed"])
    axis = onnx.helper.make_node("Constant", [], ["lane_test_axis"], value=onnx.helper.make_tensor(
        "lane_test_axis", onnx.TensorProto.INT64, [], [1]))
    consumer = next(n for n in proto.graph.node if node.output[0] in n.input)
    consumer.input[list(consumer.input).index(node.output[0])] = "lane_test_mixed"
    at = list(proto.graph.node).index(consumer)
    proto.graph.node.insert(at, mixed)
    proto.graph.node.insert(at, axis)
    before = proto.SerializeToString()
    why = add_chunk_lane(proto, "logits")
    assert why is not None and "CumSum" in why and "each position alone" in why
    assert proto.SerializeToString() == before


def test_a_reshape_that_could_move_features_between_positions_is_refused(cuda_form):
    """Qwen3's per-head reshapes are taken (their targets are the tokens' own [batch, sequence] and constants); a
    reshape whose target does not keep the leading two dims is refused, the graph unchanged."""
    proto = onnx.load(str(cuda_form("qwen3") / "model.onnx"), load_external_data=False)
    reshape = next(n for n in proto.graph.node if n.op_type == "Reshape" and n.input[1].startswith("val_")
                   and any(i.name == n.input[1] for i in proto.graph.initializer)
                   or n.op_type == "Reshape" and any(c.op_type == "Constant" and c.output[0] == n.input[1]
                                                       for c in proto.graph.node))
    flat = onnx.helper.make_node("Constant", [], ["lane_test_flat"], value=onnx.helper.make_tensor(
        "lane_test_flat", onnx.TensorProto.INT64, [3], [0, -1, 64]))  # [batch, sequence x ..., 64]: mixes
    reshape.input[1] = "lane_test_flat"
    proto.graph.node.insert(0, flat)
    before = proto.SerializeToString()
    why = add_chunk_lane(proto, "logits")
    assert why is not None and "may move features between positions" in why
    assert proto.SerializeToString() == before


def test_the_session_knows_whether_its_lane_reads_positions(cuda_form, tmp_path):
    """DecoderSession(chunk_lane=True).lane_has_positions: the lane graph's own chunk position input, where the
    graph reads position_ids (RotaryEmbedding nodes GroupQueryAttention could not take: here a head_dim of 8), and
    a step with a chunk in its run is still exactly both apart there."""
    from tiny import make_tiny_model

    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import optimize_model
    from onnxpipe.runtime.session import DecoderSession

    hf = make_tiny_model("llama", tmp_path / "hf", num_attention_heads=8, num_key_value_heads=4)
    export_decoder(hf, tmp_path / "onnx")
    optimize_model(tmp_path / "onnx", tmp_path / "cuda", level=3, target="cuda", verify=False)
    proto = onnx.load(str(tmp_path / "cuda" / "model.onnx"), load_external_data=False)
    assert any(n.op_type == "RotaryEmbedding" for n in proto.graph.node)
    for path, reads in ((cuda_form("llama"), False), (tmp_path / "cuda", True)):
        s = DecoderSession(path, "cpu", threads=1, feed_back=True, chunk_lane=True)
        assert s.lane is not None, s.lane_why_not
        assert s.lane_has_positions is reads
        assert (CHUNK_POSITIONS in {i.name for i in s.lane.get_inputs()}) is reads
    _check_exact(tmp_path / "cuda")
