"""Generated hostile inputs (hypothesis): whatever arrives, each reader answers with a result or a clean error.

- score's record parser: any JSON value or raw line -> a Record or a BadRecord naming its file:line, never an exception;
- the manifest reader: any JSON or a mutated valid manifest -> an OnnxpipeError or a usable ModelDir;
- the GGUF header reader: truncated or mutated bytes -> a GGUFInfo or a one-line OnnxpipeError naming the file, and
  no count or length in a header makes it allocate;
- the command line: any text for a numeric option -> exit code 2 (click) or 1 (one line), never a traceback or an
  "unexpected" error;
- sampling: any accepted options and any finite logits -> a token of the vocabulary.

Examples are derandomized and few, so the suite is repeatable and fast; ``FIGURES`` counts what was tried (printed
by scripts/reliability_figures.py).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from onnxpipe.errors import OnnxpipeError

FIGURES: Counter = Counter()  # "<reader> tried" / "<reader> clean error" / "<reader> accepted"

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def tally(reader: str, outcome: str) -> None:
    FIGURES[f"{reader} tried"] += 1
    FIGURES[f"{reader} {outcome}"] += 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


# ---- score's record parser ----

RECORD_KEYS = ["id", "text", "prompt", "completion", "input_ids", "prompt_ids", "completion_ids"]
id_lists = st.lists(st.integers(-5, 300) | st.booleans() | st.floats() | st.text(max_size=3), max_size=6)
record_dicts = st.dictionaries(st.sampled_from(RECORD_KEYS), json_values | id_lists | st.text(max_size=30), max_size=4)
token_ids = st.lists(st.integers(0, 255), max_size=8)
well_formed = st.one_of(  # records that should parse, some with an id, some with an unknown extra field
    st.fixed_dictionaries({"text": st.text(max_size=20)}, optional={"id": st.text(max_size=5) | st.integers()}),
    st.fixed_dictionaries({"prompt": st.text(max_size=10), "completion": st.text(max_size=10)}),
    st.fixed_dictionaries({"input_ids": token_ids}, optional={"note": json_values}),
    st.fixed_dictionaries({"prompt_ids": token_ids, "completion_ids": token_ids}),
)


def _check_parsed(result, vocab, where):
    from onnxpipe.score.records import BadRecord, Record

    assert isinstance(result, (Record, BadRecord)), type(result)
    if isinstance(result, BadRecord):
        assert result.where == where and result.error and "\n" not in result.error.strip()
        return "bad record"
    for ids in (result.ids, result.prompt_ids, result.completion_ids):
        assert ids is None or all(type(t) is int and 0 <= t < vocab for t in ids)
    for text in (result.text, result.prompt, result.completion):
        assert text is None or isinstance(text, str)
    assert isinstance(result.id, (str, int)) and not isinstance(result.id, bool)
    return "record"


@settings(max_examples=150, **SETTINGS)
@given(obj=json_values | record_dicts | well_formed, generate=st.booleans())
def test_score_parse_record_never_raises(obj, generate):
    from onnxpipe.score.records import parse_record

    result = parse_record(obj, 7, Path("in.jsonl"), False, 256, generate)
    tally("score record", _check_parsed(result, 256, "in.jsonl:7"))


@settings(max_examples=40, **SETTINGS)
@given(lines=st.lists(st.binary(max_size=40) | (record_dicts | well_formed).map(lambda d: json.dumps(d).encode())
                      | st.sampled_from([b'{"text": "\\udc80"}', b'{"input_ids": [1e400]}', b'[', b'\xff\xfe', b'null',
                                         b'{"text": "a", "id": 1.5}', b'{"input_ids": [1, 2], "id": []}']),
                      min_size=1, max_size=8))
def test_score_iter_records_never_raises(tmp_path_factory, lines):
    from onnxpipe.score.records import Shard, iter_records

    path = tmp_path_factory.mktemp("records") / "in.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    for result in iter_records(Shard(path, "jsonl", len(lines)), False, 256):
        line = result.where.rsplit(":", 1)[1]
        tally("score line", _check_parsed(result, 256, f"in.jsonl:{line}"))


# ---- the manifest reader ----

@pytest.fixture(scope="module")
def valid_manifest(tiny_onnx):
    return json.loads((tiny_onnx("llama") / "onnxpipe.json").read_text())


def _paths(obj, prefix=()):
    """Every (path, value) of a JSON document, containers included."""
    yield prefix, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _mutate(doc, path, action, value):
    doc = json.loads(json.dumps(doc))
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


HOSTILE_FILES = ["../model.onnx", "/etc/passwd", "sub/../../x.onnx", "", ".", "model.onnx\x00", 7, None,
                 "link.onnx"]


def _open_and_use(directory: Path, text: str):
    """ModelDir.open on a directory holding ``text`` as its manifest: an OnnxpipeError, or a ModelDir whose paths
    stay inside it and whose graph names the runtime needs are there."""
    from onnxpipe.artifact import MANIFEST, ModelDir

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(b"\x08\x07")
    (directory.parent / "outside.onnx").write_bytes(b"\x08\x07")
    (directory / "link.onnx").symlink_to(directory.parent / "outside.onnx")
    (directory / MANIFEST).write_text(text)
    try:
        md = ModelDir.open(directory)
    except OnnxpipeError as e:
        assert str(e).strip() and "\n" not in str(e).strip()
        return "clean error"
    root = directory.resolve()
    assert md.model_path.resolve().is_relative_to(root) and md.model_path.resolve().is_file()
    m = md.manifest
    assert isinstance(m.num_layers, int) and m.num_layers >= 1
    for i in range(m.num_layers):
        assert all(isinstance(n, str) and n for n in (*m.past_names(i), *m.present_names(i)))
    assert all(isinstance(n, str) for n in m.input_names + m.output_names)
    return "accepted"


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_manifest_reader_mutated_manifests(tmp_path_factory, valid_manifest, data):
    paths = [p for p, _ in _paths(valid_manifest)]
    path = data.draw(st.sampled_from(paths), label="path")
    action = data.draw(st.sampled_from(["delete", "replace"]) if path else st.just("replace"), label="action")
    value = data.draw(json_values | st.sampled_from(HOSTILE_FILES), label="value")
    doc = _mutate(valid_manifest, path, action, value)
    text = json.dumps(doc, allow_nan=True)
    tally("manifest", _open_and_use(tmp_path_factory.mktemp("md") / "m", text))


@settings(max_examples=25, **SETTINGS)
@given(text=st.text(max_size=60) | json_values.map(json.dumps))
def test_manifest_reader_arbitrary_text(tmp_path_factory, text):
    tally("manifest", _open_and_use(tmp_path_factory.mktemp("md") / "m", text))


@pytest.mark.parametrize("file", [f for f in HOSTILE_FILES if isinstance(f, str) and f not in ("", ".")])
def test_manifest_graph_file_cannot_leave_the_directory(tmp_path, valid_manifest, file):
    doc = _mutate(valid_manifest, ("graph", "file"), "replace", file)
    assert _open_and_use(tmp_path / "m", json.dumps(doc)) in ("clean error", "accepted")


# ---- the GGUF header reader ----

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> bytes:
    """A small valid llama GGUF: string, number and array metadata, and two tensors."""
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("small")
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_file_type(1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "<s>", "</s>"])
    w.add_token_scores([0.0, -1.0, -2.0, -3.0])
    w.add_bos_token_id(2)
    w.add_eos_token_id(3)
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("output_norm.weight", np.ones(8, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _read(tmp_path_factory, data: bytes) -> str:
    from onnxpipe.export.gguf import read_gguf

    path = tmp_path_factory.mktemp("g") / "hostile.gguf"
    path.write_bytes(data)
    try:
        info = read_gguf(path)
    except OnnxpipeError as e:
        msg = str(e)
        assert "\n" not in msg.strip() and str(path) in msg, msg
        return "clean error"
    assert info.num_tensors >= 1 and info.architecture in ("llama", "qwen2")
    return "accepted"


def test_small_gguf_is_accepted(tmp_path_factory, small_gguf):
    assert _read(tmp_path_factory, small_gguf) == "accepted"


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_gguf_truncated_or_mutated(tmp_path_factory, small_gguf, data):
    blob = bytearray(small_gguf)
    header_end = 400  # the metadata and tensor descriptions of small_gguf lie in its first ~400 bytes
    kind = data.draw(st.sampled_from(["truncate", "bytes", "uint64"]), label="kind")
    if kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1), label="length")]
    elif kind == "bytes":
        at = data.draw(st.integers(0, header_end), label="at")
        blob[at:at + 4] = data.draw(st.binary(min_size=1, max_size=4), label="with")
    else:  # a count or length field set to something huge (every 8-byte slot of the header is tried somewhere)
        at = data.draw(st.integers(4, header_end), label="at")
        value = data.draw(st.sampled_from([2**64 - 1, 2**63, 2**40, 2**31, 10**9, 65536]), label="value")
        blob[at:at + 8] = struct.pack("<Q", value)
    tally("gguf", _read(tmp_path_factory, bytes(blob)))


def _edited_gguf(path: Path, key: str, value, vtype, subtype=None) -> Path:
    """A valid small GGUF whose metadata ``key`` is set to a value of an unexpected type."""
    from gguf.gguf_writer import GGUFValue

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("edited")
    w.kv_data[0][key] = GGUFValue(value, vtype, subtype)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


T = gguf.GGUFValueType


@pytest.mark.parametrize("key,value,vtype,subtype,outcome", [
    ("general.architecture", ["llama"], T.ARRAY, T.STRING, "not supported"),  # was TypeError: unhashable type
    ("tokenizer.ggml.bos_token_id", math.nan, T.FLOAT32, None, "accepted"),  # was ValueError: float NaN to integer
    ("tokenizer.ggml.eos_token_id", math.inf, T.FLOAT64, None, "accepted"),  # was OverflowError
    ("general.file_type", math.inf, T.FLOAT32, None, "accepted"),  # was OverflowError
    ("general.name", [1, 2], T.ARRAY, T.INT32, "accepted"),
])
def test_gguf_metadata_of_unexpected_types(tmp_path, key, value, vtype, subtype, outcome):
    from onnxpipe.export.gguf import read_gguf

    path = _edited_gguf(tmp_path / "edited.gguf", key, value, vtype, subtype)
    if outcome == "accepted":
        info = read_gguf(path)
        assert info.architecture == "llama" and all(isinstance(v, int) for v in info.special_token_ids.values())
        assert info.name is None or isinstance(info.name, str)
    else:
        with pytest.raises(OnnxpipeError, match=outcome) as e:
            read_gguf(path)
        assert str(path) in str(e.value)
    tally("gguf crafted", "accepted" if outcome == "accepted" else "clean error")


HOSTILE_GGUF_SCRIPT = textwrap.dedent("""
    import struct, sys
    from pathlib import Path
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.export.gguf import read_gguf

    def s(text): return struct.pack("<Q", len(text)) + text
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 2) + s(b"general.architecture") + struct.pack("<I", 8) + s(b"llama")
    cases = {
        "uint8 array of 2**60 items": head + s(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 0, 2**60),
        "string array of 2**40 items": head + s(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40)
                                       + s(b"a") * 8,
        "nested arrays": head + s(b"x") + struct.pack("<IIQ", 9, 9, 2**30) + struct.pack("<IQ", 9, 2**30) * 8,
        "string of 2**62 bytes": head + struct.pack("<Q", 2**62) + b"k" * 64,
        "2**63 metadata entries": b"GGUF" + struct.pack("<IQQ", 3, 0, 2**63) + b"\\0" * 64,
        "2**63 tensors": b"GGUF" + struct.pack("<IQQ", 3, 2**63, 0) + b"\\0" * 64,
        "version 1": b"GGUF" + struct.pack("<IQQ", 1, 0, 0) + b"\\0" * 64,
    }
    for name, blob in cases.items():
        path = Path(sys.argv[1]) / (name.replace(" ", "_").replace("*", "") + ".gguf")
        path.write_bytes(blob)
        try:
            read_gguf(path)
            print(name, "ACCEPTED")
        except OnnxpipeError as e:
            assert str(path) in str(e) and "\\n" not in str(e), e
            print(name, "clean:", e)
""")


def test_gguf_hostile_counts_do_not_allocate(tmp_path):
    """Counts and lengths no file could hold: refused up front. (gguf-py took an array count of 2**60 at its word
    and appended one numpy view per item until the memory ran out.) Run under a 1.5 GiB address-space limit and a
    time limit, so that a regression fails instead of taking the machine down."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
    proc = subprocess.run([sys.executable, "-c", limit + HOSTILE_GGUF_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 7 and all(" clean: " in ln for ln in lines), proc.stdout
    for ln in lines:
        tally("gguf crafted", "clean error")


# ---- the command line ----

@pytest.fixture(scope="module")
def text_model(tiny_onnx, tmp_path_factory):
    """The tiny llama with a byte-level tokenizer (256 tokens, one per byte), loaded once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out = tmp_path_factory.mktemp("text-model") / "model"
    shutil.copytree(tiny_onnx("llama"), out)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def loaded(text_model):
    """`load` for the CLI, made once: the options are what is under test, not the session's creation (the thread
    bound of `load` itself is still applied)."""
    from onnxpipe.runtime import generate

    lm = generate.load(text_model, "cpu")

    def load(model_dir, provider="auto", *, threads=None, **_kw):
        generate.check_threads(threads)
        assert Path(model_dir) == text_model
        return lm

    return load


option_values = (st.text(max_size=12) | st.floats().map(repr) | st.integers(-10**20, 10**20).map(str)
                 | st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "-0", "0x10", "1_000", " 3", "٣", "1e-320",
                                    "0", "1", "2", "127", "128", "4.9e-324", "True"]))
GENERATE_OPTIONS = ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
                    "--repeat-ngram-limit", "--num-beams", "--seed", "--batch-size", "--threads"]
BENCH_OPTIONS = ["--batch", "--prompt-tokens", "--new-tokens", "--repeats", "--threads"]
PARSE_ONLY = {  # commands whose work is not run here: a value that parses meets the missing input's clean error
    "score": (["score", "no-such-dir", "no-such.jsonl", "-o", "out.jsonl"],
              ["--max-new-tokens", "--batch-tokens", "--max-padding", "--stride", "--max-context", "--chunk-records",
               "--threads", "--num-workers"]),
    "quantize": (["quantize", "no-such-dir", "-o", "out", "--mode", "dynamic"],
                 ["--static-float-layers", "--smoothquant", "--block-size", "--accuracy-level", "--eval-tokens",
                  "--calib-samples", "--calib-seq-len", "--max-ppl-increase"]),
    "export": (["export", "no-such-dir", "-o", "out"], ["--opset", "--decode-steps"]),
    "optimize": (["optimize", "no-such-dir", "-o", "out"], ["--level"]),
}


def _cli_outcome(result) -> str:
    text = result.output
    assert "Traceback" not in text and "unexpected" not in text, text
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        return "accepted"
    assert result.exit_code in (1, 2), (result.exit_code, text)
    errors = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, text
    return "clean error"


@settings(max_examples=60, **SETTINGS)
@given(option=st.sampled_from(GENERATE_OPTIONS), value=option_values)
def test_cli_generate_numeric_options(monkeypatch, loaded, text_model, option, value):
    from onnxpipe.cli import main
    from onnxpipe.runtime import generate

    monkeypatch.setattr(generate, "load", loaded)
    args = ["generate", str(text_model), "--prompt", "ab", "--provider", "cpu", "--max-new-tokens", "3"]
    result = CliRunner().invoke(main, args + [option, value])
    tally("cli", _cli_outcome(result))


@settings(max_examples=30, **SETTINGS)
@given(option=st.sampled_from(BENCH_OPTIONS), value=option_values | st.lists(option_values, max_size=3).map(",".join))
def test_cli_bench_numeric_options(monkeypatch, loaded, text_model, option, value):
    from onnxpipe.cli import main
    from onnxpipe.runtime import bench, generate

    monkeypatch.setattr(generate, "load", loaded)
    monkeypatch.setattr(bench, "_run", lambda lm, prompts, cfg: (0.01, 0.001, 0.02))  # timing is not under test
    args = ["bench", str(text_model), "--provider", "cpu", "--prompt-tokens", "4", "--new-tokens", "4"]
    result = CliRunner().invoke(main, args + [option, value])
    tally("cli", _cli_outcome(result))


@settings(max_examples=50, **SETTINGS)
@given(command=st.sampled_from(sorted(PARSE_ONLY)), data=st.data())
def test_cli_other_numeric_options(tmp_path_factory, monkeypatch, command, data):
    from onnxpipe.cli import main

    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    args, options = PARSE_ONLY[command]
    option = data.draw(st.sampled_from(options), label="option")
    result = CliRunner().invoke(main, args + [option, data.draw(option_values, label="value")])
    outcome = _cli_outcome(result)
    assert outcome == "clean error"  # the input does not exist
    tally("cli", outcome)


# ---- sampling ----

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=80, **SETTINGS)
@given(logits=st.lists(finite32, min_size=1, max_size=12), seen=st.lists(st.integers(0, 11), max_size=6),
       temperature=st.sampled_from([0.0, 1e-300, 1e-8, 0.7, 1.0, 50.0, 1e300]) | st.floats(0, 1e6),
       top_k=st.integers(0, 20), top_p=st.floats(1e-12, 1.0),
       penalty=st.sampled_from([1e-4, 0.5, 1.0, 1.3, 1e4]) | st.floats(1e-4, 1e4), seed=st.integers(0, 2**64))
@example(logits=[-3e38, -2e38], seen=[0, 1], temperature=1.0, top_k=0, top_p=1.0, penalty=5.0, seed=0)  # overflowed
def test_next_token_is_always_in_the_vocabulary(logits, seen, temperature, top_k, top_p, penalty, seed):
    from onnxpipe.runtime.sampling import SamplingConfig, next_token

    row = np.asarray(logits, np.float32)
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty,
                         seed=seed).validate()
    seen_ids = np.asarray([s for s in seen if s < len(row)], np.int64)
    token = next_token(row, cfg, seen_ids, np.random.default_rng(seed))
    assert 0 <= token < len(row)
    if temperature == 0.0 and penalty == 1.0:
        assert row[token] == row.max()
    tally("sampling", "accepted")


@settings(max_examples=40, **SETTINGS)
@given(field=st.sampled_from(["temperature", "top_p", "repetition_penalty", "length_penalty", "top_k",
                              "max_new_tokens", "seed", "num_beams", "repeat_ngram_limit", "max_length"]),
       value=st.floats() | st.integers(-10**30, 10**30) | st.text(max_size=4) | st.none() | st.booleans())
def test_sampling_config_validates_any_value(field, value):
    from onnxpipe.runtime.sampling import SamplingConfig

    try:
        cfg = SamplingConfig(**{field: value}).validate()
    except OnnxpipeError as e:
        assert field in str(e)
        tally("sampling option", "clean error")
        return
    number = getattr(cfg, field)
    assert number is None or (not isinstance(number, bool) and math.isfinite(number))
    tally("sampling option", "accepted")
