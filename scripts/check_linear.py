#!/usr/bin/env python3
"""onnxpipe.Linear's CUDA kernels (csrc/linear.cu) against cuBLAS, per projection shape: error and time, one GPU call.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/check_linear.py --out $OUT/linear [--shapes 1b,8b] [--budget-s 200]
    python3 scripts/check_linear.py --dry-run --out /tmp/linear    # no GPU: the library built, every plan printed

For each float16 projection shape of the bench's build (`optimize --target cuda` packs q, k and v; the kernels'
rewrite makes gate and up one product) and M = 1, 2, 4 (the GEMV), 8, 16, 32 (the tensor-core form): random weights
W [N, K] (std 0.05) and activations, C copies of W so that the copies exceed the GPU's L2 as a decode step's weights
do, and in one torch CUDA graph each: our kernel (through ctypes, by the op's own rule, on torch's stream) over
the C copies, and torch.matmul(A, W_kn) over [K, N] copies, which is what onnxruntime's MatMul runs (cuBLAS). The
time per call is a replay's time over C (median of --repeats replays), the error each one's max against float64 of
the first copy. --sweep (default on) also times every GEMV layout at M = 1 and every mma split at M = 8 and 32,
and prints where one beats the rule by 5% or more. The `step` lines sum a decode step's projections (16 layers of
the 1B, with the head) at each M for both: the figure to hold against the bench's fp16 rows. Writes results.json
under --out; exits 1 if any error of ours passes twice cuBLAS' plus 2^-10 of the reference's largest magnitude.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (name, N, K, per layer) of the bench's float16 build after the kernels' rewrite: the packed q/k/v, o, the merged
# gate/up, down; the head once a step
SHAPES = {
    "1b": [("qkv", 3072, 2048, 1), ("o", 2048, 2048, 1), ("gate_up", 16384, 2048, 1), ("down", 2048, 8192, 1)],
    "head": [("head", 128256, 2048, 0)],
    "8b": [("8b qkv", 6144, 4096, 1), ("8b o", 4096, 4096, 1), ("8b gate_up", 28672, 4096, 1),
           ("8b down", 4096, 14336, 1)],
}
LAYERS = 16  # the 1B's
MS = (1, 2, 4, 8, 16, 32)
GEMV_LAYOUTS = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (4, 1)]  # (weight rows a warp, warps along K)
MMA_SPLITS = [4, 8, 16]
COPY_BYTES = 160 << 20  # past H100/H200's 50 MB L2
MAX_COPIES = 64
SLACK = 2.0 ** -10
SUGGEST_BELOW = 0.95


class Kernels:
    """linear.cu's entry points in the CUDA kernels library, through ctypes."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        lib.onnxpipe_linear_gemv_config.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [
            ctypes.c_void_p]
        lib.onnxpipe_linear_mma_config.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [
            ctypes.c_void_p]
        lib.onnxpipe_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
        lib.onnxpipe_linear_describe.argtypes = [ctypes.c_int] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_char_p,
                                                                                            ctypes.c_int]
        self.lib = lib

    def describe(self, m: int, n: int, k: int, form: int = 0, tile: int = 0, split: int = 0) -> str:
        buf = ctypes.create_string_buffer(256)
        code = self.lib.onnxpipe_linear_describe(form, tile, split, m, n, k, buf, len(buf))
        return buf.value.decode() if code == 0 else f"refused (code {code})"

    def call(self, layout: tuple[str, int, int], a: int, w: int, y: int, m: int, n: int, k: int, stream: int) -> None:
        form, tile, split = layout
        if form == "gemv":
            code = self.lib.onnxpipe_linear_gemv_config(tile, split, a, w, y, m, n, k, stream)
        elif form == "mma":
            code = self.lib.onnxpipe_linear_mma_config(split, a, w, y, m, n, k, stream)
        else:
            code = self.lib.onnxpipe_linear(a, w, y, m, n, k, stream)
        if code != 0:
            raise RuntimeError(f"linear {layout} M={m} N={n} K={k}: code {code}")


def shapes_for(groups: str) -> list[tuple[str, int, int, int]]:
    out = []
    for g in groups.split(","):
        if g not in SHAPES:
            raise SystemExit(f"--shapes: {g!r} is not one of {', '.join(SHAPES)}")
        out += SHAPES[g]
    return out


def step_sums(rows: list[dict]) -> list[str]:
    """Per M, a 1B decode step's projections (per layer x LAYERS, the head once) for cuBLAS and ours, where every one
    of its shapes was timed."""
    out = []
    need = {name for name, *_ in SHAPES["1b"] + SHAPES["head"]}
    for m in sorted({r["m"] for r in rows}):
        got = {r["name"]: r for r in rows if r["m"] == m and r.get("ours_us") and r.get("cublas_us")}
        if not need <= set(got):
            continue
        count = {name: (LAYERS * per if per else 1) for name, _, _, per in SHAPES["1b"] + SHAPES["head"]}
        ours = sum(count[nm] * got[nm]["ours_us"] for nm in need)
        cublas = sum(count[nm] * got[nm]["cublas_us"] for nm in need)
        out.append(f"step M={m}: cuBLAS {cublas:.1f} us, ours {ours:.1f} us ({ours - cublas:+.1f}: "
                   + ", ".join(f"{nm} {count[nm] * (got[nm]['ours_us'] - got[nm]['cublas_us']):+.1f}" for nm in sorted(need))
                   + ")")
    return out


def suggestions(sweeps: list[dict]) -> list[str]:
    """Layouts at least 5% under the rule's time on the same shape and M."""
    out = []
    for key in sorted({(s["name"], s["m"]) for s in sweeps}):
        same = [s for s in sweeps if (s["name"], s["m"]) == key and s.get("us")]
        rule = next((s for s in same if s["layout"][0] == "rule"), None)
        if rule is None or not same:
            continue
        right = [s for s in same if s.get("ok")]
        best = min(right, key=lambda s: s["us"]) if right else rule
        if best is not rule and best["us"] < SUGGEST_BELOW * rule["us"]:
            out.append(f"{key[0]} M={key[1]}: {best['layout'][0]} tile {best['layout'][1]} split {best['layout'][2]} "
                       f"{best['us']:.2f} us against the rule's {rule['us']:.2f} ({rule['plan']})")
    return out


def run_gpu(args: argparse.Namespace, kernels: Kernels, log: Any) -> dict:
    import torch

    rng = np.random.default_rng(0)
    stream = torch.cuda.current_stream()
    rows: list[dict] = []
    sweeps: list[dict] = []
    start = time.perf_counter()

    def timed(fn: Any, copies: int) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            fn()
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / copies)
        return statistics.median(times)

    for name, n, k, _ in shapes_for(args.shapes):
        if time.perf_counter() - start > args.budget_s:
            log(f"{name}: skipped (past --budget-s)")
            continue
        nbytes = n * k * 2
        copies = max(1, min(MAX_COPIES, -(-COPY_BYTES // nbytes)))
        w_nk = [torch.from_numpy((0.05 * rng.standard_normal((n, k))).astype(np.float16)).cuda()]
        w_nk += [torch.empty_like(w_nk[0]).copy_(w_nk[0]) for _ in range(copies - 1)]
        w_kn = [w.t().contiguous() for w in w_nk]
        w64 = w_nk[0].double().cpu().numpy()
        for m in args.ms:
            a_np = rng.standard_normal((m, k)).astype(np.float16)
            a = torch.from_numpy(a_np).cuda()
            ref = a_np.astype(np.float64) @ w64.T
            ys = [torch.empty((m, n), dtype=torch.float16, device="cuda") for _ in range(copies)]
            outs = [torch.empty((m, n), dtype=torch.float16, device="cuda") for _ in range(copies)]

            def ours(layout: tuple[str, int, int] = ("rule", 0, 0), a: Any = a, ys: list = ys, m: int = m,
                     weights: list = w_nk, n: int = n, k: int = k) -> None:
                sid = torch.cuda.current_stream().cuda_stream
                for w, y in zip(weights, ys):
                    kernels.call(layout, a.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k, sid)

            def cublas(a: Any = a, outs: list = outs, weights: list = w_kn) -> None:
                for w, o in zip(weights, outs):
                    torch.matmul(a, w, out=o)

            row: dict[str, Any] = {"name": name, "n": n, "k": k, "m": m, "copies": copies,
                                   "plan": kernels.describe(m, n, k)}
            try:
                row["ours_us"] = timed(ours, copies)
                row["cublas_us"] = timed(cublas, copies)
                err = float(np.abs(ys[0].double().cpu().numpy() - ref).max())
                err_cublas = float(np.abs(outs[0].double().cpu().numpy() - ref).max())
                top = float(np.abs(ref).max())
                row.update(err=err, err_cublas=err_cublas, ok=err <= 2 * err_cublas + SLACK * top,
                           ours_gbps=nbytes / row["ours_us"] / 1e3, cublas_gbps=nbytes / row["cublas_us"] / 1e3)
            except Exception as e:  # noqa: BLE001 - on the row, and the next M goes on
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", ok=False)
            rows.append(row)
            log(line(row))
            layouts = ([("gemv", t, s) for t, s in GEMV_LAYOUTS] if m == 1 else
                       [("mma", 1, s) for s in MMA_SPLITS] if m in (8, 32) else [])
            if args.sweep and layouts and row.get("ours_us"):
                sweeps.append({"name": name, "m": m, "layout": ("rule", 0, 0), "us": row["ours_us"], "ok": row["ok"],
                               "plan": row["plan"]})
                for layout in layouts:
                    entry: dict[str, Any] = {"name": name, "m": m, "layout": layout,
                                             "plan": kernels.describe(m, n, k, 1 if layout[0] == "gemv" else 2,
                                                                      layout[1], layout[2])}
                    try:
                        entry["us"] = timed(lambda layout=layout: ours(layout), copies)
                        err = float(np.abs(ys[0].double().cpu().numpy() - ref).max())
                        entry["ok"] = err <= 2 * row["err_cublas"] + SLACK * float(np.abs(ref).max())
                    except Exception as e:  # noqa: BLE001
                        entry["error"] = f"{type(e).__name__}: {e}"
                    sweeps.append(entry)
        del w_nk, w_kn
        torch.cuda.empty_cache()
    return {"rows": rows, "sweeps": sweeps}


def line(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:<10} N={r['n']:<6} K={r['k']:<5} M={r['m']:<3} ERROR {r['error']}"
    return (f"{r['name']:<10} N={r['n']:<6} K={r['k']:<5} M={r['m']:<3} ours {r['ours_us']:7.2f} us "
            f"({r['ours_gbps']:5.0f} GB/s) cuBLAS {r['cublas_us']:7.2f} us ({r['cublas_gbps']:5.0f} GB/s) "
            f"ours/cuBLAS {r['ours_us'] / r['cublas_us']:.2f} | err {r['err']:.2e} cuBLAS {r['err_cublas']:.2e} "
            f"{'ok' if r['ok'] else 'FAIL'} | {r['plan']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="1b,head", help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=200.0, help="start no new shape past this many seconds")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: build the library and print every plan")
    args = ap.parse_args()
    args.ms = tuple(int(x) for x in args.ms.split(","))
    if any(m < 1 or m > 32 for m in args.ms):
        ap.error("--ms: 1 to 32 (past 32 the op calls cuBLAS itself)")
    shapes = shapes_for(args.shapes)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    from onnxpipe.runtime.kernels.build import KernelBuildError, build_library

    try:
        library = build_library("cuda", announce=log)
    except KernelBuildError as e:
        log(f"check_linear: {e}")
        return 2
    kernels = Kernels(library)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
                              "library": str(library)}
    if args.dry_run:
        result["plans"] = {f"{name} M={m}": kernels.describe(m, n, k) for name, n, k, _ in shapes for m in args.ms}
        for key, plan in result["plans"].items():
            log(f"{key}: {plan}")
        (args.out / "results.json").write_text(json.dumps(result, indent=1))
        return 0
    import torch

    if not torch.cuda.is_available():
        log("check_linear: torch has no CUDA here (--dry-run checks the plans without a GPU)")
        return 2
    result["device"] = torch.cuda.get_device_name()
    log(f"device {result['device']}, torch {torch.__version__}")
    result.update(run_gpu(args, kernels, log))
    result["steps"] = step_sums(result["rows"])
    result["suggest"] = suggestions(result["sweeps"])
    for text in result["steps"] + [f"layouts: {s}" for s in result["suggest"]]:
        log(text)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    failed = [r for r in result["rows"] if not r.get("ok")]
    log(f"{len(result['rows'])} rows, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
