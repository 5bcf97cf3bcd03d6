"""What eyewall/proxy/streams.py relies on in Tornado's IOStream, pinned so an upgrade
that changes it fails here rather than losing bytes in production."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest
from tornado.iostream import IOStream

from eyewall.proxy.streams import (
    HEAD_END,
    BoundedStream,
    buffered_size,
    complete,
    read_block,
    read_buffered,
    read_head,
    take_over,
    unsent,
)


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


def test_take_over_returns_the_bytes_read_ahead():
    async def main() -> None:
        a, b = pair()
        stream = BoundedStream(a)
        b.sendall(b"CONNECT h:443 HTTP/1.1\r\n\r\nearly bytes")
        head = await read_block(stream, HEAD_END, 1000)
        assert head.endswith(b"\r\n\r\n")
        assert buffered_size(stream) == len(b"early bytes")
        sock, early = take_over(stream)
        assert early == b"early bytes" and stream.closed()
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
