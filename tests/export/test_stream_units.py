"""The pieces of the stamped export alone: the safetensors reader and the slice's refusals (the weight writer:
test_writer.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from onnxpipe.errors import OnnxpipeError
from onnxpipe.export.checkpoint import Checkpoint
from onnxpipe.export.stamp import StampUnsupported, slice_config


def _sharded(tmp_path: Path) -> dict[str, torch.Tensor]:
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7, dtype=torch.float16),
               "c": torch.randn(2, 2, dtype=torch.float32)}
    save_file({"a": tensors["a"], "b": tensors["b"]}, tmp_path / "model-1.safetensors")
    save_file({"c": tensors["c"]}, tmp_path / "model-2.safetensors")
    weight_map = {"a": "model-1.safetensors", "b": "model-1.safetensors", "c": "model-2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def test_reads_shards_tensor_by_tensor(tmp_path: Path) -> None:
    tensors = _sharded(tmp_path)
    with Checkpoint.open(tmp_path) as ckpt:
        assert sorted(ckpt.entries) == ["a", "b", "c"] and ckpt.shape("a") == (3, 5)
        for name, t in tensors.items():
            got = ckpt.read(name)
            assert got.dtype == t.dtype and torch.equal(got, t)


def test_refuses_a_shard_outside_the_directory(tmp_path: Path) -> None:
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(OnnxpipeError, match="not a file name in the model directory"):
        Checkpoint.open(tmp_path)


def test_refuses_a_symlinked_shard_leading_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"a": torch.zeros(2)}, outside / "w.safetensors")
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").symlink_to(outside / "w.safetensors")
    with pytest.raises(OnnxpipeError, match="symlink leading out"):
        Checkpoint.open(src)


def test_refuses_malformed_and_truncated_files(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(OnnxpipeError, match="malformed safetensors header"):
        Checkpoint.open(tmp_path)
    save_file({"a": torch.zeros(64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # the last tensor cut short
    with pytest.raises(OnnxpipeError, match="do not fit its shape"):
        Checkpoint.open(tmp_path)


def test_slice_refuses_other_families_and_mixed_layers() -> None:
    from transformers import AutoConfig

    with pytest.raises(StampUnsupported, match="not 'gpt2'"):
        slice_config(AutoConfig.for_model("gpt2", n_layer=2))
    mixed = AutoConfig.for_model("qwen2", num_hidden_layers=2, use_sliding_window=True, sliding_window=5,
                                 max_window_layers=1)
    with pytest.raises(StampUnsupported, match="layers of several kinds"):
        slice_config(mixed)
    sliced, vocab = slice_config(AutoConfig.for_model("llama", num_hidden_layers=32, vocab_size=128256,
                                                      hidden_size=263 * 2, intermediate_size=1024,
                                                      num_attention_heads=2, pad_token_id=128000))
    assert sliced.num_hidden_layers == 1 and sliced.vocab_size == vocab and vocab not in (263, 526)
    assert sliced.pad_token_id is None
