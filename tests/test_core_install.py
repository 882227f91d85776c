"""The core install runs a model directory (generate, score, inspect, bench; serve imports) with no torch and no
transformers.

The cheap test runs the CLI in a subprocess where importing either one raises; the slow one builds a fresh venv
(no system site packages), installs the core and onnxruntime there, and runs `onnxpipe generate` on a directory
this environment exported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from tiny import save_byte_tokenizer

REPO = Path(__file__).resolve().parents[1]

# a finder first on sys.meta_path: importing torch or transformers (or a submodule) raises, as in a core install
BLOCKED_RUN = """
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the core install has none)", name=name)
sys.meta_path.insert(0, NotInstalled())
import onnxpipe.inspect, onnxpipe.runtime, onnxpipe.runtime.generate, onnxpipe.score, onnxpipe.serve.app, onnxpipe.tokenizer
from onnxpipe.cli import main
sys.argv = ["onnxpipe"] + sys.argv[1:]
try:
    main()
finally:
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    assert not leaked, leaked
"""


@pytest.fixture(scope="module")
def model_dir(tiny_onnx: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("core") / "model"
    shutil.copytree(tiny_onnx("llama"), out)
    save_byte_tokenizer(out)
    return out


def _blocked(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_runtime_commands_run_without_torch_or_transformers(model_dir: Path, tmp_path: Path) -> None:
    gen = _blocked("generate", model_dir, "--prompt", "def f", "--max-new-tokens", "4", "--provider", "cpu")
    assert gen.returncode == 0, gen.stderr
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps({"text": "hello world"}) + "\n" + json.dumps({"text": "def fib(n):"}) + "\n")
    score = _blocked("score", model_dir, records, "-o", tmp_path / "out.jsonl", "--no-progress")
    assert score.returncode == 0, score.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    shown = _blocked("inspect", model_dir)
    assert shown.returncode == 0 and "llama" in shown.stdout, shown.stderr
    bench = _blocked("bench", model_dir, "--batch", "1", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1")
    assert bench.returncode == 0, bench.stderr


def test_the_blocker_blocks(model_dir: Path) -> None:
    """Export needs torch: under the blocker it fails in one line naming the extra, so the runs above had none."""
    out = _blocked("export", model_dir, "-o", model_dir.parent / "never")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["Error: export needs torch, which is not installed: "
                                               "pip install 'onnxpipe[export]'"]


@pytest.mark.slow
def test_fresh_venv_core_install_generates(model_dir: Path, tmp_path: Path) -> None:
    """pip install -e . (core) + onnxruntime into a venv of its own, then `onnxpipe generate` there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), "-e",
                              str(REPO), "onnxruntime"], capture_output=True, text=True, env=env, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    have = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers') "
                           "if u.find_spec(m)])"], capture_output=True, text=True, env=env)
    assert have.stdout.strip() == "[]", have.stdout
    gen = subprocess.run([str(venv / "bin" / "onnxpipe"), "generate", str(model_dir), "--prompt", "def f",
                          "--max-new-tokens", "4", "--provider", "cpu"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert gen.returncode == 0, gen.stderr
