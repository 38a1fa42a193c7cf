# A demo worker: torch (CPU) and RemoteOptimizer, nothing of the shard's (no cupy, numba or
# prometheus-client).
#   docker build -f deploy/worker.Dockerfile -t optserve-worker .
#   docker run optserve-worker optserve demo --servers HOST:50051 --rank 0 --workers 1
FROM python:3.12.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The CPU wheel from PyTorch's own index: PyPI's default torch pulls in the CUDA libraries
# (gigabytes) that a CPU worker never uses.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# See shard.Dockerfile: these folders are what `pip install .` needs.
WORKDIR /tmp/optserve
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
COPY kernels/ kernels/
COPY optserve/ optserve/
COPY bench/ bench/
RUN pip install ".[client]" && cd / && rm -rf /tmp/optserve

RUN useradd --system --uid 10001 --create-home --home-dir /home/optserve optserve
USER optserve
WORKDIR /home/optserve
CMD ["optserve", "demo", "--help"]
