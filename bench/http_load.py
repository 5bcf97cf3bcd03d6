"""HTTP scenarios driven by external tools: wrk (small requests) and curl
(100 MiB download/upload, time to first byte over fresh connections)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from bench_context import BenchContext, Target, median, percentile, repeated_transfer
from origins import LARGE_FILE, LARGE_SIZE, SMALL_FILE
from processes import pinned, run_command

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_stats.lua"
WRK_ERROR_KINDS = ("connect", "read", "write", "timeout", "status")
CURL_TIMED_OUT = 28


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found on PATH")
    return path


# --- scenario 1: small requests with wrk -----------------------------------


def wrk_command(
    ctx: BenchContext, target: Target, connections: int, seconds: int
) -> tuple[list[str], dict]:
    origin = f"127.0.0.1:{ctx.origins.nginx_port}"
    if target.proxy_port is None:
        url, env = f"http://{origin}/{SMALL_FILE}", {}
    else:
        url = f"http://127.0.0.1:{target.proxy_port}/"
        env = {"BENCH_ORIGIN": origin, "BENCH_PATH": f"/{SMALL_FILE}"}
        if target.proxy_authorization:
            env["BENCH_PROXY_AUTH"] = target.proxy_authorization
    command = [
        tool("wrk"),
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        url,
    ]
    return pinned(command, ctx.load_cpu), env


def run_wrk(ctx: BenchContext, target: Target, connections: int, seconds: int) -> dict:
    command, env = wrk_command(ctx, target, connections, seconds)
    result = run_command(command, timeout=seconds + 60, extra_env=env)
    for line in result.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            stats = json.loads(line.removeprefix("WRK_JSON "))
            break
    else:
        raise RuntimeError(
            f"wrk printed no stats (rc={result.returncode}): {result.stderr.strip()[-300:]}"
        )
    duration = stats["duration_us"] / 1e6
    errors = {kind: stats[kind] for kind in WRK_ERROR_KINDS}
    remarks = []
    if errors["status"]:  # which status? wrk does not say
        remarks.append(f"answers > 399; one curl request now gets {sample_status(ctx, target)}")
    return {
        "requests_per_s": stats["requests"] / duration if duration else 0.0,
        "p50_ms": stats["p50_us"] / 1000,
        "p90_ms": stats["p90_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
        "requests": stats["requests"],
        "errors": errors,
        "errors_total": sum(errors.values()),
        "remarks": remarks,
        "command": shlex.join([*(f"{key}={value}" for key, value in env.items()), *command]),
    }


def prime_credentials(ctx: BenchContext, target: Target) -> None:
    """One authenticated request before the load, so the proxy has verified
    (and cached) the credentials once, instead of every first request of the
    warm-up's connections verifying them (bcrypt) at the same time."""
    url = f"http://127.0.0.1:{ctx.origins.nginx_port}/{SMALL_FILE}"
    header = f"Proxy-Authorization: {target.proxy_authorization}"
    write_out = ["--write-out", "%{http_code}", "--max-time", "30", "--header", header]
    result = run_command(pinned([*curl_base(target), *write_out, url], ctx.load_cpu), timeout=60)
    if result.stdout.strip() != "200":
        raise RuntimeError(
            f"authenticated request answered {result.stdout.strip() or 'nothing'} "
            f"(curl rc={result.returncode}): {result.stderr.strip()[-200:]}"
        )


def sample_status(ctx: BenchContext, target: Target) -> str:
    """The status of one request like wrk's (wrk only counts answers > 399)."""
    url = f"http://127.0.0.1:{ctx.origins.nginx_port}/{SMALL_FILE}"
    command = [*curl_base(target), "--write-out", "%{http_code}", "--max-time", "10"]
    if target.proxy_authorization:
        command += ["--header", f"Proxy-Authorization: {target.proxy_authorization}"]
    try:
        result = run_command(pinned([*command, url], ctx.load_cpu), timeout=30)
    except subprocess.TimeoutExpired:
        return "no answer within 30 s"
    return f"HTTP {result.stdout.strip() or '(none)'} (curl rc={result.returncode})"


def small_requests(ctx: BenchContext, target: Target, connections: int) -> dict:
    if target.proxy_authorization:
        prime_credentials(ctx, target)
    run_wrk(ctx, target, connections, ctx.settings.wrk_warmup_s)
    return run_wrk(ctx, target, connections, ctx.settings.wrk_duration_s)


def cpu_seconds(target: Target) -> tuple[float, float]:
    """CPU time (user + system, seconds) of the proxy's process tree: (its first
    process, the others): for Eyewall the supervisor and its workers."""
    if target.process is None:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    root, rest = 0.0, 0.0
    for pid in target.process.process_tree():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if pid == target.process.pid:
            root += seconds
        else:
            rest += seconds
    return root, rest


def multicore_requests(ctx: BenchContext, target: Target, connections: int) -> dict:
    """Scenario 1's wrk load, and the proxy's CPU time per request over the measured
    run: in all, and in its first process (Eyewall's supervisor, squid's master)."""
    run_wrk(ctx, target, connections, ctx.settings.wrk_warmup_s)
    before = cpu_seconds(target)
    result = run_wrk(ctx, target, connections, ctx.settings.wrk_duration_s)
    after = cpu_seconds(target)
    requests = result["requests"] or 1
    if target.process is not None:
        main, others = after[0] - before[0], after[1] - before[1]
        result["cpu_us_per_request"] = (main + others) / requests * 1e6
        result["main_cpu_us_per_request"] = main / requests * 1e6
        result["cores_busy"] = (main + others) / ctx.settings.wrk_duration_s
    return result


# --- scenario 2: 100 MiB download / upload with curl ------------------------


def curl_base(target: Target) -> list[str]:
    command = [
        tool("curl"),
        "--silent",
        "--show-error",
        "--output",
        "/dev/null",
    ]
    if target.proxy_url:
        command += ["--proxy", target.proxy_url]
    return command


def curl_transfer(ctx: BenchContext, target: Target, direction: str) -> dict:
    origins = ctx.origins
    if direction == "download":
        url = f"http://127.0.0.1:{origins.nginx_port}/{LARGE_FILE}"
        extra = ["--write-out", "%{http_code} %{size_download} %{speed_download} %{time_total}"]
    else:
        url = f"http://127.0.0.1:{origins.http_sink_port}/upload"
        extra = [
            "--header",
            "Expect:",
            "--data-binary",
            f"@{origins.upload_body}",
            "--write-out",
            "%{http_code} %{size_upload} %{speed_upload} %{time_total}",
        ]
    cap = ["--max-time", f"{ctx.settings.bulk_cap_s:g}"]
    command = pinned([*curl_base(target), *cap, *extra, url], ctx.load_cpu)
    result = run_command(command, timeout=ctx.settings.bulk_cap_s + 30)
    fields = result.stdout.split()
    capped = result.returncode == CURL_TIMED_OUT
    if (result.returncode != 0 and not capped) or len(fields) != 4:
        raise RuntimeError(f"curl rc={result.returncode}: {result.stderr.strip()[-300:]}")
    status, size, speed = fields[0], int(fields[1]), float(fields[2])
    if not capped and (status != "200" or size != LARGE_SIZE):
        raise RuntimeError(f"curl got HTTP {status} after {size} of {LARGE_SIZE} bytes")
    return {
        "mb_per_s": speed / 1e6,
        "bytes": size,
        "complete": not capped,
        "command": shlex.join(command),
    }


def bulk_transfer(ctx: BenchContext, target: Target, direction: str) -> dict:
    settings = ctx.settings
    return repeated_transfer(
        lambda: curl_transfer(ctx, target, direction), settings.bulk_runs, settings.slow_run_s
    )


# --- scenario 6: time to first byte over a fresh connection -----------------


def time_to_first_byte(ctx: BenchContext, target: Target) -> dict:
    url = f"http://127.0.0.1:{ctx.origins.nginx_port}/{SMALL_FILE}"
    write_out = ["--write-out", "%{http_code} %{time_starttransfer}"]
    command = pinned([*curl_base(target), "--max-time", "10", *write_out, url], ctx.load_cpu)
    samples, errors = [], 0
    for _ in range(ctx.settings.ttfb_requests):
        try:
            result = run_command(command, timeout=30)
        except subprocess.TimeoutExpired:
            errors += 1
            continue
        fields = result.stdout.split()
        if result.returncode == 0 and len(fields) == 2 and fields[0] == "200":
            samples.append(float(fields[1]) * 1e6)
        else:
            errors += 1
    return {
        "median_us": median(samples),
        "p90_us": percentile(samples, 0.9) if samples else None,
        "samples": len(samples),
        "errors_total": errors,
        "command": shlex.join(command),
    }
