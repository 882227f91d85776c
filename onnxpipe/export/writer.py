"""The stamped export's weights written into one external data file: every initializer's offset is fixed before
anything is written (the layout), so threads read, convert and write whole tensors in any order with positional
writes, and the file comes out byte for byte the same whichever thread finishes first.

Per tensor, a thread reads the checkpoint's bytes with positional reads (a tensor stored as it is, the token table,
a block of rows at a time; a transposed one whole, then transposed once in its stored dtype), converts BLOCK_BYTES at
a time into a buffer of its own (small enough that the conversion, the fp16 range check and the write all find it
in the cache) and writes it at its offset. Each thread runs torch with one intra-op thread: the threads, not
torch's, divide the cores.

Memory: per thread, a transposed tensor twice while it is transposed (then once: the source is let go) and a block;
a tensor stored as it is, two blocks.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from onnxpipe.errors import OnnxpipeError
from onnxpipe.export.checkpoint import Checkpoint

ALIGN = 64  # every tensor's offset; a large one's to the allocation granularity, as onnx_ir aligns them
ALIGN_LARGE, LARGE = 65536, 1 << 20
BLOCK_BYTES = 4 << 20  # converted per step (source bytes)
ITEM_BYTES = {"fp32": 4, "fp16": 2}


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 2


def default_workers() -> int:
    """Threads writing: the cores this process may use, 8 at most (each holds up to two copies of a tensor)."""
    return max(1, min(8, available_cores()))


@dataclass(frozen=True)
class Span:
    """Where one initializer's bytes go: ``source`` (transposed or not) as ``shape``, at ``offset`` of the file."""

    name: str
    source: str
    transpose: bool
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class Job:
    """One checkpoint tensor and the spans written from it (a tensor used twice is read once)."""

    source: str
    nbytes: int  # the source's bytes
    spans: tuple[Span, ...]


def plan(uses: Sequence[tuple[str, str, bool]], ckpt: Checkpoint, dtype: str) -> tuple[list[Job], int]:
    """The layout of ``uses`` (initializer name, source tensor, transposed), sources in checkpoint file order, each
    source's initializers in the order given, one after another with their offsets aligned: the jobs and the file's
    size."""
    by_source: dict[str, list[tuple[str, bool]]] = {}
    for name, source, transpose in uses:
        by_source.setdefault(source, []).append((name, transpose))
    order = sorted(by_source, key=lambda s: (str(ckpt.entry(s).file), ckpt.entry(s).start))
    jobs, pos = [], 0
    for source in order:
        entry = ckpt.entry(source)
        align = ALIGN_LARGE if entry.nbytes >= LARGE else ALIGN
        spans = []
        for name, transpose in by_source[source]:
            shape = tuple(reversed(entry.shape)) if transpose else tuple(entry.shape)
            numel = 1
            for d in shape:
                numel *= d
            pos = -(-pos // align) * align
            spans.append(Span(name, source, transpose, shape, pos, numel * ITEM_BYTES[dtype]))
            pos += spans[-1].length
        jobs.append(Job(source, entry.nbytes, tuple(spans)))
    return jobs, pos


class WriteFailed(Exception):
    """The output file could not be written (its OSError's message); write() names the file."""


class Stopped(Exception):
    """The writing was stopped from outside (``stop`` set): what was written is incomplete."""


def write(jobs: Sequence[Job], size: int, ckpt: Checkpoint, path: Path, dtype: str, *, workers: int | None = None,
          first: Sequence[str] = (), on_first: Callable[[], None] | None = None,
          stop: threading.Event | None = None, progress: Callable[[int, int, float], None] | None = None) -> None:
    """Write ``jobs`` into ``path`` (created, ``size`` bytes): the sources named in ``first`` before the others
    (``on_first()`` once they are written), then the largest first. ``progress(tensors done, bytes read, seconds)``
    after each tensor, on this thread. Setting ``stop`` ends it early (Stopped)."""
    import torch

    workers = workers or default_workers()
    front = {j.source for j in jobs if j.source in set(first)}
    queue = sorted(jobs, key=lambda j: (j.source not in front, -j.nbytes))
    threads = torch.get_num_threads()
    try:
        _write_all(queue, front, size, ckpt, path, dtype, workers, on_first, stop, progress)
    except WriteFailed as e:  # a full disk, most likely: say which file and how much it takes
        raise OnnxpipeError(f"{path}: writing the weights failed ({e}; the file takes {size / 1e9:.2f} GB)") from None
    finally:
        torch.set_num_threads(threads)  # the workers' setting went to torch's default for new threads too


def _write_all(queue: list[Job], front: set[str], size: int, ckpt: Checkpoint, path: Path, dtype: str,
               workers: int, on_first: Callable[[], None] | None, stop: threading.Event | None,
               progress: Callable[[int, int, float], None] | None) -> None:
    import torch

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    except OSError as e:
        raise WriteFailed(e.strerror or str(e)) from None
    start, done, read = time.perf_counter(), 0, 0
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            raise WriteFailed(e.strerror or str(e)) from None
        with ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = {pool.submit(write_job, fd, ckpt, job, dtype, stop): job for job in queue}
            pending = set(futures)
            try:
                if not front and on_first is not None:
                    on_first()
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        read += f.result()
                        done += 1
                        if futures[f].source in front:
                            front.discard(futures[f].source)
                            if not front and on_first is not None:
                                on_first()
                    if progress is not None:
                        progress(done, read, time.perf_counter() - start)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    finally:
        os.close(fd)


def write_job(fd: int, ckpt: Checkpoint, job: Job, dtype: str, stop: threading.Event | None = None) -> int:
    """Convert and write ``job``'s spans; returns the source bytes read for them (the source's, once a span)."""
    import torch

    if stop is not None and stop.is_set():
        raise Stopped(job.source)

    target = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    if not any(s.transpose for s in job.spans):
        for rows, block in _row_blocks(ckpt, job.source):
            _write_rows(fd, job.spans, rows, block, target, job.source)
        return job.nbytes * len(job.spans)
    held = [ckpt.read(job.source)]
    for i, span in enumerate(job.spans):
        base = held[0].t().contiguous() if span.transpose else held[0]  # one transpose, in the stored dtype
        if i == len(job.spans) - 1:
            held.clear()  # the source goes as soon as its last use is made: one copy while that one is written
        base = base.reshape(1) if base.dim() == 0 else base
        step = _step_rows(base)
        for r0 in range(0, base.shape[0], step):
            _write_rows(fd, (span,), r0, base[r0:r0 + step], target, job.source)
        del base
    return job.nbytes * len(job.spans)


def _row_blocks(ckpt: Checkpoint, name: str) -> Any:
    """(first row, rows) of ``name`` as stored, BLOCK_BYTES at a time, each read from the file when asked for."""
    entry = ckpt.entry(name)
    rows = entry.shape[0] if entry.shape else 1
    row_bytes = entry.nbytes // rows if rows else 0
    step = max(1, BLOCK_BYTES // row_bytes) if row_bytes else max(rows, 1)
    for r0 in range(0, rows, step):
        yield r0, ckpt.read_rows(name, r0, min(rows, r0 + step))


def _step_rows(t: Any) -> int:
    row_bytes = (t[0].numel() if t.shape[0] else 0) * t.element_size()
    return max(1, BLOCK_BYTES // row_bytes) if row_bytes else max(int(t.shape[0]), 1)


_buffers = threading.local()  # each thread's conversion buffer, by target dtype


def _write_rows(fd: int, spans: Sequence[Span], r0: int, block: Any, target: Any, source: str) -> None:
    """``block`` (rows ``r0``... of what ``spans`` hold) converted to ``target`` and written at each span's
    offset."""
    import torch

    if block.numel() == 0:
        return
    if block.dtype == target:
        out = block.contiguous()
    else:
        held = _buffers.__dict__.setdefault("by_dtype", {})
        buf = held.get(target)
        if buf is None or buf.numel() < block.numel():
            buf = held[target] = torch.empty(block.numel(), dtype=target)
        out = buf[:block.numel()].view(block.shape)
        out.copy_(block)
    if target == torch.float16:
        lo, hi = torch.aminmax(out)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            bad = int((~torch.isfinite(out)).sum())
            raise OnnxpipeError(f"weight {source}: {bad} values do not fit fp16 (beyond +-65504 or not finite); "
                                "export with --dtype fp32")
    data = memoryview(out.view(torch.uint8).numpy()).cast("B")
    row_bytes = len(data) // block.shape[0]
    for span in spans:
        _pwrite_all(fd, data, span.offset + r0 * row_bytes)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        try:
            n = os.pwrite(fd, data[done:], offset + done)
        except OSError as e:
            raise WriteFailed(e.strerror or str(e)) from None
        if n <= 0:
            raise WriteFailed(f"a write of {len(data) - done} bytes wrote {n}")
        done += n
