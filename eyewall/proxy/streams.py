"""IOStream helpers: bounded reads of delimited blocks, and taking a socket over.

Everything here that reaches into IOStream's private state lives in this module alone
(`BoundedStream`, `buffered_size`, `take_over`); `tests/test_streams.py` pins the
behaviour, so a Tornado upgrade that changes it fails loudly instead of losing bytes.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Awaitable

from tornado.iostream import IOStream, StreamClosedError

__all__ = [
    "HEAD_END",
    "LINE_END",
    "TRAILERS_END",
    "BoundedStream",
    "buffered_size",
    "complete",
    "lingering_close",
    "read_block",
    "take_over",
]


HEAD_END = re.compile(rb"\n\r?\n")  # the empty line that ends a head (CRLF or bare LF)
TRAILERS_END = re.compile(rb"\A\r?\n|\n\r?\n")  # also an empty section
LINE_END = re.compile(rb"\n")


class _Overflow(Exception):
    pass


class BoundedStream(IOStream):
    """An IOStream whose delimited reads stop at ``max_bytes`` instead of closing.

    Tornado closes a stream whose ``read_until*`` finds no delimiter within
    ``max_bytes``, which leaves no way to answer 431 or 414.  Here such a read returns
    the first ``max_bytes`` bytes instead; `complete` tells the two outcomes apart.
    """

    def _check_max_bytes(self, delimiter: object, size: int) -> None:
        if self._read_max_bytes is not None and size > self._read_max_bytes:  # type: ignore[attr-defined]
            raise _Overflow

    def _find_read_pos(self) -> int | None:
        try:
            return super()._find_read_pos()  # type: ignore[misc,no-any-return]
        except _Overflow:
            return self._read_max_bytes  # type: ignore[attr-defined,no-any-return]


def complete(block: bytes) -> bool:
    """Whether a bounded read found its delimiter (all our delimiters end in LF)."""
    return block.endswith(b"\n")


def read_block(stream: IOStream, pattern: re.Pattern[bytes], limit: int) -> Awaitable[bytes]:
    """Read through ``pattern``, or ``limit`` bytes if it does not occur within them
    (on a `BoundedStream`)."""
    return stream.read_until_regex(pattern, max_bytes=limit)


def buffered_size(stream: IOStream) -> int:
    """Bytes the stream has read from its socket that nobody has consumed yet."""
    return stream._read_buffer_size  # type: ignore[attr-defined,no-any-return]


def take_over(stream: IOStream) -> tuple[socket.socket, bytes]:
    """Detach the socket from ``stream`` along with the bytes already buffered.

    IOStream reads ahead, so bytes the peer sent after the last consumed message may be
    in its buffer; they are returned and must be relayed before anything read from the
    socket.  No read may be pending on the stream.
    """
    n = stream._read_buffer_size  # type: ignore[attr-defined]
    early = bytes(stream._read_buffer[:n]) if n else b""  # type: ignore[attr-defined]
    if stream.closed() or stream.socket is None:
        raise StreamClosedError()
    sock = stream.socket.dup()
    stream.close()
    sock.setblocking(False)
    return sock, early


async def lingering_close(stream: IOStream, seconds: float = 2.0, limit: int = 1 << 20) -> None:
    """Close after the last write without resetting it away.

    Closing a socket with unread input makes the kernel send RST, which can destroy the
    error response still in flight.  Half-close, discard what the client still sends
    (up to ``limit`` bytes or ``seconds``), then close.
    """
    if stream.closed():
        return
    loop_time = stream.io_loop.time
    deadline = loop_time() + seconds
    handle = stream.io_loop.call_at(deadline, stream.close)
    try:
        if stream.socket is not None:
            stream.socket.shutdown(socket.SHUT_WR)
        while limit > 0:
            limit -= len(await stream.read_bytes(65536, partial=True))
    except (StreamClosedError, OSError):
        pass
    finally:
        stream.io_loop.remove_timeout(handle)
        stream.close()
