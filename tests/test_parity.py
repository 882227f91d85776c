"""The parity check itself: it must be able to fail."""

from __future__ import annotations

import numpy as np

from onnxpipe.artifact import ModelDir
from onnxpipe.parity import check_decoders, ort_step_fn
from onnxpipe.runtime.sessions import reference_session


def test_perturbed_candidate_fails(tiny_onnx):
    md = ModelDir.open(tiny_onnx("llama"))
    ref = ort_step_fn(reference_session(md.model_path), md.manifest)

    def noisy(ids, mask, pos, past):
        logits, present = ref(ids, mask, pos, past)
        return logits + 0.05 * np.abs(logits).max(), present

    same = check_decoders(ref, ref, md.manifest, kv_dtype=np.float32).judge(1e-4)
    assert same.passed and same.max_abs_err == 0.0 and same.greedy_agreement == 1.0
    bad = check_decoders(ref, noisy, md.manifest, kv_dtype=np.float32).judge(1e-4)
    assert not bad.passed and bad.rel_err > 1e-2


def test_nan_fails(tiny_onnx):
    md = ModelDir.open(tiny_onnx("llama"))
    ref = ort_step_fn(reference_session(md.model_path), md.manifest)

    def nan(ids, mask, pos, past):
        logits, present = ref(ids, mask, pos, past)
        logits = logits.copy()
        logits[..., 0] = np.nan
        return logits, present

    assert not check_decoders(ref, nan, md.manifest, kv_dtype=np.float32).judge(1e-4).passed
