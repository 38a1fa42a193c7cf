# Setup is part of each target: `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build this machine class carries; any other pin pulls CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: demo test proto bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/optserve demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

proto: $(VENV)/.installed
	$(PY) proto/generate.py

bench: $(VENV)/.installed
	$(VENV)/bin/optserve bench kernels

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
