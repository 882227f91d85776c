"""Execution-provider choice: ``auto | tensorrt | cuda | cpu``, what actually ran, and the fallbacks on the way.

``create_session`` asks onnxruntime for the providers in order (TensorRT -> CUDA -> CPU for ``auto``), then reads
``session.get_providers()`` back, because onnxruntime itself drops an EP whose libraries fail to load (TensorRT
without libnvinfer, CUDA without a driver) and only logs it. Every fallback is said once, in words, and recorded
in the returned ``ProviderChoice``. When the session ends up on the CPU and the graph is fp16, the graph is
converted to fp32 at load (``fp16_to_fp32``): the CPU has few fp16 kernels and onnxruntime would otherwise wrap
most nodes in Casts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from onnxpipe.errors import OnnxpipeError, first_line
from onnxpipe.runtime.sessions import DISABLED_ORT_OPTIMIZERS, EP_NAME, SHORT_NAME, open_session

__all__ = ["DISABLED_ORT_OPTIMIZERS", "EP_NAME", "SHORT_NAME", "PROVIDERS", "CHAIN", "ProviderChoice", "TensorRTOptions",
           "available_providers", "create_session", "cuda_defaults", "fp16_to_fp32", "likely_chain",
           "tensorrt_loads", "trt_profile_shapes", "trt_provider_options"]

log = logging.getLogger("onnxpipe.runtime")

PROVIDERS = ("auto", "tensorrt", "cuda", "cpu")
# what each request asks onnxruntime for, in order; CPU is always last so a session can always be made
CHAIN = {"auto": ("tensorrt", "cuda", "cpu"), "tensorrt": ("tensorrt", "cuda", "cpu"), "cuda": ("cuda", "cpu"), "cpu": ("cpu",)}
# The CUDA EP's attention kernels, pinned (onnxruntime's sdpa_kernel bitmask: 1 flash, 2 memory-efficient, 16 unfused).
# Left to itself, onnxruntime >= 1.31 prefers cuDNN's SDPA for GroupQueryAttention prompts on Hopper, and cuDNN
# builds an execution plan for every new (batch, length): on an H100 each new prompt length's first prefill took
# 53-97 ms against 3-4 ms for a repeat, which dominated scoring (a new shape almost every batch). Pinning the
# kernels keeps ORT's own flash attention. ONNXPIPE_SDPA_KERNEL=N sets another mask; "default" leaves ORT's choice.
SDPA_KERNEL = "19"


def cuda_defaults() -> dict[str, str]:
    value = os.environ.get("ONNXPIPE_SDPA_KERNEL", SDPA_KERNEL)
    return {} if value == "default" else {"sdpa_kernel": value}

# dynamic axes of the exported graphs (see export/wrapper.py) -> which TensorRT profile range they take
_AXIS_RANGE = {
    "batch_size": "batch",
    "sequence_length": "sequence",
    "past_sequence_length": "past",
    "total_sequence_length": "total",
}


@dataclass
class TensorRTOptions:
    """TensorRT EP settings. Engines are built per optimization profile, so the dynamic axes get one profile wide
    enough for prefill and decode (min / opt / max below) and engines plus the timing cache are kept on disk:
    a second load with the same shapes and ``cache_dir`` does not rebuild."""

    fp16: bool = True
    int8: bool = False
    int8_calibration_table: str | None = None  # only for graphs without Q/DQ nodes; Q/DQ graphs need none
    cache_dir: str | os.PathLike[str] | None = None  # engine cache and timing cache; None: no caching
    max_workspace_bytes: int | None = None
    builder_optimization_level: int | None = None  # 0..5, TensorRT's default is 3
    max_batch: int = 8
    opt_batch: int = 1
    max_total_length: int = 2048  # prompt + generated tokens
    opt_total_length: int = 512  # decode shapes are tuned for this cache length
    profiles: bool = True  # write trt_profile_*_shapes (needs the graph's inputs)
    extra: dict[str, str] = field(default_factory=dict)  # any other trt_* option, passed through

    def ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each kind of dynamic axis. opt is the decode step: one new token, a long past."""
        if not (1 <= self.opt_batch <= self.max_batch and 2 <= self.opt_total_length <= self.max_total_length):
            raise OnnxpipeError(
                f"TensorRT profile: need 1 <= opt_batch ({self.opt_batch}) <= max_batch ({self.max_batch}) and "
                f"2 <= opt_total_length ({self.opt_total_length}) <= max_total_length ({self.max_total_length})"
            )
        return {
            "batch": (1, self.opt_batch, self.max_batch),
            "sequence": (1, 1, self.max_total_length),
            "past": (0, self.opt_total_length - 1, self.max_total_length - 1),
            "total": (1, self.opt_total_length, self.max_total_length),
        }


def trt_profile_shapes(graph_inputs: Sequence[dict[str, Any]], options: TensorRTOptions) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` for the graph's inputs (the manifest's ``graph["inputs"]`` entries:
    name, dtype, shape with dim names or sizes). Every dynamic input must be named, or TensorRT rejects the
    profile; an axis name this runtime does not know is an error, not a guess."""
    ranges = options.ranges()
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for inp in graph_inputs:
        dims = inp["shape"]
        if all(isinstance(d, int) and d > 0 for d in dims):
            continue  # static input: TensorRT needs no profile for it
        per_level: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for d in dims:
            if isinstance(d, int) and d > 0:
                fixed = (d, d, d)
            elif d in _AXIS_RANGE:
                fixed = ranges[_AXIS_RANGE[d]]
            else:
                raise OnnxpipeError(
                    f"TensorRT profile: input {inp['name']!r} has a dynamic axis {d!r} this runtime has no range for "
                    f"(known: {', '.join(_AXIS_RANGE)}); pass profiles=False and the trt_profile_* options in extra"
                )
            for level, value in zip(("min", "opt", "max"), fixed):
                per_level[level].append(value)
        for level in shapes:
            shapes[level].append(f"{inp['name']}:{'x'.join(str(v) for v in per_level[level])}")
    return {f"trt_profile_{level}_shapes": ",".join(items) for level, items in shapes.items()}


def trt_provider_options(options: TensorRTOptions, graph_inputs: Sequence[dict[str, Any]] | None = None) -> dict[str, str]:
    """The provider-options dict onnxruntime's TensorRT EP takes (all values strings)."""
    opts: dict[str, str] = {
        "trt_fp16_enable": _flag(options.fp16),
        "trt_int8_enable": _flag(options.int8),
    }
    if options.int8 and options.int8_calibration_table:
        opts["trt_int8_calibration_table_name"] = str(options.int8_calibration_table)
    if options.cache_dir is not None:
        cache = str(Path(options.cache_dir).absolute())
        opts.update({
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": cache,
        })
    if options.max_workspace_bytes is not None:
        opts["trt_max_workspace_size"] = str(int(options.max_workspace_bytes))
    if options.builder_optimization_level is not None:
        opts["trt_builder_optimization_level"] = str(int(options.builder_optimization_level))
    if options.profiles:
        if graph_inputs is None:
            raise OnnxpipeError("TensorRT profiles need the graph's inputs (a manifest); pass profiles=False to skip them")
        opts.update(trt_profile_shapes(graph_inputs, options))
    opts.update({k: str(v) for k, v in options.extra.items()})
    return opts


@dataclass
class ProviderChoice:
    """What was asked for, what runs, and why they differ."""

    requested: str  # auto | tensorrt | cuda | cpu
    used: str  # tensorrt | cuda | cpu: the first provider of the live session
    session_providers: list[str]  # session.get_providers(), as onnxruntime reports them
    messages: list[str] = field(default_factory=list)  # one line per fallback or conversion
    fp32_compute: bool = False  # an fp16 graph converted to fp32 for the CPU
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.used == "cpu" else "cuda"

    @property
    def fell_back(self) -> bool:
        return self.requested != "auto" and self.used != self.requested

    def summary(self) -> str:
        extra = " (fp16 graph run in fp32)" if self.fp32_compute else ""
        return f"provider: {self.used}{extra} [requested {self.requested}; session: {', '.join(self.session_providers)}]"


def available_providers() -> list[str]:
    """Short names (tensorrt, cuda, cpu) that this onnxruntime build lists; listed is not yet loadable."""
    import onnxruntime as ort

    return [SHORT_NAME[p] for p in ort.get_available_providers() if p in SHORT_NAME]


def tensorrt_loads(library: str | os.PathLike[str] | None = None) -> tuple[bool, str]:
    """Whether onnxruntime's TensorRT EP can start here, and why not: onnxruntime lists the EP wherever its wheel has
    it, so only loading its library tells. False where the library is absent or a library it needs cannot be found
    (the usual onnxruntime-gpu wheel without TensorRT: libnvinfer); any other failure to load it here leaves the
    answer to onnxruntime (True). The shared provider library is loaded first, globally, as onnxruntime loads it;
    a library that loads stays in the process, as onnxruntime would load it anyway. ``library``: another file."""
    import ctypes

    if library is None:
        import onnxruntime as ort

        library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_tensorrt.so"
    library = Path(library)
    if not library.is_file():
        return False, f"this onnxruntime has no {library.name}"
    try:
        shared = library.parent / "libonnxruntime_providers_shared.so"
        if shared.is_file():
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(library))
    except OSError as e:
        text = first_line(e, 200)
        if "cannot open shared object file" in text:
            return False, text
    return True, ""


def likely_chain(provider: str) -> list[str]:
    """The providers a session asked for ``provider`` will run on, in order: the chain's listed ones, TensorRT left
    out where its library does not load here (the usual onnxruntime-gpu wheel without TensorRT's libraries). What
    in-memory edits for one EP plan by (the kernels of our own are CUDA kernels); the session itself still says what
    it ran on."""
    listed = set(available_providers())
    chain = [p for p in CHAIN.get(provider, ("cpu",)) if p in listed or p == "cpu"]
    _drop_tensorrt_that_cannot_load(chain)
    return chain


def _drop_tensorrt_that_cannot_load(chain: list[str]) -> str | None:
    """Where ``chain`` has TensorRT and its library does not load here, TensorRT taken out of it; why, or None."""
    if "tensorrt" not in chain:
        return None
    loads, why = tensorrt_loads()
    if loads:
        return None
    chain.remove("tensorrt")
    return why


def create_session(
    model_path: str | os.PathLike[str],
    provider: str = "auto",
    *,
    trt_options: TensorRTOptions | None = None,
    cuda_options: dict[str, Any] | None = None,
    threads: int | None = None,
    graph_inputs: Sequence[dict[str, Any]] | None = None,
    dtype: str | None = None,
    fp32_on_cpu: bool = True,
    session_options: Any = None,
    announce: Callable[[str], None] | None = None,
    edit: Callable[[Any], None] | None = None,
) -> tuple[Any, ProviderChoice]:
    """An onnxruntime InferenceSession on the best provider of ``provider``'s chain, and what it really runs on.

    graph_inputs: the manifest's ``graph["inputs"]`` (for TensorRT profiles); read from the model directory's
    manifest beside ``model_path`` when not given. dtype: the graph's float type ("fp32", "fp16"); read from the
    manifest or the graph when not given. announce: where the one summary line and the fallback lines go
    (default: the ``onnxpipe.runtime`` logger, fallbacks as warnings so they show without logging set up).
    """
    import onnxruntime as ort

    model_path = Path(model_path)
    if provider not in PROVIDERS:
        raise OnnxpipeError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if not model_path.is_file():
        raise OnnxpipeError(f"{model_path}: no such model file")
    manifest_graph = _manifest_graph(model_path)
    graph_inputs = graph_inputs if graph_inputs is not None else manifest_graph.get("inputs")
    dtype = dtype or manifest_graph.get("dtype")
    if dtype not in ("fp32", "fp16"):  # quantized graphs: what matters is the float type of their activations
        dtype = _graph_float_type(model_path)

    messages: list[str] = []
    listed = set(available_providers())
    chain = [p for p in CHAIN[provider] if p in listed or p == "cpu"]
    skipped = [p for p in CHAIN[provider] if p not in chain]
    if skipped and provider != "auto":
        messages.append(
            f"{provider} was requested but this onnxruntime build has no {', '.join(EP_NAME[p] for p in skipped)} "
            f"(it has {', '.join(ort.get_available_providers())}); using {chain[0]} instead"
        )

    # listed is not loadable: where its library cannot load, TensorRT is not asked for at all (no second session,
    # none of onnxruntime's own error dump)
    why = _drop_tensorrt_that_cannot_load(chain)
    if why is not None:
        messages.append(f"onnxruntime could not start TensorrtExecutionProvider (its libraries did not load: {why}); "
                        f"using {chain[0]} instead")

    provider_options: dict[str, dict[str, str]] = {}
    if "tensorrt" in chain:
        provider_options["tensorrt"] = trt_provider_options(
            trt_options or TensorRTOptions(), graph_inputs if (trt_options is None or trt_options.profiles) else None
        )
        cache = (trt_options or TensorRTOptions()).cache_dir
        if cache is not None:
            Path(cache).mkdir(parents=True, exist_ok=True)
    if "cuda" in chain:
        provider_options["cuda"] = {"device_id": "0", **cuda_defaults(),
                                    **{k: str(v) for k, v in (cuda_options or {}).items()}}

    _refuse_cpu_attention_form(model_path, manifest_graph, chain)
    fp32 = fp32_on_cpu and dtype == "fp16"
    # an EP that onnxruntime lists but cannot start is dropped by it: open_session says so in messages
    make = lambda chain, convert: _make(  # noqa: E731
        model_path, chain, provider_options, session_options, threads, convert, edit, messages.append)
    session = make(chain, fp32 and chain == ["cpu"])
    live = [SHORT_NAME.get(p, p) for p in session.get_providers()]
    used = live[0] if live and live[0] in EP_NAME else "cpu"
    converted = fp32 and chain == ["cpu"]
    if fp32 and used == "cpu" and not converted:
        # ORT fell back to the CPU on its own: rebuild the session on an fp32 copy of the graph
        session = make(["cpu"], True)
        converted = True
    if converted:
        messages.append("the graph is fp16 and runs on the CPU: converted to fp32 at load (fp32 compute)")

    choice = ProviderChoice(
        requested=provider,
        used=used,
        session_providers=list(session.get_providers()),
        messages=messages,
        fp32_compute=converted,
        provider_options={k: v for k, v in provider_options.items() if k in live},
    )
    _announce(choice, announce)
    return session, choice


def _refuse_cpu_attention_form(model_path: Path, graph: dict[str, Any], chain: list[str]) -> None:
    """A graph optimized for the CPU whose GroupQueryAttention takes the padding as an attention bias cannot run
    on the CUDA EP (its kernel has no attention_bias): say so before onnxruntime fails mid-generation."""
    if chain[0] == "cpu" or graph.get("target", "cpu") != "cpu":
        return
    if "GroupQueryAttention" in (graph.get("fused_ops") or []):
        raise OnnxpipeError(
            f"{model_path}: this graph was optimized for the CPU (its GroupQueryAttention takes an attention bias, "
            f"which onnxruntime's CUDA kernel lacks); optimize the exported model with --target cuda for "
            f"{chain[0]}, or run it with --provider cpu")


def _make(model_path: Path, chain: list[str], provider_options: dict[str, dict[str, str]], session_options: Any,
          threads: int | None, convert: bool, edit: Callable[[Any], None] | None,
          report: Callable[[str], None]) -> Any:
    """The session over ``chain`` (short names, in order): the graph as it is on disk, or loaded and edited in
    memory (its weights stay in their files), or with ``convert`` an fp32 copy of it for the CPU."""
    providers = [(EP_NAME[p], provider_options[p]) if p in provider_options else EP_NAME[p] for p in chain]
    model: Any = model_path
    folder = None
    if convert or edit is not None:
        import onnx

        model = onnx.load(str(model_path), load_external_data=convert)  # fp32: the weights are converted too
        if convert:
            fp16_to_fp32(model)
        else:
            folder = model_path.parent
        if edit is not None:
            edit(model)
    return open_session(model, providers, optimization=None, threads=threads, session_options=session_options,
                        external_data_dir=folder, fallback="report", announce=report, name=str(model_path))


def _announce(choice: ProviderChoice, announce: Callable[[str], None] | None) -> None:
    if announce is not None:
        for m in choice.messages:
            announce(m)
        announce(choice.summary())
        return
    for m in choice.messages:
        log.warning(m)
    log.info(choice.summary())


def _flag(value: bool) -> str:
    return "True" if value else "False"


def _manifest_graph(model_path: Path) -> dict[str, Any]:
    mf = model_path.parent / "onnxpipe.json"
    if not mf.is_file():
        return {}
    try:
        return dict(json.loads(mf.read_text()).get("graph") or {})
    except (ValueError, AttributeError):
        return {}


def _graph_float_type(model_path: Path) -> str:
    """fp16 when the graph's float inputs/outputs are float16 (read without the external weights)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    types = {v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
    return "fp16" if onnx.TensorProto.FLOAT16 in types else "fp32"


# ---- fp16 -> fp32 for the CPU ----

def fp16_to_fp32(model: Any) -> int:
    """Rewrite an onnx.ModelProto in place so that every float16 tensor is float32: initializers, constants,
    Cast targets, dtype attributes and the I/O / value_info types (subgraphs included). Returns how many items
    were changed. Numerics: fp16 values are exact in fp32, so the fp32 graph computes what the fp16 one meant,
    with fp32 rounding."""
    import onnx

    count = 0
    for graph in _graphs(model.graph):
        for init in graph.initializer:
            count += _tensor_to_fp32(init)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            tt = vi.type.tensor_type
            if tt.elem_type == onnx.TensorProto.FLOAT16:
                tt.elem_type = onnx.TensorProto.FLOAT
                count += 1
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    count += _tensor_to_fp32(attr.t)
                elif attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == onnx.TensorProto.FLOAT16:
                    attr.i = onnx.TensorProto.FLOAT
                    count += 1
    return count


def _graphs(graph: Any):
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _tensor_to_fp32(t: Any) -> int:
    import onnx
    from onnx import numpy_helper

    if t.data_type != onnx.TensorProto.FLOAT16:
        return 0
    arr = numpy_helper.to_array(t).astype("float32")
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return 1
