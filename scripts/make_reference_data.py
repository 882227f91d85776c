"""Cut the CPython standard library's .py sources into train / eval / calibration text, once.

The stdlib differs between Python versions, so this runs once and its outputs are committed under data/:
eval.txt and calibration.txt as plain text, train.txt.xz compressed, and manifest.json listing every
source file of every split with its sha256. Later training and evaluation read only data/.

    python scripts/make_reference_data.py            # writes data/ from this machine's stdlib
    python scripts/make_reference_data.py --check    # re-cuts in memory and compares with data/manifest.json

The rule (data/README.md says it in words):
  1. take every *.py under the stdlib directory, minus site-packages, tests (any directory named test, tests
     or idle_test, any file test_*.py), idlelib, turtledemo, generated tables and machine-specific files
     (encodings/, pydoc_data/, config-*/, _sysconfigdata_*.py), and files that are not UTF-8 or are blank;
  2. order the files by sha256(SPLIT_SALT + ":" + relative path), a stable pseudo-random order;
  3. walk that order: a file of at most HELD_OUT_MAX_FILE_BYTES goes to eval while eval stays within
     EVAL_BUDGET_BYTES, else to calibration while that stays within CALIBRATION_BUDGET_BYTES; every other
     file goes to train. Whole files only, so no file is split across two sets.
Each document is the file's text with line endings normalized to "\\n" and a final newline ensured,
followed by the separator token DOC_SEPARATOR.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SPLIT_SALT = "onnxpipe-stdlib-split-v1"
DOC_SEPARATOR = "<|endoftext|>"
HELD_OUT_MAX_FILE_BYTES = 48_000
EVAL_BUDGET_BYTES = 256_000
CALIBRATION_BUDGET_BYTES = 256_000

EXCLUDED_TOP_LEVEL = {"site-packages", "idlelib", "turtledemo", "encodings", "pydoc_data", "lib-dynload",
                      "ensurepip", "__pycache__"}
EXCLUDED_DIR_NAMES = {"test", "tests", "idle_test", "__pycache__"}

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
SPLITS = ("train", "eval", "calibration")
OUTPUT_NAMES = {"train": "train.txt.xz", "eval": "eval.txt", "calibration": "calibration.txt"}


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # posix path relative to the stdlib directory
    text: str     # normalized text, ends with "\n"
    sha256: str   # of the normalized text's UTF-8 bytes

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))

    @property
    def split_key(self) -> str:
        return hashlib.sha256(f"{SPLIT_SALT}:{self.relpath}".encode()).hexdigest()


def is_excluded(relpath: str) -> bool:
    parts = relpath.split("/")
    if parts[0] in EXCLUDED_TOP_LEVEL or parts[0].startswith("config-"):
        return True
    if any(p in EXCLUDED_DIR_NAMES for p in parts[:-1]):
        return True
    name = parts[-1]
    return name.startswith("test_") or name.startswith("_sysconfigdata_")


def read_source(path: Path, relpath: str) -> SourceFile | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip() or DOC_SEPARATOR in text or "\x00" in text:
        return None
    if not text.endswith("\n"):
        text += "\n"
    return SourceFile(relpath, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def find_sources(stdlib_dir: Path) -> tuple[list[SourceFile], list[str]]:
    """All eligible stdlib sources, and the relative paths of eligible-by-name files that were unreadable."""
    sources, rejected = [], []
    for path in sorted(stdlib_dir.rglob("*.py")):
        relpath = path.relative_to(stdlib_dir).as_posix()
        if is_excluded(relpath) or not path.is_file():
            continue
        source = read_source(path, relpath)
        if source is None:
            rejected.append(relpath)
        else:
            sources.append(source)
    return sources, rejected


def assign_splits(sources: list[SourceFile]) -> dict[str, list[SourceFile]]:
    splits: dict[str, list[SourceFile]] = {name: [] for name in SPLITS}
    used = {"eval": 0, "calibration": 0}
    budget = {"eval": EVAL_BUDGET_BYTES, "calibration": CALIBRATION_BUDGET_BYTES}
    for source in sorted(sources, key=lambda s: s.split_key):
        target = "train"
        if source.nbytes <= HELD_OUT_MAX_FILE_BYTES:
            for held_out in ("eval", "calibration"):
                if used[held_out] + source.nbytes <= budget[held_out]:
                    target = held_out
                    used[held_out] += source.nbytes
                    break
        splits[target].append(source)
    return splits


def join_documents(sources: list[SourceFile]) -> str:
    return "".join(source.text + DOC_SEPARATOR for source in sources)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_manifest(stdlib_dir: Path, splits: dict[str, list[SourceFile]], rejected: list[str]) -> dict:
    manifest = {
        "source": {
            "python_version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "stdlib_dir": str(stdlib_dir),
        },
        "rule": {
            "split_salt": SPLIT_SALT,
            "doc_separator": DOC_SEPARATOR,
            "held_out_max_file_bytes": HELD_OUT_MAX_FILE_BYTES,
            "eval_budget_bytes": EVAL_BUDGET_BYTES,
            "calibration_budget_bytes": CALIBRATION_BUDGET_BYTES,
            "excluded_top_level": sorted(EXCLUDED_TOP_LEVEL) + ["config-*"],
            "excluded_dir_names": sorted(EXCLUDED_DIR_NAMES),
            "excluded_file_prefixes": ["test_", "_sysconfigdata_"],
            "rejected_unreadable_or_blank": rejected,
        },
        "splits": {},
    }
    for name in SPLITS:
        text = join_documents(splits[name])
        manifest["splits"][name] = {
            "output": OUTPUT_NAMES[name],
            "text_sha256": sha256_text(text),
            "text_bytes": len(text.encode("utf-8")),
            "n_files": len(splits[name]),
            "files": [{"path": s.relpath, "bytes": s.nbytes, "sha256": s.sha256} for s in splits[name]],
        }
    return manifest


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_outputs(out_dir: Path, splits: dict[str, list[SourceFile]], manifest: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        data = join_documents(splits[name]).encode("utf-8")
        if OUTPUT_NAMES[name].endswith(".xz"):
            data = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
        write_atomic(out_dir / OUTPUT_NAMES[name], data)
    write_atomic(out_dir / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())


def read_split_text(name: str, data_dir: Path = DATA_DIR) -> str:
    """The committed text of one split ('train', 'eval' or 'calibration'), checked against the manifest."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    entry = manifest["splits"][name]
    raw = (data_dir / entry["output"]).read_bytes()
    if entry["output"].endswith(".xz"):
        raw = lzma.decompress(raw)
    text = raw.decode("utf-8")
    if sha256_text(text) != entry["text_sha256"]:
        raise ValueError(f"{data_dir / entry['output']} does not match the sha256 in {data_dir / 'manifest.json'}; "
                         "re-run scripts/make_reference_data.py or restore the file from git")
    return text


def check_against_manifest(stdlib_dir: Path, data_dir: Path) -> int:
    """Re-cut in memory and compare with the committed manifest; returns the number of differences."""
    committed = json.loads((data_dir / "manifest.json").read_text())
    sources, rejected = find_sources(stdlib_dir)
    fresh = build_manifest(stdlib_dir, assign_splits(sources), rejected)
    differences = 0
    for name in SPLITS:
        old = {f["path"]: f["sha256"] for f in committed["splits"][name]["files"]}
        new = {f["path"]: f["sha256"] for f in fresh["splits"][name]["files"]}
        for path in sorted(old.keys() | new.keys()):
            if old.get(path) != new.get(path):
                differences += 1
                print(f"{name}: {path}: committed {old.get(path, 'absent')[:12]} here {new.get(path, 'absent')[:12]}")
        same = committed["splits"][name]["text_sha256"] == fresh["splits"][name]["text_sha256"]
        print(f"{name}: {len(new)} files here, {len(old)} committed, text sha256 {'matches' if same else 'DIFFERS'}")
    print(f"committed from Python {committed['source']['python_version']}, this is {platform.python_version()}; "
          f"{differences} file differences")
    return differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="stdlib directory to read (default: this interpreter's)")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory (default: data/)")
    parser.add_argument("--check", action="store_true",
                        help="do not write; re-cut and compare with OUT/manifest.json (exit 1 on any difference)")
    args = parser.parse_args()

    if args.check:
        return 1 if check_against_manifest(args.stdlib, args.out) else 0
    sources, rejected = find_sources(args.stdlib)
    if not sources:
        print(f"no .py sources found under {args.stdlib}; pass --stdlib DIR", file=sys.stderr)
        return 1
    splits = assign_splits(sources)
    manifest = build_manifest(args.stdlib, splits, rejected)
    write_outputs(args.out, splits, manifest)
    for name in SPLITS:
        entry = manifest["splits"][name]
        print(f"{name:12s} {entry['n_files']:4d} files {entry['text_bytes']:>10,d} bytes -> {args.out / entry['output']}")
    if rejected:
        print(f"rejected (not UTF-8, blank, or containing the separator): {len(rejected)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
