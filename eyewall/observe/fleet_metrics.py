"""Prometheus metrics of a node in a fleet, registered beside `eyewall.observe.metrics`
by the composition root (`eyewall.fleet`).  Read at scrape time from the parts'
own counters; nothing here is on the data path.

    eyewall_node_info{node}                          1: this node's name (fleet.node)
    eyewall_proxy_protocol_connections_total{result} proxy, local, untrusted, missing,
                                                     invalid, timeout, closed
    eyewall_shared_limits_up                         1 while Redis answers
    eyewall_shared_limits_unavailable_total{operation,outcome}
                                                     checks Redis did not answer, and
                                                     how when_down decided them
    eyewall_shared_limits_seconds{operation}         histogram: Redis round trips
    eyewall_shared_limits_leases                     connections and tunnels counted
    eyewall_shared_limits_leases_lost_total          leases found expired at a refresh
    eyewall_shared_flows_up                          1 while PostgreSQL takes batches
    eyewall_shared_flows_written_total               flows recorded there
    eyewall_shared_flows_pending                     flows waiting to be written
    eyewall_shared_flows_failed_batches_total        batches the database did not take
    (dropped flows: eyewall_events_dropped_total{subscriber="shared_flows"})

The node's name is one info metric, not a label on every series: Prometheus already
tells targets apart by ``instance``, and a ``group_left`` join adds the name where a
query wants it (docs/fleet.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from eyewall.shared.flow_db import FlowDatabase
    from eyewall.shared.limits_store import RedisLimitsStore

__all__ = ["FleetMetrics"]


class FleetMetrics:
    """A prometheus_client collector over the fleet parts a node has (None: absent)."""

    def __init__(
        self,
        node: str,
        proxy_protocol: Callable[[], dict[str, int]] | None = None,
        limits: RedisLimitsStore | None = None,
        flows: FlowDatabase | None = None,
    ) -> None:
        self.node = node
        self.proxy_protocol = proxy_protocol
        self.limits = limits
        self.flows = flows

    def collect(self) -> Iterator[Any]:
        """The metric families (prometheus_client's collector protocol), read now."""
        info = GaugeMetricFamily(
            "eyewall_node_info", "This node's name in the fleet (fleet.node).", labels=["node"]
        )
        info.add_metric([self.node], 1)
        yield info
        if self.proxy_protocol is not None:
            family = CounterMetricFamily(
                "eyewall_proxy_protocol_connections",
                "Connections to PROXY protocol listeners, by what became of them.",
                labels=["result"],
            )
            for result, n in self.proxy_protocol().items():
                family.add_metric([result], n)
            yield family
        if self.limits is not None:
            yield from self._limits(self.limits)
        if self.flows is not None:
            yield from self._flows(self.flows)

    @staticmethod
    def _limits(store: RedisLimitsStore) -> Iterator[Any]:
        from eyewall.shared.limits_store import LATENCY_BUCKETS

        stats = store.stats
        yield GaugeMetricFamily(
            "eyewall_shared_limits_up", "Whether Redis answered the last check.", value=stats.up
        )
        unavailable = CounterMetricFamily(
            "eyewall_shared_limits_unavailable",
            "Limit checks Redis did not answer, by how shared_limits.when_down decided.",
            labels=["operation", "outcome"],
        )
        for (operation, outcome), n in sorted(stats.unavailable.items()):
            unavailable.add_metric([operation, outcome], n)
        yield unavailable
        latency = HistogramMetricFamily(
            "eyewall_shared_limits_seconds",
            "Redis round trips of the shared limits, by operation.",
            labels=["operation"],
        )
        for operation, (counts, total) in sorted(stats.latency.items()):
            buckets, running = [], 0
            for bound, count in zip(LATENCY_BUCKETS, counts, strict=False):
                running += count
                buckets.append((repr(bound), running))
            buckets.append(("+Inf", running + counts[-1]))
            latency.add_metric([operation], buckets, total[0])
        yield latency
        yield GaugeMetricFamily(
            "eyewall_shared_limits_leases",
            "Connections and tunnels this node counts in the shared limits.",
            value=store.held,
        )
        yield CounterMetricFamily(
            "eyewall_shared_limits_leases_lost",
            "Leases found expired at a refresh (Redis unreachable for lease_ttl).",
            value=stats.leases_lost,
        )

    @staticmethod
    def _flows(db: FlowDatabase) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "eyewall_shared_flows_up",
            "Whether PostgreSQL took the last batch of flows.",
            value=db.up,
        )
        yield CounterMetricFamily(
            "eyewall_shared_flows_written", "Flows recorded to PostgreSQL.", value=db.written
        )
        yield GaugeMetricFamily(
            "eyewall_shared_flows_pending", "Flows waiting to be written.", value=db.pending
        )
        yield CounterMetricFamily(
            "eyewall_shared_flows_failed_batches",
            "Batches of flows PostgreSQL did not take (tried again).",
            value=db.failures,
        )
