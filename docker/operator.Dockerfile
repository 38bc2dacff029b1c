# syntax=docker/dockerfile:1
# The GpuPool operator (kopf). Carries the model repository's config.pbtxt files only: the
# operator reads the ensemble names from them (MOSMEDAI_OPERATOR_MODEL_REPOSITORY_PATH) to
# refuse a GpuPool naming a tool the repository lacks.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t mosmedai/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY operators/mosmedai_operator ./operators/mosmedai_operator
# pip_cert: optional build secret, the CA bundle of a TLS-intercepting proxy between pip and
# PyPI (scripts/build-images passes $PIP_CERT); a secret mount never lands in a layer.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/venv/bin/pip install /src
COPY model_repository /src/model_repository
# Keep only the configs: the operator never reads weights or code.
RUN mkdir -p /out/model_repository \
 && cd /src/model_repository \
 && find . -name config.pbtxt -exec cp --parents {} /out/model_repository/ \;

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 mosmedai \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mosmedai
COPY --from=build /opt/venv /opt/venv
COPY --from=build /out/model_repository /app/model_repository
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MOSMEDAI_OPERATOR_MODEL_REPOSITORY_PATH=/app/model_repository
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "mosmedai_operator"]
