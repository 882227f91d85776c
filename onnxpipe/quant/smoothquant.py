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

from onnxpipe.errors import OnnxpipeError
from onnxpipe.quant.graph import consumers, initializer_map, producers

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
    """A copy of the model that also returns the named tensors (float32)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    have = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in have)
    return copy


def smoothing_scales(act_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    w_max = np.max([np.abs(w).max(1) for w in weights], axis=0).astype(np.float64)
    s = np.power(np.maximum(act_max, 1e-12), alpha) / np.power(np.maximum(w_max, 1e-12), 1.0 - alpha)
    s = np.where((act_max > 0) & (w_max > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4)


def apply_smoothing(proto: Any, groups: dict[str, list[Any]], act_max: dict[str, np.ndarray],
                    alpha: float | dict[str, float]) -> SmoothReport:
    """Scale weights by s and activations by 1/s, group by group; in place. ``alpha`` is one for every group, or
    one per activation (a group missing from the dict, or at 0, is left alone)."""
    from onnx import numpy_helper

    graph = proto.graph
    report = SmoothReport(alpha=alpha if not isinstance(alpha, dict) else "per group")
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for x, nodes in groups.items():
        inits = initializer_map(graph)
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        amax = act_max[x]
        if amax.shape[0] != weights[0].shape[0]:
            continue
        group_alpha = alpha.get(x, 0.0) if isinstance(alpha, dict) else alpha
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
        report.per_group.append({"activation": x, "matmuls": [n.name for n in nodes], "how": how, "alpha": group_alpha,
                                 "outlier_ratio": [round(before, 2), round(after, 2)]})
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:  # the norm scales that were replaced
        graph.initializer.remove(t)
    return report


def rescale_group(graph: Any, x: str, nodes: list[Any], s: np.ndarray, uses: dict[str, int],
                  allow_mul: bool = True) -> str | None:
    """X -> X / s (folded into X's producer, or an inserted Mul) and W -> diag(s) W for each MatMul reading X."""
    from onnx import numpy_helper

    how = _fold_into_producer(graph, x, nodes, s)
    if how is None:
        if not allow_mul:
            return None
        how = _insert_mul(graph, x, nodes, s)
    inits = initializer_map(graph)
    for node in nodes:
        w = numpy_helper.to_array(inits[node.input[1]])
        name = node.input[1] if uses[node.input[1]] == 1 else f"{node.input[1]}_smooth_{node.name}"
        _set_initializer(graph, name, (w * s[:, None]).astype(w.dtype), replace=name == node.input[1])
        node.input[1] = name
    return how


def plant_outliers(proto: Any, linears: list[str], factor: float, channels: int, seed: int = 0) -> int:
    """The inverse of SmoothQuant, for tests and benchmarks: multiply ``channels`` random channels of each norm
    output that feeds linear layers by ``factor`` and divide the matching weight rows by it. The float function
    is unchanged; the activations get the outlier channels large LLMs are known for. Returns groups planted."""
    rng = np.random.default_rng(seed)
    graph = proto.graph
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    planted = 0
    for x, nodes in activation_groups(proto, linears).items():
        k = next(t for t in graph.initializer if t.name == nodes[0].input[1]).dims[0]
        s = np.ones(k)
        s[rng.choice(k, size=min(channels, k), replace=False)] = 1.0 / factor
        planted += rescale_group(graph, x, nodes, s, uses, allow_mul=False) is not None
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return planted


def _fold_into_producer(graph: Any, x: str, nodes: list[Any], s: np.ndarray) -> str | None:
    """Divide the producing norm's scale (and shift) by s, if X and the tensors on the way have no other readers."""
    from onnx import numpy_helper

    cons, prod, inits = consumers(graph), producers(graph), initializer_map(graph)
    group = {id(n) for n in nodes}
    if {id(c) for c in cons.get(x, [])} != group or x in {o.name for o in graph.output}:
        return None
    node = prod.get(x)
    name = x
    if node is not None and node.op_type == "Reshape":  # keeps channel identity when both last axes are K
        inner = node.input[0]
        if len(cons.get(inner, [])) != 1 or inner in {o.name for o in graph.output}:
            return None
        name, node = inner, prod.get(inner)
    if node is None or node.output[0] != name:
        return None
    k = s.shape[0]
    if node.op_type in NORM_PARAMS:
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if axis != -1:
            return None
        params = [i for i in NORM_PARAMS[node.op_type] if i < len(node.input) and node.input[i]]
        if not all(node.input[i] in inits and tuple(inits[node.input[i]].dims) == (k,) for i in params):
            return None
        for i in params:
            value = numpy_helper.to_array(inits[node.input[i]])
            new = f"{node.input[i]}_smooth_{node.name}"
            _set_initializer(graph, new, (value / s).astype(value.dtype), replace=False)
            node.input[i] = new
        return "folded"
    if node.op_type == "Mul":
        for i in (0, 1):
            t = inits.get(node.input[i])
            if t is not None and tuple(t.dims) == (k,):
                value = numpy_helper.to_array(t)
                new = f"{node.input[i]}_smooth_{node.name}"
                _set_initializer(graph, new, (value / s).astype(value.dtype), replace=False)
                node.input[i] = new
                return "folded"
    return None


def _insert_mul(graph: Any, x: str, nodes: list[Any], s: np.ndarray) -> str:
    import onnx
    from onnx import numpy_helper

    inv = f"{x}_smooth_inv_scale"
    out = f"{x}_smoothed"
    graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
    mul = onnx.helper.make_node("Mul", [x, inv], [out], name=f"{nodes[0].name}/SmoothQuantMul")
    first = min(list(graph.node).index(n) for n in nodes)
    graph.node.insert(first, mul)
    for n in nodes:
        n.input[0] = out
    return "mul"


def _set_initializer(graph: Any, name: str, value: np.ndarray, replace: bool) -> None:
    from onnx import numpy_helper

    if replace:
        old = next(t for t in graph.initializer if t.name == name)
        graph.initializer.remove(old)
    graph.initializer.append(numpy_helper.from_array(value, name))


def smooth_model(proto: Any, linears: list[str], alpha: float | dict[str, float], stats_feeds: Iterable[dict[str, np.ndarray]],
                 check_feed: dict[str, np.ndarray], logits_name: str) -> tuple[Any, SmoothReport]:
    """The smoothed model (a copy) and what was done; fails if it does not compute what the input computed."""
    import onnx

    groups = activation_groups(proto, linears)
    names = list(groups)
    stats_model = with_outputs(proto, names)
    act_max = channel_absmax(_session(stats_model), names, stats_feeds)
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(proto)
    report = apply_smoothing(smoothed, activation_groups(smoothed, linears), act_max, alpha)
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
