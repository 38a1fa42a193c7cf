# One optserve shard: CuPy kernels on an NVIDIA GPU, the CPU backend without one. No torch.
#   docker build -f deploy/shard.Dockerfile -t optserve-shard .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 optserve-shard        # GPU
#   docker run -e OPTSERVE_DEVICE=cpu -p 50051:50051 -p 9464:9464 optserve-shard
# Jobs are checkpointed to /var/lib/optserve/checkpoints (mount a volume there) and restored
# from it when the shard starts again.
# The CUDA *runtime* image (no compiler): optserve compiles its kernels with NVRTC, which the
# runtime image ships. One CUDA major everywhere: this image, cupy-cuda13x (the `cuda` extra)
# and CI's compile check (nvidia-cuda-nvrtc 13) are all CUDA 13; the host driver must be
# R580 or newer. 13.0 rather than a later 13.x: a driver of any 13.x can then run it.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

ARG CUPY_VERSION=14.2.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/optserve/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/optserve \
 && pip install --upgrade "pip==25.3" \
 && pip install "cupy-cuda13x==${CUPY_VERSION}"

# [tool.setuptools] package-dir maps these top-level folders to optserve.*: all of them are
# needed for `pip install .`, and nothing else (.dockerignore beside this file keeps the build
# context small where BuildKit reads it).
WORKDIR /tmp/optserve
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
COPY kernels/ kernels/
COPY optserve/ optserve/
COPY bench/ bench/
RUN pip install ".[server,cuda]" && cd / && rm -rf /tmp/optserve

RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/optserve optserve \
 && mkdir -p /var/lib/optserve/checkpoints \
 && chown -R optserve:optserve /var/lib/optserve

# The kernels, compiled at build time for every architecture CUDA 13 targets (Turing to
# Blackwell), so that a shard's start loads a cubin instead of compiling for seconds. The
# cache is keyed by source, options, target and NVRTC version; what a shard compiles itself
# (another NVRTC) it adds here.
ENV OPTSERVE_KERNEL_CACHE=/opt/optserve/kernels
RUN optserve compile-kernels --arch 75 80 86 89 90 100 120 \
 && chown -R optserve:optserve /opt/optserve/kernels
USER optserve
WORKDIR /var/lib/optserve

# Numba compiles the CPU kernels on first use and caches them here (site-packages is not
# writable by this user).
ENV NUMBA_CACHE_DIR=/var/lib/optserve/.cache/numba
# auto: cuda when a GPU is visible (docker run --gpus / deploy/compose.gpu.yml), else cpu.
ENV OPTSERVE_DEVICE=auto
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["optserve", "health", "127.0.0.1:50051"]
# Shell form for $OPTSERVE_DEVICE; `exec` makes optserve PID 1, so SIGTERM drains it.
CMD exec optserve server --host 0.0.0.0 --port 50051 --metrics-port 9464 \
    --metrics-host 0.0.0.0 --device "$OPTSERVE_DEVICE" \
    --checkpoint-dir /var/lib/optserve/checkpoints
