"""What the fleet costs a node: the latency shared limits in Redis add to each request,
and how many flows a second one node records to PostgreSQL.

    .venv/bin/python -m bench.fleet_latency [--requests 4000] [--flows 20000] [--json F]

Starts its own redis-server and PostgreSQL (tests/services.py) and a small HTTP origin,
all pinned to CPU 0, and two Eyewall nodes pinned to CPU 1 with the same settings
(``rate_limits.client_rps`` high enough never to refuse, no access log, no flows),
one keeping its limits in the process and one in Redis.  This process (CPU 0) sends
requests to the two in turn, one after another, and times each until its whole answer
is in:

* keep-alive: one connection per node; each request costs the Redis node one round
  trip (the client_rps bucket);
* new connection per request: also the client_connections lease (acquire before the
  request, release after it, off the request's path).

The difference of the medians (and of the p99s) is what Redis adds per request.
Then `RedisLimitsStore.take` alone, in this process.

Flows: `FlowDatabase` (eyewall/shared/flow_db.py) fed with realistic flows (heads of
an ordinary browser request and response): the event loop's cost of taking a flow,
the time and loop CPU of writing batches of 1,000 with COPY, hence flows/s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ORIGIN = """
import asyncio, sys
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            close = b"connection: close" in head.lower()
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n"
                         + (b"Connection: close\\r\\n" if close else b"") + b"\\r\\nok")
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def pin(pid: int, cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:  # type: ignore[operator]
        os.sched_setaffinity(pid, {cpu})


def start_node(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "eyewall", "--listen", "127.0.0.1:0", "--admin-listen", "off",
             "--no-flows", "--access-log", "off", "--allow-private", "--log-level", "warning",
             "--client-rps", "1000000000", "--client-burst", "1000000000", *args],
            stderr=out, cwd=ROOT,
        )  # fmt: skip
    pin(process.pid, 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if " listening on " in line:
                return process, int(line.rsplit(":", 1)[1])
        if process.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.02)
    raise RuntimeError("node did not start")


def read_answer(sock: socket.socket) -> None:
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk


def percentiles(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": ordered[len(ordered) // 2] / 1000,
        "p99_us": ordered[int(len(ordered) * 0.99)] / 1000,
    }


def requests(ports: dict[str, int], origin: int, count: int, keep_alive: bool) -> dict[str, Any]:
    """``count`` requests to each node, alternating, one after another."""
    request = (
        f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + ("" if keep_alive else "Connection: close\r\n")
        + "\r\n"
    ).encode()
    socks = {n: socket.create_connection(("127.0.0.1", p)) for n, p in ports.items()}
    samples: dict[str, list[int]] = {n: [] for n in ports}
    try:
        for i in range(count + 200):
            for name, port in ports.items():
                began = time.perf_counter_ns()
                if not keep_alive:
                    socks[name] = socket.create_connection(("127.0.0.1", port))
                socks[name].sendall(request)
                read_answer(socks[name])
                if not keep_alive:
                    socks[name].close()
                if i >= 200:  # warmed up
                    samples[name].append(time.perf_counter_ns() - began)
    finally:
        for s in socks.values():
            s.close()
    out: dict[str, Any] = {n: percentiles(s) for n, s in samples.items()}
    out["added"] = {
        key: round(out["redis"][key] - out["local"][key], 1) for key in ("median_us", "p99_us")
    }
    return out


async def store_calls(url: str, count: int) -> dict[str, float]:
    from eyewall.policy.state import AdmissionState
    from eyewall.shared.limits_store import RedisLimitsStore
    from eyewall.shared.redis_limits import RedisLimits, RedisLimitsSettings

    store = RedisLimitsStore(
        RedisLimits.from_settings(RedisLimitsSettings(url=url, prefix="bench")), AdmissionState()
    )
    samples = []
    for i in range(count + 200):
        began = time.perf_counter_ns()
        await store.take("client_rps", "203.0.113.7", 0.0, 1e9, 1e9)
        if i >= 200:
            samples.append(time.perf_counter_ns() - began)
    await store.close()
    return percentiles(samples)


def sample_flow(n: int) -> Any:
    from eyewall.flow import Flow
    from eyewall.http1.parse import parse_request_head
    from eyewall.http1.response import parse_response_head

    request = parse_request_head(
        b"GET http://www.example.test/articles/2024/some-page?ref=home HTTP/1.1\r\n"
        b"Host: www.example.test\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0)"
        b" Gecko/20100101 Firefox/128.0\r\nAccept: text/html,application/xhtml+xml,"
        b"application/xml;q=0.9,*/*;q=0.8\r\nAccept-Language: en-GB,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\nCookie: session=0123456789abcdef; theme=dark"
        b"\r\nConnection: keep-alive\r\n\r\n"
    )
    response = parse_response_head(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 18342"
        b"\r\nCache-Control: max-age=60\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
        b"Server: nginx\r\nVary: Accept-Encoding\r\n\r\n"
    )
    flow = Flow(f"bench-{n:x}", "http", ("203.0.113.7", 40000 + n % 20000), time.time())
    flow.method, flow.url, flow.host, flow.port = "GET", request.target, "www.example.test", 80
    flow.request, flow.response, flow.status = request, response, 200
    flow.upstream, flow.bytes_out, flow.duration, flow.t_response = (
        "192.0.2.10:80",
        18342,
        0.05,
        0.02,
    )
    flow.head_bytes = 700
    return flow


async def flows_written(dsn: str, count: int) -> dict[str, float]:
    from eyewall.shared.flow_db import FLUSH_FLOWS, FlowDatabase

    db = FlowDatabase(dsn, "bench", max_pending=1 << 40, max_count=10**9)
    flows = [sample_flow(n) for n in range(count)]
    began = time.perf_counter_ns()
    for flow in flows[:FLUSH_FLOWS]:
        db(flow)
    take_ns = (time.perf_counter_ns() - began) / FLUSH_FLOWS
    assert await db._flush()  # connects, creates the table: not measured
    db.written = 0
    batches, cpu = [], 0
    wall_began = time.perf_counter()
    for start in range(0, count, FLUSH_FLOWS):
        for flow in flows[start : start + FLUSH_FLOWS]:
            db(flow)
        began, began_cpu = time.perf_counter_ns(), time.thread_time_ns()
        assert await db._flush()
        cpu += time.thread_time_ns() - began_cpu
        batches.append(time.perf_counter_ns() - began)
    wall = time.perf_counter() - wall_began
    await db.close()
    return {
        "take_us_per_flow": round(take_ns / 1000, 2),
        "batch_ms_median": round(sorted(batches)[len(batches) // 2] / 1e6, 2),
        "loop_cpu_us_per_flow": round(cpu / count / 1000, 2),
        "flows_per_s": round(count / wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--flows", type=int, default=20000)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    import tempfile

    import uvloop

    from tests.services import PostgresServer, RedisServer

    pin(0, 0)
    tmp = Path(tempfile.mkdtemp(prefix="ew-bench-"))
    redis = RedisServer.start()
    postgres = PostgresServer.start()
    pin(redis.process.pid, 0)
    pin(postgres.process.pid, 0)
    origin_process = subprocess.Popen(
        [sys.executable, "-c", ORIGIN], stdout=subprocess.PIPE, cwd=ROOT
    )
    pin(origin_process.pid, 0)
    assert origin_process.stdout is not None
    origin = int(origin_process.stdout.readline())
    nodes = {
        "local": start_node(tmp, "local"),
        "redis": start_node(tmp, "redis", "--shared-limits-redis", redis.url),
    }
    try:
        ports = {name: port for name, (_, port) in nodes.items()}
        results: dict[str, Any] = {
            "keep_alive": requests(ports, origin, args.requests, True),
            "new_connection": requests(ports, origin, args.requests // 4, False),
            "store_take": uvloop.run(store_calls(redis.url, args.requests)),
            "flows": uvloop.run(flows_written(postgres.dsn, args.flows)),
        }
    finally:
        for process, _ in nodes.values():
            process.terminate()
            process.wait(10)
        origin_process.terminate()
        origin_process.wait(10)
        redis.stop()
        postgres.stop()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
