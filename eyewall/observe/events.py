"""Finished flows to their observers: the data path publishes, observers subscribe.

Only one event exists, the end of a flow (an exchange or tunnel, completed or failed:
``flow.error``), because that is all the observers use.  Subscribers are called on the
event loop and must only queue work; one that does I/O hands it to a thread behind a
bounded queue and counts what it drops.  An exception in a subscriber is logged and
never reaches the data path.

Flows are delivered in small batches, each subscriber taking the whole batch in turn
(`BATCH` flows, or what ended in the last `DELAY` seconds): observing a flow right as
it ends runs the observers' code with the caches full of the data path's, and costs
about three times what the same work costs in a run (bench/protocol_floor.py).
Readers that need every finished flow counted (the admin API, metrics, shutdown)
call `flush` first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from eyewall.flow import Flow

__all__ = ["BATCH", "DELAY", "EventBus", "Subscriber"]

log = logging.getLogger("eyewall.events")

Subscriber = Callable[[Flow], None]

BATCH = 32  # flows delivered at once, at most
DELAY = 0.02  # seconds a finished flow may wait for its batch


class EventBus:
    """The observers of finished flows, called in subscription order, in batches."""

    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []
        self._pending: list[Flow] = []
        self._timer: asyncio.TimerHandle | None = None

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber(flow)`` for every finished flow, in subscription order."""
        self.subscribers.append(subscriber)

    def publish(self, flow: Flow) -> None:
        """Give ``flow`` to every subscriber, with the batch it joins: within `DELAY`
        seconds, at once when `BATCH` flows wait or when no event loop runs."""
        pending = self._pending
        pending.append(flow)
        if len(pending) >= BATCH:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(DELAY, self.flush)

    def flush(self) -> None:
        """Deliver the flows waiting for their batch now; a subscriber that raises is
        logged and the others still run."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        for subscriber in self.subscribers:
            for flow in batch:
                try:
                    subscriber(flow)
                except Exception:
                    log.exception("flow observer %r failed", subscriber)
