"""kill -9 at seeded random moments of export, optimize, quantize and score, on the tiny model.

After each kill: the output is absent or complete and valid (ModelDir.open and a forward giving the tokens of an
uninterrupted run), the input is byte-identical, and once the next run has finished nothing temporary is left
beside the output or in the temporary directory. Score: at least 10 kills at seeded random moments, each followed
by ``--resume``; the output is byte-identical to an uninterrupted run's, no record lost, none twice.

Each run is a process forked from a "zygote" that has imported torch, transformers and onnxpipe once, so a cycle
costs the work and not the imports (the child runs the same `onnxpipe.cli.main` as the command line); the kill is
a real SIGKILL of that process. ``FIGURES`` counts the cycles (printed by scripts/reliability_figures.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

FIGURES: Counter = Counter()
SEED = 16

ZYGOTE = r"""
import json, os, signal, sys, time
import onnxpipe.cli
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    if "run" in job:
        pid = os.fork()
        if pid == 0:
            os.setsid()
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.chdir(job["cwd"])
            try:
                onnxpipe.cli.main(job["run"], prog_name="onnxpipe", standalone_mode=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 99
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        reply = {"pid": pid}
    else:  # {"pid": P, "kill_after": seconds or null}: wait for it, killing it (SIGKILL) at that moment if still running
        pid, deadline = job["pid"], job.get("kill_after")
        start, killed = time.monotonic(), False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() - start >= deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                killed = True
                break
            time.sleep(0.002)
        reply = {"killed": killed, "rc": os.waitstatus_to_exitcode(status)}
    print(json.dumps(reply), flush=True)
"""


class Zygote:
    """A process holding the imports; ``run`` forks a child running one onnxpipe command line."""

    def __init__(self, tmp: Path, preload: list[str]):
        self.tmp = tmp
        self.systmp = tmp / "systmp"  # TMPDIR of every run: a killed run's leftovers there can be seen
        self.systmp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(self.systmp), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, *preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=tmp)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.logs = 0

    def _ask(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def run(self, *argv: object, kill_after: float | None = None) -> tuple[bool, int, str, float]:
        """Run `onnxpipe ARGV` in a fresh child; SIGKILL it after ``kill_after`` seconds if it is still running.
        Returns (killed, exit code, its output, seconds)."""
        self.logs += 1
        log = self.tmp / f"run-{self.logs}.log"
        start = time.monotonic()
        pid = self._ask({"run": [str(a) for a in argv], "cwd": str(self.tmp), "log": str(log)})["pid"]
        reply = self._ask({"pid": pid, "kill_after": kill_after})
        return reply["killed"], reply["rc"], log.read_text(errors="replace"), time.monotonic() - start

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def tree_digest(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def strays(parent: Path, keep: set[str]) -> list[str]:
    """Entries beside the outputs that no run should leave behind (temporary, snapshot and lock leftovers)."""
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def greedy_tokens(model_dir: Path) -> list[int]:
    from onnxpipe.runtime.generate import load

    return load(model_dir, "cpu").generate([1, 5, 9, 13], max_new_tokens=4, stop_token_ids=[]).token_ids


def assert_absent_or_valid(out: Path, want_tokens: list[int]) -> str:
    """A killed run's output: not there at all, or a whole model directory that opens and runs as the reference."""
    from onnxpipe.artifact import ModelDir

    if not out.exists():
        return "absent"
    ModelDir.open(out)
    assert greedy_tokens(out) == want_tokens, f"{out}: a complete-looking output that does not run as the reference"
    return "complete"


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"), ["torch", "transformers", "onnxpipe.export", "onnxpipe.fusion",
                                                    "onnxpipe.quant", "onnxpipe.score", "onnxruntime"])
    yield z
    z.close()


def _text_model(src: Path, dest: Path) -> Path:
    """A copy of ``src`` with a byte-level tokenizer (quantize's quality report tokenizes its eval text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    shutil.copytree(src, dest)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(dest / "tokenizer.json"))
    return dest


def _stage_args(stage: str, inp: Path, out: Path, eval_file: Path) -> list[object]:
    if stage == "export":
        return ["export", inp, "-o", out]
    if stage == "optimize":
        return ["optimize", inp, "-o", out, "--level", "3"]
    return ["quantize", inp, "-o", out, "--mode", "dynamic", "--activations", "tensor", "--eval", eval_file,
            "--eval-tokens", "256"]


@pytest.mark.parametrize("stage", ["export", "optimize", "quantize"])
def test_kill_minus_9_leaves_no_half_output(stage, zygote, tiny_hf, tiny_onnx, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    inp = tmp_path / "input"
    if stage == "export":
        shutil.copytree(tiny_hf("llama"), inp)
    else:
        _text_model(tiny_onnx("llama"), inp)
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("def add(a, b):\n    return a + b\n" * 40)
    before = tree_digest(inp)

    killed, rc, log, seconds = zygote.run(*_stage_args(stage, inp, work / "ref", eval_file))
    assert not killed and rc == 0, log
    want = greedy_tokens(work / "ref")

    rng = random.Random(f"{SEED}-{stage}")
    out, ref = work / "out", work / "ref"
    # two kills into a new output (absent or complete afterwards), one while replacing a complete one with --force
    # (the old or the new one afterwards, whole); then the next run on each output, which must clean up after them
    for target in (out, out, ref):
        at = rng.uniform(0.05, 0.95) * seconds
        killed, rc, log, _ = zygote.run(*_stage_args(stage, inp, target, eval_file), "--force", kill_after=at)
        assert killed or rc == 0, log
        outcome = assert_absent_or_valid(target, want)
        assert outcome == "complete" or target == out, f"kill at {at:.2f}s lost the output it was replacing"
        assert tree_digest(inp) == before, f"kill at {at:.2f}s changed the input"
        FIGURES[f"{stage} kills"] += killed
        FIGURES[f"{stage} {outcome}{' (replacing)' if target == ref else ''}"] += 1

    for target in (ref, out):  # the next runs
        killed, rc, log, _ = zygote.run(*_stage_args(stage, inp, target, eval_file), "--force")
        assert not killed and rc == 0, log
        assert assert_absent_or_valid(target, want) == "complete"
    assert strays(work, {"ref", "out"}) == [], "left beside the outputs after the next run"
    ours = [n for n in strays(zygote.systmp, set()) if "onnxpipe" in n]  # (torch keeps caches of its own there)
    assert ours == [], "left in the temporary directory"
    assert tree_digest(inp) == before
    FIGURES[f"{stage} outputs checked"] += 5


# ---- score: 10 kills and --resume, byte-identical to an uninterrupted run ----

def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"r{i}", "input_ids": rng.integers(0, 256, int(rng.integers(2, 200))).tolist()} for i in range(n)]


def test_score_killed_ten_times_then_resumed_equals_uninterrupted(zygote, tiny_onnx, tmp_path):
    model = tiny_onnx("llama")
    records = _records(300, SEED)
    lines = [json.dumps(r) for r in records]
    lines[41] = "{not json"  # a bad record is part of the run's state too
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    before = inp.read_bytes()
    args = ["score", model, inp, "--provider", "cpu", "--chunk-records", "4", "--threads", "1", "--no-progress"]

    killed, rc, log, seconds = zygote.run(*args, "-o", tmp_path / "ref.jsonl")
    assert not killed and rc == 0, log
    ref = (tmp_path / "ref.jsonl").read_bytes()

    out = tmp_path / "out.jsonl"
    ckpt = out.with_name(out.name + ".checkpoint.json")
    rng = random.Random(f"{SEED}-score")
    kills, runs, progress = 0, 0, []
    while kills < 10:
        assert runs < 40, f"only {kills} kills landed in {runs} runs"
        # a moment inside what is left of the run (each cycle also pays the model's load again), early enough that
        # the run still has records left when the machine is twice as fast as during the reference run (a shared CI
        # machine's load changes between runs: 0.6 of what was left let a run finish first)
        left = seconds * (1 - (progress[-1] if progress else 0) / len(records))
        killed, rc, log, _ = zygote.run(*args, "-o", out, "--resume", kill_after=rng.uniform(0.02, 0.35) * left)
        runs += 1
        assert killed or rc == 0, log
        assert inp.read_bytes() == before
        if not killed:
            break  # it finished before the moment came: a further cycle would find nothing left to do
        kills += 1
        done = json.loads(ckpt.read_text()).get("records_done", 0) if ckpt.exists() else 0
        assert not progress or done >= progress[-1], "a resumed run went back"
        progress.append(done)
    killed, rc, log, _ = zygote.run(*args, "-o", out, "--resume")
    assert not killed and rc == 0, log

    FIGURES["score kills"] += kills
    assert kills >= 10, f"only {kills} kills landed before the run finished (progress {progress})"
    assert out.read_bytes() == ref, "the resumed output differs from the uninterrupted run's"
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    want = [r["id"] for i, r in enumerate(records) if i != 41]
    lost, twice = sorted(set(want) - set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    FIGURES["score records lost"] += len(lost)
    FIGURES["score records duplicated"] += len(twice)
    FIGURES["score records checked"] += len(want)
    assert not lost and not twice and len(ids) == len(want)
    assert inp.read_bytes() == before
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["bad_records"] == 1 and summary["records"] == len(want)
    assert strays(tmp_path, {"in.jsonl", "ref.jsonl", "ref.summary.json", "ref.jsonl.checkpoint.json", "out.jsonl",
                             "out.summary.json", "out.jsonl.checkpoint.json"}) == []
