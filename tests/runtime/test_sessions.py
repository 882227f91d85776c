"""open_session: the one factory of onnxruntime sessions (options, providers and their fallback, model forms)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime import sessions
from onnxpipe.runtime.sessions import open_session


def _add_model(weight: np.ndarray | None = None) -> onnx.ModelProto:
    """y = x + w (w an initializer, 2x3 float)."""
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3) if weight is None else weight, "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _run(session) -> np.ndarray:
    return session.run(["y"], {"x": np.ones((2, 3), np.float32)})[0]


WANT = np.arange(6, dtype=np.float32).reshape(2, 3) + 1


def test_path_bytes_and_proto_give_the_same_session(tmp_path):
    model = _add_model()
    onnx.save(model, str(tmp_path / "m.onnx"))
    for source in (tmp_path / "m.onnx", str(tmp_path / "m.onnx"), model.SerializeToString(), model):
        session = open_session(source)
        assert session.get_providers() == ["CPUExecutionProvider"]
        np.testing.assert_array_equal(_run(session), WANT)


@pytest.mark.parametrize("level, ort_level", [
    ("off", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
    ("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
    ("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
    ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
])
def test_optimization_level_threads_and_config(level, ort_level):
    session = open_session(_add_model(), optimization=level, threads=1, config={"session.disable_prepacking": "1"})
    so = session.get_session_options()
    assert so.graph_optimization_level == ort_level
    assert so.intra_op_num_threads == 1
    assert so.get_session_config_entry("session.disable_prepacking") == "1"
    assert so.log_severity_level == 3  # errors only: our own messages say what matters


def test_a_callers_session_options_are_the_base():
    base = ort.SessionOptions()
    base.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    base.log_severity_level = 2
    so = open_session(_add_model(), session_options=base, optimization=None).get_session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.log_severity_level == 2
    so = open_session(_add_model(), session_options=base, optimization="off").get_session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_unknown_level_and_provider_are_errors():
    with pytest.raises(OnnxpipeError, match="unknown graph optimization level 'none'"):
        open_session(_add_model(), optimization="none")  # type: ignore[arg-type]
    with pytest.raises(OnnxpipeError, match="unknown execution provider 'gpu'"):
        open_session(_add_model(), ["gpu"])
    with pytest.raises(OnnxpipeError, match="takes a model path, bytes or an onnx.ModelProto"):
        open_session(42)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="needs a build without CUDA")
def test_a_missing_provider_is_an_error_by_default():
    with pytest.raises(OnnxpipeError) as e:
        open_session(_add_model(), ["cuda", "cpu"], purpose="a unit test")
    text = str(e.value)
    assert "(a unit test)" in text and "could not start CUDAExecutionProvider" in text
    assert "this onnxruntime build lacks it" in text and "\n" not in text


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="needs a build without CUDA")
def test_a_missing_provider_is_reported_once_when_asked(caplog):
    lines: list[str] = []
    session = open_session(_add_model(), [("cuda", {"device_id": 0}), "cpu"], fallback="report", announce=lines.append)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert len(lines) == 1 and "could not start CUDAExecutionProvider" in lines[0]
    assert lines[0].endswith("using cpu instead")
    with caplog.at_level(logging.WARNING, logger="onnxpipe.runtime"):  # no announce: a warning on the logger
        open_session(_add_model(), ["cuda"], fallback="report")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "could not start CUDAExecutionProvider" in caplog.records[0].getMessage()


def test_a_listed_provider_that_does_not_start_is_named_as_such(monkeypatch):
    """onnxruntime lists an EP whose libraries then fail to load: the message says so (not 'build lacks it')."""

    class Session:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    what, used = sessions.missing_providers(Session(), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "CUDAExecutionProvider (its libraries did not load" in what and used == "cpu"
    assert sessions.missing_providers(Session(), ["CPUExecutionProvider"]) is None


def test_a_provider_that_fails_to_start_leaves_the_next_one_its_options(monkeypatch):
    """onnxruntime's Python, when an EP fails to start (TensorRT without its libraries), retries on its default
    providers with no options at all: the CUDA EP would run without enable_cuda_graph. The session is made again
    on the providers that started, each with its options, and the fallback is said once."""
    made: list[list] = []

    class Session:  # onnxruntime's InferenceSession as it behaves where TensorRT's libraries are missing
        def __init__(self, source, so, providers, disabled_optimizers=None):
            made.append(providers)
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            if "TensorrtExecutionProvider" in names:  # its fallback: the default providers, no options
                self.live = {"CUDAExecutionProvider": {"enable_cuda_graph": "0"}, "CPUExecutionProvider": {}}
            else:
                self.live = {p[0] if isinstance(p, tuple) else p: dict(p[1]) if isinstance(p, tuple) else {}
                             for p in providers}

        def get_providers(self):
            return list(self.live)

        def get_provider_options(self):
            return self.live

    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    lines: list[str] = []
    session = open_session(_add_model(), [("tensorrt", {"trt_fp16_enable": "1"}), ("cuda", {"enable_cuda_graph": "1"}),
                                          "cpu"], fallback="report", announce=lines.append)
    assert session.get_provider_options()["CUDAExecutionProvider"]["enable_cuda_graph"] == "1"
    assert made[-1] == [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    assert len(made) == 2 and len(lines) == 1
    assert "TensorrtExecutionProvider (its libraries did not load" in lines[0] and lines[0].endswith("using cuda instead")
    # where the EPs that started kept their options, one session is made
    made.clear()
    open_session(_add_model(), [("cuda", {"enable_cuda_graph": "1"}), "cpu"], fallback="report",
                 announce=lines.append)
    assert len(made) == 1


def test_a_graph_that_does_not_load_is_one_line(tmp_path):
    bad = _add_model()
    bad.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(OnnxpipeError) as e:
        open_session(bad, purpose="a unit test")
    text = str(e.value)
    assert text.startswith("in-memory graph 'add': onnxruntime could not load the graph for a unit test on cpu: ")
    assert "\n" not in text
    with pytest.raises(Exception) as raw:
        open_session(bad, raw_errors=True)
    assert not isinstance(raw.value, OnnxpipeError) and type(raw.value).__module__.startswith("onnxruntime")
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(OnnxpipeError, match=f"^{tmp_path / 'bad.onnx'}: onnxruntime could not load"):
        open_session(tmp_path / "bad.onnx")


def test_external_initializers_are_read_in_place_and_kept_alive():
    model = _add_model()
    w = model.graph.initializer[0]
    w.ClearField("raw_data")  # an external initializer: its data comes with the session, not the graph
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="handed-over")
    session = open_session(model, external_initializers={"w": np.full((2, 3), 5, np.float32)})
    assert len(session._onnxpipe_keep[0]) == 1  # the OrtValue lives as long as the session
    np.testing.assert_array_equal(_run(session), np.full((2, 3), 6, np.float32))


def test_external_data_folder_of_a_proto(tmp_path):
    model = _add_model(np.full((2, 3), 2, np.float32))
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)  # the weights stay in w.bin
    session = open_session(proto, external_data_dir=tmp_path)
    np.testing.assert_array_equal(_run(session), np.full((2, 3), 3, np.float32))


def test_a_proto_past_the_protobuf_limit_goes_through_disk(monkeypatch):
    monkeypatch.setattr(sessions, "PROTO_INLINE_BYTES", 0)
    session = open_session(_add_model())
    folder = Path(session._onnxpipe_keep[1].name)
    assert (folder / "model.onnx").is_file()  # opened from a file, not from one serialized protobuf
    np.testing.assert_array_equal(_run(session), WANT)
    keep = session._onnxpipe_keep[1]
    del session
    keep.cleanup()
    assert not folder.exists()


def test_a_large_proto_with_weights_in_files_too_is_refused(monkeypatch, tmp_path):
    """Moved through disk, a proto whose other weights lie in a model directory would read wrong bytes: refused."""
    model = _add_model(np.full((2, 3), 2, np.float32))
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    monkeypatch.setattr(sessions, "PROTO_INLINE_BYTES", 0)
    with pytest.raises(OnnxpipeError, match=r"^an in-memory graph of 0 MiB with weights both inline and in files"):
        open_session(proto, external_data_dir=tmp_path)


def test_onnxruntimes_process_wide_logger_is_quieted_unless_asked(monkeypatch):
    """onnxruntime-gpu 1.31 warns on every CUDA session from its process-wide logger (run 59); sessions made here
    set it to errors only, and ONNXPIPE_ORT_LOG leaves it as onnxruntime has it."""
    levels: list[int] = []
    monkeypatch.setattr(ort, "set_default_logger_severity", levels.append)
    monkeypatch.delenv("ONNXPIPE_ORT_LOG", raising=False)
    open_session(_add_model())
    assert levels == [3]
    monkeypatch.setenv("ONNXPIPE_ORT_LOG", "1")
    open_session(_add_model())
    assert levels == [3]
