"""The streamed export: a decoder traced as a one-layer slice, stamped to its depth (stamp.py), its weights
streamed from the safetensors checkpoint into the external data file (writer.py: threads, each tensor at an offset
fixed beforehand; the writing starts while the slice is traced), and the result checked end to end on a truncated
model (truncated.py), its PyTorch side beside the writing where there are cores to share.

Memory: the slice (one layer of random weights), a tensor per writing thread (twice while one is transposed) and the
truncated model of the check; never the whole model. Disk: the weights once, in the export's dtype.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

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
from onnxpipe.export import stamp, writer
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
from onnxpipe.export.truncated import LAYER_KEY, check_truncated, reference_trace, truncated_layers
from onnxpipe.genai_config import write_genai_config
from onnxpipe.outputs import check_io_paths
from onnxpipe.parity import Trace

DATA_FILE = MODEL_FILE + ".data"


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


@dataclass
class Layout:
    """Where every weight goes in the external data file (writer.plan): the jobs and the file's size."""

    jobs: list[writer.Job]
    size: int


def place_weights(stamped: stamp.Stamped, ckpt: Checkpoint, data_path: Path, dtype: str) -> Layout:
    """Fix every initializer's offset in ``data_path`` and point the initializer there (nothing is written yet:
    the graph can be saved before its weights)."""
    values = [*stamped.globals, *(v for slot in stamped.slots for v in slot)]
    by_name = {v.name or "": v for v in values}
    uses = [(v.name or "", stamped.weights[v.name or ""].source, stamped.weights[v.name or ""].transpose)
            for v in values]
    jobs, size = writer.plan(uses, ckpt, dtype)
    for job in jobs:
        for span in job.spans:
            v = by_name[span.name]
            v.const_value = ir.ExternalTensor(DATA_FILE, span.offset, span.length, v.dtype or ir.DataType.FLOAT,
                                              shape=ir.Shape(list(span.shape)), name=span.name,
                                              base_dir=data_path.parent)
    return Layout(jobs, size)


def write_weights(layout: Layout, ckpt: Checkpoint, data_path: Path, dtype: str,
                  log: Callable[[str], None] = lambda m: None, *, first: Sequence[str] = (),
                  on_first: Callable[[], None] | None = None, stop: threading.Event | None = None,
                  progress: Callable[[str, int, int], None] | None = None, workers: int | None = None) -> int:
    """Write the weights where ``layout`` placed them (converted to ``dtype``, transposed where the graph keeps them
    so; writer.write), the sources in ``first`` before the others (then ``on_first()``). Says how far it got every
    tenth of the bytes (at most every 2 s) and moves ``progress("writing weights", tensors done, tensors)`` after
    each tensor. Returns the bytes written."""
    jobs = layout.jobs
    total = sum(j.nbytes * len(j.spans) for j in jobs)
    shown, last = 0, 0.0

    def report(done: int, read: int, seconds: float) -> None:
        nonlocal shown, last
        if progress is not None:
            progress("writing weights", done, len(jobs))
        tenth = 10 * read // max(total, 1)
        if (tenth > shown and seconds - last >= 2.0) or done == len(jobs):
            shown, last = tenth, seconds
            log(f"writing weights: {done}/{len(jobs)} tensors, {read / 1e9:.2f}/{total / 1e9:.2f} GB read "
                f"({seconds:.1f}s)")

    writer.write(jobs, layout.size, ckpt, data_path, dtype, workers=workers, first=first, on_first=on_first,
                 stop=stop, progress=report)
    return layout.size


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
    progress: Callable[[str, int, int], None] | None = None,
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
        guessed = check_weights(config, ckpt, src)
        log("export method: stamped (one layer traced, the weights streamed from the checkpoint)")
        n = int(config.get_text_config(decoder=True).num_hidden_layers)
        layers = truncated_layers(n, parity_layers) if verify else []
        cores = writer.available_cores()
        workers = min(8, cores // 2) if cores >= 4 else None  # half the cores: the rest trace, then check
        with atomic_output_dir(out_dir, force=force, inputs=[src]) as tmp:
            onnx_path, data_path = tmp / MODEL_FILE, tmp / DATA_FILE
            # the weights go to the file while the slice is traced, placed as the checkpoint's modules say they are
            # stored (a Linear's weight transposed); the traced graph's own placement is compared with it below
            jobs, size = writer.plan(guessed, ckpt, dtype)
            guess = Layout(jobs, size)
            writing = Writing(guess, ckpt, data_path, dtype, log, progress, _checked_sources(guess, layers), workers)
            try:
                log(f"tracing a 1-layer slice of {config.model_type} (random weights, {dtype}) while the weights are "
                    "written...")
                traced = trace_template(config, cfg, dtype, opset)
                info = traced.info
                log(f"traced in {traced.seconds:.1f}s: {len(traced.template.layer_nodes)} nodes per layer; "
                    f"{info['architecture']} ({info['family']}): {n} layers, hidden {info['hidden_size']}, "
                    f"{info['num_attention_heads']} heads / {info['num_kv_heads']} KV heads, {dtype}")
                shapes = {k: e.shape for k, e in ckpt.entries.items()}
                log(f"stamping {n} layers...")
                stamped = stamp.stamp(traced.template, _layer_order(n), shapes, info["vocab_size"])
                layout = place_weights(stamped, ckpt, data_path, dtype)
                if not same_bytes(layout, guess):
                    log("the traced graph stores the weights otherwise than the modules said: writing them again")
                    writing.cancel()
                    writing = Writing(layout, ckpt, data_path, dtype, log, progress,
                                      _checked_sources(layout, layers), workers)
                save_graph(stamped.model, onnx_path)  # the weights' places are fixed: the graph goes first
                config.dtype = {"fp32": "float32", "fp16": "float16"}[dtype]
                gen = GenerationConfig.from_pretrained(str(src)) if (src / "generation_config.json").is_file() \
                    else GenerationConfig.from_model_config(config)
                manifest = _build_manifest(onnx_path, info, dtype, opset, True, src,
                                           SimpleNamespace(config=config, generation_config=gen))
                graph_at = time.perf_counter()
            except BaseException:
                writing.cancel()
                raise
            saying = f"checking parity, PyTorch's side: layers {layers} of {n} (prefill + decode, left-padded batch of 2)"
            written, written_at, reference = writing.finish(
                (lambda: reference_trace(ckpt, cfg, layers, manifest, dtype, decode_steps)) if verify else None,
                saying + ", while the other weights are written...")
            manifest.graph["external_data"] = DATA_FILE  # written now (the manifest was made before it existed)
            export_s = max(written_at, graph_at) - start  # the graph and its weights, not the check beside them
            log(f"exported in {export_s:.1f}s ({written / 1e9:.2f} GB of weights, external data)")
            _check_onnx(onnx_path)
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
                placement = check_placement(stamped, ckpt, tmp / DATA_FILE, dtype)
                log(f"placement: {placement.tensors} tensors, {placement.samples_per_tensor} elements of each against "
                    f"the checkpoint: {'ok' if placement.passed else 'MISMATCHED ' + ', '.join(placement.mismatched)}")
                if not placement.passed:
                    raise OnnxpipeError(f"placement check failed: the bytes written for {placement.mismatched[0]} are "
                                        "not its checkpoint tensor's; the export was not written")
                if reference is None:
                    log(saying + "...")
                    reference = reference_trace(ckpt, cfg, layers, manifest, dtype, decode_steps)
                log(f"checking parity, ONNX Runtime's side: layers {layers} of {n} with the written weights...")
                report = check_truncated(traced.template, stamped, layers, ckpt, cfg, manifest, dtype, tmp,
                                         decode_steps=decode_steps, reference=reference)
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


class Writing:
    """write_weights of ``layout`` on a thread of its own (the sources in ``first`` before the others), started
    before the slice is traced: its threads take ``workers`` cores while this thread traces. ``finish`` waits for it,
    first running the check's PyTorch side beside it where the cores allow; ``cancel`` stops it."""

    def __init__(self, layout: Layout, ckpt: Checkpoint, data_path: Path, dtype: str, log: Callable[[str], None],
                 progress: Callable[[str, int, int], None] | None, first: list[str], workers: int | None) -> None:
        self.layout, self.workers, self.log = layout, workers, log
        self.first_done, self.stop = threading.Event(), threading.Event()
        self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-writer")

        def write() -> tuple[int, float]:
            written = write_weights(layout, ckpt, data_path, dtype, log, first=first, on_first=self.first_done.set,
                                    stop=self.stop, progress=progress, workers=workers)
            return written, time.perf_counter()

        self.future = self._side.submit(write)
        self.future.add_done_callback(lambda _: self.first_done.set())  # a failure wakes a waiting ``finish`` too

    def cancel(self) -> None:
        """Stop the writing and wait for its threads (what it wrote is incomplete; its error, if any, is dropped)."""
        self.stop.set()
        self._side.shutdown(wait=True)

    def finish(self, make_reference: Callable[[], Trace] | None, saying: str) -> tuple[int, float, Trace | None]:
        """The bytes written, when the writing ended (perf_counter) and the check's PyTorch side if it ran here:
        with 4 cores or more, ``make_reference()`` (which reads the checkpoint alone) runs once ``first`` is written,
        while the rest is, torch taking the cores the writer's threads leave (more threads than cores would make
        each wait for the others); with fewer there is nothing to share and the caller makes it afterwards. If
        either fails, the other is stopped and the first error raised."""
        import torch

        cores = writer.available_cores()
        try:
            reference = None
            if make_reference is not None and cores >= 4:
                self.first_done.wait()
                if self.future.done():
                    self.future.result()  # its error, if it failed before the reference started
                self.log(saying)
                threads = torch.get_num_threads()
                torch.set_num_threads(max(1, cores - (self.workers or 0)))
                try:
                    reference = make_reference()
                finally:
                    torch.set_num_threads(threads)
            written, ended = self.future.result()
            return written, ended, reference
        except BaseException:
            self.cancel()
            raise
        finally:
            self._side.shutdown(wait=True)


def _checked_sources(layout: Layout, layers: list[int]) -> list[str]:
    """The sources the truncated check reads: every one outside the layers, and those of ``layers``."""
    out = []
    for job in layout.jobs:
        m = LAYER_KEY.match(job.source)
        if m is None or int(m["i"]) in layers:
            out.append(job.source)
    return out


def same_bytes(a: Layout, b: Layout) -> bool:
    """Whether two layouts put the same bytes in the file: the same sources at the same offsets, transposed alike."""
    def key(layout: Layout) -> list[Any]:
        return [(j.source, [(s.transpose, s.shape, s.offset, s.length) for s in j.spans]) for j in layout.jobs]

    return a.size == b.size and key(a) == key(b)


def check_weights(config: Any, ckpt: Checkpoint, src: Path) -> list[tuple[str, str, bool]]:
    """The checkpoint holds every weight of ``config``'s model with its shape, and nothing else: the test
    transformers' loading makes (the model made on the meta device, no memory). Returns how the export will most
    likely store each weight, (initializer, weight, transposed): a Linear's weight transposed (the exporter folds
    it into a MatMul), the others as they are; a tied head is the table's."""
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
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    uses = []
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        transpose = leaf == "weight" and owner in linear and p.dim() == 2
        uses.append((f"model.{name}{'_T' if transpose else ''}", name, transpose))
    return uses


def _layer_order(num_layers: int) -> list[int]:
    """Which checkpoint layer each stamped slot holds: slot i, layer i."""
    return list(range(num_layers))
