"""The request lifecycle in-process: client loop, admission and exchange over a socket
pair and scripted loopback origins, with an injected clock.  Every phase of a
connection runs out with the right error kind; body idleness is "no byte moved";
answers the proxy makes follow the request method; a reload keeps admission state."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from eyewall.addons.runner import Addons
from eyewall.app import build_policy
from eyewall.config import load_settings
from eyewall.errors import ErrorKind
from eyewall.proxy.client import ClientConnection
from eyewall.proxy.exchange import Exchange
from eyewall.proxy.streams import moved, unsent
from eyewall.proxy.timeouts import Phase
from tests.proxy.harness import (
    DEFAULTS,
    BlackHole,
    Client,
    FakeContext,
    Origin,
    read_request,
    status,
    until,
)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()


def idle_past_body_idle(ctx: FakeContext, conn: ClientConnection) -> None:
    """With body_idle at 3 s and the last bytes already moved: the first sweep (1 s)
    sees them, nothing has run out 3.9 s on, and the phase has 4.1 s on."""
    ctx.advance(1.0)
    ctx.advance(2.9)
    assert conn.watch.expired is None
    ctx.advance(0.2)


def test_a_request_goes_through_and_its_flow_ends() -> None:
    async def main() -> None:
        ctx = FakeContext()
        origin = await Origin.start(answer)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await client.until_received(b"hello")
        assert status(client.received) == 200
        await until(lambda: ctx.flows)
        flow = ctx.flows[0]
        assert (flow.status, flow.error, flow.bytes_out) == (200, None, 5)
        assert client.conn.watch.phase is Phase.IDLE
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


# -- waiting for the client ------------------------------------------------------------


def test_a_half_sent_head_gets_408_when_client_header_runs_out() -> None:
    async def main() -> None:
        ctx = FakeContext(**{"timeouts.client_header": 10.0})
        client = Client(ctx)
        await client.send(b"GET http://example.com/ HTTP/1.1\r\nX-Slow: ")
        await until(lambda: client.conn.head_started)
        ctx.advance(9.9)
        assert client.conn.watch.expired is None
        ctx.advance(0.2)
        data = await client.response()
        assert status(data) == 408
        assert ctx.flows[0].error is ErrorKind.CLIENT_TIMEOUT
        assert ctx.flows[0].duration == pytest.approx(10.1)  # from the head's first byte
        await client.finish()
        ctx.close()

    run(main())


def test_a_half_sent_head_request_gets_its_408_without_a_body() -> None:
    """The answer follows the method the head began with (RFC 9110 §9.3.2), and the
    record keeps what its request line said."""

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.client_header": 10.0})
        client = Client(ctx)
        await client.send(b"HEAD http://example.com/big HTTP/1.1\r\nX-Slow: ")
        await until(lambda: client.conn.head_started)
        ctx.advance(10.1)
        data = await client.response()
        assert status(data) == 408 and data.endswith(b"\r\n\r\n")
        assert b"Content-Length: " in data  # the length the page would have had
        flow = ctx.flows[0]
        assert (flow.method, flow.url, flow.bytes_out) == ("HEAD", "http://example.com/big", 0)
        await client.finish()
        ctx.close()

    run(main())


def test_a_silent_new_connection_and_an_idle_one_are_closed_quietly() -> None:
    async def main() -> None:
        ctx = FakeContext(**{"timeouts.client_header": 5.0, "timeouts.keepalive_idle": 60.0})
        origin = await Origin.start(answer)
        silent = Client(ctx)
        ctx.advance(5.1)
        assert await silent.response() == b""
        idle = Client(ctx)
        await idle.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await idle.until_received(b"hello")
        await until(lambda: idle.conn.watch.phase is Phase.IDLE)
        ctx.advance(59.0)
        assert idle.conn.watch.expired is None
        ctx.advance(1.1)
        await idle.response()
        assert len(ctx.flows) == 1  # the request; the idle close is not a flow
        for c in (silent, idle):
            await c.finish()
        await origin.close()
        ctx.close()

    run(main())


# -- waiting for the origin --------------------------------------------------------------


def test_a_silent_origin_is_a_504_read_timeout_and_the_connection_lives_on() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        held.append(writer)
        await reader.read()  # until the proxy gives up

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.upstream_head": 30.0, "timeouts.client_header": 10.0})
        origin = await Origin.start(silent)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await until(lambda: client.conn.watch.phase is Phase.WAITING)
        ctx.advance(29.0)
        assert client.conn.watch.expired is None
        ctx.advance(1.5)
        data = await client.until_received(b"request id")
        assert status(data) == 504
        assert b"error=connection_read_timeout" in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.READ_TIMEOUT
        assert not client.conn.stream.closed()  # a 504 on a kept-alive connection
        # ... whose later phases have their limits still: half a head gets its 408
        await until(lambda: client.conn.watch.phase is Phase.IDLE)
        await client.send(b"GET http://127.0.0.1:9/ HTTP/1.1\r\n")
        await until(lambda: client.conn.watch.phase is Phase.CLIENT_HEAD)
        ctx.advance(10.5)
        data = await client.response()
        assert b" 408 " in data
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


async def connecting_to_a_black_hole(
    ctx: FakeContext, monkeypatch: pytest.MonkeyPatch, request: bytes
) -> Client:
    """A client whose ``request`` has the proxy connecting to an origin that never
    answers (`BlackHole`), once the connection is in phase CONNECTING."""
    hole = BlackHole()
    monkeypatch.setattr(ctx.pool, "open_socket", hole)
    client = Client(ctx)
    await client.send(request)
    await until(lambda: client.conn.watch.phase is Phase.CONNECTING and hole.opened)
    return client


def test_a_connect_that_outlives_its_limit_is_a_504_not_a_silent_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch bounds an exchange's connect (no timer of the pool's own, which would
    fire after a stall of the loop and blame the origin): the client gets its 504
    (``connection_timeout``), and its connection lives on.  Here the connect never
    completes (a black-holed origin)."""

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.upstream_connect": 5.0})
        client = await connecting_to_a_black_hole(
            ctx, monkeypatch, b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        ctx.advance(4.0)
        assert client.conn.watch.expired is None
        ctx.advance(1.5)
        data = await client.until_received(b"request id")
        assert status(data) == 504 and b"error=connection_timeout" in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.CONNECTION_TIMEOUT
        assert "timeouts.upstream_connect" in ctx.flows[0].error_detail
        assert not client.conn.stream.closed()
        await client.finish()
        ctx.close()

    run(main())


def test_a_tunnel_connect_that_outlives_its_limit_is_a_504(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CONNECT's connect is bounded by the same watch as an exchange's: 504
    ``connection_timeout`` once ``timeouts.upstream_connect`` has run out, not before,
    and the tunnel's count is given back."""

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.upstream_connect": 5.0})
        client = await connecting_to_a_black_hole(
            ctx, monkeypatch, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"
        )
        ctx.advance(4.0)
        assert client.conn.watch.expired is None
        ctx.advance(1.5)
        data = await client.until_received(b"request id")
        assert status(data) == 504 and b"error=connection_timeout" in data
        await until(lambda: ctx.flows)
        flow = ctx.flows[0]
        assert flow.error is ErrorKind.CONNECTION_TIMEOUT and flow.kind == "http"  # never a tunnel
        assert "timeouts.upstream_connect" in flow.error_detail
        assert client.conn.opening is None
        tunnels = ctx.state.client_tunnels
        await until(lambda: tunnels.count(client.conn.address[0]) == 0)  # given back
        await client.finish()
        ctx.close()

    run(main())


@pytest.mark.parametrize("method", ["GET", "CONNECT"])
def test_a_client_that_leaves_during_a_connect_ends_it_at_the_next_sweep(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Nobody reads a client's stream while the proxy connects for it: the sweep looks,
    cuts the connect, and records ``client_aborted`` (not a 504 it never received);
    a CONNECT's tunnel slot is given back at once, not when the connect limit runs out."""

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.upstream_connect": 10.0})
        target = "127.0.0.1:9" if method == "CONNECT" else "http://127.0.0.1:9/"
        request = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n".encode()
        client = await connecting_to_a_black_hole(ctx, monkeypatch, request)
        client.sock.close()
        ctx.advance(1.0)  # well inside the connect limit
        await until(lambda: ctx.flows)
        flow = ctx.flows[0]
        assert flow.error is ErrorKind.CLIENT_ABORTED and flow.status == 0
        assert ctx.state.client_tunnels.count(client.conn.address[0]) == 0
        await asyncio.wait_for(client.task, 5)
        ctx.close()

    run(main())


def test_pipelined_requests_the_proxy_answers_itself_let_the_loop_turn() -> None:
    """1,000 pipelined requests that the proxy answers itself (no origin, a write the
    socket takes at once): between two turns of the event loop it answers a few, not all
    of them, so every other client keeps being served (one client stopped everyone, the
    health checks included)."""

    async def main() -> None:
        ctx = FakeContext()
        loop = asyncio.get_running_loop()
        client = Client(ctx)
        reading = asyncio.ensure_future(client.response())
        request = b"OPTIONS http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n\r\n"
        per_turn: list[int] = []
        seen = [0]

        def probe() -> None:  # once per turn of the loop
            per_turn.append(len(ctx.flows) - seen[0])
            seen[0] = len(ctx.flows)
            if len(ctx.flows) < 1000:
                loop.call_soon(probe)

        loop.call_soon(probe)
        await client.send(request * 1000)
        await until(lambda: len(ctx.flows) == 1000, rounds=200_000)
        assert max(per_turn) <= 2, max(per_turn)
        client.sock.close()
        reading.cancel()
        ctx.close()

    run(main())


def test_bytes_after_a_refused_connect_are_never_read_as_a_request() -> None:
    """A client that sends its TLS ClientHello right behind its CONNECT: the refusal
    closes the connection, and the hello is not taken for a second request."""

    async def main() -> None:
        ctx = FakeContext(**{"access.connect_ports": ["443"]})
        client = Client(ctx)
        hello = bytes.fromhex("16030100c8010000c40303") + b"r" * 32
        await client.send(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n" + hello)
        client.sock.shutdown(socket.SHUT_WR)  # ends the proxy's lingering close at once
        data = await client.response()  # until the proxy closes
        assert status(data) == 403 and b"Connection: close" in data
        assert data.count(b"HTTP/1.1") == 1
        await until(lambda: ctx.flows)
        assert [f.status for f in ctx.flows] == [403]
        await client.finish()
        ctx.close()

    run(main())


def test_waiting_for_the_head_never_counts_as_body_idleness() -> None:
    """Head after 2 s, a 1.5 s pause, then the body, with body_idle 3 s: a 200."""
    head_go, body_go = asyncio.Event(), asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await head_go.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")
        await writer.drain()
        await body_go.wait()
        writer.write(b"b" * 1048576)
        await writer.drain()

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0, "timeouts.upstream_head": 60.0})
        origin = await Origin.start(slow)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await until(lambda: client.conn.watch.phase is Phase.WAITING)
        ctx.advance(2.0)
        head_go.set()
        await until(lambda: client.conn.watch.phase is Phase.RESPONDING)
        ctx.advance(1.5)
        ctx.advance(1.4)  # 2.9 s in this phase, the head wait not counted
        assert client.conn.watch.expired is None
        body_go.set()
        await until(lambda: len(client.received) >= 1048576 or not client.received, "body")
        while b"b" * 1000 not in client.received or len(client.received) < 1048576:
            await client.recv_some()
        assert status(client.received) == 200
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_slow_but_steady_reader_is_never_cut_off() -> None:
    """The client takes a large body a little at a time, more slowly than body_idle
    between sweeps would allow if idleness were counted per piece."""
    size = 8 << 20

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0})
        origin = await Origin.start(big)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await until(lambda: client.conn.watch.phase is Phase.RESPONDING)
        exchange = client.conn.exchange
        assert exchange is not None
        while len(client.received) < size:
            before = exchange._progress()
            await client.recv_some()
            await until(
                lambda before=before: exchange._progress() != before or len(client.received) >= size
            )
            ctx.advance(2.5)  # 5 s between reads, body_idle 3 s: bytes moved meanwhile
            ctx.advance(2.5)
            assert client.conn.watch.expired is None or len(client.received) >= size
        assert client.received.endswith(b"x" * 100)
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_reader_that_stops_is_cut_off_after_body_idle() -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        while True:
            writer.write(b"x" * 65536)
            await writer.drain()

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0})
        origin = await Origin.start(big)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await until(lambda: client.conn.watch.phase is Phase.RESPONDING)
        exchange = client.conn.exchange
        assert exchange is not None
        # Let the kernel buffers fill: progress stops changing.
        last = -1
        while exchange._progress() != last:
            last = exchange._progress()
            for _ in range(200):
                await asyncio.sleep(0)
        ctx.advance(3.1)  # the first sweep notes the last progress
        ctx.advance(0.1)  # the next, what the kernel still holds to send
        ctx.advance(3.0)
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.BODY_STALLED
        assert ctx.flows[0].error_detail.startswith("the response body")
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_small_responses_piling_up_for_a_reader_that_stopped_are_body_idle() -> None:
    """A response sent in one write is watched only when the socket does not take it at
    once; then its wait is the response body's, not the origin's."""

    async def small(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n" + b"x" * 60000)
            await writer.drain()

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0})
        origin = await Origin.start(small)
        client = Client(ctx, rcvbuf=4096)
        request = f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        await client.send(request * 400)  # pipelined, and never read
        await until(lambda: client.conn.watch.phase is Phase.RESPONDING, rounds=200_000)
        exchange = client.conn.exchange
        assert exchange is not None
        last = -1
        while exchange._progress() != last:
            last = exchange._progress()
            for _ in range(200):
                await asyncio.sleep(0)
        ctx.advance(3.1)
        ctx.advance(0.1)
        ctx.advance(3.0)
        await until(lambda: any(flow.error for flow in ctx.flows))
        failed = [flow for flow in ctx.flows if flow.error]
        assert [flow.error for flow in failed] == [ErrorKind.BODY_STALLED]
        assert failed[0].error_detail.startswith("the response body")
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_answers_of_the_proxys_own_piling_up_for_a_reader_that_stopped_are_body_idle() -> None:
    """Pipelined requests the proxy answers itself (TRACE with Max-Forwards: 0, each
    echoing a 20 KB head), never read: the wait is the answer's (body_idle, recorded
    ``body_stalled``), not the next head's (it was a 408 for a head "not received")."""

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0, "timeouts.client_header": 10.0})
        client = Client(ctx, rcvbuf=4096)
        request = (
            b"TRACE http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n"
            + b"X-Pad: "
            + b"p" * 20_000
            + b"\r\n\r\n"
        )
        sender = asyncio.ensure_future(client.send(request * 200))  # and never read
        await until(lambda: client.conn.watch.phase is Phase.RESPONDING, rounds=200_000)
        last = -1
        while moved(client.conn.stream) != last:
            last = moved(client.conn.stream)
            for _ in range(200):
                await asyncio.sleep(0)
        ctx.advance(3.1)
        ctx.advance(0.1)
        ctx.advance(3.0)
        await until(lambda: any(flow.error for flow in ctx.flows))
        failed = [flow for flow in ctx.flows if flow.error]
        assert [flow.error for flow in failed] == [ErrorKind.BODY_STALLED]
        assert "stopped reading the proxy's answer" in failed[0].error_detail
        sender.cancel()
        await client.finish()
        ctx.close()

    run(main())


def test_interim_responses_piling_up_for_a_reader_that_stopped_are_body_idle() -> None:
    """An origin sends megabytes of 103 (Early Hints) and falls silent, to a client that
    reads nothing: the relaying is watched as body idleness, and the connection is cut
    (it stayed open past every limit once the head's deadline had gone)."""

    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        hint = b"HTTP/1.1 103 Early Hints\r\nLink: <" + b"l" * 60_000 + b">\r\n\r\n"
        for _ in range(60):
            writer.write(hint)
            await writer.drain()
        await reader.read()

    async def main() -> None:
        ctx = FakeContext(
            **{"timeouts.body_idle": 3.0, "timeouts.upstream_head": 30.0},
            **{"limits.max_header_size": 262_144},
        )
        origin = await Origin.start(hints)
        client = Client(ctx, rcvbuf=4096)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await until(lambda: client.conn.watch.phase is Phase.RESPONDING, rounds=200_000)
        ctx.advance(1.0)
        ctx.advance(3.1)
        ctx.advance(1.0)
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.BODY_STALLED
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


SNDBUF = 4 << 20  # what send-buffer autotuning reaches (tcp_wmem max); the kernel doubles it


async def slow_rounds(
    ctx: FakeContext,
    conn: ClientConnection,
    sock: socket.socket,
    take: Callable[[], Awaitable[None]],
) -> None:
    """The peer behind ``sock`` (a proxy socket with a full send buffer) takes a little
    at a time with ``take``; between two takes the clock moves a second.  Goes on until
    the proxy has handed the kernel nothing for 10 s, body_idle being 3 s."""
    exchange = conn.exchange
    assert exchange is not None
    quiet = 0.0
    while quiet < 10.0:
        before, queued = exchange._progress(), unsent(sock)
        await take()
        await until(lambda queued=queued: unsent(sock) != queued, "the send queue shrinks")
        ctx.advance(1.0)
        assert conn.watch.expired is None
        quiet = quiet + 1.0 if exchange._progress() == before else 0.0


@pytest.mark.parametrize("then", ["reads on", "stops"])
def test_a_slow_reader_behind_a_full_send_buffer_is_cut_only_when_it_stops(then: str) -> None:
    """The client reads a little at a time from a small receive buffer; the proxy's send
    buffer (megabytes) stays unwritable for longer than body_idle, so the proxy hands the
    kernel nothing, yet bytes move on the wire all along: not idle.  A reader that stops
    is cut after body_idle, as before."""
    size = 32 << 20

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size >> 20):
            writer.write(b"x" * (1 << 20))
            await writer.drain()

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0})
        origin = await Origin.start(big)
        client = Client(ctx, rcvbuf=16 << 10)
        proxy_side = client.conn.stream.socket
        proxy_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        loop = asyncio.get_running_loop()
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await until(lambda: client.conn.watch.phase is Phase.RESPONDING)
        await until(client.conn.stream.writing, "the proxy's send buffer is full")
        received = 0

        async def take() -> None:
            nonlocal received
            received += len(await loop.sock_recv(client.sock, 64 << 10))

        await slow_rounds(ctx, client.conn, proxy_side, take)
        if then == "reads on":
            while received < size:
                chunk = await loop.sock_recv(client.sock, 1 << 20)
                assert chunk, f"closed after {received} bytes"
                received += len(chunk)
            await until(lambda: ctx.flows)
            assert ctx.flows[0].error is None and ctx.flows[0].status == 200
        else:
            ctx.advance(1.0)
            ctx.advance(3.0)
            await until(lambda: ctx.flows)
            assert ctx.flows[0].error is ErrorKind.BODY_STALLED
            assert ctx.flows[0].error_detail.startswith("the response body")
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


# -- request bodies ------------------------------------------------------------------------


async def consume(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = (await read_request(reader)).decode("latin-1")
    length = int(head.lower().split("content-length: ")[1].split("\r\n")[0])
    body = await reader.readexactly(length)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(len(body))), len(body))
    )
    await writer.drain()


def test_a_slow_upload_with_short_gaps_goes_through() -> None:
    """20,000 bytes, 1,000 every 0.4 s, body_idle 3 s: no gap exceeds 0.4 s."""

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0, "timeouts.upstream_head": 5.0})
        origin = await Origin.start(consume)
        client = Client(ctx)
        await client.send(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n".encode()
        )
        await until(lambda: client.conn.watch.phase is Phase.SENDING)
        exchange = client.conn.exchange
        assert exchange is not None
        for i in range(20):
            await client.send(b"u" * 1000)
            await until(lambda i=i: exchange.sent.count >= (i + 1) * 1000)
            ctx.advance(0.4)
            assert client.conn.watch.expired is None
        data = await client.until_received(b"20000")
        assert status(data) == 200
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


async def consume_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    body = await reader.readuntil(b"0\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()


def test_chunk_size_lines_are_progress_too() -> None:
    """A chunked upload whose data comes 4 s apart (body_idle 3 s), with a chunk-size
    line between: each piece moves within the limit, so the body is not idle."""

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0, "timeouts.upstream_head": 5.0})
        origin = await Origin.start(consume_chunked)
        client = Client(ctx)
        await client.send(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        await until(lambda: client.conn.watch.phase is Phase.SENDING)
        exchange = client.conn.exchange
        assert exchange is not None
        sent = exchange.sent
        for piece in (b"5\r\n", b"hello\r\n", b"5\r\n", b"world\r\n"):
            moved = sent.count + sent.framing
            await client.send(piece)
            await until(lambda moved=moved: sent.count + sent.framing > moved)
            ctx.advance(1.0)
            ctx.advance(1.0)
            assert client.conn.watch.expired is None
        await client.send(b"0\r\n\r\n")
        data = await client.until_received(b"world")
        assert status(data) == 200 and sent.count == 10
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_client_that_stops_sending_its_body_gets_408() -> None:
    """The client stalls its upload: it is answered 408 (client_timeout), the origin
    is cut, and the connection ends once the client sees the answer."""

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0})
        origin = await Origin.start(consume)
        client = Client(ctx)
        await client.send(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n12345".encode()
        )
        await until(lambda: client.conn.exchange is not None and client.conn.exchange.sent.count)
        idle_past_body_idle(ctx, client.conn)  # the first sweep sees the 5 bytes
        data = await client.response()  # the proxy's end of output follows the answer
        assert status(data) == 408 and b"Connection: close" in data
        assert b"request body: no byte came for timeouts.body_idle" in data
        await client.finish()
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.CLIENT_TIMEOUT
        assert ctx.flows[0].status == 408 and ctx.flows[0].bytes_in == 5
        await origin.close()
        ctx.close()

    run(main())


def test_an_upload_ending_while_the_response_streams_stays_in_responding() -> None:
    """The origin answers before it has read the body; the upload ends while the
    response body is still in transit: the phase stays RESPONDING (body_idle), never
    WAITING again (upstream_head) — phases are distinct, no member is another's alias."""
    rest = asyncio.Event()

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"a" * 100000)
        await writer.drain()
        await reader.readexactly(1000)
        await rest.wait()
        writer.write(b"z" * 100000)
        await writer.drain()

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 60.0, "timeouts.upstream_head": 5.0})
        origin = await Origin.start(early)
        client = Client(ctx)
        await client.send(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode()
        )
        await client.until_received(b"a" * 1000)
        exchange = client.conn.exchange
        assert exchange is not None and exchange.upload is not None
        await client.send(b"u" * 1000)
        await until(lambda: exchange.upload is not None and exchange.upload.done())
        assert client.conn.watch.phase is Phase.RESPONDING
        ctx.advance(6.0)  # past upstream_head: no matter while the body is in transit
        assert client.conn.watch.expired is None
        rest.set()
        data = await client.until_received(b"a" * 1000 + b"z" * 100000)
        assert status(data) == 200
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


@pytest.mark.parametrize("then", ["reads on", "stops"])
def test_an_upload_to_a_slow_origin_reader_is_cut_only_when_it_stops(then: str) -> None:
    """The same for a request body: the origin reads a little at a time from a small
    receive buffer, the proxy's send buffer to it stays full for longer than body_idle."""
    size = 32 << 20
    permits: asyncio.Queue[int] = asyncio.Queue()

    async def slow(listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock, _ = await loop.sock_accept(listener)
        with sock:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await loop.sock_recv(sock, 65536)
            got = len(data.partition(b"\r\n\r\n")[2])
            while got < size:
                allowed = got + await permits.get()  # read that many bytes more
                while got < min(allowed, size):
                    got += len(await loop.sock_recv(sock, min(allowed, size) - got))
            await loop.sock_sendall(
                sock, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(got)), got)
            )

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0})
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)  # accepted ones too
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        origin = asyncio.ensure_future(slow(listener))
        client = Client(ctx)
        await client.send(
            f"POST http://127.0.0.1:{listener.getsockname()[1]}/ HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        await until(lambda: client.conn.watch.phase is Phase.SENDING)
        exchange = client.conn.exchange
        assert exchange is not None and exchange.up is not None
        origin_side = exchange.up.stream.socket
        origin_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        upload = asyncio.ensure_future(loop.sock_sendall(client.sock, b"u" * size))
        await until(exchange.up.stream.writing, "the proxy's send buffer is full")

        async def take() -> None:
            permits.put_nowait(64 << 10)

        await slow_rounds(ctx, client.conn, origin_side, take)
        if then == "reads on":
            permits.put_nowait(size)
            await upload
            data = await client.until_received(b"\r\n\r\n%d" % size)
            assert status(data) == 200
        else:
            ctx.advance(1.0)
            ctx.advance(3.0)
            await until(lambda: ctx.flows)
            assert ctx.flows[0].error is ErrorKind.BODY_STALLED
            assert ctx.flows[0].error_detail.startswith("sending the request body")
            upload.cancel()
        origin.cancel()
        listener.close()
        await client.finish()
        ctx.close()

    run(main())


def test_waiting_for_100_continue_is_the_response_heads_wait_not_body_idleness() -> None:
    """Expect: 100-continue, the origin sends its 100 after longer than body_idle: the
    client is waiting for an answer, so upstream_head bounds the wait (RFC 9110
    §10.1.1); once the body flows, body_idle applies."""
    go = asyncio.Event()

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await go.wait()
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        body = await reader.readexactly(5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        await writer.drain()

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0, "timeouts.upstream_head": 60.0})
        origin = await Origin.start(late)
        client = Client(ctx)
        await client.send(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        await until(lambda: client.conn.watch.phase is Phase.WAITING)
        ctx.advance(2.0)
        ctx.advance(2.0)  # 4 s, body_idle 3 s
        assert client.conn.watch.expired is None
        go.set()
        await client.until_received(b"HTTP/1.1 100 Continue\r\n")
        await client.send(b"hello")
        data = await client.until_received(b"\r\n\r\nhello")
        assert b"HTTP/1.1 200 OK" in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is None
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_an_origin_that_never_sends_100_continue_is_a_504_after_upstream_head() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0, "timeouts.upstream_head": 10.0})
        origin = await Origin.start(silent)
        client = Client(ctx)
        await client.send(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        await until(lambda: client.conn.watch.phase is Phase.WAITING)
        ctx.advance(9.9)
        assert client.conn.watch.expired is None
        ctx.advance(0.2)
        data = await client.until_received(b"request id")
        assert status(data) == 504 and b"Connection: close" in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.READ_TIMEOUT
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_client_that_sends_no_body_after_the_origins_100_continue_gets_408() -> None:
    """The origin said 100 (Continue) and waits: the client's silence is its own, a
    408 after body_idle, not the origin's 504 after upstream_head."""

    async def continues(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        ctx = FakeContext(**{"timeouts.body_idle": 3.0, "timeouts.upstream_head": 30.0})
        origin = await Origin.start(continues)
        client = Client(ctx)
        await client.send(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        await client.until_received(b"100 Continue")
        await until(lambda: client.conn.watch.phase is Phase.SENDING)
        ctx.advance(1.0)
        ctx.advance(1.9)
        assert client.conn.watch.expired is None
        ctx.advance(0.2)
        data = await client.until_received(b"request id")
        assert b" 408 " in data and b"client_timeout" in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.CLIENT_TIMEOUT
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_buffering_addon_answers_100_continue_itself(tmp_path: Path) -> None:
    """An addon reads the body before the origin is asked: the proxy sends the 100 the
    client waits for, and the origin gets no Expect."""
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        seen.append(head)
        body = await reader.readexactly(5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        await writer.drain()

    async def main() -> None:
        ctx = FakeContext(addons(tmp_path, BUFFERING, policy=False), **{"timeouts.body_idle": 3.0})
        origin = await Origin.start(record)
        client = Client(ctx)
        await client.send(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        await client.until_received(b"HTTP/1.1 100 Continue\r\n\r\n")
        await client.send(b"hello")
        data = await client.until_received(b"\r\n\r\nhello")
        assert b"HTTP/1.1 200 OK" in data and data.count(b"100 Continue") == 1
        assert b"expect" not in seen[0].lower()
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_malformed_chunked_body_closes_the_connection() -> None:
    """After a broken body the next request cannot be delimited: 400, then close; the
    origin never sees the bytes that followed."""
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(65536))
        while chunk := await reader.read(65536):
            seen.append(chunk)

    async def main() -> None:
        ctx = FakeContext()
        origin = await Origin.start(record)
        smuggled = f"GET {origin.url}/second HTTP/1.1\r\nHost: x\r\n\r\n"
        for bad in ("4\r\nabcdXX0\r\n\r\n", "0x4\r\nabcd\r\n0\r\n\r\n"):
            client = Client(ctx)
            await client.send(
                f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                f"{bad}{smuggled}".encode()
            )
            data = await client.response()
            assert status(data) == 400 and data.count(b"HTTP/1.1") == 1
            await client.finish()
        assert not any(b"/second" in chunk for chunk in seen)
        await origin.close()
        ctx.close()

    run(main())


def test_a_trailer_section_exactly_at_its_limit_is_refused_not_spun_on() -> None:
    """Trailer lines that fill the section (max_header_size) before its empty line: a
    400 for a request, the connection cut for a response; the proxy goes on serving.
    (The decoder asked for 0 bytes there and the body's reader looped for ever.)"""
    limit = FakeContext().settings.limits.max_header_size
    assert limit % 8 == 0
    trailers = b"X-A: b\r\n" * (limit // 8) + b"\r\n"  # lines end exactly at the limit

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        if b"/trailers" in head:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                + trailers
            )
        else:
            if head.startswith(b"POST"):
                await reader.read(65536)  # some of the request body
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def main() -> None:
        ctx = FakeContext()
        origin = await Origin.start(chunked)
        client = Client(ctx)
        await client.send(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5\r\nhello\r\n0\r\n".encode()
            + trailers
        )
        data = await client.until_received(b"\r\n\r\n")
        assert status(data) in (400, 200)  # refused, or the origin answered first
        await client.finish()
        await until(lambda: len(ctx.flows) >= 1, "the request's record")
        client = Client(ctx)
        await client.send(f"GET {origin.url}/trailers HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await until(lambda: len(ctx.flows) >= 2, "the response's record")
        assert ctx.flows[-1].error is not None
        await client.finish()
        client = Client(ctx)  # and everyone else is still served
        await client.send(f"GET {origin.url}/ok HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status(await client.until_received(b"ok")) == 200
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


# -- responses read leniently ------------------------------------------------------------


def test_a_faulty_response_trailer_section_is_repaired_not_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def trailing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            b"0\r\nX-T : v\r\nX-F: a\r\n b\r\nbogus\r\n\r\n"
        )
        await writer.drain()

    async def main() -> None:
        ctx = FakeContext()
        origin = await Origin.start(trailing)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await client.until_received(b"0\r\nX-T: v\r\nX-F: a b\r\n\r\n")
        assert status(data) == 200 and b"5\r\nhello\r\n" in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is None
        await client.finish()
        await origin.close()
        ctx.close()

    with caplog.at_level("INFO", logger="eyewall.exchange"):
        run(main())
    assert "repaired the response trailers" in caplog.text
    assert "line without a colon dropped" in caplog.text


# -- answers the proxy makes itself ------------------------------------------------------


def test_head_to_a_dead_origin_gets_a_502_head_and_the_connection_goes_on() -> None:
    async def main() -> None:
        ctx = FakeContext()
        origin = await Origin.start(answer)
        dead = await Origin.start(answer)
        dead_url = dead.url
        await dead.close()
        await dead.server.wait_closed()
        client = Client(ctx)
        await client.send(f"HEAD {dead_url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await client.until_received(b"hello")
        first, _, rest = data.partition(b"\r\n\r\n")
        assert status(first) == 502 and b"Content-Length: " in first
        assert rest.startswith(b"HTTP/1.1 200")  # no stray body before the next response
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


# -- addons ------------------------------------------------------------------------------


SLOW_HOOK = """
import asyncio

class Slow:
    async def requestheaders(self, flow):
        await asyncio.Event().wait()  # never returns
"""

BUFFERING = """
class Buffer:
    def requestheaders(self, flow):
        flow.request.buffer(1 << 20)
"""


def addons(tmp_path: Path, source: str, policy: bool, hook_timeout: float = 30.0) -> Addons:
    path = tmp_path / "addon.py"
    path.write_text(source)
    loaded = Addons([] if policy else [str(path)], [str(path)] if policy else [], hook_timeout)
    loaded.load_all()
    return loaded


def test_a_slow_hook_is_never_an_origin_timeout(tmp_path: Path) -> None:
    """The hook outlives upstream_head by far in loop-independent time; only its own
    limit (timeouts.addon_hook, enforced by the runner) ends it."""

    async def main() -> None:
        ctx = FakeContext(
            addons(tmp_path, SLOW_HOOK, policy=True, hook_timeout=0.05),
            **{"timeouts.upstream_head": 1.0, "timeouts.body_idle": 1.0},
        )
        origin = await Origin.start(answer)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await until(lambda: client.conn.watch.phase is Phase.HOOK)
        ctx.advance(100.0)
        assert client.conn.watch.expired is None
        data = await client.until_received(b"request id")
        assert status(data) == 502 and b"addon_failed" in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.ADDON_FAILED
        assert "timed out" in ctx.flows[0].error_detail
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_buffering_addon_with_a_stalled_client_body_gets_408_after_body_idle(
    tmp_path: Path,
) -> None:
    """The client stops sending a body an addon buffers, before the origin is asked:
    after body_idle it is answered 408 (client_timeout), and the connection ends."""

    async def main() -> None:
        ctx = FakeContext(addons(tmp_path, BUFFERING, policy=False), **{"timeouts.body_idle": 3.0})
        origin = await Origin.start(consume)
        client = Client(ctx)
        await client.send(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc".encode()
        )
        await until(lambda: client.conn.watch.phase is Phase.BUFFERING)
        exchange = client.conn.exchange
        assert exchange is not None
        await until(lambda: exchange.buffered.count == 3)  # "abc" was read
        idle_past_body_idle(ctx, client.conn)
        data = await client.response()  # then the proxy's end of output
        assert status(data) == 408 and b"request body: no byte came" in data
        await client.finish()
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.CLIENT_TIMEOUT and ctx.flows[0].status == 408
        await origin.close()
        ctx.close()

    run(main())


BUFFER_RESPONSE = """
class Buffer:
    def responseheaders(self, flow):
        flow.response.buffer(1 << 20)
"""


def test_an_origin_that_stalls_a_body_an_addon_buffers_is_a_504(tmp_path: Path) -> None:
    """Nothing went to the client yet: it gets an answer (504, body_stalled), not a
    closed connection."""

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        await reader.read()  # until the proxy gives up on it

    async def main() -> None:
        ctx = FakeContext(
            addons(tmp_path, BUFFER_RESPONSE, policy=False), **{"timeouts.body_idle": 3.0}
        )
        origin = await Origin.start(stalls)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await until(lambda: client.conn.watch.phase is Phase.BUFFERING)
        exchange = client.conn.exchange
        assert exchange is not None
        await until(lambda: exchange.buffered.count == 7)
        idle_past_body_idle(ctx, client.conn)
        data = await client.until_received(b"took too long")
        assert status(data) == 504 and b"body_stalled" in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.BODY_STALLED and ctx.flows[0].status == 504
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


STATUS_CHANGE = """
class Change:
    def responseheaders(self, flow):
        if flow.request.headers.get("x-buffer"):
            flow.response.buffer(1 << 20)
        elif flow.request.headers.get("x-to"):
            flow.response.status = int(flow.request.headers.get("x-to"))

    def response(self, flow):
        if flow.request.headers.get("x-buffer") and flow.request.headers.get("x-to"):
            flow.response.status = int(flow.request.headers.get("x-to"))
"""

ORIGIN_BODIES = {
    "length": b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n"
    ),
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
}


def answering(
    response: bytes,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            writer.write(ORIGIN_BODIES["length"] if b"/next" in head else response)
            await writer.drain()

    return handler


@pytest.mark.parametrize("to", [204, 304])
@pytest.mark.parametrize("hook", ["responseheaders", "response"])
@pytest.mark.parametrize("body", ["length", "chunked"])
def test_an_addon_made_204_or_304_goes_out_bodiless_and_the_connection_stays_in_step(
    tmp_path: Path, to: int, hook: str, body: str
) -> None:
    """RFC 9110 §6.4.1, §15.3.5, §15.4.5: no content and no field framing one; the
    origin's body is dropped (read whole for a buffering addon, else with its
    connection), so the next response on the client connection starts right after."""

    async def main() -> None:
        ctx = FakeContext(addons(tmp_path, STATUS_CHANGE, policy=False))
        origin = await Origin.start(answering(ORIGIN_BODIES[body]))
        client = Client(ctx)
        buffer = "X-Buffer: 1\r\n" if hook == "response" else ""
        await client.send(
            f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\nX-To: {to}\r\n{buffer}\r\n"
            f"GET {origin.url}/next HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        data = await client.until_received(b"hello world")
        first, _, rest = data.partition(b"\r\n\r\n")
        assert status(first) == to
        phrase = {204: b"No Content", 304: b"Not Modified"}[to]
        assert first.startswith(b"HTTP/1.1 %d %s\r\n" % (to, phrase))  # not "204 OK"
        assert b"Content-Length" not in first and b"Transfer-Encoding" not in first
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b"\r\n\r\nhello world")
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_an_addon_made_200_from_a_204_gets_an_empty_delimited_body(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = FakeContext(addons(tmp_path, STATUS_CHANGE, policy=False))
        origin = await Origin.start(answering(ORIGIN_BODIES["204"]))
        client = Client(ctx)
        await client.send(
            f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\nX-To: 200\r\n\r\n"
            f"GET {origin.url}/next HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        data = await client.until_received(b"hello world")
        first, _, rest = data.partition(b"\r\n\r\n")
        assert status(first) == 200 and b"Content-Length: 0" in first
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_head_too_large_for_a_head_request_gets_a_431_without_a_body() -> None:
    async def main() -> None:
        ctx = FakeContext(**{"limits.max_header_size": 4096})
        client = Client(ctx)
        await client.send(b"HEAD http://example.com/ HTTP/1.1\r\nX: " + b"a" * 5000 + b"\r\n\r\n")
        data = await client.response()  # then the connection closes
        assert status(data) == 431 and data.endswith(b"\r\n\r\n")
        assert b"Content-Length: " in data and b"Connection: close" in data
        await client.finish()
        ctx.close()

    run(main())


@pytest.mark.parametrize(
    ("request_head", "expected"),
    [
        (b"HEAD http://example.com/big HTTP/1.1\r\nX: " + b"a" * 5000 + b"\r\n\r\n", 431),
        (b"GET http://example.com/bad HTTP/1.1\r\nBad Field: x\r\n\r\n", 400),
        (b"GET http://example.com/v3 HTTP/3.0\r\n\r\n", 505),
    ],
)
def test_the_record_of_a_head_that_could_not_be_parsed_keeps_its_request_line(
    request_head: bytes, expected: int
) -> None:
    """The access line and the flow say what was asked, as far as the head says it."""

    async def main() -> None:
        ctx = FakeContext(**{"limits.max_header_size": 4096})
        client = Client(ctx)
        await client.send(request_head)
        assert status(await client.response()) == expected
        await client.finish()
        await until(lambda: ctx.flows)
        flow = ctx.flows[0]
        method, _, rest = request_head.decode().partition(" ")
        assert (flow.status, flow.method, flow.url) == (expected, method, rest.split(" ")[0])
        if expected == 431:  # the page names the setting to raise
            assert flow.error_detail.endswith("(limits.max_header_size)")
        ctx.close()

    run(main())


def test_a_bug_costs_one_exchange_and_its_500_follows_the_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(self: Exchange) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Exchange, "run", broken)

    async def main() -> None:
        ctx = FakeContext()
        for method, body in (("HEAD", False), ("GET", True)):
            client = Client(ctx)
            await client.send(f"{method} http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await client.response()
            assert status(data) == 500 and b"Connection: close" in data
            assert data.endswith(b"\r\n\r\n") is not body
            await client.finish()
        ctx.close()

    run(main())


# -- reload ------------------------------------------------------------------------------


def test_a_reload_keeps_rate_limits() -> None:
    async def main() -> None:
        limits = {"rate_limits.client_rps": 1, "rate_limits.client_burst": 1}
        ctx = FakeContext(**limits)
        origin = await Origin.start(answer)
        first = Client(ctx)
        await first.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await first.until_received(b"hello")
        ctx.policy = build_policy(load_settings(overrides={**DEFAULTS, **limits}))  # a reload
        second = Client(ctx)
        await second.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await second.until_received(b"request id")
        assert status(data) == 429 and b"Retry-After: 1" in data
        for c in (first, second):
            await c.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_cut_exchange_on_a_reused_connection_is_answered_not_sent_again() -> None:
    """The proxy's stop closing a pooled connection is no stale connection: the request
    is not sent again on a new one; its client gets the 502 saying why."""
    seen: list[bytes] = []

    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            if len(seen) == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                await writer.drain()

    async def main() -> None:
        ctx = FakeContext()
        origin = await Origin.start(first_only)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await client.until_received(b"hello")
        client.received = b""
        await client.send(f"GET {origin.url}/b HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await until(lambda: len(seen) == 2)
        exchange = client.conn.exchange
        assert exchange is not None and exchange.up is not None and exchange.up.uses == 1
        assert exchange.abort("the proxy stopped at its drain deadline")
        data = await client.until_received(b"drain deadline")
        assert status(data) == 502
        await until(lambda: len(ctx.flows) == 2)
        assert ctx.flows[1].error is ErrorKind.CONNECTION_TERMINATED
        assert len(seen) == 2  # not sent a second time
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())
