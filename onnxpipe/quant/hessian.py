"""GPTQ's input Hessians, H = 2/n sum x x^T per layer input, in float64, summed where the activations are: on CUDA
(where this onnxruntime has it) by an onnxruntime Gemm whose sums stay in GPU memory until taken; on the CPU by
numpy, whose ``x.T @ x`` is a symmetric rank-k update (BLAS syrk: half the multiply-adds of a general product;
onnxruntime's CPU Gemm computes both halves, and measured no faster per multiply-add, one thread each).

Each input's rows are gathered until there are ``rows_per_product(K)`` of them (a quarter of K, at least 256: the
gathered rows, in float32, are about an eighth of the Hessian's bytes), then added as one product
``H += X^T X``: one pass over H per K/4 rows, where a product per calibration batch passed over H (1.6 GB at
K = 14336) once per 512 rows. The same float64 arithmetic summed in another order: the same Hessians up to
float64 rounding.

On CUDA the proxy loss of each quantized weight (gptq._proxy_loss_ratio: tr(dW^T H dW) of GPTQ and of RTN, 4 K^2 N
multiply-adds a weight, more than GPTQ's own column updates) is computed there too, against the sums still held:
the weight and GPTQ's int4 values go in, GPTQ's and RTN's dequantized weights are made in the graph (the host's
passes over K x N for them took ~12 s an 8B layer on one core).
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


class _Builder:
    """A small graph written op by op: each call adds one node and returns its output."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []

    def __call__(self, op: str, *inputs: ir.Value, **attrs: Any) -> ir.Value:
        self.nodes.append(ir.node(op, list(inputs), attrs or None))
        return self.nodes[-1].outputs[0]

    def const(self, value: Any, dtype: Any = np.float64) -> ir.Value:
        return self("Constant", value=ir.tensor(np.asarray(value, dtype)))


def _proxy_graph(k: int, n: int, group_size: int) -> bytes:
    """tr(d^T H d) of GPTQ's and RTN's errors of one weight, both made here from the weight and GPTQ's int4 values.
    Inputs: h [K, K] (the sums), w [K, N] (float64), q [N * blocks, group] (uint8), scale [N * blocks, 1] (float32),
    zero [N * blocks, 1] (uint8): QuantizedWeight's layout. RTN is rtn_weight's (group_params' grid with integer zero
    points), op for op: Round rounds half to even, as numpy does. Output: [2] (GPTQ's, RTN's)."""
    blocks = -(-k // group_size)
    k_pad = blocks * group_size
    f64 = ir.DataType.DOUBLE

    def value(name: str, dtype: ir.DataType, shape: list[int]) -> ir.Value:
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))

    h, w = value("h", f64, [k, k]), value("w", f64, [k, n])
    q, scale = value("q", ir.DataType.UINT8, [n * blocks, group_size]), value("scale", ir.DataType.FLOAT, [n * blocks, 1])
    zero = value("zero", ir.DataType.UINT8, [n * blocks, 1])
    op = _Builder()
    to64 = f64.value
    zero_, one, maxq = op.const(0.0), op.const(1.0), op.const(15.0)
    # GPTQ's weights: (q - zero) * scale, rows n * blocks + block -> [K, N]
    dq = op("Mul", op("Sub", op("Cast", q, to=to64), op("Cast", zero, to=to64)), op("Cast", scale, to=to64))
    dq = op("Reshape", dq, op.const([n, k_pad], np.int64))
    dq = op("Transpose", op("Slice", dq, op.const([0], np.int64), op.const([k], np.int64), op.const([1], np.int64)),
            perm=[1, 0])
    # RTN's: per block of rows, the range with 0 in it, its 4-bit grid, rounded and back
    padded = w if k_pad == k else op("Pad", w, op.const([0, 0, k_pad - k, 0], np.int64))
    groups = op("Reshape", padded, op.const([blocks, group_size, n], np.int64))
    axis = op.const([1], np.int64)
    lo = op("Min", op("ReduceMin", groups, axis, keepdims=1), zero_)
    hi = op("Max", op("ReduceMax", groups, axis, keepdims=1), zero_)
    step = op("Div", op("Sub", hi, lo), maxq)
    step = op("Where", op("Greater", step, zero_), step, one)
    point = op("Clip", op("Round", op("Div", op("Neg", lo), step)), zero_, maxq)
    rounded = op("Clip", op("Round", op("Add", op("Div", groups, step), point)), zero_, maxq)
    rtn = op("Reshape", op("Mul", op("Sub", rounded, point), step), op.const([k_pad, n], np.int64))
    if k_pad != k:
        rtn = op("Slice", rtn, op.const([0], np.int64), op.const([k], np.int64), op.const([0], np.int64))
    losses = []
    for approx in (dq, rtn):
        d = op("Sub", w, approx)
        losses.append(op("Unsqueeze", op("ReduceSum", op("Mul", op("MatMul", h, d), d), keepdims=0),
                         op.const([0], np.int64)))
    out = op("Concat", *losses, axis=0)
    return _serialized([h, w, q, scale, zero], op.nodes, out)


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

    def proxy_losses(self, name: str, weight: np.ndarray, qw: Any, group_size: int) -> tuple[float, float] | None:
        """tr(dW^T H dW) of GPTQ's weights ``qw`` (a gptq.QuantizedWeight with integer zero points) and of RTN's,
        both against ``weight`` [K, N] and ``name``'s sums, computed where the sums are held, each scaled as
        ``take`` scales H; None with numpy (the caller holds the Hessian) or float zero points."""
        if self.engine != "onnxruntime" or name not in self._sums or qw.zero_float is not None:
            return None
        k, n = weight.shape
        session = self._session(("proxy", k, n, group_size), lambda: _proxy_graph(k, n, group_size))
        binding = session.io_binding()
        binding.bind_ortvalue_input("h", self._sums[name])
        feeds = {"w": np.ascontiguousarray(weight, np.float64), "q": np.ascontiguousarray(qw.q),
                 "scale": np.ascontiguousarray(qw.scale, np.float32), "zero": np.ascontiguousarray(qw.zero_point)}
        for key, array in feeds.items():
            binding.bind_cpu_input(key, array)
        binding.bind_output("out", "cpu")
        session.run_with_iobinding(binding, self._run_options())
        gptq, rtn = binding.copy_outputs_to_cpu()[0] * (2.0 / max(self.rows[name], 1))
        return float(gptq), float(rtn)

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
        session.run_with_iobinding(binding, self._run_options())
        self._sums[name] = out  # the previous sum is freed with its OrtValue

    def _session(self, key: tuple[Any, ...], build: Callable[[], bytes]) -> Any:
        if key not in self._sessions:
            from onnxpipe.runtime.sessions import open_session

            # each session has its own arena on the device: grown by what is asked, and shrunk after each run
            # (_run_options), so the proxy's temporaries (~10 x K x N float64) are not kept beside the sums
            device = (self.provider, {"arena_extend_strategy": "kSameAsRequested"})
            providers = ("cpu",) if self.provider == "cpu" else (device, "cpu")
            self._sessions[key] = open_session(build(), providers, optimization="off",
                                               purpose="GPTQ's Hessians", name="gptq_hessian")
        return self._sessions[key]

    def _run_options(self) -> Any:
        import onnxruntime as ort

        options = ort.RunOptions()
        if self.provider == "cuda":
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
        return options


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
