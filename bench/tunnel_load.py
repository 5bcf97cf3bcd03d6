"""CONNECT-tunnel scenarios, driven by our own Python clients against
origin.py: bulk throughput (3), tunnel setups per second (4) and RSS per
idle tunnel (5). "Direct" runs the same client straight to the origin."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from bench_context import BenchContext, Target, repeated_transfer

BUFFER_SIZE = 1 << 20
ZEROS = memoryview(bytes(BUFFER_SIZE))
HOST = "127.0.0.1"
IO_TIMEOUT_S = 10.0

try:  # the generator is cheaper on uvloop; run.py records which loop ran
    import uvloop

    LOOP_FACTORY: Any = uvloop.new_event_loop
    LOOP_NAME = f"uvloop {uvloop.__version__}"
except ImportError:
    LOOP_FACTORY = None
    LOOP_NAME = "asyncio (default loop)"


class TunnelRefused(ConnectionError):
    """The proxy answered CONNECT with something other than 200."""


def connect_request(port: int) -> bytes:
    return f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()


def check_connect_response(head: bytes) -> bytes:
    """Validate the proxy's answer; return any bytes after the header block."""
    status_line, _, _ = head.partition(b"\r\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or parts[1] != b"200":
        raise TunnelRefused(status_line.decode(errors="replace")[:100])
    return head.partition(b"\r\n\r\n")[2]


def run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=LOOP_FACTORY) as runner:
        return runner.run(coroutine)


# --- scenario 3: bulk throughput through one tunnel (blocking sockets) -------


def open_blocking_tunnel(target: Target, origin_port: int) -> tuple[socket.socket, bytes]:
    port = target.proxy_port or origin_port
    sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S)
    if target.proxy_port is None:
        return sock, b""
    try:
        sock.sendall(connect_request(origin_port))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("proxy closed the connection before answering CONNECT")
            head += chunk
        return sock, check_connect_response(head)
    except BaseException:
        sock.close()
        raise


def download(sock: socket.socket, leftover: bytes, size: int, deadline: float) -> int:
    sock.sendall(f"SEND {size}\n".encode())
    buffer = memoryview(bytearray(BUFFER_SIZE))
    received = len(leftover)
    while received < size and time.monotonic() < deadline:
        count = sock.recv_into(buffer)
        if count == 0:
            raise ConnectionError(f"tunnel closed after {received} of {size} bytes")
        received += count
    return received


def upload(sock: socket.socket, size: int, deadline: float) -> int:
    sock.sendall(f"RECV {size}\n".encode())
    sent = 0
    while sent < size and time.monotonic() < deadline:
        length = min(BUFFER_SIZE, size - sent)
        sock.sendall(ZEROS[:length])
        sent += length
    if sent < size:
        return sent
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionError(f"tunnel closed before the origin acknowledged: {answer!r}")
        answer += chunk
    if answer != b"OK\n":
        raise ConnectionError(f"unexpected answer from the origin: {answer!r}")
    return sent


def tunnel_transfer_once(ctx: BenchContext, target: Target, direction: str) -> dict:
    size = ctx.settings.tunnel_bytes
    sock, leftover = open_blocking_tunnel(target, ctx.origins.bulk_port)
    with sock:
        sock.settimeout(30)
        started = time.monotonic()
        deadline = started + ctx.settings.tunnel_deadline_s
        if direction == "download":
            moved = download(sock, leftover, size, deadline)
        else:
            moved = upload(sock, size, deadline)
        elapsed = time.monotonic() - started
    return {"mb_per_s": moved / 1e6 / elapsed, "bytes": moved, "complete": moved >= size}


def tunnel_throughput(ctx: BenchContext, target: Target, direction: str) -> dict:
    settings = ctx.settings
    result = repeated_transfer(
        lambda: tunnel_transfer_once(ctx, target, direction),
        settings.tunnel_runs,
        settings.slow_run_s,
    )
    return {**result, "bytes_per_run": settings.tunnel_bytes}


# --- asyncio helpers for scenarios 4 and 5 ----------------------------------


async def open_async_tunnel(target: Target, origin_port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (HOST, target.proxy_port or origin_port))
        if target.proxy_port is not None:
            await loop.sock_sendall(sock, connect_request(origin_port))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    raise ConnectionError("proxy closed before answering CONNECT")
                head += chunk
            if check_connect_response(head):
                raise ConnectionError("unexpected bytes after the CONNECT response")
    except BaseException:
        sock.close()
        raise
    return sock


async def echo_round_trip(sock: socket.socket, message: bytes) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, message)
    received = b""
    while len(received) < len(message):
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectionError("closed before the echo came back")
        received += chunk
    if received != message:
        raise ConnectionError("echo mismatch")


def classify(error: BaseException) -> str:
    if isinstance(error, TunnelRefused):
        return "refused"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "connect"
    return type(error).__name__


# --- scenario 4: CONNECT setups per second -----------------------------------


async def one_setup(target: Target, origin_port: int) -> None:
    """Open, CONNECT, echo once; the origin then closes and we wait for the
    close to travel back through the proxy (no TIME_WAIT on the client)."""
    loop = asyncio.get_running_loop()
    sock = await open_async_tunnel(target, origin_port)
    with sock:
        await echo_round_trip(sock, b"ping\n")
        while await loop.sock_recv(sock, 4096):
            pass


async def setup_worker(target: Target, origin_port: int, stop_at: float, tally: Counter) -> None:
    while time.monotonic() < stop_at:
        try:
            await asyncio.wait_for(one_setup(target, origin_port), IO_TIMEOUT_S)
            tally["ok"] += 1
        except (OSError, TunnelRefused, TimeoutError) as error:
            tally[classify(error)] += 1
            await asyncio.sleep(0.01)


async def measure_setups(target: Target, origin_port: int, workers: int, seconds: float) -> dict:
    tally: Counter = Counter()
    started = time.monotonic()
    stop_at = started + seconds
    await asyncio.gather(
        *(setup_worker(target, origin_port, stop_at, tally) for _ in range(workers))
    )
    elapsed = time.monotonic() - started
    errors = {kind: count for kind, count in tally.items() if kind != "ok"}
    return {
        "setups_per_s": tally["ok"] / elapsed,
        "setups": tally["ok"],
        "errors": errors,
        "errors_total": sum(errors.values()),
        "workers": workers,
    }


def connect_setups(ctx: BenchContext, target: Target) -> dict:
    settings = ctx.settings
    coroutine = measure_setups(
        target, ctx.origins.echo_close_port, settings.setup_workers, settings.setup_duration_s
    )
    return run_async(coroutine)


# --- scenario 5: RSS per idle tunnel -----------------------------------------


async def open_idle_tunnel(
    target: Target, origin_port: int, gate: asyncio.Semaphore
) -> socket.socket:
    async with gate:
        sock = await asyncio.wait_for(open_async_tunnel(target, origin_port), 30)
        try:
            await asyncio.wait_for(echo_round_trip(sock, b"hello\n"), 30)
        except BaseException:
            sock.close()
            raise
        return sock


async def still_alive(sock: socket.socket, gate: asyncio.Semaphore) -> bool:
    async with gate:
        try:
            await asyncio.wait_for(echo_round_trip(sock, b"still\n"), 10)
            return True
        except (OSError, TimeoutError):
            return False


async def hold_idle_tunnels(ctx: BenchContext, target: Target, count: int) -> dict:
    assert target.process is not None
    origin_port = ctx.origins.echo_port
    gate = asyncio.Semaphore(100)
    # Warm-up: a few tunnels opened and closed so one-time allocations
    # (imports, buffers, first-connection paths) are not charged per tunnel.
    for sock in await asyncio.gather(
        *(open_idle_tunnel(target, origin_port, gate) for _ in range(20))
    ):
        sock.close()
    await asyncio.sleep(1.0)
    before_kib, processes = target.process.rss_kib()
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(open_idle_tunnel(target, origin_port, gate) for _ in range(count)), return_exceptions=True
    )
    open_seconds = time.monotonic() - started
    sockets = [item for item in outcomes if isinstance(item, socket.socket)]
    failures = Counter(classify(item) for item in outcomes if isinstance(item, BaseException))
    try:
        await asyncio.sleep(ctx.settings.idle_wait_s)
        after_kib, processes_after = target.process.rss_kib()
        alive = sum(await asyncio.gather(*(still_alive(sock, gate) for sock in sockets)))
    finally:
        for sock in sockets:
            sock.close()
    return {
        "kib_per_tunnel": (after_kib - before_kib) / len(sockets) if sockets else None,
        "rss_before_kib": before_kib,
        "rss_after_kib": after_kib,
        "processes": max(processes, processes_after),
        "requested": count,
        "opened": len(sockets),
        "alive_after_wait": alive,
        "open_seconds": open_seconds,
        "errors": dict(failures),
        "errors_total": sum(failures.values()),
    }


def idle_tunnel_rss(ctx: BenchContext, target: Target, count: int) -> dict:
    if target.process is None:
        return {"kib_per_tunnel": None, "note": "no proxy process (direct)"}
    return run_async(hold_idle_tunnels(ctx, target, count))
