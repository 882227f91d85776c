"""Text generation over a DecoderSession: prefill, decode step, generate (and stream), as gpt-fast splits it.

    lm = load("out/llama-int8", provider="auto")
    lm.generate("def fib(n):", max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0).text
    for piece in lm.stream(["prompt a", "prompt b"], max_new_tokens=32): print(piece.index, piece.text)

A batch is left-padded (or right-padded where the graph asks for it) with an attention mask; each row stops on its
own and finished rows are dropped from the cache on the device, so they cost nothing afterwards.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from onnxpipe.artifact import ModelDir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.runtime.cuda_graphs import AHEAD_DEPTH
from onnxpipe.runtime.limits import check_fits, check_threads
from onnxpipe.runtime.providers import TensorRTOptions
from onnxpipe.runtime.sampling import SamplingConfig, log_softmax, next_token, repeated_tail, apply_repetition_penalty
from onnxpipe.runtime.session import DecoderSession
from onnxpipe.tokenizer import Message, Tokenizer as TextTokenizer  # the one tokenizer (chat templates too)

Prompt = str | Sequence[int]
PROMPT_CONTEXT = 4  # prompt tokens decoded with the output, so the first word keeps its leading space
# A streamed row's text grows by decoding a window of its last tokens, this many before the new ones (as
# text-generation-inference and vLLM detokenize), not all of its tokens again at every step: at 32 rows of a few
# hundred tokens that whole decode was the server's decode step once more
DECODE_WINDOW = 6
# On the GPU a prefill of a new length paid 53-97 ms once (H100, 1B Llama, onnxruntime-gpu 1.31.1; 3-4 ms again;
# on a tiny Llama with the SDPA kernels pinned, providers.SDPA_KERNEL: 4-11 ms):
# right-padded prompts are padded further to a multiple of this, so lengths share their first run
PREFILL_BUCKET = 32


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (an end-of-sequence token that stopped it included)
    text: str  # their text, cut before a stop string; "" when the model directory has no tokenizer
    finish_reason: str  # eos | stop_string | length | repetition
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass
class StreamPiece:
    index: int  # which prompt of the batch
    text: str  # new text since this row's last piece (never a broken UTF-8 character)
    token_ids: list[int]  # tokens generated since this row's last piece
    finish_reason: str | None = None  # set on the row's last piece

    def __str__(self) -> str:
        return self.text


class RowState:
    """One prompt's generation: its tokens, why it stopped, and the text it has streamed so far."""

    def __init__(self, index: int, prompt: list[int], cfg: SamplingConfig, stop_ids: set[int], limit: int,
                 tokenizer: TextTokenizer | None):
        self.index = index
        self.prompt = prompt
        self.cfg = cfg
        self.stop_ids = stop_ids
        self.limit = limit  # most tokens this row may generate
        self.tok = tokenizer
        self.context = prompt[-PROMPT_CONTEXT:] if tokenizer else []
        self._context_text = tokenizer.decode(self.context) if tokenizer else ""
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.text: str | None = None  # final text, set when finished
        self.streamed = ""
        self._streamed_tokens = 0
        self._raw = ""  # decode(tokens[:_raw_tokens]), kept up to date a window at a time (``decode_prefix``)
        self._raw_tokens = 0
        self.rng = None if cfg.greedy else np.random.default_rng([cfg.seed, index]) if cfg.seed is not None else np.random.default_rng()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def seen(self) -> np.ndarray:
        return np.asarray(self.prompt + self.tokens, np.int64)

    def add(self, token: int) -> None:
        self.tokens.append(int(token))
        if token in self.stop_ids:
            return self._finish("eos")
        limit = self.cfg.repeat_ngram_limit
        if limit:
            n = repeated_tail(self.tokens, limit, self.cfg.repeat_ngram_max)
            if n:
                del self.tokens[len(self.tokens) - n * (limit - 1):]  # keep one copy of the loop
                return self._finish("repetition")
        if self.cfg.stop_strings and self.tok:
            text = self.decode_prefix(len(self.tokens))
            cut = _first_stop(text, self.cfg.stop_strings)
            if cut is not None:
                self.text = text[:cut]
                return self._finish("stop_string")
        if len(self.tokens) >= self.limit:
            return self._finish("length")

    def decode(self, tokens: Sequence[int]) -> str:
        if self.tok is None:
            return ""
        full = self.tok.decode(self.context + list(tokens))
        if full.startswith(self._context_text):
            return full[len(self._context_text):]
        return self.tok.decode(tokens)  # a tokenizer whose decode is not prefix-stable: lose the leading space

    def decode_prefix(self, n: int) -> str:
        """``decode(self.tokens[:n])``, in time that does not grow with n: the text already decoded for the first
        ``_raw_tokens`` tokens plus what the tokens from there to n add, read off a decode of the window of the
        DECODE_WINDOW tokens before them and the new ones (the window is decoded with and without the new tokens;
        where the first is not the second plus an ending, as when a multi-byte character was cut at the old end,
        the row is decoded whole)."""
        if self.tok is None:
            return ""
        if n < self._raw_tokens or n - self._raw_tokens > 64:
            text = self.decode(self.tokens[:n])
        elif n == self._raw_tokens:
            return self._raw
        else:
            ids = self.context + self.tokens  # the window may reach back into the prompt's context
            end_old, end_new = len(self.context) + self._raw_tokens, len(self.context) + n
            start = max(0, end_old - DECODE_WINDOW)
            before = self.tok.decode(ids[start:end_old]) if end_old > start else ""
            after = self.tok.decode(ids[start:end_new])
            if after.startswith(before) and not before.endswith("\ufffd"):
                text = self._raw + after[len(before):]
            else:
                text = self.decode(self.tokens[:n])
        self._raw, self._raw_tokens = text, n
        return text

    def piece(self) -> StreamPiece | None:
        """What can be streamed now: text that no later token can change (no trailing broken UTF-8 character, no
        possible start of a stop string, nothing a repetition cut could take back)."""
        if self.done:
            text = self.text if self.text is not None else ""
            new_tokens = self.tokens[self._streamed_tokens:]
            new = text[len(self.streamed):] if text.startswith(self.streamed) else ""
            self.streamed, self._streamed_tokens = text, len(self.tokens)
            return StreamPiece(self.index, new, new_tokens, self.finish_reason)
        stable = len(self.tokens)
        if self.cfg.repeat_ngram_limit:
            stable -= self.cfg.repeat_ngram_max * (self.cfg.repeat_ngram_limit - 1)
        if stable <= self._streamed_tokens:
            return None
        text = self.decode_prefix(stable)
        text = text.rstrip("\ufffd")  # the tail of a character whose remaining bytes are still to come
        text = text[: len(text) - _held_back(text, self.cfg.stop_strings)]
        if not text.startswith(self.streamed) or len(text) == len(self.streamed):
            return None
        new = text[len(self.streamed):]
        new_tokens = self.tokens[self._streamed_tokens:stable]
        self.streamed, self._streamed_tokens = text, stable
        return StreamPiece(self.index, new, new_tokens)

    def result(self) -> GenerationResult:
        assert self.finish_reason is not None
        return GenerationResult(list(self.tokens), self.text or "", self.finish_reason, list(self.prompt))

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.text is None:
            self.text = self.decode(self.tokens)


class LanguageModel:
    """A loaded model directory: tokenizer, decoder session and defaults for decoding."""

    def __init__(self, session: DecoderSession, tokenizer: TextTokenizer | None):
        self.session = session
        self.tokenizer = tokenizer
        self.manifest = session.manifest
        # extra right padding costs the GPU little and the CPU real compute; left padding would shift nothing here
        gpu_right = session.device != "cpu" and session.shares_buffer and session.padding_side == "right"
        self.prefill_bucket = PREFILL_BUCKET if gpu_right else 1

    @property
    def provider(self) -> str:
        return self.session.provider

    @property
    def provider_choice(self) -> Any:
        return self.session.choice

    # ---- public API ----
    def generate(self, prompt: Prompt | Sequence[Prompt], **options: Any) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (text or token ids) or a list of them; options are SamplingConfig's fields."""
        prompts, single = self._prompts(prompt)
        cfg = self._config(options)
        if cfg.num_beams > 1:
            results = [self._beam_search(p, cfg) for p in prompts]
        else:
            rows = self._rows(prompts, cfg)
            self.check_fits(rows)
            for _ in self._decode(rows, cfg):
                pass
            results = [r.result() for r in rows]
        return results[0] if single else results

    def stream(self, prompt: Prompt | Sequence[Prompt], **options: Any) -> Iterator[StreamPiece]:
        """Yield text pieces as they become final, for one prompt or a batch (``piece.index`` says which)."""
        prompts, _ = self._prompts(prompt)
        cfg = self._config(options)
        if cfg.num_beams > 1:
            raise OnnxpipeError("streaming needs num_beams=1 (a beam's text is not final until the search ends)")
        rows = self._rows(prompts, cfg)
        self.check_fits(rows)
        for changed in self._decode(rows, cfg):
            for row in changed:
                piece = row.piece()
                if piece is not None:
                    yield piece

    def chat(self, messages: Sequence[Message], **options: Any) -> GenerationResult:
        """Reply to a conversation ([{"role": ..., "content": ...}, ...]) through the model's own chat template,
        stopping at its end-of-turn token (``chat_stop_ids``) unless ``stop_token_ids`` is given."""
        result = self.generate(self.chat_prompt(messages), **self._chat_options(options))
        assert isinstance(result, GenerationResult)
        return result

    def chat_stream(self, messages: Sequence[Message], **options: Any) -> Iterator[StreamPiece]:
        """``chat``, yielding the reply's text pieces as they become final."""
        return self.stream(self.chat_prompt(messages), **self._chat_options(options))

    def chat_prompt(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """The conversation's token ids as the model's template writes them (transformers' apply_chat_template)."""
        if self.tokenizer is None:
            raise OnnxpipeError(f"{self.session.model_dir.path}: no tokenizer files, so no chat template to apply")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def chat_stop_ids(self) -> list[int]:
        """The model's end-of-sequence ids and its template's end-of-turn token (<|im_end|>, <|eot_id|>, ...)."""
        eos = self.manifest.tokenizer.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return self.tokenizer.end_of_turn_ids(eos) if self.tokenizer else eos

    def prepare(self, prompt: Prompt, **options: Any) -> RowState:
        """One prompt's generation state, checked as generate checks it (options, token ids, room in the context,
        memory), for a caller that runs the steps itself (the server's scheduler)."""
        prompts, _ = self._prompts(prompt)
        if len(prompts) != 1:
            raise OnnxpipeError("prepare takes one prompt")
        cfg = self._config(options)
        if cfg.num_beams > 1:
            raise OnnxpipeError("num_beams > 1 is not served step by step; use generate")
        rows = self._rows(prompts, cfg)
        self.check_fits(rows)
        return rows[0]

    def _chat_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if options.get("stop_token_ids") is None:
            options = {**options, "stop_token_ids": self.chat_stop_ids()}
        return options

    def check_fits(self, rows: list[RowState], batch: int | None = None) -> None:
        """Refuse, before anything is allocated, rows whose KV cache and logits cannot fit (``limits.check_fits``);
        ``batch``: the rows the cache really holds (a beam search's beams)."""
        positions = max(len(r.prompt) + r.limit for r in rows)
        check_fits(self.session, batch or len(rows), positions, max(len(r.prompt) for r in rows),
                   what="beams" if batch else "batch")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise OnnxpipeError(f"{self.session.model_dir.path}: no tokenizer files; pass prompts as token-id lists")
        return self.tokenizer.encode(text)

    # ---- the loop ----
    def prefill(self, rows: list[RowState], cache_capacity: int, want: str) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
        """Run the padded prompts: returns (attention_mask, row_lengths, cache, first step's output)."""
        s = self.session
        lengths = np.array([len(r.prompt) for r in rows], np.int64)
        width = int(lengths.max())
        if self.prefill_bucket > 1 and s.padding_side == "right":  # never past the cache it writes
            width = max(width, min(-(-width // self.prefill_bucket) * self.prefill_bucket, cache_capacity))
        pad = int(self.manifest.tokenizer.get("pad_token_id") or 0)
        ids = np.full((len(rows), width), pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            sl = slice(width - len(r.prompt), width) if s.padding_side == "left" else slice(0, len(r.prompt))
            ids[i, sl] = r.prompt
            mask[i, sl] = 1
        positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)
        last = np.full(len(rows), width - 1, np.int64) if s.padding_side == "left" else lengths - 1
        cache = s.new_cache(len(rows), capacity=cache_capacity if s.shares_buffer else None)
        out = s.forward(ids, mask, positions, cache, last_index=last, want=want)
        return mask, lengths, cache, out

    def decode_step(self, tokens: np.ndarray, mask: np.ndarray, cache: Any, want: str) -> tuple[np.ndarray, np.ndarray]:
        """Feed one new token per row: returns (the grown attention mask, the step's output)."""
        s = self.session
        if s.shares_buffer and s.padding_side == "right":
            # the graph writes row r's token at its own length: the mask stays contiguous from the left, as wide
            # as the longest row still running (a dropped long row must not carry the width past the buffer)
            n = mask.sum(axis=1) + 1
            mask = (np.arange(int(n.max()))[None, :] < n[:, None]).astype(np.int64)
        else:
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        positions = mask.sum(axis=1, keepdims=True) - 1
        out = s.forward(tokens[:, None].astype(np.int64), mask, positions, cache, want=want)
        return mask, out

    def _decode(self, rows: list[RowState], cfg: SamplingConfig) -> Iterator[list[RowState]]:
        """Prefill then decode until every row is done; yields the rows that got a token after each step."""
        capacity = max(len(r.prompt) + r.limit for r in rows)
        mask, _, cache, out = self.prefill(rows, capacity, self._want(cfg))
        # greedy through CUDA-graph slots whose steps feed themselves: rows keep their places, each grows a
        # position per step until the last row is done, so it needs room for the longest prompt + the longest limit
        fed = (self._want(cfg) == "argmax" and self.session.fed and self.session.cuda_graph and cache.capacity is not None
               and max(len(r.prompt) for r in rows) + max(r.limit for r in rows) <= cache.capacity)
        active = list(range(len(rows)))  # cache row i holds rows[active[i]]
        ahead = None  # fed steps launched ahead of their reads (``CudaGraphs.ahead``), once the steps feed themselves
        asked = False  # ``ahead`` asked for once: a session without a stream of its own has none at any step
        try:
            while fed:
                tokens = np.asarray(out, np.int64)
                live = [r for r in rows if not r.done]
                for r in live:
                    r.add(tokens[r.index])
                if not asked and self.session.can_feed(cache):
                    ahead, asked = self.session.graphs.ahead(cache), True
                if ahead is not None:  # launched before the rows go out: the consumer's time overlaps the step
                    need = max((r.limit - len(r.tokens) for r in rows if not r.done), default=0)
                    while ahead.in_flight < min(need, AHEAD_DEPTH + 1):
                        ahead.launch()
                yield live
                if all(r.done for r in rows):
                    return
                if ahead is not None:
                    out = ahead.read()
                elif self.session.can_feed(cache):
                    out = self.session.step_fed(cache)
                else:  # the first step after the prefill: its inputs go up once
                    mask, out = self.decode_step(tokens, mask, cache, "argmax")
        except BaseException:  # a failed step or a consumer that left: waited for, its own error (if any) kept
            if ahead is not None:
                ahead.drain_quietly()
                ahead = None
            raise
        finally:
            if ahead is not None:
                ahead.drain()  # nothing left running on the cache once the loop leaves
        while True:
            tokens = np.asarray(self._choose([rows[a] for a in active], out, cfg), np.int64)
            for a, t in zip(active, tokens):
                rows[a].add(t)
            yield [rows[a] for a in active]
            keep = [i for i, a in enumerate(active) if not rows[a].done]
            if not keep:
                return
            if len(keep) < len(active):  # drop finished rows from the cache, on the device
                self.session.reorder(cache, np.array(keep))
                mask, tokens = mask[keep], tokens[keep]
                active = [active[i] for i in keep]
            mask, out = self.decode_step(tokens, mask, cache, self._want(cfg))

    def _choose(self, rows: list[RowState], out: np.ndarray, cfg: SamplingConfig) -> list[int]:
        if out.ndim == 1:  # argmax came back: greedy without logits processors
            return [int(t) for t in out]
        return [next_token(out[i], cfg, r.seen(), r.rng) for i, r in enumerate(rows)]

    def _want(self, cfg: SamplingConfig) -> str:
        return "argmax" if cfg.greedy and cfg.repetition_penalty == 1.0 else "logits"

    # ---- beam search (one prompt at a time, its beams as a batch) ----
    def _beam_search(self, prompt: list[int], cfg: SamplingConfig) -> GenerationResult:
        nb = cfg.num_beams
        row = self._rows([prompt], cfg)[0]
        self.check_fits([row], batch=nb)
        stop = row.stop_ids
        capacity = len(prompt) + row.limit
        mask, _, cache, logits = self.prefill([row], capacity, "logits")
        self.session.reorder(cache, np.zeros(nb, np.int64))
        mask = np.repeat(mask, nb, axis=0)
        logits = np.repeat(logits, nb, axis=0)
        beams: list[list[int]] = [[] for _ in range(nb)]
        scores = np.array([0.0] + [-np.inf] * (nb - 1))  # all beams start equal: only the first one expands
        finished: list[tuple[float, list[int], str]] = []
        for step in range(row.limit):
            lp = np.stack([log_softmax(apply_repetition_penalty(logits[b], np.asarray(prompt + beams[b], np.int64),
                                                                cfg.repetition_penalty)) for b in range(nb)])
            cand = (scores[:, None] + lp).ravel()
            order = np.argsort(-cand, kind="stable")[: 2 * nb]
            nxt_beams, nxt_scores, src, toks = [], [], [], []
            for flat in order:
                b, t = divmod(int(flat), lp.shape[1])
                seq = beams[b] + [t]
                if t in stop:
                    finished.append((cand[flat] / len(seq) ** cfg.length_penalty, seq, "eos"))
                    continue
                nxt_beams.append(seq)
                nxt_scores.append(cand[flat])
                src.append(b)
                toks.append(t)
                if len(nxt_beams) == nb:
                    break
            best_running = max(nxt_scores) / (step + 1) ** cfg.length_penalty if nxt_scores else -np.inf
            if len(finished) >= nb and max(f[0] for f in finished) >= best_running:
                break
            if not nxt_beams or step == row.limit - 1:
                beams, scores = nxt_beams, np.array(nxt_scores)
                break
            self.session.reorder(cache, np.array(src))
            mask = mask[src]
            beams, scores = nxt_beams, np.array(nxt_scores)
            mask, logits = self.decode_step(np.array(toks), mask, cache, "logits")
        for seq, sc in zip(beams, scores):
            finished.append((sc / max(len(seq), 1) ** cfg.length_penalty, seq, "length"))
        _, best, reason = max(finished, key=lambda f: f[0])
        out = RowState(0, prompt, dataclasses.replace(cfg, repeat_ngram_limit=None), stop, row.limit, self.tokenizer)
        for t in best:
            if not out.done:
                out.add(t)
        if not out.done:
            out._finish(reason)
        return out.result()

    # ---- inputs ----
    def _prompts(self, prompt: Prompt | Sequence[Prompt]) -> tuple[list[list[int]], bool]:
        if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and all(_is_int(t) for t in prompt)):
            items, single = [prompt], True
        elif isinstance(prompt, np.ndarray) and prompt.ndim == 1:
            items, single = [prompt.tolist()], True
        else:
            try:
                items, single = list(prompt), False
            except TypeError:
                raise OnnxpipeError("a prompt must be a string, a list of token ids, or a list of those; got "
                                    f"{type(prompt).__name__}") from None
        if not items:
            raise OnnxpipeError("no prompts given")
        out = []
        for i, p in enumerate(items):
            if isinstance(p, np.ndarray):
                p = p.tolist()
            if not isinstance(p, str) and not (isinstance(p, Sequence) and all(_is_int(t) for t in p)):
                raise OnnxpipeError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
            ids = self.encode(p) if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                raise OnnxpipeError(f"prompt {i} is empty (no tokens)")
            bad = [t for t in ids if not 0 <= t < self.session.vocab_size]
            if bad:
                raise OnnxpipeError(f"prompt {i} has token ids outside the vocabulary (0..{self.session.vocab_size - 1}): {bad[:5]}")
            out.append(ids)
        return out, single

    def _config(self, options: dict[str, Any]) -> SamplingConfig:
        names = {f.name for f in dataclasses.fields(SamplingConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise OnnxpipeError(f"unknown generation option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        # max_new_tokens is a most: each row generates at most what the context leaves after its prompt
        # (finish_reason "length"), so a larger value allocates nothing more (score --task generate relies on it)
        return SamplingConfig(**options).validate()

    def _rows(self, prompts: list[list[int]], cfg: SamplingConfig) -> list[RowState]:
        stop = set(cfg.stop_token_ids if cfg.stop_token_ids is not None else self.manifest.tokenizer.get("eos_token_id") or [])
        max_len = min(cfg.max_length or self.session.max_positions, self.session.max_positions)
        rows = []
        for i, p in enumerate(prompts):
            room = max_len - len(p)
            if room < 1:
                raise OnnxpipeError(f"prompt {i} has {len(p)} tokens: no room to generate within max length {max_len}")
            rows.append(RowState(i, p, cfg, stop, min(cfg.max_new_tokens, room), self.tokenizer))
        return rows


def load(
    model_dir: str | os.PathLike[str],
    provider: str = "auto",
    *,
    trt_options: TensorRTOptions | None = None,
    threads: int | None = None,
    announce: Callable[[str], None] | None = None,
    cuda_graph: bool = False,
    last_position: bool | None = None,
    chunk_lane: bool = False,
) -> LanguageModel:
    """Open a model directory on ``provider`` (auto: TensorRT -> CUDA -> CPU). What runs is ``lm.provider``.
    cuda_graph: replay decode steps as CUDA graphs (CUDA EP, graphs of optimize --target cuda). last_position: run
    the LM head only at the position each row reads (an in-memory edit of the graph; None: where the edit is cheap,
    i.e. the weights are external or few; True: also for a large single-file model, paying its rebuild at load).
    chunk_lane: also load the graph whose decode steps read a long prompt's chunk in their own run (serve's
    ``--chunk-lane``; ``DecoderSession``)."""
    threads = check_threads(threads)
    md = ModelDir.open(model_dir)
    session = DecoderSession(md, provider, trt_options=trt_options, threads=threads, announce=announce,
                             cuda_graph=cuda_graph, last_position=last_position, chunk_lane=chunk_lane)
    return LanguageModel(session, TextTokenizer.from_dir(md.path))


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a file: one per line (blank lines skipped), or a .jsonl file of {"prompt": ...} / strings."""
    import json

    p = Path(path)
    if not p.is_file():
        raise OnnxpipeError(f"{p}: the prompts file is not a regular file" if p.exists() else f"{p}: no such prompts file")
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise OnnxpipeError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not lines:
        raise OnnxpipeError(f"{p}: no prompts (the file is empty); put one prompt per line")
    if p.suffix != ".jsonl":
        return lines
    prompts = []
    for n, ln in enumerate(lines, 1):
        try:
            item = json.loads(ln)
        except json.JSONDecodeError as e:
            raise OnnxpipeError(f"{p}:{n}: not JSON ({e.msg})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt:
            raise OnnxpipeError(f"{p}:{n}: expected a non-empty string or an object with a \"prompt\" string")
        prompts.append(prompt)
    return prompts


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` typed on a command line, as the characters they name (stop strings)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
