# syntax=docker/dockerfile:1
# Triton Inference Server for the GpuPool operator's pools: NVIDIA's image (TensorRT and
# Python backends) plus what the platform's Python-backend models import
# (model_repository/*/1/model.py -> mosmedai.serving.triton_models: numpy, opencv, onnxruntime).
# The models themselves come from object storage (--model-repository=s3://...).
# Build from the repository root:  docker build -f docker/triton.Dockerfile -t mosmedai/triton:0.1.0 .
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.01-py3
FROM ${TRITON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The image's system Python runs the Python-backend stub; ranges as in pyproject.toml.
# pip_cert: optional build secret, the CA bundle of a TLS-intercepting proxy between pip and
# PyPI (scripts/build-images passes $PIP_CERT); a secret mount never lands in a layer.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install --break-system-packages 'numpy>=1.26,<2' 'opencv-python-headless>=4.10,<4.11' 'onnxruntime>=1.22,<1.33'
# Source only: the stub imports mosmedai.serving.triton_models, imaging and postprocess.
COPY services/mosmedai /opt/mosmedai/mosmedai
# A .pth file in the system Python's site-packages puts the sources on the stub's path: in
# the CPU image (docker/triton-cpu.Dockerfile, same python backend) the stub did not see
# the server's PYTHONPATH and a model failed with "No module named 'mosmedai'".
RUN find /opt/mosmedai -name __pycache__ -type d -prune -exec rm -rf {} + \
 && echo /opt/mosmedai > "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mosmedai.pth"
ENV PYTHONPATH=/opt/mosmedai PYTHONDONTWRITEBYTECODE=1
# NVIDIA's image's non-root user (uid 1000); the operator's pods run as it.
USER 1000:1000
