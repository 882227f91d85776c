"""GGUF ingestion: read and validate a GGUF file, dequantize it once into a cached Hugging Face directory.

A GGUF (llama.cpp's format) holds the config, the tokenizer and the weights, most of them block-quantized. The
export path stays the one for Hugging Face directories: transformers dequantizes the GGUF into a plain float32
model (``from_pretrained(dir, gguf_file=NAME)``, the tokenizer too), which is saved once under the cache

    $ONNXPIPE_CACHE/gguf/<sha256 prefix>/     (default ONNXPIPE_CACHE: ~/.cache/onnxpipe)

and then exported like any other directory. ``source.json`` in that directory records where it came from; the
exporter copies that record into the manifest (``model.source``), so later stages know the weights came from
(say) Q4_1 blocks and sit on a 4-bit grid.

Needs the ``gguf`` and ``accelerate`` packages (transformers refuses GGUF loading without accelerate).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from onnxpipe.errors import OnnxpipeError, first_line

MAGIC = b"GGUF"
SOURCE_RECORD = "source.json"
CONVERSION_VERSION = 1  # bump when the conversion changes what it writes; part of the cache key
INSTALL_HINT = "pip install 'gguf>=0.10' 'accelerate>=1.0'"

# The header is walked and bounded here before gguf-py reads it: gguf-py trusts every count and length (a hostile
# array count made it loop, appending one numpy view per item, until memory ran out). Real files are far inside
# these: ~30 metadata keys, a few hundred tensors, vocabularies and merge lists of at most a few hundred thousand.
SUPPORTED_VERSIONS = (2, 3)
MAX_KV = 1 << 16  # metadata keys
MAX_TENSORS = 1 << 20
MAX_ARRAY_ITEMS = 1 << 21  # items of one metadata array
MAX_HEADER_ITEMS = 1 << 22  # metadata array items in all (gguf-py keeps one numpy view per item)
MAX_KEY_BYTES = 1 << 16  # the format's own limit on key length
MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> size
_STRING, _ARRAY = 8, 9

# GGUF general.architecture -> the transformers model_type it loads as (and our arch spec). Only architectures
# whose GGUF round trip is tested here are listed; transformers knows more, our exporter may not.
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2"}

# Tensor types transformers can dequantize through gguf-py and that the tests here round-trip.
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K",
)


@dataclass
class GGUFInfo:
    """What a GGUF file says about itself (read from the header; no tensor data is touched)."""

    path: Path
    architecture: str
    model_type: str
    name: str | None
    quant_type: str  # the type holding most weight-matrix elements, e.g. "Q4_1"
    file_type: str | None  # general.file_type as llama.cpp names it, e.g. "MOSTLY_Q4_1"
    tensor_types: dict[str, int]  # tensor type -> number of tensors
    num_tensors: int
    size_bytes: int
    special_token_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/pad/unk -> id, from the GGUF
    sha256: str = ""

    def record(self) -> dict[str, Any]:
        """The manifest's ``model.source`` entry."""
        return {
            "format": "gguf",
            "file": self.path.name,
            "path": str(self.path.absolute()),
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "architecture": self.architecture,
            "name": self.name,
            "quant_type": self.quant_type,
            "file_type": self.file_type,
            "tensor_types": self.tensor_types,
            "num_tensors": self.num_tensors,
            "special_token_ids": self.special_token_ids,
        }


def looks_like_gguf(src: str | os.PathLike[str]) -> bool:
    """A GGUF file (by magic or by suffix), or a directory with no config.json that holds *.gguf files."""
    p = Path(src)
    if p.is_file():
        return p.suffix.lower() == ".gguf" or _magic(p) == MAGIC
    if p.is_dir():
        return not (p / "config.json").exists() and any(p.glob("*.gguf"))
    return p.suffix.lower() == ".gguf"


def resolve_gguf_file(src: str | os.PathLike[str]) -> Path:
    """The GGUF file named by ``src``: the file itself, or the only *.gguf in a directory."""
    p = Path(src)
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) != 1:
            names = ", ".join(f.name for f in found) or "none"
            raise OnnxpipeError(f"{p}: expected exactly one .gguf file, found {len(found)} ({names}); pass the file itself")
        p = found[0]
    if not p.exists():
        raise OnnxpipeError(f"{p}: no such file")
    if not p.is_file():
        raise OnnxpipeError(f"{p}: not a file")
    if _magic(p) != MAGIC:
        raise OnnxpipeError(f"{p}: not a GGUF file (the first bytes are not 'GGUF')")
    return p


def read_gguf(src: str | os.PathLike[str]) -> GGUFInfo:
    """Read and validate a GGUF's header: a supported architecture and only supported tensor types."""
    path = resolve_gguf_file(src)
    gguf = _import_gguf()
    check_header(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError, ... on a broken file
        raise OnnxpipeError(f"{path}: unreadable GGUF ({first_line(e)})") from None
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        raise OnnxpipeError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    name = _field(reader, "general.name")
    if name is not None and not isinstance(name, str):
        name = None  # a malformed name is left out of the record, as an absent one
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    bad = sorted(set(counts) - set(SUPPORTED_TENSOR_TYPES))
    if bad:
        raise OnnxpipeError(
            f"{path}: unsupported GGUF tensor type(s) {', '.join(bad)}; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    if not reader.tensors:
        raise OnnxpipeError(f"{path}: the GGUF holds no tensors")
    file_type = _field(reader, "general.file_type")
    return GGUFInfo(
        path=path,
        architecture=arch,
        model_type=GGUF_ARCHITECTURES[arch],
        name=str(name) if name is not None else None,
        quant_type=_dominant_weight_type(reader),
        file_type=_file_type_name(gguf, file_type),
        tensor_types=dict(sorted(counts.items())),
        num_tensors=len(reader.tensors),
        size_bytes=path.stat().st_size,
        special_token_ids=_special_token_ids(reader),
    )


class _Header:
    """Bounds-checked reads from a mapped GGUF: each says what it was reading when the file runs out."""

    def __init__(self, path: Path, data: Any, order: str):
        self.path, self.data, self.order, self.pos = path, data, order, 0
        self.items = 0  # metadata array items so far

    def fail(self, what: str) -> OnnxpipeError:
        return OnnxpipeError(f"{self.path}: not a valid GGUF header: {what}")

    def take(self, size: int, what: str) -> int:
        """Skip ``size`` bytes (the offset they start at), refusing any that run past the end of the file."""
        if size < 0 or self.pos + size > len(self.data):
            raise self.fail(f"{what} runs past the end of the file (offset {self.pos}, {len(self.data)} bytes)")
        start, self.pos = self.pos, self.pos + size
        return start

    def uint(self, size: int, what: str) -> int:
        fmt = {4: "I", 8: "Q"}[size]
        return struct.unpack_from(self.order + fmt, self.data, self.take(size, what))[0]

    def string(self, what: str, limit: int | None = None) -> int:
        length = self.uint(8, f"the length of {what}")
        if limit is not None and length > limit:
            raise self.fail(f"{what} is {length} bytes long (at most {limit})")
        self.take(length, what)
        return length

    def value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[kind], what)
        elif kind == _STRING:
            self.string(what)
        elif kind == _ARRAY:
            item = self.uint(4, f"the item type of {what}")
            count = self.uint(8, f"the length of {what}")
            self.items += count
            if count > MAX_ARRAY_ITEMS or self.items > MAX_HEADER_ITEMS:
                raise self.fail(f"{what} holds {count} items (at most {MAX_ARRAY_ITEMS} per array and "
                                f"{MAX_HEADER_ITEMS} in all)")
            if item in _SCALAR_BYTES:
                self.take(count * _SCALAR_BYTES[item], what)
            elif item == _STRING:
                for _ in range(count):
                    self.string(f"a string of {what}")
            elif item == _ARRAY and depth == 0:
                for _ in range(count):
                    self.value(item, f"an array of {what}", depth + 1)
            else:
                raise self.fail(f"{what} is an array of unknown or too deeply nested type {item}")
        else:
            raise self.fail(f"{what} has unknown value type {kind}")


def check_header(path: Path) -> None:
    """Walk a GGUF's header (magic, version, counts, every key, value and tensor description) and refuse, in one
    line naming the file, any count or length the file cannot hold or that passes the limits above, before gguf-py
    allocates anything for it. Reads through a memory map: nothing is loaded."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise OnnxpipeError(f"{path}: not a valid GGUF header: the file is {size} bytes, shorter than a header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _walk_header(path, data)
    except OSError as e:
        raise OnnxpipeError(f"{path}: cannot read ({e.strerror or e})") from None


def _walk_header(path: Path, data: Any) -> None:
    if bytes(data[:4]) != MAGIC:
        raise OnnxpipeError(f"{path}: not a GGUF file (the first bytes are not 'GGUF')")
    raw = struct.unpack_from("<I", data, 4)[0]
    order = "<" if raw & 0xFFFF else ">"  # a version of 0 in its low bytes: a file of the other byte order
    h = _Header(path, data, order)
    h.take(4, "the magic")
    version = h.uint(4, "the version")
    if version not in SUPPORTED_VERSIONS:
        raise h.fail(f"version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    tensors = h.uint(8, "the tensor count")
    kvs = h.uint(8, "the metadata count")
    room = len(data) - h.pos
    if kvs > MAX_KV or kvs * 13 > room:  # a key/value takes >= 13 bytes: 8 (key length) + 1 + 4 (type)
        raise h.fail(f"{kvs} metadata entries (at most {MAX_KV}, and the file has room for {room // 13})")
    if tensors > MAX_TENSORS or tensors * 24 > room:  # a tensor description takes >= 24 bytes
        raise h.fail(f"{tensors} tensors (at most {MAX_TENSORS}, and the file has room for {room // 24})")
    for i in range(kvs):
        h.string(f"metadata key {i}", MAX_KEY_BYTES)
        kind = h.uint(4, f"the type of metadata entry {i}")
        h.value(kind, f"metadata entry {i}")
    for i in range(tensors):
        h.string(f"the name of tensor {i}", MAX_KEY_BYTES)
        dims = h.uint(4, f"the dimension count of tensor {i}")
        if dims > MAX_DIMS:
            raise h.fail(f"tensor {i} has {dims} dimensions (at most {MAX_DIMS})")
        h.take(8 * dims + 4 + 8, f"the description of tensor {i}")


def cache_root() -> Path:
    return Path(os.environ.get("ONNXPIPE_CACHE") or Path.home() / ".cache" / "onnxpipe")


def convert_gguf(
    src: str | os.PathLike[str] | GGUFInfo, *, log: Callable[[str], None] = lambda msg: None
) -> tuple[Path, GGUFInfo]:
    """Dequantize a GGUF into a float32 Hugging Face directory, once; returns (that directory, the GGUF's info).

    The directory is keyed by the file's sha256, so a changed file converts anew; it is written into a temporary
    directory beside it and renamed into place, so a killed conversion leaves nothing a later run would trust.
    """
    info = src if isinstance(src, GGUFInfo) else read_gguf(src)
    if not info.sha256:
        info.sha256 = _sha256(info.path)
    target = cache_root() / "gguf" / f"{info.sha256[:16]}-v{CONVERSION_VERSION}"
    if (target / SOURCE_RECORD).is_file() and (target / "config.json").is_file():
        log(f"using the converted GGUF cached at {target}")
        return target, info
    log(f"dequantizing {info.path.name} ({info.quant_type}, {info.architecture}) into {target} (once)...")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_dir(target) as tmp:
        _dequantize_to(info, tmp)
        record = info.record() | {"conversion_version": CONVERSION_VERSION, "versions": _versions()}
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return target, info


def _dequantize_to(info: GGUFInfo, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(info.path.parent), info.path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ImportError as e:
        raise OnnxpipeError(f"loading a GGUF needs more packages ({first_line(e)}): {INSTALL_HINT}") from None
    except Exception as e:  # transformers raises many types here; all mean "this GGUF does not load"
        raise OnnxpipeError(f"{info.path}: transformers could not load this GGUF: {first_line(e)}") from None
    # The dequantized model is plain float32; what makes transformers refuse to save it is only the GGUF
    # "quantizer" it still carries. Dropping it saves an ordinary directory that loads without the GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    _fix_special_tokens(tokenizer, info.special_token_ids)
    tokenizer.save_pretrained(out)


def _fix_special_tokens(tokenizer: Any, ids: dict[str, int]) -> None:
    """Name the special tokens the GGUF names. transformers' GGUF converter sets the llama-style tokenizer's eos
    token to the *bos* token (SmolLM2: eos '<|im_start|>' instead of '<|im_end|>'); the ids in the GGUF are right."""
    for role, token_id in ids.items():
        if 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    _remove_abandoned(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    (tmp / ".pid").write_text(str(os.getpid()))
    try:
        yield tmp
        (tmp / ".pid").unlink()
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / SOURCE_RECORD).is_file():  # not a finished conversion by a concurrent run
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned(target: Path) -> None:
    """Half-written conversions of killed runs (hundreds of MB each); those of live processes are kept."""
    for tmp in target.parent.glob(f".tmp-{target.name}-*"):
        try:
            os.kill(int((tmp / ".pid").read_text()), 0)
        except (OSError, ValueError):  # no such process, or no readable marker
            shutil.rmtree(tmp, ignore_errors=True)


def _import_gguf() -> Any:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxpipeError(f"reading a GGUF file needs {' and '.join(missing)}: {INSTALL_HINT}")
    import gguf

    return gguf


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # a malformed value reads as absent; the architecture check then names the problem
        return None


def _special_token_ids(reader: Any) -> dict[str, int]:
    ids: dict[str, int] = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if isinstance(value, float) and value.is_integer():  # NaN and infinities are not
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            ids[role] = value
    return ids


def _dominant_weight_type(reader: Any) -> str:
    elements: Counter[str] = Counter()
    for t in reader.tensors:
        if len(t.shape) >= 2:
            elements[t.tensor_type.name] += int(t.n_elements)
    if not elements:
        elements = Counter({t.tensor_type.name: int(t.n_elements) for t in reader.tensors})
    return elements.most_common(1)[0][0]


def _file_type_name(gguf: Any, value: Any) -> str | None:
    if value is None:
        return None
    try:
        return gguf.LlamaFileType(int(value)).name
    except (ValueError, TypeError, OverflowError):
        return str(value)[:100]


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import gguf  # noqa: F401
    import transformers
    from importlib.metadata import version

    return {"transformers": transformers.__version__, "gguf": version("gguf")}
