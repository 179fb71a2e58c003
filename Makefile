# ar: install, test, lint, demo, bench. Everything runs inside .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and explicitly: a plain `torch` dependency would pull the
# newest CUDA build. On a CUDA machine, set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_workspace

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

demo: install
	DEMO_DIR=$(DEMO_DIR) PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) dist build .pytest_cache .ruff_cache $(DEMO_DIR)
