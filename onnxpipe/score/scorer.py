"""The model side of scoring: one onnxruntime session that scores a batch of windows as one right-padded prefill
from an empty cache, returning per window the log-likelihood of its scored tokens, their count and whether each
was the model's argmax."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from onnxpipe.artifact import Manifest, ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime import limits, providers
from onnxpipe.runtime.step import Step
from onnxpipe.score.config import HEADS
from onnxpipe.score.head import LogitsHead

# a batch slot's logits on the host: onnxruntime's float32 output, the float32 copy of the scored rows and the
# session's own buffers; 15 bytes per vocabulary entry measured (100,000 slots, vocabulary 4,096: 6.4 GB peak RSS)
HOST_LOGIT_BYTES = 16


class WindowScorer:
    """One onnxruntime session; scores a batch of windows as one right-padded prefill from an empty cache."""

    def __init__(self, session: Any, manifest: Manifest, provider: str = "cpu", head: str = "host",
                 device: str = "cpu", threads: int | None = None, where: object = "model.onnx"):
        self.session = session
        self.manifest = manifest
        self.provider = provider
        if head not in HEADS[1:]:
            raise OnnxpipeError(f"unknown logits head {head!r}; choose host or device")
        self.step = Step.bind(session, manifest, where)
        self.head = LogitsHead(session, self.step.logits, device, threads) if head == "device" else None
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
        if head not in HEADS:
            raise OnnxpipeError(f"unknown logits head {head!r}; choose one of {', '.join(HEADS)}")
        md = ModelDir.open(model_dir)
        options = gpu_session_options(provider)
        session, choice = providers.create_session(md.model_path, provider, threads=threads, graph_inputs=md.manifest.graph["inputs"],
                                         session_options=options, announce=announce or (lambda _m: None))
        if options is not None and choice.device == "cpu":  # the GPU did not start: the CPU keeps every ORT pass
            session, choice = providers.create_session(md.model_path, provider, threads=threads,
                                             graph_inputs=md.manifest.graph["inputs"], announce=lambda _m: None)
        if head == "auto":
            head = "host" if choice.device == "cpu" else "device"
        summary = choice.summary() + ("; onnxruntime graph optimizations: basic" if choice.device != "cpu" and options
                                      is not None else "")
        try:
            return cls(session, md.manifest, summary, head=head, device=choice.device, threads=threads,
                       where=md.model_path)
        except Exception as e:  # onnxruntime's own error types: the head graph did not load on this device
            if head != "device":
                raise
            (announce or (lambda _m: None))(f"the log-softmax could not run on {choice.device} "
                                            f"({str(e).strip().splitlines()[0][:200]}); it runs on the host instead")
            return cls(session, md.manifest, summary, head="host", device=choice.device, threads=threads,
                       where=md.model_path)

    def check_fits(self, rows: int, width: int, batch_tokens: int) -> None:
        """Refuse, before it runs, a batch whose logits come to the host and cannot fit in the memory available now:
        `--batch-tokens 1000000` grew to 6.4 GB on 500 records (vocabulary 4,096), and a larger input or vocabulary
        until the kernel killed the run. A GPU head keeps the logits on the device (onnxruntime reports those)."""
        if self.head is not None:
            return
        need = rows * width * int(self.manifest.model.get("vocab_size") or 0) * HOST_LOGIT_BYTES
        have = limits.available_memory()
        if have is not None and need > have:
            raise OnnxpipeError(
                f"a batch of {rows} windows x {width} tokens needs at least {need / 2**30:.1f} GiB for its logits; "
                f"{have / 2**30:.1f} GiB of memory is available: use a smaller --batch-tokens (now {batch_tokens})")

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
        feed = self.step.feed(ids, mask)  # positions from the mask, an empty cache
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
        (logits,) = self.session.run(self.step.outputs(), feed)
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

    listed = set(providers.available_providers())
    if provider not in providers.CHAIN or not any(p in listed for p in providers.CHAIN[provider] if p != "cpu"):
        return None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    return so

