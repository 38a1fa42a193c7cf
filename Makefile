# Setup is part of each target: `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build this machine class carries; any other pin pulls CUDA wheels.
TORCH ?= torch==2.13.0
# What `pip install -e` installs; CI adds nvrtc-check (CuPy and NVRTC, for tests/test_cuda.py)
# and ray (tests/test_ray.py).
EXTRAS ?= dev

.PHONY: demo test proto bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/optserve demo

# Run again against a `--device cuda` shard: on the GPU where there is one, else on the CuPy
# test double (tests/fake_cupy), whose kernels run on a host emulation of the GPU.
CUDA_SUITE := tests/test_oracles.py tests/test_cluster.py tests/test_checkpoint.py \
	tests/test_errors.py tests/test_fuzz.py tests/test_state_dict.py tests/test_stepper.py \
	tests/test_lifecycle.py tests/test_metrics.py

test: $(VENV)/.installed
	$(PY) -m pytest -q
	OPTSERVE_TEST_DEVICE=cuda $(PY) -m pytest -q $(CUDA_SUITE)

proto: $(VENV)/.installed
	$(PY) proto/generate.py

bench: $(VENV)/.installed
	$(VENV)/bin/optserve bench kernels

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
