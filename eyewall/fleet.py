"""What makes a node one of a fleet behind a load balancer (docs/fleet.md), composed
for `eyewall.app`: the node's name, the limits shared through Redis
(`eyewall.shared.limits_store`), the flows shared through PostgreSQL
(`eyewall.shared.flow_db`), and their metrics (`eyewall.observe.fleet_metrics`).
The PROXY protocol lives in the proxy itself (`eyewall.proxy.proxied`).

Nothing connects at construction: `start` begins the background work (lease
refreshes, the flow writer) and says in one line whether Redis answers; a Redis or
PostgreSQL that is down delays no start-up and stops no traffic.

Redis and asyncpg come with the ``fleet`` extra (``pip install 'eyewall[fleet]'``);
`problems` reports settings that need them when they are missing.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
from typing import TYPE_CHECKING, Any

from eyewall.config import Settings
from eyewall.policy.state import AdmissionState, LimitsStore

if TYPE_CHECKING:
    from eyewall.shared.flow_db import FlowDatabase
    from eyewall.shared.limits_store import RedisLimitsStore

__all__ = ["FleetNode", "node_name", "problems"]

log = logging.getLogger("eyewall")


def node_name(settings: Settings) -> str:
    """``fleet.node``, or the host name."""
    return settings.fleet.node or socket.gethostname()


def problems(settings: Settings) -> list[str]:
    """``setting: problem`` lines for fleet settings this installation cannot serve."""
    out = []
    for setting, value, module in (
        ("shared_limits.redis", settings.shared_limits.redis, "redis"),
        ("shared_flows.postgresql", settings.shared_flows.postgresql, "asyncpg"),
    ):
        if value and importlib.util.find_spec(module) is None:
            out.append(
                f"{setting}: needs the {module} package, which is not installed"
                " (pip install 'eyewall[fleet]')"
            )
    return out


class FleetNode:
    """The fleet parts of one node, as ``settings`` asks for them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node = node_name(settings)
        self.limits: RedisLimitsStore | None = None
        self.flows: FlowDatabase | None = None
        self._live: Any = None  # the admin listener's LiveFeed, when flows are shared
        if settings.flows.enabled and settings.shared_flows.postgresql:
            from eyewall.shared.flow_db import FlowDatabase

            f, s = settings.flows, settings.shared_flows
            self.flows = FlowDatabase(
                s.postgresql,
                self.node,
                connect_timeout=s.connect_timeout,
                command_timeout=s.command_timeout,
                max_pending=s.max_pending,
                max_count=f.max_count,
                max_age=f.max_age,
                max_bytes=f.max_bytes,
            )

    def limits_store(self, local: AdmissionState) -> LimitsStore:
        """Where the limits live: Redis when shared_limits.redis is set (``local``
        deciding when it does not answer, if so configured), else ``local``."""
        shared = self.settings.shared_limits
        if not shared.redis:
            return local
        from eyewall.shared.limits_store import RedisLimitsStore
        from eyewall.shared.redis_limits import RedisLimits, RedisLimitsSettings

        redis = RedisLimits.from_settings(
            RedisLimitsSettings(
                url=shared.redis,
                connect_timeout=shared.connect_timeout,
                command_timeout=shared.command_timeout,
                down_for=shared.retry_after,
                lease_ttl=shared.lease_ttl,
                prefix=shared.prefix,
            )
        )
        self.limits = RedisLimitsStore(redis, local, shared.when_down)
        return self.limits

    def attach(self, observers: Any, proxy: Any) -> None:
        """Subscribe the shared flow store, give the admin listener the fleet's flows
        and register the metrics (``observers``: `eyewall.app.Observers`; ``proxy``:
        `eyewall.proxy.server.Proxy`)."""
        from eyewall.observe.fleet_metrics import FleetMetrics

        flows = self.flows
        if flows is not None:
            observers.bus.subscribe(flows)
        if observers.admin is not None:
            observers.admin.node = self.node
            observers.admin.shared = flows
            if flows is not None:  # the dashboard's live table shows every node's flows
                self._live = observers.live
                self._live.node = self.node
        metrics = observers.metrics
        if metrics is not None:
            gate = proxy.proxy_protocol
            metrics.registry.register(
                FleetMetrics(
                    self.node,
                    (lambda: dict(gate.counts)) if gate.enabled else None,
                    self.limits,
                    flows,
                )
            )
            if flows is not None:
                metrics.track_drops("shared_flows", lambda: flows.dropped)

    async def start(self) -> None:
        """Begin the background work; one line about Redis."""
        if self.flows is not None:
            self.flows.start()
            live = self._live
            if live is not None:
                self.flows.follow(live.push, lambda: bool(live.clients))
        if self.limits is not None:
            self.limits.start()
            problem = await self.limits.check()
            if problem is None:
                log.info("shared limits in Redis: it answers")
            else:
                log.warning(
                    "shared limits in Redis: it does not answer yet (%s); until it does,"
                    " shared_limits.when_down = %s decides",
                    problem,
                    self.limits.when_down,
                )

    def reconfigure(self, settings: Settings) -> None:
        """Apply what a reload may change: shared_limits.when_down."""
        self.settings = settings
        if self.limits is not None:
            self.limits.when_down = settings.shared_limits.when_down

    async def stop(self) -> None:
        """Write the flows that wait, close the connections."""
        if self.flows is not None:
            await self.flows.close()
        if self.limits is not None:
            await self.limits.close()
