"""kopf handlers of the GpuPool operator.

``build_registry(config)`` registers, in a fresh kopf registry:

- startup/cleanup: kopf settings, the API/Prometheus clients in ``memo``;
- ``on.create``/``on.update``/``on.resume`` of a GpuPool: validate, then bring the
  children to the desired state (no metrics read: the size only moves into bounds);
- a timer per GpuPool (``autoscale_interval_seconds``): the same, plus the autoscaling
  decision from Prometheus metrics;
- ``on.event`` of the children (Deployment, Service, PodDisruptionBudget,
  ServiceMonitor labelled ``app.kubernetes.io/managed-by: mosmedai-operator``): a
  child that was edited or deleted is brought back, and the Deployment's readiness
  goes to the pool's status;
- an index of the pools, so that a child's event finds its pool without an API call.

Every path ends in ``reconcile()``: read the pool and its children, decide, write what
differs. It is idempotent and serialised per pool; API failures become
``kopf.TemporaryError`` (kopf retries after ``retry_delay_seconds``).
"""
from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import kopf

from mosmedai_operator import API_VERSION, GROUP, KIND, PLURAL, VERSION, children, metrics, policy
from mosmedai_operator.config import OperatorConfig
from mosmedai_operator.kube import ApiError, KubeClient, login
from mosmedai_operator.modelrepo import ToolCatalog
from mosmedai_operator.prom import PrometheusClient, PrometheusError, render
from mosmedai_operator.spec import GpuPoolSpec, validate
from mosmedai_operator.status import DEGRADED, READY, SCALING, condition, get_condition, merge_conditions, status_patch, timestamp

METRIC_REASONS = {"PrometheusUnavailable", policy.Reason.NO_METRICS.value, policy.Reason.PARTIAL_METRICS.value, "MetricsNotYetRead"}
# Spec target -> MetricSample field: only the metrics a pool targets are queried.
TARGET_METRICS = {
    "queue_time_p95_ms": "queue_time_p95_ms",
    "gpu_utilization_percent": "gpu_utilization_percent",
    "images_per_second_per_replica": "images_per_second",
}


@dataclass
class Context:
    """What the handlers share, kept in kopf's ``memo``."""

    config: OperatorConfig
    kube: KubeClient
    prom: PrometheusClient
    tools: ToolCatalog
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault(f"{namespace}/{name}", asyncio.Lock())


class Refused(Exception):
    """The pool must not be acted on; ``reason`` and ``message`` go to its conditions."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def pool_path(namespace: str, name: str, subresource: str | None = None) -> str:
    return children.object_path(API_VERSION, PLURAL, namespace, name, subresource)


def queries(spec: GpuPoolSpec, config: OperatorConfig, namespace: str, name: str) -> dict[str, str]:
    templates = config.query_templates()
    wanted = [metric for target, metric in TARGET_METRICS.items() if getattr(spec.targets, target) is not None]
    return {metric: render(templates[metric], namespace=namespace, pool=name, region=spec.region, tools=spec.tools)
            for metric in wanted}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _conditions_for(decision: policy.Decision, desired: int, replicas: int, ready: int, degraded: dict[str, Any]) -> list[dict[str, Any]]:
    needed = min(desired, max(1, decision.bounds.lower))
    if desired == 0:
        ready_c = condition(READY, True, "ScaledToZero", "the pool is scaled to zero replicas")
    elif ready >= needed:
        ready_c = condition(READY, True, "ReplicasReady", f"{ready}/{desired} replicas ready (at least {needed} needed)")
    else:
        ready_c = condition(READY, False, "ReplicasNotReady", f"{ready}/{desired} replicas ready (at least {needed} needed)")
    if ready < desired:
        scaling = condition(SCALING, True, "ScalingUp", f"{ready} of {desired} replicas ready")
    elif replicas > desired:
        scaling = condition(SCALING, True, "ScalingDown", f"{replicas} replicas running, {desired} desired")
    else:
        scaling = condition(SCALING, False, "Stable", f"{desired} replicas ready")
    return [ready_c, scaling, degraded]


def _degraded(decision: policy.Decision, trigger: str, prom_error: str | None, previous: dict[str, Any] | None,
              extra: tuple[str, str] | None) -> dict[str, Any]:
    if extra is not None:
        return condition(DEGRADED, True, *extra)
    if trigger != "timer":
        # No metrics were read on this path: keep what the last timer tick found.
        if previous is not None and previous.get("reason") in METRIC_REASONS | {"AsExpected"}:
            return condition(DEGRADED, {"True": True, "False": False}.get(previous["status"]), previous["reason"], previous.get("message", ""))
        return condition(DEGRADED, None, "MetricsNotYetRead", "the autoscaler has not read metrics for this pool yet")
    if prom_error is not None:
        return condition(DEGRADED, True, "PrometheusUnavailable", f"holding the size: {prom_error}")
    if decision.metrics is policy.MetricsState.MISSING:
        return condition(DEGRADED, True, policy.Reason.NO_METRICS.value, f"holding the size: {decision.message}")
    if decision.metrics is policy.MetricsState.PARTIAL:
        return condition(DEGRADED, True, policy.Reason.PARTIAL_METRICS.value, decision.message)
    return condition(DEGRADED, False, "AsExpected", "metrics available, children in place")


async def _write_status(ctx: Context, pool: Mapping[str, Any], new: dict[str, Any]) -> None:
    meta = pool["metadata"]
    patch = status_patch(pool.get("status") or {}, new)
    if patch:
        await ctx.kube.merge_patch(pool_path(meta["namespace"], meta["name"], "status"), {"status": patch})


async def _refuse(ctx: Context, pool: Mapping[str, Any], refusal: Refused, now: datetime, logger: logging.Logger | logging.LoggerAdapter) -> None:
    status = pool.get("status") or {}
    generation = pool["metadata"].get("generation")
    previous = get_condition(status, DEGRADED)
    conditions = merge_conditions(status.get("conditions"), [
        condition(READY, False, refusal.reason, f"spec refused, the cluster was not changed: {refusal.message}"),
        condition(SCALING, False, refusal.reason, "no scaling while the spec is refused"),
        condition(DEGRADED, True, refusal.reason, refusal.message),
    ], now, generation)
    await _write_status(ctx, pool, {"observedGeneration": generation, "conditions": conditions})
    if previous is None or previous.get("reason") != refusal.reason or previous.get("message") != refusal.message:
        # Once per change, not per tick: warnings become Kubernetes Events (posting level).
        logger.warning(f"{refusal.reason}: {refusal.message}")


async def _apply_children(ctx: Context, pool: Mapping[str, Any], spec: GpuPoolSpec, replicas: int,
                          logger: logging.Logger | logging.LoggerAdapter) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """Create or repair every child; returns (the Deployment as written/read, a Degraded cause)."""
    meta = pool["metadata"]
    uid = meta["uid"]
    desired = children.children(pool, spec, ctx.config, replicas)
    if not spec.service_monitor.enabled:
        # A ServiceMonitor left from when it was enabled: look it up to remove it.
        desired_sm = children.service_monitor(pool, spec, ctx.config)
    else:
        desired_sm = None
    actual: dict[str, dict[str, Any] | None] = {}
    for manifest in desired + ([desired_sm] if desired_sm else []):
        try:
            actual[manifest["kind"]] = await ctx.kube.get(children.child_path(manifest))
        except ApiError as exc:
            if manifest["kind"] == "ServiceMonitor" and exc.status == 404:
                actual[manifest["kind"]] = None  # no such resource in this cluster
            else:
                raise
    conflicts = [kind for kind, obj in actual.items() if obj is not None and not children.owned_by(obj, uid)]
    if conflicts:
        raise Refused("ChildConflict", f"{', '.join(sorted(conflicts))} named {meta['name']!r} already exist and belong to "
                                       "someone else; rename the pool or remove them")
    degraded: tuple[str, str] | None = None
    written: dict[str, dict[str, Any] | None] = dict(actual)
    for manifest in desired:
        kind = manifest["kind"]
        current = actual.get(kind)
        try:
            if current is not None and (current.get("metadata") or {}).get("deletionTimestamp"):
                raise kopf.TemporaryError(f"{kind} {meta['name']} is still being deleted", delay=ctx.config.retry_delay_seconds)
            if current is None:
                written[kind] = await ctx.kube.create(children.child_path(manifest, with_name=False), children.strip_nones(manifest))
                action = "created"
            elif not children.is_subset(manifest, current):
                written[kind] = await ctx.kube.merge_patch(children.child_path(manifest), children.merge_patch(manifest, current))
                action = "patched"
            else:
                continue
        except ApiError as exc:
            if kind == "ServiceMonitor" and exc.status == 404:
                degraded = ("ServiceMonitorUnavailable", "spec.serviceMonitor.enabled but this cluster has no "
                            "monitoring.coreos.com/v1 ServiceMonitor resource (prometheus-operator)")
                continue
            raise
        metrics.CHILD_WRITES.labels(meta["namespace"], meta["name"], kind, action).inc()
        logger.info(f"{kind} {meta['name']} {action}")
    if desired_sm is not None and actual.get("ServiceMonitor") is not None:
        await ctx.kube.delete(children.child_path(desired_sm))
        metrics.CHILD_WRITES.labels(meta["namespace"], meta["name"], "ServiceMonitor", "deleted").inc()
        logger.info(f"ServiceMonitor {meta['name']} deleted: spec.serviceMonitor.enabled is false")
    return written.get("Deployment"), degraded


async def _read_metrics(ctx: Context, spec: GpuPoolSpec, namespace: str, name: str, now: datetime) -> tuple[list[policy.MetricSample], str | None]:
    step = timedelta(seconds=ctx.config.query_step_seconds)
    # One step more than the window, so that the window's first instant has a sample.
    start = now - timedelta(seconds=spec.scale_down.stabilization_window_seconds) - step
    try:
        return await ctx.prom.samples(queries(spec, ctx.config, namespace, name), start, now, step), None
    except PrometheusError as exc:
        return [], str(exc)


async def _reconcile(ctx: Context, namespace: str, name: str, trigger: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
    pool = await ctx.kube.get(pool_path(namespace, name))
    if pool is None or pool["metadata"].get("deletionTimestamp"):
        return  # gone or going: the garbage collector removes the children (ownerReferences)
    meta, status = pool["metadata"], pool.get("status") or {}
    region = str((pool.get("spec") or {}).get("region", ""))
    labels = (namespace, name, region)
    now = ctx.clock()
    try:
        known_tools, repository_error = ctx.tools.tools()
        if repository_error is not None:
            raise Refused("ModelRepositoryUnavailable", f"cannot check spec.tools: {repository_error}")
        spec, problems = validate(pool.get("spec"), known_tools)
        if spec is None:
            raise Refused("InvalidSpec", "; ".join(problems))
        metrics.POOL_VALID.labels(*labels).set(1)

        prom_error: str | None = None
        base = status.get("desiredReplicas")
        if trigger == "timer":
            if base is None:
                deployment = await ctx.kube.get(children.child_path(children.deployment(pool, spec, ctx.config, 0)))
                base = ((deployment or {}).get("spec") or {}).get("replicas", 0)
            samples, prom_error = await _read_metrics(ctx, spec, namespace, name, now)
            if prom_error is not None:
                metrics.PROMETHEUS_ERRORS.labels(*labels).inc()
            decision = policy.decide(spec, int(base), samples, now,
                                     max_sample_age=timedelta(seconds=ctx.config.max_sample_age_seconds))
        else:
            decision = policy.clamp(spec, int(base or 0), now)
        deployment, child_problem = await _apply_children(ctx, pool, spec, decision.desired, logger)
    except Refused as refusal:
        metrics.POOL_VALID.labels(*labels).set(0)
        await _refuse(ctx, pool, refusal, now, logger)
        return

    dstatus = (deployment or {}).get("status") or {}
    replicas, ready = int(dstatus.get("replicas") or 0), int(dstatus.get("readyReplicas") or 0)
    degraded = _degraded(decision, trigger, prom_error, get_condition(status, DEGRADED), child_problem)
    new_status: dict[str, Any] = {
        "observedGeneration": meta.get("generation"),
        "replicas": replicas,
        "readyReplicas": ready,
        "desiredReplicas": decision.desired,
        "conditions": merge_conditions(status.get("conditions"),
                                       _conditions_for(decision, decision.desired, replicas, ready, degraded),
                                       now, meta.get("generation")),
    }
    scaled = status.get("desiredReplicas") != decision.desired
    if scaled:
        new_status["lastScaleTime"] = timestamp(now)
        new_status["lastScaleReason"] = f"{decision.reason}: {decision.message}"
    if trigger == "timer":
        latest = decision.latest
        new_status["queueTimeP95Ms"] = _round(latest.queue_time_p95_ms) if latest else None
        new_status["gpuUtilizationPercent"] = _round(latest.gpu_utilization_percent) if latest else None
        new_status["imagesPerSecond"] = _round(latest.images_per_second) if latest else None
    await _write_status(ctx, pool, new_status)

    metrics.SCALING_DECISIONS.labels(*labels, decision.reason.value).inc()
    metrics.DESIRED_REPLICAS.labels(*labels).set(decision.desired)
    metrics.READY_REPLICAS.labels(*labels).set(ready)
    logger.info(f"decision ({trigger}): {decision.desired} replicas, {decision.reason}: {decision.message}")
    if scaled and status.get("desiredReplicas") is not None:
        kopf.info(pool, reason=decision.reason.value,
                  message=f"scaled {status.get('desiredReplicas')}->{decision.desired}: {decision.message}")


async def reconcile(ctx: Context, namespace: str, name: str, *, trigger: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Bring one pool and its children to the desired state (see the module's docstring)."""
    started = time.perf_counter()
    async with ctx.lock(namespace, name):
        try:
            await _reconcile(ctx, namespace, name, trigger, logger)
        except ApiError as exc:
            metrics.RECONCILE_ERRORS.labels(namespace, name, "").inc()
            raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=ctx.config.retry_delay_seconds) from exc
        finally:
            metrics.RECONCILE_SECONDS.labels(trigger).observe(time.perf_counter() - started)


def child_needs_reconcile(ctx: Context, pool: Mapping[str, Any], event_type: str, child: Mapping[str, Any]) -> bool:
    """Cheap check on a child's event: does it differ from what the pool wants?"""
    if event_type == "DELETED":
        return True
    known_tools, _ = ctx.tools.tools()
    spec, _ = validate(pool.get("spec"), known_tools)
    if spec is None:
        return False  # a refused pool's children are left alone
    status = pool.get("status") or {}
    replicas = int(status.get("desiredReplicas") or 0)
    builders: dict[str, Callable[[], dict[str, Any]]] = {
        "Deployment": lambda: children.deployment(pool, spec, ctx.config, replicas),
        "Service": lambda: children.service(pool, spec),
        "PodDisruptionBudget": lambda: children.pod_disruption_budget(pool, spec),
        "ServiceMonitor": lambda: children.service_monitor(pool, spec, ctx.config),
    }
    kind = child.get("kind") or ""
    if kind == "ServiceMonitor" and not spec.service_monitor.enabled:
        return True
    if kind not in builders or not children.is_subset(builders[kind](), child):
        return True
    if kind == "Deployment":
        dstatus = child.get("status") or {}
        return (int(dstatus.get("readyReplicas") or 0) != status.get("readyReplicas", 0)
                or int(dstatus.get("replicas") or 0) != status.get("replicas", 0))
    return False


def _configure(settings: kopf.OperatorSettings) -> None:
    # kopf's bookkeeping in annotations under our domain; the status schema stays closed.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/operator"  # unused: no handler needs a finalizer
    # Handler logs at WARNING and above become Kubernetes Events on the pool; INFO stays in the log.
    settings.posting.level = logging.WARNING


def build_registry(config: OperatorConfig, clock: Callable[[], datetime] | None = None) -> kopf.OperatorRegistry:
    """A kopf registry with every handler of the operator, bound to ``config``."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)
    managed = {"app.kubernetes.io/managed-by": children.MANAGED_BY["app.kubernetes.io/managed-by"]}

    @kopf.on.login(id="login", registry=registry)
    def authenticate(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> kopf.ConnectionInfo:
        # The same credentials for kopf's watches and the operator's own client.
        return login(settings, logger)

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
        _configure(settings)
        memo.ctx = Context(
            config=config,
            kube=KubeClient(lambda: login(settings, logger)),
            prom=PrometheusClient(str(config.prometheus_url), config.prometheus_timeout_seconds),
            tools=ToolCatalog(config.model_repository_path, config.model_repository_refresh_seconds),
            **({"clock": clock} if clock else {}),
        )

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        ctx: Context | None = getattr(memo, "ctx", None)
        if ctx is not None:
            await ctx.kube.close()
            await ctx.prom.close()

    @kopf.index(*resource, id="gpupools", registry=registry)
    def gpupools(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
        return {(namespace, name): copy.deepcopy({"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)})}

    @kopf.on.resume(*resource, id="reconcile", registry=registry)
    @kopf.on.create(*resource, id="reconcile", registry=registry)
    @kopf.on.update(*resource, id="reconcile", field="spec", registry=registry)
    async def pool_changed(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
        await reconcile(memo.ctx, namespace, name, trigger="event", logger=logger)

    @kopf.timer(*resource, id="autoscale", interval=config.autoscale_interval_seconds,
                initial_delay=config.autoscale_interval_seconds, registry=registry)
    async def autoscale(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
        await reconcile(memo.ctx, namespace, name, trigger="timer", logger=logger)

    @kopf.on.event(*resource, id="forget-deleted", registry=registry)
    async def pool_event(event: kopf.RawEvent, namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        if event["type"] == "DELETED":
            # After any reconcile in flight (it may still set the gauges), then for good:
            # later reconciles find no pool and write nothing.
            async with memo.ctx.lock(namespace, name):
                metrics.forget_pool(namespace, name, str(body.spec.get("region", "")))
            memo.ctx.locks.pop(f"{namespace}/{name}", None)

    async def child_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                          gpupools: kopf.Index, **_: Any) -> None:
        owners = [ref for ref in body.metadata.get("ownerReferences", [])
                  if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/")]
        if not owners:
            return
        namespace, pool_name = body.metadata.namespace, owners[0]["name"]
        for pool in gpupools.get((namespace, pool_name), []):
            if pool["metadata"].get("uid") != owners[0].get("uid") or pool["metadata"].get("deletionTimestamp"):
                return  # a child of a deleted pool: the garbage collector's business
            if child_needs_reconcile(memo.ctx, pool, event["type"], body):
                await reconcile(memo.ctx, namespace, pool_name, trigger="child", logger=logger)
            return

    for api_version, plural in children.CHILD_RESOURCES.values():
        group, _, version = api_version.rpartition("/")
        kopf.on.event(group=group, version=version, plural=plural, labels=managed, registry=registry,
                      id=f"child-{plural}")(child_event)
    return registry
