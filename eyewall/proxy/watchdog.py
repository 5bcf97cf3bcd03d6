"""Time limits by polling.

Setting a timer per read and per write would cost more than the proxying itself, so the
data path only records *what* it is waiting for and a cheap activity flag; a periodic
sweep compares that against the clock and closes what has overstayed.  Limits are thus
enforced to within one sweep interval.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from tornado.ioloop import PeriodicCallback

__all__ = ["Watchdog", "Watched"]

log = logging.getLogger("eyewall.watchdog")


class Watched(Protocol):
    def check(self, now: float) -> None:
        """Act on any limit passed by ``now`` (IOLoop time)."""


class Watchdog:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.watched: set[Watched] = set()
        self._timer = PeriodicCallback(self.sweep, interval * 1000)

    def start(self) -> None:
        self._timer.start()

    def set_interval(self, interval: float) -> None:
        if interval != self.interval:
            running = self._timer.is_running()
            self._timer.stop()
            self.interval = interval
            self._timer = PeriodicCallback(self.sweep, interval * 1000)
            if running:
                self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def add(self, item: Watched) -> None:
        self.watched.add(item)

    def discard(self, item: Watched) -> None:
        self.watched.discard(item)

    def sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for item in list(self.watched):
            try:
                item.check(now)
            except Exception:
                log.exception("watchdog check of %r failed", item)


def sweep_interval(smallest_timeout: float) -> float:
    """A fifth of the smallest limit, between 50 ms and 1 s."""
    return min(1.0, max(0.05, smallest_timeout / 5))
