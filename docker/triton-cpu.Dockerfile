# syntax=docker/dockerfile:1
# Triton Inference Server for CPU pools, without NVIDIA's NGC base: the `tritonserver`
# binary of the nvidia-pytriton wheel (PyPI; Python backend and ensembles, no TensorRT or
# ONNX Runtime backend: on CPU a network runs as a Python-backend model that calls
# onnxruntime, DESIGN.md). Laid out like NVIDIA's image so that the operator's pods run it
# unchanged: `tritonserver` on PATH, the Python backend in /opt/tritonserver/backends
# (Triton's default --backend-directory), user 1000:1000, ports 8000/8001/8002.
# Set the operator's tritonImage to it for pools with gpu.count 0.
# Build from the repository root:  docker build -f docker/triton-cpu.Dockerfile -t mosmedai/triton-cpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# pip_cert: optional build secret, the CA bundle of a TLS-intercepting proxy between pip and
# PyPI (scripts/build-images passes $PIP_CERT); a secret mount never lands in a layer.
# Ranges as in pyproject.toml: the server, and what the Python-backend models import.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/venv/bin/pip install 'nvidia-pytriton>=0.7,<0.8' 'numpy>=1.26,<2' \
      'opencv-python-headless>=4.10,<4.11' 'onnxruntime>=1.22,<1.33'
# The Python backend beside the stub built for this image's Python (the wheel ships one
# stub per Python version; Triton runs the one next to libtriton_python.so).
RUN set -e; \
    server=$(echo /opt/venv/lib/python3.*/site-packages/pytriton/tritonserver); \
    version=$(/opt/venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'); \
    mkdir -p /opt/tritonserver/backends/python /opt/tritonserver/bin; \
    cp "$server/backends/python/libtriton_python.so" "$server/backends/python/triton_python_backend_utils.py" \
       "$server/python_backend_stubs/$version/triton_python_backend_stub" /opt/tritonserver/backends/python/; \
    ln -s "$server/bin/tritonserver" /opt/tritonserver/bin/tritonserver; \
    ln -s /opt/venv/lib/python3.*/site-packages/nvidia_pytriton.libs /opt/tritonserver/libs

FROM ${PYTHON_IMAGE}
# onnxruntime and opencv need OpenMP at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 triton-server \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin triton-server
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tritonserver /opt/tritonserver
# Source only: the stub imports mosmedai.serving.triton_models, imaging and postprocess.
COPY services/mosmedai /opt/mosmedai/mosmedai
# A .pth file in the virtual environment's site-packages puts the sources on the stub's
# path: the stub does not see the server's PYTHONPATH (a model failed with "No module
# named 'mosmedai'" with PYTHONPATH alone; `make up` works through the editable install).
RUN find /opt/mosmedai -name __pycache__ -type d -prune -exec rm -rf {} + \
 && echo /opt/mosmedai > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mosmedai.pth"
# The stub finds the virtual environment's packages through PATH (its python), mosmedai
# through PYTHONPATH; the server its libraries through LD_LIBRARY_PATH.
ENV PATH=/opt/tritonserver/bin:/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/tritonserver/libs \
    PYTHONPATH=/opt/mosmedai \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
WORKDIR /tmp
# NVIDIA's image's user (triton-server, 1000): the operator's Triton pods run as it.
USER 1000:1000
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--help"]
