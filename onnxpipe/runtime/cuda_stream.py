"""What a decode loop launched ahead of its reads needs from the CUDA runtime: a stream of our own that the CUDA EP
runs on (``user_compute_stream``), pinned host buffers, events, and a copy queued on that stream.

onnxruntime's Python API gives no stream and no event, and a run ends by synchronizing its stream unless told not
to (``disable_synchronize_execution_providers``). With the run unsynchronized, a step's token ids copied on the same
stream into pinned memory (ordered after the step, before the next one overwrites them) and an event recorded behind
the copy, the loop can launch step k+1 before it waits for step k's ids: the GPU never waits for the host between
two steps. These are a handful of ctypes calls into the CUDA runtime the CUDA EP itself loaded (found in the
process's mapped libraries after a first CUDA session), so no package is added and the stream is one its kernels
know; written by hand because no installed library exposes them without pulling in a CUDA toolkit binding.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

import numpy as np

_HOST_DEFAULT, _NON_BLOCKING, _DISABLE_TIMING, _DEVICE_TO_HOST = 0, 1, 2, 2
_lock = threading.Lock()
_runtime: Any = None
_why_not: str | None = None


def _mapped_cudart() -> str | None:
    """The path of the CUDA runtime library mapped into this process, if any."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                if "libcudart.so" in path.rsplit("/", 1)[-1]:
                    return path
    except OSError:
        return None
    return None


def cuda_runtime(ort: Any) -> tuple[Any, str | None]:
    """(the CUDA runtime as a ctypes library, None) or (None, why not). The library is the one the CUDA EP loaded:
    where none is mapped yet, a tiny CUDA session is made first so that the EP loads it."""
    global _runtime, _why_not
    with _lock:
        if _runtime is not None or _why_not is not None:
            return _runtime, _why_not
        path = _mapped_cudart()
        if path is None:
            try:
                import onnx.helper as h

                g = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "probe",
                                 [h.make_tensor_value_info("x", 1, [1])], [h.make_tensor_value_info("y", 1, [1])])
                model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
                ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - any failure means: no stream of our own
                _why_not = f"no CUDA session to find the CUDA runtime by ({str(e)[:200]})"
                return None, _why_not
            path = _mapped_cudart()
        if path is None:
            _why_not = "the CUDA EP mapped no libcudart (statically linked?)"
            return None, _why_not
        try:
            lib = ctypes.CDLL(path)
            for name, args in (("cudaStreamCreateWithFlags", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]),
                               ("cudaHostAlloc", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]),
                               ("cudaFreeHost", [ctypes.c_void_p]),
                               ("cudaEventCreateWithFlags", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]),
                               ("cudaEventRecord", [ctypes.c_void_p, ctypes.c_void_p]),
                               ("cudaEventSynchronize", [ctypes.c_void_p]),
                               ("cudaStreamSynchronize", [ctypes.c_void_p]),
                               ("cudaMemcpyAsync", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                    ctypes.c_void_p])):
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
        except (OSError, AttributeError) as e:
            _why_not = f"{path}: {e}"
            return None, _why_not
        _runtime = lib
        return _runtime, None


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed (CUDA error {code})")


class Stream:
    """A non-blocking CUDA stream for the CUDA EP (``provider_option``), and ``sync``. Never destroyed: onnxruntime
    keeps the handle in sessions that may outlive this object, so it lives as long as the process (one a session)."""

    def __init__(self, lib: Any):
        self.lib = lib
        handle = ctypes.c_void_p()
        _check(lib.cudaStreamCreateWithFlags(ctypes.byref(handle), _NON_BLOCKING), "cudaStreamCreateWithFlags")
        self.handle = handle

    def provider_option(self) -> str:
        return str(self.handle.value)

    def sync(self) -> None:
        _check(self.lib.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")


class IdsReader:
    """Token ids of ``depth`` steps in flight: ``queue(i, ptr)`` copies [rows] int64 from the device address
    ``ptr`` into pinned buffer i % depth on the stream, behind what was launched before, and records an event;
    ``read(i)`` waits for that event and returns a copy of the ids."""

    def __init__(self, stream: Stream, rows: int, depth: int = 2):
        lib = self.lib = stream.lib
        self.stream, self.rows, self.depth = stream, rows, depth
        self.nbytes = rows * 8
        self.host: list[ctypes.c_void_p] = []
        self.events: list[ctypes.c_void_p] = []
        self.views: list[np.ndarray] = []
        for _ in range(depth):
            buf, ev = ctypes.c_void_p(), ctypes.c_void_p()
            _check(lib.cudaHostAlloc(ctypes.byref(buf), self.nbytes, _HOST_DEFAULT), "cudaHostAlloc")
            _check(lib.cudaEventCreateWithFlags(ctypes.byref(ev), _DISABLE_TIMING), "cudaEventCreateWithFlags")
            weakref.finalize(self, lib.cudaFreeHost, buf)  # the pinned buffer lives as long as the reader
            self.host.append(buf)
            self.events.append(ev)
            self.views.append(np.ctypeslib.as_array((ctypes.c_int64 * rows).from_address(int(buf.value or 0))))

    def queue(self, i: int, device_ptr: int) -> None:
        k = i % self.depth
        _check(self.lib.cudaMemcpyAsync(self.host[k], ctypes.c_void_p(device_ptr), self.nbytes, _DEVICE_TO_HOST,
                                        self.stream.handle), "cudaMemcpyAsync")
        _check(self.lib.cudaEventRecord(self.events[k], self.stream.handle), "cudaEventRecord")

    def read(self, i: int) -> np.ndarray:
        k = i % self.depth
        _check(self.lib.cudaEventSynchronize(self.events[k]), "cudaEventSynchronize")
        return self.views[k].copy()
