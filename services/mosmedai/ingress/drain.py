"""Whether this Ray Serve replica is being stopped: the start of a graceful drain.

How Ray Serve 2.60 stops a replica (``ray/serve/_private/replica.py``,
``perform_graceful_shutdown``): the controller marks the replica STOPPING (handles and
proxies stop routing to it), then the replica waits until no request is ongoing - in
direct-ingress mode for at least ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``,
still accepting connections - checking every ``graceful_shutdown_wait_loop_s``; then it
closes its servers and only then calls the deployment's ``__del__``. The controller kills
the actor ``graceful_shutdown_timeout_s`` after the stop began, whatever is left.

So ``__del__`` comes too late to refuse new work or to turn readiness off, and Serve offers
no callback at the start of the drain. The replica's state is the controller's, though:
`DrainWatcher` asks the controller for this replica's state every ``interval_s`` and calls
``on_drain`` once it is STOPPING (a KubeRay upgrade, a scale-down, ``serve.shutdown()``
on SIGTERM of a plain gateway pod).
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("mosmedai.ingress.drain")

STOPPING = "STOPPING"


async def replica_state() -> str | None:
    """This replica's state as the Serve controller has it; None outside a replica or when
    the controller does not answer."""
    from ray import serve
    from ray.serve.context import _get_global_client

    try:
        context = serve.get_replica_context()
    except Exception:  # not in a replica (unit tests, local testing mode)
        return None
    try:
        controller = _get_global_client()._controller
        details = await controller.get_deployment_details.remote(context.app_name, context.deployment)
    except Exception as error:  # the controller is restarting: ask again next round
        log.debug("replica state unknown: %s", error)
        return None
    for replica in getattr(details, "replicas", None) or ():
        if replica.replica_id == context.replica_tag:
            return str(getattr(replica.state, "value", replica.state))
    return None


class DrainWatcher:
    """Calls ``on_drain()`` once, when the controller has this replica STOPPING."""

    def __init__(self, on_drain, interval_s: float = 0.5, state=replica_state):
        self.on_drain, self.interval_s, self.state = on_drain, interval_s, state
        self.task: asyncio.Task | None = None
        self.since: float | None = None  # time.monotonic() when the drain was seen

    def start(self) -> None:
        """Begin watching (idempotent; needs a running event loop)."""
        if self.since is None and (self.task is None or self.task.done()):
            self.task = asyncio.get_running_loop().create_task(self._watch())

    def drain(self) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self.on_drain()

    async def _watch(self) -> None:
        while self.since is None:
            if await self.state() == STOPPING:
                log.warning("this replica is stopping: draining")
                self.drain()
                return
            await asyncio.sleep(self.interval_s)
