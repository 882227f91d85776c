"""Writing an output without harming anything else: the input/output overlap guard, a lock per output, and
temporary directories that a later run can clean up without ever touching a user's data.

Every command that writes calls these three, whatever it writes (a model directory, a results file):

    check_io_paths(inputs, output)   refuse an output that is, holds, or sits inside an input
    with output_lock(output): ...    refuse a second run writing the same output at the same time
    make_temp_dir(target, role)      a marked temporary directory beside ``target``; remove_stale_temp() removes
                                     those of dead runs, and nothing else
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from onnxpipe.errors import OnnxpipeError

TMP_PREFIX = ".onnxpipe-tmp-"
TMP_MARKER = ".onnxpipe-tmp.json"  # inside every temporary directory onnxpipe makes: who made it, for which target
LOCK_PREFIX = ".onnxpipe-lock-"

PathLike = str | os.PathLike[str]


def resolved_output(output: PathLike) -> Path:
    """The absolute path ``output`` names, its directories resolved (``..``, symlinks) but its last component kept:
    writing ``output`` replaces that name, even when it is a symlink."""
    p = Path(output).absolute()
    if p.name in ("", ".", ".."):
        return resolve(p)
    return resolve(p.parent) / p.name


def resolve(path: PathLike) -> Path:
    """``Path.resolve()``, with a symlink loop or an unreadable directory on the way a one-line error."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:
        raise OnnxpipeError(f"{path}: cannot resolve this path ({e})") from None


def check_io_paths(inputs: Sequence[PathLike], output: PathLike) -> None:
    """Refuse, in one line naming both paths, an ``output`` that is one of ``inputs``, lies inside one, or holds
    one; compared after resolving ``..`` and symlinks (the output's last component too, so that an output that is a
    symlink to the input is refused), and by device and inode where both exist."""
    out_named = resolved_output(output)
    out_real = resolve(output)
    for given in inputs:
        inp = resolve(given)
        relation = _overlap(inp, out_real) or _overlap(inp, out_named)
        if relation is None and out_real.exists() and inp.exists():
            with contextlib.suppress(OSError):
                if os.path.samefile(inp, out_real):
                    relation = "is"
        if relation is not None:
            raise OnnxpipeError(
                f"{output}: the output {relation} the input {given}; choose an output outside the input "
                "(nothing was written)"
            )


def _overlap(inp: Path, out: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if out in inp.parents:
        return "contains"
    return None


# -- locks --------------------------------------------------------------------------------------------------------

_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth (a stage and its writer both lock)
_held_guard = threading.Lock()


def lock_path(output: PathLike) -> Path:
    """The lock file of ``output``: ``.onnxpipe-lock-<name>`` in its (resolved) parent directory."""
    target = resolved_output(output)
    return target.parent / f"{LOCK_PREFIX}{target.name}"


@contextlib.contextmanager
def output_lock(output: PathLike) -> Iterator[Path]:
    """Hold the lock of ``output`` for the block: a non-blocking ``flock`` on ``lock_path(output)``.

    A second run (another process) that wants the same output gets OnnxpipeError("another onnxpipe run is writing
    <output>") at once instead of waiting or corrupting it. The lock is released on exit, and by the kernel when the
    process dies (kill -9 included). Re-entrant within one process. Creates the output's parent directory. Yields
    the lock file's path.
    """
    path = lock_path(output)
    with _held_guard:
        if path in _held:
            _held[path] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    _make_folder(path.parent, output)
    fd = _acquire(path, output)
    with _held_guard:
        _held[path] = 1
    try:
        yield path
    finally:
        with _held_guard:
            del _held[path]
        # unlink while still holding it: a run waiting on the old file sees it gone and retries on a fresh one
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def check_folder(output: PathLike) -> None:
    """Refuse, before any work, an ``output`` whose folder cannot be made or written: a file on its way (``-o
    notes.txt/out`` was an unexpected FileExistsError), or a folder where nothing can be created (a read-only mount,
    no permission: found only when the lock was taken, which export and quantize do after their whole run). The
    nearest existing folder is probed with a file made and removed at once, not ``os.access``, which root passes."""
    folder = Path(os.path.abspath(output)).parent
    existing = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise OnnxpipeError(f"{output}: cannot make the folder it goes in ({existing} is not a directory)")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=TMP_PREFIX + "probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OnnxpipeError(f"{output}: cannot write in {existing} ({e.strerror or e})") from None


def _make_folder(folder: Path, output: PathLike) -> None:
    """The folder ``output`` goes in, made where missing."""
    check_folder(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OnnxpipeError(f"{output}: cannot make the folder it goes in ({e.strerror or e})") from None


def _acquire(path: Path, output: PathLike) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OnnxpipeError(f"{path}: cannot create the lock file for {output} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OnnxpipeError(
                    f"another onnxpipe run is writing {output} (lock {path}); wait for it to finish"
                ) from None
            raise OnnxpipeError(f"{path}: cannot lock {output} ({e.strerror})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder released and unlinked it between our open and our flock: take a fresh one


# -- temporary directories beside a target -------------------------------------------------------------------------

def make_temp_dir(target: PathLike, role: str = "build") -> Path:
    """A new directory ``.onnxpipe-tmp-<name>-<random>`` beside ``target``, marked with who made it (host, pid),
    for which target, and in which role, so that ``remove_stale_temp`` can tell it from anything else."""
    target = resolved_output(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    mark_temp_dir(tmp, target, role)
    return tmp


@contextlib.contextmanager
def temp_dir(target: PathLike, role: str) -> Iterator[Path]:
    """``make_temp_dir`` for the block, removed after it (a killed run's is removed by the next run's
    ``remove_stale_temp``)."""
    tmp = make_temp_dir(target, role)
    try:
        yield tmp
    finally:
        remove_temp_dir(tmp)


def mark_temp_dir(directory: Path, target: PathLike, role: str) -> None:
    marker = {"pid": os.getpid(), "host": socket.gethostname(), "target": resolved_output(target).name, "role": role}
    (directory / TMP_MARKER).write_text(json.dumps(marker) + "\n")


def read_marker(directory: Path) -> dict | None:
    """The marker of a directory onnxpipe made, or None (no marker, unreadable, or not ours)."""
    try:
        data = json.loads((directory / TMP_MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or not isinstance(data.get("target"), str):
        return None
    return data


def remove_temp_dir(directory: Path) -> None:
    """Remove a marked temporary directory, its marker last: a run killed halfway leaves it still marked."""
    if directory.is_symlink() or not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.name == TMP_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()
    with contextlib.suppress(OSError):
        (directory / TMP_MARKER).unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()


def stale_temp_dirs(target: PathLike) -> list[tuple[Path, dict]]:
    """Temporary directories of ``target`` left by runs that are gone: a real directory (not a symlink) named with
    our prefix and the target's name, holding our marker for this very target, made on this host by a process that
    no longer exists. Anything else, whatever its name, is not ours to remove."""
    target = resolved_output(target)
    found = []
    for p in target.parent.glob(f"{TMP_PREFIX}{target.name}-*"):
        if p.is_symlink() or not p.is_dir():
            continue
        marker = read_marker(p)
        if marker is None or marker["target"] != target.name or marker.get("host") != socket.gethostname():
            continue
        if _alive(marker["pid"]):
            continue
        found.append((p, marker))
    return found


def remove_stale_temp(target: PathLike) -> list[Path]:
    """Remove ``target``'s temporary directories left by dead runs (see ``stale_temp_dirs``); returns them. A
    directory a killed run had moved aside as the old target (role "old") is moved back when the target is missing,
    and removed only when a newer target stands in its place. Call with the target's lock held."""
    target = resolved_output(target)
    removed = []
    for p in target.parent.glob(f"{TMP_PREFIX}{target.name}-*"):
        # a run killed between making its directory and finishing its marker leaves it empty but for a partial
        # marker: nothing of a user's is in it
        if not p.is_symlink() and p.is_dir() and read_marker(p) is None and _empty_but_marker(p):
            with contextlib.suppress(OSError):
                (p / TMP_MARKER).unlink(missing_ok=True)
                p.rmdir()
                removed.append(p)
    for p, marker in stale_temp_dirs(target):
        if marker.get("role") == "old" and not os.path.lexists(target):
            os.replace(p, target)
            with contextlib.suppress(OSError):
                (target / TMP_MARKER).unlink()
            continue
        remove_temp_dir(p)
        removed.append(p)
    return removed


def _empty_but_marker(directory: Path) -> bool:
    try:
        entries = list(directory.iterdir())
    except OSError:
        return False
    return all(e.name == TMP_MARKER and not e.is_symlink() and e.is_file() for e in entries)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
