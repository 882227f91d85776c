"""The schema of onnxpipe.json, checked once when a model directory is opened.

A field that is missing, of the wrong type, or inconsistent with the graph's I/O list is reported as
``ManifestInvalid(field, what)``, e.g. ("graph.kv.past_key", "must hold the placeholder {i}"), which the caller
turns into one line naming the file and the field. Unknown fields are allowed (a later version of the same format
may add some); a newer ``format_version`` is refused.
"""

from __future__ import annotations

import string
from typing import Any

from onnxpipe.confine import is_plain_name

FORMAT_VERSION = 1
MAX_LAYERS = 4096  # far above any model's; a bound on the loops a manifest can ask for
KV_TEMPLATES = ("past_key", "past_value", "present_key", "present_value")


class ManifestInvalid(Exception):
    def __init__(self, field: str, what: str) -> None:
        super().__init__(f"{field}: {what}")
        self.field, self.what = field, what


def validate_manifest(data: Any) -> None:
    """Raise ManifestInvalid for the first field of ``data`` (onnxpipe.json, parsed) that breaks the schema."""
    root = _object(data, "(top level)")
    version = root.get("format_version", FORMAT_VERSION)
    _int(version, "format_version", low=1)
    if version > FORMAT_VERSION:
        raise ManifestInvalid("format_version", f"{version} is newer than this onnxpipe reads ({FORMAT_VERSION}); "
                                                "upgrade onnxpipe to read this directory")
    _model(_required(root, "model", ""))
    _graph(_required(root, "graph", ""))
    if "tokenizer" in root:
        _tokenizer(root["tokenizer"])
    if "steps" in root:
        for i, step in enumerate(_list(root["steps"], "steps")):
            _str(_required(_object(step, f"steps[{i}]"), "stage", f"steps[{i}]."), f"steps[{i}].stage")


def _model(model: Any) -> None:
    m = _object(model, "model")
    _int(_required(m, "vocab_size", "model."), "model.vocab_size", low=1)
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim"):
        if key in m:
            _int(m[key], f"model.{key}", low=1)
    for key in ("max_position_embeddings", "sliding_window"):
        if m.get(key) is not None:
            _int(m[key], f"model.{key}", low=1)
    for key in ("family", "model_type", "architecture"):
        if key in m:
            _str(m[key], f"model.{key}")


def _graph(graph: Any) -> None:
    g = _object(graph, "graph")
    if "file" in g and not is_plain_name(g["file"]):
        raise ManifestInvalid("graph.file", f"must be a plain file name inside the model directory (got {g['file']!r})")
    if g.get("external_data") is not None and not is_plain_name(g["external_data"]):
        raise ManifestInvalid("graph.external_data",
                              f"must be a plain file name inside the model directory (got {g['external_data']!r})")
    if "opset" in g:
        _int(g["opset"], "graph.opset", low=1)
    for key in ("dtype", "logits", "target"):
        if key in g:
            _str(g[key], f"graph.{key}")
    if "padding_side" in g and g["padding_side"] not in ("left", "right"):
        raise ManifestInvalid("graph.padding_side", f"must be 'left' or 'right' (got {g['padding_side']!r})")
    # an empty I/O list (a hand-made directory whose graph alone says it) is allowed; a listed one must agree
    inputs = _tensors(_required(g, "inputs", "graph."), "graph.inputs")
    outputs = _tensors(_required(g, "outputs", "graph."), "graph.outputs")
    logits = g.get("logits", "logits")
    if outputs and logits not in outputs:
        raise ManifestInvalid("graph.logits", f"{logits!r} is not among graph.outputs")
    _kv(_required(g, "kv", "graph."), inputs, outputs)


def _kv(kv: Any, inputs: list[str], outputs: list[str]) -> None:
    k = _object(kv, "graph.kv")
    layers = _int(_required(k, "num_layers", "graph.kv."), "graph.kv.num_layers", low=1, high=MAX_LAYERS)
    if inputs and layers > len(inputs):
        raise ManifestInvalid("graph.kv.num_layers", f"{layers} layers but graph.inputs has {len(inputs)} tensors")
    for key in KV_TEMPLATES:
        _template(_required(k, key, "graph.kv."), f"graph.kv.{key}")
    for key in ("num_kv_heads", "head_dim"):
        if key in k:
            _int(k[key], f"graph.kv.{key}", low=1)
    for key in ("layout", "dtype"):
        if key in k:
            _str(k[key], f"graph.kv.{key}")
    if "shares_buffer" in k and not isinstance(k["shares_buffer"], bool):
        raise ManifestInvalid("graph.kv.shares_buffer", f"must be true or false (got {k['shares_buffer']!r})")
    for key, names, where in (("past_key", inputs, "inputs"), ("past_value", inputs, "inputs"),
                              ("present_key", outputs, "outputs"), ("present_value", outputs, "outputs")):
        for i in range(layers if names else 0):
            name = k[key].format(i=i)
            if name not in names:
                raise ManifestInvalid(f"graph.kv.{key}", f"layer {i}'s {name!r} is not among graph.{where}")


def _tokenizer(tokenizer: Any) -> None:
    t = _object(tokenizer, "tokenizer")
    if "files" in t:
        for i, name in enumerate(_list(t["files"], "tokenizer.files")):
            if not is_plain_name(name):
                raise ManifestInvalid(f"tokenizer.files[{i}]", f"must be a plain file name (got {name!r})")
    for key in ("bos_token_id", "pad_token_id"):
        if t.get(key) is not None:
            _int(t[key], f"tokenizer.{key}", low=0)
    eos = t.get("eos_token_id")
    if eos is not None:
        for i, tok in enumerate(_list(eos, "tokenizer.eos_token_id")):
            _int(tok, f"tokenizer.eos_token_id[{i}]", low=0)


def _tensors(value: Any, where: str) -> list[str]:
    items = _list(value, where)
    names = []
    for i, item in enumerate(items):
        t = _object(item, f"{where}[{i}]")
        names.append(_str(_required(t, "name", f"{where}[{i}]."), f"{where}[{i}].name"))
        _str(_required(t, "dtype", f"{where}[{i}]."), f"{where}[{i}].dtype")
        for j, dim in enumerate(_list(_required(t, "shape", f"{where}[{i}]."), f"{where}[{i}].shape")):
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                raise ManifestInvalid(f"{where}[{i}].shape[{j}]", f"must be a size or a name (got {dim!r})")
    return names


def _template(value: Any, where: str) -> str:
    """A per-layer tensor name with the placeholder ``{i}`` and no other."""
    s = _str(value, where)
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(s) if f is not None]
    except ValueError as e:
        raise ManifestInvalid(where, f"not a valid name template ({e}): {s!r}") from None
    if "i" not in fields:
        raise ManifestInvalid(where, f"must hold the placeholder {{i}} (got {s!r})")
    if set(fields) != {"i"}:
        other = sorted(set(fields) - {"i"})
        raise ManifestInvalid(where, f"may hold only the placeholder {{i}} (got {s!r}, with {other})")
    try:
        s.format(i=0)
    except (ValueError, IndexError, KeyError) as e:
        raise ManifestInvalid(where, f"not a valid name template ({e}): {s!r}") from None
    return s


def _required(obj: dict, key: str, prefix: str) -> Any:
    if key not in obj:
        raise ManifestInvalid(f"{prefix}{key}", "missing")
    return obj[key]


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ManifestInvalid(where, f"must be an object (got {_type(value)})")
    return value


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ManifestInvalid(where, f"must be a list (got {_type(value)})")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ManifestInvalid(where, f"must be a string (got {_type(value)})")
    return value


def _int(value: Any, where: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestInvalid(where, f"must be an integer (got {_type(value)})")
    if low is not None and value < low:
        raise ManifestInvalid(where, f"must be at least {low} (got {value})")
    if high is not None and value > high:
        raise ManifestInvalid(where, f"must be at most {high} (got {value})")
    return value


def _type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    shown = repr(value) if not isinstance(value, (dict, list)) else ""
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return names.get(type(value), type(value).__name__) + (f" {shown}" if shown else "")
