"""The event bus: the data path announces, observers subscribe.

Events (each carries the `Flow` it concerns):

    request       a request head was read and parsed (before any policy check)
    decision      the policy decided (``flow.rule`` is set)
    connected     an upstream connection was taken from the pool or opened
    response      the origin's final response head arrived
    tunnel_open   a CONNECT or WebSocket tunnel started relaying
    flow_end      an exchange or tunnel finished, completed or failed (``flow.error``)

Subscribers are called synchronously on the event loop and must only queue work; a
subscriber that does I/O hands it to its own thread with a bounded queue and counts
what it drops.  An event nobody subscribed to costs one dictionary lookup.  An
exception in a subscriber is logged and never reaches the data path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from eyewall.flow import Flow

__all__ = ["EVENTS", "EventBus", "Subscriber"]

log = logging.getLogger("eyewall.events")

EVENTS = ("request", "decision", "connected", "response", "tunnel_open", "flow_end")
Subscriber = Callable[[str, Flow], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, list[Subscriber]] = {}

    def subscribe(self, subscriber: Subscriber, events: Iterable[str] = ("flow_end",)) -> None:
        for event in events:
            if event not in EVENTS:
                raise ValueError(f"unknown event {event!r}")
            self._subscribers.setdefault(event, []).append(subscriber)

    def wants(self, event: str) -> bool:
        return event in self._subscribers

    def emit(self, event: str, flow: Flow) -> None:
        subscribers = self._subscribers.get(event)
        if subscribers is None:
            return
        for subscriber in subscribers:
            try:
                subscriber(event, flow)
            except Exception:
                log.exception("event subscriber %r failed on %s", subscriber, event)
