"""A bounded load test of `onnxpipe serve` on loopback: N concurrent streaming clients against the server started in
this process (127.0.0.1, a free port), per concurrency level: aggregate tokens/s, time to first token and
inter-token latency p50/p99; beside it the same requests served one by one (concurrency 1) and the offline figure
of onnxpipe's own generate at batch N (`onnxpipe bench`: same model, same prompt and new-token counts, same run).

    python scripts/load_test.py out/llama-stdlib --concurrency 1,2,4,8,16 --json benchmarks/results/serve-cpu.json
    python scripts/load_test.py --build-1b /data/serve-1b --provider cuda --cuda-graph --check-equal \
        --concurrency 1,8,32,64 --prompt-tokens 128 --max-tokens 128 --long-prompts 4 --streams 32 \
        --chunks auto,256,512,1024 --prefill-group 1,8 --budget-s 540 --json $OUT/serve-gpu.json

Every request is a seeded random prompt of --prompt-tokens token ids, greedy, with ``ignore_eos`` so it generates
exactly --max-tokens; each client sends --requests-per-client requests one after the other. Inter-token latency is
the gap between consecutive streamed chunks of a stream (a chunk holds one token unless a character spans several),
given twice: as written (the times the server wrote each chunk to its connection, ``app.state.stream_times``: what
the server did) and as read (the times the clients read them). They differ where a client falls behind: a read that
brings two of a stream's chunks times them together, a 0 gap, and a client that fell behind does less work per chunk
and stays behind, so that its inter-token p50 reads ~0 while the server wrote a chunk a step. The H100 run at 42c9b68
read 0.04 ms so at 32 streams through httpx (~70 us a chunk); the clients are now HTTP on asyncio streams (--client
raw, a few us a chunk; --client httpx to compare). Per-request ms/token is (last chunk - first chunk) / (tokens - 1),
as read; TTFT is from sending the request to its first text chunk. The clients run in a process of their own
(asyncio), each on a connection of its own. Each level gets a server of its own whose batch is that many requests,
and one untimed 2-token request first (first-use costs: connections, onnxruntime's first run of a shape).

--check-equal first runs the scheduler alone (no HTTP): batch (--check-rows) + 3 requests of mixed prompt lengths (the longest read
in at least 3 chunks) and mixed reply lengths served one by one, then all submitted together (they join and
leave the batch at different steps); every request must get exactly its solo tokens, else the script stops with
exit 1. With a graph of `optimize --target cuda` this is the slot layout (fixed rows of a shared KV buffer; with
--cuda-graph their decode steps replay one captured CUDA graph).

--prefill-group N[,M...] (slot layout): whole prompts read together in one prefill run, at most N (`onnxpipe serve
--prefill-group`); each level and each --chunks entry is run once per value (a column of the tables), so the runs of
one call compare on one card. --check-equal runs with the largest value. A run of several prompts is exact against
solo runs on the CPU, and there a difference still fails the check; on a GPU a batched run may round differently
from a run of one, so there the check reports agreement instead (requests identical, tokens equal position by
position, where each request first differs) and goes on.

--long-prompts N: while --streams streams decode, N prompts of --long-prompt-tokens arrive at once; the running
streams' inter-token latency before they came (quiet) and while they were read (from their arrival to the last one's
first token), per --chunks entry (the scheduler's prefill budget: a fixed number of tokens, or `auto`, sized from the
measured decode step and prefill times; the table gives the mean tokens a chunk read). Target: the p99 while they
are read under 2x the quiet p50. The streams then go on for AFTER_GAPS more chunks each (the after window): their
step at the contexts the read left them at, which the quiet p50 (taken before, at their shortest) understates. After the tables, the slowest iterations while they were read (the scheduler's
trace, ``loop.TRACE_MORE``): each one's time from the last step's end split into between, admission, prefill and
step, and what it did (prompt tokens, admissions, a lane chunk, fed or host-fed, rows before and after).

--chunk-graphs on,off (with --cuda-graph): the long prompts' chunks replayed through CUDA graphs captured per (row,
chunk width), or run outside any graph (`onnxpipe serve --chunk-graphs/--no-chunk-graphs`; off by default until
a GPU run has checked them); each --chunks entry runs once per value, and the table gives the chunks that went through a graph (the
server's `graph_chunks`) and why the others did not (its `chunk_graph_skipped`: "row" outside the graph rows, a key
of cuda_graphs.CHUNK_SKIPS, "failed"). With chunk graphs on, --check-equal also runs with a fixed chunk of 32 tokens,
so that its longer prompts are read in chunks through them (with `auto` its prompts, at most 128 tokens, are read
whole), and those longer than 32 tokens take the graph rows (the server's: longer than 512).

--chunk-lane on,off (with --cuda-graph, on rows with chunk graphs on): a long prompt's chunks before its last read
inside the running batch's fed decode step, one run for both (`onnxpipe serve --chunk-lane`); the table gives the
chunks read so (the server's `lane_chunks`) and why others were not (`lane_skipped`). With it on, --check-equal also
runs with the lane (a fixed chunk of 32: its prompts' chunks before their last ride in the steps).

--build-1b WORKDIR builds the model first (each stage skipped where its output is already there): a random
Llama-3.2-1B-shaped checkpoint in bf16, made on the meta device and initialised in place (as
scripts/measure_scale.py builds its checkpoints; std 0.1 so greedy tokens are not near-ties), with a word-level
tokenizer over the whole vocabulary (every token decodes to a word, so every streamed chunk is one token), then
`onnxpipe export --dtype fp16` and `onnxpipe optimize --level 3 --target cuda`, each in a child process (their checks
skipped unless --build-verify: the parity checks of a 1B model on the CPU outlast a bounded run).
--budget-s bounds the whole run: work that would start after it is left out (and said so), a stage or level still
running when it ends is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import numpy as np

LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                   tie_word_embeddings=True)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, what: str) -> bool:
        if self.left() > 1:
            return True
        self.skipped.append(what)
        print(f"budget spent: {what} left out", file=sys.stderr)
        return False


# ---- the model ----
def build_1b(workdir: Path, config: dict[str, Any], budget: Budget, verify: bool) -> Path:
    hf, exported, optimized = workdir / "hf", workdir / "exported", workdir / "cuda"
    stages = [("checkpoint", hf / "config.json"), ("export", exported / "onnxpipe.json"),
              ("optimize", optimized / "onnxpipe.json")]
    for stage, done in stages:
        if done.is_file():
            print(f"build: {stage} already in {done.parent}", file=sys.stderr)
            continue
        if not budget.allows(f"build stage {stage}"):
            raise SystemExit(f"the budget ended before the model was built ({stage}); rerun to go on")
        onnxpipe = [sys.executable, "-m", "onnxpipe"]
        cmd = {"checkpoint": [sys.executable, __file__, "--build-child", json.dumps({"out": str(hf), "config": config})],
               "export": onnxpipe + ["export", str(hf), "-o", str(exported), "--dtype", "fp16", "--force"]
               + ([] if verify else ["--no-verify"]),
               "optimize": onnxpipe + ["optimize", str(exported), "-o", str(optimized), "--level", "3", "--target",
                                       "cuda", "--force"] + ([] if verify else ["--skip-verify"])}[stage]
        t = time.perf_counter()
        try:
            subprocess.run(cmd, check=True, timeout=max(budget.left(), 1))
        except subprocess.TimeoutExpired:
            raise SystemExit(f"the budget ended while building ({stage}); rerun to go on") from None
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"building the model failed at {stage} (exit {e.returncode})") from None
        print(f"build: {stage} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return optimized


def write_checkpoint(out: Path, config: dict[str, Any]) -> None:
    """A random bf16 Llama checkpoint, built on the meta device and initialised in place (never in fp32), with a
    word-level tokenizer over its whole vocabulary ("t0" ... "tN"); written beside ``out`` and moved into place."""
    import shutil

    from measure_scale import random_bf16_model  # beside this file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = AutoConfig.for_model("llama", **config, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16")
    model = random_bf16_model(cfg, std=0.1)  # scripts/measure_scale.py's: std 0.1, so greedy tokens are not ties
    model.save_pretrained(tmp)
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t3", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(tmp)
    tmp.rename(out)


# ---- the check ----
def prefill_chunk(text: str) -> int | str:
    """A --prefill-chunk / --chunks entry: a positive number of tokens or `auto`."""
    if text.strip().lower() == "auto":
        return "auto"
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a prefill chunk is a positive integer or 'auto', got {text!r}")
    return int(text)


def check_equal(lm: Any, make: Any, rows: int, max_length: int, prefill_chunk: int | str,
                rng: np.random.Generator, exact: bool = True) -> str:
    """Concurrent requests against the same requests one by one, through the scheduler alone (``make(chunk)``);
    raises SystemExit where they differ and ``exact`` (else the agreement is reported). rows + 3 requests, so rows
    are reused; the longest prompt is read in at least 3 chunks (a fixed chunk; `auto` sizes its own)."""
    import queue

    lengths = [int(n) for n in np.linspace(4, max(8, max_length // 2), rows + 3)]
    if isinstance(prefill_chunk, int):
        prefill_chunk = min(prefill_chunk, max(4, lengths[-1] // 3))
    sched = make(prefill_chunk)
    news = [8 + (7 * i) % 40 for i in range(len(lengths))]
    news = [min(n, max_length - p) for n, p in zip(news, lengths)]
    prompts = [rng.integers(3, lm.session.vocab_size, n).tolist() for n in lengths]

    def submit(prompt: list[int], n: int) -> "queue.Queue[Any]":
        q: queue.Queue[Any] = queue.Queue()
        sched.submit(lm.prepare(prompt, max_new_tokens=n, stop_token_ids=[]),
                     lambda e: q.put(e) if e[0] in ("done", "error") else None)
        return q

    def tokens(q: "queue.Queue[Any]") -> list[int]:
        kind, value = q.get(timeout=600)
        if kind != "done":
            raise SystemExit(f"check-equal: a request failed: {value}")
        return value.token_ids

    sched.start()
    try:
        solo = [tokens(submit(p, n)) for p, n in zip(prompts, news)]
        together = [submit(p, n) for p, n in zip(prompts, news)]
        got = [tokens(q) for q in together]
    finally:
        sched.stop()
    bad = [i for i, (a, b) in enumerate(zip(solo, got)) if a != b]
    group = getattr(sched, "prefill_group", 1)
    if bad and exact:
        i = bad[0]
        first = next(k for k, (a, b) in enumerate(zip(solo[i], got[i])) if a != b) if solo[i][:1] else 0
        raise SystemExit(f"check-equal FAILED: {len(bad)}/{len(solo)} requests differ from solo; request {i} "
                         f"(prompt {lengths[i]} tokens) first at token {first}: solo {solo[i][first:first + 5]} "
                         f"concurrent {got[i][first:first + 5]}")
    if bad:  # not promised here (a prefill of several prompts on a GPU): how far they agree
        return f"check-equal (prefill group {group}, exactness not promised): " + agreement(solo, got, lengths)
    library = sum(lm.generate(p, max_new_tokens=n, stop_token_ids=[]).token_ids == s
                  for p, n, s in zip(prompts, news, solo))
    return (f"check-equal: {len(solo)} requests ({sum(map(len, solo))} tokens; prompts {min(lengths)}-"
            f"{max(lengths)} tokens, chunk {prefill_chunk}, prefill group {group}: {sched.stats.prefill_chunks} "
            "prefill runs) concurrent == solo; "
            f"{sched.stats.max_running} decoded "
            f"together at most; solo == lm.generate for {library}/{len(solo)} (information only)"
            + (f"; {sched.stats.graph_chunks} chunks through CUDA graphs" if sched.stats.graph_chunks else "")
            + (f"; chunks uncaptured, by why: {skips(getattr(sched.stats, 'chunk_graph_skipped', {}))}"
               if getattr(sched.stats, "chunk_graph_skipped", None) else "")
            + (f"; a chunk graph failed (chunks then ran uncaptured): {sched.stats.chunk_graph_error}"
               if getattr(sched.stats, "chunk_graph_error", "") else "")
            + (f"; {sched.stats.lane_chunks} chunks read inside decode steps (lane)"
               + (f", others apart by why: {skips(sched.stats.lane_skipped)}" if sched.stats.lane_skipped else "")
               if getattr(sched, "lane", False) else "")
            + ("; the CUDA graph was not captured on the loop's thread (its steps ran uncaptured): "
               f"{sched.stats.capture_error}" if sched.stats.capture_error else ""))


def skips(counts: dict[str, int]) -> str:
    """Chunks that ran outside a chunk graph, by why (the server's ``chunk_graph_skipped``): "row 64, bound 3"."""
    return ", ".join(f"{why} {n}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n) or "none"


def skipped_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """The chunks that ran outside a chunk graph between two /health stats, by why."""
    was, now = before.get("chunk_graph_skipped") or {}, after.get("chunk_graph_skipped") or {}
    return {why: n - was.get(why, 0) for why, n in now.items() if n > was.get(why, 0)}


def agreement(solo: list[list[int]], got: list[list[int]], lengths: list[int]) -> str:
    """How far concurrent tokens agree with solo ones: requests identical, tokens equal position by position, and
    where each differing request first differs (greedy tokens after a first difference follow another context)."""
    equal = sum(a == b for s, g in zip(solo, got) for a, b in zip(s, g))
    total = sum(max(len(s), len(g)) for s, g in zip(solo, got))
    firsts = [(next((k for k, (a, b) in enumerate(zip(s, g)) if a != b), min(len(s), len(g))), i)
              for i, (s, g) in enumerate(zip(solo, got)) if s != g]
    same = len(solo) - len(firsts)
    where = ", ".join(f"request {i} (prompt {lengths[i]}) at token {k}" for k, i in sorted(firsts)[:5])
    return (f"{same}/{len(solo)} requests identical to solo; {equal}/{total} tokens ({equal / max(total, 1):.1%}) "
            f"equal position by position" + (f"; first differences: {where}" if firsts else ""))


# ---- the clients ----
CLIENTS = ("raw", "httpx")


def sse_event(event: bytes, now: float, times: list[float]) -> int:
    """One server-sent event of a completion stream: a chunk with text appends ``now`` to ``times``; the usage
    chunk's completion tokens are returned (0 for any other); an error chunk raises."""
    if not event.startswith(b"data: ") or event == b"data: [DONE]":
        return 0
    chunk = json.loads(event[6:])
    if "error" in chunk:
        raise RuntimeError(chunk["error"]["message"])
    if chunk.get("usage"):
        return int(chunk["usage"]["completion_tokens"])
    if chunk["choices"] and chunk["choices"][0]["text"]:
        times.append(now)
    return 0


class Connection:
    """A client's connection to the server, kept alive for its requests, one after the other. ``raw``: HTTP/1.1 on
    asyncio streams, the chunked body and its server-sent events taken apart here (a few us a chunk); ``httpx``: an
    httpx AsyncClient (its lines through its layers: ~70 us a chunk on the 2-core machine, so 32 streams at a ~2 ms
    step were more than a core's work; a client behind the server reads a stream's chunks several at a time and
    times them together, a 0 gap: see the module's note)."""

    def __init__(self, base: str, client: str = "raw"):
        if client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}, got {client!r}")
        self.base, self.client = base, client
        self._http: Any = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "Connection":
        if self.client == "httpx":
            import httpx

            self._http = await httpx.AsyncClient(timeout=600).__aenter__()
        else:
            host, port = self.base.rsplit("/", 1)[1].rsplit(":", 1)
            self._reader, self._writer = await asyncio.open_connection(host, int(port))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._http is not None:
            await self._http.__aexit__(*exc)
        if self._writer is not None:
            self._writer.close()

    async def complete(self, payload: dict[str, Any], times: list[float] | None = None) -> dict[str, Any]:
        """One streaming completion: its chunks with text timed as they are read (appended to ``times`` as they
        come, where given), TTFT from the request's sending, per-token time from the first chunk to the last."""
        times = [] if times is None else times
        sent = time.perf_counter()
        tokens = await (self._httpx(payload, times) if self._http is not None else self._raw(payload, times))
        tpot = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else float("nan")
        return {"sent": sent, "ttft": times[0] - sent if times else float("nan"), "times": times, "tokens": tokens,
                "tpot": tpot}

    async def _httpx(self, payload: dict[str, Any], times: list[float]) -> int:
        tokens = 0
        async with self._http.stream("POST", self.base + "/v1/completions", json=payload) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                tokens = sse_event(line.encode(), time.perf_counter(), times) or tokens
        return tokens

    async def _raw(self, payload: dict[str, Any], times: list[float]) -> int:
        assert self._reader is not None and self._writer is not None
        reader, data = self._reader, json.dumps(payload).encode()
        self._writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: load-test\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        status = head.split(b" ", 2)[1].decode()
        if status != "200":
            length = head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0] if b"content-length:" in head else b"0"
            raise RuntimeError(f"HTTP {status}: {(await reader.readexactly(int(length)))[:200]!r}")
        if b"transfer-encoding: chunked" not in head:
            raise RuntimeError("the server's stream is not a chunked body")
        tokens, events = 0, b""
        while True:  # the chunks of the body, until the empty one that ends it
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            part = await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                return tokens
            now = time.perf_counter()
            *whole, events = (events + part[:-2]).split(b"\n\n")  # events end with a blank line
            for event in whole:
                tokens = sse_event(event, now, times) or tokens


async def health(base: str) -> dict[str, Any]:
    """The server's /health, on a connection of its own."""
    host, port = base.rsplit("/", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: load-test\r\nConnection: close\r\n\r\n")
        return json.loads((await reader.read()).split(b"\r\n\r\n", 1)[1])
    finally:
        writer.close()


def server_gaps(stream_times: list[tuple[int, list[float]]], lo: float, hi: float,
                prompt_tokens: int | None = None) -> list[float]:
    """The gaps between consecutive text chunks of each stream as the server wrote them (``app.state.stream_times``:
    per stream, its prompt's tokens and its write times, perf_counter seconds, the clock of the client process's
    times), those whose both ends lie in [lo, hi]; only streams of ``prompt_tokens`` prompt tokens where given. A
    client's read may bring several chunks at once (a client that falls behind reads them together, at one time):
    these gaps are the server's own, whatever the client's reads join."""
    gaps: list[float] = []
    for n, times in stream_times:
        if prompt_tokens is None or n == prompt_tokens:
            t = np.asarray([x for x in times if lo <= x <= hi])
            gaps += np.diff(t).tolist()
    return gaps


def body(prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


async def level(base: str, concurrency: int, prompts: list[list[int]], max_tokens: int,
                client: str = "raw") -> dict[str, Any]:
    """``concurrency`` clients, each on a connection of its own sending its share of ``prompts`` one after the other,
    after one untimed request; the timed window on perf_counter's clock (the server's too) and this process's CPU
    seconds in it."""
    queue = list(prompts)
    results: list[dict[str, Any]] = []

    async def client_loop() -> None:
        async with Connection(base, client) as conn:
            while queue:
                results.append(await conn.complete(body(queue.pop(), max_tokens)))

    async with Connection(base, client) as conn:
        await conn.complete(body(prompts[0][:8], 2))  # untimed: first-use costs
    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    server = (await health(base))["stats"]  # steps, fed and overlapped steps
    gaps = [g for r in results for g in np.diff(r["times"])]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "client": client, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "start": start, "end": start + wall, "client_cpu_s": cpu, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99), "itl_p50_ms": 1e3 * percentile(gaps, 50),
            "itl_p99_ms": 1e3 * percentile(gaps, 99), "tpot_p50_ms": 1e3 * percentile([r["tpot"] for r in results], 50),
            "tpot_p99_ms": 1e3 * percentile([r["tpot"] for r in results], 99),
            "chunks_with_text": sum(len(r["times"]) for r in results), "server_stats": server}  # < tokens: the server joined pieces


AFTER_GAPS = 32  # chunks each stream reads after the long prompts' read (the after window)
AFTER_WAIT_S = 30.0  # at most this long


async def interference(base: str, streams: list[list[int]], stream_tokens: int, longs: list[list[int]],
                       long_tokens: int, warm_tokens: int, client: str = "raw") -> dict[str, Any]:
    """Streams decode; once each has ``warm_tokens`` chunks the long prompts arrive together; once the last of them
    has its first token the streams are closed (the server drops them). Quiet gaps: after every stream had its first
    token (no stream's prompt being read any more) and before the long prompts came; while read: from their arrival
    to the last one's first token."""
    async with Connection(base, client) as conn:
        await conn.complete(body(streams[0][:8], 2))  # untimed: first-use costs
    live: list[list[float]] = [[] for _ in streams]  # each stream's chunk times, as they come

    async def stream(i: int) -> None:
        async with Connection(base, client) as conn:
            await conn.complete(body(streams[i], stream_tokens), live[i])

    async def long(prompt: list[int]) -> dict[str, Any]:
        async with Connection(base, client) as conn:
            return await conn.complete(body(prompt, long_tokens))

    tasks = [asyncio.create_task(stream(i)) for i in range(len(streams))]
    while min(len(t) for t in live) < warm_tokens and not any(t.done() for t in tasks):
        await asyncio.sleep(0.002)
    before = (await health(base))["stats"]
    sent = time.perf_counter()
    long_results = await asyncio.gather(*(long(p) for p in longs))
    read = max(r["sent"] + r["ttft"] for r in long_results)  # the last long prompt's first token
    after = (await health(base))["stats"]  # a few decode steps after the read
    # the streams go on for AFTER_GAPS more chunks each: their quiet step at the contexts the read left them at
    counts = [len(t) for t in live]
    while (any(len(t) < n + AFTER_GAPS for t, n in zip(live, counts)) and not all(t.done() for t in tasks)
           and time.perf_counter() - read < AFTER_WAIT_S):
        await asyncio.sleep(0.002)
    for task in tasks:  # closes their connections: the server drops them
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    started = max(t[0] for t in live if t)  # every stream decoding from here
    quiet, during, later, late = [], [], [], 0
    for times in live:
        t = np.asarray(times)
        if len(t) < 2:
            continue
        gaps, ends = np.diff(t), t[1:]
        quiet += gaps[(ends <= sent) & (t[:-1] >= started)].tolist()
        during += gaps[(ends > sent) & (ends <= read)].tolist()
        later += gaps[t[:-1] > read].tolist()
        late += int(t[-1] < read)
    chunks = after["prefill_chunks"] - before["prefill_chunks"]
    return {"streams": len(streams), "long_prompts": len(longs), "long_prompt_tokens": len(longs[0]),
            "t_started": started, "t_sent": sent, "t_read": read, "read_s": read - sent, "quiet_gaps": len(quiet), "during_gaps": len(during),
            "read_chunks": chunks, "read_graph_chunks": after.get("graph_chunks", 0) - before.get("graph_chunks", 0),
            # the read's chunks that ran outside a chunk graph, by why (a key of cuda_graphs.CHUNK_SKIPS, "row",
            # "failed")
            "read_graph_skipped": skipped_between(before, after),
            "read_tokens_per_chunk": (after["prefill_tokens"] - before["prefill_tokens"])
            / max(chunks, 1), "read_steps": after["steps"] - before["steps"],
            "streams_done_before_read": late,
            "quiet_p50_ms": 1e3 * percentile(quiet, 50), "quiet_p99_ms": 1e3 * percentile(quiet, 99),
            "during_p50_ms": 1e3 * percentile(during, 50), "during_p99_ms": 1e3 * percentile(during, 99),
            "after_gaps": len(later), "after_p50_ms": 1e3 * percentile(later, 50) if later else float("nan"),
            "long_ttft_p50_ms": 1e3 * percentile([r["ttft"] for r in long_results], 50),
            "long_ttft_max_ms": 1e3 * max(r["ttft"] for r in long_results)}


@contextlib.contextmanager
def gc_pauses() -> Iterator[list[tuple[float, float, int]]]:
    """The garbage collector's runs in this process (the server's) while the block runs: (start, seconds,
    generation); perf_counter seconds, the clock the client process's times are on."""
    pauses: list[tuple[float, float, int]] = []
    started: dict[str, float] = {}

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            pauses.append((started["t"], time.perf_counter() - started.pop("t"), info["generation"]))

    gc.callbacks.append(callback)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(callback)


def iteration_profile(trace: list[tuple[Any, ...]], pauses: list[tuple[float, float, int]],
                      row: dict[str, Any]) -> dict[str, Any]:
    """Where the scheduler's iterations went (its trace: start, prompt tokens read, prefill s, decode step s, rows
    decoded), quiet (every stream decoding, before the long prompts) against while they were read; the decode
    steps of the read's first and last tenth (what the streams' and the prompts' growing contexts cost); the
    garbage collector's pauses while they were read."""
    def window(lo: float, hi: float) -> list[tuple[Any, ...]]:
        return [t for t in trace if lo <= t[0] < hi]

    quiet, read = window(row["t_started"], row["t_sent"]), window(row["t_sent"], row["t_read"])
    ms = lambda values, q: 1e3 * percentile(list(values), q)  # noqa: E731
    tenth = max(len(read) // 10, 1)
    gcs = [p for p in pauses if row["t_sent"] <= p[0] < row["t_read"]]
    return {"quiet_iterations": len(quiet), "quiet_step_p50_ms": ms((t[3] for t in quiet), 50),
            "read_iterations": len(read), "read_tokens_mean": float(np.mean([t[1] for t in read])) if read else 0.0,
            "read_prefill_p50_ms": ms((t[2] for t in read), 50), "read_prefill_p99_ms": ms((t[2] for t in read), 99),
            "read_step_p50_ms": ms((t[3] for t in read), 50), "read_step_p99_ms": ms((t[3] for t in read), 99),
            "read_iteration_p50_ms": ms((t[2] + t[3] for t in read), 50),
            "read_iteration_p99_ms": ms((t[2] + t[3] for t in read), 99),
            "read_step_first_tenth_ms": ms((t[3] for t in read[:tenth]), 50),
            "read_step_last_tenth_ms": ms((t[3] for t in read[-tenth:]), 50),
            "read_rows_decoded_p50": percentile([t[4] for t in read], 50),
            "gc_pauses": len(gcs), "gc_ms": 1e3 * sum(p[1] for p in gcs),
            "gc_max_ms": 1e3 * max((p[1] for p in gcs), default=0.0),
            "read_slowest": slowest_iterations(read)}


def slowest_iterations(read: list[tuple[Any, ...]], k: int = 6) -> list[dict[str, Any]]:
    """The ``k`` iterations of ``read`` that kept the running streams waiting longest, from the last one's end to
    their step's (loop.TRACE_MORE: the time between iterations, admission, then prefill and step), with what each
    did: what a p99 over a read of a few hundred iterations is made of."""
    from onnxpipe.serve.loop import TRACE_MORE

    rows = []
    for t in read:
        if len(t) < 5 + len(TRACE_MORE):
            return []
        more = dict(zip(TRACE_MORE, t[5:]))
        total = more["gap_s"] + more["admit_s"] + t[2] + t[3]
        rows.append({"ms": round(1e3 * total, 2), "between_ms": round(1e3 * more["gap_s"], 2),
                     "admit_ms": round(1e3 * more["admit_s"], 2), "prefill_ms": round(1e3 * t[2], 2),
                     "step_ms": round(1e3 * t[3], 2), "tokens": t[1], "rows": t[4], "rows_after": more["rows_after"],
                     "admitted": more["admitted"], "fed": more["fed"], "overlapped": more["overlapped"],
                     "lane": more["lane"]})
    return sorted(rows, key=lambda r: -r["ms"])[:k]


def in_client_process(budget_s: float, fn: Any, *args: Any) -> dict[str, Any] | None:
    """``fn(*args)`` (a coroutine function) in a process of its own, so its timing is not held up by the server's
    threads; None when it outlasts ``budget_s`` (then stopped)."""
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply_async(run_coroutine, (fn, *args)).get(timeout=max(budget_s, 1))
    except multiprocessing.TimeoutError:
        return None
    finally:
        pool.terminate()


def run_coroutine(fn: Any, *args: Any) -> dict[str, Any]:
    return asyncio.run(fn(*args))


# ---- the run ----
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, nargs="?")
    p.add_argument("--build-1b", type=Path, default=None, metavar="WORKDIR",
                   help="build the random Llama-3.2-1B-shaped model there (CUDA form) and serve it")
    p.add_argument("--build-config", type=Path, default=None, help="JSON of config fields to change in the 1B shape")
    p.add_argument("--build-verify", action="store_true", help="run export's and optimize's checks while building")
    p.add_argument("--build-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels (1-64); '' for none")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=None, help="the server's batch [each level: its concurrency]")
    p.add_argument("--prefill-chunk", type=prefill_chunk, default="auto",
                   help="prompt tokens an iteration reads, or auto (sized from the measured step and prefill times)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens a fixed row holds (CUDA form) [what the requests of the run need]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--provider", default="cpu")
    p.add_argument("--cuda-graph", action="store_true", help="decode steps as CUDA graphs (CUDA EP, CUDA form)")
    p.add_argument("--check-equal", action="store_true", help="first check concurrent == solo tokens (exit 1 if not)")
    p.add_argument("--check-rows", type=int, default=None,
                   help="the batch --check-equal runs [--max-batch, else the largest level]; on a CPU every solo step "
                        "of the slot layout runs all rows")
    p.add_argument("--long-prompts", type=int, default=0, help="long prompts arriving while --streams decode")
    p.add_argument("--long-prompt-tokens", type=int, default=4096)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--stream-tokens", type=int, default=512,
                   help="new tokens of each running stream, at most (closed once the long prompts are read)")
    p.add_argument("--chunks", default="auto,256,1024",
                   help="prefill chunks (token counts or auto) to run the long-prompt mode with")
    p.add_argument("--budget-s", type=float, default=3600.0, help="bound on the whole run's time")
    p.add_argument("--prefill-group", default="",
                   help="comma-separated: whole prompts read in one prefill run, at most (slot layout); each level "
                        "and --chunks entry runs once per value [the server's default]")
    p.add_argument("--chunk-graphs", default="",
                   help="comma-separated on/off: long prompts' chunks through CUDA graphs (--cuda-graph); each --chunks "
                        "entry runs once per value [the server's default: off]")
    p.add_argument("--chunk-lane", default="",
                   help="comma-separated on/off: long prompts' chunks inside the decode steps (with chunk graphs on); "
                        "each --chunks entry runs once per value [the server's default: off]")
    p.add_argument("--client", choices=CLIENTS, default="raw",
                   help="the streaming clients: raw (HTTP on asyncio streams, a few us a chunk) or httpx (~70 us a "
                        "chunk: at 32 streams it falls behind the server and times chunks read together 0 apart)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.build_child:  # the checkpoint, in a process of its own (torch)
        spec = json.loads(args.build_child)
        write_checkpoint(Path(spec["out"]), spec["config"])
        return 0
    budget = Budget(args.budget_s)
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        chunks = [prefill_chunk(c) for c in args.chunks.split(",") if c.strip()] if args.long_prompts else []
        groups: list[int | None] = [int(g) for g in args.prefill_group.split(",") if g.strip()] or [None]
    except (ValueError, argparse.ArgumentTypeError):
        p.error("--concurrency and --prefill-group are comma-separated integers, --chunks comma-separated integers "
                "or auto")
    switch = {"on": True, "off": False}
    if any(v.strip().lower() not in switch for v in args.chunk_graphs.split(",") if v.strip()):
        p.error("--chunk-graphs takes on, off or both (on,off)")
    graphed: list[bool | None] = [switch[v.strip().lower()] for v in args.chunk_graphs.split(",") if v.strip()] or [None]
    if any(v.strip().lower() not in switch for v in args.chunk_lane.split(",") if v.strip()):
        p.error("--chunk-lane takes on, off or both (on,off)")
    laned: list[bool | None] = [switch[v.strip().lower()] for v in args.chunk_lane.split(",") if v.strip()] or [None]
    if any(laned) and True not in graphed:
        p.error("--chunk-lane rides on chunk graphs: give --chunk-graphs on")
    if any(g is not None and not 1 <= g <= 64 for g in groups):
        p.error("--prefill-group values must be 1..64")
    if any(not 1 <= c <= 64 for c in levels) or not 1 <= args.requests_per_client <= 16:
        p.error("concurrency levels must be 1..64 and --requests-per-client 1..16 (a bounded test)")
    if args.long_prompts and (not 1 <= args.streams <= 64 or not 1 <= args.long_prompts <= 16):
        p.error("--streams must be 1..64, --long-prompts 1..16")
    if args.check_rows is not None and not 1 <= args.check_rows <= 64:
        p.error("--check-rows must be 1..64")
    if (args.model_dir is None) == (args.build_1b is None):
        p.error("give a model directory or --build-1b WORKDIR")
    if args.build_1b:
        config = dict(LLAMA_32_1B)
        if args.build_config:
            config.update(json.loads(args.build_config.read_text()))
        args.model_dir = build_1b(args.build_1b, config, budget, args.build_verify)

    from onnxpipe.runtime.bench import bench
    from onnxpipe.runtime.generate import load
    from onnxpipe.serve.app import ServerThread, create_app, gc_freeze_wanted
    from onnxpipe.serve.scheduler import make_scheduler

    lm = load(args.model_dir, args.provider, threads=args.threads, cuda_graph=args.cuda_graph,
              last_position=True, announce=lambda m: print(m, file=sys.stderr),  # as `onnxpipe serve` loads it
              chunk_lane=any(laned))
    if any(laned) and lm.session.lane is None:  # said, and the rows without it still run
        print(f"--chunk-lane: the session has no lane ({lm.session.lane_why_not}); its rows are left out",
              file=sys.stderr)
        laned = [v for v in laned if not v] or [None]
    slots = lm.session.shares_buffer
    # the rows' length (slot layout): what each mode's requests need, unless --max-length
    level_length = args.max_length or args.prompt_tokens + args.max_tokens
    long_length = args.max_length or max(args.long_prompt_tokens + 8, args.prompt_tokens + args.stream_tokens)
    if args.long_prompts and args.long_prompt_tokens + 1 > lm.session.max_positions:
        p.error(f"--long-prompt-tokens {args.long_prompt_tokens}: {args.model_dir} holds at most "
                f"{lm.session.max_positions} positions (its config's max_position_embeddings), and each long prompt "
                f"needs room for one new token")
    layout = f"slot layout{' (CUDA graphs)' if lm.session.cuda_graph else ''}" if slots else "concat layout"
    print(f"{args.model_dir} on {lm.provider}: {layout}", file=sys.stderr)
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {"provider": lm.provider, "layout": layout, "client": args.client,
                              "lane_why_not": lm.session.lane_why_not}

    if not slots and groups != [None]:
        p.error("--prefill-group reads prompts into the fixed rows of the slot layout (optimize --target cuda)")

    if graphed != [None] and not (slots and lm.session.cuda_graph):
        p.error("--chunk-graphs replays chunks as CUDA graphs: it needs --cuda-graph and the CUDA form")

    def server(batch: int, chunk: int | str, length: int, group: int | None, graphs: bool | None = None,
               lane: bool | None = None) -> Any:
        return create_app(lm, "model", max_batch=batch, max_queue=256, prefill_chunk=chunk,
                          max_length=length if slots else None,
                          prefill_group=None if group is None else min(group, batch), chunk_graphs=graphs,
                          chunk_lane=lane, freeze_gc=gc_freeze_wanted())  # as onnxpipe serve

    if args.check_equal and budget.allows("check-equal"):
        rows = args.check_rows or args.max_batch or max(levels + [4])
        length = level_length if slots else lm.session.max_positions

        group = max((g for g in groups if g is not None), default=None)

        def make(chunk: int | str, graphs: bool | None = None, lane: bool | None = None) -> Any:
            return make_scheduler(lm, max_batch=rows, max_queue=256, prefill_chunk=chunk,
                                  max_length=length if slots else None,
                                  prefill_group=None if group is None else min(group, rows),
                                  **({} if graphs is None else {"chunk_graphs": graphs}),
                                  **({} if lane is None else {"chunk_lane": lane}))

        # a prefill of several prompts is exact against solo ones on the CPU only (docs/serve.md, "On a GPU")
        exact = lm.session.device == "cpu" or (group or 1) == 1
        report["check_equal"] = check_equal(lm, make, rows, min(length, 1024), args.prefill_chunk, rng, exact)
        print(report["check_equal"], file=sys.stderr)
        if slots and lm.session.cuda_graph and lm.session.last_position and any(g is not False for g in graphed):
            # chunks through the chunk graphs: prompts longer than a fixed chunk of 32 are read in chunks
            def graph_rows(chunk: int | str) -> Any:  # its prompts read in chunks (longer than 32) take the graph rows
                sched = make(chunk, True)
                sched.graph_row_tokens = 32
                return sched

            report["check_equal_chunk_graphs"] = check_equal(lm, graph_rows, rows, min(length, 1024), 32, rng, exact)
            print(report["check_equal_chunk_graphs"], file=sys.stderr)
        if any(laned):
            def lane_rows(chunk: int | str) -> Any:  # as graph_rows, their chunks before the last in the steps
                sched = make(chunk, True, True)
                sched.graph_row_tokens = 32
                return sched

            # on a GPU a step's GEMMs over B + W tokens may round differently from B alone: agreement reported
            report["check_equal_chunk_lane"] = check_equal(lm, lane_rows, rows, min(length, 1024), 32, rng,
                                                           exact and lm.session.device == "cpu")
            print(report["check_equal_chunk_lane"], file=sys.stderr)

    rows = []
    for c in levels:
        if not budget.allows(f"concurrency {c}"):
            break
        offline = bench(lm, [c], prompt_tokens=args.prompt_tokens, new_tokens=args.max_tokens, repeats=1)[0]
        prompts = rng.integers(0, lm.session.vocab_size, (c * args.requests_per_client, args.prompt_tokens)).tolist()
        ran: set[int | None] = set()
        for group in groups:  # the same prompts for each value
            group = None if group is None else min(group, args.max_batch or c)  # at most the batch
            if group in ran:
                continue
            ran.add(group)
            if group is not None and not budget.allows(f"concurrency {c}, prefill group {group}"):
                break
            app = server(args.max_batch or c, args.prefill_chunk, level_length, group)
            app.state.stream_times = written = []  # the server's write times of every stream
            with ServerThread(app, host="127.0.0.1") as s:
                row = in_client_process(budget.left(), level, s.url, c, prompts, args.max_tokens, args.client)
            if row is None:
                budget.skipped.append(f"concurrency {c}, prefill group {group} (stopped)")
                break
            gaps = server_gaps(written, row["start"], row["end"])
            row["server_itl_p50_ms"] = 1e3 * percentile(gaps, 50)
            row["server_itl_p99_ms"] = 1e3 * percentile(gaps, 99)
            row["offline_tokens_per_s"] = offline.tokens_per_s
            row["prefill_group"] = getattr(app.state.scheduler, "prefill_group", None)
            row["prefill_runs"] = app.state.scheduler.stats.prefill_chunks
            rows.append(row)
            print(f"concurrency {c}, prefill group {row['prefill_group']}: {row['tokens_per_s']:.0f} tok/s, "
                  f"{row['prefill_runs']} prefill runs", file=sys.stderr)
            if row["chunks_with_text"] < row["tokens"] // 2:  # the latencies are read from text chunks
                print(f"concurrency {c}: only {row['chunks_with_text']} of {row['tokens']} tokens came with text (the "
                      f"model's tokenizer decodes these ids to nothing), so its TTFT and inter-token columns are not "
                      f"per token; tokens/s still is", file=sys.stderr)
    report["levels"] = rows

    long_rows, drawn = [], {}
    for chunk, group, graphs, lane in [(c, g, v, ln) for c in chunks for g in groups for v in graphed for ln in laned
                                       if not (ln and not v)]:
        if not budget.allows(f"long prompts, chunk {chunk}, prefill group {group}, chunk graphs {graphs}, "
                             f"lane {lane}"):
            break
        if chunk not in drawn:  # the same prompts for each prefill group
            drawn[chunk] = (rng.integers(0, lm.session.vocab_size, (args.streams, args.prompt_tokens)).tolist(),
                            rng.integers(0, lm.session.vocab_size, (args.long_prompts, args.long_prompt_tokens)).tolist())
        streams, longs = drawn[chunk]
        app = server(args.streams + args.long_prompts, chunk, long_length, group, graphs, lane)
        trace: deque[tuple[Any, ...]] = deque(maxlen=1 << 16)
        app.state.scheduler.trace = trace
        app.state.stream_times = written = []
        with ServerThread(app, host="127.0.0.1") as s, gc_pauses() as pauses:
            row = in_client_process(budget.left(), interference, s.url, streams, args.stream_tokens, longs, 4, 16,
                                    args.client)
        if row is not None:
            row["iterations"] = iteration_profile(list(trace), pauses, row)
            # the running streams' gaps as the server wrote them, in the client's windows (the streams' prompts
            # are --prompt-tokens long, the long ones --long-prompt-tokens)
            n = None if args.prompt_tokens == args.long_prompt_tokens else args.prompt_tokens
            for name, lo, hi in (("quiet", row["t_started"], row["t_sent"]), ("during", row["t_sent"], row["t_read"]),
                                 ("after", row["t_read"], float("inf"))):
                gaps = server_gaps(written, lo, hi, n)
                row[f"server_{name}_p50_ms"] = 1e3 * percentile(gaps, 50) if gaps else float("nan")
                row[f"server_{name}_p99_ms"] = 1e3 * percentile(gaps, 99) if gaps else float("nan")
        if row is None:
            budget.skipped.append(f"long prompts, chunk {chunk} (stopped)")
            break
        row["chunk"] = chunk
        row["prefill_group"] = getattr(app.state.scheduler, "prefill_group", None)
        rows_of = getattr(app.state.scheduler, "rows", None)
        row["chunk_graphs"] = bool(getattr(rows_of, "chunk_graphs", False))
        row["chunk_graph_error"] = app.state.scheduler.stats.chunk_graph_error
        row["chunk_lane"] = bool(getattr(app.state.scheduler, "lane", False))
        row["lane_chunks"] = app.state.scheduler.stats.lane_chunks
        row["lane_skipped"] = dict(app.state.scheduler.stats.lane_skipped)
        row["lane_error"] = app.state.scheduler.stats.lane_error
        long_rows.append(row)
        print(f"chunk {chunk}, prefill group {row['prefill_group']}, chunk graphs {row['chunk_graphs']} "
              f"({row['read_graph_chunks']}/{row['read_chunks']} chunks through them; the others by why: "
              f"{skips(row['read_graph_skipped'])}), lane {row['chunk_lane']} ({row['lane_chunks']} chunks in the "
              f"steps; the others by why: {skips(row['lane_skipped'])}{' ' + row['lane_error'] if row['lane_error'] else ''}"
              f"): during p99 {row['during_p99_ms']:.1f} ms", file=sys.stderr)
    report["long_prompts"] = long_rows
    report["skipped"] = budget.skipped
    print_tables(report)
    if args.json:
        import onnxruntime

        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".partial")
        tmp.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "onnxruntime": onnxruntime.__version__, "model_dir": str(args.model_dir),
                                   "args": {k: str(v) for k, v in vars(args).items()},
                                   "offline_note": "onnxpipe bench, 1 timed run per batch", **report}, indent=1))
        tmp.replace(args.json)
    return 0


def print_tables(report: dict[str, Any]) -> None:
    nan = float("nan")  # a report from before the server's write times were kept
    print(f"{report['provider']}, {report['layout']}, clients: {report.get('client', 'httpx')}")
    if report.get("check_equal"):
        print(report["check_equal"])
    if report.get("check_equal_chunk_graphs"):
        print(report["check_equal_chunk_graphs"])
    if report.get("check_equal_chunk_lane"):
        print(report["check_equal_chunk_lane"])
    rows = report["levels"]
    one = next((r["tokens_per_s"] for r in rows if r["concurrency"] == 1), None)
    if rows:
        print("\n| concurrent streams | prefill group (runs) | requests | tokens/s | vs one by one | offline generate "
              "(batch = streams) | served / offline | TTFT p50 / p99 ms | inter-token p50 / p99 ms, as written | as read "
              "| per-request ms/token p50 / p99 |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / one:.2f}x" if one else "-"
        group = f"{r.get('prefill_group') or '-'} ({r['prefill_runs']})" if "prefill_runs" in r else "-"
        print(f"| {r['concurrency']} | {group} | {r['requests']} | {r['tokens_per_s']:.0f} | {ratio} | "
              f"{r['offline_tokens_per_s']:.0f} | {r['tokens_per_s'] / r['offline_tokens_per_s']:.0%} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r.get('server_itl_p50_ms', nan):.1f} / {r.get('server_itl_p99_ms', nan):.1f} | "
              f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} |")
    if report["long_prompts"]:
        print("\n| prefill chunk | prefill group | chunks through CUDA graphs | tokens a chunk (mean) | streams | long "
              "prompts x tokens | read in s | running streams' inter-token ms as written: quiet p50 / p99 | while read p50 / "
              "p99 | while-read p99 / quiet p50 | after p50 | while-read p99 / after p50 | as read: quiet p50 / p99 | while read p50 / p99 | long prompts' TTFT "
              "p50 / max ms |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["long_prompts"]:
        graphs = f"{r.get('read_graph_chunks', 0)} / {r['read_chunks']}" if r.get("chunk_graphs") else "off"
        if r.get("chunk_graphs") and r.get("read_graph_skipped"):
            graphs += f" (not: {skips(r['read_graph_skipped'])})"
        if r.get("chunk_lane"):
            graphs += f"; {r.get('lane_chunks', 0)} in the steps (lane)"
        print(f"| {r['chunk']} | {r.get('prefill_group') or '-'} | {graphs} | {r['read_tokens_per_chunk']:.0f} | {r['streams']} | {r['long_prompts']} x "
              f"{r['long_prompt_tokens']} | {r['read_s']:.2f} | "
              f"{r.get('server_quiet_p50_ms', nan):.1f} / {r.get('server_quiet_p99_ms', nan):.1f} | "
              f"{r.get('server_during_p50_ms', nan):.1f} / {r.get('server_during_p99_ms', nan):.1f} | "
              f"{r.get('server_during_p99_ms', nan) / (r.get('server_quiet_p50_ms') or nan):.2f}x | "
              f"{r.get('server_after_p50_ms', nan):.1f} | "
              f"{r.get('server_during_p99_ms', nan) / (r.get('server_after_p50_ms') or nan):.2f}x | "
              f"{r['quiet_p50_ms']:.1f} / {r['quiet_p99_ms']:.1f} | {r['during_p50_ms']:.1f} / {r['during_p99_ms']:.1f} | "
              f"{r['long_ttft_p50_ms']:.0f} / {r['long_ttft_max_ms']:.0f} |"
              + (f" ({r['streams_done_before_read']} streams ended before)" if r["streams_done_before_read"] else ""))
    profiled = [r for r in report["long_prompts"] if r.get("iterations")]
    if profiled:
        print("\nWhere the scheduler's iterations went while the long prompts were read (its own clock):\n\n"
              "| prefill chunk | prefill group | quiet decode step p50 ms | iterations | prompt tokens an iteration (mean) | "
              "prefill ms p50 / p99 | decode step ms p50 / p99 | decode step, first / last tenth ms | iteration ms "
              "p50 / p99 | iteration p99 / quiet step p50 | GC pauses (total / max ms) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in profiled:
        i = r["iterations"]
        what = " (chunk graphs, lane)" if r.get("chunk_lane") else " (chunk graphs)" if r.get("chunk_graphs") else ""
        print(f"| {r['chunk']}{what} | {r.get('prefill_group') or '-'} | {i['quiet_step_p50_ms']:.1f} | {i['read_iterations']} | {i['read_tokens_mean']:.1f} | "
              f"{i['read_prefill_p50_ms']:.1f} / {i['read_prefill_p99_ms']:.1f} | "
              f"{i['read_step_p50_ms']:.1f} / {i['read_step_p99_ms']:.1f} | "
              f"{i['read_step_first_tenth_ms']:.1f} / {i['read_step_last_tenth_ms']:.1f} | "
              f"{i['read_iteration_p50_ms']:.1f} / {i['read_iteration_p99_ms']:.1f} | "
              f"{i['read_iteration_p99_ms'] / i['quiet_step_p50_ms']:.2f}x | "
              f"{i['gc_pauses']} ({i['gc_ms']:.1f} / {i['gc_max_ms']:.1f}) |")
    for r in profiled:
        slow = r["iterations"].get("read_slowest") or []
        if slow:
            print(f"\nchunk {r['chunk']}{' (lane)' if r.get('chunk_lane') else ''}: the slowest iterations while read, "
                  "ms from the last step's end to theirs = between + admission + prefill + step:")
        for x in slow:
            did = [f"{x['tokens']} prompt tokens"] if x["tokens"] else []
            did += [f"{x['admitted']} admitted"] if x["admitted"] else []
            did += ["lane"] if x["lane"] else []
            did += ["fed" if x["fed"] else "host-fed"] + (["overlapped"] if x["overlapped"] else [])
            did += [f"rows {x['rows']} -> {x['rows_after']}"]
            print(f"  {x['ms']:.2f} = {x['between_ms']:.2f} + {x['admit_ms']:.2f} + {x['prefill_ms']:.2f} + "
                  f"{x['step_ms']:.2f}: " + ", ".join(did))
    if report["skipped"]:
        print("\nleft out (budget): " + ", ".join(report["skipped"]))


if __name__ == "__main__":
    sys.exit(main())
