"""How fast a loaded model directory generates: prefill ms, decode ms per step and end-to-end tokens/s per batch size.

    lm = load("out/llama-int4", provider="cuda", cuda_graph=True)
    for row in bench(lm, batches=[1, 8], prompt_tokens=128, new_tokens=128): print(row)

Greedy generation of seeded random prompts through the same loop as ``generate`` (LanguageModel._decode), with
no stop tokens, so every run produces exactly ``new_tokens`` per row. One untimed run per batch first (first-run
costs: onnxruntime's per-shape work, CUDA-graph capture), then ``repeats`` timed runs; each figure is the median
over them. prefill = from the call until the first new tokens are on the host; decode = the median time between
consecutive steps' tokens; tokens/s = batch x new tokens / the whole run. This measures onnxpipe alone: the
side-by-side runs against PyTorch, torch.compile and ONNX Runtime GenAI are scripts/bench_gpu.py's.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from onnxpipe.errors import OnnxpipeError
from onnxpipe.outputs import check_io_paths
from onnxpipe.runtime.limits import MAX_REPEATS, check_fits, check_int


@dataclass
class BenchRow:
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_ms: float  # per step (one token for every row)
    tokens_per_s: float  # generated tokens of all rows / the whole run, prefill included
    runs: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench(lm: Any, batches: Sequence[int], prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3,
          seed: int = 0) -> list[BenchRow]:
    """Time ``lm`` (a LanguageModel) at each batch size; see the module docstring for what is measured."""
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise OnnxpipeError(f"batch sizes must be >= 1, got {list(batches)}")
    check_int(prompt_tokens, "prompt tokens", 1)
    check_int(new_tokens, "new tokens", 2)  # a decode step to time
    check_int(repeats, "repeats", 1, MAX_REPEATS)
    limit = lm.session.max_positions
    if prompt_tokens + new_tokens > limit:
        raise OnnxpipeError(f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the model's {limit} positions")
    for batch in sorted(set(batches)):  # every size checked before the first is run (and before its prompts exist)
        check_fits(lm.session, batch, prompt_tokens + new_tokens, prompt_tokens)
    cfg = lm._config({"max_new_tokens": new_tokens, "stop_token_ids": []})
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batches:
        prompts = rng.integers(0, lm.session.vocab_size, (batch, prompt_tokens)).tolist()
        _run(lm, prompts, cfg)  # untimed: first-run costs
        runs = [_run(lm, prompts, cfg) for _ in range(repeats)]
        rows.append(BenchRow(
            batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
            prefill_ms=statistics.median(r[0] for r in runs) * 1e3,
            decode_ms=statistics.median(r[1] for r in runs) * 1e3,
            tokens_per_s=statistics.median(batch * new_tokens / r[2] for r in runs),
            runs=repeats,
        ))
    return rows


def check_json_output(path: Path, model_dir: Path) -> None:
    """Before any work: the rows' JSON file may not be or lie inside the model directory (``--json
    MODEL/onnxpipe.json`` overwrote the manifest), nor be a directory, and the nearest existing folder above it
    must be one (its missing folders are made when it is written)."""
    check_io_paths([model_dir], path)
    if path.is_dir():
        raise OnnxpipeError(f"{path}: is a directory; give --json a file name")
    above = Path(os.path.abspath(path)).parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise OnnxpipeError(f"{path}: cannot write here: {above} is not a directory")
    try:  # a probe, not os.access: root passes that check on read-only mounts and in /proc
        fd, probe = tempfile.mkstemp(dir=above, prefix=".onnxpipe-tmp-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OnnxpipeError(f"{path}: cannot write in {above} ({e.strerror or e})") from None


def write_json_output(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary file beside it, then renamed)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".onnxpipe-tmp-{path.name}-")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise OnnxpipeError(f"{path}: cannot write the rows' JSON ({e.strerror or e})") from None


def _run(lm: Any, prompts: list[list[int]], cfg: Any) -> tuple[float, float, float]:
    """(prefill s, median decode step s, whole run s) of one greedy generation."""
    rows = lm._rows(prompts, cfg)
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in lm._decode(rows, cfg)]  # one per step, after its tokens reached the host
    steps = np.diff(stamps)
    return stamps[0] - start, float(np.median(steps)), stamps[-1] - start


def render(rows: list[BenchRow]) -> str:
    lines = ["| batch | prompt | new tokens | prefill ms | decode ms/step | tokens/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.batch} | {r.prompt_tokens} | {r.new_tokens} | {r.prefill_ms:.2f} | {r.decode_ms:.3f} | "
              f"{r.tokens_per_s:,.0f} |" for r in rows]
    return "\n".join(lines)
