"""Running a decoder graph one layer's segment at a time, for checks whose whole-model ONNX Runtime session would
not fit in memory (the CPU EP copies the weights it is handed and widens fp16 ones to fp32: ~3x the weights at once).
optimize's per-pass check and quantize's checks (its decode-path check and quality report) take this form on large
models (``--check-form auto|whole|layerwise``).

Each side of a check (a pass's input and its result, the input and the final result, the float model and the
quantized one) runs as a sequence of segments, one per layer, each in its own session holding only that layer's
weights, made, run over every step and released before the next. The graph's nodes are labelled with the layer they
belong to: ``past_key_values.<i>.*`` and initializers whose names carry ``layers.<i>.`` are layer i,
input_ids/attention_mask/position_ids are -1, and a node takes the highest label of its inputs (so a producer's
label never exceeds its consumer's, and the segments run in label order); a node of constants alone takes its first
consumer's label. A segment reads the graph's inputs and the values earlier segments made, and keeps for later
segments what they read (activations of the steps' tokens).

The segments run over every step one segment at a time, so a step's tokens must be known before it runs: the
check's decode tokens are drawn in advance (seeded, the same for both sides), a teacher-forced trace's are given,
and independent prefills (a quality report's windows) each start from an empty cache. A greedy trace, whose tokens
come from its own logits, runs step by step instead (``segmented_step_fn``: every segment's session made again at
each step). Both sides' logits are compared as the whole-model check compares them (parity.compare, the same
tolerance), and so the check catches what the whole-model check catches; each layer's KV cache (``present.<i>.*``,
the same names on both sides) is compared too, to name where a fault is: the first layer whose cache differs, or,
when every cache agrees, the part after the last layer's K/V projections (that layer's attention output and MLP,
the final norm, the head).

ORT's own graph optimizations on the candidate side run within a segment: a fusion ORT would make across a layer
boundary is not made here (the whole-model form covers that on models small enough for it).

``lazy_weights`` is the other half of the memory bound: the weights of an external-data input are read from its file
when a session or the output writer asks for them (each read released after use) instead of memory-mapped and kept.
``file_graph`` gives a model on disk in the same form: its external weights stay in their file, for onnxruntime to
map one segment's at a time.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
import onnx_ir as ir

from onnxpipe.artifact import Manifest
from onnxpipe.confine import check_inside
from onnxpipe.errors import OnnxpipeError
from onnxpipe.parity import ParityReport, Trace, compare, left_padded_batch, position_ids_for

# models whose weights reach this many bytes are checked layer by layer under --check-form auto
LAYERWISE_BYTES = 1_000_000_000
CHECK_FORMS = ("auto", "whole", "layerwise")
LAYER_NAME = re.compile(r"(?:^|[./_])layers?[._](\d+)(?:[._/]|$)")
SHAPE_OPS = ("Shape", "Size")
LAZY_MIN_BYTES = 4096  # smaller external tensors are read once and kept (shape constants the rules read)
PLACEHOLDER = "onnxpipe-segment-placeholder"  # the external-data location of a weight handed from memory
INLINE_HANDED = (1, 10, 2, 3)  # onnx.TensorProto FLOAT, FLOAT16, UINT8, INT8: a graph file's weights file_graph holds
HEAD_MIN_BYTES = 16 << 10  # the LM head's weight is at least this large (plan_segments gives it a segment of its own)

FILE_SPAN = "onnxpipe.file_span"  # a lazy weight's meta: (its directory, location in it, offset, length)
# session(graph bytes, {initializer name: tensor}, optimized, directory of the graph's external data or None)
SessionFn = Callable[[bytes, dict[str, Any], bool, "str | None"], Any]
Graph = tuple[bytes, dict[str, Any]]  # a serialized graph (large initializers as placeholders) and those tensors


def check_form(form: str, weight_bytes: int) -> str:
    """The form a check takes: ``auto`` is layer by layer from LAYERWISE_BYTES of weights, whole below."""
    if form not in CHECK_FORMS:
        raise OnnxpipeError(f"unknown check form {form!r}; choose one of {', '.join(CHECK_FORMS)}")
    if form == "auto":
        return "layerwise" if weight_bytes >= LAYERWISE_BYTES else "whole"
    return form


@dataclass(frozen=True)
class Segment:
    label: int
    nodes: tuple[int, ...]  # indices into the graph's nodes, in graph order
    inputs: tuple[str, ...]  # graph inputs and values made by earlier segments
    initializers: tuple[str, ...]
    outputs: tuple[str, ...]  # graph outputs made here and values later segments read
    # past caches read here only by Shape/Size nodes, ahead of the segment that makes their present (an exporter's
    # batch size or past length taken from some layer's cache): fed a stand-in of the same shape
    shape_only: tuple[str, ...] = ()


def plan_segments(graph: Any, caches: dict[str, tuple[int, str]]) -> list[Segment]:
    """The segments of ``graph`` (an onnx.GraphProto), in the order they run. ``caches``: each past cache input's
    name -> (its layer, the name of the present output it becomes). Initializers named by layer give their layer
    too, unless that puts a layer's cache after its next step's use (a weight shared across layers under one
    layer's name): then the caches alone label the nodes."""
    try:
        return _plan(graph, caches, by_name=True)
    except _OutOfOrder:
        return _plan(graph, caches, by_name=False)


class _OutOfOrder(OnnxpipeError):
    pass


def _plan(graph: Any, caches: dict[str, tuple[int, str]], by_name: bool) -> list[Segment]:
    inits = {t.name for t in graph.initializer}
    labels: dict[str, int | None] = {}
    for v in graph.input:
        labels[v.name] = caches[v.name][0] if v.name in caches else -1
    for name in inits:
        labels[name] = _name_layer(name) if by_name else None
    node_labels: list[int | None] = []
    node_inputs: list[set[str]] = []
    head, head_label = _head_node(graph, caches), 1 + max((layer for layer, _ in caches.values()), default=-1)
    for i, node in enumerate(graph.node):
        ins = {x for x in node.input if x} | _subgraph_refs(node, labels)
        known = [labels[x] for x in ins if labels.get(x) is not None]
        label = max(known) if known else None  # type: ignore[type-var]
        if _shape_of_cache(node, caches):
            label = -1  # a cache's shape is known before its values are
        if i == head:
            label = head_label  # the LM head: a segment of its own, after the last layer
        node_labels.append(label)
        node_inputs.append(ins)
        for out in node.output:
            labels[out] = label
    consumers: dict[str, list[int]] = {}
    for i, ins in enumerate(node_inputs):
        for x in ins:
            consumers.setdefault(x, []).append(i)
    for i in reversed(range(len(graph.node))):  # constants alone: their first consumer's segment
        if node_labels[i] is None:
            used = [node_labels[c] for out in graph.node[i].output for c in consumers.get(out, ())]
            node_labels[i] = min((u for u in used if u is not None), default=-1)
    resolved = [int(x) for x in node_labels]  # type: ignore[arg-type]
    order = sorted(set(resolved))
    made_in = {out: resolved[i] for i, node in enumerate(graph.node) for out in node.output if out}
    graph_outputs = {v.name for v in graph.output}
    last_reader: dict[str, int] = {}
    for i, ins in enumerate(node_inputs):
        for x in ins:
            last_reader[x] = max(last_reader.get(x, -2), resolved[i])
    segments = []
    for label in order:
        idx = tuple(i for i, lab in enumerate(resolved) if lab == label)
        made = {out for i in idx for out in graph.node[i].output if out}
        read = set().union(*(node_inputs[i] for i in idx))
        seg_inputs = tuple(sorted(x for x in read - made if x not in inits and x in labels))
        seg_outputs = tuple(sorted(x for x in made if x in graph_outputs or last_reader.get(x, -2) > label))
        full_reads = set().union(*(node_inputs[i] for i in idx if not _shape_of_cache(graph.node[i], caches)))
        shape_only = tuple(x for x in seg_inputs if x in caches and x not in full_reads)
        segments.append(Segment(label, idx, seg_inputs, tuple(sorted(read & inits)), seg_outputs, shape_only))
    _check_kv_order(segments, made_in, caches)
    return segments


def _head_node(graph: Any, caches: dict[str, tuple[int, str]]) -> int | None:
    """The index of the LM head's node: the first node met walking back from the logits (the graph output that is
    not a cache) that reads an initializer of at least HEAD_MIN_BYTES. None when there is no such node. It runs as a
    segment of its own: the largest weight of a model whose vocabulary is large, which the CPU EP widens to fp32,
    held without the last layer's weights beside it."""
    import onnx

    presents = {present for _, present in caches.values()}
    outputs = [v.name for v in graph.output if v.name not in presents]
    if len(outputs) != 1:
        return None
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in graph.initializer if t.data_type != onnx.TensorProto.STRING}
    made_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    queue, seen = [outputs[0]], set()
    while queue:
        i = made_by.get(queue.pop(0))
        if i is None or i in seen:
            continue
        seen.add(i)
        node = graph.node[i]
        if any(sizes.get(x, 0) >= HEAD_MIN_BYTES for x in node.input):
            return i
        queue.extend(x for x in node.input if x)
    return None


def _shape_of_cache(node: Any, caches: dict[str, tuple[int, str]]) -> bool:
    """A Shape or Size node of a past cache: what it reads is known before the cache's values are."""
    return node.op_type in SHAPE_OPS and node.domain in ("", "ai.onnx") and bool(node.input) and \
        set(node.input) <= set(caches)


def kv_caches(manifest: Manifest) -> dict[str, tuple[int, str]]:
    """The manifest's past cache input names -> (layer, present output name)."""
    caches = {}
    for i in range(manifest.num_layers):
        for past, present in zip(manifest.past_names(i), manifest.present_names(i)):
            caches[past] = (i, present)
    return caches


def _name_layer(name: str) -> int | None:
    m = LAYER_NAME.search(name)
    return int(m.group(1)) if m else None


def _subgraph_refs(node: Any, outer: dict[str, Any]) -> set[str]:
    """Outer-scope values a node's subgraphs (If/Loop/Scan bodies) read."""
    refs: set[str] = set()
    for attr in node.attribute:
        graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                refs |= {x for x in inner.input if x in outer} | _subgraph_refs(inner, outer)
    return refs


def _check_kv_order(segments: list[Segment], made_in: dict[str, int], caches: dict[str, tuple[int, str]]) -> None:
    """A segment that reads a layer's past cache must make its present cache (or follow the one that does): the
    segments run one at a time over every step, so step t's past is step t-1's present."""
    for seg in segments:
        for x in seg.inputs:
            if x not in caches or x in seg.shape_only:
                continue
            present = caches[x][1]
            if made_in.get(present, seg.label) > seg.label:
                raise _OutOfOrder(f"layer-by-layer check: {x} is read in segment {seg.label} but {present} is made "
                                    f"in segment {made_in[present]}; use --check-form whole")


def segment_graph(model: Any, seg: Segment, feed: dict[str, np.ndarray], tensors: dict[str, Any]
                  ) -> tuple[bytes, dict[str, Any], str | None]:
    """The segment as a model of its own (an onnx.ModelProto serialized), its inputs typed by ``feed``; the
    tensors to hand the session; the directory its external data lies in. A weight still in the input's data file
    (``lazy_weights``) is left there for onnxruntime to map (nothing copied, released with the session); the others
    (those a pass made) are handed over from memory."""
    import onnx
    from onnx import helper

    g = model.graph
    sub = onnx.GraphProto(name=f"{g.name or 'graph'}_segment_{seg.label}")
    sub.node.extend(g.node[i] for i in seg.nodes)
    by_name = {t.name: t for t in g.initializer}
    handed, data_dir = {}, None
    for name in seg.initializers:
        init = sub.initializer.add()
        init.CopyFrom(by_name[name])
        if name not in tensors:
            continue
        span = tensors[name].meta.get(FILE_SPAN) if hasattr(tensors[name], "meta") else None
        if span is None or data_dir not in (None, span[0]):
            handed[name] = tensors[name]
            continue
        data_dir = span[0]
        del init.external_data[:]
        for key, value in (("location", span[1]), ("offset", str(span[2])), ("length", str(span[3]))):
            init.external_data.add(key=key, value=value)
    for name in seg.inputs:
        sub.input.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(feed[name].dtype), [None] * feed[name].ndim))
    typed = {v.name: v for v in list(g.value_info) + list(g.output)}
    for name in seg.outputs:
        out = sub.output.add()
        if name in typed:
            out.CopyFrom(typed[name])
        else:  # onnxruntime types it from the node that makes it
            out.name = name
    m = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.CopyFrom(sub)
    return m.SerializeToString(), handed, data_dir


@dataclass
class SideRun:
    logits: list[np.ndarray]  # per step (empty where ``consume`` took them)
    presents: list[dict[str, np.ndarray]]  # per step: present name -> array (those kept)


def run_segmented(graph: Graph, manifest: Manifest, steps: list[dict[str, np.ndarray]], kv_dtype: np.dtype,
                  session: SessionFn, optimized: bool, log: Callable[[str], None] = lambda m: None, *,
                  keep: Collection[str] | None = None,
                  consume: Callable[[int, np.ndarray], None] | None = None,
                  taken: Collection[str] = (), take: Callable[[int, str, np.ndarray], None] | None = None,
                  done: Callable[[Segment], None] | None = None) -> SideRun:
    """Run ``graph`` over ``steps`` (each step's input_ids, attention_mask, position_ids) one segment at a time.

    A step's past caches are the step before's presents (the first step's: empty), unless the step gives them
    itself (a prefill from an empty cache: quality.prefill_feed). ``keep``: the graph outputs kept for every step
    (default: all of them). ``consume(t, logits)``: takes step t's logits as soon as they are made, and they are not
    kept (a quality report's windows: one batch's logits in memory at a time). ``take(t, name, value)``: the same
    for the graph outputs named in ``taken`` (GPTQ's layer inputs, summed as they come). ``done(segment)``: called
    once a segment has run every step and its session is released (its ``taken`` outputs are all in)."""
    import onnx

    model = onnx.ModelProto()
    model.ParseFromString(graph[0])
    caches = kv_caches(manifest)
    segments = plan_segments(model.graph, caches)
    past_of = {past: present for past, (_, present) in caches.items()}
    m = manifest.model
    logits_name = manifest.graph["logits"]
    values: list[dict[str, np.ndarray]] = [dict(s) for s in steps]
    kept = {v.name for v in model.graph.output} if keep is None else set(keep)
    log(f"    check: {'candidate' if optimized else 'reference'} in {len(segments)} segments")

    def cache(t: int, past_len: int) -> np.ndarray:  # a cache of step t's batch
        return np.zeros((steps[t]["input_ids"].shape[0], m["num_kv_heads"], past_len, m["head_dim"]), kv_dtype)

    for seg in segments:
        sess = None
        later = {x for s in segments if s.label > seg.label for x in s.inputs}
        for t in range(len(steps)):
            feed = {}
            for name in seg.inputs:
                if name in steps[t]:  # a graph input, or a past cache the step gives itself
                    feed[name] = steps[t][name]
                elif name in seg.shape_only:  # only its shape is read: the shape every cache has at step t
                    feed[name] = cache(t, steps[t]["attention_mask"].shape[1] - steps[t]["input_ids"].shape[1])
                elif name in past_of:
                    feed[name] = values[t - 1][past_of[name]] if t else cache(t, 0)
                else:
                    feed[name] = values[t][name]
            if sess is None:
                sub, handed, data_dir = segment_graph(model, seg, feed, graph[1])
                sess = session(sub, handed, optimized, data_dir)
            outs = sess.run(list(seg.outputs), feed)
            values[t].update(zip(seg.outputs, outs))
            if consume is not None and logits_name in seg.outputs:
                consume(t, values[t].pop(logits_name))
            if take is not None:  # handed over, and not kept unless a later segment reads it
                for name in [n for n in seg.outputs if n in taken]:
                    take(t, name, values[t][name] if name in later else values[t].pop(name))
        del sess
        release_freed_memory()
        chained = {past_of[x] for x in later if x in past_of}  # the next step reads these presents
        for t in range(len(steps)):  # what no later segment (or step) reads goes; the kept outputs stay
            for name in [n for n in values[t] if n not in later and n not in kept and n not in steps[t]
                         and not (n in chained and t + 1 < len(steps))]:
                del values[t][name]
        if done is not None:
            done(seg)
    presents = [{q: v[q] for q in past_of.values() if q in v} for v in values]
    return SideRun([v[logits_name].astype(np.float32) for v in values if logits_name in v], presents)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``) once a segment's session is gone:
    what onnxruntime frees stays in glibc's heap otherwise, and the next segments start above it (measured after one
    pass over a 0.6B model's 26 segments: 0.82 GB resident, 0.12 GB after the trim). Where the C library is not
    glibc, nothing is done."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def segmented_step_fn(graph: Graph, manifest: Manifest, session: SessionFn, kv_dtype: np.dtype,
                      optimized: bool = True) -> Callable[..., Any]:
    """A parity.StepFn running one step at a time through every segment (each segment's session made again at each
    step): for a greedy trace, whose next token needs the step before's logits."""
    with_positions = "position_ids" in manifest.input_names

    def step(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Any) -> Any:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_positions:
            feed["position_ids"] = position_ids
        for i, (k, v) in enumerate(past):
            pk, pv = manifest.past_names(i)
            feed[pk], feed[pv] = k, v
        run = run_segmented(graph, manifest, [feed], kv_dtype, session, optimized)
        presents = [tuple(run.presents[0][n] for n in manifest.present_names(i)) for i in range(manifest.num_layers)]
        return run.logits[0], presents

    return step


def forced_trace(graph: Graph, manifest: Manifest, session: SessionFn, prompts: np.ndarray, forced: np.ndarray,
                 kv_dtype: np.dtype, optimized: bool = True) -> Trace:
    """parity.run_trace's trace of ``prompts`` (unpadded) with the decode tokens ``forced`` [B, steps] given: every
    step is known in advance, so each segment's session is made once for all of them."""
    mask = np.ones_like(prompts, dtype=np.int64)
    steps, _ = _steps(manifest, prompts.astype(np.int64), mask, forced)
    run = run_segmented(graph, manifest, steps, kv_dtype, session, optimized, keep=[manifest.graph["logits"]])
    valid = [mask.astype(bool)] + [np.ones((len(prompts), 1), bool)] * forced.shape[1]
    return Trace(run.logits, valid, forced.astype(np.int64))


@dataclass
class LayerwiseReport(ParityReport):
    form: str = "layerwise"
    kv_rel_err: list[float | None] = field(default_factory=list)  # per layer, the largest over steps, k and v
    divergence: str | None = None  # where the first difference is, when one is past the tolerance

    def judge(self, tolerance: float) -> "LayerwiseReport":
        super().judge(tolerance)
        self.divergence = _divergence(self.kv_rel_err, tolerance) if not self.passed else None
        return self

    def summary(self) -> str:
        return super().summary() + (f"; {self.divergence}" if self.divergence else "")


def _divergence(kv_rel_err: list[float | None], tolerance: float) -> str:
    for i, err in enumerate(kv_rel_err):
        if err is not None and not err <= tolerance:
            if i == 0:
                return f"first difference in layer 0's KV cache (rel err {err:.3g}): the embedding or layer 0"
            return (f"first difference in layer {i}'s KV cache (rel err {err:.3g}; layers 0-{i - 1} agree): "
                    f"layer {i - 1}'s attention output or MLP, or layer {i}'s norm or K/V projections")
    if not kv_rel_err or any(e is None for e in kv_rel_err):
        return "the KV caches could not be compared (padded on different sides)"
    last = len(kv_rel_err) - 1
    return (f"every layer's KV cache agrees: the difference is after layer {last}'s K/V projections "
            f"(layer {last}'s attention output or MLP, the final norm or the head)")


def check_layerwise(reference: Graph, candidate: Graph, manifest: Manifest, session: SessionFn, *,
                    kv_dtype: np.dtype, decode_steps: int = 4, prompt_lengths: Sequence[int] = (7, 4),
                    seed: int = 0, padding_side: str = "left", reference_padding_side: str = "left",
                    log: Callable[[str], None] = lambda m: None, ref_kv_dtype: np.dtype | None = None
                    ) -> LayerwiseReport:
    """``reference`` and ``candidate`` on the same prompts and tokens, each run segment by segment; their logits
    compared as parity.check_decoders compares them, and each layer's KV cache. ``ref_kv_dtype``: the reference's
    cache dtype where it differs from the candidate's (an fp32 model against its fp16 conversion)."""
    vocab = manifest.model["vocab_size"]
    tokens = np.random.default_rng(seed + 1).integers(0, vocab, size=(len(prompt_lengths), decode_steps))
    runs, masks = [], []
    for graph, side, optimized, dtype in ((reference, reference_padding_side, False, ref_kv_dtype or kv_dtype),
                                          (candidate, padding_side, True, kv_dtype)):
        ids, mask = left_padded_batch(vocab, prompt_lengths, seed, side=side)
        steps, step_masks = _steps(manifest, ids, mask, tokens)
        runs.append(run_segmented(graph, manifest, steps, dtype, session, optimized, log))
        masks.append(step_masks)
    decoded = [np.ones((len(prompt_lengths), 1), bool)] * decode_steps
    traces = [Trace(r.logits, [m[0].astype(bool)] + decoded, tokens) for r, m in zip(runs, masks)]
    base = compare(traces[0], traces[1], prompt_lengths)
    kv = [_kv_rel_err(runs, masks, manifest, i) if reference_padding_side == padding_side else None
          for i in range(manifest.num_layers)]
    return LayerwiseReport(**asdict(base), kv_rel_err=kv)


def _steps(manifest: Manifest, ids: np.ndarray, mask: np.ndarray, tokens: np.ndarray
           ) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Each step's graph inputs (past caches aside) and attention mask: the prompts, then one token a step."""
    with_positions = "position_ids" in manifest.input_names
    steps, masks = [], []
    for t in range(tokens.shape[1] + 1):
        if t:
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        step_ids = ids if t == 0 else tokens[:, t - 1:t].astype(np.int64)
        feed = {"input_ids": step_ids, "attention_mask": mask}
        if with_positions:
            feed["position_ids"] = position_ids_for(mask, step_ids.shape[1])
        steps.append(feed)
        masks.append(mask)
    return steps, masks


def _kv_rel_err(runs: list[SideRun], masks: list[list[np.ndarray]], manifest: Manifest, layer: int) -> float | None:
    """The largest difference of layer ``layer``'s K and V over every step, at the real (unpadded) positions, over
    the reference's largest magnitude there."""
    worst = 0.0
    for t, mask in enumerate(masks[0]):
        for name in manifest.present_names(layer):
            ref, cand = runs[0].presents[t].get(name), runs[1].presents[t].get(name)
            if ref is None or cand is None or ref.shape != cand.shape or ref.shape[2] != mask.shape[1]:
                return None
            real = mask.astype(bool)[:, None, :, None]
            r = np.where(real, ref.astype(np.float64), 0.0)
            diff = np.abs(r - np.where(real, cand.astype(np.float64), 0.0))
            diff = np.where(np.isnan(diff), np.inf, diff)
            worst = max(worst, float(diff.max()) / max(float(np.abs(r).max()), 1e-12))
    return worst


def lazy_weights(model: ir.Model, base_dir: str | Path) -> int:
    """Give each large initializer kept in the input's external data a tensor that reads its bytes from the file
    when asked and keeps nothing (a memory-mapped one stays resident once read: by the output write, every weight).
    Returns the bytes made lazy."""
    total = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if not isinstance(t, ir.ExternalTensor) or t.nbytes < LAZY_MIN_BYTES:
            continue
        path = Path(t.path)
        check_inside(path, Path(base_dir), "external data")
        lazy = ir.LazyTensor(partial(_read_tensor, str(path), t.offset or 0, t.nbytes, t.dtype,
                                     tuple(t.shape.numpy()), t.name), dtype=t.dtype, shape=t.shape, name=t.name)
        lazy.meta[FILE_SPAN] = (str(t.base_dir), str(t.location), t.offset or 0, t.nbytes)
        v.const_value = lazy
        total += t.nbytes
    return total


def _read_tensor(path: str, offset: int, length: int, dtype: ir.DataType, shape: tuple[int, ...],
                 name: str | None) -> ir.Tensor:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(length)
        view, done = memoryview(buf), 0
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OnnxpipeError(f"{path}: external data of {name} ends {length - done} bytes early")
            done += n
    finally:
        os.close(fd)
    return ir.Tensor(np.frombuffer(buf, dtype=dtype.numpy()).reshape(shape), dtype=dtype, name=name)


class InFile:
    """A weight left in a model's external data file: ``file_graph``'s stand-in for its tensor (only its meta's
    FILE_SPAN is read, by segment_graph)."""

    def __init__(self, span: tuple[str, str, int, int]) -> None:
        self.meta = {FILE_SPAN: span}


def file_graph(model_path: str | Path) -> Graph:
    """A model file as run_segmented takes it: its graph without its weights, and the weights: for each one in an
    external data file, where it lies (a segment's session maps its own from the file); for each one stored in the
    graph file itself, its array, read once and held (a single-file model's weights, W, are held once, handed to
    one segment's session at a time, instead of being parsed again with the graph at every step). The data files
    must lie inside the model's directory."""
    import onnx
    from onnx import numpy_helper

    path = Path(model_path)
    proto = onnx.load(str(path), load_external_data=False)
    tensors: dict[str, Any] = {}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {kv.key: kv.value for kv in t.external_data}
            check_inside(path.parent / info["location"], path.parent, "external data")
            tensors[t.name] = InFile((str(path.parent), info["location"], int(info.get("offset", 0)),
                                      int(info.get("length", 0))))
        elif t.data_type in INLINE_HANDED and len(t.raw_data) >= LAZY_MIN_BYTES:
            tensors[t.name] = numpy_helper.to_array(t)
            t.ClearField("raw_data")  # a placeholder: the session is handed the array under its name
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value=PLACEHOLDER)
    return proto.SerializeToString(), tensors


def segment_session(providers: Sequence[str] = ("cpu",), prepack: bool | None = None) -> SessionFn:
    """A SessionFn over runtime.sessions.open_session: a candidate (``optimized``) with every graph optimization
    on, as a user runs the model; a reference with them off and its fp16 weights cast one at a time
    (``one_cast_at_a_time``). ``prepack`` (weight prepacking): None decides per segment (``needs_prepacking``): on
    where the segment holds integer weights (MatMulNBits' int8 compute path runs only on prepacked weights: its
    results differ without it), off where its weights are all float (prepacking would copy every MatMul weight,
    after the CPU EP widened fp16 ones to fp32, for the same products)."""
    from onnxpipe.runtime.sessions import open_session

    def make(graph: bytes, tensors: dict[str, Any], optimized: bool, data_dir: str | None) -> Any:
        values = {n: _numpy(t) for n, t in tensors.items()}
        packed = needs_prepacking(graph) if prepack is None else prepack
        return open_session(graph, providers, optimization="all" if optimized else "off",
                            purpose=f"a {'candidate' if optimized else 'reference'} segment of a check",
                            config=None if packed else {"session.disable_prepacking": "1"},
                            external_initializers=values, external_data_dir=data_dir,
                            session_options=no_arena() if optimized else one_cast_at_a_time())

    return make


INTEGER_WEIGHTS = (2, 3, 21, 22)  # onnx.TensorProto UINT8, INT8, UINT4, INT4


def needs_prepacking(graph: bytes) -> bool:
    """Whether a serialized (segment) graph holds a weight of 8 bits or fewer (a quantized layer's)."""
    import onnx

    model = onnx.ModelProto()
    model.ParseFromString(graph)
    return any(t.data_type in INTEGER_WEIGHTS and int(np.prod(t.dims, dtype=np.int64)) >= 16
               for t in model.graph.initializer)


def no_arena() -> Any:
    """A segment's options: no CPU memory arena. With one, a pass over a 24-layer 0.6B model's segments (the
    quality report's prefill) grew ~14 MB a layer, 0.14 -> 0.48 GB resident by the head, given back only when the
    pass ended; without, and with release_freed_memory after each segment, it stays at 0.13 GB."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    return so


def one_cast_at_a_time() -> Any:
    """A reference side's options: the CPU EP runs fp16 MatMuls through Casts of the weights; with optimizations
    off they are not folded into fp32 copies, and with the priority-based order and no memory arena each cast runs
    just before its consumer and is freed after it (export/truncated.py measured 2x the weights at once without)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return so


def _numpy(tensor: Any) -> np.ndarray:
    array = tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor)
    return np.ascontiguousarray(array)
