"""The streamed export's parity check, on a truncated model: a few of the layers, with their real weights.

The ONNX side is the stamped graph of those layers (the same stamping code), each initializer pointing at the very
bytes the whole export wrote for that layer (its offsets in model.onnx.data, taken from the whole graph, so a weight
written to the wrong layer shows). The PyTorch side is transformers' model of the same config cut to those layers,
its weights read from the checkpoint by their Hugging Face names (not through the stamping's bookkeeping). Both run
prefill + decode on a left-padded batch (parity.check_decoders) one after the other, never at once, and onnxruntime
runs with graph optimizations off so that it does not keep widened copies of the fp16 weights.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpipe.artifact import Manifest
from onnxpipe.errors import OnnxpipeError
from onnxpipe.export import stamp
from onnxpipe.export.archs import attention_implementation
from onnxpipe.export.checkpoint import Checkpoint
from onnxpipe.export.exporter import _quiet
from onnxpipe.parity import (
    TOLERANCE,
    ParityReport,
    StepFn,
    Trace,
    compare,
    lazy_ort_step_fn,
    left_padded_batch,
    run_trace,
)
from onnxpipe.runtime.sessions import open_session

LAYER_KEY = re.compile(r"^(?P<prefix>.+\.layers)\.(?P<i>\d+)\.(?P<rest>.+)$")
PROMPTS = (7, 4)  # the prompts' lengths: a left-padded batch of 2, as parity.check_decoders makes it


def truncated_layers(num_layers: int, first: int = 2) -> list[int]:
    """The layers checked: the first ``first`` (where one hands its hidden state and KV to the next) and the last."""
    return sorted(set(range(min(first, num_layers))) | {num_layers - 1})


def reference_trace(ckpt: Checkpoint, cfg: dict[str, Any], layers: list[int], manifest: Manifest, dtype: str,
                    decode_steps: int = 4, seed: int = 0) -> Trace:
    """The PyTorch side of the check: transformers' model of the checkpoint's ``layers`` run on the check's prompts
    (greedy), then freed. It reads the checkpoint alone, so it may run while the weights are being written."""
    sub = _sub_manifest(manifest, len(layers))
    ids, mask = left_padded_batch(sub.model["vocab_size"], PROMPTS, seed)
    step = _lazy_torch(lambda: truncated_torch_model(ckpt, cfg, layers, dtype))
    try:
        return run_trace(step, sub, ids, mask, decode_steps, _kv_dtype(dtype))
    finally:
        step.release()  # type: ignore[attr-defined]


def check_truncated(template: stamp.Template, full: stamp.Stamped, layers: list[int], ckpt: Checkpoint,
                    cfg: dict[str, Any], manifest: Manifest, dtype: str, directory: Path, decode_steps: int = 4,
                    seed: int = 0, reference: Trace | None = None) -> ParityReport:
    """PyTorch (the checkpoint's ``layers``; ``reference``, that trace made earlier by reference_trace with the
    same arguments) against the stamped graph of ``layers`` over the weights ``full`` wrote in ``directory``, as
    parity.check_decoders compares them: the candidate fed the reference's greedy tokens."""
    shapes = {k: e.shape for k, e in ckpt.entries.items()}
    part = stamp.stamp(template, layers, shapes, manifest.model["vocab_size"])
    for j, layer in enumerate(layers):
        for mine, theirs in zip(part.slots[j], full.slots[layer]):
            mine.const_value = theirs.const_value
    for mine, theirs in zip(part.globals, full.globals):
        mine.const_value = theirs.const_value
    graph = ir.serde.serialize_model(part.model).SerializeToString()
    if reference is None:
        reference = reference_trace(ckpt, cfg, layers, manifest, dtype, decode_steps, seed)
    sub = _sub_manifest(manifest, len(layers))
    ids, mask = left_padded_batch(sub.model["vocab_size"], PROMPTS, seed)
    candidate = lazy_ort_step_fn(lambda: _session(graph, directory), sub)
    try:
        got = run_trace(candidate, sub, ids, mask, decode_steps, _kv_dtype(dtype), forced_tokens=reference.tokens)
    finally:
        candidate.release()  # type: ignore[attr-defined]
    return compare(reference, got, PROMPTS).judge(TOLERANCE[dtype])


def _kv_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.float16 if dtype == "fp16" else np.float32)


def _session(graph: bytes, directory: Path) -> Any:
    """onnxruntime over the truncated graph, holding the weights once. ORT's CPU kernels run much of an fp16 graph
    in fp32 through Casts of the weights: optimizations off keeps them from being folded into fp32 copies, the
    priority-based order runs each Cast just before its consumer (the default order ran them all first: 2x the
    weights at once, measured), and without the memory arena each cast is freed after its node."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.log_severity_level = 3
    return open_session(graph, optimization="off", purpose="the truncated parity check", external_data_dir=directory,
                        session_options=so)


def truncated_torch_model(ckpt: Checkpoint, cfg: dict[str, Any], layers: list[int], dtype: str) -> Any:
    """transformers' model of config.json cut to ``layers`` (renumbered 0..k-1), its weights read from ``ckpt``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    with _quiet():
        config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    types = getattr(config, "layer_types", None)
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(layers)
    if types is not None:
        config.layer_types = [types[i] for i in layers]
    with torch.device("meta"), _quiet():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attention_implementation(cfg))
    state = {}
    for key in ckpt.entries:
        m = LAYER_KEY.match(key)
        if m and int(m["i"]) not in layers:
            continue
        name = f"{m['prefix']}.{layers.index(int(m['i']))}.{m['rest']}" if m else key
        state[name] = ckpt.read(key).to(torch_dtype)
    expected = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        table = model.get_input_embeddings().weight
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is table]
        for name in names:
            src = next((n for n in names if n in state), None)
            if name not in state and src is not None:
                state[name] = state[src]
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise OnnxpipeError(f"the checkpoint does not match config.json: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    stamp.init_buffers(model)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise OnnxpipeError("the truncated model has tensors the checkpoint did not fill")
    return model.eval()


def _lazy_torch(make: Any) -> StepFn:
    """verify.torch_step_fn over the model ``make()`` builds on the first step; ``step.release()`` drops it."""
    from onnxpipe.export.verify import torch_step_fn

    state: dict[str, Any] = {}

    def step(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Any) -> Any:
        if "fn" not in state:
            state["fn"] = torch_step_fn(make())
        return state["fn"](input_ids, attention_mask, position_ids, past)

    def release() -> None:
        state.clear()
        gc.collect()  # a transformers model holds reference cycles: free it before onnxruntime loads its copy
        _trim_heap()

    step.release = release  # type: ignore[attr-defined]
    return step


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc keeps freed small blocks, the weights' among them)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _sub_manifest(manifest: Manifest, k: int) -> Manifest:
    g = manifest.graph
    graph = dict(g, inputs=g["inputs"][:3 + 2 * k], outputs=g["outputs"][:1 + 2 * k], kv=dict(g["kv"], num_layers=k))
    return Manifest(model=dict(manifest.model, num_layers=k), graph=graph, tokenizer=manifest.tokenizer)
