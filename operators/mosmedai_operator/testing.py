"""Real peers for tests and the benchmark (like ``kopf.testing``): not used by the operator.

- ``ClusterEmulator``: kmock's stateful Kubernetes API emulator plus the few API-server
  behaviours the operator relies on: ``uid``, ``creationTimestamp``, ``resourceVersion``,
  ``generation`` bumped on spec changes, the status subresource split, and the garbage
  collector's cascade through ``ownerReferences``.
- ``PrometheusServer``: the real ``prometheus`` binary (Debian package) on a loopback
  port, its TSDB backfilled with ``promtool tsdb create-blocks-from openmetrics``.
- ``openmetrics_pool``: OpenMetrics text of Triton's metrics for one pool.

Needs the test extras: ``kmock`` (and ``prometheus``/``promtool`` on PATH or in /usr/bin).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import kopf
import kopf.testing
from kmock._internal import dicts as kmock_dicts  # the emulator's own merge-patch
from kmock._internal import rendering  # Request: the type of _handle's argument

from mosmedai_operator import API_VERSION, GROUP, KIND, PLURAL, VERSION
from mosmedai_operator.config import OperatorConfig
from mosmedai_operator.handlers import build_registry

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with API-server metadata and garbage collection."""

    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    namespaces: set[str] = attrs.field(factory=set)  # served by /api/v1/namespaces besides those in use
    # kmock matches every request against its whole request log (cost grows with the log);
    # a long run (the benchmark) keeps only the newest ones. None keeps all (for assertions).
    keep_requests: int | None = None

    def declare_resources(self) -> None:
        """Builtin resources (bundled with kmock) plus the CRDs the operator uses."""
        self.resources.load_bundled()
        self.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
            kind=KIND, singular="gpupool", namespaced=True, subresources={"status"},
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"}, shortnames={"gpool"})
        self.resources["monitoring.coreos.com/v1/servicemonitors"] = kmock.ResourceInfo(
            kind="ServiceMonitor", singular="servicemonitor", namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
        for plural, kind, namespaced in (("kopfpeerings", "KopfPeering", True),
                                         ("clusterkopfpeerings", "ClusterKopfPeering", False)):
            self.resources[f"kopf.dev/v1/{plural}"] = kmock.ResourceInfo(
                kind=kind, singular=plural[:-1], namespaced=namespaced,
                verbs={"get", "list", "watch", "create", "patch", "update", "delete"})

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8 cannot parse the cluster-wide namespace list (/api/v1/namespaces), which
        # kopf's namespace observer lists and watches: serve it here, from the namespaces in use.
        if raw_request.method == "GET" and raw_request.path.rstrip("/") == "/api/v1/namespaces":
            return await self._serve_namespaces(raw_request)
        try:
            return await super().__call__(raw_request)
        finally:
            if self.keep_requests is not None and len(self._requests) > 2 * self.keep_requests:
                del self._requests[: -self.keep_requests]

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        names = sorted(self.namespaces | {ns for (_, ns, _), obj in self.objects.items() if ns and not obj.deleted})
        items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "uid": f"ns-{ns}"}} for ns in names]
        if raw_request.query.get("watch") != "true":
            return aiohttp.web.json_response({"apiVersion": "v1", "kind": "NamespaceList",
                                              "metadata": {"resourceVersion": "1"}, "items": items})
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)
        for item in items:
            await response.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
        timeout = float(raw_request.query.get("timeoutSeconds") or 60)
        await asyncio.sleep(min(timeout, 60))  # then the client watches again, as with a real API server
        return response

    def _has_status_subresource(self, resource: Any) -> bool:
        try:
            return "status" in self.resources[resource].subresources
        except (KeyError, Exception):
            return False

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and isinstance(request.data, dict):
            data = request.data
            meta = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._versions))
                if self._has_status_subresource(request.resource):
                    data.pop("status", None)  # status is written through /status only
            elif request.action == kmock.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    current = self.objects[key]
                    if request.subresource == "status":
                        # The status subresource changes status only (and no generation).
                        for field in [k for k in data if k not in ("status", "metadata")]:
                            data.pop(field)
                        meta.clear()
                    elif self._has_status_subresource(request.resource):
                        data.pop("status", None)
                    if "spec" in data and request.subresource != "status":
                        old_spec = dict(current).get("spec")
                        new_spec = kmock_dicts.patch_dict(dict(current), {"spec": data["spec"]}).get("spec")
                        if new_spec != old_spec:
                            meta["generation"] = int(dict(current).get("metadata", {}).get("generation", 1)) + 1
                    meta["resourceVersion"] = str(next(self._versions))
        response = await super()._handle(request)
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.DELETE, kmock.action.UPDATE):
            # Also after a create: an object whose owner is already gone is collected at once.
            await self._collect_garbage()
        return response

    async def _collect_garbage(self) -> None:
        """Delete (cascading) every object whose owners are all gone, as kube-controller-manager does."""
        while True:
            async with self._lock:
                alive = {obj.get("metadata", {}).get("uid") for _, obj in self.objects.items() if not obj.deleted}
                orphans = [(key, obj) for key, obj in self.objects.items() if not obj.deleted
                           and (refs := obj.get("metadata", {}).get("ownerReferences"))
                           and not any(ref.get("uid") in alive for ref in refs)]
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
            if not orphans:
                return


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig with one context pointing to ``server`` (no credentials: the emulator takes none)."""
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: emulator\n"
        f"clusters:\n- name: emulator\n  cluster:\n    server: {server}\n"
        "users:\n- name: nobody\n  user: {}\n"
        "contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: nobody\n    namespace: default\n"
    )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def openmetrics_pool(namespace: str, pool: str, *, start: float, end: float, step: float = 15.0,
                     queue_p95_ms: float | None = None, images_per_second: float | None = None,
                     gpu_utilization_percent: float | None = None, gpus: int = 1,
                     models: Iterable[str] = ("cxr_opacity",)) -> dict[str, list[str]]:
    """Triton's metric samples of one pool from ``start`` to ``end`` (unix seconds), per family.

    Values are constant over time; the counter grows at ``images_per_second`` (split
    over ``models``). ``None`` leaves the family out (no series at all).
    """
    labels = f'namespace="{namespace}",gpupool="{pool}"'

    def fmt(value: float) -> str:  # OpenMetrics spells NaN and infinities this way
        return "NaN" if value != value else ("+Inf" if value == float("inf") else f"{value:g}")
    families: dict[str, list[str]] = {}
    times = [start + i * step for i in range(int((end - start) // step) + 1)]
    if queue_p95_ms is not None:
        families["nv_inference_queue_summary_us"] = [
            f'nv_inference_queue_summary_us{{{labels},model="net",quantile="0.95"}} {fmt(queue_p95_ms * 1000)} {t:.3f}'
            for t in times]
    if images_per_second is not None:
        models = list(models)
        families["nv_inference_count"] = [
            f'nv_inference_count{{{labels},model="{model}"}} {fmt((t - start) * images_per_second / len(models))} {t:.3f}'
            for model in models for t in times]
    if gpu_utilization_percent is not None:
        families["nv_gpu_utilization"] = [
            f'nv_gpu_utilization{{{labels},gpu_uuid="GPU-{i}"}} {fmt(gpu_utilization_percent / 100)} {t:.3f}'
            for i in range(gpus) for t in times]
    return families


def openmetrics_text(pools: Iterable[Mapping[str, list[str]]]) -> str:
    """One OpenMetrics exposition of several pools' families (type ``unknown`` keeps Triton's names)."""
    merged: dict[str, list[str]] = {}
    for families in pools:
        for name, lines in families.items():
            merged.setdefault(name, []).extend(lines)
    out: list[str] = []
    for name, lines in merged.items():
        out.append(f"# TYPE {name} unknown")
        out.extend(lines)
    out.append("# EOF")
    return "\n".join(out) + "\n"


class PrometheusServer:
    """A real Prometheus on 127.0.0.1 with backfilled series; ``url`` once started."""

    def __init__(self, openmetrics: str, workdir: Path | None = None, retention: str = "2d") -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="prometheus-") if workdir is None else None
        self.workdir = Path(self._tmp.name) if self._tmp else workdir
        self.openmetrics = openmetrics
        self.retention = retention
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        data = self.workdir / "data"
        source = self.workdir / "series.om"
        source.write_text(self.openmetrics)
        # Two-hour blocks by default; the series span at most a few hours around now.
        subprocess.run([PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
                       check=True, capture_output=True)
        config = self.workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--storage.tsdb.retention.time={self.retention}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError("prometheus did not become ready")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "log", None):
            self.log.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_model_repository(root: Path, ensembles: Iterable[str], others: Iterable[str] = ("densenet_onnx",)) -> Path:
    """A minimal Triton model repository: ensembles (``platform: "ensemble"``) and plain models."""
    for name in ensembles:
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.pbtxt").write_text(f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 8\n')
    for name in others:
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\nmax_batch_size: 8\n')
    return root


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition") -> Any:
    """Poll ``predicate()`` (sync) in the event loop until truthy; its value, or TimeoutError."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


def environment_for(kubeconfig: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["KUBECONFIG"] = str(kubeconfig)
    return env


def gpupool(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A GpuPool manifest: a small valid spec, updated with ``spec``."""
    body: dict[str, Any] = {
        "region": "RU-MOW",
        "timeZone": "Europe/Moscow",
        "tools": ["cxr_opacity", "cxr_nodule"],
        "replicas": {"min": 1, "max": 4},
        "targets": {"queueTimeP95Ms": 200},
    }
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace}, "spec": body}


def _settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # No runtime scanning of CRDs and namespaces: the emulator does not serve the
    # cluster-wide namespace list; resources are discovered once at start instead.
    settings.scanning.disabled = True
    # Per-object workers linger this long after their last event, and kopf waits for them
    # when it stops (5 s by default): short, so that tests stop quickly.
    settings.queueing.idle_timeout = 0.5
    return settings


@contextlib.asynccontextmanager
async def running_operator(config: OperatorConfig, namespace: str, *args: str, standalone: bool = True):
    """The operator in kopf.testing.KopfRunner (its own thread and loop).

    Entering and leaving happen in a worker thread: the emulator lives in the caller's
    event loop and must keep serving while kopf starts and stops. KopfRunner swaps the
    process-wide stdout while it runs, so nest several runners strictly (last in, first out).
    """
    argv = ["run", f"--namespace={namespace}", *(["--standalone"] if standalone else []), *args]
    runner = kopf.testing.KopfRunner(argv, registry=build_registry(config), settings=_settings(), timeout=30)
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)


def spawn_operator(kubeconfig: Path, settings: Mapping[str, str], *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m mosmedai_operator`` as a separate process (a real replica), against ``kubeconfig``.

    ``settings``: MOSMEDAI_OPERATOR_* values without the prefix, e.g. {"NAMESPACES": "ns"}.
    Stop it with ``stop_process`` (SIGTERM: kopf exits cleanly and leaves the peering).
    """
    import mosmedai_operator  # where the package is, for the child's import path

    env = {k: v for k, v in os.environ.items() if not k.startswith("MOSMEDAI_OPERATOR_")}
    env["KUBECONFIG"] = str(kubeconfig)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(mosmedai_operator.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.update({f"MOSMEDAI_OPERATOR_{key}": value for key, value in settings.items()})
    output = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "mosmedai_operator", *args], env=env, stdout=output, stderr=subprocess.STDOUT)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
