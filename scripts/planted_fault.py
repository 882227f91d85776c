"""optimize with two planted faulty rules on a real-size export: the per-pass check must catch both at scale.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/planted_fault.py EXPORTED OUT [--target cuda] [--json R.json]

EXPORTED is an `onnxpipe export` directory (the stamped export's weight names; fp16 or fp32, any size). Two rules
are put in front of the real level-3 passes, as tests/scale/test_layerwise_check.py does on a 329 MB model: one
doubles layer 1's MLP down projection on the exported graph, one doubles the last layer's after the attention
fusion (where only the logits show it). optimize runs with its default check form (`auto`: layer by layer from
1 GB), in this process. Prints each pass's status and reason and exits non-zero unless both planted passes were
rolled back by a failed parity check and the real passes were kept with a passing final check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def doubling(layer: int):
    def run(model, ctx):
        import onnx_ir as ir

        name = f"model.model.layers.{layer}.mlp.down_proj.weight_T"
        v = model.graph.initializers[name]
        v.const_value = ir.tensor(np.asarray(v.const_value.numpy()) * 2, name=v.name)
        return {"doubled": v.name}
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exported", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--target", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--check-form", default="auto", choices=["auto", "whole", "layerwise"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from onnxpipe.artifact import ModelDir
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.fusion import optimize_model, pipeline

    try:
        layers = ModelDir.open(args.exported).manifest.num_layers
    except OnnxpipeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    early = pipeline.FusionPass("planted_layer_1", 1, doubling(1), "doubles layer 1's down projection")
    late = pipeline.FusionPass("planted_last_layer", 3, doubling(layers - 1), "doubles the last layer's down projection")
    at = [p.name for p in pipeline.PASSES].index("attention") + 1
    pipeline.PASSES = (early,) + pipeline.PASSES[:at] + (late,) + pipeline.PASSES[at:]
    pipeline.PASS_NAMES = tuple(p.name for p in pipeline.PASSES)
    names = ["planted_layer_1", "planted_last_layer"] + [p.name for p in pipeline.select_passes(3, None)]
    t = time.perf_counter()
    result = optimize_model(args.exported, args.out, passes=names, target=args.target, check_form=args.check_form,
                            force=True, log=lambda m: print(m, file=sys.stderr, flush=True))
    report = {"seconds": round(time.perf_counter() - t, 1), "layers": layers,
              "passes": [r.to_json() for r in result.passes], "final": result.check.to_json()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    passes = {p["name"]: p for p in report["passes"]}
    for name, p in passes.items():
        print(f"{name}: {p['status']} {p.get('reason') or ''}")
    caught = all(passes[n]["status"] == "rolled_back" and str(passes[n].get("reason", "")).startswith("parity failed")
                 for n in ("planted_layer_1", "planted_last_layer"))
    kept = passes["attention"]["status"] == "kept" and report["final"]["passed"]
    print(f"planted faults caught: {caught}; real passes kept and the result checks: {kept}; {report['seconds']} s")
    return 0 if caught and kept else 1


if __name__ == "__main__":
    sys.exit(main())
