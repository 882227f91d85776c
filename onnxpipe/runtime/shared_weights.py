"""A graph's weights held once on the device for several onnxruntime sessions of it (the chunk lane's second session
beside the decode session): each large external-data initializer read from its file into an OrtValue on the device,
then given by name to every session's SessionOptions (``add_initializer``). onnxruntime uses such a value in place
where it plans that initializer on the same device, so two sessions hold one copy of the weights instead of two;
where it plans one elsewhere it refuses the session, and the caller loads without sharing (and says so).

Written here since onnxruntime's Python API has no way to hand one session's initializers to another; the reads
stay inside the model directory (its external-data locations were checked when it was opened).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.confine import check_inside
from onnxpipe.errors import OnnxpipeError

# smaller initializers (shapes, axes, constants that a CPU node may read) stay each session's own
MIN_BYTES = 1 << 16


@dataclass
class SharedWeights:
    """name -> OrtValue on ``device``; ``arrays`` keeps the host buffers a CPU OrtValue reads in place alive."""

    device: str
    values: dict[str, Any] = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)
    nbytes: int = 0

    def add_to(self, session_options: Any) -> None:
        for name, value in self.values.items():
            try:
                session_options.add_initializer(name, value)
            except (RuntimeError, ValueError) as e:  # e.g. a device buffer onnxruntime allocated itself
                raise OnnxpipeError(f"onnxruntime would not take {name!r} as a shared initializer: "
                                    f"{str(e).splitlines()[0][-160:]}") from None


def load_shared_weights(model_path: Path, root: Path, device: str, device_id: int = 0,
                        min_bytes: int | None = None) -> SharedWeights:
    """The external-data initializers of ``model_path`` of at least ``min_bytes`` (default ``MIN_BYTES``), each an
    OrtValue on ``device`` ("cpu" or "cuda"). Their files must lie inside ``root``."""
    import onnx
    import onnxruntime as ort
    from onnx.helper import tensor_dtype_to_np_dtype

    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    proto = onnx.load(str(model_path), load_external_data=False)
    shared = SharedWeights(device=device)
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        length = int(info.get("length", -1))
        if length < min_bytes:
            continue
        try:
            dtype = np.dtype(tensor_dtype_to_np_dtype(init.data_type))
        except (KeyError, TypeError, ValueError):
            continue  # no numpy type (bfloat16, 4-bit): left to the session
        shape = tuple(int(d) for d in init.dims)
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize != length:
            raise OnnxpipeError(f"{model_path}: initializer {init.name!r} records {length} bytes of external data for "
                                f"{count} values of {dtype}")
        if not info.get("location"):
            raise OnnxpipeError(f"{model_path}: initializer {init.name!r} is stored outside the file but names no location")
        path = root / info["location"]
        check_inside(path, root, f"external data of {model_path.name}")
        # copy-on-write map: the pages are read as the device copy (or a CPU session) touches them
        arr = np.memmap(path, dtype=dtype, mode="c", offset=int(info.get("offset", 0)), shape=shape)
        value = ort.OrtValue.ortvalue_from_numpy(arr, device, device_id)
        if device == "cpu":
            shared.arrays.append(arr)  # read in place: the map is the user's buffer
        else:
            value = user_owned(value)
        shared.values[init.name] = value
        shared.nbytes += length
    return shared


def user_owned(value: Any) -> Any:
    """``value`` (an OrtValue whose buffer onnxruntime allocated, as every device copy is) seen through DLPack: the
    same buffer in an OrtValue that does not own it, which ``add_initializer`` takes (it refuses a buffer
    onnxruntime owns); the DLPack capsule keeps the first OrtValue, and so the buffer, alive."""
    import onnxruntime as ort

    return ort.OrtValue.from_dlpack(value._ortvalue.to_dlpack())
