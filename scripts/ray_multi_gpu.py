#!/usr/bin/env python3
"""`onnxpipe score --engine ray` on a multi-GPU host: scaling over 1, 2, 4, 8 workers (one GPU each), a worker and
the driver killed with -9 mid-run, and the output against the local engine's.

    python3 scripts/ray_multi_gpu.py --out $OUT                  # a multi-GPU host: the 1B shape, fp16 CUDA form and int4
    python3 scripts/ray_multi_gpu.py --cpu-smoke --out /tmp/rs   # any machine: 2 fake GPUs declared to a local Ray
    python3 scripts/ray_multi_gpu.py --build-only                # the builds alone; a later run with the same --work reuses them

Models: a random-weight Llama-3.2-1B shape (scripts/bench_gpu_builds.SHAPES["llama-1b"]) built as
scripts/bench_score.py builds its models (fp32 HF directory, the llama-stdlib tokenizer, onnxpipe's CLI): the fp16
export optimized at level 3 for CUDA (form "fp16") and int4 RTN of the fp32 export (form "int4"). --fp16-dir /
--int4-dir take forms built before; completed builds under --work are reused. With --cpu-smoke: the same builds of
bench_score's 2-layer "tiny" shape, scored on the CPU (which runs the CUDA form's fp16 graph in fp32).

Records: data/eval.txt cut into bench_score's pieces (1-12 lines), repeated until --tokens tokens (counted with the
model's tokenizer), one {"id", "text"} JSONL. This process starts a local Ray instance (its GPUs, or 2 declared ones
with --cpu-smoke) and runs every score as `python -m onnxpipe score ... --ray-address` in a child process, so that
a kill is a real SIGKILL of the driver or of a worker (a worker is found among this process's descendants by its
process title, which names RayChunkScorer).

Per form:
- local: `--engine local` on one GPU (the CPU with --cpu-smoke): the reference bytes.
- scaling: `--engine ray --num-workers N` for N in --workers (capped at the GPUs Ray sees): tokens/s as the summary
  counts it (from joining Ray to the last chunk: worker start and session load included), tokens/s after the first
  chunk was written (the checkpoint polled every 0.2 s), scaling efficiency = rate(N) / (N x rate(1)), the GPU ids
  each worker got (the summary's placement), and whether the parts, concatenated, equal the local output byte for
  byte.
- kills, at the largest N, each once a quarter of the chunks are written: one worker -9 (Ray restarts it and sends
  its chunk again); workers -9 each time one appears, past the engine's retries (the run must stop with one line;
  then --resume); the driver -9 (then --resume). Each ends with the output compared with the uninterrupted run's
  bytes and the records counted by id: lost and duplicated.

Prints one JSON object and a markdown table on stdout (also OUT/ray_multi_gpu.json and .md); exit 1 when a check
failed (a run's error, output not equal, a record lost or duplicated), 2 when the machine cannot run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_score's builds and texts, bench_gpu's shapes

from bench_gpu_builds import SHAPES as GPU_SHAPES  # noqa: E402
from bench_score import SHAPES as SCORE_SHAPES  # noqa: E402
from bench_score import Build, build_hf, cut_texts, refuse_device, run_builds  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKER_TITLE = "RayChunkScorer"  # in a Ray Data worker's process title: ray::MapWorker(MapBatches(RayChunkScorer))
# the 1B shape with bench_score's tokenizer (llama-stdlib's, ids < 4096) so that text records can be scored
SCORE_SHAPES.setdefault("llama-1b", ("llama", GPU_SHAPES["llama-1b"], "llama-stdlib"))


# ------------------------------------------------------------------------------------------------ processes
def descendants(root: int) -> list[int]:
    """Every process below ``root`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for kid in children.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found


def ray_worker_pids(root: int | None = None) -> list[int]:
    """The scoring workers (Ray actors) of a Ray instance started by process ``root`` (default: this one)."""
    pids = []
    for pid in descendants(os.getpid() if root is None else root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if WORKER_TITLE in title:
            pids.append(pid)
    return sorted(pids)


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


# ------------------------------------------------------------------------------------------------ one score run
def done_chunks(out: Path) -> tuple[int, int]:
    """(chunks written, tokens scored) by the checkpoint of a Ray run's OUTPUT directory; (0, 0) before it exists."""
    try:
        ck = json.loads((out / "_checkpoint.json").read_text())
        return len(ck["done_chunks"]), int(ck["tokens"])
    except (OSError, ValueError, KeyError):
        return 0, 0


def score(model: Path, records: Path, out: Path, common: list[str], extra: list[str],
          on_poll: Callable[[subprocess.Popen, int], None] | None = None) -> dict[str, Any]:
    """One `onnxpipe score` child process; ``on_poll(proc, chunks_written)`` every 0.2 s (it may kill something)."""
    cmd = [sys.executable, "-m", "onnxpipe", "score", str(model), str(records), "-o", str(out), *common, *extra]
    t0 = time.perf_counter()
    err_path = next(p for k in range(100) if not (p := out.with_name(f"{out.name}.{k}.stderr")).exists())
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        first: tuple[float, int] | None = None  # when the checkpoint first showed a written chunk, and its tokens
        while proc.poll() is None:
            time.sleep(0.2)
            chunks, tokens = done_chunks(out) if out.is_dir() else (0, 0)
            if chunks and first is None:
                first = (time.perf_counter(), tokens)
            if on_poll:
                on_poll(proc, chunks)
    wall = time.perf_counter() - t0
    lines = [x for x in err_path.read_text(errors="replace").splitlines() if x.strip()]
    res: dict[str, Any] = {"rc": proc.returncode, "wall_s": round(wall, 2), "argv": " ".join(cmd[1:])}
    if proc.returncode != 0:
        said = next((x for x in reversed(lines) if x.startswith("Error:")), None)
        res["error"] = (said or (f"killed by signal {-proc.returncode}" if proc.returncode < 0 else
                                 lines[-1] if lines else "no message"))[:400]
        res["stderr"] = str(err_path)
        return res
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    res.update({k: summary[k] for k in ("records", "tokens", "seconds", "tokens_per_s", "workers", "placement")})
    if first is not None and summary["tokens"] > first[1]:
        res["tokens_per_s_after_first_chunk"] = (summary["tokens"] - first[1]) / max(t0 + wall - first[0], 1e-9)
    return res


def output_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.glob("part-*"))) if out.is_dir() else out.read_bytes()


def ids_of(out: Path) -> Counter:
    return Counter(json.loads(line)["id"] for line in output_bytes(out).decode().splitlines() if line)


def lost_and_duplicated(out: Path, expected: Counter) -> tuple[int, int]:
    """Records of ``expected`` (the local run's ids: every record but the bad ones) missing from ``out``, and rows
    of ``out`` beyond one per id."""
    ids = ids_of(out)
    return sum(1 for i in expected if i not in ids), sum(c - 1 for c in ids.values() if c > 1)


def fresh(out: Path) -> Path:
    """``out`` with no earlier run's output, checkpoint or summary (a stale checkpoint would fire a kill early)."""
    if out.is_dir():
        shutil.rmtree(out)
    for p in (out, out.with_name(out.stem + ".summary.json"), out.with_name(out.name + ".checkpoint.json"),
              *out.parent.glob(f"{out.name}.*.stderr")):
        p.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------------------ the runs
def scaling(form: str, model: Path, records: Path, work: Path, ctx: dict, log) -> dict:
    local_out = work / f"{form}-local.jsonl"
    res: dict[str, Any] = {"local": score(model, records, fresh(local_out), ctx["common"],
                                          ["--provider", ctx["local_provider"]])}
    log(f"{form} local: {res['local'].get('error') or str(res['local']['tokens']) + ' tokens'}")
    local = local_out.read_bytes() if res["local"]["rc"] == 0 else None
    ctx["expected_ids"] = ids_of(local_out) if local is not None else Counter()
    rows = []
    for n in ctx["workers"]:
        if time.monotonic() > ctx["deadline"]:
            rows.append({"workers": n, "skipped": "out of --budget-s"})
            continue
        out = fresh(work / f"{form}-ray{n}.jsonl")
        r = score(model, records, out, ctx["common"], ctx["ray"] + ["--num-workers", str(n)])
        r["workers_asked"] = n
        if r["rc"] == 0:
            r["equal_to_local"] = local is not None and output_bytes(out) == local
            r["lost"], r["duplicated"] = lost_and_duplicated(out, ctx["expected_ids"])
        rows.append(r)
        log(f"{form} ray x{n}: " + (r.get("error") or f"{r['tokens_per_s']:.0f} tok/s, equal {r['equal_to_local']}"))
    base = next((r for r in rows if r.get("workers_asked") == 1 and r.get("rc") == 0), None)
    for r in rows:
        for key in ("tokens_per_s", "tokens_per_s_after_first_chunk"):
            if base and r.get(key) and base.get(key):
                r[key.replace("tokens_per_s", "efficiency")] = r[key] / (r["workers_asked"] * base[key])
    res["rows"] = rows
    return res


def kills(form: str, model: Path, records: Path, work: Path, ctx: dict, log) -> list[dict]:
    """The three kills at the largest worker count, each compared with that count's uninterrupted run."""
    n = ctx["workers"][-1]
    reference = work / f"{form}-ray{n}.jsonl"
    trigger = max(1, ctx["n_chunks"] // 4)
    ray_args = ctx["ray"] + ["--num-workers", str(n)]
    out_rows = []

    def one_worker(state: dict) -> Callable:
        def poll(proc: subprocess.Popen, chunks: int) -> None:
            if chunks >= trigger and not state["killed"]:
                pids = ray_worker_pids()
                if pids and kill(pids[0]):
                    state["killed"].append(pids[0])
        return poll

    def every_worker(state: dict) -> Callable:
        def poll(proc: subprocess.Popen, chunks: int) -> None:
            if chunks >= trigger and len(state["killed"]) < 200:
                state["killed"] += [p for p in ray_worker_pids() if kill(p)]
        return poll

    def driver(state: dict) -> Callable:
        def poll(proc: subprocess.Popen, chunks: int) -> None:
            if chunks >= trigger and not state["killed"] and kill(proc.pid):
                state["killed"].append(proc.pid)
        return poll

    for name, make in (("one worker -9", one_worker), ("every worker -9 past the retries", every_worker),
                       ("driver -9", driver)):
        if time.monotonic() > ctx["deadline"]:
            out_rows.append({"scenario": name, "skipped": "out of --budget-s"})
            continue
        out = fresh(work / f"{form}-kill.jsonl")
        state: dict[str, Any] = {"killed": []}
        first = score(model, records, out, ctx["common"], ray_args, make(state))
        row: dict[str, Any] = {"scenario": name, "workers": n, "killed_pids": state["killed"][:20],
                               "kills": len(state["killed"]), "first_run": first}
        if first["rc"] != 0:
            row["resume"] = score(model, records, out, ctx["common"], ray_args + ["--resume"])
        final = row.get("resume", first)
        if final["rc"] == 0:
            row["equal_to_uninterrupted"] = reference.is_dir() and output_bytes(out) == output_bytes(reference)
            row["lost"], row["duplicated"] = lost_and_duplicated(out, ctx["expected_ids"])
        out_rows.append(row)
        log(f"{form} {name}: killed {len(state['killed'])}, first rc {first['rc']} "
            f"({first.get('error', 'completed')[:160]}), resumed {'resume' in row}, final rc {final['rc']}, "
            f"equal {row.get('equal_to_uninterrupted')}, lost {row.get('lost')}, duplicated {row.get('duplicated')}")
    return out_rows


# ------------------------------------------------------------------------------------------------ setup
def build_forms(args: argparse.Namespace, work: Path, log) -> tuple[dict[str, Path], list[dict]]:
    """The forms to score, given (--fp16-dir/--int4-dir) or built under --work (reused when complete): the fp16
    export optimized at level 3 for CUDA, and int4 RTN of the fp32 export. --cpu-smoke builds the same from the
    tiny shape (the CPU runs the CUDA form's fp16 graph in fp32)."""
    given = {"fp16": args.fp16_dir, "int4": args.int4_dir}
    if all(given.values()):
        return dict(given), []
    hf = build_hf("tiny" if args.cpu_smoke else "llama-1b", work)
    gate = ["--eval-tokens", "256", "--max-ppl-increase", "1e9", "--min-greedy-agreement", "0"]  # random weights
    fp32, int4, fp16, opt = work / "fp32", work / "int4", work / "fp16", work / "fp16-opt"
    builds = []
    if not given["fp16"]:
        builds += [Build("export-fp16", fp16, ["export", str(hf), "-o", str(fp16), "--dtype", "fp16", "--no-verify"]),
                   Build("optimize-fp16", opt, ["optimize", str(fp16), "-o", str(opt), "--level", "3", "--target",
                                                "cuda", "--skip-verify"], "export-fp16")]
    if not given["int4"]:
        builds += [Build("export-fp32", fp32, ["export", str(hf), "-o", str(fp32), "--no-verify"]),
                   Build("int4-rtn", int4, ["quantize", str(fp32), "-o", str(int4), "--mode", "int4", "--algo", "rtn",
                                            *gate], "export-fp32")]
    run_builds(builds, time.monotonic() + args.budget_s, log)
    failed = [f"{b.name}: {b.error}" for b in builds if b.error]
    if failed:
        raise SystemExit(f"ray_multi_gpu: a build failed: {'; '.join(failed)}")
    return ({"fp16": given["fp16"] or opt, "int4": given["int4"] or int4},
            [{"name": b.name, "seconds": round(b.seconds or 0, 1), "reused": b.reused} for b in builds])


def write_records(model: Path, target_tokens: int, path: Path) -> tuple[int, int]:
    """eval.txt's pieces, repeated, as {"id", "text"} records until ``target_tokens``; (records, tokens counted)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    texts = cut_texts(REPO / "data" / "eval.txt", 2000)
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    n, total = 0, 0
    with open(path, "w") as f:
        while total < target_tokens:
            f.write(json.dumps({"id": n, "text": texts[n % len(texts)]}) + "\n")
            total += lengths[n % len(texts)]
            n += 1
    return n, total


def start_ray(cpu_smoke: bool) -> tuple[str, int]:
    """A local Ray instance owned by this process (its workers are this process's descendants): (address, GPUs)."""
    import ray

    kw: dict[str, Any] = {"num_gpus": 2, "num_cpus": max(4, os.cpu_count() or 1)} if cpu_smoke else {}
    info = ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", **kw)
    return info.address_info["gcs_address"], int(ray.cluster_resources().get("GPU", 0))


# ------------------------------------------------------------------------------------------------ report
def _pct(row: dict, key: str) -> str:
    return f"{row[key]:.0%}" if key in row else "-"


def _num(row: dict, key: str) -> str:
    return f"{row[key]:,.0f}" if key in row else "-"


def markdown(report: dict) -> str:
    lines = [f"# ray_multi_gpu{' --cpu-smoke' if report['cpu_smoke'] else ''}: {report['when']} UTC; "
             f"{report['device']}; Ray sees {report['gpus']} GPU(s); {report['records']} records, ~{report['tokens']} "
             f"tokens; --batch-tokens {report['batch_tokens']}, --chunk-records {report['chunk_records']}", "",
             "| form | workers | GPU ids per worker | tokens | tokens/s (summary) | efficiency | tokens/s after 1st "
             "chunk | efficiency | wall s | = local bytes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for form, res in report["forms"].items():
        loc = res["local"]
        lines.append(f"| {form} | local | - | {loc.get('tokens', '-')} | {loc.get('tokens_per_s', 0):,.0f} | - | "
                     f"- | - | {loc['wall_s']} | reference |"
                     if loc["rc"] == 0 else f"| {form} | local | failed: {loc['error']} |")
        for r in res["rows"]:
            if "skipped" in r or r.get("rc") != 0:
                lines.append(f"| {form} | {r.get('workers_asked', r.get('workers'))} | {r.get('skipped') or r.get('error')} |")
                continue
            lines.append(f"| {form} | {r['workers']} | {r['placement'].get('gpu_ids_seen')} | {r['tokens']} | "
                         f"{r['tokens_per_s']:,.0f} | {_pct(r, 'efficiency')} | "
                         f"{_num(r, 'tokens_per_s_after_first_chunk')} | {_pct(r, 'efficiency_after_first_chunk')} | "
                         f"{r['wall_s']} | {'yes' if r['equal_to_local'] else 'NO'} |")
    lines += ["", "| form | kill | workers | kills | first run | --resume | = uninterrupted bytes | lost | duplicated |",
              "|---|---|---|---|---|---|---|---|---|"]
    for form, res in report["forms"].items():
        for k in res["kills"]:
            if "skipped" in k:
                lines.append(f"| {form} | {k['scenario']} | {k['skipped']} |")
                continue
            first = "completed" if k["first_run"]["rc"] == 0 else f"exit {k['first_run']['rc']}: {k['first_run']['error']}"
            resume = ("-" if "resume" not in k else "completed" if k["resume"]["rc"] == 0 else
                      f"exit {k['resume']['rc']}: {k['resume']['error']}")
            eq = {True: "yes", False: "NO"}.get(k.get("equal_to_uninterrupted"), "-")
            lines.append(f"| {form} | {k['scenario']} | {k['workers']} | {k['kills']} | {first.replace('|', '/')} | "
                         f"{resume} | {eq} | {k.get('lost', '-')} | {k.get('duplicated', '-')} |")
    return "\n".join(lines) + "\n"


def failures(report: dict) -> list[str]:
    bad = []
    for form, res in report["forms"].items():
        for r in [res["local"], *res["rows"]]:
            if "skipped" not in r and (r["rc"] != 0 or r.get("equal_to_local") is False or r.get("lost") or r.get("duplicated")):
                bad.append(f"{form} x{r.get('workers_asked', 'local')}")
        for k in res["kills"]:
            if "skipped" not in k and (not k.get("equal_to_uninterrupted") or k.get("lost") or k.get("duplicated")):
                bad.append(f"{form} {k['scenario']}")
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU, 2 GPUs declared to a local Ray")
    p.add_argument("--work", type=Path, default=Path("/tmp/onnxpipe-ray-multi-gpu"))
    p.add_argument("--out", type=Path, default=None, help="where ray_multi_gpu.json and .md go (default --work)")
    p.add_argument("--fp16-dir", type=Path, default=None, help="a built fp16 CUDA form to take instead of building")
    p.add_argument("--int4-dir", type=Path, default=None, help="a built int4 form to take instead of building")
    p.add_argument("--forms", default=None, help="comma-separated forms to score (default all)")
    p.add_argument("--workers", default="1,2,4,8", help="worker counts, capped at the GPUs Ray sees")
    p.add_argument("--tokens", type=int, default=None, help="tokens to score (default 500,000; 20,000 --cpu-smoke)")
    p.add_argument("--batch-tokens", type=int, default=None, help="default 16384 (2048 --cpu-smoke)")
    p.add_argument("--chunk-records", type=int, default=None, help="default: about 8 chunks per worker at the most workers")
    p.add_argument("--no-kills", action="store_true", help="only the scaling runs")
    p.add_argument("--build-only", action="store_true", help="build the forms under --work and stop (a later run reuses them)")
    p.add_argument("--budget-s", type=float, default=1500.0, help="start no new run after this many seconds")
    args = p.parse_args()
    why = None if args.cpu_smoke else refuse_device("cuda")
    if why:
        print(f"ray_multi_gpu: {why}; pass --cpu-smoke to run on the CPU", file=sys.stderr)
        return 2
    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    work = args.work / ("cpu-smoke" if args.cpu_smoke else "gpu")
    work.mkdir(parents=True, exist_ok=True)
    out_dir = args.out or work
    out_dir.mkdir(parents=True, exist_ok=True)
    forms, builds = build_forms(args, work, log)
    if args.build_only:
        print(json.dumps({"forms": {k: str(v) for k, v in forms.items()}, "builds": builds}))
        return 0
    if args.forms:
        forms = {k: v for k, v in forms.items() if k in args.forms.split(",")}
    records = work / "texts.jsonl"
    n_records, n_tokens = write_records(next(iter(forms.values())), args.tokens or (20_000 if args.cpu_smoke else 500_000),
                                        records)
    address, gpus = start_ray(args.cpu_smoke)
    workers = sorted({n for n in (int(x) for x in args.workers.split(",")) if 1 <= n <= gpus})
    if not workers:
        print(f"ray_multi_gpu: Ray sees {gpus} GPU(s): no worker count of --workers {args.workers} fits", file=sys.stderr)
        return 2
    chunk_records = args.chunk_records or max(8, n_records // (8 * workers[-1]))
    batch_tokens = args.batch_tokens or (2048 if args.cpu_smoke else 16384)
    common = ["--batch-tokens", str(batch_tokens), "--chunk-records", str(chunk_records), "--no-progress"]
    ctx = {"common": common, "ray": ["--engine", "ray", "--ray-address", address, "--provider", "cuda"],
           "local_provider": "cpu" if args.cpu_smoke else "cuda", "workers": workers, "n_records": n_records,
           "n_chunks": -(-n_records // chunk_records), "deadline": t_start + args.budget_s}
    log(f"Ray at {address} with {gpus} GPU(s); {n_records} records, ~{n_tokens} tokens, {ctx['n_chunks']} chunks; "
        f"workers {workers}")
    report: dict[str, Any] = {
        "cpu_smoke": args.cpu_smoke, "when": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}", "gpus": gpus,
        "device": device_name(args.cpu_smoke), "records": n_records, "tokens": n_tokens, "batch_tokens": batch_tokens,
        "chunk_records": chunk_records, "builds": builds, "forms": {}, "versions": versions()}
    for form, model in forms.items():
        res = scaling(form, model, records, work, ctx, log)
        res["kills"] = [] if args.no_kills else kills(form, model, records, work, ctx, log)
        report["forms"][form] = res
    report["failed"] = failures(report)
    (out_dir / "ray_multi_gpu.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out_dir / "ray_multi_gpu.md").write_text(md)
    print(json.dumps(report))
    print(md)
    if report["failed"]:
        print(f"ray_multi_gpu: failed: {', '.join(report['failed'])}", file=sys.stderr)
    return 1 if report["failed"] else 0


def device_name(cpu_smoke: bool) -> str:
    if cpu_smoke:
        return f"CPU ({os.cpu_count()} cores), 2 GPUs declared to Ray, none present"
    import torch

    names = Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return ", ".join(f"{n} x {name}" for name, n in names.items())


def versions() -> dict[str, str]:
    import onnxruntime
    import ray

    return {"ray": ray.__version__, "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}


if __name__ == "__main__":
    sys.exit(main())
