"""``Throughput``: how many items something finishes per second, over a sliding window. The
router's pools and the gateway's admission gate both use it."""

from __future__ import annotations

import time
from collections import deque

#: the window (s) over which completions give a rate
WINDOW_S = 10.0


class Throughput:
    """Completions per second over the last WINDOW_S."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def done(self, count: int = 1) -> None:
        self.events.append((time.monotonic(), count))
        self.total += count

    def rate(self) -> float:
        """Over the window, or since the first completion in it when that is more recent (at
        least 1 s): after an idle spell the rate is that of the new traffic within a second."""
        now = time.monotonic()
        while self.events and self.events[0][0] < now - self.window_s:
            self.total -= self.events.popleft()[1]
        if not self.events:
            return 0.0
        return self.total / max(1.0, min(self.window_s, now - self.events[0][0]))
