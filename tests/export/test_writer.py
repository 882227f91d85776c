"""The stamped export's weight writer alone (onnxpipe/export/writer.py): threads writing tensors at offsets fixed
beforehand give the file one writer appending them in checkpoint order would, whatever the order they finish in."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from onnxpipe.errors import OnnxpipeError
from onnxpipe.export import writer
from onnxpipe.export.checkpoint import Checkpoint

pytestmark = pytest.mark.fast

# (initializer, source, transposed): "tied" is written twice (as stored and transposed), "big" is past LARGE
USES = [("big_w", "big", False), ("w1_T", "w1", True), ("tied_w", "tied", False), ("tied_T", "tied", True),
        ("v", "v", False), ("s", "s", False), ("w2_T", "w2", True)]


def _checkpoint(tmp_path: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {"w1": torch.randn(37, 23, generator=gen), "big": torch.randn(600, 1000, generator=gen),
               "tied": torch.randn(11, 7, generator=gen), "v": torch.randn(5, generator=gen),
               "s": torch.tensor(1.5), "w2": torch.randn(64, 48, generator=gen)}
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    save_file(tensors, tmp_path / "model.safetensors")
    return tensors


def _appended(tensors: dict[str, torch.Tensor], ckpt: Checkpoint, dtype: str) -> bytes:
    """The file one writer makes: sources in file order, each use appended at the next offset aligned to 64 bytes
    (65536 for a source of 1 MiB or more), converted with torch."""
    target = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    out = bytearray()
    for source in sorted({s for _, s, _ in USES}, key=lambda s: ckpt.entry(s).start):
        for _, src, transpose in USES:
            if src != source:
                continue
            align = 65536 if ckpt.entry(source).nbytes >= 1 << 20 else 64
            out += b"\0" * (-len(out) % align)
            t = tensors[source].t() if transpose else tensors[source]
            out += t.to(target).contiguous().numpy().tobytes()
    return bytes(out)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_threads_write_what_one_appending_writer_would(tmp_path: Path, dtype: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "BLOCK_BYTES", 256)  # many blocks per tensor
    tensors = _checkpoint(tmp_path)
    with Checkpoint.open(tmp_path) as ckpt:
        jobs, size = writer.plan(USES, ckpt, dtype)
        expected = _appended(tensors, ckpt, dtype)
        assert size == len(expected)
        for workers, first in ((1, ()), (4, ("w2", "s")), (3, ("big",))):
            path = tmp_path / f"data-{workers}"
            writer.write(jobs, size, ckpt, path, dtype, workers=workers, first=first)
            assert path.read_bytes() == expected, (workers, first)
    spans = {s.name: s for j in jobs for s in j.spans}
    assert spans["big_w"].offset % 65536 == 0 and spans["w1_T"].shape == (23, 37) and spans["s"].shape == ()


def test_first_sources_are_written_before_on_first(tmp_path: Path) -> None:
    tensors = _checkpoint(tmp_path)
    seen: list[bytes] = []
    with Checkpoint.open(tmp_path) as ckpt:
        jobs, size = writer.plan(USES, ckpt, "fp16")
        span = next(s for j in jobs for s in j.spans if s.name == "w2_T")
        path = tmp_path / "data"

        def on_first() -> None:
            with open(path, "rb") as fh:
                fh.seek(span.offset)
                seen.append(fh.read(span.length))

        writer.write(jobs, size, ckpt, path, "fp16", workers=2, first=["w2"], on_first=on_first)
    assert seen == [tensors["w2"].t().to(torch.float16).contiguous().view(torch.uint8).numpy().tobytes()]


@pytest.mark.parametrize("transpose", [False, True])
def test_a_value_beyond_fp16_is_an_error_naming_its_tensor(tmp_path: Path, transpose: bool) -> None:
    save_file({"model.w": torch.tensor([[1.0, 7.0e4], [2.0, 3.0]], dtype=torch.bfloat16)},
              tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as ckpt:
        jobs, size = writer.plan([("w", "model.w", transpose)], ckpt, "fp16")
        with pytest.raises(OnnxpipeError, match="weight model.w: 1 values do not fit fp16"):
            writer.write(jobs, size, ckpt, tmp_path / "data", "fp16", workers=2)


def test_stop_ends_the_writing(tmp_path: Path) -> None:
    _checkpoint(tmp_path)
    stop = threading.Event()
    stop.set()
    with Checkpoint.open(tmp_path) as ckpt:
        jobs, size = writer.plan(USES, ckpt, "fp16")
        with pytest.raises(writer.Stopped):
            writer.write(jobs, size, ckpt, tmp_path / "data", "fp16", workers=2, stop=stop)


def test_read_rows(tmp_path: Path) -> None:
    tensors = _checkpoint(tmp_path)
    with Checkpoint.open(tmp_path) as ckpt:
        assert torch.equal(ckpt.read_rows("big", 7, 300), tensors["big"][7:300])
        assert ckpt.read_rows("big", 5, 5).shape == (0, 1000)
        assert torch.equal(ckpt.read_rows("s", 0, 1), tensors["s"].reshape(1))
        with pytest.raises(OnnxpipeError, match="rows 3:700 of tensor 'big'"):
            ckpt.read_rows("big", 3, 700)


def test_a_new_thread_keeps_torchs_thread_count(tmp_path: Path) -> None:
    """The workers run torch with one thread each, which torch also takes as the count for threads made later:
    the writer puts it back."""
    before = torch.get_num_threads()
    if before == 1:
        pytest.skip("torch runs one thread here: nothing to put back")
    _checkpoint(tmp_path)
    with Checkpoint.open(tmp_path) as ckpt:
        jobs, size = writer.plan(USES, ckpt, "fp16")
        writer.write(jobs, size, ckpt, tmp_path / "data", "fp16", workers=2)
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [before]


def test_a_full_disk_is_an_error_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    _checkpoint(tmp_path)
    written: list[int] = []

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(data))
        return len(data)

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    with Checkpoint.open(tmp_path) as ckpt:
        jobs, size = writer.plan(USES, ckpt, "fp16")
        with pytest.raises(OnnxpipeError, match=r"data: writing the weights failed \(No space left on device; "
                                                r"the file takes 0\.00 GB\)"):
            writer.write(jobs, size, ckpt, tmp_path / "data", "fp16", workers=2)
