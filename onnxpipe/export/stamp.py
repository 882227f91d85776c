"""The graph of a whole decoder from the trace of one layer: trace a one-layer slice of the config, then stamp its
layer L times.

The slice is the real config with ``num_hidden_layers = 1`` and a small vocabulary, holding random weights: tracing
it through FlatKVDecoder (exporter.trace_decoder, the traced export's own call) gives, per layer, exactly the nodes
the whole trace would. Its layer (the nodes the exporter scoped under ``layers.0``) is the template; stamping clones
it once per layer with that layer's initializers and KV inputs/outputs, wiring each clone's hidden state into the
next, and the graph's I/O takes the names of an L-layer export.

Which initializer holds which weight is found by value: the exporter folds a weight into a new constant (a
Linear's weight is stored transposed), so each float initializer is matched against the slice's parameters, as
they are or transposed. An initializer of a weight's size that matches none (a weight folded some other way) makes
the slice unusable here: the caller falls back to tracing the whole model.
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpipe.errors import OnnxpipeError
from onnxpipe.export import wrapper

# tested against the traced export (tests/export/test_stream.py); phi3 (its layer hands on two values) and gemma
# (a buffer in its embedding) are refused by the slice's own checks and take the traced export
STAMPED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "stablelm", "starcoder2")
LAYER_PARAM = re.compile(r"^(?P<prefix>.+\.layers)\.0\.(?P<rest>.+)$")
LAYER_SCOPE = re.compile(r"\.layers\.0$")
LAYER_ZERO = re.compile(r"\blayers\.0(?!\d)")
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
PLACEHOLDER = "__unwritten__"
SLICE_VOCAB = 263  # the slice's vocabulary (raised past any other dimension of the config); see slice_config


class StampUnsupported(OnnxpipeError):
    """The slice's graph cannot be stamped (the caller may trace the whole model instead)."""


@dataclass(frozen=True)
class Weight:
    """An initializer's source: the checkpoint tensor and whether it is stored transposed."""

    source: str
    transpose: bool

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(source_shape)) if self.transpose else tuple(source_shape)


@dataclass
class Template:
    """One traced layer and what surrounds it; the graph is kept serialized, each stamp starts from a fresh copy."""

    proto: Any  # onnx ModelProto of the slice, its weights left as placeholders
    layer_nodes: list[str]  # node names of the layer, in graph order
    hidden_in: str
    hidden_out: str
    layer_prefix: str  # "model.layers"
    layer_weights: dict[str, tuple[str, bool]]  # initializer -> (name inside the layer, transposed)
    global_weights: dict[str, Weight]  # initializer -> source (embedding, final norm, LM head)
    vocab: int  # the slice's vocabulary size


@dataclass
class Stamped:
    model: ir.Model
    slots: list[list[ir.Value]]  # per stamped layer, its weight initializers in the template's order
    globals: list[ir.Value]
    weights: dict[str, Weight] = field(default_factory=dict)  # initializer name -> source


def slice_config(config: Any) -> tuple[Any, int]:
    """The one-layer, small-vocabulary copy of ``config`` to trace, and its vocabulary size. Refuses a model type
    not stamped here and a model whose layers are of several kinds (a slice of one layer would not cover them)."""
    from onnxpipe.export.archs import layer_types

    if config.model_type not in STAMPED_MODEL_TYPES:
        raise StampUnsupported(f"the streamed export takes {', '.join(STAMPED_MODEL_TYPES)}, not {config.model_type!r}")
    types = layer_types(config) or []
    if len(set(types)) > 1:
        raise StampUnsupported(f"layers of several kinds ({', '.join(sorted(set(types)))})")
    sliced = copy.deepcopy(config)
    sliced.num_hidden_layers = 1
    if getattr(sliced, "layer_types", None) is not None:
        sliced.layer_types = list(sliced.layer_types[:1])
    if hasattr(sliced, "max_window_layers"):
        sliced.max_window_layers = min(int(sliced.max_window_layers or 0), 1)
    dims = {int(v) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                             "head_dim", "sliding_window", "max_position_embeddings")
            if isinstance(v := getattr(config, k, None), int)}
    vocab = SLICE_VOCAB
    while vocab in dims or vocab * 2 in dims:
        vocab += 1
    sliced.vocab_size = vocab
    sliced.pad_token_id = None  # an id of the real vocabulary may not fit the slice's embedding
    return sliced, vocab


def build_slice_model(sliced: Any, dtype: str, attn: str, seed: int = 0) -> Any:
    """The slice with random weights, every one distinct (equal weights would be merged by the exporter's CSE),
    made on the meta device and filled in place (no second copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(sliced, dtype=torch_dtype, attn_implementation=attn)
    model.to_empty(device="cpu")
    model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.05).to(torch_dtype))
    init_buffers(model)
    return model.eval()


def init_buffers(model: Any) -> None:
    """Compute the rotary embedding's buffers (made empty on the meta device); refuse any other buffer."""
    for name, module in model.named_modules():
        own = [b for b, _ in module.named_buffers(recurse=False)]
        if not own:
            continue
        if "RotaryEmbedding" not in type(module).__name__:
            raise StampUnsupported(f"module {name or type(module).__name__} holds buffers {', '.join(own)}")
        module.to_empty(device="cpu")
        model._init_weights(module)


def find_template(model: ir.Model, slice_model: Any, vocab: int) -> Template:
    """The layer of the traced slice and the source of every weight initializer; ``model`` becomes the template
    (its weights replaced by placeholders)."""
    g = model.graph
    matches = _match_weights(g, slice_model)
    nodes = list(g)
    layer = [n for n in nodes if _in_layer_zero(n)]
    in_layer = set(map(id, layer))
    if not layer:
        raise StampUnsupported("no nodes scoped under layers.0 in the traced slice")
    layer_weights: dict[str, tuple[str, bool]] = {}
    global_weights: dict[str, Weight] = {}
    prefixes = set()
    for name, w in matches.items():
        m = LAYER_PARAM.match(w.source)
        users = [id(n) in in_layer for n in g.initializers[name].consumers()]
        if m:
            prefixes.add(m["prefix"])
            layer_weights[name] = (m["rest"], w.transpose)
            if not all(users):
                raise StampUnsupported(f"weight {w.source} is used outside its layer")
        else:
            global_weights[name] = w
            if any(users):
                raise StampUnsupported(f"weight {w.source} (not a layer's) is used inside layer 0")
    if len(prefixes) != 1:
        raise StampUnsupported(f"layer weights under {sorted(prefixes) or 'no'} prefixes")
    hidden_in, hidden_out = _boundary(g, layer, in_layer)
    _check_vocab_constants(g, vocab)
    for name in matches:
        v = g.initializers[name]
        assert v.const_value is not None
        v.const_value = _placeholder(v.name or name, v.const_value.dtype, _dims(v.const_value.shape))
    return Template(ir.serde.serialize_model(model), [n.name or "" for n in layer], hidden_in, hidden_out,
                    prefixes.pop(), layer_weights, global_weights, vocab)


def stamp(template: Template, layer_ids: list[int], source_shapes: dict[str, tuple[int, ...]], vocab: int) -> Stamped:
    """The graph of ``len(layer_ids)`` layers: slot j holds layer ``layer_ids[j]``'s weights and reads/writes
    ``past_key_values.j`` / ``present.j``. Every initializer is a placeholder until its weight is written."""
    model = ir.serde.deserialize_model(template.proto)
    g = model.graph
    by_name = {n.name: n for n in g}
    layer = [by_name[name] for name in template.layer_nodes]
    in_layer = set(map(id, layer))
    values = _values(g)
    hidden_in, hidden_out = values[template.hidden_in], values[template.hidden_out]
    past0 = [values[wrapper.PAST_KEY.format(i=0)], values[wrapper.PAST_VALUE.format(i=0)]]
    present0 = [values[wrapper.PRESENT_KEY.format(i=0)], values[wrapper.PRESENT_VALUE.format(i=0)]]
    tail_uses = [(u.node, u.idx) for u in hidden_out.uses() if id(u.node) not in in_layer]
    names = sorted(template.layer_weights)
    layer_inits = [g.initializers.pop(n) for n in names]
    global_inits = {n: g.initializers.pop(n) for n in sorted(template.global_weights)}
    out = Stamped(model, [], [])

    prev_out, anchor = hidden_out, layer[-1]
    for j, layer_id in enumerate(layer_ids):
        weights: list[ir.Value] = []
        for name in names:
            rest, transpose = template.layer_weights[name]
            w = Weight(f"{template.layer_prefix}.{layer_id}.{rest}", transpose)
            weights.append(_weight_value(g, w, source_shapes, layer_inits[len(weights)].dtype))
            out.weights[weights[-1].name or ""] = w
        out.slots.append(weights)
        if j == 0:
            for old, new in zip(layer_inits, weights):
                old.replace_all_uses_with(new)
            continue
        mapping: dict[int, ir.Value] = {id(hidden_in): prev_out}
        for old, new in zip(out.slots[0], weights):
            mapping[id(old)] = new
        for v, name in zip(past0, (wrapper.PAST_KEY, wrapper.PAST_VALUE)):
            new_in = ir.Value(name=name.format(i=j), shape=v.shape, type=v.type)
            g.inputs.append(new_in)
            mapping[id(v)] = new_in
        clones = [_clone(n, mapping, j) for n in layer]
        for v, name in zip(present0, (wrapper.PRESENT_KEY, wrapper.PRESENT_VALUE)):
            mapping[id(v)].name = name.format(i=j)
            g.outputs.append(mapping[id(v)])
        g.insert_after(anchor, clones)
        anchor, prev_out = clones[-1], mapping[id(hidden_out)]
    for node, idx in tail_uses:
        node.replace_input_with(idx, prev_out)

    for name, old in global_inits.items():
        w = template.global_weights[name]
        new = _weight_value(g, w, source_shapes, old.dtype)
        old.replace_all_uses_with(new)
        out.globals.append(new)
        out.weights[new.name or ""] = w
    _set_io_order(g, len(layer_ids))
    _widen_vocab(g, template.vocab, vocab)
    return out


# -- matching the initializers to the parameters ---------------------------------------------------------------------

def _match_weights(g: ir.Graph, slice_model: Any) -> dict[str, Weight]:
    params = {name: p.detach().cpu().numpy() for name, p in slice_model.named_parameters()}
    index: dict[tuple, list[tuple[str, bool]]] = {}
    for name, arr in params.items():
        index.setdefault(_fingerprint(arr), []).append((name, False))
        if arr.ndim == 2:
            index.setdefault(_fingerprint(arr.T), []).append((name, True))
    sizes = {arr.size for arr in params.values()}
    found: dict[str, Weight] = {}
    for name, v in g.initializers.items():
        t = v.const_value
        if t is None or t.dtype not in FLOAT_TYPES:
            continue
        arr = t.numpy()
        hits = [(p, tr) for p, tr in index.get(_fingerprint(arr), [])
                if np.array_equal(arr, params[p].T if tr else params[p])]
        if len(hits) == 1:
            found[name] = Weight(*hits[0])
        elif hits:
            raise StampUnsupported(f"initializer {name} equals several weights ({', '.join(p for p, _ in hits)})")
        elif arr.size in sizes and arr.size > 1:
            raise StampUnsupported(f"initializer {name} {list(arr.shape)} is derived from a weight in a way the "
                                   "streamed export does not reproduce")
    missing = sorted(set(params) - {w.source for w in found.values()})
    if missing:
        raise StampUnsupported(f"weights not found as initializers of the traced slice: {', '.join(missing[:3])}")
    return found


def _fingerprint(arr: np.ndarray) -> tuple:
    return (arr.shape, arr.dtype.str, np.asarray(arr.flat[:64]).tobytes())


# -- the layer's nodes and its boundary ------------------------------------------------------------------------------

def _in_layer_zero(node: ir.Node) -> bool:
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return False
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return False
    return isinstance(scopes, list) and any(isinstance(s, str) and LAYER_SCOPE.search(s) for s in scopes)


def _boundary(g: ir.Graph, layer: list[ir.Node], in_layer: set[int]) -> tuple[str, str]:
    """(hidden state in, hidden state out) of the layer: the one value it hands on (besides its present KV) and
    the one value it takes of the same type and shape."""
    present = {wrapper.PRESENT_KEY.format(i=0), wrapper.PRESENT_VALUE.format(i=0)}
    graph_outputs = {id(v) for v in g.outputs}
    handed_on = []
    for node in layer:
        for v in node.outputs:
            if v.name in present:
                continue
            if id(v) in graph_outputs or any(id(u.node) not in in_layer for u in v.uses()):
                handed_on.append(v)
    produced = {v.name for v in g.outputs if v.producer() is not None and id(v.producer()) in in_layer}
    if not present <= produced:
        raise StampUnsupported("layer 0's present key/value are not produced inside it")
    if len(handed_on) != 1:
        raise StampUnsupported(f"layer 0 hands on {len(handed_on)} values (expected its hidden state alone)")
    out = handed_on[0]
    taken: list[ir.Value] = []
    for node in layer:
        for v_in in node.inputs:
            if v_in is None or v_in.is_initializer() or v_in.is_graph_input() or v_in in taken:
                continue
            v = v_in
            p = v.producer()
            if p is not None and id(p) not in in_layer and v.type == out.type and v.shape == out.shape:
                taken.append(v)
    if len(taken) != 1:
        raise StampUnsupported(f"layer 0 takes {len(taken)} values shaped like its output (expected the hidden state)")
    return taken[0].name or "", out.name or ""


def _check_vocab_constants(g: ir.Graph, vocab: int) -> None:
    """The slice's vocabulary size must appear in no integer constant (only in shapes, which are widened)."""
    consts = [v.const_value for v in g.initializers.values() if v.const_value is not None]
    consts += [a.value for n in g for a in n.attributes.values() if isinstance(a.value, ir.TensorProtocol)]
    for t in consts:
        if t.dtype in (ir.DataType.INT64, ir.DataType.INT32) and t.size <= 64 and vocab in t.numpy().reshape(-1):
            raise StampUnsupported(f"the vocabulary size is a constant of the traced graph ({t.name})")


# -- building the stamped graph --------------------------------------------------------------------------------------

def _values(g: ir.Graph) -> dict[str, ir.Value]:
    out = {v.name: v for v in g.inputs}
    out.update(g.initializers)
    for n in g:
        out.update({v.name: v for v in n.outputs})
    return {k: v for k, v in out.items() if k}


def _dims(shape: Any) -> tuple[int, ...]:
    """A static shape's sizes (a weight's shape is static)."""
    return tuple(d if isinstance(d, int) else int(d.value) for d in shape)


def _placeholder(name: str, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.ExternalTensor:
    return ir.ExternalTensor(PLACEHOLDER, 0, 0, dtype, shape=ir.Shape(shape), name=name)


def _weight_value(g: ir.Graph, w: Weight, source_shapes: dict[str, tuple[int, ...]], dtype: Any) -> ir.Value:
    """A new initializer for ``w``, named after its source (``model.`` as the traced export's wrapper prefixes it;
    ``_T``: stored transposed)."""
    if w.source not in source_shapes:
        raise OnnxpipeError(f"the checkpoint has no tensor {w.source!r} (the traced graph needs it)")
    shape = w.shape(source_shapes[w.source])
    name = f"model.{w.source}{'_T' if w.transpose else ''}"
    v = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=_placeholder(name, dtype, shape))
    g.register_initializer(v)
    return v


def _clone(node: ir.Node, mapping: dict[int, ir.Value], j: int) -> ir.Node:
    attrs = []
    for a in node.attributes.values():
        if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            raise StampUnsupported(f"node {node.name} ({node.op_type}) holds a subgraph")
        attrs.append(ir.Attr(a.name, a.type, a.value))
    meta = {k: LAYER_ZERO.sub(f"layers.{j}", v) for k, v in node.metadata_props.items()}
    clone = ir.Node(node.domain, node.op_type, [mapping.get(id(v), v) if v is not None else None for v in node.inputs],
                    attrs, overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                    name=f"layers.{j}/{node.name}", metadata_props=meta)
    for old, new in zip(node.outputs, clone.outputs):
        new.name, new.type, new.shape = f"layers.{j}/{old.name}", old.type, old.shape
        mapping[id(old)] = new
    return clone


def _set_io_order(g: ir.Graph, n: int) -> None:
    ins = {v.name or "": v for v in g.inputs}
    outs = {v.name or "": v for v in g.outputs}
    want_in, want_out = wrapper.input_names(n), wrapper.output_names(n)
    if set(ins) != set(want_in) or set(outs) != set(want_out):
        raise StampUnsupported(f"the stamped graph's I/O {sorted(ins)} / {sorted(outs)} are not the export's")
    g.inputs.clear()
    g.inputs.extend(ins[k] for k in want_in)
    g.outputs.clear()
    g.outputs.extend(outs[k] for k in want_out)


def _widen_vocab(g: ir.Graph, traced: int, real: int) -> None:
    """Shapes of the slice that carry its vocabulary size (the logits) take the real one."""
    values = [*g.inputs, *g.outputs, *(v for n in g for v in n.outputs)]
    for v in values:
        if v.shape is not None and any(d == traced for d in v.shape):
            v.shape = ir.Shape([real if d == traced else d for d in v.shape])
