"""SmoothQuant on the ONNX graph: move activation outliers into the weights before static int8 calibration.

For a group of MatMuls that read one activation X ([..., K]) with constant weights W ([K, N]), a per-channel
scale s (K,) is chosen from calibration statistics (Xiao et al., 2023):

    s_k = max|X_k| ** alpha / max|W_k,:| ** (1 - alpha)        X' = X / s,  W' = diag(s) W,  X' W' = X W

W' is a new constant. X / s is folded into the op that made X when it is a normalization with constant
scale (LayerNormalization and its Skip/Simplified forms, or the Mul by the RMSNorm weight), possibly through one
Reshape that keeps the last axis; otherwise an explicit Mul by 1/s is inserted before the group. ORT's own
SmoothQuant needs Intel Neural Compressor; this one needs nothing but numpy. The result is the same function in
exact arithmetic, and ``smooth_model`` checks that on real inputs before anything is calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx_ir as ir

from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant.graph import add_initializer, drop_unused_initializers, ir_model, make_node, write_back

# op type -> (indices of the inputs that scale output 0 along the last axis), for a fold of 1/s into them
NORM_PARAMS = {
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2,),
}
EQUIVALENCE_TOLERANCE = 1e-4


@dataclass
class SmoothReport:
    alpha: float | str  # "per group": each group's alpha is in per_group (layer_alpha.py)
    groups: int = 0  # groups smoothed
    unsmoothed: int = 0  # groups whose per-group alpha was 0 (layer_alpha.OFF): left as they were
    folded: int = 0  # groups whose 1/s went into the producing norm
    inserted_muls: int = 0  # groups that got an explicit Mul by 1/s
    outlier_ratio_before: float = 0.0  # max over groups of max|X_k| / median_k max|X_k|
    outlier_ratio_after: float = 0.0
    equivalence_rel_err: float = 0.0
    per_group: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["per_group"] = self.per_group[:64]
        return d


def activation_groups(proto: Any, linears: list[str]) -> dict[str, list[Any]]:
    """Activation tensor name -> the linear MatMuls that read it."""
    wanted = set(linears)
    groups: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        if node.name in wanted:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def channel_absmax(session: Any, names: list[str], feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel max |x| (over every axis but the last) of each named tensor, streamed over the feeds."""
    out: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            m = np.abs(value.reshape(-1, value.shape[-1])).max(0) if value.size else np.zeros(value.shape[-1])
            out[name] = np.maximum(out[name], m) if name in out else m.astype(np.float64)
    return out


def with_outputs(proto: Any, names: list[str]) -> Any:
    """A copy of the model that also returns the named tensors (float32 where the graph does not say)."""
    model = ir_model(proto)
    values = {v.name: v for n in model.graph for v in n.outputs}
    values.update((v.name, v) for v in model.graph.inputs)
    values.update(model.graph.initializers)
    have = {o.name for o in model.graph.outputs}
    for name in names:
        if name in have:
            continue
        if name not in values:
            raise ValueError(f"no tensor {name!r} in the graph")
        value = values[name]
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        model.graph.outputs.append(value)
    return ir.serde.serialize_model(model)


def smoothing_scales(act_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    w_max = np.max([np.abs(w).max(1) for w in weights], axis=0).astype(np.float64)
    s = np.power(np.maximum(act_max, 1e-12), alpha) / np.power(np.maximum(w_max, 1e-12), 1.0 - alpha)
    s = np.where((act_max > 0) & (w_max > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4)


def apply_smoothing(graph: ir.Graph, linears: list[str], act_max: dict[str, np.ndarray],
                    alpha: float | dict[str, float]) -> SmoothReport:
    """Scale weights by s and activations by 1/s, group by group (the MatMuls of ``linears`` that read one
    activation); in place. ``alpha`` is one for every group, or one per activation (a group missing from the dict,
    or at 0, is left alone)."""
    report = SmoothReport(alpha=alpha if not isinstance(alpha, dict) else "per group")
    uses = _use_counts(graph)
    for x, nodes in _groups(graph, linears).items():
        weights = [_array(n.inputs[1]) for n in nodes]
        amax = act_max[str(x.name)]
        if amax.shape[0] != weights[0].shape[0]:
            continue
        group_alpha = alpha.get(str(x.name), 0.0) if isinstance(alpha, dict) else alpha
        if group_alpha == 0.0:
            report.unsmoothed += 1
            continue
        s = smoothing_scales(amax, weights, group_alpha)
        how = rescale_group(graph, x, nodes, s, uses)
        report.groups += 1
        report.folded += how == "folded"
        report.inserted_muls += how == "mul"
        before = float(amax.max() / max(np.median(amax), 1e-12))
        after_x = amax / s
        after = float(after_x.max() / max(np.median(after_x), 1e-12))
        report.outlier_ratio_before = max(report.outlier_ratio_before, before)
        report.outlier_ratio_after = max(report.outlier_ratio_after, after)
        report.per_group.append({"activation": x.name, "matmuls": [n.name for n in nodes], "how": how,
                                 "alpha": group_alpha, "outlier_ratio": [round(before, 2), round(after, 2)]})
    drop_unused_initializers(graph)  # the norm scales and weights that were replaced
    return report


def _groups(graph: ir.Graph, linears: list[str]) -> dict[ir.Value, list[ir.Node]]:
    """activation_groups on the IR: activation value -> the named MatMuls that read it, in graph order."""
    wanted = set(linears)
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        if node.name in wanted and node.inputs[0] is not None:
            groups.setdefault(node.inputs[0], []).append(node)
    return groups


def _use_counts(graph: ir.Graph) -> dict[str, int]:
    """Each value's readers among the nodes when smoothing starts (a node reading it twice counts twice)."""
    uses: dict[str, int] = {}
    for n in graph:
        for v in n.inputs:
            if v is not None:
                uses[str(v.name)] = uses.get(str(v.name), 0) + 1
    return uses


def _array(value: ir.Value | None) -> np.ndarray:
    assert value is not None and value.const_value is not None
    return value.const_value.numpy()


def _const_vector(value: ir.Value | None, k: int) -> bool:
    return (value is not None and value.is_initializer() and value.const_value is not None
            and tuple(value.const_value.shape.numpy()) == (k,))


def rescale_group(graph: ir.Graph, x: ir.Value, nodes: list[ir.Node], s: np.ndarray, uses: dict[str, int],
                  allow_mul: bool = True) -> str | None:
    """X -> X / s (folded into X's producer, or an inserted Mul) and W -> diag(s) W for each MatMul reading X."""
    how = _fold_into_producer(graph, x, nodes, s)
    if how is None:
        if not allow_mul:
            return None
        how = _insert_mul(graph, x, nodes, s)
    for node in nodes:
        weight = node.inputs[1]
        assert weight is not None and weight.const_value is not None
        w = weight.const_value.numpy()
        scaled = (w * s[:, None]).astype(w.dtype)
        if uses[str(weight.name)] == 1:
            weight.const_value = ir.tensor(scaled, name=weight.name)
        else:
            node.replace_input_with(1, add_initializer(graph, f"{weight.name}_smooth_{node.name}", scaled))
    return how


def plant_outliers(proto: Any, linears: list[str], factor: float, channels: int, seed: int = 0) -> int:
    """The inverse of SmoothQuant, for tests and benchmarks: multiply ``channels`` random channels of each norm
    output that feeds linear layers by ``factor`` and divide the matching weight rows by it. The float function
    is unchanged; the activations get the outlier channels large LLMs are known for. Returns groups planted."""
    rng = np.random.default_rng(seed)
    model = ir_model(proto)
    graph = model.graph
    uses = _use_counts(graph)
    planted = 0
    for x, nodes in _groups(graph, linears).items():
        k = _array(nodes[0].inputs[1]).shape[0]
        s = np.ones(k)
        s[rng.choice(k, size=min(channels, k), replace=False)] = 1.0 / factor
        planted += rescale_group(graph, x, nodes, s, uses, allow_mul=False) is not None
    drop_unused_initializers(graph)
    write_back(model, proto)
    return planted


def _fold_into_producer(graph: ir.Graph, x: ir.Value, nodes: list[ir.Node], s: np.ndarray) -> str | None:
    """Divide the producing norm's scale (and shift) by s, if X and the tensors on the way have no other readers."""
    if {id(u.node) for u in x.uses()} != {id(n) for n in nodes} or x.is_graph_output():
        return None
    node, value = x.producer(), x
    if node is not None and node.op_type == "Reshape":  # keeps channel identity when both last axes are K
        inner = node.inputs[0]
        if inner is None or len(inner.uses()) != 1 or inner.is_graph_output():
            return None
        node, value = inner.producer(), inner
    if node is None or node.outputs[0] is not value:
        return None
    k = s.shape[0]
    if node.op_type in NORM_PARAMS:
        if node.attributes.get_int("axis", -1) != -1:
            return None
        params = [i for i in NORM_PARAMS[node.op_type] if i < len(node.inputs) and node.inputs[i] is not None]
        if not all(_const_vector(node.inputs[i], k) for i in params):
            return None
        for i in params:
            _divide_input(graph, node, i, s)
        return "folded"
    if node.op_type == "Mul":
        for i in (0, 1):
            if _const_vector(node.inputs[i], k):
                _divide_input(graph, node, i, s)
                return "folded"
    return None


def _divide_input(graph: ir.Graph, node: ir.Node, i: int, s: np.ndarray) -> None:
    """The node's constant input ``i`` divided by s, as a new initializer (the old one may have other readers)."""
    value = _array(node.inputs[i])
    new = add_initializer(graph, f"{node.inputs[i].name}_smooth_{node.name}", (value / s).astype(value.dtype))  # type: ignore[union-attr]
    node.replace_input_with(i, new)


def _insert_mul(graph: ir.Graph, x: ir.Value, nodes: list[ir.Node], s: np.ndarray) -> str:
    inv = add_initializer(graph, f"{x.name}_smooth_inv_scale", (1.0 / s).astype(np.float32))
    mul = make_node("Mul", [x, inv], f"{x.name}_smoothed", f"{nodes[0].name}/SmoothQuantMul")
    order = {id(n): i for i, n in enumerate(graph)}
    graph.insert_before(min(nodes, key=lambda n: order[id(n)]), mul)
    for n in nodes:
        n.replace_input_with(0, mul.outputs[0])
    return "mul"


def smooth_model(proto: Any, linears: list[str], alpha: float | dict[str, float], stats_feeds: Iterable[dict[str, np.ndarray]],
                 check_feed: dict[str, np.ndarray], logits_name: str) -> tuple[Any, SmoothReport]:
    """The smoothed model (a copy) and what was done; fails if it does not compute what the input computed."""
    import onnx

    groups = activation_groups(proto, linears)
    names = list(groups)
    stats_model = with_outputs(proto, names)
    act_max = channel_absmax(_session(stats_model), names, stats_feeds)
    del stats_model
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(proto)
    model = ir_model(smoothed)
    report = apply_smoothing(model.graph, linears, act_max, alpha)
    write_back(model, smoothed)
    ref = _session(proto).run([logits_name], check_feed)[0]
    got = _session(smoothed).run([logits_name], check_feed)[0]
    report.equivalence_rel_err = float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-12))
    if not report.equivalence_rel_err <= EQUIVALENCE_TOLERANCE:
        raise OnnxpipeError(
            f"SmoothQuant changed what the float model computes (rel err {report.equivalence_rel_err:.3g} > "
            f"{EQUIVALENCE_TOLERANCE:g}); this is a bug in the graph rewrite, please report it"
        )
    return smoothed, report


def _session(proto: Any) -> Any:
    from onnxpipe.quant.graph import float_session

    return float_session(proto)
