"""The tunnel relay in-process, over socket pairs, with splice and with the portable
copy path: byte integrity, early bytes, half-close, backpressure, errors."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
import trustme

from eyewall.proxy.streams import BoundedStream, start_tls, take_over, unsent
from eyewall.proxy.tunnel import PipePool, Tunnel
from eyewall.tls.layers import TLSStack
from tests.origins import pattern
from tests.tlspeer import TLSPeer

MODES = ["splice", "copy"]


class Ends:
    """Two socket pairs around a tunnel: the test holds ``client`` and ``origin``."""

    def __init__(self, mode: str, idle: float = 60.0, **kwargs: bytes) -> None:
        self.client, proxy_client = socket.socketpair()
        self.origin, proxy_origin = socket.socketpair()
        for s in (self.client, self.origin, proxy_client, proxy_origin):
            s.setblocking(False)
        self.closed: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )
        self.pipes = PipePool()
        self.tunnel = Tunnel(
            proxy_client,
            proxy_origin,
            self.pipes,
            idle,
            on_close=lambda t, e: self.closed.set_result(e),
            **kwargs,
        )
        if mode == "copy":
            self.tunnel.splice = False
        self.tunnel.start()

    def close(self) -> None:
        self.tunnel.close()
        self.client.close()
        self.origin.close()
        self.pipes.close()


async def writable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` becomes writable within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_writer(sock, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_writer(sock)
    return True


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def recv_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while chunk := await loop.sock_recv(sock, 1 << 20):
        data += chunk
    return data


@pytest.mark.parametrize("mode", MODES)
def test_bytes_flow_both_ways_with_half_close(mode):
    async def run() -> None:
        loop = asyncio.get_running_loop()
        ends = Ends(mode, to_client=b"HELLO ", to_upstream=b"early ")
        payload = pattern(5_000_000)
        send = asyncio.ensure_future(loop.sock_sendall(ends.client, payload))
        got = await recv_exactly(ends.origin, len(payload) + 6)
        await send
        assert got == b"early " + payload
        ends.client.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(ends.origin, 10) == b""  # EOF passed on
        await loop.sock_sendall(ends.origin, b"reply after EOF")
        ends.origin.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(ends.client) == b"HELLO reply after EOF"
        assert await asyncio.wait_for(ends.closed, 5) is None
        assert ends.tunnel.bytes_up == len(payload) + 6
        assert ends.tunnel.bytes_down == len("reply after EOF")
        ends.close()

    asyncio.run(run())


@pytest.mark.parametrize("mode", MODES)
def test_a_reader_that_stops_stops_the_writer(mode):
    """Backpressure: with the origin not reading, the tunnel stops reading the client."""

    async def run() -> None:
        ends = Ends(mode)
        ends.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        sent = 0
        block = pattern(1 << 16)
        for _ in range(2000):  # up to 128 MiB, far more than any buffer on the way
            try:
                sent += ends.client.send(block)
            except BlockingIOError:
                # Room comes back only if the tunnel reads on: wait for it, a while.
                if not await writable(ends.client, 0.5):
                    break
        assert sent < 64 << 20, "the tunnel kept reading though nobody drained it"
        got = await recv_exactly(ends.origin, sent)
        assert got == (block * (sent // len(block) + 1))[:sent]
        ends.close()

    asyncio.run(run())


@pytest.mark.parametrize("mode", MODES)
def test_reset_from_one_side_closes_both(mode):
    async def run() -> None:
        ends = Ends(mode)
        ends.origin.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await asyncio.get_running_loop().sock_sendall(ends.client, b"x" * 1000)
        ends.origin.close()
        assert await recv_to_eof(ends.client) == b""
        await asyncio.wait_for(ends.closed, 5)
        ends.close()

    asyncio.run(run())


def test_idle_check_closes_a_quiet_tunnel():
    async def run() -> None:
        ends = Ends("splice", idle=10.0)
        t = ends.tunnel
        t.check(100.0)  # activity since start: resets the clock
        t.check(105.0)
        assert not ends.closed.done()
        t.check(110.5)
        error = await asyncio.wait_for(ends.closed, 1)
        assert isinstance(error, TimeoutError)
        ends.close()

    asyncio.run(run())


@pytest.mark.parametrize("then", ["reads on", "stops"])
def test_a_slow_reader_behind_a_full_send_buffer_keeps_the_tunnel(then):
    """The client reads a little at a time from a small receive buffer while the
    tunnel's send buffer to it (megabytes) stays full: the pumps read nothing for
    longer than the idle limit, yet bytes move on the wire; one that stops is cut."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
            client.connect(listener.getsockname())
            proxy_client, _ = listener.accept()
        proxy_client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        origin, proxy_origin = socket.socketpair()
        for s in (client, origin, proxy_client, proxy_origin):
            s.setblocking(False)
        closed: asyncio.Future[BaseException | None] = loop.create_future()
        pipes = PipePool()
        tunnel = Tunnel(
            proxy_client, proxy_origin, pipes, 3.0, on_close=lambda t, e: closed.set_result(e)
        )
        tunnel.start()
        sending = asyncio.ensure_future(loop.sock_sendall(origin, b"d" * (32 << 20)))
        counted = -1
        while tunnel.bytes_down != counted:  # until the pumps can move no more
            counted = tunnel.bytes_down
            await until_stable(lambda: unsent(proxy_client))
        now, quiet = 0.0, 0.0
        while quiet < 10.0:  # 10 s without a byte read by the pumps, the limit 3 s
            before, queued = tunnel.bytes_down, unsent(proxy_client)
            await loop.sock_recv(client, 64 << 10)
            while unsent(proxy_client) == queued:
                await asyncio.sleep(0)
            now += 1.0
            tunnel.check(now)
            assert not closed.done()
            quiet = quiet + 1.0 if tunnel.bytes_down == before else 0.0
        if then == "stops":
            tunnel.check(now + 1.0)
            tunnel.check(now + 4.0)
            assert isinstance(await asyncio.wait_for(closed, 5), TimeoutError)
        else:
            assert not closed.done()
            tunnel.close()
        sending.cancel()
        for s in (client, origin):
            s.close()
        pipes.close()

    asyncio.run(run())


async def until_stable(value, rounds: int = 200) -> None:
    """Yield to the loop until ``value()`` stays the same for ``rounds`` turns."""
    last, same = value(), 0
    while same < rounds:
        await asyncio.sleep(0)
        now = value()
        same = same + 1 if now == last else 0
        last = now


# -- TLS on either side (a WebSocket inside an intercepted tunnel, an https:// origin,
# -- the HTTPS proxy listener): bytes pass through Python, half-close is close_notify ---


async def tls_pair(ca: trustme.CA) -> tuple[TLSPeer, socket.socket, TLSStack]:
    """(the test's end, a TLS client; the proxy's end, a socket and its TLS stack as the
    server) of a TLS connection over a socket pair, handshake done."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    client = loop.run_in_executor(None, lambda: TLSPeer(ours, client_ctx, "localhost"))
    stream = await start_tls(BoundedStream(theirs), server_ctx, server_side=True)
    sock, early, tls = take_over(stream)
    assert early == b"" and tls is not None
    return await client, sock, tls


class PlainPeer:
    """The test's end of a plain socket pair, with TLSPeer's half-close spelling."""

    def __init__(self, sock: socket.socket) -> None:
        self.transport = sock
        sock.settimeout(10)
        self.sendall, self.recv = sock.sendall, sock.recv

    def close_notify(self) -> None:
        self.transport.shutdown(socket.SHUT_WR)


async def plain_pair() -> tuple[PlainPeer, socket.socket, None]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    return PlainPeer(ours), theirs, None


@pytest.mark.parametrize("tls_side", ["client", "origin", "both"])
def test_tls_sides_relay_both_ways_with_half_close(tls_side, ca):
    async def run() -> None:
        loop = asyncio.get_running_loop()
        client, proxy_client, client_tls = await (
            tls_pair(ca) if tls_side in ("client", "both") else plain_pair()
        )
        origin, proxy_origin, origin_tls = await (
            tls_pair(ca) if tls_side in ("origin", "both") else plain_pair()
        )
        closed: asyncio.Future[BaseException | None] = loop.create_future()
        pipes = PipePool()
        tunnel = Tunnel(
            proxy_client,
            proxy_origin,
            pipes,
            60.0,
            to_client=b"HELLO ",
            on_close=lambda t, e: closed.set_result(e),
            client_tls=client_tls,
            upstream_tls=origin_tls,
        )
        tunnel.start()
        payload = pattern(3_000_000)

        def recv_until_eof(peer: TLSPeer | PlainPeer, data: bytes = b"") -> bytes:
            while chunk := peer.recv(1 << 20):
                data += chunk
            return data

        def client_side() -> bytes:
            hello = b""
            while len(hello) < 6:
                hello += client.recv(6 - len(hello))
            client.sendall(payload)
            client.close_notify()
            return recv_until_eof(client, hello)

        def origin_side() -> bytes:
            got = recv_until_eof(origin)  # until the client's end of input
            origin.sendall(b"reply after EOF")
            origin.close_notify()
            return got

        from_origin = loop.run_in_executor(None, origin_side)
        from_client = loop.run_in_executor(None, client_side)
        assert await asyncio.wait_for(from_origin, 20) == payload
        assert await asyncio.wait_for(from_client, 20) == b"HELLO reply after EOF"
        assert await asyncio.wait_for(closed, 10) is None
        assert (tunnel.bytes_up, tunnel.bytes_down) == (len(payload), 15)  # to_client: ours
        for peer in (client, origin):
            peer.transport.close()
        pipes.close()

    asyncio.run(run())


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking TCP sockets on loopback (a reset needs TCP)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


@pytest.mark.parametrize("mode", MODES)
def test_an_origin_that_answered_and_closed_ends_the_tunnel_without_an_error(mode):
    """The origin sends its last bytes and closes; the client then sends more (a TLS
    close_notify) and its FIN.  Those bytes meet a closed socket (a reset, then
    ENOTCONN on shutdown), as they would on a direct connection: an ordinary end, not
    'origin ended the tunnel'."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        client, proxy_client = tcp_pair()
        origin, proxy_origin = tcp_pair()
        closed: asyncio.Future[BaseException | None] = loop.create_future()
        pipes = PipePool()
        tunnel = Tunnel(
            proxy_client, proxy_origin, pipes, 60.0, on_close=lambda t, e: closed.set_result(e)
        )
        if mode == "copy":
            tunnel.splice = False
        tunnel.start()
        await loop.sock_sendall(origin, b"last words")
        origin.close()  # a full close: what arrives later is answered with a reset
        assert await recv_to_eof(client) == b"last words"
        await loop.sock_sendall(client, b"close_notify")
        client.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(closed, 5) is None
        assert tunnel.failed_side == ""
        client.close()
        pipes.close()

    asyncio.run(run())
