# ar: install, test, lint, demo, bench, lock. Everything runs inside .venv.
SHELL := bash
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
# pip itself is pinned too: the resolver's behaviour is part of a reproducible install.
PIP_VERSION ?= $(shell sed -n "s/^pip==//p" $(LOCK))
# torch is installed first and explicitly, and is not in the lock: a plain `torch`
# dependency would pull the newest CUDA build. On a CUDA machine, set TORCH_SPEC to the
# build you want, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_workspace

.PHONY: install test lint demo bench bench-keep bench-agents bench-gpu lock check-lock clean

install: $(VENV)/.installed

# Everything but torch comes from the lock, with --no-deps: nothing unpinned can slip in.
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "pip==$(PIP_VERSION)"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

demo: install
	DEMO_DIR=$(DEMO_DIR) PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

bench: install
	$(PY) benchmarks/run_all.py

# Whether keeps hold up (long: about an hour per 10 experiments at the cpu budget).
bench-keep: install
	$(PY) benchmarks/bench_keep.py $(BENCH_KEEP_FLAGS)

# Which offline agent finds real gains: random against tpe, 30 experiments each on the cpu
# profile, each best re-run on new seeds paired with the baseline (long: hours on 2 cores).
# A smoke run: BENCH_AGENTS_FLAGS="--profile micro --experiments 4 --reruns 2".
bench-agents: install
	$(PY) benchmarks/bench_agents.py $(BENCH_AGENTS_FLAGS)

# On a machine with an NVIDIA GPU: the gpu profile through ar, one table (docs/gpu-notes.md).
bench-gpu: install
	$(PY) benchmarks/bench_gpu.py --variants SSSL,L,SSSL:flex --iterate 2 $(BENCH_GPU_FLAGS)

# Regenerate the lock from pyproject.toml, keeping current pins where they still fit.
# LOCK_FLAGS=--upgrade moves every package to its newest allowed version.
# It needs only pip-tools, not ar's install (a new dependency must be lockable first).
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "pip==$(PIP_VERSION)" "pip-tools==$(shell sed -n 's/^pip-tools==//p' $(LOCK))"
	$(VENV)/bin/pip-compile --quiet --strip-extras --extra dev --extra ray --unsafe-package torch \
		--no-emit-index-url --no-emit-find-links -c lock-constraints.txt $(LOCK_FLAGS) \
		--output-file $(LOCK) pyproject.toml

# Two venvs built from the lock must hold exactly the same packages.
check-lock: install
	rm -rf .venv-lockcheck
	$(MAKE) --no-print-directory install VENV=.venv-lockcheck
	diff <($(VENV)/bin/pip freeze --exclude-editable) <(.venv-lockcheck/bin/pip freeze --exclude-editable)
	rm -rf .venv-lockcheck
	@echo "check-lock: two venvs built from $(LOCK) are identical"

clean:
	rm -rf $(VENV) .venv-lockcheck dist build .pytest_cache .ruff_cache $(DEMO_DIR)
