"""int4 --symmetric: RTN on a grid centred on 0, MatMulNBits without zero points (the form ORT's CUDA kernel reads
fastest); everything else as the asymmetric default, and refused where it does not apply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxpipe.errors import OnnxpipeError
from test_modes import CALIBRATION, check_directory, quantize


def _nbits(md) -> list:  # noqa: ANN001
    return [n for n in onnx.load(str(md.model_path)).graph.node if n.op_type == "MatMulNBits" and
            {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["bits"] == 4]


def test_symmetric_int4_has_no_zero_points(tok_model, small_eval: Path, tmp_path: Path) -> None:  # noqa: ANN001
    sym = quantize(tok_model("llama"), tmp_path / "sym", "int4", small_eval, symmetric=True)
    asym = quantize(tok_model("llama"), tmp_path / "asym", "int4", small_eval)
    step = check_directory(sym, "int4")
    assert step["params"]["symmetric"] is True and step["details"]["zero_points"] == "none (symmetric grid)"
    body, body_asym = _nbits(sym), _nbits(asym)
    assert len(body) == len(body_asym) == 14
    assert all(len(n.input) < 4 or n.input[3] == "" for n in body)  # A, B, scales: no zero_points input
    assert all(len(n.input) >= 4 and n.input[3] for n in body_asym)
    # same graph otherwise, and a model that still tracks its input
    assert step["quality"]["top1_agreement"] > 0.7
    assert np.isfinite(step["quality"]["ppl_after"])


@pytest.mark.parametrize("opts", [dict(algo="gptq", calibration=CALIBRATION), dict(block_size=0), dict(mode="dynamic")])
def test_symmetric_is_refused_where_it_does_not_apply(tok_model, small_eval: Path, tmp_path: Path, opts) -> None:  # noqa: ANN001
    mode = opts.pop("mode", "int4")
    with pytest.raises(OnnxpipeError, match="--symmetric applies to --mode int4 --algo rtn"):
        quantize(tok_model("llama"), tmp_path / "q", mode, small_eval, symmetric=True, **opts)
