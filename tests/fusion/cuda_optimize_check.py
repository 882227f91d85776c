"""Not a test: run on a CUDA machine (onnxruntime-gpu) to check `optimize --target cuda` with per-pass checks on the
CUDA EP, for tiny models of the given families. Prints one line per family and writes the manifests' optimize steps
to OUT_DIR/cuda_optimize.json.

    python3 tests/fusion/cuda_optimize_check.py OUT_DIR [family[:dtype] ...]      (dtype fp16 by default)

A family is a tests/tiny.py family or any model type of tests/export/tiny_archs.py (gemma2, gpt_neox, falcon,
gpt_oss, ...).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))


def main() -> None:
    import onnxruntime as ort

    from tiny import TINY_CONFIGS, make_tiny_model
    from tiny_archs import make_arch_model

    from onnxpipe.export import export_decoder
    from onnxpipe.fusion import format_table, optimize_model

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    families = sys.argv[2:] or ["gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3"]
    families = [f if ":" in f else f + ":fp16" for f in families]
    print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in families:
            family, dtype = name.split(":")
            t = time.perf_counter()
            try:
                hf = Path(tmp) / f"hf-{family}"
                if not hf.exists():
                    (make_tiny_model if family in TINY_CONFIGS else make_arch_model)(family, hf)
                exported = Path(tmp) / f"onnx-{name}"
                export_decoder(hf, exported, dtype=dtype, verify=False, force=True)
                result = optimize_model(exported, Path(tmp) / f"opt-{name}", level=3, target="cuda",
                                        log=lambda m: None)
                step = result.model_dir.manifest.steps[-1]
                graph = result.model_dir.manifest.graph
                results[name] = {"step": step, "graph_notes": {k: graph.get(k) for k in (
                    "fused_ops", "multi_token_steps_with_past", "requires_onnxruntime", "target_op_check")}}
                print(f"== {name}: final {result.check.summary()} ({time.perf_counter() - t:.0f}s); "
                      f"fused ops {graph.get('fused_ops')}", flush=True)
                print(format_table(result), flush=True)
            except Exception as e:  # report and go on with the next family
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"== {name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    (out / "cuda_optimize.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
