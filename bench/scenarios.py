"""The six scenarios: what each measures, its variants and its table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import http_load
import tunnel_load
from bench_context import BenchContext, Settings, Target
from report import Column


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

    def as_table_spec(self) -> dict:
        return {
            "key": self.key,
            "title": self.title,
            "description": self.description,
            "columns": self.columns,
            "variant_header": self.variant_header,
        }


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
        columns=[
            Column("mb_per_s", "MB/s", digits=1, ratio=True),
            Column("runs_mb_per_s", "runs", digits=1),
            Column("errors", "errors"),
            Column("remarks", "remarks"),
        ],
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
        columns=[
            Column("mb_per_s", "MB/s", digits=1, ratio=True),
            Column("runs_mb_per_s", "runs", digits=1),
            Column("errors", "errors"),
            Column("remarks", "remarks"),
        ],
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

SCENARIO_KEYS = [scenario.key for scenario in SCENARIOS]
