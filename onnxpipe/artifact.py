"""The model directory: model.onnx (+ external data), tokenizer files and the manifest onnxpipe.json.

The manifest is the contract between stages. A stage reads it, appends one entry to ``steps`` and writes the
whole directory anew into a temporary directory beside the target, which is renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxpipe.confine import check_external_data, check_has_graph, check_inside
from onnxpipe.errors import OnnxpipeError
from onnxpipe.outputs import (
    TMP_MARKER,
    TMP_PREFIX,
    check_folder,
    check_io_paths,
    make_temp_dir,
    mark_temp_dir,
    output_lock,
    remove_stale_temp,
    remove_temp_dir,
    resolve,
    resolved_output,
)
from onnxpipe.schema import FORMAT_VERSION, ManifestInvalid, validate_manifest

MANIFEST = "onnxpipe.json"
MODEL_FILE = "model.onnx"
MANIFEST_MAX_BYTES = 64 << 20
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights; protobuf's limit is 2 GiB
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


@dataclass
class Manifest:
    """What a model directory holds; serialised to onnxpipe.json."""

    model: dict[str, Any]
    graph: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    # -- the graph's I/O names, as the runtime and the checks need them --
    @property
    def num_layers(self) -> int:
        return int(self.graph["kv"]["num_layers"])

    def past_names(self, layer: int) -> tuple[str, str]:
        kv = self.graph["kv"]
        return kv["past_key"].format(i=layer), kv["past_value"].format(i=layer)

    def present_names(self, layer: int) -> tuple[str, str]:
        kv = self.graph["kv"]
        return kv["present_key"].format(i=layer), kv["present_value"].format(i=layer)

    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self.graph["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [t["name"] for t in self.graph["outputs"]]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model": self.model,
            "graph": self.graph,
            "tokenizer": self.tokenizer,
            "steps": self.steps,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        for key in ("model", "graph"):
            if key not in data:
                raise ValueError(f"missing key {key!r}")
        return cls(
            model=data["model"],
            graph=data["graph"],
            tokenizer=data.get("tokenizer", {}),
            steps=list(data.get("steps", [])),
            format_version=int(data.get("format_version", FORMAT_VERSION)),
        )


@dataclass
class ModelDir:
    """A model directory on disk, validated on open."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.graph.get("file", MODEL_FILE)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModelDir:
        """Open and check a model directory: onnxpipe.json against its schema (one line naming the field that is
        wrong), and every file it leads to confined to the directory (graph.file, the external data model.onnx
        names, the tokenizer files and config.json: no symlink out of it)."""
        p = Path(path)
        if not p.is_dir():
            raise OnnxpipeError(f"{p}: not a directory (a model directory is)" if p.exists() else
                                f"{p}: no such model directory")
        mf = p / MANIFEST
        if not mf.is_file():
            raise OnnxpipeError(
                f"{p}: not an onnxpipe model directory (no {MANIFEST}); make one with `onnxpipe export`"
            )
        check_inside(mf, p, MANIFEST)
        md = cls(p, read_manifest(mf))
        name = md.manifest.graph.get("file", MODEL_FILE)
        check_inside(md.model_path, p, "graph.file")
        if not md.model_path.is_file():
            raise OnnxpipeError(f"{p}: the manifest names {name}, which is missing")
        check_external_data(md.model_path, p)
        check_has_graph(md.model_path)
        check_sidecar_links(p, names=md.manifest.tokenizer.get("files", []))
        return md

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def read_manifest(mf: Path) -> Manifest:
    """onnxpipe.json, parsed and checked against the schema (``schema.validate_manifest``); any fault is one line
    naming the file and the field."""
    try:
        size = mf.stat().st_size
        if size > MANIFEST_MAX_BYTES:
            raise OnnxpipeError(f"{mf}: {size} bytes, more than a manifest holds ({MANIFEST_MAX_BYTES}); refusing it")
        data = json.loads(mf.read_bytes())
    except OSError as e:
        raise OnnxpipeError(f"{mf}: cannot read it ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = str(e).splitlines()[0][:200] if str(e) else "nested too deep"
        raise OnnxpipeError(f"{mf}: malformed manifest, not valid JSON ({why})") from None
    try:
        validate_manifest(data)
    except ManifestInvalid as e:
        raise OnnxpipeError(f"{mf}: {e}") from None
    return Manifest.from_json(data)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, directory / MANIFEST)


def copy_tokenizer_files(src: Path, dst: Path, root: Path | None = None) -> list[str]:
    """Copy the tokenizer files ``src`` holds into ``dst`` as regular files. A file that is a symlink leading out
    of ``root`` (``src`` unless given) is refused, naming it: a model directory's links are never followed out."""
    copied = []
    for name in TOKENIZER_FILES:
        if _copy_confined(src / name, dst / name, root or src):
            copied.append(name)
    return copied


def check_sidecar_links(src: Path, root: Path | None = None, names: Sequence[str] = ()) -> None:
    """Refuse, naming it, a tokenizer or config file of ``src`` that is a symlink leading out of ``root`` (``src``
    unless given); checked up front, before any work."""
    for name in (*TOKENIZER_FILES, "config.json", *names):
        if os.path.lexists(src / name):
            check_inside(src / name, root or src, "a tokenizer or config file")


def _copy_confined(f: Path, to: Path, root: Path) -> bool:
    if not os.path.lexists(f):
        return False
    check_inside(f, root, "a tokenizer or config file")
    if not f.is_file():
        return False
    shutil.copy2(f, to)
    return True


def tensor_signature(value_info: Any) -> dict[str, Any]:
    """A graph input's or output's name, numpy dtype name and shape (dim names or sizes), as the manifest lists them."""
    import onnx

    t = value_info.type.tensor_type
    return {
        "name": value_info.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
        "shape": [d.dim_param or d.dim_value for d in t.shape.dim],
    }


def copy_sidecar_files(src: Path, dst: Path) -> list[str]:
    """What a stage carries over unchanged from its input directory: tokenizer files and config.json."""
    copied = copy_tokenizer_files(src, dst)
    if _copy_confined(src / "config.json", dst / "config.json", src):
        copied.append("config.json")
    return copied


def derive_manifest(src: Manifest) -> Manifest:
    """A deep copy of an input directory's manifest, for a stage to update and append its step to."""
    return Manifest.from_json(json.loads(json.dumps(src.to_json())))


def save_onnx(model: Any, directory: Path, name: str = MODEL_FILE, threshold: int = EXTERNAL_DATA_THRESHOLD) -> str | None:
    """Save an onnx.ModelProto or onnx_ir.Model as ``directory/name``; weights go to ``name.data`` past ``threshold``
    bytes (protobuf's limit is 2 GiB). Returns the external data file's name, or None."""
    import onnx

    path = directory / name
    data = name + ".data"
    if isinstance(model, onnx.ModelProto):
        size = sum(len(t.raw_data) for t in model.graph.initializer) if model.graph.initializer else model.ByteSize()
        external = size > threshold
        onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
    else:
        import onnx_ir as ir

        size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        external = size > threshold
        if not external:  # weights still in another file (a snapshot's) would be saved as a reference to it
            ir.external_data.load_to_model(model)
        ir.save(model, str(path), external_data=data if external else None)
    return data if external else None


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Fail early, before any work, when the target exists and may not be replaced.

    Without --force an existing target is refused. With --force only a directory that onnxpipe wrote is replaced:
    one holding onnxpipe.json and no subdirectory, or an empty one. Anything else (a user's folder, the current
    directory or one above it, a file) is refused even with --force, saying why.
    """
    out_dir = Path(out_dir)
    if not os.path.lexists(out_dir):
        check_folder(out_dir)
        return
    if not force:
        raise OnnxpipeError(f"{out_dir} already exists; pass --force to replace it")
    if not out_dir.is_dir():
        raise OnnxpipeError(f"{out_dir} exists and is not a directory; not replacing it, even with --force")
    real, cwd = resolve(out_dir), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OnnxpipeError(f"{out_dir} is the current directory or holds it; not replacing it, even with --force")
    entries = list(out_dir.iterdir())
    if not entries:
        return
    if not (out_dir / MANIFEST).is_file():
        raise OnnxpipeError(
            f"{out_dir} is not a directory onnxpipe wrote (no {MANIFEST}); --force replaces only those: "
            "choose another output or remove it yourself"
        )
    sub = next((e for e in entries if e.is_dir()), None)
    if sub is not None:
        raise OnnxpipeError(
            f"{out_dir} holds a directory onnxpipe does not write ({sub.name}); not replacing it, even with --force"
        )


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str], force: bool = False,
                      inputs: Sequence[str | os.PathLike[str]] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; move it into place only if the block succeeds.

    Holds ``out_dir``'s lock throughout, and checks again, under it, that the output overlaps none of ``inputs``
    and may be replaced (``check_output_dir``). On any exception (KeyboardInterrupt included) the temporary
    directory is removed and ``out_dir`` is left as it was; if the final rename fails after the old target was moved
    aside, the old target is moved back. Leftovers of a killed run beside the target are cleaned up by the next run
    (``outputs.remove_stale_temp``): only directories marked as onnxpipe's own, for this target, by a dead process.
    """
    target = resolved_output(out_dir)
    with output_lock(target):
        check_io_paths(inputs, out_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp(target)  # may move back a target a killed run had moved aside: check after it
        check_output_dir(target, force)
        tmp = make_temp_dir(target, "build")
        try:
            yield tmp
            if os.path.lexists(target):
                check_output_dir(target, force)  # the block ran long: look again before replacing it
            _swap_into_place(tmp, target)
        except BaseException:
            remove_temp_dir(tmp)
            raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``. An existing target is first moved aside (marked, so that a run
    killed in between has it moved back by the next one), and moved back if the rename fails."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        (target / TMP_MARKER).unlink()  # after the rename: a run killed before it leaves tmp marked, for cleanup
        return
    trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-old-", dir=target.parent))
    trash.rmdir()  # only its unique name is wanted: os.replace needs the name free for a directory
    link = target.is_symlink()  # a link is moved aside as a link; its directory is not ours to mark or empty
    if not link:
        with contextlib.suppress(OSError):  # unmarked (read-only), it is never removed by a later run, only kept
            mark_temp_dir(target, target, "old")
    try:
        os.replace(target, trash)
    except BaseException:
        with contextlib.suppress(OSError):
            (target / TMP_MARKER).unlink()
        raise
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(trash, target)
        with contextlib.suppress(OSError):
            (target / TMP_MARKER).unlink()
        raise
    (target / TMP_MARKER).unlink()
    if link:
        trash.unlink()
    else:
        remove_temp_dir(trash)
