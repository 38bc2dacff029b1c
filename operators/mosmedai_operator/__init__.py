"""GpuPool operator: one ``GpuPool`` custom resource per region, reconciled into a
Triton Inference Server pool (Deployment, Service, PodDisruptionBudget, optional
ServiceMonitor) that scales on Prometheus metrics and on the region's working hours.

Modules:

- ``config``: operator configuration (pydantic-settings, env prefix ``MOSMEDAI_OPERATOR_``).
- ``spec``: typed GpuPool spec and the semantic checks the CRD schema cannot express.
- ``policy``: the pure scaling policy (also used by the capacity planner).
- ``children``: pure builders of the child manifests and the drift comparison.
- ``modelrepo``: lists the Triton ensembles (tools) of a model repository.
- ``prom``: a small Prometheus HTTP API client.
- ``kube``: a small Kubernetes API client (merge patches, create, get, delete).
- ``handlers``: the kopf handlers, registered by ``build_registry(config)``.
- ``metrics``: the operator's own Prometheus metrics.
"""

GROUP = "mosmedai.io"
VERSION = "v1alpha1"
PLURAL = "gpupools"
KIND = "GpuPool"
API_VERSION = f"{GROUP}/{VERSION}"
MANAGER = "mosmedai-operator"  # app.kubernetes.io/managed-by value and HTTP field manager
