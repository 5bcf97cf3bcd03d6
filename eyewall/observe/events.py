"""The event bus: the data path announces, observers subscribe.

Subscribers are called synchronously and must only queue work (a subscriber that does
I/O hands it to its own thread); an exception in one is logged and does not reach the
data path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from eyewall.observe.flow import Flow

__all__ = ["EventBus", "Subscriber"]

log = logging.getLogger("eyewall.events")

Subscriber = Callable[[str, Flow], None]


class EventBus:
    """Events: ``flow_end`` (an HTTP exchange or a tunnel finished)."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event: str, flow: Flow) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event, flow)
            except Exception:
                log.exception("event subscriber %r failed on %s", subscriber, event)
