# syntax=docker/dockerfile:1.7
# mora-serve, production image for NVIDIA GPUs: vLLM 0.32.0 (torch 2.13.0, CUDA 13.0 from its
# wheels) with the mora plugin, serving gRPC (50051) and Prometheus metrics (9400).
#
#   docker build -t mora-serve:0.1.0 .                       # the server (one node, TP within it)
#   docker build --target multinode -t mora-serve:0.1.0-ray .  # + Ray, for deploy/overlays/multinode
#
# No HEALTHCHECK: Kubernetes probes grpc.health.v1 directly (deploy/base/deployment.yaml).
# Nothing is downloaded at run time: the model and adapters come from volumes.

# torch 2.13.0 from PyPI is built for CUDA 13.0 and brings the CUDA libraries (cuBLAS, cuDNN,
# NCCL, ...) as wheels, so the base image only has to provide the driver plumbing: `base`, not
# `runtime` or `devel`. Nodes need a driver for CUDA 13.0 (>= 580). Kernels that JIT-compile with
# nvcc at run time (some FlashInfer paths) need CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

############################ build: a virtualenv in /opt/venv ############################
FROM ${CUDA_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.12 -m venv /opt/venv

# Every package exactly as locked: versions and sha256 hashes of vLLM 0.32.0, torch 2.13.0 (CUDA
# 13.0 wheels) and the rest (requirements/gpu.txt, made by `make lock` from pyproject.toml for this
# image's Python 3.12; tests/test_packaging.py checks it against the `gpu` extra). --no-deps: the
# lock is complete, nothing is resolved at build time. Layers from the slowest-changing to the
# fastest: the locked packages (change with the lock), then our code.
WORKDIR /src
COPY requirements/gpu.txt requirements/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --require-hashes -r requirements/gpu.txt

COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY mora/ mora/
COPY serve/ serve/
# Building the package generates the gRPC stubs from protos/ (setup.py; never committed) into the
# wheel, so the runtime needs no grpcio-tools; --no-deps: everything is installed above.
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import serve.grpc.proto, mora.vllm_plugin; from importlib.metadata import entry_points; assert 'mora' in {e.name for e in entry_points(group='vllm.general_plugins')}"

############################ runtime ############################
FROM ${CUDA_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# python3.12: the interpreter the venv was built with (same base image, same path).
# gcc + python3.12-dev: Triton (vLLM's and MoRA's GPU kernels) compiles a small C launcher per
# kernel at run time and needs a C compiler and Python.h. tini: PID 1 that forwards SIGTERM to the
# server and reaps vLLM's worker processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-dev gcc libc6-dev tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 mora \
    && useradd --uid 10001 --gid 10001 --home-dir /home/mora --create-home --shell /usr/sbin/nologin mora
COPY --from=build /opt/venv /opt/venv

# Every writable path lives under /home/mora or /tmp, which the pod mounts as emptyDirs so the
# root filesystem can be read-only. HF_HUB_OFFLINE: the model is a local directory; never call a hub.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/mora \
    XDG_CACHE_HOME=/home/mora/.cache \
    VLLM_CACHE_ROOT=/home/mora/.cache/vllm \
    TRITON_CACHE_DIR=/home/mora/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/home/mora/.cache/inductor \
    HF_HOME=/home/mora/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/mora
# gRPC, Prometheus /metrics. The server binds 127.0.0.1 unless told otherwise: the pod's config
# sets host 0.0.0.0 (deploy/base/config.yaml).
EXPOSE 50051 9400 8000
ENTRYPOINT ["tini", "--", "mora-serve"]
CMD ["--config", "/etc/mora/config.yaml"]

############################ multinode: + Ray for pipeline parallelism across nodes ############################
FROM runtime AS multinode
# vLLM's Ray executor; not a vLLM dependency, so added only to this target.
ARG RAY_VERSION=2.60.0
RUN pip install --no-cache-dir "ray[default]==${RAY_VERSION}"
