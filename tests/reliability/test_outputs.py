"""No command deletes or overwrites its own input, however the paths are spelled; --force replaces only a directory
onnxpipe wrote; one run per output at a time; a killed run's leftovers are cleaned up, and only they."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_checks import cli, digest, one_line_error

from onnxpipe.artifact import atomic_output_dir
from onnxpipe.errors import OnnxpipeError
from onnxpipe.outputs import check_io_paths, output_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the overlap guard and the --force rule, through the CLI --------------------------------------------------------

def test_optimize_into_current_directory_refused(model_copy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`optimize llama -o . --force` in a folder holding the input and a user's notes: refused, nothing touched."""
    model_copy("work/llama")
    work = tmp_path / "work"
    (work / "notes.txt").write_text("my notes")
    before = digest(work)
    monkeypatch.chdir(work)
    one_line_error(cli("optimize", "llama", "-o", ".", "--force", "--skip-verify"), ".", "llama", "contains the input")
    assert digest(work) == before


def test_optimize_into_parent_of_input_refused(model_copy, tmp_path: Path) -> None:
    """`optimize proj/m -o proj --force`: refused, proj/ and its input intact."""
    model_copy("proj/m")
    proj = tmp_path / "proj"
    (proj / "README").write_text("a user's file")
    before = digest(proj)
    one_line_error(cli("optimize", proj / "m", "-o", proj, "--force", "--skip-verify"), str(proj), "contains the input")
    assert digest(proj) == before


@pytest.mark.parametrize("command", [["optimize", "--skip-verify"], ["quantize", "--mode", "dynamic"]])
def test_output_spelled_as_input_refused(model_copy, tmp_path: Path, command: list[str]) -> None:
    """`optimize X -o X/../X --force` (and quantize): the guard compares resolved paths; X is intact."""
    x = model_copy("X")
    before = digest(x)
    one_line_error(cli(command[0], x, "-o", f"{x}/../X", "--force", *command[1:]), "is the input")
    assert digest(x) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]  # no trash, no temporary directory


def test_output_through_symlink_to_input_refused(model_copy, tmp_path: Path) -> None:
    x = model_copy("X")
    (tmp_path / "link").symlink_to(x, target_is_directory=True)
    before = digest(x)
    one_line_error(cli("optimize", x, "-o", tmp_path / "link", "--force", "--skip-verify"), "link", "is the input")
    assert digest(x) == before and (tmp_path / "link").is_symlink()


def test_output_inside_input_refused(model_copy) -> None:
    x = model_copy("X")
    before = digest(x)
    one_line_error(cli("optimize", x, "-o", x / "opt", "--skip-verify"), "is inside the input")
    assert digest(x) == before


def test_export_into_its_source_refused(tiny_hf, tmp_path: Path) -> None:
    """`export HF -o HF --force` does not replace the Hugging Face source directory."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf("llama"), hf)
    before = digest(hf)
    one_line_error(cli("export", hf, "-o", hf, "--force", "--no-verify"), "is the input")
    one_line_error(cli("export", hf, "-o", tmp_path, "--force", "--no-verify"), "contains the input")
    assert digest(hf) == before


def test_force_refuses_a_users_directory(model_copy, tmp_path: Path) -> None:
    """--force replaces only a directory onnxpipe wrote (it holds onnxpipe.json) or an empty one."""
    x = model_copy("X")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    one_line_error(cli("optimize", x, "-o", mine, "--force", "--skip-verify"), str(mine), "not a directory onnxpipe wrote")
    assert (mine / "thesis.tex").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("optimize", x, "-o", empty, "--force", "--skip-verify", "--level", "1")
    assert r.exit_code == 0, r.output
    r = cli("optimize", x, "-o", empty, "--force", "--skip-verify", "--level", "1")  # an onnxpipe directory now
    assert r.exit_code == 0, r.output
    assert json.loads((empty / "onnxpipe.json").read_text())["steps"][-1]["stage"] == "optimize"


def test_output_below_a_file_is_one_line(model_copy, tmp_path: Path) -> None:
    """`-o notes.txt/out` (a file where a folder must be) was `unexpected FileExistsError` in optimize, quantize,
    export and score; the file is left as it was."""
    from tiny import save_byte_tokenizer

    x = model_copy("X")
    save_byte_tokenizer(x)  # quantize reads text with the model's tokenizer
    notes = tmp_path / "notes.txt"
    notes.write_text("a user's file")
    records = tmp_path / "in.jsonl"
    records.write_text('{"input_ids": [1, 2, 3]}\n')
    for args in (["optimize", x, "-o", notes / "out", "--skip-verify"], ["quantize", x, "-o", notes / "a" / "out",
                                                                          "--mode", "dynamic"],
                 ["score", x, records, "-o", notes / "s.jsonl"]):
        one_line_error(cli(*args), f"{notes} is not a directory", "cannot make the folder")
    with pytest.raises(OnnxpipeError, match="is not a directory"), output_lock(notes / "deeper" / "out"):
        pass
    assert notes.read_text() == "a user's file"
    # a folder nothing can be written in (as root, only a mount like /proc shows it): refused before any work,
    # not after quantize's whole run when the output's lock is taken
    for args in (["quantize", x, "-o", "/proc/onnxpipe-test/out", "--mode", "dynamic"],
                 ["optimize", x, "-o", "/proc/onnxpipe-test/out", "--skip-verify"]):
        one_line_error(cli(*args), "/proc/onnxpipe-test/out: cannot write in /proc")


def test_check_io_paths_unit(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "alias.jsonl").symlink_to(tmp_path / "data.jsonl")
    check_io_paths([tmp_path / "in"], tmp_path / "out")  # disjoint: fine
    check_io_paths([tmp_path / "in"], tmp_path / "in-2")  # a name prefix is not containment
    for inputs, output, relation in (
        ([tmp_path / "data.jsonl"], tmp_path / "alias.jsonl", "is"),
        ([tmp_path / "in"], tmp_path / "in" / "x" / ".." / ".." / "in", "is"),
        ([tmp_path / "in"], tmp_path / "in" / "sub" / "out.jsonl", "is inside"),
        ([tmp_path / "in"], tmp_path, "contains"),
    ):
        with pytest.raises(OnnxpipeError, match=f"the output {relation} the input") as e:
            check_io_paths(inputs, output)
        assert str(output) in str(e.value) and str(inputs[0]) in str(e.value)
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    with pytest.raises(OnnxpipeError, match="cannot resolve this path"):
        check_io_paths([tmp_path / "in"], tmp_path / "loop-a" / "out")


# -- atomic replacement and stale-temporary cleanup -------------------------------------------------------------------

def _onnxpipe_dir(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "onnxpipe.json").write_text("{}")
    (path / "model.onnx").write_text(text)
    return path


def test_failed_final_rename_moves_the_old_target_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the rename of the new directory fails after the old one was moved aside, the old one is moved back."""
    out = _onnxpipe_dir(tmp_path / "out", "old")
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".onnxpipe-tmp-out-") and "-old-" not in Path(src).name:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space"), atomic_output_dir(out, force=True) as tmp:
        (tmp / "onnxpipe.json").write_text("{}")
        (tmp / "model.onnx").write_text("new")
    monkeypatch.undo()
    assert (out / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_over_a_symlink_replaces_the_link_not_its_directory(tmp_path: Path) -> None:
    real = _onnxpipe_dir(tmp_path / "real", "kept")
    (tmp_path / "out").symlink_to(real, target_is_directory=True)
    before = digest(real)
    with atomic_output_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "onnxpipe.json").write_text("{}")
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "onnxpipe.json").is_file()
    assert digest(real) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]


def test_stale_cleanup_removes_only_marked_leftovers_of_dead_runs(tmp_path: Path) -> None:
    """Only a directory with onnxpipe's marker, for this target, of a dead process is removed; a directory that
    merely looks like a leftover (our prefix and the target's name) is a user's and stays."""
    _onnxpipe_dir(tmp_path / "out", "old")
    dead = _dead_pid()

    def leftover(name: str, marker: dict | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "data.bin").write_text(name)
        if marker is not None:
            (d / ".onnxpipe-tmp.json").write_text(json.dumps(marker))
        return d

    users = leftover(".onnxpipe-tmp-out-notes", None)
    live = leftover(".onnxpipe-tmp-out-live", {"pid": os.getpid(), "host": os.uname().nodename, "target": "out"})
    other = leftover(".onnxpipe-tmp-out-x-1", {"pid": dead, "host": os.uname().nodename, "target": "out-x"})
    stale = leftover(".onnxpipe-tmp-out-dead", {"pid": dead, "host": os.uname().nodename, "target": "out",
                                                "role": "build"})
    outside = _onnxpipe_dir(tmp_path / "elsewhere", "keep")
    (outside / ".onnxpipe-tmp.json").write_text(json.dumps({"pid": dead, "host": os.uname().nodename, "target": "out"}))
    (tmp_path / ".onnxpipe-tmp-out-link").symlink_to(outside, target_is_directory=True)
    with atomic_output_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "onnxpipe.json").write_text("{}")
    assert not stale.exists()
    for kept in (users, live, other):
        assert (kept / "data.bin").read_text() == kept.name
    assert (outside / "model.onnx").read_text() == "keep"


def test_killed_swap_is_undone_by_the_next_run(tmp_path: Path) -> None:
    """A run killed after moving the old target aside and before moving the new one in: the next run moves the
    old target back (it was never deleted), then goes on."""
    old = _onnxpipe_dir(tmp_path / ".onnxpipe-tmp-out-old-abc", "old")
    (old / ".onnxpipe-tmp.json").write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename,
                                                        "target": "out", "role": "old"}))
    with pytest.raises(OnnxpipeError, match="already exists"), atomic_output_dir(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_killed_optimize_leaves_nothing_the_next_run_does_not_remove(tiny_onnx, tmp_path: Path) -> None:
    """kill -9 of a real optimize mid-run: what it left (its lock file, a temporary directory) is removed by the next
    run. optimize's pass snapshots are in memory: the lock file, made first, says the run has started."""
    out = tmp_path / "opt"
    proc = subprocess.Popen([sys.executable, "-m", "onnxpipe", "optimize", str(tiny_onnx("llama")), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.iterdir()):
        time.sleep(0.01)
    time.sleep(0.5)  # into the passes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left and not out.exists(), left  # the kill hit it mid-run: something was left
    r = cli("optimize", tiny_onnx("llama"), "-o", out, "--skip-verify", "--level", "1")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt"]


# -- one run per output --------------------------------------------------------------------------------------------

HOLD = """
import sys, time
from onnxpipe.outputs import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _holder(output: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_on_one_output_refuses(model_copy, tmp_path: Path) -> None:
    """While another process writes an output (holds its lock), optimize into it refuses; killing the holder
    (kill -9) frees it."""
    x = model_copy("X")
    out = tmp_path / "opt"
    holder = _holder(out)
    try:
        one_line_error(cli("optimize", x, "-o", out, "--skip-verify", "--level", "1"),
                       "another onnxpipe run is writing", str(out))
        one_line_error(cli("optimize", x, "-o", tmp_path / "x" / ".." / "opt", "--skip-verify", "--level", "1"),
                       "another onnxpipe run is writing")
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = cli("optimize", x, "-o", out, "--skip-verify", "--level", "1")
    assert r.exit_code == 0, r.output


def test_lock_refuses_other_processes_and_is_reentrant(tmp_path: Path) -> None:
    out = tmp_path / "scores.jsonl"
    holder = _holder(out)
    try:
        with pytest.raises(OnnxpipeError, match="another onnxpipe run is writing"), output_lock(out):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(out) as lock, output_lock(tmp_path / "." / "scores.jsonl"):
        assert lock.exists()
    assert not lock.exists()  # released and removed on exit
