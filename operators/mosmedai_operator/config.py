"""Operator configuration: every knob in one typed place.

Each field reads from the environment variable ``MOSMEDAI_OPERATOR_<FIELD NAME>``
(for example ``MOSMEDAI_OPERATOR_PROMETHEUS_URL``). A bad value fails at start with
a message that names the field (pydantic's ValidationError).

PromQL templates use ``string.Template`` placeholders (PromQL itself is full of
braces, so ``str.format`` would not do): ``$namespace`` and ``$pool`` (the GpuPool's
namespace and name), ``$region`` (``spec.region``) and ``$tools`` (the pool's tools
joined with ``|`` for a regex matcher). The defaults expect Triton's own metrics
(https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/metrics.html)
with the labels ``namespace`` and ``gpupool`` that the operator's ServiceMonitor adds.
Every query must return one series (aggregate with ``sum``/``max``/``avg``); if it
returns several, the operator takes the largest value (the conservative choice).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AnyHttpUrl, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_QUERY_QUEUE_TIME_P95_MS = (
    # Triton's queue-time summary (needs --metrics-config=summary_latencies=true, which
    # the operator's Deployment sets); microseconds -> milliseconds. max over pods and
    # models: a p95 cannot be averaged, the worst pod is the conservative figure.
    'max(nv_inference_queue_summary_us{namespace="$namespace",gpupool="$pool",quantile="0.95"}) / 1000'
)
DEFAULT_QUERY_IMAGES_PER_SECOND = (
    # nv_inference_count counts inferences (batch items = images), not requests;
    # only the ensembles ($tools) so that composing models are not counted twice.
    'sum(rate(nv_inference_count{namespace="$namespace",gpupool="$pool",model=~"$tools"}[2m]))'
)
DEFAULT_QUERY_GPU_UTILIZATION_PERCENT = (
    # nv_gpu_utilization is 0..1 per GPU; average over the pool's GPUs, in percent.
    'avg(nv_gpu_utilization{namespace="$namespace",gpupool="$pool"}) * 100'
)


class OperatorConfig(BaseSettings):
    """The operator's configuration, read from ``MOSMEDAI_OPERATOR_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="MOSMEDAI_OPERATOR_", extra="forbid", frozen=True)

    # --- scope and high availability -------------------------------------------------
    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch, comma-separated. Default: empty = the whole cluster. "
        "Why: a namespaced install needs only a Role, not a ClusterRole.",
    )
    standalone: bool = Field(
        default=False,
        description="Run without kopf peering. Default false. Why: peering keeps a second "
        "replica paused while the first is alive; standalone is for local runs and tests.",
    )
    peering_name: str = Field(
        default="mosmedai-operator",
        description="Name of the KopfPeering/ClusterKopfPeering object the replicas share. "
        "Default 'mosmedai-operator'. Why: replicas of one operator must share one name.",
    )
    peering_priority: int | None = Field(
        default=None,
        ge=0,
        le=2**31 - 1,
        description="This replica's peering priority (unitless). Default: random at start. "
        "Why: kopf pauses the lower-priority peer; equal priorities would both run.",
    )

    # --- Prometheus -------------------------------------------------------------------
    prometheus_url: AnyHttpUrl = Field(
        default=AnyHttpUrl("http://prometheus-operated.monitoring.svc:9090"),
        description="Base URL of the Prometheus HTTP API. Default: kube-prometheus-stack's "
        "in-cluster service. Why: the autoscaler reads Triton metrics from it.",
    )
    prometheus_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Timeout of one Prometheus query, seconds. Default 5. Why: a slow "
        "Prometheus must not stall the timer; on timeout the pool holds its size.",
    )
    query_queue_time_p95_ms: str = Field(
        default=DEFAULT_QUERY_QUEUE_TIME_P95_MS,
        description="PromQL for the pool's p95 queue time, milliseconds.",
    )
    query_images_per_second: str = Field(
        default=DEFAULT_QUERY_IMAGES_PER_SECOND,
        description="PromQL for the pool's total images per second (all replicas).",
    )
    query_gpu_utilization_percent: str = Field(
        default=DEFAULT_QUERY_GPU_UTILIZATION_PERCENT,
        description="PromQL for the pool's average GPU utilisation, percent (0-100).",
    )
    query_step_seconds: float = Field(
        default=30.0,
        ge=1,
        le=600,
        description="Resolution of the range queries over the stabilisation window, seconds. "
        "Default 30 (twice Triton's usual 15 s scrape). Why: finer adds cost, coarser misses spikes.",
    )
    max_sample_age_seconds: float = Field(
        default=120.0,
        ge=1,
        le=3600,
        description="Newest sample older than this counts as no data, seconds. Default 120. "
        "Why: scaling on stale numbers is worse than holding.",
    )

    # --- timing -----------------------------------------------------------------------
    autoscale_interval_seconds: float = Field(
        default=30.0,
        ge=0.1,
        le=3600,
        description="Period of the reconcile-and-autoscale timer per pool, seconds. Default 30. "
        "Why: Triton's queue reacts in seconds; a 30 s period with fast scale-up catches a "
        "morning ramp within one scrape or two.",
    )
    retry_delay_seconds: float = Field(
        default=10.0,
        ge=0.1,
        le=600,
        description="Delay before retrying a failed Kubernetes call (kopf.TemporaryError), "
        "seconds. Default 10.",
    )
    model_repository_refresh_seconds: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="How long the list of tools read from the model repository is cached, "
        "seconds. Default 60. Why: tools are added rarely; re-reading on every tick is waste.",
    )

    # --- model repository and Triton --------------------------------------------------
    model_repository_path: Path = Field(
        default=Path("model_repository"),
        description="Local path of the model repository whose ensemble folders are the valid "
        "tool names. Default 'model_repository' (the repo's folder, relative to the working "
        "directory). Why: a pool naming a tool that is not there is refused.",
    )
    triton_image: str = Field(
        default="nvcr.io/nvidia/tritonserver:25.01-py3",
        description="Container image of Triton Inference Server. Why: NVIDIA's image has "
        "the TensorRT backend the GPU pools need.",
    )
    triton_model_repository: str = Field(
        default="s3://mosmedai-models/model_repository",
        description="Model repository URI as Triton reads it (--model-repository): s3://, gs://, "
        "as:// or a path in the container. Default: the platform's S3 bucket.",
    )
    triton_model_repository_secret: str | None = Field(
        default="mosmedai-model-repository",
        description="Secret whose keys become Triton's environment (envFrom), e.g. "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for S3. Empty = none.",
    )
    triton_cpu_request: str = Field(default="2", description="CPU request per replica (cores, Kubernetes quantity). Why: pre/post-processing runs on CPU.")
    triton_memory_request: str = Field(default="8Gi", description="Memory request per replica (Kubernetes quantity).")
    triton_memory_limit: str = Field(default="16Gi", description="Memory limit per replica (Kubernetes quantity). Why: a leaking backend is killed, not the node.")
    triton_shm_size: str = Field(
        default="1Gi",
        description="Size of the in-memory /dev/shm volume (Kubernetes quantity). Why: Triton's "
        "Python backend passes tensors through shared memory; the 64 MiB default is too small.",
    )
    triton_extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra tritonserver arguments, comma-separated. Default none.",
    )
    # --- drain: preStop sleep, then SIGTERM, then Triton's own exit timeout, then SIGKILL ---
    triton_pre_stop_seconds: int = Field(
        default=5, ge=0, le=120,
        description="Seconds of the Triton pods' preStop sleep. Why: a terminating pod leaves the "
        "Service endpoints asynchronously; it keeps serving until kube-proxy and clients have noticed.",
    )
    triton_execution_slots: int = Field(
        default=8, ge=1, le=1024,
        description="Model executions a Triton pod runs at once on each device (its rate limiter, "
        "resource `compute`): when more are ready, the steps of urgent tools (priority 1 in the model "
        "configs) get the free slots before routine (2) and screening (4) ones.",
    )
    triton_exit_timeout_seconds: int = Field(
        default=30, ge=1, le=3600,
        description="Triton's --exit-timeout-secs: after SIGTERM it refuses new work and lets "
        "in-flight inferences finish for this long.",
    )
    triton_termination_grace_period_seconds: int = Field(
        default=40, ge=1, le=7200,
        description="The Triton pods' terminationGracePeriodSeconds, counted from the start of preStop: "
        "must exceed triton_pre_stop_seconds + triton_exit_timeout_seconds, else the kubelet kills "
        "Triton before its exit timeout.",
    )
    gpu_product_label: str = Field(
        default="nvidia.com/gpu.product",
        description="Node label that carries the GPU product (NVIDIA GPU Feature Discovery). "
        "Why: spec.gpu.product becomes a nodeSelector on this label.",
    )
    service_monitor_labels: dict[str, str] = Field(
        default_factory=dict,
        description='Extra labels on ServiceMonitors, JSON (e.g. {"release": "prometheus"}). '
        "Why: kube-prometheus-stack selects ServiceMonitors by label.",
    )

    # --- the operator's own endpoints -------------------------------------------------
    metrics_port: int | None = Field(
        default=8080,
        ge=1,
        le=65535,
        description="Port of the operator's /metrics (prometheus-client). Default 8080; unset to disable.",
    )
    health_port: int | None = Field(
        default=8081,
        ge=1,
        le=65535,
        description="Port of kopf's liveness endpoint /healthz. Default 8081; unset to disable.",
    )

    @model_validator(mode="after")
    def _drain_fits_the_grace_period(self) -> "OperatorConfig":
        budget = self.triton_pre_stop_seconds + self.triton_exit_timeout_seconds
        if self.triton_termination_grace_period_seconds <= budget:
            raise ValueError(
                f"triton_termination_grace_period_seconds ({self.triton_termination_grace_period_seconds}) must "
                f"exceed triton_pre_stop_seconds + triton_exit_timeout_seconds ({budget})")
        return self

    @field_validator("namespaces", "triton_extra_args", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("metrics_port", "health_port", "triton_model_repository_secret", "peering_priority", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    def query_templates(self) -> dict[str, str]:
        """The PromQL template per metric name used by ``policy.MetricSample``."""
        return {
            "queue_time_p95_ms": self.query_queue_time_p95_ms,
            "images_per_second": self.query_images_per_second,
            "gpu_utilization_percent": self.query_gpu_utilization_percent,
        }
