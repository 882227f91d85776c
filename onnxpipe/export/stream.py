"""The streamed export: a decoder traced as a one-layer slice, stamped to its depth (stamp.py), its weights
streamed from the safetensors checkpoint into the external data file one tensor at a time, and the result checked
end to end on a truncated model (truncated.py).

Memory: the slice (one layer of random weights), one weight tensor at a time (plus its converted block), and the
truncated model of the check; never the whole model. Disk: the weights once, in the export's dtype.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO, Callable

import onnx_ir as ir

from onnxpipe.artifact import (
    MODEL_FILE,
    ModelDir,
    atomic_output_dir,
    check_output_dir,
    check_sidecar_links,
    copy_tokenizer_files,
    write_manifest,
)
from onnxpipe.errors import OnnxpipeError
from onnxpipe.export import stamp
from onnxpipe.export.archs import attention_implementation, describe, layer_types
from onnxpipe.export.checkpoint import Checkpoint
from onnxpipe.export.exporter import (
    ExportResult,
    _build_manifest,
    _check_onnx,
    _quiet,
    _versions,
    hf_source_root,
    read_hf_config,
    trace_decoder,
)
from onnxpipe.export.placement import check_placement
from onnxpipe.genai_config import write_genai_config
from onnxpipe.outputs import check_io_paths

DATA_FILE = MODEL_FILE + ".data"
ALIGN = 64  # every tensor's offset; a large one's to the allocation granularity, as onnx_ir aligns them
ALIGN_LARGE, LARGE = 65536, 1 << 20
BLOCK_BYTES = 64 << 20  # a tensor is converted (and transposed) this many source bytes at a time
# threads reading and converting tensors, half the cores (6 at most): at most WORKERS + 1 tensors are in memory, each
# with its converted copy (an 8B shape's table and head are 1 GB each in bf16)
WORKERS = max(1, min(6, (os.cpu_count() or 2) // 2))


@dataclass
class Traced:
    """The slice's template and what the manifest needs from the slice."""

    template: stamp.Template
    info: dict[str, Any]
    seconds: float


def trace_template(config: Any, cfg: dict[str, Any], dtype: str, opset: int) -> Traced:
    """Trace the one-layer slice of ``config`` and find its layer; raises StampUnsupported when it cannot be
    stamped. ``info`` describes the whole model (the slice's module facts, the config's sizes)."""
    start = time.perf_counter()
    sliced, vocab = stamp.slice_config(config)
    with _quiet():
        model = stamp.build_slice_model(sliced, dtype, attention_implementation(cfg))
    info = describe(sliced, model)
    program = trace_decoder(model, info, opset)
    template = stamp.find_template(program.model, model, vocab)
    del program, model
    text = config.get_text_config(decoder=True)
    info.update(num_layers=int(text.num_hidden_layers), vocab_size=int(text.vocab_size),
                layer_types=layer_types(text) or [])
    return Traced(template, info, time.perf_counter() - start)


def write_weights(stamped: stamp.Stamped, ckpt: Checkpoint, data_path: Path, dtype: str,
                  log: Callable[[str], None] = lambda m: None) -> int:
    """Append every initializer's weight to ``data_path`` (converted to ``dtype``, transposed where the graph keeps
    it so) and point the initializer at it. Each source tensor is read once, in file order; WORKERS threads read and
    convert the next tensors while this one is written (one loop doing it all streamed 0.35 GB/s on the 16 cores of
    the GPU host, far below what the memory moves). Returns the bytes written."""
    by_source: dict[str, list[ir.Value]] = {}
    for v in [*stamped.globals, *(v for slot in stamped.slots for v in slot)]:
        by_source.setdefault(stamped.weights[v.name or ""].source, []).append(v)
    order = sorted(by_source, key=lambda s: (str(ckpt.entry(s).file), ckpt.entry(s).start))
    total = sum(ckpt.entry(s).nbytes * len(by_source[s]) for s in order)
    done, shown, start = 0, 0, time.perf_counter()
    last = start

    def convert(source: str) -> list[tuple[ir.Value, list[Any]]]:
        tensor = ckpt.read(source)
        return [(v, _convert(tensor, stamped.weights[v.name or ""], dtype, source)) for v in by_source[source]]

    with open(data_path, "wb") as fh, ThreadPoolExecutor(max_workers=WORKERS) as pool:
        sources = iter(order)
        pending: deque[Any] = deque()
        for source in itertools.islice(sources, WORKERS + 1):
            pending.append((source, pool.submit(convert, source)))
        i = 0
        while pending:
            source, future = pending.popleft()
            forms = future.result()
            for nxt in itertools.islice(sources, 1):
                pending.append((nxt, pool.submit(convert, nxt)))
            for v, blocks in forms:
                offset = _pad(fh, ckpt.entry(source).nbytes)
                for block in blocks:
                    fh.write(memoryview(block).cast("B"))
                length = fh.tell() - offset
                shape = list(stamp._dims(v.const_value.shape)) if v.const_value is not None else []
                v.const_value = ir.ExternalTensor(DATA_FILE, offset, length, v.dtype or ir.DataType.FLOAT,
                                                  shape=ir.Shape(shape), name=v.name or "", base_dir=data_path.parent)
                done += ckpt.entry(source).nbytes
            del forms
            i += 1
            tenth, now = 10 * done // max(total, 1), time.perf_counter()
            if (tenth > shown and now - last >= 2.0) or i == len(order):  # every tenth at most, and the end
                shown, last = tenth, now
                log(f"writing weights: {i}/{len(order)} tensors, {done / 1e9:.2f}/{total / 1e9:.2f} GB read "
                    f"({time.perf_counter() - start:.1f}s)")
        return fh.tell()


def _pad(fh: BinaryIO, nbytes: int) -> int:
    pos = fh.tell()
    align = ALIGN_LARGE if nbytes >= LARGE else ALIGN
    aligned = -(-pos // align) * align
    if aligned != pos:
        fh.write(b"\0" * (aligned - pos))
    return aligned


def _write_converted(fh: BinaryIO, tensor: Any, w: stamp.Weight, dtype: str, source: str) -> None:
    for block in _convert(tensor, w, dtype, source):
        fh.write(memoryview(block).cast("B"))


def _convert(tensor: Any, w: stamp.Weight, dtype: str, source: str) -> list[Any]:
    """``tensor`` (2-D transposed when ``w.transpose``) as ``dtype``: numpy blocks of rows of the result."""
    import torch

    target = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    out = tensor.t() if w.transpose else tensor
    if out.dim() == 0:
        out = out.reshape(1)
    row_bytes = max(out[0].numel() * tensor.element_size(), 1) if out.shape[0] else 1
    step = max(1, BLOCK_BYTES // row_bytes)
    blocks = []
    for r0 in range(0, out.shape[0], step):
        block = out[r0:r0 + step].to(target).contiguous()
        if target == torch.float16 and not bool(torch.isfinite(block).all()):
            bad = int((~torch.isfinite(block)).sum())
            raise OnnxpipeError(f"weight {source}: {bad} values do not fit fp16 (beyond +-65504 or not finite); "
                                "export with --dtype fp32")
        blocks.append(block.numpy())
    return blocks


def save_graph(model: ir.Model, path: Path) -> None:
    """Write the graph (its weights already external) to ``path``."""
    proto = ir.serde.serialize_model(model)
    path.write_bytes(proto.SerializeToString())


def export_stamped(
    src: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    opset: int = 18,
    verify: bool = True,
    force: bool = False,
    decode_steps: int = 4,
    parity_layers: int = 2,
    log: Callable[[str], None] = lambda msg: None,
) -> ExportResult:
    """Export the Hugging Face directory ``src`` (safetensors weights; a family of stamp.STAMPED_MODEL_TYPES) to
    ``out_dir`` by stamping a traced one-layer slice and streaming the weights; nothing is left behind on failure.
    Raises StampUnsupported (before writing anything) when the slice cannot be stamped."""
    from transformers import AutoConfig, GenerationConfig

    src, out_dir = Path(src), Path(out_dir)
    root = hf_source_root(src)
    check_sidecar_links(src, root)
    cfg = read_hf_config(src)
    check_io_paths([src], out_dir)
    check_output_dir(out_dir, force)
    start = time.perf_counter()
    with Checkpoint.open(src, root) as ckpt:
        with _quiet():
            config = AutoConfig.from_pretrained(str(src))
        stamp.slice_config(config)  # refuses what cannot be stamped, before any output
        check_weights(config, ckpt, src)
        log("export method: stamped (one layer traced, the weights streamed from the checkpoint)")
        log(f"tracing a 1-layer slice of {config.model_type} (random weights, {dtype})...")
        traced = trace_template(config, cfg, dtype, opset)
        info = traced.info
        n = info["num_layers"]
        log(f"traced in {traced.seconds:.1f}s: {len(traced.template.layer_nodes)} nodes per layer; "
            f"{info['architecture']} ({info['family']}): {n} layers, hidden {info['hidden_size']}, "
            f"{info['num_attention_heads']} heads / {info['num_kv_heads']} KV heads, {dtype}")
        shapes = {k: e.shape for k, e in ckpt.entries.items()}
        log(f"stamping {n} layers...")
        stamped = stamp.stamp(traced.template, _layer_order(n), shapes, info["vocab_size"])
        with atomic_output_dir(out_dir, force=force, inputs=[src]) as tmp:
            onnx_path = tmp / MODEL_FILE
            written = write_weights(stamped, ckpt, tmp / DATA_FILE, dtype, log)
            save_graph(stamped.model, onnx_path)
            export_s = time.perf_counter() - start
            log(f"exported in {export_s:.1f}s ({written / 1e9:.2f} GB of weights, external data)")
            _check_onnx(onnx_path)
            config.dtype = {"fp32": "float32", "fp16": "float16"}[dtype]
            gen = GenerationConfig.from_pretrained(str(src)) if (src / "generation_config.json").is_file() \
                else GenerationConfig.from_model_config(config)
            manifest = _build_manifest(onnx_path, info, dtype, opset, True, src,
                                       SimpleNamespace(config=config, generation_config=gen))
            manifest.tokenizer["files"] = copy_tokenizer_files(src, tmp, root=root)
            config.save_pretrained(tmp)
            step: dict[str, Any] = {
                "stage": "export",
                "params": {"source": str(src.absolute()), "dtype": dtype, "opset": opset, "external_data": True,
                           "method": "stamped"},
                "versions": _versions(),
                "seconds": round(export_s, 2),
            }
            if verify:
                from onnxpipe.export.truncated import check_truncated, truncated_layers

                placement = check_placement(stamped, ckpt, tmp / DATA_FILE, dtype)
                log(f"placement: {placement.tensors} tensors, {placement.samples_per_tensor} elements of each against "
                    f"the checkpoint: {'ok' if placement.passed else 'MISMATCHED ' + ', '.join(placement.mismatched)}")
                if not placement.passed:
                    raise OnnxpipeError(f"placement check failed: the bytes written for {placement.mismatched[0]} are "
                                        "not its checkpoint tensor's; the export was not written")
                layers = truncated_layers(n, parity_layers)
                log(f"checking parity against PyTorch on layers {layers} of {n} with the written weights "
                    "(prefill + decode, left-padded batch of 2)...")
                report = check_truncated(traced.template, stamped, layers, ckpt, cfg, manifest, dtype, tmp,
                                         decode_steps=decode_steps)
                step["check"] = report.to_json() | {"scope": "truncated", "layers": layers,
                                                    "placement": placement.to_json()}
                log(f"parity: {report.summary()}")
                if not report.passed:
                    raise OnnxpipeError(
                        f"parity check failed on layers {layers}: rel err {report.rel_err:.3g} > {report.tolerance:g} "
                        f"(max abs err {report.max_abs_err:.3g}); the export was not written"
                    )
            else:
                step["check"] = None
                log("parity check skipped (--no-verify)")
            manifest.steps.append(step)
            write_manifest(tmp, manifest)
            write_genai_config(tmp, manifest)
    return ExportResult(ModelDir.open(out_dir), time.perf_counter() - start)


def check_weights(config: Any, ckpt: Checkpoint, src: Path) -> None:
    """The checkpoint holds every weight of ``config``'s model with its shape, and nothing else: the test
    transformers' loading makes (the model made on the meta device, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _quiet():
        model = AutoModelForCausalLM.from_config(config)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    known = set(model.state_dict())
    missing = [n for n in expected if n not in ckpt]
    mismatched = [n for n in expected if n in ckpt and ckpt.shape(n) != expected[n]]
    unexpected = [n for n in ckpt.entries if n not in known and not n.endswith("rotary_emb.inv_freq")]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if mismatched:
        n = mismatched[0]
        problems.append(f"{len(mismatched)} mismatched keys (e.g. {n}: {list(ckpt.shape(n))} in the checkpoint, "
                        f"{list(expected[n])} by the config)")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if problems:
        raise OnnxpipeError(f"{src}: weights do not match config.json: {'; '.join(problems)}")


def _layer_order(num_layers: int) -> list[int]:
    """Which checkpoint layer each stamped slot holds: slot i, layer i."""
    return list(range(num_layers))
