# Setup is part of each target: `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build this machine class carries; any other pin pulls CUDA wheels.
TORCH ?= torch==2.13.0
# What `pip install -e` installs; CI adds nvrtc-check (CuPy and NVRTC, for tests/test_cuda.py)
# and ray (tests/test_ray.py).
EXTRAS ?= dev

# The tools of tests/test_k8s.py (the k8s-check extra) in a virtualenv of their own: checkov's
# pins would downgrade packages of the test environment.
K8S_VENV ?= .venv-k8s

.PHONY: demo test proto bench clean k8s-tools

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

$(K8S_VENV)/.installed: pyproject.toml
	python3 -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/python -m pip install -q --upgrade pip
	$(K8S_VENV)/bin/python -m pip install -q -e '.[k8s-check]'
	touch $@

k8s-tools: $(K8S_VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/optserve demo

# Run again against a `--device cuda` shard: on the GPU where there is one, else on the CuPy
# test double (tests/fake_cupy), whose kernels run on a host emulation of the GPU. Over gRPC
# streams, but for tests/test_shm.py.
CUDA_SUITE := tests/test_oracles.py tests/test_cluster.py tests/test_checkpoint.py \
	tests/test_errors.py tests/test_fuzz.py tests/test_state_dict.py tests/test_stepper.py \
	tests/test_lifecycle.py tests/test_metrics.py

# Run again with the steps on their gRPC streams: the first run takes shared memory wherever
# a worker and its shard share this host (client/shm.py), which all of the tests' do. The
# steps taken in parts (whose replies stream while they step) are the gRPC-specific path; the
# inline variants of the same tests run in the first pass.
GRPC_SUITE := tests/test_oracles.py tests/test_cluster.py tests/test_checkpoint.py \
	tests/test_errors.py tests/test_stepper.py

test: $(VENV)/.installed
	$(PY) -m pytest -q
	OPTSERVE_SHARED_MEMORY=0 $(PY) -m pytest -q $(GRPC_SUITE) -k "not inline"
	OPTSERVE_TEST_DEVICE=cuda OPTSERVE_SHARED_MEMORY=0 $(PY) -m pytest -q $(CUDA_SUITE) tests/test_shm.py

proto: $(VENV)/.installed
	$(PY) proto/generate.py

bench: $(VENV)/.installed
	$(VENV)/bin/optserve bench kernels

clean:
	rm -rf $(VENV) $(K8S_VENV) *.egg-info .pytest_cache
