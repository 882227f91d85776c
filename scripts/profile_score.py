"""Where `onnxpipe score`'s time goes, by phase: exclusive wall time of each stage of the local engine.

    flock /tmp/onnxpipe-bench.lock python3 scripts/profile_score.py OUT_OR_ONNX_DIR --texts 2000
    python3 scripts/profile_score.py MODEL_DIR --provider cuda --batch-tokens 16384   # the GPU machine

The texts are bench_score.py's (the first N pieces of data/eval.txt's paragraphs). MODEL_DIR is an onnxpipe model
directory (e.g. the fp32 export that bench_score.py leaves in /tmp/onnxpipe-bench-score/gpt2-stdlib-onnx). Each
run calls the library's `score()` with the same options as bench_score.py; the functions of the pipeline are
wrapped with timers that charge each second to exactly one phase (a phase's own time, its callees' subtracted),
so the phases add up to the run's wall time. onnxruntime's calls are synchronous, so on a GPU "model" and "head"
include the device work. --repeats runs (each a fresh session, as bench_score does); the table shows the last
and the median over runs. --json writes every run's phases.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

PHASES = ("read", "tokenize", "windows", "feed", "model", "head", "rows", "write", "checkpoint", "other")


class PhaseClock:
    """Exclusive time per phase: time inside a phase's calls, less the time of phases nested in it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {p: 0.0 for p in PHASES}
        self.calls: dict[str, int] = {p: 0 for p in PHASES}
        self.stack: list[list[Any]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        frame = [name, time.perf_counter(), 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - frame[1]
            self.stack.pop()
            self.seconds[name] += elapsed - frame[2]
            self.calls[name] += 1
            if self.stack:
                self.stack[-1][2] += elapsed

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*a: Any, **k: Any) -> Any:
            with self.phase(name):
                return fn(*a, **k)
        return timed

    def wrap_iter(self, name: str, gen_fn: Callable) -> Callable:
        def timed(*a: Any, **k: Any) -> Iterator[Any]:
            it = gen_fn(*a, **k)
            while True:
                with self.phase(name):
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item
        return timed


def instrument(clock: PhaseClock) -> None:
    """Wrap the pipeline's functions (module attributes and methods) with the clock's phases."""
    import onnxruntime as ort

    from onnxpipe.score import engine_local, perplexity
    from onnxpipe.score.checkpoint import Checkpoint
    from onnxpipe.score.encoding import Encoder
    from onnxpipe.score.head import LogitsHead
    from onnxpipe.score.job import ScoreJob
    from onnxpipe.score.scorer import WindowScorer

    # functions are wrapped where the local engine looks them up (the module that imported them), methods on their class
    ScoreJob.chunks = clock.wrap_iter("read", ScoreJob.chunks)
    Encoder.items = clock.wrap("tokenize", Encoder.items)
    perplexity.score_items = clock.wrap("windows", perplexity.score_items)  # cutting, planning, per-batch accounting
    WindowScorer.score = clock.wrap("feed", WindowScorer.score)  # padding, targets, bincounts
    WindowScorer._host_head = clock.wrap("head", WindowScorer._host_head)
    perplexity.ScoreWorker.run = clock.wrap("rows", perplexity.ScoreWorker.run)
    engine_local.record_bad = clock.wrap("rows", engine_local.record_bad)
    engine_local.append_jsonl = clock.wrap("write", engine_local.append_jsonl)
    engine_local.write_part = clock.wrap("write", engine_local.write_part)
    Checkpoint.save = clock.wrap("checkpoint", Checkpoint.save)
    LogitsHead.run = clock.wrap("head", LogitsHead.run)

    run, run_io = ort.InferenceSession.run, ort.InferenceSession.run_with_iobinding

    def is_head(session: Any) -> bool:
        return any(i.name == "index" for i in session.get_inputs())

    def timed_run(self: Any, *a: Any, **k: Any) -> Any:
        with clock.phase("head" if is_head(self) else "model"):
            return run(self, *a, **k)

    def timed_run_io(self: Any, *a: Any, **k: Any) -> Any:
        with clock.phase("head" if is_head(self) else "model"):
            return run_io(self, *a, **k)

    ort.InferenceSession.run = timed_run
    ort.InferenceSession.run_with_iobinding = timed_run_io
    copy = ort.IOBinding.copy_outputs_to_cpu
    ort.IOBinding.copy_outputs_to_cpu = clock.wrap("head", copy)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--text", type=Path, default=REPO / "data" / "eval.txt")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--chunk-records", type=int, default=512)
    p.add_argument("--head", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/onnxpipe-profile-score"))
    p.add_argument("--output", default="jsonl", choices=("jsonl", "parquet"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="GPU: record the last run's kernels with torch.profiler (CUPTI) and print the N costliest")
    args = p.parse_args()

    from bench_score import cut_texts

    from onnxpipe.score import ScoreConfig, score

    args.work.mkdir(parents=True, exist_ok=True)
    records = args.work / "texts.jsonl"
    records.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(cut_texts(args.text, args.texts))))
    clock = PhaseClock()
    instrument(clock)
    runs = []
    threads = args.threads if args.provider == "cpu" else None
    for _ in range(args.repeats):
        clock.seconds = {k: 0.0 for k in PHASES}
        clock.calls = {k: 0 for k in PHASES}
        cfg = ScoreConfig(provider=args.provider, threads=threads, batch_tokens=args.batch_tokens, force=True,
                          progress=False, chunk_records=args.chunk_records, head=args.head)
        messages: list[str] = []
        prof = None
        if args.kernels and len(runs) == args.repeats - 1:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CUDA])
            prof.__enter__()
        t0 = time.perf_counter()
        summary = score(args.model_dir, records, args.work / f"scores.{args.output}", cfg, log=messages.append)
        wall = time.perf_counter() - t0
        if prof is not None:
            from profile_decode import kernel_table

            prof.__exit__(None, None, None)
            trace = args.work / "kernels.json"
            prof.export_chrome_trace(str(trace))
            table = kernel_table(trace, 1, wall)
            print(f"# kernels of the last run: device busy {table['busy_ms']:.1f} ms of {table['wall_ms']:.1f} ms wall, "
                  f"{table['kernels_per_step']:.0f} kernels")
            for k in table["top"][: args.kernels]:
                print(f"#   {k['us'] / 1e3:9.2f} ms x{k['count']:6.0f}  {k['name'][:120]}")
        # "other": the run's own time (summary.seconds counts tokenizing to the checkpoint, not reading) less phases
        timed = dict(clock.seconds)
        timed["other"] = max(0.0, summary.seconds + timed["read"] - sum(v for k, v in timed.items() if k != "other"))
        runs.append({"phases": timed, "calls": dict(clock.calls), "seconds": summary.seconds, "wall": wall,
                     "tokens": summary.tokens, "tokens_per_s": summary.tokens / summary.seconds,
                     "perplexity": summary.perplexity, "provider": summary.provider, "messages": messages})
    last = runs[-1]
    print(f"# {args.model_dir}; {args.texts} texts, {last['tokens']} scored tokens; {last['provider']}; "
          f"batch budget {args.batch_tokens}; {args.repeats} runs; corpus perplexity {last['perplexity']:.6f}")
    print("| phase | last run, s | median, s | share (median) | calls |")
    print("|---|---|---|---|---|")
    total = statistics.median(r["seconds"] + r["phases"]["read"] for r in runs)
    for ph in PHASES:
        med = statistics.median(r["phases"][ph] for r in runs)
        print(f"| {ph} | {last['phases'][ph]:.3f} | {med:.3f} | {med / total:.1%} | {last['calls'].get(ph, 0)} |")
    print(f"| **run (score seconds + read)** | {last['seconds'] + last['phases']['read']:.3f} | {total:.3f} | | |")
    print(f"# scored tokens/s (summary): last {last['tokens_per_s']:,.0f}, median "
          f"{statistics.median(r['tokens_per_s'] for r in runs):,.0f}; wall incl. session load, last {last['wall']:.2f}s")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
