"""Every weight of a stamped export where it belongs: for each initializer, sampled elements of the bytes written
for it (at the offset the graph records) against the same elements of its checkpoint tensor, converted as the
writer converts them and read straight from the checkpoint file.

This covers all layers at the cost of a few reads per tensor; the truncated parity check covers three layers
numerically. A tensor written at the wrong offset, in the wrong layout or from the wrong source fails here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.export.checkpoint import Checkpoint
from onnxpipe.export.stamp import Stamped

SAMPLES = 16  # per tensor, besides its first and last element


@dataclass
class PlacementReport:
    tensors: int
    samples_per_tensor: int
    mismatched: list[str] = field(default_factory=list)  # initializer names (the first few)

    @property
    def passed(self) -> bool:
        return not self.mismatched

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def check_placement(stamped: Stamped, ckpt: Checkpoint, data_path: Path, dtype: str, seed: int = 0) -> PlacementReport:
    import torch

    target = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    rng = np.random.default_rng(seed)
    values = [*stamped.globals, *(v for slot in stamped.slots for v in slot)]
    report = PlacementReport(len(values), SAMPLES + 2)
    with open(data_path, "rb") as written:
        for v in values:
            w = stamped.weights[v.name or ""]
            src_shape = ckpt.shape(w.source)
            shape = w.shape(src_shape)
            n = int(np.prod(shape)) if shape else 1
            flat = np.unique(np.concatenate([[0, n - 1], rng.integers(0, n, SAMPLES)]))
            if w.transpose:  # written [r, c] is the source's [c, r]
                rows, cols = np.divmod(flat, shape[1])
                src_flat = cols * src_shape[1] + rows
            else:
                src_flat = flat
            expected = ckpt.read_elements(w.source, src_flat).to(target)
            got = _read_written(written, v.const_value, flat, target)
            if not torch.equal(expected.view(torch.uint8), got.view(torch.uint8)):
                report.mismatched.append(v.name or "")
    report.mismatched = report.mismatched[:10]
    return report


def _read_written(fh: Any, tensor: Any, flat: np.ndarray, dtype: Any) -> Any:
    import torch

    size = torch.empty(0, dtype=dtype).element_size()
    offset = int(getattr(tensor, "offset", 0) or 0)
    raw = bytearray()
    for i in flat:
        fh.seek(offset + int(i) * size)
        raw += fh.read(size)
    if len(raw) != len(flat) * size:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).clone()
