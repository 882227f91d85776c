"""The one place an onnxruntime InferenceSession is made: ``open_session``.

Every session of onnxpipe (the runtime's decoder and its helper graphs, the reference and candidate sides of a
parity check, quantization statistics, scoring) comes from here, so its options are set in one place:

- graph optimizations: ``optimization="off"`` for the reference side of a check (what the graph says, not what ORT
  rewrote it to), ``"basic"``/``"extended"``/``"all"`` otherwise (``"all"`` is onnxruntime's default);
- threads (``intra_op_num_threads``), the log level (errors only; ``ONNXPIPE_ORT_LOG=1`` shows onnxruntime's own
  log), session config entries, initializers handed over as OrtValues, the folder of external weights;
- the ORT optimizers that are always off (``DISABLED_ORT_OPTIMIZERS``);
- the providers, with their options, and what became of them: onnxruntime drops a requested EP it cannot start
  (not in this build, or its libraries do not load) and only logs it. Here that is an error
  (``fallback="error"``, the default) or one line said through ``announce`` (``fallback="report"``), never silent.
  ``CPUExecutionProvider`` is always there: listed after another EP it runs the nodes that EP has no kernel for.

A model is a path, serialized bytes or an ``onnx.ModelProto``; a ModelProto too large for one protobuf (2 GiB) is
saved with external data in a temporary directory that lives as long as the session.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, Union

from onnxpipe.errors import OnnxpipeError, first_line

log = logging.getLogger("onnxpipe.runtime")

CPU = "CPUExecutionProvider"
EP_NAME = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": CPU}
SHORT_NAME = {v: k for k, v in EP_NAME.items()}
Optimization = Literal["off", "basic", "extended", "all"]
OPTIMIZATIONS: tuple[str, ...] = ("off", "basic", "extended", "all")
Provider = Union[str, tuple[str, Mapping[str, Any]]]  # "cuda" or "CUDAExecutionProvider", optionally with options

# ORT's CUDA-only GroupQueryAttentionFusion rewrites GroupQueryAttention nodes fed by RotaryEmbedding; on a node
# with more than 9 inputs it leaves a malformed node behind ("The sum of input arg count is not equal to size of
# input defs", onnxruntime-gpu 1.31.1). optimize --target cuda does that folding itself, so it is always off.
DISABLED_ORT_OPTIMIZERS = ["GroupQueryAttentionFusion"]
# a ModelProto at least this large goes through disk: protobuf cannot serialize 2 GiB in one message
PROTO_INLINE_BYTES = 1_800_000_000


def open_session(
    model: str | os.PathLike[str] | bytes | Any,
    providers: Sequence[Provider] = ("cpu",),
    *,
    optimization: Optimization | None = "all",
    threads: int | None = None,
    purpose: str = "",
    fallback: Literal["error", "report"] = "error",
    announce: Callable[[str], None] | None = None,
    config: Mapping[str, str] | None = None,
    external_initializers: Mapping[str, Any] | None = None,
    external_data_dir: str | os.PathLike[str] | None = None,
    session_options: Any = None,
    raw_errors: bool = False,
    name: str | None = None,
) -> Any:
    """An onnxruntime InferenceSession over ``model`` on ``providers`` (in order of preference).

    optimization: the graph optimization level; None leaves ``session_options``' own (ORT's default: all).
    threads: intra-op threads (None: onnxruntime's default, one per core). purpose: a few words for messages
    ("the reference of a parity check"). fallback: what a requested provider that does not run is: an error, or
    one line through ``announce`` (default: a warning on the ``onnxpipe.runtime`` logger) and the next provider.
    config: session config entries. external_initializers: name -> OrtValue (or numpy array) that onnxruntime
    reads in place; they are kept alive with the session. external_data_dir: where the weights of a model given
    as bytes or a ModelProto live (its external-data locations are relative to it). session_options: a caller's
    SessionOptions to start from (this function sets only what its arguments ask for, plus the log level).
    raw_errors: let onnxruntime's own exception through when the graph does not load (for a caller that
    classifies it, e.g. as out of memory); by default it becomes a one-line OnnxpipeError. name: what messages
    call the model (default: its path, or the graph's name).
    """
    import onnxruntime as ort

    requested = [_provider_entry(p) for p in providers]
    if optimization is not None and optimization not in OPTIMIZATIONS:
        raise OnnxpipeError(f"unknown graph optimization level {optimization!r}; choose one of {', '.join(OPTIMIZATIONS)}")
    _quiet_default_logger(ort)
    so = _session_options(ort, session_options, optimization, threads, config, external_data_dir)
    keep: list[Any] = []
    if external_initializers:
        names = list(external_initializers)
        keep = [_ort_value(ort, external_initializers[n]) for n in names]
        so.add_external_initializers(names, keep)
    source, tmp = _source(model)
    name = name or _name(model)
    def make(entries: list[tuple[str, dict[str, str]]]) -> Any:
        try:
            return ort.InferenceSession(source, so, providers=[(p, dict(o)) if o else p for p, o in entries],
                                        disabled_optimizers=DISABLED_ORT_OPTIMIZERS)
        except (MemoryError, OSError):
            raise
        except Exception as e:  # onnxruntime's own Fail/InvalidGraph types: all mean "this graph does not load"
            if raw_errors:
                raise
            text = first_line(e)
            first = SHORT_NAME.get(entries[0][0], entries[0][0]) if entries else "cpu"
            for_what = f" for {purpose}" if purpose else ""
            raise OnnxpipeError(f"{name}: onnxruntime could not load the graph{for_what} on {first}: {text}") from None

    session = make(requested)
    dropped = missing_providers(session, [p for p, _ in requested])
    if dropped is not None:
        what, used = dropped
        if fallback == "error":
            for_what = f" ({purpose})" if purpose else ""
            raise OnnxpipeError(f"{name}{for_what}: onnxruntime could not start {what}; it would run on {used}: pass "
                                f"a provider that runs here")
        # where an EP fails to start, onnxruntime's Python retries on its default providers with no options at all
        # (a CUDA EP without enable_cuda_graph, its attention kernel choice, ...): the session is made again on
        # the requested providers that did start, each with its own options
        live, kept = set(session.get_providers()), session.get_provider_options()
        rest = [(p, o) for p, o in requested if p in live or p == CPU]
        if any(kept.get(p, {}).get(k) != v for p, o in rest for k, v in o.items()):
            del session  # its device memory goes before the second session takes its own
            session = make(rest)
            dropped = missing_providers(session, [p for p, _ in rest]) or dropped
            what, used = dropped
        (announce or log.warning)(f"onnxruntime could not start {what}; using {used} instead")
    session._onnxpipe_keep = (keep, tmp)  # ORT reads these in place: they live as long as the session
    return session


def reference_session(model: str | os.PathLike[str] | bytes | Any, providers: Sequence[Provider] = ("cpu",),
                      **options: Any) -> Any:
    """The reference side of a check: ``open_session`` with graph optimizations off, so the check compares what
    the graph says, not what onnxruntime rewrote it to."""
    return open_session(model, providers, optimization="off", purpose=options.pop("purpose", "the reference of a check"),
                        **options)


def missing_providers(session: Any, requested: Sequence[str]) -> tuple[str, str] | None:
    """(which requested providers (full names) ``session`` does not run on and why, in words; the provider it
    uses instead), or None when every one of them is live. The CPU EP is never missing: onnxruntime adds it."""
    import onnxruntime as ort

    live = list(session.get_providers())
    dropped = [p for p in requested if p not in live and p != CPU]
    if not dropped:
        return None
    listed = set(ort.get_available_providers())
    absent = [p for p in dropped if p not in listed]
    failed = [p for p in dropped if p in listed]
    why = []
    if absent:
        why.append(f"{', '.join(absent)} (this onnxruntime build lacks it; it has {', '.join(sorted(listed))})")
    if failed:
        why.append(f"{', '.join(failed)} (its libraries did not load; run with ONNXPIPE_ORT_LOG=1 for onnxruntime's "
                   f"own error)")
    return " and ".join(why), SHORT_NAME.get(live[0], live[0]) if live else "cpu"


def ep_name(provider: str) -> str:
    """The onnxruntime name of a provider given short (cuda) or full (CUDAExecutionProvider)."""
    if provider in EP_NAME:
        return EP_NAME[provider]
    if provider.endswith("ExecutionProvider"):
        return provider
    raise OnnxpipeError(f"unknown execution provider {provider!r}; choose one of {', '.join(EP_NAME)} "
                        "or an onnxruntime provider name")


def _provider_entry(p: Provider) -> tuple[str, dict[str, str]]:
    if isinstance(p, tuple):
        return ep_name(p[0]), {k: str(v) for k, v in p[1].items()}
    return ep_name(p), {}



def _quiet_default_logger(ort: Any) -> None:
    """onnxruntime's process-wide logger warns beside the session's own, e.g. on every CUDA session of 1.31 ("No
    registered plugin EP device found for 'CUDAExecutionProvider'"): errors only, as the sessions' own logs, since
    onnxpipe's lines say what matters once; ``ONNXPIPE_ORT_LOG=1`` leaves it as onnxruntime set it."""
    if not os.environ.get("ONNXPIPE_ORT_LOG"):
        ort.set_default_logger_severity(3)


def _session_options(ort: Any, base: Any, optimization: str | None, threads: int | None,
                     config: Mapping[str, str] | None, external_data_dir: str | os.PathLike[str] | None) -> Any:
    so = base if base is not None else ort.SessionOptions()
    if optimization is not None:
        so.graph_optimization_level = {
            "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    # our own messages say what matters once; a caller's SessionOptions keeps its level
    if base is None:
        so.log_severity_level = 3
    if os.environ.get("ONNXPIPE_ORT_LOG"):
        so.log_severity_level = 1
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, str(value))
    if external_data_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    return so


def _source(model: Any) -> tuple[Any, Any]:
    """What InferenceSession takes (a path string or bytes), and a temporary directory to keep alive or None."""
    if isinstance(model, (str, os.PathLike)):
        return str(model), None
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), None
    if not hasattr(model, "SerializeToString"):
        raise OnnxpipeError(f"open_session takes a model path, bytes or an onnx.ModelProto, not {type(model).__name__}")
    if model.ByteSize() < PROTO_INLINE_BYTES:
        return model.SerializeToString(), None
    import onnx

    # its weights already outside it (in a model directory) would then be looked for beside the temporary file, or,
    # with the session's external-data folder set, its moved ones in that directory: either reads the wrong bytes
    outside = next((t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL), None)
    if outside is not None:
        raise OnnxpipeError(f"an in-memory graph of {model.ByteSize() >> 20} MiB with weights both inline and in "
                            f"files (e.g. {outside!r}) cannot be opened: protobuf takes at most 2 GiB in one message")

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data moves the weights out of the proto it is given
    tmp = tempfile.TemporaryDirectory(prefix="onnxpipe-session-")
    path = Path(tmp.name) / "model.onnx"
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return str(path), tmp


def _name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    graph = getattr(model, "graph", None)
    return f"in-memory graph {graph.name!r}" if graph is not None and graph.name else "in-memory graph"


def _ort_value(ort: Any, value: Any) -> Any:
    if isinstance(value, ort.OrtValue):
        return value
    import numpy as np

    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
