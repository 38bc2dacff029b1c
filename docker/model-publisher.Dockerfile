# syntax=docker/dockerfile:1
# Publishes the model repository (configs, ONNX networks, Python-backend entry points,
# calibration) to object storage over the S3 API; the chart runs it as a post-install /
# post-upgrade Job. The image's version is the models' version.
# Build from the repository root:  docker build -f docker/model-publisher.Dockerfile -t mosmedai/model-publisher:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# boto3 within the range pyproject.toml allows; nothing else is needed.
# pip_cert: optional build secret, the CA bundle of a TLS-intercepting proxy between pip and
# PyPI (scripts/build-images passes $PIP_CERT); a secret mount never lands in a layer.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install 'boto3>=1.35,<2' \
 && groupadd --gid 10001 mosmedai \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mosmedai
COPY model_repository /app/model_repository
RUN find /app/model_repository -name __pycache__ -type d -prune -exec rm -rf {} +
COPY docker/model-publisher/publish.py /app/publish.py
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["python", "/app/publish.py"]
CMD ["--source=/app/model_repository"]
