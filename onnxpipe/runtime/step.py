"""One forward step of a model directory's graph, its inputs and outputs bound by the manifest's names.

The graph's signature is ``(input_ids, attention_mask[, position_ids], past KV per layer) -> (logits, present KV per
layer)``, with the KV names, the logits name and the KV layout recorded in the manifest (``graph.kv``, ``graph.logits``).
``Step.bind`` reads them once against an open onnxruntime session (whose input list says whether the graph takes
``position_ids`` and which dtype its KV cache has) and refuses a manifest whose KV names the graph does not have; a
``Step`` then builds feeds (an empty cache for a prefill, positions from the mask where the graph reads them) and
names the outputs, so that no caller spells the manifest's naming scheme itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from onnxpipe.artifact import Manifest
from onnxpipe.errors import OnnxpipeError
from onnxpipe.parity import position_ids_for

KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # what onnxruntime's input types map to


@dataclass(frozen=True)
class Step:
    """The I/O names of one graph and the shape of its KV cache."""

    past_names: tuple[str, ...]  # layer 0 key, layer 0 value, layer 1 key, ...
    present_names: tuple[str, ...]  # in the same order
    logits: str
    has_position_ids: bool
    kv_dtype: np.dtype
    num_kv_heads: int
    head_dim: int

    @classmethod
    def bind(cls, session: Any, manifest: Manifest, where: object = "model.onnx") -> "Step":
        """The step of ``session`` (an onnxruntime InferenceSession) under ``manifest``'s names; ``where`` names the
        model in errors."""
        inputs = {i.name: i for i in session.get_inputs()}
        past = tuple(n for i in range(manifest.num_layers) for n in manifest.past_names(i))
        present = tuple(n for i in range(manifest.num_layers) for n in manifest.present_names(i))
        missing = [n for n in past if n not in inputs]
        if missing:
            raise OnnxpipeError(f"{where}: the graph has no input {missing[0]!r}; the manifest's KV names do not match it")
        kv_type = KV_DTYPES.get(inputs[past[0]].type)
        if kv_type is None:
            raise OnnxpipeError(f"{where}: KV cache type {inputs[past[0]].type} is not supported by the runtime")
        kv = manifest.graph["kv"]
        return cls(
            past_names=past, present_names=present, logits=manifest.graph.get("logits", "logits"),
            has_position_ids="position_ids" in inputs, kv_dtype=np.dtype(kv_type),
            num_kv_heads=int(kv.get("num_kv_heads", manifest.model["num_kv_heads"])),
            head_dim=int(kv.get("head_dim", manifest.model["head_dim"])),
        )

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A cache holding no positions, one array per past input (they may share one: a model run never writes
        its inputs)."""
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.kv_dtype)
        return [empty] * len(self.past_names)

    def feed(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray | None = None,
             past: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The inputs of one run. ``position_ids`` default to the mask's (position_ids_for), and are left out where
        the graph takes none; ``past`` (one array per past name) defaults to an empty cache (a prefill)."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.has_position_ids:
            feed["position_ids"] = (position_ids if position_ids is not None
                                    else position_ids_for(attention_mask, input_ids.shape[1]))
        values = self.empty_past(input_ids.shape[0]) if past is None else past
        if len(values) != len(self.past_names):
            raise ValueError(f"{len(values)} past arrays for {len(self.past_names)} past inputs")
        feed.update(zip(self.past_names, values))
        return feed

    def outputs(self, presents: bool = False) -> list[str]:
        """The logits' name, followed by the present KV names when ``presents``."""
        return [self.logits, *(self.present_names if presents else ())]
