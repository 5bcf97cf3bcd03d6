"""What eyewall/proxy/streams.py relies on in Tornado's IOStream, pinned so an upgrade
that changes it fails here rather than losing bytes in production."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys

import pytest
import trustme
from tornado.iostream import IOStream, StreamClosedError

from eyewall.proxy.streams import (
    HEAD_END,
    BoundedStream,
    TLSStream,
    buffered_size,
    complete,
    read_block,
    read_buffered,
    read_head,
    start_tls,
    take_over,
    unsent,
)
from tests.tlspeer import TLSPeer


def run(coro):
    return asyncio.run(coro)


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def test_a_delimited_read_past_the_limit_returns_the_limit_instead_of_closing():
    async def main() -> None:
        a, b = pair()
        stream = BoundedStream(a)
        b.sendall(b"x" * 5000)
        data = await read_block(stream, HEAD_END, 1000)
        assert len(data) == 1000 and not complete(data)
        assert not stream.closed()
        b.sendall(b"\r\n\r\n")
        rest = await read_block(stream, HEAD_END, 10_000)
        assert rest.endswith(b"\r\n\r\n") and len(rest) == 4004
        stream.close()
        b.close()

    run(main())


class CountingSocket(socket.socket):
    """A socket that counts its receives."""

    receives = 0

    def recv_into(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.receives += 1
        return super().recv_into(*args, **kwargs)


def test_a_read_on_a_watched_socket_waits_instead_of_trying_the_socket_first():
    """Once the loop watches the socket, a read starts without a receive that would
    find nothing (IOStream tries one first: a system call per head); bytes that come
    later, or that are in the kernel already when the read starts, are read."""

    async def main() -> None:
        raw, b = socket.socketpair()
        a = CountingSocket(raw.family, raw.type, fileno=raw.detach())
        a.setblocking(False)
        stream = BoundedStream(a)
        first = stream.read_bytes(100, partial=True)  # nothing yet: the loop watches now
        b.sendall(b"first")
        assert await first == b"first"
        before = a.receives
        second = stream.read_bytes(100, partial=True)
        assert a.receives == before  # no receive tried: nothing has come
        b.sendall(b"second")
        assert await second == b"second"
        assert a.receives == before + 1
        b.sendall(b"third")  # in the kernel before the read starts (a Unix socket pair)
        assert await stream.read_bytes(100, partial=True) == b"third"
        stream.close()
        b.close()

    run(main())


def test_take_over_returns_the_bytes_read_ahead():
    async def main() -> None:
        a, b = pair()
        stream = BoundedStream(a)
        b.sendall(b"CONNECT h:443 HTTP/1.1\r\n\r\nearly bytes")
        head = await read_block(stream, HEAD_END, 1000)
        assert head.endswith(b"\r\n\r\n")
        assert buffered_size(stream) == len(b"early bytes")
        sock, early, tls = take_over(stream)
        assert early == b"early bytes" and tls is None and stream.closed()
        b.sendall(b"more")
        sock.settimeout(5)  # blocking: recv waits for the bytes
        assert sock.recv(10) == b"more"  # the socket still works after the take-over
        sock.close()
        b.close()

    run(main())


def test_read_head_puts_back_what_follows_and_read_buffered_takes_it():
    async def main() -> None:
        a, b = pair()
        stream = BoundedStream(a)
        b.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 204 \r\n\r\n")
        head = await read_head(stream, 1000)
        assert head == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        assert read_buffered(stream, 5) == b"hello"
        assert read_buffered(stream, 100) is None  # not that much buffered
        assert await read_head(stream, 1000) == b"HTTP/1.1 204 \r\n\r\n"
        b.sendall(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 3000)
        too_long = await read_head(stream, 1000)
        assert len(too_long) == 1000 and not complete(too_long)
        stream.close()
        b.close()

    run(main())


def test_a_head_split_across_reads_is_joined():
    async def main() -> None:
        a, b = pair()
        stream = BoundedStream(a)

        async def trickle() -> None:
            for piece in (b"HTTP/1.1 200 OK\r", b"\nA: b\r\n", b"\r", b"\nbody"):
                b.sendall(piece)
                await asyncio.sleep(0.01)  # the input's pace: one piece per read

        task = asyncio.ensure_future(trickle())
        head = await read_head(stream, 1000)
        await task
        assert head == b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"
        assert await stream.read_bytes(4) == b"body"
        stream.close()
        b.close()

    run(main())


@pytest.mark.parametrize("cls", [IOStream, BoundedStream])
def test_writes_complete_and_keep_their_order(cls):
    async def main() -> None:
        a, b = pair()
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stream = cls(a)
        big = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once
        first = stream.write(b"start:")
        second = stream.write(big)
        third = stream.write(b":end")
        received = b""
        loop = asyncio.get_running_loop()
        b.setblocking(False)
        while len(received) < len(big) + 10:
            received += await loop.sock_recv(b, 1 << 16)
        await asyncio.gather(first, second, third)
        assert received == b"start:" + big + b":end"
        stream.close()
        b.close()

    run(main())


@pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ is Linux's")
def test_unsent_follows_the_kernel_send_queue_as_the_peer_reads():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        reader.connect(listener.getsockname())
        writer, _ = listener.accept()
    with reader, writer:
        writer.setblocking(False)
        try:
            while True:
                writer.send(b"x" * 65536)
        except BlockingIOError:
            pass  # the send buffer is full
        full = unsent(writer)
        assert full > 0
        reader.recv(65536)
        while unsent(writer) == full:  # the peer's window update arrives
            reader.recv(65536)
        assert unsent(writer) < full
    assert unsent(writer) == 0  # closed
    assert unsent(None) == 0


# -- TLSStream: TLS through memory buffers, TLS inside TLS ---------------------------------


@pytest.fixture(scope="module")
def contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for "localhost"."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def serve_tls(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], depth: int = 1, first: bytes = b""
) -> tuple[TLSStream, TLSPeer]:
    """A TLSStream (server) and a TLSPeer (client, in a thread) over a socket pair,
    ``depth`` TLS connections deep; the client sends ``first`` with its last flight."""
    server_ctx, client_ctx = contexts
    a, b = pair()
    b.settimeout(10)

    def client() -> TLSPeer:
        peer: socket.socket | TLSPeer = b
        for level in range(depth):
            extra = first if level == depth - 1 else b""
            peer = TLSPeer(peer, client_ctx, "localhost", first=extra)
        assert isinstance(peer, TLSPeer)
        return peer

    peer = asyncio.get_running_loop().run_in_executor(None, client)
    stream: IOStream = BoundedStream(a)
    for _ in range(depth):
        stream = await start_tls(stream, server_ctx, server_side=True)
    assert isinstance(stream, TLSStream)
    return stream, await peer


@pytest.mark.parametrize("depth", [1, 2])
def test_tls_streams_carry_bytes_both_ways_in_order(contexts, depth):
    async def main() -> None:
        stream, peer = await serve_tls(contexts, depth, first=b"GET / HTTP/1.1\r\n\r\n")
        # what came with the handshake's last flight is there at once
        assert await stream.read_bytes(18) == b"GET / HTTP/1.1\r\n\r\n"
        big = bytes(range(256)) * 4096  # 1 MiB: many records, more than the socket takes
        writes = [stream.write(b"start:"), stream.write(big), stream.write(b":end")]
        loop = asyncio.get_running_loop()
        got = b""
        while len(got) < len(big) + 10:
            got += await loop.run_in_executor(None, peer.recv)
        await asyncio.gather(*writes)
        assert got == b"start:" + big + b":end"
        upload = os.urandom(300_000)
        sent = loop.run_in_executor(None, peer.sendall, upload)
        buffer = bytearray(len(upload))  # read_into, as bodies are copied
        assert await stream.read_into(buffer) == len(upload)
        await sent
        assert buffer == upload
        stream.close()
        peer.socket.close()

    run(main())


def test_a_tls_read_takes_decrypted_bytes_waiting_with_the_socket_quiet(contexts):
    """Decrypted bytes left from earlier records wake no event on the socket: a read on a
    watched TLS stream must take them at once (the plain stream's wait-first shortcut
    would wait for bytes that never come)."""

    async def main() -> None:
        stream, peer = await serve_tls(contexts)
        first = stream.read_bytes(100, partial=True)  # nothing yet: the loop watches now
        await asyncio.get_running_loop().run_in_executor(None, peer.sendall, b"first")
        assert await first == b"first"
        stream._plain += b"left over"  # as when one receive decrypts more than a read takes
        read = stream.read_bytes(100, partial=True)
        assert read.done() and read.result() == b"left over"
        stream.close()
        peer.socket.close()

    run(main())


def test_take_over_of_a_tls_stream_gives_the_decrypted_bytes_and_the_tls_stack(contexts):
    async def main() -> None:
        stream, peer = await serve_tls(contexts, first=b"HEAD\r\n\r\nearly")
        assert await read_head(stream, 1000) == b"HEAD\r\n\r\n"
        sock, early, tls = take_over(stream)
        assert early == b"early" and tls is not None and stream.closed()
        tls.send(b"still TLS")
        sock.sendall(tls.outgoing)
        assert await asyncio.get_running_loop().run_in_executor(None, peer.recv) == b"still TLS"
        sock.close()
        peer.socket.close()

    run(main())


def test_bytes_that_are_not_tls_close_the_stream_with_the_error(contexts):
    async def main() -> None:
        stream, peer = await serve_tls(contexts)
        peer.socket.sendall(b"\x17\x03\x03\x00\x05hello")  # a record that does not decrypt
        with pytest.raises(StreamClosedError) as caught:
            await stream.read_bytes(1)
        assert isinstance(caught.value.real_error, ssl.SSLError)
        peer.socket.close()

    run(main())


def test_a_failed_handshake_sends_the_alert_and_spends_the_stream(contexts):
    async def main() -> None:
        a, b = pair()
        b.settimeout(10)
        untrusting = ssl.create_default_context()  # does not know the test CA
        peer = asyncio.get_running_loop().run_in_executor(
            None, lambda: TLSPeer(b, untrusting, "localhost")
        )
        stream = BoundedStream(a)
        with pytest.raises(ssl.SSLError) as caught:
            await start_tls(stream, contexts[0], server_side=True)
        assert caught.value.reason == "TLSV1_ALERT_UNKNOWN_CA"  # the client's alert
        assert stream.closed()
        with pytest.raises(ssl.SSLCertVerificationError):
            await peer
        b.close()

    run(main())
