"""HTTPS load through TLS interception (the intercept scenario), driven by our
own asyncio client against the HTTPS nginx of tls_origin.py.

Each of N connections: TCP connect to the proxy, `CONNECT localhost:PORT`,
`200`, TLS handshake with the certificate the proxy mints for `localhost`
(verified against the proxy's CA), then keep-alive `GET /1k` requests, one
at a time, until the deadline. "Direct" is the same client straight to the
origin (TLS verified against the origin's throwaway CA). All N connections are
opened before the clock starts; the time that took is reported as connect_s.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench_context import BenchContext, Target
from origins import SMALL_FILE, SMALL_SIZE
from tls_origin import TLS_HOST
from tunnel_load import HOST, IO_TIMEOUT_S, TunnelRefused, check_connect_response, run_async

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
RETRY_PAUSE_S = 0.01
NETWORK_ERRORS = (OSError, EOFError, ValueError, asyncio.LimitOverrunError)


class BadResponse(ValueError):
    """A response that is not `200` with a Content-Length of the 1 KiB file."""


def client_context(ca_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["http/1.1"])
    return context


def connect_head(origin_port: int, proxy_authorization: str | None) -> bytes:
    lines = [f"CONNECT {TLS_HOST}:{origin_port} HTTP/1.1", f"Host: {TLS_HOST}:{origin_port}"]
    if proxy_authorization:
        lines.append(f"Proxy-Authorization: {proxy_authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_connection(target: Target, origin_port: int, context: ssl.SSLContext) -> Connection:
    reader, writer = await asyncio.open_connection(HOST, target.proxy_port or origin_port)
    try:
        if target.proxy_port is not None:
            writer.write(connect_head(origin_port, target.proxy_authorization))
            head = await reader.readuntil(b"\r\n\r\n")
            if check_connect_response(head):
                raise ConnectionError("unexpected bytes after the CONNECT response")
        await writer.start_tls(context, server_hostname=TLS_HOST)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def one_request(connection: Connection, request: bytes) -> None:
    reader, writer = connection
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if head[9:12] != b"200":
        raise BadResponse(f"status {head[9:12].decode(errors='replace')}")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line[15:])
            break
    else:
        raise BadResponse("no Content-Length")
    if length != SMALL_SIZE:
        raise BadResponse(f"Content-Length {length}")
    await reader.readexactly(length)


def classify(error: BaseException) -> str:
    if isinstance(error, TunnelRefused):
        return "refused"
    if isinstance(error, ssl.SSLError):
        return "tls"
    if isinstance(error, BadResponse):
        return "response"
    if isinstance(error, ConnectionRefusedError):
        return "connect"
    if isinstance(error, EOFError):
        return "closed"
    if isinstance(error, TimeoutError):
        return "timeout"
    return type(error).__name__


def close(connection: Connection | None) -> None:
    if connection is not None:
        connection[1].transport.abort()


async def request_worker(
    connection: Connection | None,
    reconnect: Callable[[], Awaitable[Connection]],
    request: bytes,
    deadline: float,
    tally: Counter,
) -> None:
    """Requests one after another on `connection` until the deadline; after an
    error the connection is dropped and a new one opened (counted)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic()) + IO_TIMEOUT_S):
            while time.monotonic() < deadline:
                try:
                    if connection is None:
                        connection = await reconnect()
                        tally["reconnects"] += 1
                    await one_request(connection, request)
                    tally["ok"] += 1
                except NETWORK_ERRORS as error:
                    tally[classify(error)] += 1
                    close(connection)
                    connection = None
                    await asyncio.sleep(RETRY_PAUSE_S)
    except TimeoutError:
        tally["timeout"] += 1  # a response still missing IO_TIMEOUT_S after the deadline
    finally:
        close(connection)


async def keepalive_load(
    target: Target, origin_port: int, ca_file: Path, connections: int, seconds: float
) -> dict:
    context = client_context(ca_file)
    request = f"GET /{SMALL_FILE} HTTP/1.1\r\nHost: {TLS_HOST}:{origin_port}\r\n\r\n".encode()

    async def reconnect() -> Connection:
        return await asyncio.wait_for(open_connection(target, origin_port, context), IO_TIMEOUT_S)

    tally: Counter = Counter()
    started = time.monotonic()
    opened = await asyncio.gather(
        *(reconnect() for _ in range(connections)), return_exceptions=True
    )
    connect_s = time.monotonic() - started
    ready: list[Connection | None] = []
    for item in opened:
        if isinstance(item, BaseException):
            if not isinstance(item, NETWORK_ERRORS):
                raise item
            tally[classify(item)] += 1
            ready.append(None)
        else:
            ready.append(item)
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(
        *(request_worker(conn, reconnect, request, deadline, tally) for conn in ready)
    )
    elapsed = time.monotonic() - started
    await asyncio.sleep(0)  # let aborted transports finish before the loop closes
    errors = {kind: n for kind, n in tally.items() if kind not in ("ok", "reconnects")}
    return {
        "requests_per_s": tally["ok"] / elapsed,
        "requests": tally["ok"],
        "connect_s": connect_s,
        "opened": sum(1 for conn in ready if conn is not None),
        "reconnects": tally["reconnects"],
        "errors": errors,
        "errors_total": sum(errors.values()),
    }


def intercepted_requests(ctx: BenchContext, target: Target, connections: int) -> dict:
    origin = ctx.tls_origin
    if origin is None:
        raise RuntimeError("the HTTPS origin is not running")
    ca_file = target.proxy_ca if target.proxy_port is not None else origin.ca_file
    if ca_file is None:
        raise RuntimeError(f"{target.system}: no CA file to trust for its minted certificates")
    settings = ctx.settings
    warmup = run_async(
        keepalive_load(target, origin.port, ca_file, connections, settings.wrk_warmup_s)
    )
    result = run_async(
        keepalive_load(target, origin.port, ca_file, connections, settings.tls_duration_s)
    )
    if warmup["errors_total"]:
        result["remarks"] = [f"warm-up errors: {warmup['errors']}"]
    via = f"via 127.0.0.1:{target.proxy_port}, " if target.proxy_port else ""
    result["command"] = (
        f"bench/tls_load.py: {connections} connections, {via}"
        f"{'CONNECT ' if via else ''}{TLS_HOST}:{origin.port}, TLS (trust {ca_file}), "
        f"keep-alive GET /{SMALL_FILE} for {settings.tls_duration_s:g} s "
        f"after a {settings.wrk_warmup_s} s warm-up"
    )
    return result
