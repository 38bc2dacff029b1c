# syntax=docker/dockerfile:1
# Gateway + router: the Ray Serve application (`python -m mosmedai.local.processes serve`; in KubeRay
# mode the same image runs the Ray head and workers). Also the `helm test` client.
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t mosmedai/gateway:0.1.0 .
# Base images are pinned by exact version; pin them by digest too when you mirror them.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY operators/mosmedai_operator ./operators/mosmedai_operator
# The whole project's dependencies (pyproject.toml is the one list), non-editable.
# pip_cert: optional build secret, the CA bundle of a TLS-intercepting proxy between pip and
# PyPI (scripts/build-images passes $PIP_CERT); a secret mount never lands in a layer.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/venv/bin/pip install /src

FROM ${PYTHON_IMAGE}
# onnxruntime and opencv need OpenMP at run time; nothing else from the system.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 mosmedai \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mosmedai
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    RAY_USAGE_STATS_ENABLED=0
WORKDIR /tmp
# Numeric user: Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 8000 8201
CMD ["python", "-m", "mosmedai.local.processes", "serve"]
