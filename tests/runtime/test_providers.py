"""Provider choice and fallback, fp16 -> fp32 on the CPU, and the TensorRT options plumbing (no TensorRT here)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime import providers
from onnxpipe.runtime.providers import TensorRTOptions, create_session, fp16_to_fp32, trt_provider_options


def test_cpu_is_used_without_messages(tiny_onnx):
    md = ModelDir.open(tiny_onnx("llama"))
    session, choice = create_session(md.model_path, "cpu")
    assert choice.used == "cpu" and choice.messages == [] and not choice.fell_back
    assert session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize("requested", ["cuda", "tensorrt"])
def test_unavailable_provider_falls_back_with_a_message(tiny_onnx, requested, caplog):
    md = ModelDir.open(tiny_onnx("llama"))
    with caplog.at_level(logging.INFO, logger="onnxpipe.runtime"):
        session, choice = create_session(md.model_path, requested)
    assert choice.used == "cpu" and choice.fell_back
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert any(f"{requested} was requested" in m and "using cpu instead" in m for m in choice.messages)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == choice.messages  # said once, as a warning
    assert "provider: cpu" in caplog.text


def test_provider_dropped_by_onnxruntime_is_detected(tiny_onnx, monkeypatch):
    """A build that lists CUDA but cannot start it: ORT drops the EP itself; we read get_providers() back."""
    md = ModelDir.open(tiny_onnx("llama"))
    monkeypatch.setattr(providers, "available_providers", lambda: ["cuda", "cpu"])
    lines: list[str] = []
    session, choice = create_session(md.model_path, "cuda", announce=lines.append)
    assert choice.used == "cpu"
    assert any("could not start CUDAExecutionProvider" in m and "using cpu instead" in m for m in choice.messages)
    assert lines[-1] == choice.summary()


def test_unknown_provider_and_missing_file(tmp_path):
    with pytest.raises(OnnxpipeError, match="unknown provider 'gpu'"):
        create_session(tmp_path / "model.onnx", "gpu")
    with pytest.raises(OnnxpipeError, match="no such model file"):
        create_session(tmp_path / "model.onnx", "cpu")


def test_fp16_graph_runs_in_fp32_on_cpu(tiny_onnx):
    md16 = ModelDir.open(tiny_onnx("llama", "fp16"))
    session, choice = create_session(md16.model_path, "cpu", announce=lambda m: None)
    assert choice.fp32_compute and any("converted to fp32" in m for m in choice.messages)
    types = {i.name: i.type for i in session.get_inputs()}
    assert types["past_key_values.0.key"] == "tensor(float)"
    assert {o.type for o in session.get_outputs()} == {"tensor(float)"}
    # the converted graph computes what the fp16 one means: close to the fp32 export of the same weights
    md32 = ModelDir.open(tiny_onnx("llama"))
    ref, _ = create_session(md32.model_path, "cpu", announce=lambda m: None)
    feed = _prefill_feed(md32, np.float32)
    got = session.run(["logits"], feed)[0]
    want = ref.run(["logits"], feed)[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-2


def test_fp16_to_fp32_rewrites_everything():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 2), np.float16), "w")
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((2,), 2, np.float16))),
        helper.make_node("MatMul", ["xh", "w"], ["m"]),
        helper.make_node("Add", ["m", "c"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 2])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    assert fp16_to_fp32(m) == 4  # initializer, Cast target, Constant value, output type
    onnx.checker.check_model(m, full_check=True)
    assert TensorProto.FLOAT16 not in {m.graph.initializer[0].data_type, m.graph.output[0].type.tensor_type.elem_type}


def test_trt_options_are_built(tiny_onnx, tmp_path):
    md = ModelDir.open(tiny_onnx("llama"))
    opts = TensorRTOptions(fp16=True, cache_dir=tmp_path / "trt", max_batch=4, opt_batch=2,
                           max_total_length=256, opt_total_length=64, max_workspace_bytes=1 << 30,
                           builder_optimization_level=4, extra={"trt_layer_norm_fp32_fallback": "True"})
    d = trt_provider_options(opts, md.manifest.graph["inputs"])
    assert d["trt_fp16_enable"] == "True" and d["trt_int8_enable"] == "False"
    assert d["trt_engine_cache_enable"] == "True" and d["trt_timing_cache_enable"] == "True"
    assert d["trt_engine_cache_path"] == d["trt_timing_cache_path"] == str((tmp_path / "trt").absolute())
    assert d["trt_max_workspace_size"] == str(1 << 30) and d["trt_builder_optimization_level"] == "4"
    assert d["trt_layer_norm_fp32_fallback"] == "True"
    kv_heads, hd = md.manifest.model["num_kv_heads"], md.manifest.model["head_dim"]
    mins = dict(s.split(":") for s in d["trt_profile_min_shapes"].split(","))
    opt = dict(s.split(":") for s in d["trt_profile_opt_shapes"].split(","))
    maxs = dict(s.split(":") for s in d["trt_profile_max_shapes"].split(","))
    assert set(mins) == set(opt) == set(maxs) == set(md.manifest.input_names)  # every dynamic input has a range
    assert mins["input_ids"] == "1x1" and opt["input_ids"] == "2x1" and maxs["input_ids"] == "4x256"
    assert mins["attention_mask"] == "1x1" and opt["attention_mask"] == "2x64" and maxs["attention_mask"] == "4x256"
    assert mins["past_key_values.0.key"] == f"1x{kv_heads}x0x{hd}"
    assert opt["past_key_values.1.value"] == f"2x{kv_heads}x63x{hd}"
    assert maxs["past_key_values.1.value"] == f"4x{kv_heads}x255x{hd}"


def test_trt_options_int8_and_bad_ranges():
    d = trt_provider_options(TensorRTOptions(fp16=False, int8=True, int8_calibration_table="calib.flatbuffers", profiles=False))
    assert d == {"trt_fp16_enable": "False", "trt_int8_enable": "True", "trt_int8_calibration_table_name": "calib.flatbuffers"}
    with pytest.raises(OnnxpipeError, match="opt_batch"):
        trt_provider_options(TensorRTOptions(opt_batch=9, max_batch=8), [])
    with pytest.raises(OnnxpipeError, match="dynamic axis 'weird'"):
        trt_provider_options(TensorRTOptions(), [{"name": "x", "shape": ["weird", 4]}])


def test_trt_options_reach_onnxruntime(tiny_onnx, monkeypatch, tmp_path):
    """With TensorRT listed, the options dict built above is what onnxruntime is handed."""
    import onnxruntime as ort

    md = ModelDir.open(tiny_onnx("llama"))
    seen = {}
    real = ort.InferenceSession

    def spy(path, so=None, providers=None, **kw):
        seen["providers"] = providers
        return real(path, so, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(providers, "available_providers", lambda: ["tensorrt", "cuda", "cpu"])
    monkeypatch.setattr(providers, "tensorrt_loads", lambda library=None: (True, ""))
    monkeypatch.setattr(ort, "InferenceSession", spy)
    _, choice = create_session(md.model_path, "auto", trt_options=TensorRTOptions(cache_dir=tmp_path / "c"),
                               announce=lambda m: None)
    names = [p[0] if isinstance(p, tuple) else p for p in seen["providers"]]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = seen["providers"][0][1]
    assert trt["trt_engine_cache_path"] == str((tmp_path / "c").absolute()) and "trt_profile_max_shapes" in trt
    assert (tmp_path / "c").is_dir()
    assert choice.used == "cpu" and any("could not start TensorrtExecutionProvider, CUDAExecutionProvider" in m for m in choice.messages)



def test_tensorrt_listed_but_not_loadable_is_not_asked_for(tiny_onnx, monkeypatch, tmp_path):
    """The usual onnxruntime-gpu wheel lists TensorRT without its libraries: the session is asked for the rest of
    the chain once (no session onnxruntime makes and drops, none of its error dump), and the fallback is one line."""
    import onnxruntime as ort

    md = ModelDir.open(tiny_onnx("llama"))
    made = []
    real = ort.InferenceSession

    def spy(path, so=None, providers=None, **kw):
        made.append([p[0] if isinstance(p, tuple) else p for p in providers])
        return real(path, so, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(providers, "available_providers", lambda: ["tensorrt", "cuda", "cpu"])
    monkeypatch.setattr(providers, "tensorrt_loads",
                        lambda library=None: (False, "libnvinfer.so.10: cannot open shared object file"))
    monkeypatch.setattr(ort, "InferenceSession", spy)
    _, choice = create_session(md.model_path, "auto", trt_options=TensorRTOptions(cache_dir=tmp_path / "c"),
                               announce=lambda m: None)
    assert made[0] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choice.messages[0] == ("onnxruntime could not start TensorrtExecutionProvider (its libraries did not "
                                  "load: libnvinfer.so.10: cannot open shared object file); using cuda instead")
    assert "tensorrt" not in choice.provider_options and not (tmp_path / "c").exists()

def _prefill_feed(md: ModelDir, dtype) -> dict:
    m = md.manifest
    ids = np.array([[5, 9, 12, 3]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    for i in range(m.num_layers):
        for name in m.past_names(i):
            feed[name] = np.zeros((1, m.model["num_kv_heads"], 0, m.model["head_dim"]), dtype)
    return feed


def test_cuda_attention_kernels_are_pinned(tiny_onnx, monkeypatch):
    """The CUDA EP gets sdpa_kernel (flash | memory-efficient | unfused), so onnxruntime does not auto-pick cuDNN's
    SDPA, which builds a plan per new prompt shape; ONNXPIPE_SDPA_KERNEL overrides it, "default" leaves it out,
    and a caller's own cuda option wins."""
    import onnxruntime as ort

    md = ModelDir.open(tiny_onnx("llama"))
    seen = []
    real = ort.InferenceSession

    def spy(path, so=None, providers=None, **kw):
        seen.append(dict(p for p in providers if isinstance(p, tuple)).get("CUDAExecutionProvider"))
        return real(path, so, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(providers, "available_providers", lambda: ["cuda", "cpu"])
    monkeypatch.setattr(ort, "InferenceSession", spy)
    create_session(md.model_path, "cuda", announce=lambda m: None)
    assert seen[-1]["sdpa_kernel"] == "19"
    create_session(md.model_path, "cuda", announce=lambda m: None, cuda_options={"sdpa_kernel": 8})
    assert seen[-1]["sdpa_kernel"] == "8"
    monkeypatch.setenv("ONNXPIPE_SDPA_KERNEL", "3")
    create_session(md.model_path, "cuda", announce=lambda m: None)
    assert seen[-1]["sdpa_kernel"] == "3"
    monkeypatch.setenv("ONNXPIPE_SDPA_KERNEL", "default")
    create_session(md.model_path, "cuda", announce=lambda m: None)
    assert "sdpa_kernel" not in seen[-1]


def test_whether_tensorrt_loads_is_tried_and_said(tmp_path):
    """onnxruntime lists TensorRT wherever its wheel has it; whether its library loads is what tells (the
    onnxruntime-gpu wheel without TensorRT's libraries: libnvinfer not found)."""
    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    ok, why = providers.tensorrt_loads(tmp_path / "libonnxruntime_providers_tensorrt.so")
    assert not ok and why == "this onnxruntime has no libonnxruntime_providers_tensorrt.so"
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"not a shared object")
    assert providers.tensorrt_loads(fake) == (True, "")  # a failure other than a missing library: onnxruntime's call
    assert providers.tensorrt_loads(capi / "libonnxruntime_providers_shared.so") == (True, "")  # a library that loads
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a library whose dependency is missing")
    (tmp_path / "dep.c").write_text("int dep(void) { return 1; }\n")
    (tmp_path / "probe.c").write_text("int dep(void);\nint probe(void) { return dep(); }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "libdep.so"), str(tmp_path / "dep.c")], check=True)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "libprobe.so"), str(tmp_path / "probe.c"),
                    f"-L{tmp_path}", "-ldep"], check=True)
    (tmp_path / "libdep.so").unlink()  # as libnvinfer is missing where onnxruntime-gpu comes without TensorRT
    ok, why = providers.tensorrt_loads(tmp_path / "libprobe.so")
    assert not ok and why.startswith("libdep.so: cannot open shared object file") and "\n" not in why
    if not (capi / "libonnxruntime_providers_tensorrt.so").is_file():  # this machine's CPU wheel
        assert providers.tensorrt_loads() == (False, "this onnxruntime has no libonnxruntime_providers_tensorrt.so")


@pytest.mark.parametrize("loads", [False, True])
def test_kernels_plan_for_cuda_where_tensorrt_is_listed_but_does_not_load(monkeypatch, loads):
    """`--provider auto` on the usual GPU machine (TensorRT listed, its libraries missing) runs on CUDA, so the
    kernels of our own are planned for CUDA there, and left off only where TensorRT really starts."""
    from onnxpipe.runtime.kernels import plan_kernels

    monkeypatch.setattr(providers, "available_providers", lambda: ["tensorrt", "cuda", "cpu"])
    monkeypatch.setattr(providers, "tensorrt_loads", lambda library=None: (loads, "" if loads else "libnvinfer.so.10"))
    chain = providers.likely_chain("auto")
    assert chain == (["tensorrt", "cuda", "cpu"] if loads else ["cuda", "cpu"])
    assert providers.likely_chain("cuda") == ["cuda", "cpu"] and providers.likely_chain("cpu") == ["cpu"]
    plan = plan_kernels("auto", chain, session_options=None)
    if loads:
        assert plan.target is None and plan.why_off == "provider tensorrt is not CUDA"
    else:
        assert plan.target == "cuda" and plan.why_off is None
    monkeypatch.setattr(providers, "available_providers", lambda: ["cuda", "cpu"])
    assert providers.likely_chain("tensorrt") == ["cuda", "cpu"]  # not listed: never tried
