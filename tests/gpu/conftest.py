"""The GPU tier: tests that need onnxruntime's CUDA EP (onnxruntime-gpu on a machine with an NVIDIA GPU).

    python -m pytest -m gpu tests/gpu        # `make test-gpu`, on the GPU host

Every test here is marked `gpu` (each module's ``pytestmark``). Where no CUDA EP can start a session, the
whole directory is skipped at collection with the reason (``cuda_missing``), so `make test` on a CPU machine
shows them as skipped and builds nothing. The models are a seeded random Llama, fp16, built once per session:
wider than tests/tiny.py's (4 layers, hidden 256) with initializer_range 0.1, so that logits are not
near-uniform and greedy tokens are not decided by ties.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
LLAMA = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=4096, max_position_embeddings=1024, initializer_range=0.1, bos_token_id=1, eos_token_id=2)


@functools.lru_cache(maxsize=1)
def cuda_missing() -> str | None:
    """Why the CUDA EP cannot run here (None when it can): onnxruntime must list it and start a session on it;
    listed is not enough (onnxruntime-gpu without a driver lists it, then falls back to the CPU)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        return f"onnxruntime is not importable ({e})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                f"{', '.join(ort.get_available_providers())}); the GPU tier needs onnxruntime-gpu and a GPU")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    # an IR version every supported onnxruntime reads (onnx's default is newer than onnxruntime 1.31 accepts)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
    except Exception as e:  # any failure to start is a reason to skip, said in full
        return f"the CUDA EP is listed but could not start a session: {str(e)[:200]}"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return f"the CUDA EP is listed but a session fell back to {session.get_providers()[0]} (no usable GPU)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in Path(item.path).resolve().parents]
    reason = cuda_missing() if mine else None
    for item in mine if reason else []:
        item.add_marker(pytest.mark.skip(reason=reason))


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Seeded random prompts of the given lengths (ids from 3: clear of bos/eos)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="session")
def gpu_llama_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = tmp_path_factory.mktemp("gpu-llama-hf")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LLAMA)).save_pretrained(hf)
    return hf


@pytest.fixture(scope="session")
def gpu_llama_fp16(gpu_llama_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded Llama exported fp16 (export's own parity check skipped: the runtime is under test here)."""
    from onnxpipe.export import export_decoder

    out = tmp_path_factory.mktemp("gpu-llama-fp16") / "model"
    export_decoder(gpu_llama_hf, out, dtype="fp16", verify=False)
    return out


@pytest.fixture(scope="session")
def gpu_llama_cuda_form(gpu_llama_fp16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`optimize --level 3 --target cuda` of the fp16 export: the form CUDA graphs run."""
    from onnxpipe.fusion import optimize_model

    out = tmp_path_factory.mktemp("gpu-llama-cuda") / "model"
    optimize_model(gpu_llama_fp16, out, level=3, target="cuda", verify=False)
    return out


def first_divergence(a: list[int], b: list[int]) -> int:
    """The first position where two token lists differ (the shorter length when one is a prefix of the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def token_lists(results: Any) -> list[list[int]]:
    """generate's result (one GenerationResult or a list of them) as plain token lists."""
    results = results if isinstance(results, list) else [results]
    return [list(map(int, r.token_ids)) for r in results]
