"""Prometheus metrics, exposed by the admin listener at /metrics.

The data path never touches prometheus_client: `Metrics` observes finished flows and
bumps plain counters and histogram buckets (a few dictionary operations), and a
collector turns them into metric families when Prometheus scrapes.  Gauges (open
connections, tunnels, idle pool connections) are read from the proxy at scrape time.

    eyewall_build_info{version,python,tornado}     1
    eyewall_requests_total{method,status_class}    exchanges and tunnels finished
    eyewall_bytes_total{direction}                 body and tunnel bytes (in = from clients),
                                                   pages the proxy wrote itself included
    eyewall_request_duration_seconds               histogram: HTTP exchanges, head to last byte
    eyewall_tunnel_duration_seconds                histogram: CONNECT and WebSocket lifetimes
    eyewall_upstream_connect_seconds               histogram: new origin connections
    eyewall_upstream_requests_total{reused}        requests on pooled vs new connections
    eyewall_upstream_reuse_ratio                   reused / all, since start
    eyewall_policy_decisions_total{rule}           which rule or guard decided
    eyewall_errors_total{kind}                     failures by error kind (docs/monitoring.md)
    eyewall_rate_limited_total{limit}              refusals by the limit that fired
    eyewall_auth_failures_total{reason}            missing, wrong, throttled, revoked
    eyewall_intercept_handshake_failures_total{reason}   unknown_ca, bad_certificate, timeout, ...
    eyewall_login_checks_total{result}             bcrypt checks: run, skipped (the client
                                                   left first), refused (queue full)
    eyewall_addon_failures_total{addon,hook,reason}   hooks that raised (error) or ran
                                                   past timeouts.addon_hook (timeout)
    eyewall_config_reloads_total{result}           success, failure
    eyewall_config_last_reload_successful          1 if the last reload applied
    eyewall_config_last_reload_success_timestamp_seconds
    eyewall_client_connections, eyewall_tunnels, eyewall_upstream_idle_connections
    eyewall_events_dropped_total{subscriber}       observer work dropped to protect traffic
    plus the standard process_* metrics
"""

from __future__ import annotations

import bisect
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import tornado
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest

from eyewall import __version__
from eyewall.errors import ErrorKind
from eyewall.flow import Flow

__all__ = ["Metrics"]

DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
TUNNEL_BUCKETS = (0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)


class _Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            cumulative.append((repr(bound), running))
        cumulative.append(("+Inf", running + self.counts[-1]))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.sum)


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "none"


class Metrics:
    """Counters fed by flows; ``gauges`` is called at scrape time for live values."""

    def __init__(self, gauges: Callable[[], dict[str, float]]) -> None:
        self.gauges = gauges
        self.requests: dict[tuple[str, str], int] = {}
        self.bytes = {"in": 0, "out": 0}
        self.duration = _Histogram(DURATION_BUCKETS)
        self.tunnel_duration = _Histogram(TUNNEL_BUCKETS)
        self.connect = _Histogram(CONNECT_BUCKETS)
        self.reused = {"true": 0, "false": 0}
        self.decisions: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.limited: dict[str, int] = {}
        self.auth_failures: dict[str, int] = {}
        self.handshake_failures: dict[str, int] = {}
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_ok = 1
        self.last_reload_success = time.time()  # the start counts as a good load
        self.dropped: dict[str, Callable[[], int]] = {}
        self.login_checks: Callable[[], dict[str, int]] = dict
        self.addon_failures: Callable[[], dict[tuple[str, str, str], int]] = dict
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProcessCollector(registry=None))
        self.registry.register(self)

    def __call__(self, flow: Flow) -> None:
        method = flow.method if flow.method in KNOWN_METHODS else "OTHER"
        key = (method, _status_class(flow.status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.bytes["in"] += flow.bytes_in
        self.bytes["out"] += flow.bytes_out
        if flow.kind == "http":
            self.duration.observe(flow.duration)
        else:
            self.tunnel_duration.observe(flow.duration)
        if flow.connect_time is not None:
            self.connect.observe(flow.connect_time)
        if flow.upstream:
            self.reused["true" if flow.reused else "false"] += 1
        if flow.rule:
            self.decisions[flow.rule] = self.decisions.get(flow.rule, 0) + 1
        error = flow.error
        if error is not None:
            kind = error.value
            self.errors[kind] = self.errors.get(kind, 0) + 1
            cause = flow.cause or "unknown"
            if error is ErrorKind.AUTH_REQUIRED or cause == "throttled":
                self.auth_failures[cause] = self.auth_failures.get(cause, 0) + 1
            if error is ErrorKind.RATE_LIMITED and cause != "throttled":
                self.limited[cause] = self.limited.get(cause, 0) + 1
            elif error is ErrorKind.CLIENT_TLS_ERROR and flow.intercepted:
                self.handshake_failures[cause] = self.handshake_failures.get(cause, 0) + 1

    def reloaded(self, ok: bool) -> None:
        """Count a configuration reload (applied or refused)."""
        self.reloads["success" if ok else "failure"] += 1
        self.last_reload_ok = int(ok)
        if ok:
            self.last_reload_success = time.time()

    def track_drops(self, subscriber: str, count: Callable[[], int]) -> None:
        """Report ``count()`` as ``eyewall_events_dropped_total`` for ``subscriber``."""
        self.dropped[subscriber] = count

    # -- prometheus_client collector protocol -------------------------------------------

    def collect(self) -> Iterator[Any]:
        """The metric families at scrape time (prometheus_client's collector protocol)."""
        info = GaugeMetricFamily(
            "eyewall_build_info",
            "Eyewall's version and platform.",
            labels=["version", "python", "tornado"],
        )
        info.add_metric([__version__, platform.python_version(), tornado.version], 1)
        yield info
        requests = CounterMetricFamily(
            "eyewall_requests", "Exchanges and tunnels finished.", labels=["method", "status_class"]
        )
        for (method, status_class), n in sorted(self.requests.items()):
            requests.add_metric([method, status_class], n)
        yield requests
        moved = CounterMetricFamily(
            "eyewall_bytes", "Body and tunnel bytes; in = from clients.", labels=["direction"]
        )
        for direction, n in self.bytes.items():
            moved.add_metric([direction], n)
        yield moved
        yield self.duration.family(
            "eyewall_request_duration_seconds", "HTTP exchanges, from request head to last byte."
        )
        yield self.tunnel_duration.family(
            "eyewall_tunnel_duration_seconds", "CONNECT and WebSocket tunnels, open to close."
        )
        yield self.connect.family(
            "eyewall_upstream_connect_seconds", "Opening a new origin connection."
        )
        upstream = CounterMetricFamily(
            "eyewall_upstream_requests", "Requests by origin connection reuse.", labels=["reused"]
        )
        for reused, n in self.reused.items():
            upstream.add_metric([reused], n)
        yield upstream
        total = self.reused["true"] + self.reused["false"]
        yield GaugeMetricFamily(
            "eyewall_upstream_reuse_ratio",
            "Share of requests sent on pooled connections, since start.",
            value=self.reused["true"] / total if total else 0.0,
        )
        for name, doc, label, counts in (
            ("eyewall_policy_decisions", "Decisions by rule or guard.", "rule", self.decisions),
            ("eyewall_errors", "Failures by error kind.", "kind", self.errors),
            ("eyewall_rate_limited", "Refusals by rate limit.", "limit", self.limited),
            (
                "eyewall_auth_failures",
                "Failed proxy logins by reason.",
                "reason",
                self.auth_failures,
            ),
            (
                "eyewall_intercept_handshake_failures",
                "Client TLS handshakes of intercepted tunnels that failed.",
                "reason",
                self.handshake_failures,
            ),
            ("eyewall_config_reloads", "Configuration reloads.", "result", self.reloads),
            (
                "eyewall_login_checks",
                "bcrypt checks of proxy logins.",
                "result",
                self.login_checks(),
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, n in sorted(counts.items()):
                family.add_metric([key], n)
            yield family
        failed = CounterMetricFamily(
            "eyewall_addon_failures",
            "Addon hooks that raised (error) or ran past timeouts.addon_hook (timeout).",
            labels=["addon", "hook", "reason"],
        )
        for (addon, hook, reason), n in sorted(self.addon_failures().items()):
            failed.add_metric([addon, hook, reason], n)
        yield failed
        yield GaugeMetricFamily(
            "eyewall_config_last_reload_successful",
            "Whether the last configuration reload was applied.",
            value=self.last_reload_ok,
        )
        yield GaugeMetricFamily(
            "eyewall_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (start or reload).",
            value=self.last_reload_success,
        )
        dropped = CounterMetricFamily(
            "eyewall_events_dropped",
            "Observer work dropped so traffic never waits.",
            labels=["subscriber"],
        )
        for subscriber, count in sorted(self.dropped.items()):
            dropped.add_metric([subscriber], count())
        yield dropped
        for name, value in self.gauges().items():
            yield GaugeMetricFamily(f"eyewall_{name}", name.replace("_", " ") + ".", value=value)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)
