"""Shared data passed to every scenario: settings, origins and the target."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from origins import Origins
from processes import ManagedProcess
from tls_origin import TlsOrigin


@dataclass(frozen=True)
class Settings:
    wrk_connections: tuple[int, ...] = (10, 100, 500)
    wrk_duration_s: int = 10
    wrk_warmup_s: int = 2
    bulk_runs: int = 3
    tunnel_bytes: int = 1 << 30
    tunnel_runs: int = 3
    bulk_cap_s: float = 30.0
    tunnel_deadline_s: float = 30.0
    slow_run_s: float = 15.0
    setup_workers: int = 50
    setup_duration_s: float = 10.0
    idle_tunnel_counts: tuple[int, ...] = (1000, 5000)
    idle_wait_s: float = 2.0
    ttfb_requests: int = 200
    tls_connections: tuple[int, ...] = (10, 50)
    tls_duration_s: float = 10.0
    multicore_connections: tuple[int, ...] = (10, 100, 500)

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            wrk_connections=(10, 100),
            wrk_duration_s=3,
            wrk_warmup_s=1,
            bulk_runs=1,
            tunnel_bytes=256 << 20,
            tunnel_runs=1,
            bulk_cap_s=8.0,
            tunnel_deadline_s=10.0,
            setup_duration_s=3.0,
            idle_tunnel_counts=(1000,),
            idle_wait_s=1.0,
            ttfb_requests=30,
            tls_duration_s=3.0,
            multicore_connections=(10, 100),
        )


@dataclass
class BenchContext:
    settings: Settings
    origins: Origins
    load_cpu: int | None
    workdir: Path
    tls_origin: TlsOrigin | None = None  # started by the intercept scenario


@dataclass
class Target:
    """Where the load goes: straight to the origin (direct) or via a proxy."""

    system: str
    proxy_port: int | None
    process: ManagedProcess | None
    proxy_authorization: str | None = None  # Proxy-Authorization value, if required
    proxy_ca: Path | None = None  # CA of an intercepting proxy's minted certificates

    @property
    def proxy_url(self) -> str | None:
        return None if self.proxy_port is None else f"http://127.0.0.1:{self.proxy_port}"


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def repeated_transfer(measure_once: Callable[[], dict], runs: int, slow_run_s: float) -> dict:
    """Run a bulk transfer `runs` times and report the median MB/s.

    Each run returns {"mb_per_s", "bytes", "complete"}; a run that hit its
    time cap still yields a rate (bytes moved / time) and a remark. A run
    slower than `slow_run_s` is not repeated, to bound the total time.
    """
    results, errors, remarks = [], [], []
    for index in range(runs):
        started = time.monotonic()
        try:
            run = measure_once()
        except (OSError, RuntimeError) as error:
            errors.append(f"{type(error).__name__}: {error}")
            continue
        results.append(run)
        if not run["complete"]:
            remarks.append(f"capped at {run['bytes'] / 1e6:.0f} MB")
        if index < runs - 1 and time.monotonic() - started > slow_run_s:
            remarks.append(f"not repeated: run took > {slow_run_s:.0f}s")
            break
    speeds = [run["mb_per_s"] for run in results]
    return {
        "mb_per_s": median(speeds),
        "runs_mb_per_s": speeds,
        "errors": errors,
        "remarks": remarks,
        "command": results[0].get("command", "") if results else "",
    }
