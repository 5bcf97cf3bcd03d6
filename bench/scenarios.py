"""The scenarios: what each measures, its variants, its systems and its table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import http_load
import system_variants
import tls_load
import tunnel_load
from bench_context import BenchContext, Settings, Target
from report import DIRECT, Column
from systems import EYEWALL_BASELINE, ProxySystem


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    description: str
    variants: Callable[[Settings], list[Any]]
    measure: Callable[[BenchContext, Target, Any], dict]
    columns: list[Column]
    variant_header: str | None = None
    includes_direct: bool = True
    fresh_proxy_per_variant: bool = False
    # Scenarios comparing configurations bring their own systems, built from
    # the --peers list after `prepare` (e.g. starting an extra origin) has run.
    prepare: Callable[[BenchContext], None] | None = None
    systems: Callable[[BenchContext, list[ProxySystem]], list[ProxySystem]] | None = None
    # Ratio columns ("x NAME") are computed against these systems' rows.
    baselines: tuple[str, ...] = (DIRECT,)
    # With --eyewall-baseline, one more ratio column against this row (None: no
    # baseline Eyewall runs in this scenario).
    eyewall_baseline_row: str | None = EYEWALL_BASELINE

    def as_table_spec(self, eyewall_baseline: bool = False) -> dict:
        row = self.eyewall_baseline_row
        extra = (row,) if eyewall_baseline and row else ()
        return {
            "key": self.key,
            "title": self.title,
            "description": self.description,
            "columns": self.columns,
            "variant_header": self.variant_header,
            "baselines": self.baselines + extra,
        }


THROUGHPUT_COLUMNS = [
    Column("mb_per_s", "MB/s", digits=1, ratio=True),
    Column("runs_mb_per_s", "runs", digits=1),
    Column("errors", "errors"),
    Column("remarks", "remarks"),
]

SCENARIOS = [
    Scenario(
        key="small_requests",
        title="1. Small requests (1 KiB from nginx, keep-alive, wrk -t1)",
        description=(
            "wrk -t1 -cN keep-alive GETs of a 1 KiB static file; through a proxy the requests "
            "are absolute-form (`GET http://origin/1k`). A warm-up run precedes each measured "
            "run. Latencies are wrk's percentiles (Lua `done()`), errors are wrk's "
            "connect/read/write/timeout counters plus `status` (responses > 399). A proxy "
            "that closes the connection after each response (tinyproxy) shows up as read errors."
        ),
        variants=lambda settings: list(settings.wrk_connections),
        measure=http_load.small_requests,
        columns=[
            Column("requests_per_s", "req/s", ratio=True),
            Column("p50_ms", "p50 ms", digits=2, ratio=True),
            Column("p99_ms", "p99 ms", digits=2, ratio=True),
            Column("errors", "errors"),
        ],
        variant_header="conns",
    ),
    Scenario(
        key="bulk_http",
        title="2. 100 MiB download and upload (curl, plain HTTP)",
        description=(
            "curl through the proxy, `-o /dev/null`, `%{speed_download}` / `%{speed_upload}`, "
            "MB/s = 10^6 bytes/s, median of the runs. Download: nginx static 100 MiB file. "
            "Upload: POST of 100 MiB to origin.py's HTTP sink, which reads the whole body "
            "before answering (see notes for why not nginx)."
        ),
        variants=lambda settings: ["download", "upload"],
        measure=http_load.bulk_transfer,
        columns=THROUGHPUT_COLUMNS,
        variant_header="direction",
    ),
    Scenario(
        key="tunnel_throughput",
        title="3. Raw CONNECT tunnel throughput",
        description=(
            "One CONNECT tunnel to origin.py's bulk port, then the origin sends (download) or "
            "reads (upload, then acks) the payload; 1 MiB buffers, `recv_into`/`memoryview`. "
            "Timing starts after the `200`. The direct row is the client straight to the "
            "origin, i.e. the load generator's own ceiling. Median of the runs."
        ),
        variants=lambda settings: ["download", "upload"],
        measure=tunnel_load.tunnel_throughput,
        columns=THROUGHPUT_COLUMNS,
        variant_header="direction",
    ),
    Scenario(
        key="connect_setups",
        title="4. CONNECT tunnel setups per second",
        description=(
            "Concurrent asyncio workers loop: TCP connect to the proxy, `CONNECT` to an origin "
            "that echoes the first chunk and closes, read the `200`, send 5 bytes, read them "
            "back, wait for the close to come back through the proxy. Direct = the same "
            "without the CONNECT (plain TCP connect + echo)."
        ),
        variants=lambda settings: [settings.setup_workers],
        measure=lambda ctx, target, _workers: tunnel_load.connect_setups(ctx, target),
        columns=[
            Column("setups_per_s", "setups/s", ratio=True),
            Column("setups", "setups"),
            Column("errors", "errors"),
        ],
        variant_header="workers",
    ),
    Scenario(
        key="idle_rss",
        title="5. RSS per idle tunnel",
        description=(
            "A fresh proxy; 20 warm-up tunnels opened and closed; RSS read (VmRSS summed over "
            "the proxy's process tree); N tunnels to an echo origin opened (100 at a time), "
            "one message echoed through each; after the wait RSS read again. "
            "KiB/tunnel = (after - before) / opened. `alive` = tunnels that still echo "
            "after the wait."
        ),
        variants=lambda settings: list(settings.idle_tunnel_counts),
        measure=tunnel_load.idle_tunnel_rss,
        columns=[
            Column("kib_per_tunnel", "KiB/tunnel", digits=1),
            Column("rss_before_kib", "RSS before KiB"),
            Column("rss_after_kib", "RSS after KiB"),
            Column("opened", "opened"),
            Column("alive_after_wait", "alive"),
            Column("processes", "procs"),
            Column("errors", "errors"),
        ],
        variant_header="tunnels",
        includes_direct=False,
        fresh_proxy_per_variant=True,
    ),
    Scenario(
        key="ttfb",
        title="6. Time to first byte over a fresh connection",
        description=(
            "Sequential curl processes, one new connection each, GET of the 1 KiB file; "
            "`%{time_starttransfer}` in µs. `vs direct` is the added latency in µs."
        ),
        variants=lambda settings: [settings.ttfb_requests],
        measure=lambda ctx, target, _count: http_load.time_to_first_byte(ctx, target),
        columns=[
            Column("median_us", "median µs", ratio=True, overhead=True),
            Column("p90_us", "p90 µs", ratio=True, overhead=True),
            Column("errors_total", "errors"),
        ],
        variant_header="requests",
    ),
]

WRK_COLUMNS = [
    Column("requests_per_s", "req/s", ratio=True),
    Column("p50_ms", "p50 ms", digits=2),
    Column("p99_ms", "p99 ms", digits=2),
    Column("errors", "errors"),
]

SCENARIOS += [
    Scenario(
        key="policy_cost",
        title="7. Cost of a policy: 100 rules + Basic authentication (wrk, 1 KiB)",
        description=(
            "Scenario 1's wrk load (1 KiB, keep-alive, -t1, warm-up first) through Eyewall "
            "with no policy (bench/eyewall-bench.toml) and with a generated policy: 100 "
            "`[[rules]]` of varied kinds, none matching the traffic, then the default allow, "
            "and an htpasswd user (bcrypt) whose `Proxy-Authorization: Basic` wrk sends on "
            "every request (one authenticated curl request first, so the credentials are "
            "verified and cached once before the warm-up). Both with Eyewall's default "
            "observability. Target: ratio >= 0.9."
        ),
        variants=lambda settings: list(settings.wrk_connections[:2]),
        measure=http_load.small_requests,
        columns=WRK_COLUMNS,
        variant_header="conns",
        includes_direct=False,
        systems=system_variants.policy_systems,
        baselines=("eyewall-no-policy",),
        eyewall_baseline_row=None,
    ),
    Scenario(
        key="observability_cost",
        title="8. Cost of observability: access log, flows, admin/metrics (wrk, 1 KiB)",
        description=(
            "Scenario 1's wrk load through Eyewall with observability off (`--access-log off "
            "--no-flows --admin-listen off`) and on, as a user gets it by default (JSON access "
            "log to a file, flows recorded to a SQLite file, admin listener with metrics on "
            "127.0.0.1:0). Target: ratio on/off >= 0.85. With --eyewall-baseline the same "
            "pair runs from the baseline checkout (`eyewall-baseline-obs-off/on`); its on/off "
            "ratio is the `x eyewall-baseline-obs-off` column."
        ),
        variants=lambda settings: list(settings.wrk_connections[:2]),
        measure=http_load.small_requests,
        columns=WRK_COLUMNS,
        variant_header="conns",
        includes_direct=False,
        systems=system_variants.observability_systems,
        baselines=("eyewall-obs-off",),
        eyewall_baseline_row=f"{EYEWALL_BASELINE}-obs-off",
    ),
    Scenario(
        key="intercept",
        title="9. HTTPS requests through TLS interception",
        description=(
            "N asyncio connections (bench/tls_load.py): `CONNECT localhost:PORT`, TLS to the "
            "certificate the proxy mints (verified against the proxy's CA), then keep-alive "
            "`GET /1k` one at a time for the duration, after a warm-up run. The origin is a "
            "second nginx serving the same file over TLS with a certificate from a throwaway "
            "CA, which the proxies trust upstream. Direct = the same client straight to the "
            "origin over TLS. All N connections are opened (CONNECT + both TLS handshakes) "
            "before the clock starts; `connect s` is how long that took (after the warm-up, "
            "so the proxy's certificate for localhost is already minted). "
            "Errors: refused CONNECT, tls, response (not 200 + 1 KiB), closed, timeout."
        ),
        variants=lambda settings: list(settings.tls_connections),
        measure=tls_load.intercepted_requests,
        columns=[
            Column("requests_per_s", "req/s", ratio=True),
            Column("requests", "requests"),
            Column("connect_s", "connect s", digits=2),
            Column("errors", "errors"),
            Column("remarks", "remarks"),
        ],
        variant_header="conns",
        prepare=system_variants.prepare_tls_origin,
        systems=system_variants.intercept_systems,
        baselines=(DIRECT, "mitmproxy-intercept"),
        eyewall_baseline_row=None,
    ),
]

SCENARIO_KEYS = [scenario.key for scenario in SCENARIOS]
