# syntax=docker/dockerfile:1
# TensorRT engine builder: the chart runs it as one Job per GPU product of the regions, on
# a node of that product with one GPU. It builds (python -m mosmedai.serving.tensorrt_build build)
# the engines of the ONNX networks baked in here, renders the gpu variant of the model
# repository (network steps tensorrt_plan) and publishes it with the model publisher's
# script under <tensorrt.prefix>/<product>/trt-<TensorRT version>.
# TENSORRT_VERSION must be the TensorRT of Triton's backend in docker/triton.Dockerfile
# (tritonserver 25.01 ships 10.8.0.43) and the chart's tensorrt.version (a test compares):
# Triton refuses a plan of any other version. The tensorrt wheel brings its own CUDA
# libraries; the GPU driver comes from the node (NVIDIA container runtime).
# Build from the repository root:  docker build -f docker/engine-builder.Dockerfile -t mosmedai/engine-builder:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TENSORRT_VERSION=10.8.0.43
# PyPI has tensorrt-cu12 and tensorrt-cu12-bindings 10.8.0.43 (wheels for cp38-cp312), but
# tensorrt-cu12-libs 10.8.0.43 only as a wheel-stub sdist, which downloads the real wheel
# from NVIDIA's index while pip prepares it: the build must reach that index (checked by
# tests/charts/test_nvidia_images.py; scripts/build-images skips this image where it cannot).
ARG NVIDIA_PIP_INDEX=https://pypi.nvidia.com
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY operators/mosmedai_operator ./operators/mosmedai_operator
# The project's dependencies (pyproject.toml), boto3 for the upload, TensorRT pinned.
# pip_cert: optional build secret, the CA bundle of a TLS-intercepting proxy between pip and
# PyPI (scripts/build-images passes $PIP_CERT); a secret mount never lands in a layer.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/venv/bin/pip install --extra-index-url "${NVIDIA_PIP_INDEX}" \
      /src 'boto3>=1.35,<2' "tensorrt-cu12==${TENSORRT_VERSION}"

FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 mosmedai \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mosmedai
COPY --from=build /opt/venv /opt/venv
# tensorrt_build reads <REPO_ROOT>/model_repository with REPO_ROOT two levels above
# mosmedai/config.py: the sources on PYTHONPATH under /app/services, the ONNX repository
# under /app/model_repository.
COPY services/mosmedai /app/services/mosmedai
COPY model_repository /app/model_repository
COPY docker/model-publisher/publish.py /app/publish.py
RUN find /app -name __pycache__ -type d -prune -exec rm -rf {} +
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app/services \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /tmp
USER 10001:10001
CMD ["python", "-m", "mosmedai.serving.tensorrt_build", "--help"]
