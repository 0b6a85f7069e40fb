# syntax=docker/dockerfile:1
#
# Balcony Serve images. Two final targets, one Dockerfile:
#
#   docker build -t balcony-serve:cuda .               # NVIDIA GPUs (default: the last stage)
#   docker build --target cpu -t balcony-serve:cpu .   # laptops and CI-like machines
#
# Both run `balcony serve`. Every flag `--foo-bar` can also be set as the environment variable
# BALCONY_FOO_BAR (the flag wins), so `docker run -e BALCONY_MAX_NUM_SEQS=32 ...` and
# `docker run ... --max-num-seqs 32` are the same. See docs/deployment.md.

# The torch wheels from the CUDA index carry their own CUDA libraries; the base image gives the
# driver-facing setup the NVIDIA container toolkit expects. `-base-` instead of `-runtime-` also
# works and is about 1.5 GB smaller.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------------------------------------
# CPU: build a virtual environment with the CPU build of torch, then the package.
FROM ${CPU_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_CPU_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
# .dockerignore lets through only what `pip install .` needs.
COPY . .
# The second command fails the build if the console script or its flags are broken.
RUN pip install --no-cache-dir . \
    && balcony serve --help > /dev/null

FROM ${CPU_IMAGE} AS cpu
LABEL org.opencontainers.image.title="balcony-serve (CPU)" \
      org.opencontainers.image.description="OpenAI-compatible LLM server with per-request latency budgets" \
      org.opencontainers.image.licenses="Apache-2.0"
# The CPU decode kernels (kernels/native) are compiled at the first start for the CPU the container
# runs on (-march=native), so the image carries a C compiler; without one the torch ops serve.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 --user-group balcony \
    && mkdir -p /var/lib/balcony \
    && chown balcony:balcony /var/lib/balcony
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BALCONY_HOME=/var/lib/balcony \
    BALCONY_HOST=0.0.0.0 \
    BALCONY_PORT=8000 \
    BALCONY_DEVICE=cpu
VOLUME ["/var/lib/balcony"]
USER 10001:10001
WORKDIR /home/balcony
EXPOSE 8000
# /health is liveness only (200 while the process is up); readiness is /ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('BALCONY_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["balcony", "serve"]

# ---------------------------------------------------------------------------------------------
# CUDA: the same virtual environment with a CUDA build of torch (which pins a matching Triton).
FROM ${CUDA_IMAGE} AS cuda-build
# Versions come from the pinned base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_CUDA_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir . \
    && python -c "import torch, triton; assert torch.version.cuda, 'not a CUDA build of torch'" \
    && balcony serve --help > /dev/null

FROM ${CUDA_IMAGE} AS cuda
LABEL org.opencontainers.image.title="balcony-serve (CUDA)" \
      org.opencontainers.image.description="OpenAI-compatible LLM server with per-request latency budgets" \
      org.opencontainers.image.licenses="Apache-2.0"
# Triton compiles a small C launcher at run time: it needs a C compiler and Python's headers.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group balcony \
    && mkdir -p /var/lib/balcony \
    && chown balcony:balcony /var/lib/balcony
COPY --from=cuda-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BALCONY_HOME=/var/lib/balcony \
    BALCONY_HOST=0.0.0.0 \
    BALCONY_PORT=8000 \
    BALCONY_DEVICE=cuda
VOLUME ["/var/lib/balcony"]
USER 10001:10001
WORKDIR /home/balcony
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('BALCONY_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["balcony", "serve"]
