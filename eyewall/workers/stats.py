"""The proxy as a whole, read from its workers: the admin listener's `ProxyStats` and
the workers' Prometheus families.

Workers report their gauges every second (`eyewall.workers.worker`); the admin
listener sums them (``eyewall_client_connections``, ``eyewall_tunnels``,
``eyewall_upstream_idle_connections`` keep their single-process names and meaning)
and `WorkerCollector` adds, per worker::

    eyewall_workers                              workers serving now
    eyewall_workers_configured                   the workers setting
    eyewall_worker_up{worker}                    1 while that worker serves
    eyewall_worker_restarts_total{worker}        restarts after it died
    eyewall_worker_client_connections{worker}    its open client connections
    eyewall_worker_tunnels{worker}               its open tunnels
    eyewall_worker_cpu_seconds_total{worker}     its CPU time (user + system)
    eyewall_worker_resident_memory_bytes{worker} its RSS
    eyewall_shared_memory_evictions_total        shared limit entries forgotten (full set)
    eyewall_shared_memory_overflows_total        counts not kept (full set): fail open

Counters from flows (requests, bytes, errors, ...) need nothing here: every worker's
flows reach the supervisor's one `Metrics`, so they are the whole proxy's already.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["WorkerCollector", "WorkerState", "WorkersStats"]

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class WorkerState:
    """What the supervisor knows of one worker (by its number, across restarts)."""

    number: int
    pid: int = 0
    ready: bool = False
    restarts: int = 0
    gauges: dict[str, Any] = field(default_factory=dict)  # its last STATS
    dropped_before: int = 0  # flows dropped by its earlier processes
    before: dict[str, dict[str, int]] = field(default_factory=dict)  # their labelled counts

    def retire(self) -> None:
        """Its process is gone: keep what its counters reached, forget its gauges."""
        self.ready = False
        self.dropped_before += int(self.gauges.get("flows_dropped", 0))
        for counter in ("login_checks", "proxy_protocol"):
            kept = self.before.setdefault(counter, {})
            for label, n in self.gauges.get(counter, {}).items():
                kept[label] = kept.get(label, 0) + n
        self.gauges = {}


class WorkersStats:
    """`eyewall.dashboard.app.ProxyStats` over the workers' reports."""

    def __init__(self, workers: Callable[[], Iterable[WorkerState]]) -> None:
        self.workers = workers
        self.stopping = False

    def gauges(self) -> dict[str, float]:
        """Open connections, tunnels and idle pooled connections summed over the
        workers serving, and how many serve: ``{"connections", "tunnels", "pool_idle",
        "workers"}``."""
        total = {"connections": 0.0, "tunnels": 0.0, "pool_idle": 0.0, "workers": 0.0}
        for w in self.workers():
            if w.ready:
                total["workers"] += 1
                for name in ("connections", "tunnels", "pool_idle"):
                    total[name] += w.gauges.get(name, 0.0)
        return total

    def healthy(self) -> bool:
        """Not stopping, and at least one worker serves."""
        return not self.stopping and any(w.ready for w in self.workers())

    def flows_dropped(self) -> int:
        """Flows the workers could not send (the channel was full), since start."""
        return sum(int(w.gauges.get("flows_dropped", 0)) + w.dropped_before for w in self.workers())

    def login_checks(self) -> dict[str, int]:
        """bcrypt checks of proxy logins by result, in every worker since start."""
        return self.summed("login_checks")

    def summed(self, counter: str) -> dict[str, int]:
        """A counter the workers report by label (``login_checks``,
        ``proxy_protocol``), summed over the workers and their earlier processes."""
        total: dict[str, int] = {}
        for w in self.workers():
            for counts in (w.before.get(counter, {}), w.gauges.get(counter, {})):
                for label, n in counts.items():
                    total[label] = total.get(label, 0) + n
        return total

    def log_dropped(self) -> int:
        """Log records the running workers dropped."""
        return sum(int(w.gauges.get("log_dropped", 0)) for w in self.workers())


class WorkerCollector:
    """Prometheus collector of the per-worker families (module docstring)."""

    def __init__(
        self,
        configured: int,
        workers: Callable[[], Iterable[WorkerState]],
        limits: Callable[[], dict[str, int]],
    ) -> None:
        self.configured = configured
        self.workers = workers
        self.limits = limits

    def collect(self) -> Iterator[Any]:
        """The metric families (prometheus_client's collector protocol)."""
        workers = sorted(self.workers(), key=lambda w: w.number)
        yield GaugeMetricFamily(
            "eyewall_workers", "Worker processes serving.", value=sum(w.ready for w in workers)
        )
        yield GaugeMetricFamily(
            "eyewall_workers_configured", "Worker processes configured.", value=self.configured
        )
        up = GaugeMetricFamily("eyewall_worker_up", "1 while the worker serves.", labels=["worker"])
        restarts = CounterMetricFamily(
            "eyewall_worker_restarts", "Restarts of a worker that died.", labels=["worker"]
        )
        connections = GaugeMetricFamily(
            "eyewall_worker_client_connections",
            "Client connections open in the worker.",
            labels=["worker"],
        )
        tunnels = GaugeMetricFamily(
            "eyewall_worker_tunnels", "Tunnels open in the worker.", labels=["worker"]
        )
        cpu = CounterMetricFamily(
            "eyewall_worker_cpu_seconds",
            "CPU time of the worker process, user and system.",
            labels=["worker"],
        )
        rss = GaugeMetricFamily(
            "eyewall_worker_resident_memory_bytes",
            "Resident memory of the worker process.",
            labels=["worker"],
        )
        for w in workers:
            label = [str(w.number)]
            up.add_metric(label, int(w.ready))
            restarts.add_metric(label, w.restarts)
            connections.add_metric(label, w.gauges.get("connections", 0))
            tunnels.add_metric(label, w.gauges.get("tunnels", 0))
            usage = _process_usage(w.pid) if w.pid else None
            if usage is not None:
                cpu.add_metric(label, usage[0])
                rss.add_metric(label, usage[1])
        yield from (up, restarts, connections, tunnels, cpu, rss)
        counts = self.limits()
        for name in ("evictions", "overflows"):
            yield CounterMetricFamily(
                f"eyewall_shared_memory_{name}",
                f"Limits in the workers' shared memory: {name} (docs/scaling.md).",
                value=counts.get(name, 0),
            )


def _process_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of ``pid`` from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return None
    # after the command: state is field 3, utime 14, stime 15, rss 24 (man 5 proc)
    return (int(fields[11]) + int(fields[12])) / TICKS, int(fields[21]) * PAGE
