"""Ctrl-C in the middle of a write: a real SIGINT sent to a real `onnxpipe` process while it is writing.

The process runs `onnxpipe.cli.main` with one writing function wrapped so that, once it has written, it says so on
stderr and waits: the test sends SIGINT at that moment (not at a guessed time). export, optimize and quantize are
stopped after the manifest has been written into their temporary directory, the last file before the rename;
score between a chunk's rows being appended and the checkpoint that covers them.

The promise: exit code 130 and one line saying what was kept, no traceback, no output directory and nothing
temporary beside it, the input byte-identical; a score run resumed afterwards holds every record exactly once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import digest

STALL = r"""
import importlib, sys, time
module, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
target = importlib.import_module(module)
real, calls = getattr(target, name), []

def stalled(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == nth:
        print("STALLED AFTER " + name, file=sys.stderr, flush=True)
        time.sleep(300)
    return result

setattr(target, name, stalled)
from onnxpipe.cli import main
main(sys.argv[4:], prog_name="onnxpipe")
"""

# the module whose write_manifest each command calls last in its temporary directory (export: the stamped method)
WRITER = {"export": "onnxpipe.export.stream", "optimize": "onnxpipe.artifact", "quantize": "onnxpipe.quant.pipeline"}


def interrupt_while_writing(module: str, name: str, nth: int, args: list[object], timeout: float = 240) -> tuple[int, str]:
    """Run `onnxpipe ARGS` with ``module.name`` stalling after its ``nth`` call; SIGINT it there. (exit code, stderr)"""
    proc = subprocess.Popen([sys.executable, "-c", STALL, module, name, str(nth), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # the command's own log lines come first
        seen.append(line)
        if line.startswith("STALLED AFTER"):
            proc.send_signal(signal.SIGINT)
            break
    else:
        proc.wait(timeout)
        pytest.fail("the command ended before it stalled:\n" + "".join(seen))
    _, rest = proc.communicate(timeout=timeout)
    return proc.returncode, rest


def assert_interrupted(code: int, stderr: str, message: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 130, stderr
    assert "Traceback" not in stderr and lines == [message], stderr


@pytest.mark.parametrize("command", ["optimize", "quantize", "export"])
def test_sigint_while_writing_a_model_directory_leaves_nothing(command, tiny_hf, model_copy, tmp_path: Path) -> None:
    if command == "export":
        src = tmp_path / "hf"
        import shutil

        shutil.copytree(tiny_hf("llama"), src)
        extra: list[object] = ["--no-verify"]
    else:
        from tiny import save_byte_tokenizer

        src = model_copy("in")
        save_byte_tokenizer(src)  # quantize reads its eval text with the model's tokenizer
        extra = ["--mode", "dynamic"] if command == "quantize" else ["--skip-verify"]
    out = tmp_path / "out" / "model"
    before = digest(src)
    code, stderr = interrupt_while_writing(WRITER[command], "write_manifest", 1, [command, src, "-o", out, *extra])
    assert_interrupted(code, stderr, "interrupted; nothing was written")
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == []  # no temporary directory, no lock file
    assert digest(src) == before


def test_sigint_between_rows_and_checkpoint_then_resume_scores_each_record_once(model_copy, tmp_path: Path) -> None:
    model = model_copy("m")
    records = [{"id": f"r{i}", "input_ids": [(7 * i + j) % 256 for j in range(3 + i % 5)]} for i in range(12)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "scores.jsonl"
    args = ["score", model, inp, "-o", out, "--provider", "cpu", "--chunk-records", 4, "--no-progress"]
    before = digest(model), inp.read_bytes()
    code, stderr = interrupt_while_writing("onnxpipe.score.engine_local", "append_jsonl", 2, args)
    assert_interrupted(code, stderr, f"interrupted; the records scored so far are kept in {out}: rerun with --resume "
                                     "to continue")
    assert len(out.read_text().splitlines()) == 8  # two chunks appended, the second not yet in the checkpoint
    done = subprocess.run([sys.executable, "-m", "onnxpipe", *map(str, args), "--resume"], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert [json.loads(ln)["id"] for ln in out.read_text().splitlines()] == [r["id"] for r in records]
    assert (digest(model), inp.read_bytes()) == before
