"""The chunk lane's session and the decode session share one copy of the weights (runtime/shared_weights.py): each
large external initializer read once into an OrtValue and given to both sessions by name; where onnxruntime refuses
them the sessions load with their own copies and say why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxpipe.runtime import shared_weights
from onnxpipe.runtime.session import DecoderSession
from onnxpipe.runtime.shared_weights import load_shared_weights


@pytest.fixture(scope="module")
def external_llama(cuda_form, tmp_path_factory):
    """The tiny Llama's CUDA form with its weights moved to external data (as an export of a real model has them)."""
    import shutil

    path = tmp_path_factory.mktemp("shared") / "llama"
    shutil.copytree(cuda_form("llama"), path)
    proto = onnx.load(str(path / "model.onnx"))
    onnx.save(proto, str(path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    return path


def _external(path):
    proto = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return {i.name for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}


def _step(session, ids):
    """Six greedy tokens after ``ids`` through ``session``."""
    from onnxpipe.runtime.generate import LanguageModel

    return LanguageModel(session, None).generate(ids, max_new_tokens=6, stop_token_ids=[]).token_ids


def test_the_lane_and_the_decode_session_share_the_external_weights(external_llama, monkeypatch):
    import onnxruntime as ort

    path = external_llama
    monkeypatch.setattr(shared_weights, "MIN_BYTES", 0)  # the tiny model's weights are all small
    external = _external(path)
    assert external
    said: list[str] = []
    s = DecoderSession(path, "cpu", threads=1, feed_back=True, chunk_lane=True, announce=said.append)
    assert s.lane is not None, s.lane_why_not
    assert s.shared_weights is not None, s.shared_weights_why_not
    assert set(s.shared_weights.values) == external
    # `serve`'s default provider, auto, shares them too (on the device its chain runs on here: the CPU)
    auto = DecoderSession(path, "auto", threads=1, feed_back=True, chunk_lane=True)
    assert auto.lane is not None and auto.shared_weights is not None, auto.shared_weights_why_not
    assert auto.shared_weights.device == ("cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu")
    # the bytes read are the graph's own: every value equals the initializer onnx reads from the file
    full = {i.name: onnx.numpy_helper.to_array(i, base_dir=str(path))
            for i in onnx.load(str(path / "model.onnx")).graph.initializer if i.name in external}
    assert s.shared_weights.nbytes == sum(a.nbytes for a in full.values())
    for name, value in s.shared_weights.values.items():
        np.testing.assert_array_equal(value.numpy(), full[name])
    # and the sessions built over them decode as one without sharing does
    own = DecoderSession(path, "cpu", threads=1, feed_back=True)
    ids = [5, 17, 40, 3, 99]
    assert _step(s, ids) == _step(own, ids)
    assert not any("own copy" in m for m in said)


def test_weights_are_not_shared_without_a_lane_or_with_the_callers_options(external_llama, cuda_form):
    import onnxruntime as ort

    path = external_llama
    s = DecoderSession(path, "cpu", threads=1, feed_back=True)
    assert s.shared_weights is None and s.shared_weights_why_not == "no chunk lane"
    s = DecoderSession(path, "cpu", threads=1, feed_back=True, chunk_lane=True, session_options=ort.SessionOptions())
    assert s.lane is not None and s.shared_weights is None
    assert "caller's" in s.shared_weights_why_not
    s = DecoderSession(cuda_form("gpt2"), "cpu", threads=1, feed_back=True, chunk_lane=True)  # the lane refuses GPT-2
    assert s.lane is None and s.shared_weights is None


@pytest.mark.parametrize("refused_at", [1, 2])  # 1: the decode session's build, 2: the lane's
def test_weights_onnxruntime_refuses_are_dropped_and_the_sessions_load_their_own(external_llama, monkeypatch,
                                                                                 refused_at):
    """onnxruntime refuses a shared value it plans on another device than the value's (a CUDA session placing a
    weight on the CPU): the session is built again without them, and says so."""
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.runtime import session as session_module

    monkeypatch.setattr(shared_weights, "MIN_BYTES", 0)
    real, calls = session_module.create_session, []

    def refusing(*a, **k):
        calls.append(k.get("session_options") is not None)  # only the shared weights' own options are passed here
        if len(calls) == refused_at:
            assert calls[-1]
            raise OnnxpipeError("Cannot use user supplied initializer (planned on another device)")
        return real(*a, **k)

    monkeypatch.setattr(session_module, "create_session", refusing)
    said: list[str] = []
    s = DecoderSession(external_llama, "cpu", threads=1, feed_back=True, chunk_lane=True, announce=said.append)
    assert s.lane is not None, s.lane_why_not
    assert s.shared_weights is None and "did not take them" in s.shared_weights_why_not
    assert any("own copy of the weights" in m for m in said)
    # refused for the decode session: nothing shared after; for the lane: the decode session keeps reading them
    assert calls == ([True, False, False] if refused_at == 1 else [True, True, False])
    assert (getattr(s, "_weights_keep", None) is not None) == (refused_at == 2)
    own = DecoderSession(external_llama, "cpu", threads=1, feed_back=True)
    assert _step(s, [5, 6, 7]) == _step(own, [5, 6, 7])


def test_a_record_that_does_not_fit_its_shape_is_refused_naming_it(external_llama, tmp_path):
    import shutil

    from onnxpipe.errors import OnnxpipeError

    path = tmp_path / "m"
    shutil.copytree(external_llama, path)
    proto = onnx.load(str(path / "model.onnx"), load_external_data=False)
    init = next(i for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL)
    for e in init.external_data:
        if e.key == "length":
            e.value = str(int(e.value) + 4)
    onnx.save(proto, str(path / "model.onnx"))
    with pytest.raises(OnnxpipeError, match=init.name):
        load_shared_weights(path / "model.onnx", path, "cpu", min_bytes=0)


def test_a_buffer_onnxruntime_allocated_is_shared_through_dlpack():
    """add_initializer refuses a buffer onnxruntime owns, as a device copy's is (seen on an H100: "Buffer containing
    the initializer must be owned by the user"); the same buffer seen through DLPack is taken, at the same address."""
    import onnxruntime as ort

    from onnxpipe.runtime.shared_weights import user_owned

    owned = ort.OrtValue.ortvalue_from_shape_and_type([4, 8], np.float32, "cpu", 0)
    with pytest.raises(Exception, match="owned by the user"):
        ort.SessionOptions().add_initializer("w", owned)
    seen = user_owned(owned)
    ort.SessionOptions().add_initializer("w", seen)
    assert seen.data_ptr() == owned.data_ptr() and seen.shape() == [4, 8]
    del owned  # the capsule keeps the buffer: still readable
    assert seen.numpy().shape == (4, 8)


def test_a_weight_stored_outside_with_no_location_is_refused_naming_it(external_llama, tmp_path):
    import shutil

    from onnxpipe.errors import OnnxpipeError

    path = tmp_path / "m"
    shutil.copytree(external_llama, path)
    proto = onnx.load(str(path / "model.onnx"), load_external_data=False)
    init = next(i for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL)
    kept = [e for e in init.external_data if e.key != "location"]
    del init.external_data[:]
    init.external_data.extend(kept)
    onnx.save(proto, str(path / "model.onnx"))
    with pytest.raises(OnnxpipeError, match=f"{init.name}.*names no location"):
        load_shared_weights(path / "model.onnx", path, "cpu", min_bytes=0)
