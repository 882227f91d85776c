"""What a model directory holds: manifest summary, op-type histogram, size, I/O signature."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError


@dataclass
class Inspection:
    path: Path
    model: dict[str, Any]
    graph: dict[str, Any]
    steps: list[dict[str, Any]]
    op_counts: Counter
    size_bytes: int


def load_graph_proto(model_path: Path) -> Any:
    """The graph without its weights; a corrupt file is a one-line error."""
    import onnx

    if model_path.stat().st_size == 0:
        raise OnnxpipeError(f"{model_path}: empty file (0 bytes), not an ONNX model")
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others for a corrupt file
        raise OnnxpipeError(f"{model_path}: not a readable ONNX model ({str(e).strip() or type(e).__name__})") from None
    if proto.ir_version == 0 or not proto.graph.node:  # bytes protobuf happens to parse, but no model
        raise OnnxpipeError(f"{model_path}: not a readable ONNX model (no graph in it)")
    return proto


def check_io_matches(proto: Any, manifest: Any, model_path: Path) -> None:
    """The graph's inputs and outputs are the ones the manifest names: a damaged or swapped model.onnx is refused."""
    inits = {t.name for t in proto.graph.initializer}
    inputs = [v.name for v in proto.graph.input if v.name not in inits]
    outputs = [v.name for v in proto.graph.output]
    for what, got, want in (("inputs", inputs, manifest.input_names), ("outputs", outputs, manifest.output_names)):
        if got != want:
            missing = sorted(set(want) - set(got)) or sorted(set(got) - set(want)) or got
            raise OnnxpipeError(f"{model_path}: the graph's {what} differ from onnxpipe.json's graph.{what} "
                                f"(first difference: {missing[0]!r}); the directory is damaged")


def op_histogram(proto: Any) -> Counter:
    """Node counts by op type (``domain::Op`` for non-default domains), subgraphs included."""
    counts: Counter = Counter()

    def walk(graph: Any) -> None:
        for node in graph.node:
            name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[name] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)

    walk(proto.graph)
    return counts


def inspect_model_dir(path: str | Path) -> Inspection:
    md = ModelDir.open(path)
    proto = load_graph_proto(md.model_path)
    check_io_matches(proto, md.manifest, md.model_path)
    return Inspection(
        path=md.path,
        model=md.manifest.model,
        graph=md.manifest.graph,
        steps=md.manifest.steps,
        op_counts=op_histogram(proto),
        size_bytes=md.size_bytes(),
    )


def format_inspection(ins: Inspection) -> str:
    m, g = ins.model, ins.graph
    lines = [
        f"{ins.path}",
        f"  model    {m.get('architecture')} ({m.get('family')}): {m.get('num_layers')} layers, hidden {m.get('hidden_size')}, "
        f"{m.get('num_attention_heads')} heads / {m.get('num_kv_heads')} KV heads, head dim {m.get('head_dim')}, "
        f"vocab {m.get('vocab_size')}",
        f"  graph    {g.get('file')} opset {g.get('opset')}, {g.get('dtype')}, "
        f"{ins.size_bytes / 1e6:.1f} MB on disk{', external data' if g.get('external_data') else ''}",
        "  steps",
    ]
    for s in ins.steps:
        lines.append(f"    {s.get('stage'):<10} {_params(s.get('params', {}))}  [{_verdict(s.get('check'))}]")
    lines.append("  inputs")
    lines += [f"    {t['name']:<28} {t['dtype']:<8} {t['shape']}" for t in _abbrev(g.get("inputs", []))]
    lines.append("  outputs")
    lines += [f"    {t['name']:<28} {t['dtype']:<8} {t['shape']}" for t in _abbrev(g.get("outputs", []))]
    lines.append(f"  ops ({sum(ins.op_counts.values())} nodes)")
    lines += [f"    {op:<34} {n}" for op, n in ins.op_counts.most_common()]
    return "\n".join(lines)


def _verdict(check: Any) -> str:
    """A step's check as recorded: judged (ok / FAILED against its tolerance) or recorded only (passed is null:
    integer quantization is judged by its quality report, not by this check)."""
    if not isinstance(check, dict) or not check:
        return "not checked"
    numbers = (f"rel err {_num(check.get('rel_err')):.3g}, greedy {_num(check.get('greedy_agreement')):.1%}")
    passed = check.get("passed")
    if passed is None:
        return f"{numbers}, recorded, not judged"
    return f"{numbers}, {'ok' if passed else 'FAILED'}"


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "source")


def _abbrev(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Show the first layer's KV tensors and elide the rest."""
    shown, hidden = [], 0
    for t in tensors:
        name = t["name"]
        if (name.startswith("past_key_values.") or name.startswith("present.")) and ".0." not in name:
            hidden += 1
            continue
        shown.append(t)
    if hidden:
        shown.append({"name": f"... {hidden} more KV tensors", "dtype": "", "shape": ""})
    return shown
