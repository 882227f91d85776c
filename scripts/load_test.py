"""A bounded load test of `onnxpipe serve` on loopback: N concurrent streaming clients against the server started in
this process (127.0.0.1, a free port), per concurrency level: aggregate tokens/s, time to first token and
inter-token latency p50/p99; beside it the offline figure of `onnxpipe bench` (the same model, batch = the
concurrency, same prompt and new-token counts, measured in the same run).

    python scripts/load_test.py out/llama-stdlib --concurrency 1,2,4,8,16 --json benchmarks/results/serve-cpu.json

Every request is a seeded random prompt of --prompt-tokens token ids, greedy, with ``ignore_eos`` so it generates
exactly --max-tokens; each client sends --requests-per-client requests one after the other. Concurrency 1 is serving
the requests one by one. Inter-token latency is the gap between consecutive streamed chunks (a chunk holds one
token unless a character spans several; chunks that reach the client in one read share a time, so on a tiny model
its p50 can read 0); per-request ms/token is (last chunk - first chunk) / (tokens - 1), one value per request; TTFT
is from sending the request to its first text chunk. The clients run
in a process of their own (httpx, asyncio): on a 2-core machine they share the cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def one_request(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    sent = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    tpot = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else float("nan")
    return {"ttft": times[0] - sent if times else float("nan"), "gaps": list(np.diff(times)), "tokens": tokens,
            "tpot": tpot}


async def level(base: str, model: str, concurrency: int, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    import httpx

    queue = list(prompts)
    results: list[dict[str, Any]] = []

    async def client_loop(client: Any) -> None:
        while queue:
            prompt = queue.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            results.append(await one_request(client, base + "/v1/completions", body))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    gaps = [g for r in results for g in r["gaps"]]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_ms": 1e3 * percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99), "itl_p50_ms": 1e3 * percentile(gaps, 50),
            "itl_p99_ms": 1e3 * percentile(gaps, 99), "tpot_p50_ms": 1e3 * percentile([r["tpot"] for r in results], 50),
            "tpot_p99_ms": 1e3 * percentile([r["tpot"] for r in results], 99)}


def run_clients(url: str, concurrency: int, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """One level's clients in a process of their own (so their timing is not held up by the server's threads)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(client_process, (url, concurrency, prompts, max_tokens))


def client_process(url: str, concurrency: int, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    return asyncio.run(level(url, "model", concurrency, prompts, max_tokens))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels (1-64)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--provider", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or any(not 1 <= c <= 64 for c in levels) or not 1 <= args.requests_per_client <= 16:
        p.error("concurrency levels must be 1..64 and --requests-per-client 1..16 (a bounded test)")

    from onnxpipe.runtime.bench import bench
    from onnxpipe.runtime.generate import load
    from onnxpipe.serve.app import ServerThread, create_app

    lm = load(args.model_dir, args.provider, threads=args.threads)
    rng = np.random.default_rng(0)
    offline = {r.batch: r for r in bench(lm, sorted(set(levels)), prompt_tokens=args.prompt_tokens,
                                         new_tokens=args.max_tokens, repeats=1)}
    app = create_app(lm, "model", max_batch=args.max_batch, max_queue=256, prefill_chunk=args.prefill_chunk)
    rows = []
    with ServerThread(app, host="127.0.0.1") as server:
        for c in levels:
            prompts = rng.integers(0, lm.session.vocab_size, (c * args.requests_per_client, args.prompt_tokens)).tolist()
            row = run_clients(server.url, c, prompts, args.max_tokens)
            row["offline_tokens_per_s"] = offline[c].tokens_per_s
            rows.append(row)
            print(f"concurrency {c}: {row['tokens_per_s']:.0f} tok/s", file=sys.stderr)
    one = next((r["tokens_per_s"] for r in rows if r["concurrency"] == 1), None)
    print("| concurrent streams | requests | tokens/s | vs one by one | offline bench (batch = streams) | served / offline "
          "| TTFT p50 / p99 ms | inter-token p50 / p99 ms | per-request ms/token p50 / p99 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / one:.2f}x" if one else "-"
        print(f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.0f} | {ratio} | "
              f"{r['offline_tokens_per_s']:.0f} | {r['tokens_per_s'] / r['offline_tokens_per_s']:.0%} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | "
              f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} |")
    if args.json:
        import onnxruntime

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "onnxruntime": onnxruntime.__version__, "model_dir": str(args.model_dir),
                                         "args": {k: str(v) for k, v in vars(args).items()},
                                         "median_note": "offline: onnxpipe bench, 1 timed run per batch",
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
