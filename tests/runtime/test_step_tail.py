"""Greedy decode steps that write their own next inputs (runtime/step_tail.py), driven on the CPU through the
CUDA-graph slot path minus the capture: same tokens as the plain path, nothing uploaded after the first step,
and graphs where a write could overtake a read are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxpipe.runtime import load
from onnxpipe.runtime.generate import LanguageModel
from onnxpipe.runtime.session import DecoderSession
from onnxpipe.runtime.step_tail import NEXT_IDS, NEXT_MASK, NEXT_POSITIONS, add_step_tail

PROMPTS = [[5, 9, 12, 3, 7, 100, 20], [44, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def cuda_llama(cuda_form) -> Path:
    return cuda_form("llama")


def _fed(path: Path) -> LanguageModel:
    said: list[str] = []
    s = DecoderSession(path, "cpu", feed_back=True, announce=said.append)
    assert s.fed, said
    s.cuda_graph = True  # what a CUDA session with graphs does, minus the capture
    return LanguageModel(s, None)


def _tokens(lm: LanguageModel, prompts, **opts) -> list[list[int]]:
    return [r.token_ids for r in lm.generate(prompts, **opts)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2 reads position_ids: the step writes those too
def test_fed_steps_give_the_plain_tokens_and_upload_nothing_after_the_first(cuda_form, family):
    plain, fed = load(cuda_form(family), "cpu"), _fed(cuda_form(family))
    assert (NEXT_POSITIONS in {o.name for o in fed.session.session.get_outputs()}) == (family == "gpt2")
    t = fed.session.transfers
    calls = _count_fed(fed)
    for n in (30, 12, 30):  # a second generation on the same slot starts host-fed again
        up = t.up_bytes
        opts = {"max_new_tokens": n, "stop_token_ids": []}
        assert _tokens(fed, PROMPTS, **opts) == _tokens(plain, PROMPTS, **opts)
        uploaded = t.up_bytes - up
        if n == 12:
            short = uploaded
    assert uploaded == short  # 30 tokens upload as much as 12: the prefill's inputs and the first step's
    (slot,) = fed.session._graphs.values()
    assert slot.runs == 29 + 11 + 29 and slot.primed
    assert len(calls) == 28 + 10 + 28  # all but each generation's first step


def test_rows_that_stop_early_keep_decoding_unread(cuda_llama):
    plain, fed = load(cuda_llama, "cpu"), _fed(cuda_llama)
    free = _tokens(plain, PROMPTS, max_new_tokens=20, stop_token_ids=[])
    stop = free[1][4]  # row 1 stops at its fifth token; the others go on (or stop where the same token comes)
    want = plain.generate(PROMPTS, max_new_tokens=20, stop_token_ids=[stop])
    got = fed.generate(PROMPTS, max_new_tokens=20, stop_token_ids=[stop])
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want] and got[1].finish_reason == "eos"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_step_writes_the_next_inputs(cuda_form, family):
    """After one host-fed step the slot's buffers hold the next step's ids (the argmax), positions (row sums,
    where the graph reads positions) and mask (one more one per row, contiguous from the left)."""
    lm = _fed(cuda_form(family))
    s = lm.session
    cfg = lm._config({"max_new_tokens": 8, "stop_token_ids": []})
    rows = lm._rows(PROMPTS, cfg)
    mask, lengths, cache, out = lm.prefill(rows, 24, "argmax")
    mask, out = lm.decode_step(np.asarray(out, np.int64), mask, cache, "argmax")
    slot = s._graphs[(3, cache.capacity)]
    assert s.can_feed(cache)
    np.testing.assert_array_equal(slot.ids.numpy()[:, 0], out)
    if family == "gpt2":
        np.testing.assert_array_equal(slot.positions.numpy()[:, 0], lengths + 1)
    else:  # llama's CUDA form does not read position_ids (rotary inside the op): the step writes none there
        assert NEXT_POSITIONS not in {o.name for o in s.session.get_outputs()}
    written = slot.mask.numpy()
    np.testing.assert_array_equal(written.sum(axis=1), lengths + 2)
    assert (np.diff(written, axis=1) <= 0).all()  # ones then zeros
    assert written.shape == (3, cache.capacity)


def test_no_room_falls_back_to_uploaded_steps(cuda_llama):
    """Fed rows all grow until the last is done: when the longest prompt + the longest limit would pass the
    buffer, the loop uploads each step instead (and still gives the plain tokens)."""
    plain, fed = load(cuda_llama, "cpu"), _fed(cuda_llama)
    prompts = [PROMPTS[2] * 10, PROMPTS[1]]  # 110 and 3 tokens, 128 positions: limits 18 and 100
    want = _tokens(plain, prompts, max_new_tokens=100, stop_token_ids=[])
    calls = _count_fed(fed)
    assert _tokens(fed, prompts, max_new_tokens=100, stop_token_ids=[]) == want
    assert calls == []
    assert _tokens(fed, prompts[1:], max_new_tokens=100, stop_token_ids=[]) == _tokens(plain, prompts[1:], max_new_tokens=100, stop_token_ids=[])
    assert len(calls) == 99 - 1  # one row: room enough, every step after the first fed


def _count_fed(lm: LanguageModel) -> list:
    calls: list = []
    real = lm.session.step_fed
    lm.session.step_fed = lambda cache: calls.append(1) or real(cache)
    return calls


def _graph(extra_reader: bool = False, loop: bool = False):
    """input_ids/attention_mask -> logits; optionally a node reading the mask that the logits do not need."""
    nodes = [
        helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("ax", TensorProto.INT64, [1], [2])),
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["attention_mask"], ["n"], keepdims=1),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["f", "nf"], ["s"]),
        helper.make_node("Unsqueeze", ["s", "ax"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 1, 1])]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["attention_mask"], ["mask_copy"], name="late_copy"))
        outputs.append(helper.make_tensor_value_info("mask_copy", TensorProto.INT64, ["B", "W"]))
    if loop:
        body = helper.make_graph([helper.make_node("Identity", ["c"], ["d"])], "body",
                                 [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                                 [helper.make_tensor_value_info("d", TensorProto.BOOL, [])])
        nodes.append(helper.make_node("If", ["cond"], ["d"], then_branch=body, else_branch=body))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", 1]),
                                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "W"])],
                          outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_tail_refuses_a_read_that_could_follow_a_write():
    m = _graph(extra_reader=True)
    before = m.SerializeToString()
    why = add_step_tail(m, "logits")
    assert why is not None and "late_copy" in why and m.SerializeToString() == before
    assert "control flow" in add_step_tail(_graph(loop=True), "logits")
    assert "no output" in add_step_tail(_graph(), "scores")


def test_tail_on_a_small_graph_runs_and_writes_in_place():
    """On onnxruntime, with the outputs bound to the inputs' own buffers: ids <- argmax, mask <- one more one."""
    import onnxruntime as ort

    m = _graph()
    assert add_step_tail(m, "logits") is None
    onnx.checker.check_model(m)
    assert {o.name for o in m.graph.output} == {"logits", NEXT_IDS, NEXT_MASK}  # no position_ids input here
    assert NEXT_POSITIONS not in {o.name for o in m.graph.output}
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = ort.OrtValue.ortvalue_from_numpy(np.array([[7], [9]], np.int64))
    mask = ort.OrtValue.ortvalue_from_numpy(np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], np.int64))
    io = s.io_binding()
    io.bind_ortvalue_input("input_ids", ids)
    io.bind_ortvalue_input("attention_mask", mask)
    io.bind_output("logits", "cpu")
    io.bind_ortvalue_output(NEXT_IDS, ids)
    io.bind_ortvalue_output(NEXT_MASK, mask)
    s.run_with_iobinding(io)
    np.testing.assert_array_equal(ids.numpy(), [[0], [0]])  # the argmax of a one-wide vocabulary
    np.testing.assert_array_equal(mask.numpy(), [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    s.run_with_iobinding(io)  # fed again: the mask keeps growing
    np.testing.assert_array_equal(mask.numpy(), [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])


def test_prefill_buckets_pad_right_and_change_no_token(cuda_llama):
    """On the GPU right-padded prompts are padded to a multiple of PREFILL_BUCKET (one first run per bucket, not
    per length), never wider than the cache: the same tokens, fed or uploaded."""
    plain = load(cuda_llama, "cpu")
    assert plain.prefill_bucket == 1  # the CPU: no extra compute
    opts = {"max_new_tokens": 10, "stop_token_ids": []}
    for lm in (load(cuda_llama, "cpu"), _fed(cuda_llama)):
        lm.prefill_bucket = 32
        widths: list[int] = []
        real = lm.session.forward
        lm.session.forward = lambda ids, *a, **k: widths.append(ids.shape[1]) or real(ids, *a, **k)
        assert _tokens(lm, PROMPTS, **opts) == _tokens(plain, PROMPTS, **opts)
        assert widths[0] == 21  # 11 tokens: 32, but no wider than the cache (11 + 10)
        widths.clear()
        assert _tokens(lm, [PROMPTS[1]], max_new_tokens=40) == _tokens(plain, [PROMPTS[1]], max_new_tokens=40)
        assert widths[0] == 32  # 3 tokens padded to the bucket


def test_tail_on_a_graph_with_external_weights(cuda_llama, tmp_path):
    """Big models keep their weights in model.onnx.data: the tail is added to the graph alone (the weights are
    neither read nor moved) and the session still finds them beside the model."""
    import shutil

    out = tmp_path / "ext"
    shutil.copytree(cuda_llama, out)
    proto = onnx.load(str(out / "model.onnx"))
    onnx.save_model(proto, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    lm = _fed(out)  # asserts the tail was taken
    opts = {"max_new_tokens": 12, "stop_token_ids": []}
    assert _tokens(lm, PROMPTS, **opts) == _tokens(load(cuda_llama, "cpu"), PROMPTS, **opts)
