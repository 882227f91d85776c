"""bench_gpu.py's table: the floors, the markdown table of a run (--render) and its place in a docs page
(--write-docs), and the versions a run records."""

from __future__ import annotations

import sys
from pathlib import Path

from bench_gpu_anchors import ANCHORS
from bench_gpu_builds import dims


def versions() -> dict:
    import importlib.metadata as md

    v = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai-cuda",
                 "onnxruntime-genai", "onnxscript", "onnx-ir"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        import onnxruntime as ort

        v["onnxruntime (imported)"] = ort.__version__
    except Exception:  # not installed where the smoke test runs without it
        pass
    return v


def floors(res: dict, batch: int, int4: bool = False) -> dict | None:
    """The memory-bandwidth floor; for int4 rows the weight bytes are onnxpipe's int4 directory's size."""
    s = res.get("setup")
    if not s:
        return None
    if int4:
        size = (res.get("builds", {}).get("onnxpipe_int4") or {}).get("size_MB")
        if not size:
            return None
        s = dict(s, weight_bytes=size * 1e6)
    d = dims(res["shape"])
    kv_per_token = 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * (2 if res["dtype"] == "fp16" else 4)
    bw = s["copy_bw_GBs"] * 1e9
    mean_len = res["prompt"] + res["new_tokens"] / 2
    decode_s = (s["weight_bytes"] + batch * mean_len * kv_per_token) / bw
    prefill_s = s["weight_bytes"] / bw
    if s.get("matmul_TFLOPs"):
        prefill_s = max(prefill_s, 2 * s["params"] * batch * res["prompt"] / (s["matmul_TFLOPs"] * 1e12))
    return {"decode_ms": decode_s * 1e3, "prefill_ms": prefill_s * 1e3, "tok_s": batch / decode_s}


def render(res: dict) -> str:
    rows = res["rows"]
    lines = []
    s = res.get("setup", {})
    if s:
        lines.append(f"Model: {res['shape']} ({s['params'] / 1e6:.1f}M params, {s['weight_bytes'] / 1e9:.2f} GB of "
                     f"{res['dtype']} weights); prompt {res['prompt']}, {res['new_tokens']} new tokens, greedy, median "
                     f"of {res['repeats']} timed runs. Measured ceilings: device copy {s['copy_bw_GBs']:.0f} GB/s "
                     f"(read + write), matmul {s.get('matmul_TFLOPs') or 0:.0f} TFLOP/s.")
        lines.append("")
    lines.append("| anchor | batch | prefill ms | decode ms/step | tokens/s | peak GPU MB | decode vs fastest anchor "
                 "| decode vs floor | tok/s vs floor | prefill vs fastest |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    # "fastest anchor": the fastest of the others (not onnxpipe's rows), int4 rows against int4 anchors
    anchors = [r for r in rows if not r["anchor"].startswith("onnxpipe")]
    for batch, int4 in sorted({(r["batch"], "int4" in r["anchor"]) for r in rows}):
        here = [r for r in rows if r["batch"] == batch and ("int4" in r["anchor"]) == int4]
        mine = [r for r in anchors if r["batch"] == batch and ("int4" in r["anchor"]) == int4]
        best_dec = min((r["decode_ms"] for r in mine), default=None)
        best_pre = min((r["prefill_ms"] for r in mine), default=None)
        f = floors(res, batch, int4)
        for r in sorted(here, key=lambda r: list(ANCHORS).index(r["anchor"])):
            ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
            lines.append(
                f"| {ANCHORS[r['anchor']]} | {batch} | {r['prefill_ms']:.1f} | {r['decode_ms']:.3f} | {r['tok_s']:,.0f} | "
                f"{r.get('peak_mem_MB', '-')} | {ratio(r['decode_ms'], best_dec)} | "
                f"{ratio(r['decode_ms'], f['decode_ms']) if f else '-'} | "
                f"{ratio(r['tok_s'], f['tok_s']) if f else '-'} | {ratio(r['prefill_ms'], best_pre)} |")
        if f:
            lines.append(f"| *floor{' (int4 bytes)' if int4 else ''}* | {batch} | {f['prefill_ms']:.2f} | "
                         f"{f['decode_ms']:.3f} | {f['tok_s']:,.0f} | | | | | |")
    for r in rows:
        sa = r.get("info", {}).get("torch_self_agreement")
        if sa:
            lines.append("")
            lines.append(f"PyTorch against its own {res['dtype']} greedy tokens (batch {r['batch']}, teacher-forced): "
                         f"its {res['dtype']} model in one full forward {sa['full_forward']:.1%}; the same weights in "
                         f"fp32 {sa['fp32']:.1%}; its own rerun, free-running, "
                         f"{r['info'].get('torch_rerun_free_running_equal', float('nan')):.1%} of positions equal.")
    said: dict[str, list[str]] = {}  # the same figures from several onnxpipe rows are said once, naming them all
    for r in rows:
        ag = r.get("info", {}).get("agreement_vs_torch")
        if ag:
            int4 = "int4" in r["anchor"]
            text = (f"(batch {r['batch']}, {ag['steps']} steps x {ag['rows']} rows): free-running "
                    f"{ag['free_running_equal']:.1%} of positions equal (first divergence per row "
                    f"{ag['first_divergence']}); teacher-forced {ag['teacher_forced']:.1%}." + (
                        f" Where the teacher-forced argmaxes differ, PyTorch's own top-1 led its top-2 by at most "
                        f"{max(ag['torch_margin_at_misses']):.4f} (median margin over all positions "
                        f"{ag['torch_margin_median']:.4f})." if ag.get("torch_margin_at_misses") and not int4 else "")
                    + (" int4 weights: this measures the quantization of random weights (see the int4 build's "
                       "perplexity change), not the runtime." if int4 else ""))
            said.setdefault(text, []).append(ANCHORS[r["anchor"]])
    for text, anchors in said.items():
        lines.append("")
        lines.append(f"Greedy agreement with PyTorch {res['dtype']}'s tokens, {'; '.join(anchors)} {text}")
    for r in rows:  # the same int4 weights through other kernels: the plain int4 run's tokens are the reference
        ag = r.get("info", {}).get("agreement_vs_int4")
        if ag:
            lines.append("")
            lines.append(f"Greedy agreement of {ANCHORS[r['anchor']]} with the plain int4 run's tokens (batch "
                         f"{r['batch']}, {ag['steps']} steps x {ag['rows']} rows): free-running "
                         f"{ag['free_running_equal']:.1%} of positions equal (first divergence per row "
                         f"{ag['first_divergence']}).")
    for r in rows:
        sp = r.get("info", {}).get("step_split_ms")
        if r.get("info", {}).get("graph", "optimized").startswith("exported"):
            lines.append(f"- onnxpipe b{r['batch']} ran the {_plain(r['info']['graph'], 300)}")
        if sp:
            lines.append(f"- {ANCHORS[r['anchor']]} b{r['batch']}: decode step {sp['step']} ms = decoder graph run "
                         f"{sp['decoder_run']} + argmax head run {sp['head_run']} + host work (bind, upload, read back, "
                         f"Python) {sp['other']}")
    p = res.get("profile")
    if p:
        lines.append(f"- onnxpipe b1 ORT profile ({p.get('graph', 'optimized')} graph, {p['steps']} decode steps): model_run {p['model_run_ms']} ms/step, "
                     f"kernels {p['kernel_ms_total']} ms/step; by op: "
                     + ", ".join(f"{k} {v}" for k, v in list(p["kernel_ms_by_op"].items())[:8]))
    if res["skipped"]:
        lines.append("")
        lines += [f"- skipped: {k['what']}: {_plain(k['why'])}" for k in res["skipped"]]
    b = res.get("builds", {})
    if b:
        lines.append("")
        lines.append("Builds: " + "; ".join(f"{k} {v.get('seconds', '?')} s" + (f" ({v['error']})" if "error" in v else "")
                                          for k, v in b.items()))
        opt = b.get("optimize")
        if opt:
            lines.append(f"onnxpipe graph: fused ops {opt.get('fused_ops')}, KV shares buffer: {opt.get('shares_buffer')}")
    for n in res.get("notes", []):
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def _plain(text: str, limit: int = 400) -> str:
    """A child's error for a markdown line: no terminal colour codes, no pipes, bounded."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text).replace("|", "/")
    return text if len(text) <= limit else text[:limit] + " ..."


def write_docs(res: dict, docs: Path) -> None:
    """Replace (or append) the "## GPU decode" section of docs/benchmarks.md with this run's table."""
    v = res["versions"]
    s = res.get("setup", {})
    body = [
        "## GPU decode: onnxpipe against PyTorch, torch.compile and ORT GenAI",
        "",
        f"`{res['command']}` (scripts/bench_gpu.py; one device call) — {res['date']}, {s.get('gpu', res.get('device', '?'))}.",
        "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
        "",
        render(res).rstrip(),
        "",
    ]
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    head = "## GPU decode"
    start = text.find(head)
    if start >= 0:
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + "\n".join(body) + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + "\n".join(body)
    docs.write_text(text)


