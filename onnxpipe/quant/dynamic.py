"""Dynamic int8: weights int8 per output channel, activations quantized at run time.

The MatMuls the plan names are quantized: every linear layer of the body. The LM head
and the token lookup were already made 8-bit per vocabulary row by embedding.py (one shared table when tied),
unless --lm-head/--embeddings fp32 kept them float.
Weights use the full signed range (no reduce_range): the CPUs we target have VNNI, where 8-bit products do not
saturate.

Activations get one run-time scale per token (``activations="token"``, and ``"auto"``, the default) or one per
tensor (``"tensor"``):

- per token (``quantize_per_token``): each token divided by its own max |x|, rounded to a fixed grid (step 1/127
  around the uint8 zero point 128: QuantizeLinear with constant scale and zero point), MatMulInteger against the
  int8 weights, then multiplied back by the weight's per-channel scale and the token's max |x|. Standard ONNX ops
  only. Every step but the integer product is elementwise per token, and the product is exact, so **a token's
  result does not depend on the other tokens of its batch**: not on the other rows, not on pad positions. A
  trained model's "massive activations" (SmolLM2-135M's layer-11 down_proj input reaches |x| ~ 3000 on a window's
  first token, ~1.3 on the median token) cost the other tokens nothing.
- per tensor: ORT's quantize_dynamic, one DynamicQuantizeMatMul per layer (uint8, asymmetric, one scale for the
  whole input). One scale over the whole padded batch: a row's result depends on the rows beside it and on the
  pad positions (the same record scored alone and in a batch differs), and one massive token ruins the others
  (SmolLM2: perplexity +77%). Kept as an explicit choice for comparison; never chosen by ``auto``.
- auto: per token everywhere, and the layers that hurt the model most left in float when that is needed to stay
  within PPL_BUDGET_PCT of the float model's perplexity. The calibration prefills are split in two
  (sensitivity.split_feeds): the first EFFECT_TOKENS tokens rank the layers by their measured effect on the
  model's output (sensitivity.py: that layer alone int8, mean KL of the next-token distributions against the float
  model), and the rest, which the ranking never saw, judge the candidates: none float first, then the most harmful
  FLOAT_CANDIDATES (1, 2, 4, ... 48), searched by bisection for the fewest within the budget (none within: the
  least loss tried). The candidates are judged on the simulation (sensitivity.Simulation), and the one chosen is
  written and its held-out figure measured again on the written model. Per-token scales fix a token that dwarfs
  the others; they do not fix one channel that dwarfs the others inside every token (SmolLM2's down_proj inputs),
  which is what float is for. The figures, the candidates tried and the choice go into the manifest, the layers
  named by their module path (``layers.29.mlp.down_proj``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnxpipe.quant.graph import (
    UNIT_SCALE,
    UNIT_ZERO,
    WeightPlan,
    add_initializer,
    drop_unused_initializers,
    ir_model,
    make_node,
    needs_external_data,
    per_token_input,
    replace_node,
    save_quantized,
    write_back,
)
from onnxpipe.quant.quality import prefill_nll

ACTIVATION_SCHEMES = ("auto", "token", "tensor")
# auto: the most the held-out calibration perplexity may rise over the float model's. Half the quality gate's 2%:
# the search sees neither the 8-bit vocabulary table (written after it) nor the eval text; on SmolLM2-135M the
# report came out 1.1-1.3 points above the search's figure (docs/quantization.md)
PPL_BUDGET_PCT = 0.5
# auto, when per token everywhere is not within the budget: how many of the most harmful layers may be left in
# float (bisection over these counts); at most 64 of SmolLM2's 210
FLOAT_CANDIDATES = (1, 2, 4, 8, 16, 24, 32, 48, 64)
TOKEN_THRESHOLD = 0.03  # an explicit ``threshold``: per token above it, per tensor below (no search)
# the per-token grid: x / max|x| in [-1, 1] -> uint8 round(127 x) + 128, in [1, 255]

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass
class LayerChoice:
    """The activation scheme of the linear layers that read one input tensor, and the input's statistics."""

    activation: str
    nodes: list[str]
    scheme: str  # "token" | "tensor"
    tensor_error: float  # max over prefills of the median token's relative rms error under one per-tensor scale
    token_spread: float  # max over prefills of max_t max|x_t| / median_t max|x_t|
    float_nodes: list[str] = field(default_factory=list)  # of ``nodes``, those left in float (the scheme is the rest's)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensor_error"], d["token_spread"] = round(self.tensor_error, 5), round(self.token_spread, 2)
        return d


def quantize_dynamic_int8(proto: Any, out_path: Path, plan: WeightPlan, lm_head: str = "auto",
                          per_channel: bool = True, activations: str = "auto",
                          feeds: Iterable[dict[str, np.ndarray]] | None = None, threshold: float | None = None,
                          logits: str | None = None, budget_pct: float | None = None, log: Log = lambda m: None,
                          progress: Progress | None = None) -> dict[str, Any]:
    """``feeds`` (float prefills of calibration text) are needed for ``activations="auto"`` only; with ``logits``
    (the graph's logits output) the layers left float are searched as the module note says; with ``threshold``
    instead, per token for the inputs whose per-tensor error is above it and per tensor for the rest, no search;
    with neither, per token everywhere."""
    nodes = [n for n in plan.linears if lm_head != "fp32" or n != plan.lm_head]
    head = "fp32" if plan.lm_head and plan.lm_head not in nodes else "int8 per channel"
    details: dict[str, Any] = {"weights": "int8 per output channel", "per_channel": True, "lm_head": head}
    names = layer_names(proto, nodes)
    if activations != "auto":
        count = _write_dynamic(proto, out_path, nodes, nodes if activations == "token" else [], per_channel)
        details["activations"] = {"token": TOKEN_DESCRIPTION, "tensor": TENSOR_DESCRIPTION}[activations]
        details["batch_independent"] = activations == "token"
        details["per_channel"] = per_channel if activations == "tensor" else True
        details.update(_counts(count, len(nodes)))
        return details
    if feeds is None:
        raise ValueError("activations='auto' needs feeds (prefills) to measure the activations")
    feeds = list(feeds)
    if logits is not None and threshold is None:
        from onnxpipe.quant.sensitivity import split_feeds

        ranking, judging = split_feeds(feeds)
        choices = measure_activations(proto, nodes, ranking)  # before the search writes (in place)
        float_nodes, search = _search_float_layers(proto, out_path, nodes, ranking, judging, logits, budget_pct,
                                                   names, log, progress, per_channel)
        token_nodes, t = [n for n in nodes if n not in float_nodes], None
        details["layer_effects"] = search.pop("_effects")
    else:
        t = TOKEN_THRESHOLD if threshold is None else threshold
        choices = measure_activations(proto, nodes, feeds)
        token_nodes, float_nodes, search = [n for c in choices if c.tensor_error > t for n in c.nodes], [], None
        _write_dynamic(proto, out_path, nodes, token_nodes, per_channel)
    for c in choices:
        c.scheme = "token" if t is None or c.tensor_error > t else "tensor"
        c.float_nodes = [n for n in c.nodes if n in float_nodes]
    count = len([n for n in token_nodes if n not in float_nodes])
    details.update(_counts(count, len(nodes) - len(float_nodes)))
    details["activations"] = (f"per layer: {count} per token, {len(nodes) - len(float_nodes) - count} per tensor"
                              + (f", {len(float_nodes)} left float" if float_nodes else ""))
    details["batch_independent"] = count == len(nodes) - len(float_nodes)
    details["activation_threshold"] = t
    details["float_nodes"] = float_nodes
    details["float_layers"] = [names[n] for n in float_nodes]
    details["activation_search"] = search
    details["activation_choice"] = [c.to_json() for c in choices]
    return details


TOKEN_DESCRIPTION = "int8 per token (each token scaled to its max |x|, fixed grid): batch-independent"
TENSOR_DESCRIPTION = "uint8, dynamic per tensor (one scale over the whole batch): batch-dependent"


def _search_float_layers(proto: Any, out_path: Path, nodes: list[str], ranking: list[dict[str, np.ndarray]],
                         judging: list[dict[str, np.ndarray]], logits: str, budget_pct: float | None,
                         names: dict[str, str], log: Log, progress: Progress | None,
                         per_channel: bool) -> tuple[list[str], dict[str, Any]]:
    """auto (module note): the layers ranked on ``ranking``, the candidates judged on ``judging``; writes
    ``out_path`` per token everywhere but the float layers chosen (``proto`` changed in place); returns them and
    the search's record (with ``_effects`` for the caller to pop)."""
    from onnxpipe.quant.sensitivity import Simulation

    budget = PPL_BUDGET_PCT if budget_pct is None else budget_pct
    held_tokens = sum(f["input_ids"].size for f in judging)
    sim = Simulation(proto, nodes, set(nodes), logits)
    float_ppl = sim.perplexity(judging, np.zeros(len(sim.order), np.float32))
    tried: dict[int, float] = {}
    effects: list[Any] = []

    def judge(k: int) -> float:
        kept = [e.node for e in effects[:k]]
        tried[k] = (sim.perplexity(judging, sim.switches(kept)) / float_ppl - 1.0) * 100.0
        log(f"dynamic int8 search: per token, {k} layers left float: {tried[k]:+.3f}% on {held_tokens} held-out "
            f"calibration tokens (budget {budget:g}%)")
        return tried[k]

    log(f"dynamic int8 search: {len(nodes)} layers, per token everywhere; float perplexity {float_ppl:.4g} on "
        f"{held_tokens} held-out calibration tokens")
    if judge(0) > budget:
        log(f"dynamic int8 search: measuring each layer's effect on the output ({len(sim.order)} layers, "
            f"{sum(f['input_ids'].size for f in ranking)} other calibration tokens)...")
        step = max(1, len(sim.order) // 10)

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress("layer effects", done, total)
            if done % step == 0 or done == total:  # a line too: a log file or a pipe shows no bar
                log(f"dynamic int8 search: layer effects {done}/{total}")

        effects = sim.effects(ranking, report)
        counts = [k for k in FLOAT_CANDIDATES if k < len(effects)]
        lo, hi = 0, len(counts) - 1
        while lo <= hi:  # the fewest float layers within the budget, assuming more float never hurts
            mid = (lo + hi) // 2
            if judge(counts[mid]) <= budget:
                hi = mid - 1
            else:
                lo = mid + 1
    within = [k for k, change in tried.items() if change <= budget]
    k = min(within) if within else min(tried, key=lambda c: tried[c])
    float_nodes = [e.node for e in effects[:k]]
    int8_nodes = [n for n in nodes if n not in float_nodes]
    _write_dynamic(proto, out_path, int8_nodes, int8_nodes, per_channel)
    written = (calibration_perplexity(out_path, judging, logits) / float_ppl - 1.0) * 100.0
    log(f"dynamic int8 search: kept {k} layers float" + (f" ({', '.join(names[n] for n in float_nodes)})" if k else "")
        + f"; the written model: {written:+.3f}% on the held-out calibration tokens"
        + ("" if within else f" (none within the {budget:g}% budget: the least loss tried)"))
    record = {"budget_pct": budget, "float_calibration_ppl": float_ppl, "held_out_tokens": held_tokens,
              "ranking_tokens": sum(f["input_ids"].size for f in ranking) if effects else 0,
              "candidates": [{"per_token_nodes": len(nodes) - c, "float_nodes": c,
                              "calibration_ppl_change_pct": round(tried[c], 3)} for c in sorted(tried)],
              "chosen_float_nodes": k, "within_budget": bool(within),
              "written_calibration_ppl_change_pct": round(written, 3),
              "_effects": [dict(e.to_json(), layer=names[e.node]) for e in effects[:max(FLOAT_CANDIDATES) * 2]]}
    return float_nodes, record


def layer_names(proto: Any, nodes: list[str]) -> dict[str, str]:
    """node name -> the layer's Hugging Face module path (``layers.29.mlp.down_proj``), read from the exporter's
    record of the node's module scopes (``pkg.torch.onnx.name_scopes``), the node's name
    (``/model/layers.29/mlp/down_proj/MatMul``) or its weight's initializer name
    (``model.layers.29.mlp.down_proj.weight``); the node name when none says."""
    by_name = {n.name: n for n in proto.graph.node}
    out = {}
    for name in nodes:
        node = by_name.get(name)
        scopes = _name_scopes(node) if node is not None else []
        weight = node.input[1] if node is not None and len(node.input) > 1 else ""
        found = [path for path in map(_module_path, reversed(scopes)) if path]
        outside = re.sub(r"^(model\.)+", "", scopes[-2]) if len(scopes) >= 2 else ""  # the head: model.lm_head
        out[name] = (found[0] if found else None) or _module_path(name) or _module_path(weight) or outside or name
    return out


def _name_scopes(node: Any) -> list[str]:
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in scopes] if isinstance(scopes, list) else []
    return []


_MODULE = re.compile(r"(?:^|[./])((?:h|layers|blocks?|decoder\.layers)[./]\d+(?:[./][A-Za-z_][\w]*)+)")


def _module_path(name: str) -> str | None:
    m = _MODULE.search(name)
    if m is None:
        return None
    parts = [p for p in re.split(r"[./]", m.group(1)) if p]
    while parts and re.fullmatch(r"(MatMul|Gemm|weight|bias)(_\d+)?", parts[-1]):
        parts.pop()
    return ".".join(parts) if len(parts) > 2 else None


def _counts(per_token: int, total: int) -> dict[str, int]:
    return {"per_token_nodes": per_token, "per_tensor_nodes": total - per_token, "quantized_nodes": total}


def _write_dynamic(proto: Any, out_path: Path, nodes: list[str], token_nodes: list[str], per_channel: bool) -> int:
    """Per-token scales for ``token_nodes``, ORT's quantize_dynamic (per tensor) for the rest of ``nodes``; writes
    ``out_path``; ``proto`` is changed in place. Returns the per-token node count."""
    wanted = set(token_nodes)
    tensor_nodes = [n for n in nodes if n not in wanted]
    count = quantize_per_token(proto, [n for n in nodes if n in wanted])
    if not tensor_nodes:
        save_quantized(proto, out_path)
        return count
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_ort():
        quantize_dynamic(
            proto,
            str(out_path),
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=tensor_nodes,
            use_external_data_format=needs_external_data(proto),
            extra_options={"MatMulConstBOnly": True},
        )
    return count


def measure_activations(proto: Any, nodes: list[str], feeds: list[dict[str, np.ndarray]]) -> list[LayerChoice]:
    """Run the float model on ``feeds``: each group of ``nodes`` that reads one input gets its statistics (scheme
    left "token")."""
    from onnxpipe.quant.smoothquant import _session, activation_groups, with_outputs

    groups = activation_groups(proto, nodes)
    names = list(groups)
    stats = {x: (0.0, 0.0) for x in names}
    if names:
        session = _session(with_outputs(proto, names))
        for feed in feeds:
            for x, value in zip(names, session.run(names, feed)):
                err, spread = activation_statistics(value)
                stats[x] = (max(stats[x][0], err), max(stats[x][1], spread))
    return [LayerChoice(x, [n.name for n in groups[x]], "token", stats[x][0], stats[x][1]) for x in names]


def calibration_perplexity(model_path: Path, feeds: list[dict[str, np.ndarray]], logits: str) -> float:
    """Perplexity of a written model on the feeds' prefills, run as a user would (all ORT optimizations)."""
    from onnxpipe.quant.quality import measure_session

    session = measure_session(model_path)
    nll, count = 0.0, 0
    for feed in feeds:
        s, n = prefill_nll(session.run([logits], feed)[0], feed["input_ids"])
        nll, count = nll + s, count + n
    return math.exp(nll / count)


def activation_statistics(x: np.ndarray) -> tuple[float, float]:
    """(tensor_error, token_spread) of one activation tensor [..., K], every leading position a token.

    tensor_error: quantize ``x`` as DynamicQuantizeLinear does (uint8, one scale and zero point for the tensor, the
    range including 0), and take the median over tokens of ||x_t - q_t|| / ||x_t||.
    """
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    if x2.size == 0:
        return 0.0, 0.0
    lo, hi = min(float(x2.min()), 0.0), max(float(x2.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    q = (np.clip(np.round(x2 / scale) + zero, 0, 255) - zero) * scale
    power = np.maximum((x2 ** 2).sum(-1), 1e-300)
    err = float(np.median(np.sqrt(((x2 - q) ** 2).sum(-1) / power)))
    token_max = np.abs(x2).max(-1)
    spread = float(token_max.max() / max(float(np.median(token_max)), 1e-30))
    return err, spread


def quantize_per_token(proto: Any, nodes: list[str]) -> int:
    """Rewrite the named MatMul(x, constant W) nodes into per-token dynamic int8 (see the module note); in place.
    Returns the number of nodes rewritten.

    Per input x, shared by the layers that read it (q/k/v, gate/up): Abs, ReduceMax over the last axis, Max (an
    all-zero token gets a tiny divisor, not 0/0), Div, QuantizeLinear with the constant grid (UNIT_SCALE,
    UNIT_ZERO). Per layer: MatMulInteger against W int8 per output channel, Cast to float, Mul by the weight's
    per-channel scale x UNIT_SCALE, Mul by the token's max |x|. No scale depends on another token.
    """
    model = ir_model(proto)
    count = rewrite_per_token(model, nodes)
    if count:
        drop_unused_initializers(model.graph)
        write_back(model, proto)
    return count


def rewrite_per_token(model: ir.Model, nodes: list[str],
                      store: Callable[[np.ndarray, str], Any] = lambda array, name: array,
                      done: Callable[[ir.Value], None] | None = None) -> int:
    """quantize_per_token's rewrite on an onnx_ir model, in place (unused initializers left for the caller).
    ``store(array, name)``: what a new int8 weight or scale becomes (the array itself, or a tensor written out
    already: rtn_stream.Spill); ``done(weight)``: called once a layer's float weight has been read and replaced."""
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
    wanted = set(nodes)
    shared: dict[str, ir.Value] = {}
    count, normalized = 0, {}
    for node in list(graph):
        w_value = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if node.name not in wanted or w_value is None or not w_value.is_initializer() or w_value.const_value is None:
            continue
        if not shared:
            shared = {k: add_initializer(graph, f"/quant/per_token/{k}", v) for k, v in (
                ("tiny", np.array(1e-30, np.float32)), ("axes", np.array([-1], np.int64)),
                ("unit_scale", np.array(UNIT_SCALE, np.float32)), ("unit_zero", np.array(UNIT_ZERO, np.uint8)))}
        w = w_value.const_value.numpy().astype(np.float32)  # [K, N]
        w_scale = np.abs(w).max(0) / 127.0
        w_scale = np.where(w_scale > 0, w_scale, 1.0).astype(np.float32)
        p = node.name
        wq = add_initializer(graph, f"{p}/W_int8", store(np.clip(np.round(w / w_scale), -127, 127).astype(np.int8),
                                                         f"{p}/W_int8"))
        ws = add_initializer(graph, f"{p}/W_scale", store((w_scale * np.float32(UNIT_SCALE)).astype(np.float32),
                                                          f"{p}/W_scale"))
        del w
        x = node.inputs[0]
        new: list[ir.Node] = []
        if x not in normalized:
            new = per_token_input(x, f"{p}/per_token", shared, opset)
            normalized[x] = (new[-1].outputs[0], new[2].outputs[0])
        x_q, token_max = normalized[x]
        new.append(make_node("MatMulInteger", [x_q, wq, shared["unit_zero"]], f"{p}/y_int32", f"{p}/MatMulInteger"))
        new.append(make_node("Cast", [new[-1].outputs[0]], f"{p}/y_float", f"{p}/Cast", to=ir.DataType.FLOAT.value))
        new.append(make_node("Mul", [new[-1].outputs[0], ws], f"{p}/y_unit", f"{p}/MulWeightScale"))
        new.append(make_node("Mul", [new[-1].outputs[0], token_max], None, f"{p}/MulTokenMax"))
        replace_node(graph, node, new)
        if done is not None:
            done(w_value)
        count += 1
    return count



class _quiet_ort:
    """ORT's quantization tools log a pre-processing hint on every call and a line per node at INFO; our log says
    what was done instead."""

    def __enter__(self) -> None:
        import logging

        names = ["", "onnxruntime"] + [n for n in logging.root.manager.loggerDict if n.startswith("onnxruntime")]
        self._saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
        for lg, _ in self._saved:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in self._saved:
            lg.setLevel(level)
