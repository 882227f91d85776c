"""optimize's layer-by-layer check form: the runner lives in runtime/layerwise.py (quantize's checks take the same
form); these are the names optimize and its tests use."""

from __future__ import annotations

from onnxpipe.runtime.layerwise import (
    CHECK_FORMS,
    FILE_SPAN,
    LAYERWISE_BYTES,
    LAZY_MIN_BYTES,
    LayerwiseReport,
    Segment,
    SideRun,
    check_form,
    check_layerwise,
    kv_caches,
    lazy_weights,
    plan_segments,
    run_segmented,
    segment_graph,
)

__all__ = ["CHECK_FORMS", "FILE_SPAN", "LAYERWISE_BYTES", "LAZY_MIN_BYTES", "LayerwiseReport", "Segment", "SideRun",
           "check_form", "check_layerwise", "kv_caches", "lazy_weights", "plan_segments", "run_segmented",
           "segment_graph"]
