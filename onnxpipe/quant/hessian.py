"""GPTQ's input Hessians, H = 2/n sum x x^T per layer input, in float64, summed where the activations are: on CUDA
(where this onnxruntime has it) by an onnxruntime Gemm whose sums stay in GPU memory until taken; on the CPU by
numpy, whose ``x.T @ x`` is a symmetric rank-k update (BLAS syrk: half the multiply-adds of a general product;
onnxruntime's CPU Gemm computes both halves, and measured no faster per multiply-add, one thread each).

Each input's rows are gathered until there are ``rows_per_product(K)`` of them (a quarter of K, at least 256: the
gathered rows, in float32, are at most an eighth of the Hessian's bytes), then added as one product
``H += X^T X``: one pass over H per K/4 rows, where a product per calibration batch passed over H (1.6 GB at
K = 14336) once per 512 rows. The same float64 arithmetic summed in another order: the same Hessians up to
float64 rounding.

On CUDA the proxy loss of each quantized weight (gptq._proxy_loss_ratio: tr(dW^T H dW) of GPTQ and of RTN, 4 K^2 N
multiply-adds a weight, more than GPTQ's own column updates) is computed there too, against the sums still held.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import onnx_ir as ir

MIN_ROWS = 256


def rows_per_product(k: int) -> int:
    return max(MIN_ROWS, k // 4)


def _graph(k: int, dtype: np.dtype, accumulate: bool) -> bytes:
    """x [rows, K] (the activations' type) -> h_out = x^T x (+ h) in float64."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.from_numpy(dtype)), shape=ir.Shape(["rows", k]))
    h = ir.Value(name="h", type=ir.TensorType(ir.DataType.DOUBLE), shape=ir.Shape([k, k]))
    cast = ir.node("Cast", [x], {"to": ir.DataType.DOUBLE.value})
    gemm = ir.node("Gemm", [cast.outputs[0], cast.outputs[0], *([h] if accumulate else [])], {"transA": 1})
    return _serialized([x, h] if accumulate else [x], [cast, gemm], gemm.outputs[0])


def _proxy_graph(k: int) -> bytes:
    """h [K, K], d [K, M] (float64) -> the column sums of (h @ d) * d: [M]."""
    h = ir.Value(name="h", type=ir.TensorType(ir.DataType.DOUBLE), shape=ir.Shape([k, k]))
    d = ir.Value(name="d", type=ir.TensorType(ir.DataType.DOUBLE), shape=ir.Shape([k, "m"]))
    mm = ir.node("MatMul", [h, d])
    mul = ir.node("Mul", [mm.outputs[0], d])
    axes = ir.node("Constant", [], {"value": ir.tensor(np.array([0], np.int64))})
    total = ir.node("ReduceSum", [mul.outputs[0], axes.outputs[0]], {"keepdims": 0})
    return _serialized([h, d], [mm, mul, axes, total], total.outputs[0])


def _serialized(inputs: list[ir.Value], nodes: list[ir.Node], output: ir.Value) -> bytes:
    output.name = "out"
    output.type = ir.TensorType(ir.DataType.DOUBLE)
    graph = ir.Graph(inputs, [output], nodes=nodes, opset_imports={"": 18}, name="gptq_hessian")
    return ir.serde.serialize_model(ir.Model(graph, ir_version=10)).SerializeToString()


class HessianSums:
    """The running sums x^T x of named inputs, fed their activations batch by batch (``add``), handed to the host
    scaled by 2/n when all are in (``take``). ``provider``: "cpu" or "cuda". ``engine``: "numpy" (the CPU's
    default) or "onnxruntime" (CUDA's; on "cpu" it runs the same graphs and bindings on the CPU, for tests)."""

    def __init__(self, provider: str = "cpu", engine: str | None = None) -> None:
        self.provider = provider
        self.engine = engine or ("numpy" if provider == "cpu" else "onnxruntime")
        self._sessions: dict[tuple[Any, ...], Any] = {}
        self._pending: dict[str, list[np.ndarray]] = {}
        self._sums: dict[str, Any] = {}  # name -> numpy array or OrtValue (on the provider's device), unscaled
        self.rows: dict[str, int] = {}

    def add(self, name: str, x: np.ndarray) -> None:
        rows = x.reshape(-1, x.shape[-1])
        pending = self._pending.setdefault(name, [])
        pending.append(rows)
        self.rows[name] = self.rows.get(name, 0) + len(rows)
        if sum(len(p) for p in pending) >= rows_per_product(rows.shape[1]):
            self._flush(name)

    def take(self, name: str) -> np.ndarray:
        """H = 2/n sum x x^T of ``name`` in float64 on the host. With onnxruntime the sums stay on the device for
        proxy_losses until ``release``."""
        self._flush(name)
        held = self._sums[name] if self.engine == "onnxruntime" else self._sums.pop(name)
        hessian = held.numpy() if self.engine == "onnxruntime" else held
        if self.engine == "onnxruntime" and self.provider == "cpu":
            hessian = hessian.copy()  # a CPU OrtValue's numpy() is a view of the sums proxy_losses still reads
        hessian *= 2.0  # in place: a second copy of a Hessian would add to the calibration state
        hessian /= max(self.rows[name], 1)
        return hessian

    def release(self, name: str) -> None:
        self._sums.pop(name, None)
        self._pending.pop(name, None)

    def proxy_losses(self, name: str, diffs: list[np.ndarray]) -> list[float] | None:
        """tr(d^T H d) for each d [K, N] against ``name``'s sums where they are held (None with numpy, where the
        caller has the Hessian in memory already), each scaled as ``take`` scales H."""
        if self.engine != "onnxruntime" or name not in self._sums:
            return None
        k = diffs[0].shape[0]
        session = self._session(("proxy", k), lambda: _proxy_graph(k))
        scale = 2.0 / max(self.rows[name], 1)
        out = []
        for d in diffs:  # one at a time: a concatenation would be another pass over both, on the host
            binding = session.io_binding()
            binding.bind_ortvalue_input("h", self._sums[name])
            binding.bind_cpu_input("d", np.ascontiguousarray(d, np.float64))
            binding.bind_output("out", "cpu")
            session.run_with_iobinding(binding)
            out.append(float(binding.copy_outputs_to_cpu()[0].sum()) * scale)
        return out

    def _flush(self, name: str) -> None:
        pending = self._pending.pop(name, [])
        if not pending:
            return
        x = pending[0] if len(pending) == 1 else np.concatenate(pending)
        del pending
        held = self._sums.get(name)
        if self.engine == "numpy":
            x64 = x.astype(np.float64)
            product = x64.T @ x64  # syrk: numpy sees the transpose of one operand
            if held is None:
                self._sums[name] = product
            else:
                held += product
            return
        import onnxruntime as ort

        k = x.shape[1]
        session = self._session((k, x.dtype, held is not None), lambda: _graph(k, x.dtype, held is not None))
        out = ort.OrtValue.ortvalue_from_shape_and_type([k, k], np.float64, self.provider, 0)
        binding = session.io_binding()
        binding.bind_cpu_input("x", np.ascontiguousarray(x))
        if held is not None:
            binding.bind_ortvalue_input("h", held)
        binding.bind_ortvalue_output("out", out)
        session.run_with_iobinding(binding)
        self._sums[name] = out  # the previous sum is freed with its OrtValue

    def _session(self, key: tuple[Any, ...], build: Callable[[], bytes]) -> Any:
        if key not in self._sessions:
            from onnxpipe.runtime.sessions import open_session

            providers = ("cpu",) if self.provider == "cpu" else (self.provider, "cpu")
            self._sessions[key] = open_session(build(), providers, optimization="off",
                                               purpose="GPTQ's Hessians", name="gptq_hessian")
        return self._sessions[key]


def input_hessians(session: Any, names: list[str], feeds: Iterable[dict[str, np.ndarray]],
                   provider: str = "cpu") -> dict[str, np.ndarray]:
    """H = 2/n sum x x^T per named activation of ``session``, over every token of every feed (streamed)."""
    sums = HessianSums(provider)
    for feed in feeds:
        for name, x in zip(names, session.run(names, feed)):
            sums.add(name, x)
    hessians = {}
    for name in names:
        hessians[name] = sums.take(name)
        sums.release(name)
    return hessians


__all__ = ["HessianSums", "input_hessians", "rows_per_product"]
