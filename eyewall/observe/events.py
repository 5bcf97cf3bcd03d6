"""Finished flows to their observers: the data path publishes, observers subscribe.

Only one event exists, the end of a flow (an exchange or tunnel, completed or failed:
``flow.error``), because that is all the observers use.  Subscribers are called
synchronously on the event loop and must only queue work; one that does I/O hands it
to a thread behind a bounded queue and counts what it drops.  An exception in a
subscriber is logged and never reaches the data path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from eyewall.flow import Flow

__all__ = ["EventBus", "Subscriber"]

log = logging.getLogger("eyewall.events")

Subscriber = Callable[[Flow], None]


class EventBus:
    """The observers of finished flows, called in subscription order."""

    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber(flow)`` for every finished flow, in subscription order."""
        self.subscribers.append(subscriber)

    def publish(self, flow: Flow) -> None:
        """Give ``flow`` to every subscriber; one that raises is logged and the others still
        run."""
        for subscriber in self.subscribers:
            try:
                subscriber(flow)
            except Exception:
                log.exception("flow observer %r failed", subscriber)
