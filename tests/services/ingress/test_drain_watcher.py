"""mosmedai.ingress.drain: the gateway's drain begins when the Serve controller has its replica STOPPING."""

import asyncio

from mosmedai.ingress.drain import STOPPING, DrainWatcher, replica_state


def test_the_drain_begins_once_when_the_replica_is_stopping():
    states = iter(["RUNNING", None, "RUNNING", STOPPING, STOPPING])
    calls = []

    async def state():
        return next(states)

    async def scenario():
        watcher = DrainWatcher(lambda: calls.append(1), interval_s=0.01, state=state)
        watcher.start()
        watcher.start()  # idempotent
        assert watcher.since is None
        await asyncio.wait_for(watcher.task, 5.0)
        watcher.start()  # a drained watcher does not watch again
        watcher.drain()  # nor drain twice
        return watcher

    watcher = asyncio.run(scenario())
    assert calls == [1] and watcher.since is not None and next(states) == STOPPING


def test_outside_a_replica_the_state_is_unknown():
    assert asyncio.run(replica_state()) is None
