"""Batch offline scoring: per-record log-likelihood, token count and perplexity of a JSONL/Parquet file, resumable.

What is scored. Text follows the model's own tokenizer's special-token rules: a ``text`` record is tokenized as the
tokenizer encodes a text with its special tokens (tokenizer.json's post-processor: what transformers'
``tokenizer(text)`` gives), so BOS is in front only where the tokenizer itself adds one, and every token after the
first is scored (the first is context only). A ``prompt``+``completion`` record is ``tokens(prompt)`` (with the
tokenizer's special tokens) followed by ``tokens(completion)`` (without), and only the completion's tokens are scored
(the first one too when the prompt gave at least one token). ``input_ids`` records are taken as they are: every token
after the first is scored. The summary's ``special_tokens`` says what the tokenizer added. ``loglik`` is the
natural-log sum over the scored tokens; ``perplexity`` is exp(-loglik / tokens). Task ``loglik`` adds ``greedy``:
whether every scored token was the model's argmax.

Bad records. A record that fails anywhere, in parsing (score_io), in the tokenizer, or in the model run, is a bad
record (``file:line: reason``), skipped under ``--on-bad-record skip``; the run goes on. A batch whose model run
fails is rerun window by window, so only the records whose own windows fail are bad. When every record of a chunk
(two or more) fails in the model run, the fault is the model's or the machine's, not the records', and the run stops
with that error. A record over ``max_record_chars`` characters of text (or token ids) is a bad record before any
work is spent on it; progress counts windows as well as records, so a long record shows it moving.

Long records: a record longer than the context C (the manifest's ``max_position_embeddings``, or ``--max-context``)
is cut into windows of C tokens starting every ``stride`` tokens (default C // 2); each window scores only the
tokens no earlier window scored, so every scored token sees at least C - stride tokens of history (all of it
in the first window). Each window is run alone from an empty cache, so a record's result does not depend on which
batch it lands in (up to float rounding of the batch shape, ~1e-6 per token in fp32).

Batching. Input is read in chunks of ``chunk_records`` records, in order. Within a chunk the windows are sorted by
length and packed greedily into batches of at most ``batch_tokens`` slots (batch size x longest window, padding
included; a single window longer than the budget runs alone) whose padding is at most ``max_padding`` of the
slots: a window that would break either bound starts a new batch. Batches are right-padded prefills.

Paths and locks: a run refuses an output (or its checkpoint, parts or summary) that is, holds or sits inside its input,
compared after resolving ``..``, symlinks and hard links (onnxpipe.outputs.check_io_paths), before anything is
written or removed; and it holds the output's lock (onnxpipe.outputs.output_lock) from start to finish, so a second
run on the same output, ``--resume`` or not, refuses at once instead of writing rows twice.

Durability: see score_io. The local engine appends each chunk's rows to the output (JSONL) or writes one part
file per chunk (Parquet, merged at the end), then commits a checkpoint; ``--resume`` continues from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from onnxpipe.artifact import Manifest, ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.outputs import check_io_paths, output_lock
from onnxpipe.parity import position_ids_for
from onnxpipe.runtime import score_io
from onnxpipe.runtime.score_io import MAX_RECORD_CHARS, BadRecord, Checkpoint, Record, first_line

TASKS = ("perplexity", "loglik", "generate")
ENGINES = ("local", "ray")
BAD_RECORD_MODES = ("skip", "fail")
HEADS = ("auto", "host", "device")  # where the log-softmax over the vocabulary runs (WindowScorer.open)
MAX_BAD_LISTED = 100  # bad records listed in the checkpoint and summary; all are counted
TEXT_ENCODING = "tokenizer-special-tokens"  # in the fingerprint: a run is never resumed under another convention


@dataclass
class ScoreConfig:
    task: str = "perplexity"
    batch_tokens: int = 4096
    max_padding: float = 0.2
    max_context: int | None = None  # default: the model's max_position_embeddings
    stride: int | None = None  # default: context // 2
    chunk_records: int = 512
    on_bad_record: str = "skip"
    provider: str = "auto"
    threads: int | None = None  # onnxruntime intra-op threads (None: onnxruntime's default)
    resume: bool = False
    force: bool = False
    progress: bool = True
    engine: str = "local"
    num_workers: int | None = None
    ray_address: str | None = None
    max_new_tokens: int = 64  # --task generate (greedy)
    head: str = "auto"  # where the log-softmax over the vocabulary runs: auto (device on a GPU), host, device
    max_record_chars: int = MAX_RECORD_CHARS  # a record with more characters of text (or token ids) is a bad record

    def check(self) -> None:
        if self.task not in TASKS:
            raise OnnxpipeError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.engine not in ENGINES:
            raise OnnxpipeError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.on_bad_record not in BAD_RECORD_MODES:
            raise OnnxpipeError(f"--on-bad-record must be one of {', '.join(BAD_RECORD_MODES)}")
        if self.batch_tokens < 1 or self.chunk_records < 1:
            raise OnnxpipeError("--batch-tokens and --chunk-records must be positive")
        if self.max_record_chars < 1:
            raise OnnxpipeError(f"--max-record-chars must be positive, got {self.max_record_chars}")
        if not 0.0 <= self.max_padding < 1.0:
            raise OnnxpipeError(f"--max-padding must be in [0, 1), got {self.max_padding}")
        if self.task == "generate" and self.engine != "local":
            raise OnnxpipeError("--task generate runs on the local engine only (--engine local)")
        if self.resume and self.force:
            raise OnnxpipeError("--resume and --force contradict each other; pass one")
        if self.head not in HEADS:
            raise OnnxpipeError(f"unknown logits head {self.head!r}; choose one of {', '.join(HEADS)}")


@dataclass
class ScoreSummary:
    records: int
    bad_records: int
    tokens: int
    loglik: float
    perplexity: float | None  # None for --task generate
    seconds: float
    tokens_per_s: float
    records_per_s: float
    input_tokens: int
    padding_fraction: float
    provider: str
    engine: str
    workers: int
    task: str
    context: int
    stride: int
    batch_tokens: int
    max_padding: float
    runs: int
    model_dir: str
    input: str
    output: str
    bad: list[dict[str, str]] = field(default_factory=list)
    placement: dict[str, Any] = field(default_factory=dict)  # ray: workers, CPUs and GPUs each, GPU ids seen
    special_tokens: str = ""  # what the tokenizer adds to a text record (the convention text was scored under)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        head = (f"generated {self.tokens} tokens for {self.records} records" if self.perplexity is None else
                f"scored {self.records} records, {self.tokens} tokens: corpus perplexity {self.perplexity:.4f} "
                f"(loglik {self.loglik:.3f})")
        out = [
            head,
            f"{self.tokens_per_s:.0f} tokens/s, {self.records_per_s:.1f} records/s over {self.seconds:.1f}s "
            f"({self.runs} run{'s' if self.runs != 1 else ''}); padding {self.padding_fraction:.1%} of batch slots; "
            f"engine {self.engine} x{self.workers}"
            f"{' (1 GPU each)' if self.placement.get('gpus_per_worker') else ''}; {self.provider}",
        ]
        if self.special_tokens:
            out.append(f"special tokens: {self.special_tokens}")
        if self.bad_records:
            out.append(f"skipped {self.bad_records} bad record(s); first: "
                       + "; ".join(f"{b['where']}: {b['error']}" for b in self.bad[:3]))
        return out


# ---- tokens and windows ----

@dataclass
class Item:
    """A record ready to score: its tokens and the first scored position (>= 1)."""

    tokens: list[int]
    score_from: int


class Encoder:
    """Turns records into Items with the model directory's tokenizer (tokenizer.json) and its own special-token
    rules: a text is encoded with the special tokens the tokenizer adds (as ``tokenizer(text)`` in transformers)."""

    def __init__(self, md: ModelDir):
        self.path = md.path
        tok = md.path / "tokenizer.json"
        self._tokenizer = None
        if tok.is_file():
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(tok))

    def _require(self) -> Any:
        if self._tokenizer is None:
            raise OnnxpipeError(f"{self.path}: no tokenizer.json, so text records cannot be scored; "
                                "give records with input_ids (or prompt_ids + completion_ids) instead")
        return self._tokenizer

    def encode(self, texts: list[str], special: bool = True) -> list[list[int] | str]:
        """Token ids per text (with the tokenizer's special tokens when ``special``), or why the tokenizer failed
        on it: a batch the tokenizer rejects is encoded text by text, so one bad text fails alone."""
        if not texts:
            return []
        tok = self._require()
        # encode_batch_fast (tokenizers >= 0.21): the same ids without character offsets, ~1.5x faster
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        try:
            return [e.ids for e in encode(texts, add_special_tokens=special)]
        except Exception:  # the tokenizers library raises its own exception types
            pass
        out: list[list[int] | str] = []
        for text in texts:
            try:
                out.append(tok.encode(text, add_special_tokens=special).ids)
            except Exception as e:
                out.append(f"the tokenizer failed on it ({first_line(e)})")
        return out

    def special_tokens(self) -> str:
        """In words: the special tokens the tokenizer adds around a text (the convention text is scored under)."""
        if self._tokenizer is None:
            return "no tokenizer.json (token-id records only)"
        tok = self._tokenizer
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        named = lambda ids: " ".join(f"{tok.id_to_token(i)} ({i})" for i in ids)  # noqa: E731
        parts = [f"{named(full[:at])} before"] if at else []
        parts += [f"{named(full[at + len(plain):])} after"] if len(full) > at + len(plain) else []
        return "the tokenizer's own: " + (", ".join(parts) if parts else "none added") + " (token-id records as given)"

    def items(self, records: Sequence[Record]) -> list[Item | str]:
        """An Item per record, or the reason it has nothing to score (or could not be tokenized)."""
        heads: list[str] = []  # texts and prompts: with the tokenizer's special tokens
        tails: list[str] = []  # completions: without
        for r in records:
            if r.text is not None:
                heads.append(r.text)
            elif r.completion is not None:
                heads.append(r.prompt or "")
                tails.append(r.completion)
        head_ids, tail_ids = iter(self.encode(heads, True)), iter(self.encode(tails, False))
        out: list[Item | str] = []
        for r in records:
            if r.text is not None:
                tokens: list[int] | str = next(head_ids)
                start = 1
            elif r.completion is not None:
                prompt, completion = next(head_ids), next(tail_ids)
                failed = prompt if isinstance(prompt, str) else completion if isinstance(completion, str) else None
                tokens = failed or (prompt + completion)
                start = max(1, len(prompt))
            elif r.ids is not None:
                tokens, start = r.ids, 1
            else:
                tokens, start = r.prompt_ids + r.completion_ids, max(1, len(r.prompt_ids))
            if isinstance(tokens, str):
                out.append(tokens)
            else:
                out.append(Item(tokens, start) if len(tokens) > start else f"nothing to score ({len(tokens)} "
                           f"tokens, scoring from position {start})")
        return out


def cut_windows(n_tokens: int, context: int, stride: int, score_from: int = 1) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) windows over n_tokens positions: every position >= score_from is scored once
    (given stride < context), by the first window that holds it and one token before it."""
    windows, begin, scored_up_to = [], 0, max(1, score_from)
    while n_tokens > 1:
        end = min(begin + context, n_tokens)
        first = max(scored_up_to, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        scored_up_to = max(scored_up_to, end)
        if end == n_tokens:
            break
        begin += stride
    return windows


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_padding: float) -> list[list[int]]:
    """Indices grouped into batches: sorted by length, each batch within batch_tokens slots and max_padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_sum = 0
    for i in order:
        n = lengths[i]
        if cur:
            slots = (len(cur) + 1) * n  # ascending order: n is the new longest
            if slots > batch_tokens or 1.0 - (cur_sum + n) / slots > max_padding:
                batches.append(cur)
                cur, cur_sum = [], 0
        cur.append(i)
        cur_sum += n
    if cur:
        batches.append(cur)
    return batches


# ---- the model side ----

class WindowScorer:
    """One onnxruntime session; scores a batch of windows as one right-padded prefill from an empty cache."""

    def __init__(self, session: Any, manifest: Manifest, provider: str = "cpu", head: str = "host",
                 device: str = "cpu", threads: int | None = None):
        self.session = session
        self.manifest = manifest
        self.provider = provider
        if head not in HEADS[1:]:
            raise OnnxpipeError(f"unknown logits head {head!r}; choose host or device")
        self.head = LogitsHead(session, manifest.graph.get("logits", "logits"), device, threads) if head == "device" else None
        self.inputs = {i.name: i for i in session.get_inputs()}
        past_key = manifest.past_names(0)[0]
        self.kv_dtype = np.float16 if "float16" in self.inputs[past_key].type else np.float32
        m = manifest.model
        self.kv_shape = (m["num_kv_heads"], m["head_dim"])
        self.logits = manifest.graph.get("logits", "logits")
        # Always right-padded: a scoring prefill starts from an empty cache, so a row's real tokens come first and
        # causal attention never lets them see the pads at its end; they compute exactly what they compute alone.
        # Left padding shifted attention's float sums by a few ulps, which flips int8 roundings downstream (dynamic
        # int8 on SmolLM2: records moved by up to 7 nats with the batch). Every graph form takes right padding here.
        self.right_padded = True
        self.want_greedy = True  # False skips the argmax (only --task loglik reports it)

    @classmethod
    def open(cls, model_dir: str | Path, provider: str = "auto", threads: int | None = None,
             announce: Callable[[str], None] | None = None, head: str = "auto") -> "WindowScorer":
        """head: where the log-softmax over the vocabulary runs. auto: on the device for a GPU session (only two
        numbers per scored token come back instead of the logits), in numpy for a CPU one."""
        from onnxpipe.runtime.providers import create_session

        if head not in HEADS:
            raise OnnxpipeError(f"unknown logits head {head!r}; choose one of {', '.join(HEADS)}")
        md = ModelDir.open(model_dir)
        options = gpu_session_options(provider)
        session, choice = create_session(md.model_path, provider, threads=threads, graph_inputs=md.manifest.graph["inputs"],
                                         session_options=options, announce=announce or (lambda _m: None))
        if options is not None and choice.device == "cpu":  # the GPU did not start: the CPU keeps every ORT pass
            session, choice = create_session(md.model_path, provider, threads=threads,
                                             graph_inputs=md.manifest.graph["inputs"], announce=lambda _m: None)
        if head == "auto":
            head = "host" if choice.device == "cpu" else "device"
        summary = choice.summary() + ("; onnxruntime graph optimizations: basic" if choice.device != "cpu" and options
                                      is not None else "")
        try:
            return cls(session, md.manifest, summary, head=head, device=choice.device, threads=threads)
        except Exception as e:  # onnxruntime's own error types: the head graph did not load on this device
            if head != "device":
                raise
            (announce or (lambda _m: None))(f"the log-softmax could not run on {choice.device} "
                                            f"({str(e).strip().splitlines()[0][:200]}); it runs on the host instead")
            return cls(session, md.manifest, summary, head="host", device=choice.device, threads=threads)

    def score(self, windows: Sequence[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """windows: (tokens, first scored index). Returns per window: loglik sum (float64), scored count, all-greedy."""
        batch = len(windows)
        lengths = np.fromiter((len(t) for t, _ in windows), np.int64, batch)
        firsts = np.fromiter((f for _, f in windows), np.int64, batch)
        width = int(lengths.max())
        # every token of the batch at once, window after window: its row, its place in the window, its column
        flat = np.concatenate([np.asarray(t, np.int64) for t, _ in windows])
        row = np.repeat(np.arange(batch), lengths)
        place = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        col = place if self.right_padded else place + (width - lengths)[row]
        ids = np.zeros((batch, width), np.int64)
        mask = np.zeros((batch, width), np.int64)
        ids[row, col] = flat
        mask[row, col] = 1
        scored = place >= firsts[row]  # in window order, as the per-window loop gave them (same float sums)
        own, tgt = row[scored], flat[scored]
        index = own * width + col[scored] - 1  # the logit at position p predicts the token at p + 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self.inputs:
            feed["position_ids"] = position_ids_for(mask, width)
        empty = np.zeros((batch, self.kv_shape[0], 0, self.kv_shape[1]), self.kv_dtype)
        for i in range(self.manifest.num_layers):
            for name in self.manifest.past_names(i):
                feed[name] = empty
        if self.head is not None:
            logprob, greedy = self.head.run(feed, index, tgt)
        else:
            logprob, greedy = self._host_head(feed, index, tgt)
        loglik = np.bincount(own, weights=logprob, minlength=batch)
        count = np.bincount(own, minlength=batch)
        all_greedy = np.bincount(own, weights=(~greedy).astype(np.float64), minlength=batch) == 0
        return loglik, count, all_greedy

    def _host_head(self, feed: dict[str, np.ndarray], index: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The logits come to the host; log-softmax of the scored rows in numpy (sums in float64)."""
        (logits,) = self.session.run([self.logits], feed)
        flat = logits.reshape(-1, logits.shape[-1])
        sel = flat.take(index, axis=0).astype(np.float32, copy=False)  # [N, vocab], a copy we own
        target_logit = sel[np.arange(len(tgt)), tgt].astype(np.float64)
        greedy = sel.argmax(axis=-1) == tgt if self.want_greedy else np.ones(len(tgt), bool)
        peak = sel.max(axis=-1)
        np.subtract(sel, peak[:, None], out=sel)
        np.exp(sel, out=sel)
        lse = peak.astype(np.float64) + np.log(sel.sum(axis=-1).astype(np.float64))  # numpy sums pairwise
        return target_logit - lse, greedy


def gpu_session_options(provider: str) -> Any:
    """SessionOptions for a scoring session that will run on a GPU (None: onnxruntime's defaults, for the CPU).

    Scoring feeds a new (batch, width) shape almost every batch, and on the CUDA EP at onnxruntime's default level
    (ORT_ENABLE_ALL) the first run of each new shape cost ~75 ms on an H100 (150M Llama, onnxruntime-gpu 1.31.1:
    45 batches, 45 shapes, 3.8 s; the same batches again in the same session 0.29 s). At ORT_ENABLE_BASIC the
    first pass took 0.35 s and the second the same 0.29 s: the fusions above BASIC bought nothing on a graph that
    `optimize --target cuda` already fused, and cost the per-shape set-up. Most of the rest was cuDNN's SDPA
    building a plan per shape, which providers.SDPA_KERNEL now keeps out (a new prompt length's first prefill, tiny
    Llama on the H100: 7-11 ms at ENABLE_ALL, 1.2-1.3 ms at ENABLE_BASIC). The CPU keeps the default level."""
    import onnxruntime as ort

    from onnxpipe.runtime.providers import CHAIN, available_providers

    listed = set(available_providers())
    if provider not in CHAIN or not any(p in listed for p in CHAIN[provider] if p != "cpu"):
        return None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    return so


class LogitsHead:
    """log p(target) and argmax == target for chosen rows of the logits, computed by a small onnxruntime graph on
    the device that holds them. The model session's logits stay on its device (IO binding) and only two numbers
    per scored token come back: on a GPU the [tokens x vocab] logits never cross the bus and the log-softmax
    runs there, not in single-threaded numpy. fp32 arithmetic, max-shifted log-sum-exp."""

    def __init__(self, model_session: Any, logits_name: str, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.model_session = model_session
        self.logits_name = logits_name
        self.device = device
        out = next(o for o in model_session.get_outputs() if o.name == logits_name)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads is not None:
            so.intra_op_num_threads = int(threads)
        providers = [("CUDAExecutionProvider", {"device_id": "0"})] if device == "cuda" else []
        self.session = ort.InferenceSession(_head_graph("float16" in out.type), so,
                                            providers=providers + ["CPUExecutionProvider"])

    def run(self, feed: dict[str, np.ndarray], index: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """index: rows of the logits flattened to [batch * width, vocab]; target: the token each row predicts."""
        io = self.model_session.io_binding()
        for name, value in feed.items():
            io.bind_cpu_input(name, value)
        io.bind_output(self.logits_name, self.device, 0)
        self.model_session.run_with_iobinding(io)
        head = self.session.io_binding()
        head.bind_ortvalue_input("logits", io.get_outputs()[0])
        head.bind_cpu_input("index", np.ascontiguousarray(index, np.int64))
        head.bind_cpu_input("target", np.ascontiguousarray(target, np.int64))
        head.bind_output("logprob")
        head.bind_output("greedy")
        self.session.run_with_iobinding(head)
        logprob, greedy = head.copy_outputs_to_cpu()
        return logprob.astype(np.float64), greedy


def _head_graph(fp16: bool) -> bytes:
    """logits [B, W, V], index [N], target [N] -> logprob [N] (float), greedy [N] (bool)."""
    import onnx
    from onnx import TensorProto, helper

    def const(name: str, values: list[int]) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    nodes = [
        const("last", [-1]),
        helper.make_node("Flatten", ["logits"], ["flat"], axis=2),  # [B * W, V]
        helper.make_node("Gather", ["flat", "index"], ["rows"], axis=0),  # [N, V]
        helper.make_node("Cast", ["rows"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["x", "last"], ["peak"], keepdims=1),
        helper.make_node("Sub", ["x", "peak"], ["shifted"]),
        helper.make_node("Exp", ["shifted"], ["e"]),
        helper.make_node("ReduceSum", ["e", "last"], ["sum"], keepdims=1),
        helper.make_node("Log", ["sum"], ["lse"]),  # log-sum-exp less the peak, [N, 1]
        helper.make_node("Unsqueeze", ["target", "last"], ["target_col"]),
        helper.make_node("GatherElements", ["shifted", "target_col"], ["picked"], axis=1),
        helper.make_node("Sub", ["picked", "lse"], ["logprob_col"]),
        helper.make_node("Squeeze", ["logprob_col", "last"], ["logprob"]),
        helper.make_node("ArgMax", ["x"], ["argmax"], axis=-1, keepdims=0),  # first maximum, as numpy's argmax
        helper.make_node("Equal", ["argmax", "target"], ["greedy"]),
    ]
    graph = helper.make_graph(
        nodes, "score_head",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT, ["B", "W", "V"]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("target", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("logprob", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("greedy", TensorProto.BOOL, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class ChunkStats:
    input_tokens: int = 0
    padded_slots: int = 0
    batches: int = 0
    max_batch_padding: float = 0.0


# (records finished, tokens scored or generated, windows done, windows of the chunk); for --task generate: prompts
Progress = Callable[[int, int, int, int], None]
ItemResult = tuple[float, int, bool] | str  # (loglik, tokens, greedy), or why the model run failed on the item


def score_items(scorer: WindowScorer, items: Sequence[Item], context: int, stride: int, batch_tokens: int,
                max_padding: float, on_progress: Progress | None = None) -> tuple[list[ItemResult], ChunkStats]:
    """(loglik, tokens, greedy) per item, scoring their windows in length-bucketed batches; or, for an item whose
    window the model run failed on (run alone after its batch failed), the reason. Every item failing (two or
    more) is an error: the model or the machine is at fault, not the records."""
    windows: list[tuple[int, np.ndarray, int]] = []  # (item index, tokens, first scored index in the window)
    for k, it in enumerate(items):
        arr = np.asarray(it.tokens, np.int64)
        for begin, end, first in cut_windows(len(arr), context, stride, it.score_from):
            windows.append((k, arr[begin:end], first - begin))
    remaining = np.bincount([w[0] for w in windows], minlength=len(items))
    loglik = np.zeros(len(items))
    count = np.zeros(len(items), np.int64)
    greedy = np.ones(len(items), bool)
    failed: dict[int, str] = {}
    stats = ChunkStats()
    windows_done = 0
    for batch in plan_batches([len(w[1]) for w in windows], batch_tokens, max_padding):
        owner = np.fromiter((windows[i][0] for i in batch), np.int64, len(batch))
        run = [i for i in batch if windows[i][0] not in failed]
        scored = 0
        if run:
            ok, ll, n, g = _score_batch(scorer, [windows[i] for i in run], failed)
            width = max(len(windows[i][1]) for i in run)
            real = sum(len(windows[i][1]) for i in run)
            stats.input_tokens += real
            stats.padded_slots += width * len(run)
            stats.batches += 1
            stats.max_batch_padding = max(stats.max_batch_padding, 1.0 - real / (width * len(run)))
            ran = np.fromiter((windows[i][0] for i in run), np.int64, len(run))[ok]
            np.add.at(loglik, ran, ll[ok])  # unbuffered, in batch order: the sums of a one-by-one loop
            np.add.at(count, ran, n[ok])
            np.logical_and.at(greedy, ran, g[ok])
            scored = int(n[ok].sum())
        np.subtract.at(remaining, owner, 1)
        windows_done += len(batch)
        if on_progress is not None:
            finished = int(np.count_nonzero(remaining[np.unique(owner)] == 0))
            on_progress(finished, scored, windows_done, len(windows))
    if len(items) >= 2 and len(failed) == len(items):
        raise OnnxpipeError(f"the model run failed on every record of a chunk ({next(iter(failed.values()))}); "
                            "this is the model or the machine, not the records")
    return [failed[k] if k in failed else (float(loglik[k]), int(count[k]), bool(greedy[k]))
            for k in range(len(items))], stats


def _score_batch(scorer: WindowScorer, windows: list[tuple[int, np.ndarray, int]], failed: dict[int, str]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scorer.score over the windows; when the batch fails, window by window, and the owner of a window that fails
    alone goes into ``failed``. Returns (ran, loglik, count, greedy) per window."""
    try:
        ll, n, g = scorer.score([(w[1], w[2]) for w in windows])
        return np.ones(len(windows), bool), ll, n, g
    except Exception:  # onnxruntime's own error types (a shape, an allocation); each window is tried alone below
        if len(windows) == 1:
            return _score_alone(scorer, windows[0], failed)
    parts = [_score_alone(scorer, w, failed) for w in windows]
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(4))  # type: ignore[return-value]


def _score_alone(scorer: WindowScorer, window: tuple[int, np.ndarray, int], failed: dict[int, str]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        ll, n, g = scorer.score([(window[1], window[2])])
        return np.ones(1, bool), ll, n, g
    except Exception as e:
        failed.setdefault(window[0], f"the model run failed on it ({first_line(e)})")
        return np.zeros(1, bool), np.zeros(1), np.zeros(1, np.int64), np.ones(1, bool)


def rows_and_failures(records: Sequence[Record], results: Sequence[ItemResult], task: str
                      ) -> tuple[list[dict[str, Any]], list[BadRecord]]:
    rows: list[dict[str, Any]] = []
    failed: list[BadRecord] = []
    for rec, res in zip(records, results):
        if isinstance(res, str):
            failed.append(BadRecord(rec.where, res))
        else:
            rows.append(result_row(rec.id, *res, task))
    return rows, failed


def result_row(record_id: Any, loglik: float, tokens: int, greedy: bool, task: str) -> dict[str, Any]:
    row = {"id": record_id, "loglik": loglik, "tokens": tokens, "perplexity": math.exp(-loglik / tokens)}
    if task == "loglik":
        row["greedy"] = greedy
    return row


# ---- one run: shared by both engines ----

@dataclass
class ScoreJob:
    """Everything a run needs, validated up front."""

    model_dir: ModelDir
    input_path: Path
    output: Path
    shards: list[score_io.Shard]
    fmt: str
    config: ScoreConfig
    context: int
    stride: int

    @property
    def total_records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def checkpoint_path(self) -> Path:
        return (self.output / "_checkpoint.json") if self.config.engine == "ray" else \
            self.output.with_name(self.output.name + ".checkpoint.json")

    @property
    def parts_dir(self) -> Path:
        return self.output if self.config.engine == "ray" else self.output.with_name(self.output.name + ".parts")

    @property
    def summary_path(self) -> Path:
        return self.output.with_name(self.output.stem + ".summary.json")

    @property
    def written_paths(self) -> list[Path]:
        """Every path a run writes, replaces or (with --force) deletes."""
        return [self.output, self.checkpoint_path, self.parts_dir, self.summary_path]

    def check_paths(self) -> None:
        """Refuse a run that would write over, delete or write inside its own input, however the paths are
        spelled (``..``, symlinks, hard links): before anything is written or removed."""
        inputs = [self.input_path, *(s.path for s in self.shards)]
        for path in self.written_paths:
            check_io_paths(inputs, path)

    def part_path(self, index: int) -> Path:
        return self.parts_dir / f"part-{index:05d}.{self.fmt}"

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        manifest = (self.model_dir.path / "onnxpipe.json").read_bytes()
        c = self.config
        return {
            "model": hashlib.sha256(manifest).hexdigest()[:16] + f"/{self.model_dir.model_path.stat().st_size}",
            "input": [[s.path.name, s.path.stat().st_size, s.records] for s in self.shards],
            "task": c.task, "context": self.context, "stride": self.stride, "batch_tokens": c.batch_tokens,
            "max_padding": c.max_padding, "chunk_records": c.chunk_records, "engine": c.engine,
            "max_record_chars": c.max_record_chars, "text_encoding": TEXT_ENCODING,
            **({"max_new_tokens": c.max_new_tokens} if c.task == "generate" else {}),
        }

    def records(self, skip: int = 0) -> Iterator[Record | BadRecord]:
        prefix = self.input_path.is_dir()
        vocab = int(self.model_dir.manifest.model["vocab_size"])
        seen = 0
        for shard in self.shards:
            if seen + shard.records <= skip:
                seen += shard.records
                continue
            for rec in score_io.iter_records(shard, prefix, vocab, self.config.task == "generate",
                                             self.config.max_record_chars):
                seen += 1
                if seen > skip:
                    yield rec

    def chunks(self, skip: int = 0) -> Iterator[list[Record | BadRecord]]:
        chunk: list[Record | BadRecord] = []
        for rec in self.records(skip):
            chunk.append(rec)
            if len(chunk) == self.config.chunk_records:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def prepare_job(model_dir: str | Path, input_path: str | Path, output: str | Path, config: ScoreConfig) -> ScoreJob:
    config.check()
    md = ModelDir.open(model_dir)
    input_path, output = Path(input_path), Path(output)
    fmt = score_io.format_of(output, "output")
    if fmt == "parquet":
        score_io.require_pyarrow(output)
    shards = score_io.list_shards(input_path)
    model_context = int(md.manifest.model.get("max_position_embeddings") or 0)
    context = min(x for x in (config.max_context, model_context) if x) if (config.max_context or model_context) else 0
    if context < 2:
        raise OnnxpipeError(f"{md.path}: no usable context length in the manifest; pass --max-context")
    stride = config.stride or max(1, context // 2)
    if not 0 < stride < context:
        raise OnnxpipeError(f"--stride must be in 1..{context - 1} (below the context, so that every window "
                            f"overlaps the last and every token is scored with some history), got {stride}")
    job = ScoreJob(md, input_path, output, shards, fmt, config, context, stride)
    job.check_paths()
    return job


def open_checkpoint(job: ScoreJob) -> Checkpoint:
    """The checkpoint to continue from; a fresh one unless --resume. Refuses to overwrite without --force."""
    c = job.config
    ck_path = job.checkpoint_path
    leftovers = [p for p in (job.output, ck_path, job.parts_dir) if p.exists()]
    score_io.remove_stale_temps(job.written_paths)
    if c.force:
        job.check_paths()  # again, right before removing anything: the input may have changed since
        for p in job.written_paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        leftovers = []
    fingerprint = job.fingerprint()
    if leftovers and not c.resume:
        raise OnnxpipeError(f"{job.output} already exists; pass --resume to continue that run or --force to start over")
    if c.resume and leftovers:
        if not ck_path.is_file():
            raise OnnxpipeError(f"{job.output} exists but has no checkpoint ({ck_path.name}), so it cannot be resumed; "
                                "pass --force to start over")
        ckpt = Checkpoint.load(ck_path)
        changed = [k for k in fingerprint if ckpt.fingerprint.get(k) != fingerprint[k]]
        if changed:
            raise OnnxpipeError(f"{ck_path}: the run being resumed had different {', '.join(changed)} "
                                f"(was {', '.join(str(ckpt.fingerprint.get(k)) for k in changed)}); rerun with the same "
                                "model, input and options, or pass --force to start over")
        return ckpt
    ckpt = Checkpoint(fingerprint)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    if c.engine == "ray" or job.fmt == "parquet":
        job.parts_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save(ck_path)
    return ckpt


def start(job: ScoreJob, log: Callable[[str], None]) -> Checkpoint:
    """Validate the whole input in --on-bad-record fail mode, then open (or create) the checkpoint."""
    if job.config.on_bad_record == "fail":
        check_all_records(job)
    ckpt = open_checkpoint(job)
    if ckpt.complete:
        log(f"{job.output}: already complete (summary in {job.summary_path.name})")
    return ckpt


def fail_on_bad(job: ScoreJob, bad: BadRecord) -> None:
    if job.config.on_bad_record == "fail":
        raise OnnxpipeError(f"{job.input_path}: bad record at {bad.where}: {bad.error} "
                            "(fix it, or pass --on-bad-record skip)")


def record_bad(ckpt: Checkpoint, bads: list[BadRecord], log: Callable[[str], None]) -> None:
    """Count (and list the first MAX_BAD_LISTED of) a committed chunk's bad records."""
    for bad in bads:
        if ckpt.bad_count < MAX_BAD_LISTED:
            ckpt.bad.append(bad.to_json())
            log(f"skipped bad record {bad.where}: {bad.error}")
        elif ckpt.bad_count == MAX_BAD_LISTED:
            log(f"more bad records; only the first {MAX_BAD_LISTED} are listed (all are counted in the summary)")
        ckpt.bad_count += 1


def check_all_records(job: ScoreJob, skip: int = 0) -> None:
    """--on-bad-record fail: find a malformed record before any scoring (JSON and field checks only)."""
    for rec in job.records(skip):
        if isinstance(rec, BadRecord):
            fail_on_bad(job, rec)


def split_chunk(job: ScoreJob, make_items: Callable[[list[Record]], list[Item | str]],
                chunk: list[Record | BadRecord]) -> tuple[list[Record], list[Item], list[BadRecord]]:
    """The chunk's workable records with their Items, and its bad records (fatal in --on-bad-record fail)."""
    good = [r for r in chunk if isinstance(r, Record)]
    made = dict(zip((id(r) for r in good), make_items(good)))
    records, items, bads = [], [], []
    for rec in chunk:
        item = rec if isinstance(rec, BadRecord) else made[id(rec)]
        if isinstance(rec, BadRecord) or isinstance(item, str):
            bad = rec if isinstance(rec, BadRecord) else BadRecord(rec.where, item)
            fail_on_bad(job, bad)
            bads.append(bad)
        else:
            records.append(rec)
            items.append(item)
    return records, items, bads


def make_summary(job: ScoreJob, ckpt: Checkpoint, provider: str, workers: int) -> ScoreSummary:
    c = job.config
    secs = max(ckpt.seconds, 1e-9)
    return ScoreSummary(
        records=ckpt.records_scored, bad_records=ckpt.bad_count, tokens=ckpt.tokens, loglik=ckpt.loglik,
        perplexity=math.exp(-ckpt.loglik / ckpt.tokens) if ckpt.tokens and c.task != "generate" else None,
        seconds=ckpt.seconds, tokens_per_s=ckpt.tokens / secs, records_per_s=ckpt.records_scored / secs,
        input_tokens=ckpt.input_tokens,
        padding_fraction=1.0 - ckpt.input_tokens / ckpt.padded_slots if ckpt.padded_slots else 0.0,
        provider=provider, engine=c.engine, workers=workers, task=c.task, context=job.context, stride=job.stride,
        batch_tokens=c.batch_tokens, max_padding=c.max_padding, runs=ckpt.runs, model_dir=str(job.model_dir.path),
        input=str(job.input_path), output=str(job.output), bad=list(ckpt.bad),
        special_tokens=Encoder(job.model_dir).special_tokens(),
    )


def finished_summary(job: ScoreJob, ckpt: Checkpoint) -> ScoreSummary:
    """The summary of a run that is already complete (rebuilt from the checkpoint if its file went missing)."""
    try:
        return ScoreSummary(**json.loads(job.summary_path.read_text()))
    except (OSError, ValueError, TypeError):
        summary = make_summary(job, ckpt, "unknown (the summary file was missing; rebuilt from the checkpoint)", 0)
        score_io.write_json_atomic(job.summary_path, summary.to_json())
        return summary


def finish(job: ScoreJob, ckpt: Checkpoint, summary: ScoreSummary) -> None:
    score_io.write_json_atomic(job.summary_path, summary.to_json())
    ckpt.complete = True
    ckpt.save(job.checkpoint_path)


def progress_bar(job: ScoreJob, done: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=job.total_records, initial=done, unit="rec", file=sys.stderr, disable=not job.config.progress,
                dynamic_ncols=True, smoothing=0.1, desc="score")


# ---- the local engine ----

def score(model_dir: str | Path, input_path: str | Path, output: str | Path, config: ScoreConfig | None = None,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> ScoreSummary:
    """Score every record of ``input_path`` into ``output`` (see the module docstring); returns the summary."""
    config = config or ScoreConfig()
    job = prepare_job(model_dir, input_path, output, config)
    with output_lock(job.output):  # a second run on this output refuses at once instead of duplicating rows
        if config.engine == "ray":
            from onnxpipe.runtime.score_ray import score_on_ray

            return score_on_ray(job, log)
        return score_local(job, log)


class ScoreWorker:
    """The local engine's scoring: records -> Items (Encoder) -> windows -> batches (WindowScorer) -> rows."""

    def __init__(self, job: ScoreJob, announce: Callable[[str], None]):
        c = job.config
        self.job = job
        self.scorer = WindowScorer.open(job.model_dir.path, c.provider, c.threads, announce=announce, head=c.head)
        self.scorer.want_greedy = c.task == "loglik"
        self.provider = self.scorer.provider
        self.items = Encoder(job.model_dir).items

    def run(self, records: list[Record], items: list[Item], on_progress: Progress
            ) -> tuple[list[dict[str, Any]], ChunkStats, list[BadRecord]]:
        """The rows of the records scored, and the records the model run failed on."""
        job, c = self.job, self.job.config
        results, stats = score_items(self.scorer, items, job.context, job.stride, c.batch_tokens, c.max_padding,
                                     on_progress)
        rows, failed = rows_and_failures(records, results, c.task)
        return rows, stats, failed


def score_local(job: ScoreJob, log: Callable[[str], None]) -> ScoreSummary:
    c = job.config
    ckpt = start(job, log)
    if ckpt.complete:
        if job.fmt == "parquet":
            shutil.rmtree(job.parts_dir, ignore_errors=True)
        return finished_summary(job, ckpt)
    _cut_back(job, ckpt)
    messages: list[str] = []
    if c.task == "generate":
        from onnxpipe.runtime.score_generate import GenerateWorker

        worker: Any = GenerateWorker(job, messages.append)
    else:
        worker = ScoreWorker(job, messages.append)
    for m in messages:
        log(m)
    ckpt.runs += 1
    bar = progress_bar(job, ckpt.records_done)
    run_tokens, run_start = 0, time.perf_counter()

    step = "prompt" if c.task == "generate" else "window"

    def on_progress(records: int, tokens: int, windows_done: int, windows: int) -> None:
        nonlocal run_tokens
        run_tokens += tokens
        bar.update(records)
        # refreshed every batch: a long record shows its windows moving while the record count stands still
        bar.set_postfix_str(f"{run_tokens / max(time.perf_counter() - run_start, 1e-9):.0f} tok/s, "
                            f"{step} {windows_done}/{windows} of the chunk", refresh=True)

    try:
        for chunk in job.chunks(ckpt.records_done):
            t0 = time.perf_counter()
            records, items, bads = split_chunk(job, worker.items, chunk)
            bar.update(len(bads))
            rows, stats, failed = worker.run(records, items, on_progress)
            for bad in failed:
                fail_on_bad(job, bad)
            record_bad(ckpt, bads + failed, bar.write)
            _commit_chunk(job, ckpt, rows, len(chunk), stats, time.perf_counter() - t0)
    finally:
        bar.close()
    if job.fmt == "parquet":  # the parts go only after the checkpoint says complete: a kill here merges again
        score_io.merge_parts([job.part_path(i) for i in range(ckpt.parts)], job.output, "parquet")
    summary = make_summary(job, ckpt, worker.provider, 1)
    finish(job, ckpt, summary)
    if job.fmt == "parquet":
        shutil.rmtree(job.parts_dir, ignore_errors=True)
    return summary


def _cut_back(job: ScoreJob, ckpt: Checkpoint) -> None:
    """Drop whatever a killed run wrote after its last checkpoint."""
    if job.fmt == "jsonl":
        if not job.output.exists():
            if ckpt.output_bytes:
                raise OnnxpipeError(f"{job.output} is missing but its checkpoint says {ckpt.output_bytes} bytes were "
                                    "written; pass --force to start over")
            job.output.touch()
        with open(job.output, "r+b") as f:
            size = f.seek(0, 2)
            if size < ckpt.output_bytes:
                raise OnnxpipeError(f"{job.output} is shorter ({size} bytes) than its checkpoint says "
                                    f"({ckpt.output_bytes}); it was changed outside this run; pass --force to start over")
            f.truncate(ckpt.output_bytes)
    else:
        job.parts_dir.mkdir(parents=True, exist_ok=True)
        for p in job.parts_dir.iterdir():
            if p.name.startswith(".") or int(p.stem.split("-")[-1]) >= ckpt.parts:
                p.unlink()


def _commit_chunk(job: ScoreJob, ckpt: Checkpoint, rows: list[dict[str, Any]], n_records: int, stats: ChunkStats,
                  seconds: float) -> None:
    """Make the chunk's rows durable, then the checkpoint that covers them."""
    if job.fmt == "jsonl":
        ckpt.output_bytes = score_io.append_jsonl(job.output, rows)
    else:
        score_io.write_part(job.part_path(ckpt.parts), rows, "parquet")
        ckpt.parts += 1
    _account(ckpt, rows, n_records, stats, seconds)
    ckpt.save(job.checkpoint_path)


def _account(ckpt: Checkpoint, rows: list[dict[str, Any]], n_records: int, stats: ChunkStats, seconds: float) -> None:
    ckpt.records_done += n_records
    ckpt.records_scored += len(rows)
    ckpt.loglik += sum(r.get("loglik", 0.0) for r in rows)
    ckpt.tokens += sum(r["tokens"] for r in rows)
    ckpt.input_tokens += stats.input_tokens
    ckpt.padded_slots += stats.padded_slots
    ckpt.seconds += seconds


def iter_rows(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for p in paths:
        yield from score_io.read_part(p)
