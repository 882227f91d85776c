"""onnxpipe.json is read once, checked against its schema, and every path it leads to stays inside the model
directory: a bad field is one line naming it, never an AttributeError/KeyError, and nothing is followed out."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_checks import cli, digest, one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxpipe.artifact import ModelDir, copy_sidecar_files
from onnxpipe.errors import OnnxpipeError


def _edit(model_dir: Path, change: Callable[[dict], Any]) -> Path:
    mf = model_dir / "onnxpipe.json"
    data = json.loads(mf.read_text())
    change(data)
    mf.write_text(json.dumps(data))
    return model_dir


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


_DELETE = object()

BAD_FIELDS = [
    ("format_version", 2, "format_version: 2 is newer than this onnxpipe reads (1)"),
    ("format_version", "1", "format_version: must be an integer"),
    ("model", [], "model: must be an object"),
    ("model.vocab_size", _DELETE, "model.vocab_size: missing"),
    ("model.vocab_size", "256", "model.vocab_size: must be an integer"),
    ("graph", "model.onnx", "graph: must be an object"),
    ("graph.kv", _DELETE, "graph.kv: missing"),
    ("graph.kv.past_key", "past_key_values.{j}.key", "graph.kv.past_key: must hold the placeholder {i}"),
    ("graph.kv.past_key", "past_key_values.{i}.{j}", "graph.kv.past_key: may hold only the placeholder {i}"),
    ("graph.kv.present_value", "present.{i.value", "graph.kv.present_value: not a valid name template"),
    ("graph.kv.past_value", "past_key_values.{i}.v", "graph.kv.past_value: layer 0's 'past_key_values.0.v' is not"),
    ("graph.kv.num_layers", 10**9, "graph.kv.num_layers: must be at most 4096"),
    ("graph.kv.num_layers", "2", "graph.kv.num_layers: must be an integer"),
    ("graph.inputs", {"input_ids": "int64"}, "graph.inputs: must be a list"),
    ("graph.kv.num_layers", 3, "graph.kv.past_key: layer 2's 'past_key_values.2.key' is not among graph.inputs"),
    ("graph.inputs.0", 5, "graph.inputs[0]: must be an object"),
    ("graph.outputs.0.shape", "dynamic", "graph.outputs[0].shape: must be a list"),
    ("graph.logits", "scores", "graph.logits: 'scores' is not among graph.outputs"),
    ("graph.padding_side", "middle", "graph.padding_side"),
    ("graph.file", "../other/model.onnx", "graph.file: must be a plain file name inside the model directory"),
    ("graph.file", "/etc/model.onnx", "graph.file: must be a plain file name"),
    ("graph.external_data", "../w.data", "graph.external_data: must be a plain file name"),
    ("tokenizer", "gpt2", "tokenizer: must be an object"),
    ("tokenizer.eos_token_id", "2", "tokenizer.eos_token_id: must be a list"),
    ("tokenizer.files", ["../../secret"], "tokenizer.files[0]: must be a plain file name"),
    ("steps", {"stage": "export"}, "steps: must be a list"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS, ids=[f"{f}={'deleted' if v is _DELETE else repr(v)}"[:40] for f, v, _ in BAD_FIELDS])
def test_bad_manifest_field_is_one_line_naming_it(model_copy, tmp_path: Path, field: str, value: Any,
                                                  message: str) -> None:
    md = _edit(model_copy("m"), _set(field, value))
    one_line_error(cli("inspect", md), "onnxpipe.json: " + message)
    before = digest(md)
    one_line_error(cli("optimize", md, "-o", tmp_path / "opt", "--skip-verify"), "onnxpipe.json: " + message)
    assert digest(md) == before and not (tmp_path / "opt").exists()


def test_manifest_that_is_not_an_object(model_copy) -> None:
    md = model_copy("m")
    (md / "onnxpipe.json").write_text("[1, 2]")
    one_line_error(cli("inspect", md), "onnxpipe.json: (top level): must be an object")
    (md / "onnxpipe.json").write_bytes(b"\xff\xfe{")
    one_line_error(cli("inspect", md), "onnxpipe.json: malformed manifest")
    (md / "onnxpipe.json").write_text("[" * 100_000)
    one_line_error(cli("inspect", md), "onnxpipe.json: malformed manifest")


def test_existing_directories_still_open(tiny_onnx) -> None:
    """The on-disk format is unchanged: what export writes opens, and a manifest without format_version (v1) too."""
    md = ModelDir.open(tiny_onnx("llama"))
    assert md.manifest.format_version == 1 and md.manifest.past_names(1) == ("past_key_values.1.key",
                                                                              "past_key_values.1.value")


def test_missing_format_version_reads_as_1(model_copy) -> None:
    md = _edit(model_copy("m"), _set("format_version", _DELETE))
    assert ModelDir.open(md).manifest.format_version == 1


# generated hostile values at every field of a real manifest: ModelDir.open accepts or refuses with OnnxpipeError
# naming the file, and what it accepts its accessors can read

def _paths(node: Any, prefix: str = "") -> list[str]:
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        p = f"{prefix}.{key}" if prefix else str(key)
        out.append(p)
        if p.count(".") < 4 and not p.startswith("steps"):
            out += _paths(value, p)
    return out


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                     | st.text(max_size=12) | st.sampled_from(["{i}", "{}", "{0}", "{i!r}", "../x", "/etc/passwd"]),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def manifest_lab(tiny_onnx, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    lab = tmp_path_factory.mktemp("manifest-lab") / "m"
    shutil.copytree(tiny_onnx("llama"), lab)
    return lab, json.loads((lab / "onnxpipe.json").read_text())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_manifests_never_surprise(manifest_lab: tuple[Path, dict], data: st.DataObject) -> None:
    lab, original = manifest_lab
    manifest = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(manifest) or ["graph"]))
        _set(path, data.draw(st.just(_DELETE) | _json))(manifest)
    (lab / "onnxpipe.json").write_text(json.dumps(manifest))
    try:
        md = ModelDir.open(lab)
    except OnnxpipeError as e:
        assert str(lab) in str(e) and "\n" not in str(e)
        return
    m = md.manifest
    m.past_names(m.num_layers - 1), m.present_names(0), m.input_names, m.output_names
    assert md.model_path.parent == lab


# -- paths confined to the directory --------------------------------------------------------------------------------

def test_graph_file_symlink_out_of_the_directory_refused(model_copy, tmp_path: Path) -> None:
    md, other = model_copy("m"), model_copy("other")
    (md / "model.onnx").unlink()
    (md / "model.onnx").symlink_to(other / "model.onnx")
    one_line_error(cli("inspect", md), "model.onnx", "graph.file is a symlink leading out of")
    one_line_error(cli("optimize", md, "-o", tmp_path / "opt", "--skip-verify"), "graph.file is a symlink")
    assert not (tmp_path / "opt").exists()


def test_escaping_graph_file_is_not_carried_into_an_output(model_copy, tmp_path: Path) -> None:
    """graph.file = "../other/model.onnx" is refused at open: optimize writes nothing (before, it loaded the other
    directory's graph and copied the escaping path into its own manifest)."""
    model_copy("other")
    md = _edit(model_copy("m"), _set("graph.file", "../other/model.onnx"))
    (md / "model.onnx").unlink()
    one_line_error(cli("optimize", md, "-o", tmp_path / "opt", "--skip-verify"), "graph.file")
    assert not (tmp_path / "opt").exists()


def _with_external_data(md: Path, location: str) -> None:
    """Rewrite md/model.onnx with its weights in external data, then point one tensor's location at ``location``."""
    import onnx

    proto = onnx.load(str(md / "model.onnx"))
    onnx.save_model(proto, str(md / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    proto = onnx.load(str(md / "model.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(proto, str(md / "model.onnx"))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin", "link.data",
                                      "absent.data"])
def test_external_data_location_checked_before_onnx_sees_it(model_copy, tmp_path: Path, location: str) -> None:
    md = model_copy("m")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    (md / "link.data").symlink_to(tmp_path / "secret.bin")
    _with_external_data(md, location)
    fragment = "symlink leading out" if location == "link.data" else (
        "is missing" if location == "absent.data" else "is not a relative path inside")
    line = one_line_error(cli("inspect", md), "model.onnx", fragment)
    assert "unexpected" not in line
    one_line_error(cli("optimize", md, "-o", tmp_path / "opt", "--skip-verify"), "model.onnx", fragment)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_external_data_reader_on_damaged_graphs(manifest_lab: tuple[Path, dict], tmp_path: Path,
                                                data: st.DataObject) -> None:
    """The wire-format reader of external-data locations, on a real model.onnx with bytes flipped, cut or
    inserted: it returns locations or refuses with OnnxpipeError naming the file; nothing else escapes."""
    from onnxpipe.confine import check_external_data

    blob = bytearray((manifest_lab[0] / "model.onnx").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del blob[at:at + data.draw(st.integers(1, 64))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    model = tmp_path / "model.onnx"
    model.write_bytes(bytes(blob))
    try:
        check_external_data(model, tmp_path)
    except OnnxpipeError as e:
        assert str(model) in str(e) and "\n" not in str(e)


def test_external_data_inside_the_directory_is_fine(model_copy) -> None:
    md = model_copy("m")
    _with_external_data(md, "model.onnx.data")
    assert cli("inspect", md).exit_code == 0


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_short_external_data_refused_at_open(model_copy, tmp_path: Path, keep: float) -> None:
    """A 0-byte or truncated model.onnx.data: optimize and quantize failed as `unexpected ValueError` of their
    weight readers (`cannot mmap an empty file`, `External data offset ... exceeds file size`), inspect summarised it
    as healthy. Every tensor's offset + length is checked against the file's size at open."""
    md = model_copy("m")
    _with_external_data(md, "model.onnx.data")
    data = md / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: int(data.stat().st_size * keep)])
    before = digest(md)
    for args in (["inspect", md], ["optimize", md, "-o", tmp_path / "o"], ["generate", md, "--prompt", "hi"],
                 ["quantize", md, "-o", tmp_path / "o", "--mode", "dynamic"]):
        one_line_error(cli(*args), str(md / "model.onnx"), "model.onnx.data holds", "truncated")
    assert digest(md) == before and not (tmp_path / "o").exists()


def test_sidecar_symlink_out_of_the_directory_refused(model_copy, tmp_path: Path) -> None:
    """A model directory with merges.txt -> a file outside it never yields an artifact holding that file."""
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:secret\n")
    md = model_copy("m")
    (md / "merges.txt").symlink_to(secret)
    one_line_error(cli("inspect", md), "merges.txt", "symlink leading out of")
    one_line_error(cli("optimize", md, "-o", tmp_path / "opt", "--skip-verify"), "merges.txt")
    assert not (tmp_path / "opt").exists()
    out = tmp_path / "copy"
    out.mkdir()
    with pytest.raises(OnnxpipeError, match="merges.txt"):
        copy_sidecar_files(md, out)
    assert not any("secret" in p.read_text() for p in out.iterdir())


def test_sidecar_symlink_inside_the_directory_is_copied_as_a_file(model_copy, tmp_path: Path) -> None:
    md = model_copy("m")
    (md / "real_merges.txt").write_text("#version: 0.2\n")
    (md / "merges.txt").symlink_to("real_merges.txt")
    r = cli("optimize", md, "-o", tmp_path / "opt", "--skip-verify", "--level", "1")
    assert r.exit_code == 0, r.output
    out = tmp_path / "opt" / "merges.txt"
    assert not out.is_symlink() and out.read_text() == "#version: 0.2\n"


def test_export_refuses_hf_sidecar_symlink_out(tiny_hf, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf("llama"), hf)
    (tmp_path / "passwd").write_text("root:x:0:0\n")
    (hf / "tokenizer_config.json").symlink_to(tmp_path / "passwd")
    one_line_error(cli("export", hf, "-o", tmp_path / "o", "--no-verify"), "tokenizer_config.json",
                   "symlink leading out of")
    assert not (tmp_path / "o").exists()


def test_export_copies_hub_cache_links_as_files(tiny_hf, tmp_path: Path) -> None:
    """The Hugging Face hub cache layout: snapshots/REV/file -> ../../blobs/HASH stays inside models--org--name,
    and its files are copied as regular files."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    files = {name: (tiny_hf("llama") / name).read_bytes() for name in ("config.json", "model.safetensors")}
    files["merges.txt"] = b"#version: 0.2\n"
    for i, (name, content) in enumerate(files.items()):
        (blobs / f"hash{i}").write_bytes(content)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / f"hash{i}")
    r = cli("export", snap, "-o", tmp_path / "o", "--no-verify")
    assert r.exit_code == 0, r.output
    out = tmp_path / "o" / "merges.txt"
    assert not out.is_symlink() and out.read_bytes() == b"#version: 0.2\n"


# -- inspect --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "fragment"), [(b"", "empty file (0 bytes)"), ("half", "not a readable ONNX model")])
def test_inspect_refuses_an_empty_or_truncated_graph(model_copy, content: bytes | str, fragment: str) -> None:
    md = model_copy("m")
    data = (md / "model.onnx").read_bytes()
    (md / "model.onnx").write_bytes(data[: len(data) // 2] if content == "half" else content)
    one_line_error(cli("inspect", md), "model.onnx", fragment)


@pytest.mark.parametrize(("content", "fragment"), [(b"", "empty file (0 bytes)"), (b"\x08\x07", "no graph in it")])
def test_every_command_refuses_a_model_file_with_no_graph(model_copy, tmp_path: Path, content: bytes,
                                                          fragment: str) -> None:
    """A 0-byte or graph-less model.onnx (well-formed protobuf: ir_version alone) is refused when the directory is
    opened. optimize ran every pass on it and then failed with `unexpected InvalidArgument: ... No graph was found
    in the protobuf`; quantize named an `in-memory graph`; generate, score and bench passed onnxruntime's message on."""
    md = model_copy("m")
    (md / "model.onnx").write_bytes(content)
    before = digest(md)
    records = tmp_path / "in.jsonl"
    records.write_text('{"input_ids": [1, 2, 3]}\n')
    for args in (["optimize", md, "-o", tmp_path / "o"], ["quantize", md, "-o", tmp_path / "o", "--mode", "dynamic"],
                 ["generate", md, "--prompt", "hi"], ["score", md, records, "-o", tmp_path / "s.jsonl"],
                 ["bench", md], ["inspect", md]):
        one_line_error(cli(*args), str(md / "model.onnx"), fragment)
    assert digest(md) == before
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.jsonl").exists()


def test_a_file_or_folder_where_the_other_is_expected_is_named_as_such(model_copy, tmp_path: Path) -> None:
    """A file given as the model directory was "no such model directory"; a directory given as --prompts or --eval
    was "no such prompts/eval file": both exist, so the error says what they are instead."""
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    for command in (["inspect"], ["generate", "--prompt", "hi"], ["optimize", "-o", tmp_path / "o"]):
        one_line_error(cli(command[0], notes, *command[1:]), f"{notes}: not a directory")
    one_line_error(cli("generate", tmp_path / "nope", "--prompts", tmp_path), f"{tmp_path}: the prompts file is not a regular file")
    md = model_copy("m")
    one_line_error(cli("quantize", md, "-o", tmp_path / "o", "--mode", "dynamic", "--eval", tmp_path),
                   f"{tmp_path}: the eval file is not a regular file")


def test_inspect_graph_not_matching_manifest(model_copy) -> None:
    """A model.onnx whose inputs are not the manifest's (swapped or damaged) is refused, not summarised."""
    import onnx

    md = model_copy("m")
    proto = onnx.load(str(md / "model.onnx"))
    proto.graph.output[0].name = "scores"
    onnx.save(proto, str(md / "model.onnx"))
    one_line_error(cli("inspect", md), "model.onnx", "differ from onnxpipe.json", "'logits'")


def test_inspect_shows_an_unjudged_check_as_recorded(model_copy) -> None:
    """An int8 quantize step's decode check is recorded, not judged (passed: null): not FAILED; a judged failure
    still is."""
    md = model_copy("m")
    check = {"rel_err": 0.31, "greedy_agreement": 0.875, "passed": None}
    step = {"stage": "quantize", "params": {"mode": "dynamic"}, "check": check}
    _edit(md, lambda d: d["steps"].append(step))
    r = cli("inspect", md)
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.strip().startswith("quantize"))
    assert "recorded, not judged" in line and "FAILED" not in line
    _edit(md, lambda d: d["steps"][-1]["check"].update(passed=False))
    line = next(ln for ln in cli("inspect", md).output.splitlines() if ln.strip().startswith("quantize"))
    assert "FAILED" in line


def test_symlinked_model_directory_itself_is_fine(model_copy, tmp_path: Path) -> None:
    md = model_copy("m")
    os.symlink(md, tmp_path / "alias")
    assert ModelDir.open(tmp_path / "alias").model_path.is_file()
