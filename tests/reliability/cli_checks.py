"""The reliability tests' checks: the CLI in-process, one-line errors, and file-tree digests that show an input
was left untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from onnxpipe.cli import main


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> str:
    """The command failed with one line (no traceback, no `unexpected`) holding every fragment; returns the line."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert "unexpected" not in lines[0], lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (symlinks not followed) -> its content hash, link target or 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
