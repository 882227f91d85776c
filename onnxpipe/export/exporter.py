"""export: a Hugging Face decoder-only model directory -> an onnxpipe model directory.

transformers' own modelling code is traced by torch.export (the dynamo ONNX exporter) through FlatKVDecoder, so
every supported family goes through the same path; the architecture spec only describes what came out.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from onnxpipe.artifact import (
    EXTERNAL_DATA_THRESHOLD,
    MODEL_FILE,
    Manifest,
    ModelDir,
    atomic_output_dir,
    check_output_dir,
    check_sidecar_links,
    copy_tokenizer_files,
    tensor_signature,
    write_manifest,
)
from onnxpipe.errors import OnnxpipeError, first_line
from onnxpipe.genai_config import write_genai_config
from onnxpipe.outputs import check_io_paths
from onnxpipe.tokenizer import Tokenizer
from onnxpipe.export import gguf, wrapper
from onnxpipe.export.archs import attention_implementation, check_config, describe, experts_implementation

DTYPES = ("fp32", "fp16")
DEFAULT_OPSET = 18
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class ExportResult:
    model_dir: ModelDir
    seconds: float


def hf_source_root(src: Path) -> Path:
    """How far a symlink in the Hugging Face directory ``src`` may lead: ``src`` itself, or, for a snapshot of the
    hub cache (``models--org--name/snapshots/REV/file -> ../../blobs/HASH``), its ``models--org--name`` folder."""
    snapshots = Path(src).absolute().parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return snapshots.parent
    return Path(src)


def read_hf_config(src: Path) -> dict[str, Any]:
    """Validate a Hugging Face model directory up front and return its config.json as a dict."""
    if not src.exists():
        raise OnnxpipeError(f"{src}: no such directory")
    if not src.is_dir():
        raise OnnxpipeError(f"{src}: not a directory (expected a Hugging Face model directory)")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise OnnxpipeError(f"{src}: no config.json; is this a Hugging Face model directory?")
    cfg = _json_object(cfg_path)
    check_config(cfg)
    if not any((src / f).is_file() for f in WEIGHT_FILES):
        raise OnnxpipeError(f"{src}: no weights (looked for {', '.join(WEIGHT_FILES)})")
    if (src / "generation_config.json").is_file():  # transformers reads it with the weights: "unexpected OSError"
        _json_object(src / "generation_config.json")
    Tokenizer.from_dir(src)  # tokenizer files that do not parse are refused now, not copied into an output
    return cfg


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OnnxpipeError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise OnnxpipeError(f"{path}: expected a JSON object")
    return data


def load_hf_model(src: Path, dtype: str) -> Any:
    """Load the model with sdpa attention (eager where sdpa would drop part of the model's attention, e.g. logit
    soft-capping); weights that do not match the config are an error, not a warning."""
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI prints its own progress
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    cfg = json.loads((src / "config.json").read_text())  # validated by read_hf_config
    experts = {"experts_implementation": e} if (e := experts_implementation(cfg)) else {}
    try:
        with _quiet():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(src), dtype=torch_dtype, attn_implementation=attention_implementation(cfg),
                output_loading_info=True, **experts
            )
    except Exception as e:  # transformers raises many types here; all mean "these weights do not load"
        raise OnnxpipeError(f"{src}: weights could not be loaded: {first_line(e)}") from None
    problems = []
    for key in ("missing_keys", "mismatched_keys", "unexpected_keys"):
        found = list(info.get(key) or [])
        if found:
            problems.append(f"{len(found)} {key.replace('_', ' ')} (e.g. {_key_name(found[0])})")
    if problems:
        raise OnnxpipeError(f"{src}: weights do not match config.json: {'; '.join(problems)}")
    return model.eval()


def export_decoder(
    src: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    force: bool = False,
    decode_steps: int = 4,
    log: Callable[[str], None] = lambda msg: None,
) -> ExportResult:
    """Export ``src`` (a Hugging Face model directory, or a GGUF file / a directory holding one) to ``out_dir``;
    nothing is left behind on failure."""
    import torch

    src, out_dir = Path(src), Path(out_dir)
    if dtype not in DTYPES:
        raise OnnxpipeError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    given, gguf_info = src, None
    if gguf.looks_like_gguf(src):  # a GGUF is dequantized once into a cached HF directory, then exported as one
        gguf_info = gguf.read_gguf(src)
    else:
        check_sidecar_links(src, hf_source_root(src))  # before anything is read from it
        read_hf_config(src)
    check_io_paths([given], out_dir)
    check_output_dir(out_dir, force)
    start = time.perf_counter()
    if gguf_info is not None:
        src, gguf_info = gguf.convert_gguf(gguf_info, log=log)
        check_sidecar_links(src, hf_source_root(src))
        read_hf_config(src)
        check_io_paths([given, src], out_dir)
    model = load_hf_model(src, dtype)
    info = describe(model.config, model)  # refuses a model without a standard KV cache
    log(f"loaded {info['architecture']} ({info['family']}): {info['num_layers']} layers, hidden {info['hidden_size']}, "
        f"{info['num_attention_heads']} heads / {info['num_kv_heads']} KV heads, {dtype}")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD

    with atomic_output_dir(out_dir, force=force, inputs=[given, src]) as tmp:
        onnx_path = tmp / MODEL_FILE
        _torch_export(model, info, dtype, opset, onnx_path, external)
        export_s = time.perf_counter() - start
        log(f"exported in {export_s:.1f}s{' (external data)' if external else ''}")
        _check_onnx(onnx_path)
        manifest = _build_manifest(onnx_path, info, dtype, opset, external, src, model)
        if gguf_info is not None:
            manifest.model["source"] = gguf_info.record() | {"converted_to": str(src)}
        manifest.tokenizer["files"] = copy_tokenizer_files(src, tmp, root=hf_source_root(src))
        model.config.save_pretrained(tmp)  # config.json: for Optimum interop and for reading by people
        step: dict[str, Any] = {
            "stage": "export",
            "params": {"source": str(given.absolute()), "dtype": dtype, "opset": opset, "external_data": external,
                       "method": "traced"},
            "versions": _versions(),
            "seconds": round(export_s, 2),
        }
        if verify:
            from onnxpipe.export.verify import verify_export

            log("checking parity against PyTorch (prefill + decode, left-padded batch of 2)...")
            report = verify_export(model, onnx_path, manifest, dtype, decode_steps=decode_steps)
            step["check"] = report.to_json()
            log(f"parity: {report.summary()}")
            if not report.passed:
                raise OnnxpipeError(
                    f"parity check failed: rel err {report.rel_err:.3g} > {report.tolerance:g} "
                    f"(max abs err {report.max_abs_err:.3g}); the export was not written"
                )
        else:
            step["check"] = None
            log("parity check skipped (--no-verify)")
        manifest.steps.append(step)
        write_manifest(tmp, manifest)
        write_genai_config(tmp, manifest)
        del model
    seconds = time.perf_counter() - start
    return ExportResult(ModelDir.open(out_dir), seconds)


def _torch_export(model: Any, info: dict[str, Any], dtype: str, opset: int, path: Path, external: bool) -> None:
    program = trace_decoder(model, info, opset)
    try:
        with _quiet():
            program.save(str(path), external_data=external)
    except Exception as e:  # serialisation failures: keep it to one line
        raise OnnxpipeError(f"saving the ONNX graph of {info['architecture']} failed: {first_line(e)}") from None


def trace_decoder(model: Any, info: dict[str, Any], opset: int) -> Any:
    """The ONNXProgram of ``model`` traced through FlatKVDecoder (the stamped export traces a slice this way too)."""
    import torch

    n = info["num_layers"]
    module = wrapper.FlatKVDecoder(model, n)
    args = wrapper.example_inputs(
        n, info["num_kv_heads"], info["head_dim"], info["vocab_size"], next(model.parameters()).dtype
    )
    try:
        with _quiet(), torch.no_grad():
            return torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=wrapper.input_names(n),
                output_names=wrapper.output_names(n),
                dynamic_shapes=wrapper.dynamic_shapes(n),
                verbose=False,
            )
    except Exception as e:  # torch.export / onnx translation failures: say where, keep it to one line
        raise OnnxpipeError(f"torch.onnx.export failed for {info['architecture']}: {first_line(e)}") from None


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise OnnxpipeError(f"the exported graph failed the ONNX checker: {first_line(e)}") from None


def _build_manifest(
    onnx_path: Path, info: dict[str, Any], dtype: str, opset: int, external: bool, src: Path, model: Any
) -> Manifest:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    gen = getattr(model, "generation_config", None)
    cfg = model.config
    tokenizer = {
        "eos_token_id": _ids(getattr(gen, "eos_token_id", None) or cfg.eos_token_id),
        "bos_token_id": getattr(cfg, "bos_token_id", None),
        "pad_token_id": getattr(cfg, "pad_token_id", None),
    }
    data_file = MODEL_FILE + ".data" if external else None
    graph = {
        "file": MODEL_FILE,
        "external_data": data_file if data_file and (onnx_path.parent / data_file).exists() else None,
        "opset": opset,
        "dtype": dtype,
        "inputs": [tensor_signature(t) for t in proto.graph.input],
        "outputs": [tensor_signature(t) for t in proto.graph.output],
        "logits": wrapper.LOGITS,
        "kv": {
            "layout": "BNSH",  # [batch, kv_heads, sequence, head_dim]
            "num_layers": info["num_layers"],
            "num_kv_heads": info["num_kv_heads"],
            "head_dim": info["head_dim"],
            "dtype": dtype,
            "past_key": wrapper.PAST_KEY,
            "past_value": wrapper.PAST_VALUE,
            "present_key": wrapper.PRESENT_KEY,
            "present_value": wrapper.PRESENT_VALUE,
            "shares_buffer": False,
        },
    }
    return Manifest(model=info, graph=graph, tokenizer=tokenizer)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    import onnxpipe

    return {
        "onnxpipe": onnxpipe.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _key_name(key: Any) -> str:
    return key if isinstance(key, str) else str(key[0] if isinstance(key, (list, tuple)) else key)


@contextlib.contextmanager
def _quiet():
    """torch.export and transformers print progress and warnings of their own; keep the CLI's output ours."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "transformers", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
