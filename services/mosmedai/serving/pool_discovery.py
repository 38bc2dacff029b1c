"""Pool discovery in a cluster: the router's pool directory, kept true to the GpuPool resources.

This module owns turning GpuPool objects (``gpupools.mosmedai.io``, one per region or
federal district; ``operators/crds``) into ``PoolSpec``s, and the list+watch loop that keeps
a ``PoolDirectory`` and each pool's ready replicas current. The router decides what to do
with them (``Settings.pool_discovery == "kubernetes"``); the operator owns the pools.

One GpuPool gives one pool:

- ``name``: the GpuPool's name; ``endpoints``: the gRPC port of the Service the operator
  names like the pool (``<pool>.<namespace>.svc:8001``, mosmedai_operator/children.py);
  ``metrics_url``: that Service's metrics port.
- ``regions``: ``[spec.region]``, unless the pool is a district pool (``spec.districts``
  set): then its own region, like every region of those districts without a pool of its
  own, reaches it through ``districts``.
- ``tools``: ``spec.tools`` that this router enables (others are left out and logged: a
  pool may load a tool this router does not serve); ``neighbours``: ``spec.neighbours``
  that exist (one not created yet, deleted, or the pool itself is left out and logged);
  ``transfer_s``: ``spec.transferSeconds``.
- Readiness, which ``PoolSpec`` does not hold: ``status.readyReplicas`` (absent: 0), kept
  beside the directory as ``{pool name: ready replicas}``.

The loop: list (the whole state, so nothing missed while disconnected is kept), then watch
from the list's resourceVersion until the server ends the stream (``timeoutSeconds``) or
the client's read timeout fires, then list again. 410 Gone (the resourceVersion expired)
relists at once; other errors retry with a doubling delay. Each change rebuilds the
directory; a directory that does not validate (``PoolConfigError``) is logged and the last
good one kept, with the pools that are gone reported as 0 ready.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from mosmedai.serving.pools import PoolConfigError, PoolDirectory, PoolSpec

log = logging.getLogger("mosmedai.serving.pool_discovery")

GROUP, VERSION, PLURAL = "mosmedai.io", "v1alpha1", "gpupools"
# Ports of the Service the operator makes per GpuPool (mosmedai_operator/children.py; a test
# checks they agree). Services and operator ship as separate images, so no import.
GRPC_PORT, METRICS_PORT = 8001, 8002

OnChange = Callable[[PoolDirectory, dict[str, int]], None]
# Where Kubernetes mounts the pod's namespace with its ServiceAccount token.
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class _Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): relist."""


def ready_replicas(gpupool: Mapping[str, Any]) -> int:
    """Ready Triton replicas the operator reported (``status.readyReplicas``); none yet: 0."""
    value = (gpupool.get("status") or {}).get("readyReplicas")
    return value if isinstance(value, int) and value > 0 else 0


def pool_spec(gpupool: Mapping[str, Any], namespace: str, enabled_tools: Iterable[str] = (),
              known_pools: Iterable[str] | None = None) -> tuple[PoolSpec, list[str]]:
    """The pool of one GpuPool object, and what was left out of it (messages naming the field).

    ``enabled_tools``: the router's tools; others the pool loads are left out.
    ``known_pools``: the GpuPools that exist; neighbours not among them are left out
    (None keeps every neighbour). Raises ``PoolConfigError`` naming the pool and the field.
    """
    name = (gpupool.get("metadata") or {}).get("name", "?")
    spec = gpupool.get("spec") or {}
    enabled = set(enabled_tools)
    notes: list[str] = []
    tools = [tool for tool in spec.get("tools") or [] if tool in enabled]
    if len(tools) != len(spec.get("tools") or []):
        notes.append(f"gpupools/{name}: spec.tools {sorted(set(spec.get('tools') or []) - enabled)} are not "
                     "enabled in this router (enabled_tools): left out")
    neighbours = list(spec.get("neighbours") or [])
    if name in neighbours:
        notes.append(f"gpupools/{name}: spec.neighbours names the pool itself: left out")
        neighbours = [n for n in neighbours if n != name]
    if known_pools is not None:
        known = set(known_pools)
        missing = [n for n in neighbours if n not in known]
        if missing:
            notes.append(f"gpupools/{name}: spec.neighbours {missing} are not GpuPools in {namespace}: left out")
            neighbours = [n for n in neighbours if n in known]
    districts = list(spec.get("districts") or [])
    host = f"{name}.{namespace}.svc"
    fields = {
        "name": name,
        "regions": [] if districts or not spec.get("region") else [spec["region"]],
        "districts": districts,
        "endpoints": [f"{host}:{GRPC_PORT}"],
        "metrics_url": f"http://{host}:{METRICS_PORT}/metrics",
        "tools": tools,
        "neighbours": neighbours,
        "transfer_s": spec.get("transferSeconds", 0.0),
    }
    try:
        return PoolSpec.model_validate(fields), notes
    except ValidationError as error:
        first = error.errors()[0]
        field = {"transfer_s": "transferSeconds", "regions": "region"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise PoolConfigError(f"gpupools/{name}: spec.{field}: {first['msg']}") from None


def build_directory(gpupools: Iterable[Mapping[str, Any]], namespace: str,
                    enabled_tools: list[str]) -> tuple[PoolDirectory, list[str]]:
    """The directory of these GpuPools (in name order) and the notes of what was left out.
    Raises ``PoolConfigError`` when no valid directory results."""
    objects = sorted(gpupools, key=lambda obj: obj["metadata"]["name"])
    names = [obj["metadata"]["name"] for obj in objects]
    specs, notes = [], []
    for obj in objects:
        spec, left_out = pool_spec(obj, namespace, enabled_tools, known_pools=names)
        specs.append(spec)
        notes.extend(left_out)
    return PoolDirectory(specs, enabled_tools), notes


def own_namespace() -> str:
    """The namespace this process runs in (``Settings.pool_namespace`` empty): the pod's
    ServiceAccount namespace, else the kubeconfig's current context's, else ``default``."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as handle:
            return handle.read().strip()
    except OSError:
        pass
    from kubernetes import config

    try:
        _, context = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
        return context["context"].get("namespace") or "default"
    except (config.ConfigException, OSError, KeyError, TypeError):
        return "default"


class PoolWatcher:
    """Watches the GpuPools of one namespace and keeps the router's pool directory.

    Thread model: ``start()`` runs the list+watch loop in one daemon thread; ``on_change``
    is called from that thread once the GpuPools first make a valid directory, and then
    whenever the directory or a pool's ready replicas change (never twice with the same
    values). It
    must not block for long (hand the values over to the router's loop, e.g. with
    ``loop.call_soon_threadsafe``); an exception it raises is logged and ignored.
    ``directory()`` and ``ready()`` may be called from any thread; ``directory()`` returns
    the same object until the pools change (so ``is`` tells a change).
    """

    def __init__(self, namespace: str, enabled_tools: Iterable[str], on_change: OnChange | None = None,
                 api_client: Any = None, *, watch_timeout_s: float = 300.0, retry_max_s: float = 30.0):
        """``namespace``: whose GpuPools (empty: ``own_namespace()``).
        ``enabled_tools``: the router's tools (``Settings.enabled_tools``).
        ``api_client``: a ``kubernetes.client.ApiClient``; None loads the in-cluster
        config (the pod's ServiceAccount), else the kubeconfig (``KUBECONFIG``).
        ``watch_timeout_s``: how long one watch request lasts before the loop relists (s);
        ``retry_max_s``: the longest wait between retries after errors (s)."""
        from kubernetes import (  # imported here: only cluster routers need it
            client,
            config,
        )

        if api_client is None:  # a Configuration of its own: the client's global default is left alone
            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                # KUBECONFIG read now: the client reads it once, when first imported.
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
            api_client = client.ApiClient(configuration)
        self.namespace = namespace or own_namespace()
        self.enabled_tools = list(enabled_tools)
        self.on_change = on_change
        self.watch_timeout_s = watch_timeout_s
        self.retry_max_s = retry_max_s
        self._api = client.CustomObjectsApi(api_client)
        self._objects: dict[str, dict[str, Any]] = {}  # name -> GpuPool, as last seen
        self._directory: PoolDirectory | None = None
        self._ready: dict[str, int] = {}
        self._published: tuple[Any, ...] | None = None
        self._message = ""  # what was last logged about the GpuPools
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._response: Any = None
        self._thread: threading.Thread | None = None

    # -- the API the router uses --------------------------------------------------------
    def start(self) -> PoolWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"pool-watcher-{self.namespace}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the loop; an open watch is shut down so that the thread ends at once."""
        self._stopping.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # unblocks the read in the watcher thread
            except Exception:  # already closed
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def directory(self) -> PoolDirectory | None:
        """The newest valid directory; None until the GpuPools first made one."""
        with self._lock:
            return self._directory

    def ready(self) -> dict[str, int]:
        """Ready replicas of each pool of ``directory()`` (0: not ready, or its GpuPool is gone)."""
        with self._lock:
            return dict(self._ready)

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Blocks until the first list has been read (whether or not it made a valid directory)."""
        return self._synced.wait(timeout)

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            try:
                version = self._list()
                delay = 1.0
                self._watch(version)
            except _Gone:
                log.info("GpuPool watch in %s: resourceVersion expired (410 Gone), listing again", self.namespace)
            except Exception as error:  # the API server is away, forbidden, a broken stream: retry
                if self._stopping.is_set():
                    break
                log.warning("GpuPool watch in %s failed (%s: %s); retrying in %.0f s",
                            self.namespace, type(error).__name__, error, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, self.retry_max_s)
            finally:
                self._response = None

    def _list(self) -> str:
        listing = self._api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                          _request_timeout=(10, 60))
        self._objects = {obj["metadata"]["name"]: obj for obj in listing.get("items") or []}
        self._rebuild()
        self._synced.set()
        return (listing.get("metadata") or {}).get("resourceVersion") or ""

    def _watch(self, version: str) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        # The server ends the watch after timeoutSeconds; the read timeout (no byte for that
        # long) ends it when a server, or a proxy, does not.
        read_timeout = self.watch_timeout_s + max(1.0, self.watch_timeout_s / 10)
        kwargs: dict[str, Any] = {"resource_version": version} if version else {}
        response = self._api.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, watch=True, allow_watch_bookmarks=True,
            timeout_seconds=max(1, int(self.watch_timeout_s)), _preload_content=False,
            _request_timeout=(10, read_timeout), **kwargs)
        self._response = response
        try:
            if self._stopping.is_set():
                return
            for line in iter_resp_lines(response):
                if self._stopping.is_set():
                    return
                self._event(json.loads(line))
        except Exception:
            if self._stopping.is_set():
                return
            raise
        finally:
            response.close()
            response.release_conn()

    def _event(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":  # a metav1.Status in the stream
            if obj.get("code") == 410:
                raise _Gone()
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        name = (obj.get("metadata") or {}).get("name")
        if kind == "BOOKMARK" or not name:
            return
        if kind == "DELETED":
            self._objects.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._objects[name] = dict(obj)
        else:
            return
        self._rebuild()

    def _rebuild(self) -> None:
        try:
            directory, notes = build_directory(self._objects.values(), self.namespace, self.enabled_tools)
        except PoolConfigError as error:
            directory, notes = None, [f"GpuPools in {self.namespace} make no valid pool directory "
                                      f"(the last good one stays): {error}"]
        message = "; ".join(notes)
        if message and message != self._message:  # once per distinct problem, not per event
            log.warning("%s", message)
        self._message = message
        with self._lock:
            # A new object only when the pools changed: a replayed event (a relist, kmock's
            # ADDED for every object on each watch) or a status change keeps the same one.
            if directory is not None and (self._directory is None or directory.as_json() != self._directory.as_json()):
                self._directory = directory
            current = self._directory
            if current is None:
                return
            self._ready = {name: ready_replicas(self._objects[name]) if name in self._objects else 0
                           for name in current.pools}
            snapshot = (id(current), tuple(sorted(self._ready.items())))
            if snapshot == self._published:
                return
            self._published = snapshot
            ready = dict(self._ready)
        if self.on_change is not None:
            try:
                self.on_change(current, ready)
            except Exception:
                log.exception("pool directory callback failed")
