"""The live feed behind the dashboard: finished flows as they happen, and once a second
the rates of the second just gone (requests, bytes, status mix, latency percentiles).

Each WebSocket client has its own bounded queue.  A client that falls behind loses
messages (it is told how many); one that stays behind is disconnected.  Nothing here
can slow the proxy: when no dashboard is open, a finished flow costs a few counter
updates.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from tornado.ioloop import PeriodicCallback

from eyewall.flow import Flow
from eyewall.observe.records import record_of, summary

__all__ = ["LiveFeed"]

QUEUE_LIMIT = 1000  # messages waiting per client
PATIENCE = 5.0  # seconds a client may stay behind before it is disconnected
SERIES = 300  # seconds of stats kept for /api/stats and new dashboards
LATENCY_SAMPLES = 2000


class Socket(Protocol):
    """What the live feed needs of a WebSocket connection."""

    def write_message(self, message: str) -> Any:
        """Send one text message."""

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Close with a WebSocket close code (RFC 6455 §7.4) and reason."""


class Client:
    """One dashboard connection: a queue and a coroutine that drains it."""

    def __init__(self, socket: Socket) -> None:
        self.socket = socket
        self.queue: deque[str] = deque()
        self.wakeup = asyncio.Event()
        self.dropped = 0
        self.behind_since: float | None = None
        self.closed = False

    def push(self, message: str, now: float) -> None:
        """Queue ``message``; when the queue is full count it as dropped, and close a client
        that has stayed full for longer than PATIENCE seconds (``now``: loop time)."""
        if len(self.queue) >= QUEUE_LIMIT:
            self.dropped += 1
            if self.behind_since is None:
                self.behind_since = now
            elif now - self.behind_since > PATIENCE:
                self.close()
            return
        self.queue.append(message)
        self.wakeup.set()

    async def run(self) -> None:
        """Send queued messages until closed, announcing how many were dropped first."""
        while not self.closed:
            await self.wakeup.wait()
            self.wakeup.clear()
            if self.dropped:
                self.queue.appendleft(json.dumps({"type": "dropped", "count": self.dropped}))
                self.dropped = 0
                self.behind_since = None
            while self.queue and not self.closed:
                await self.socket.write_message(self.queue.popleft())

    def close(self) -> None:
        """Close the connection (1008, too slow) and stop ``run``."""
        if not self.closed:
            self.closed = True
            self.wakeup.set()
            self.socket.close(1008, "too slow")


_STATUS_CLASSES = ("", "1xx", "2xx", "3xx", "4xx", "5xx")


class LiveFeed:
    """Subscriber for ``flow_end``; ``gauges`` gives connections, tunnels, pool_idle."""

    def __init__(
        self,
        gauges: Callable[[], dict[str, float]],
        recent: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self.gauges = gauges
        self.recent = recent
        self.node = ""  # in a fleet sharing its flows: this node's name, on every summary
        self.clients: set[Client] = set()
        self.series: deque[dict[str, Any]] = deque(maxlen=SERIES)
        self._reset()
        self._timer = PeriodicCallback(self.tick, 1000)
        self._timer.start()

    def _reset(self) -> None:
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "none": 0}
        self.latencies: list[float] = []

    def __call__(self, flow: Flow) -> None:
        self.requests += 1
        self.bytes_in += flow.bytes_in
        self.bytes_out += flow.bytes_out
        s = flow.status
        self.status[_STATUS_CLASSES[s // 100] if 100 <= s < 600 else "none"] += 1
        if flow.kind == "http" and len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(flow.duration * 1000)  # a tunnel's lifetime is no latency
        if self.clients:
            shown = summary(record_of(flow))
            if self.node:
                shown["node"] = self.node
            self._broadcast({"type": "flow", "flow": shown})

    def _broadcast(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        now = time.monotonic()
        for client in list(self.clients):
            if client.closed:
                self.clients.discard(client)
            else:
                client.push(text, now)

    def tick(self) -> None:
        """Once a second: push the last second's stats (requests, errors, latency quantiles in
        seconds) to every client."""
        latencies = sorted(self.latencies)

        def pick(q: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)

        stats = {
            "type": "stats",
            "time": time.time(),
            **self.gauges(),
            "requests_per_s": self.requests,
            "bytes_in_per_s": self.bytes_in,
            "bytes_out_per_s": self.bytes_out,
            "status": self.status,
            "latency_ms": {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)},
        }
        self._reset()
        self.series.append(stats)
        if self.clients:
            self._broadcast(stats)

    def attach(self, socket: Socket) -> Client:
        """Start feeding ``socket``: a hello message with recent flows, then everything new."""
        client = Client(socket)
        flows = self.recent()
        if self.node:
            flows = [{"node": self.node, **f} for f in flows]
        client.queue.append(json.dumps({"type": "hello", "flows": flows}))
        client.wakeup.set()
        self.clients.add(client)
        return client

    def push(self, flow: dict[str, Any]) -> None:
        """Show open dashboards a flow summary that did not pass through this node
        (another node's, read from a fleet's shared flow database)."""
        if self.clients:
            self._broadcast({"type": "flow", "flow": flow})

    def detach(self, client: Client) -> None:
        """Stop feeding ``client`` (its socket has closed)."""
        client.closed = True
        client.wakeup.set()
        self.clients.discard(client)

    def stop(self) -> None:
        """Stop the ticker and close every client."""
        self._timer.stop()
        for client in list(self.clients):
            client.close()
