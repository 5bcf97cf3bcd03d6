"""IOStream helpers: bounded reads of delimited blocks, TLS through memory, and taking
a socket over.

Everything here that reaches into IOStream's private state lives in this module alone
(`BoundedStream`, `TLSStream`, `buffered_size`, `take_over`); `tests/test_streams.py`
pins the behaviour, so a Tornado upgrade that changes it fails loudly instead of losing
bytes.
"""

from __future__ import annotations

import re
import socket
import ssl
import sys
from collections.abc import Awaitable

from tornado.concurrent import Future
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from eyewall.tls.layers import TLSLayer, TLSStack

__all__ = [
    "HEAD_END",
    "LINE_END",
    "STREAM_BUFFER",
    "STREAM_CHUNK",
    "TRAILERS_END",
    "BoundedStream",
    "TLSStream",
    "buffered_size",
    "complete",
    "end_output",
    "lingering_close",
    "moved",
    "peer_gone",
    "read_block",
    "read_buffered",
    "read_head",
    "start_tls",
    "take_over",
    "unread",
    "unsent",
]


if sys.platform == "linux":
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ  # SIOCOUTQ for sockets
else:
    _OUTQ = None

STREAM_BUFFER = 8 << 20  # the most a stream may hold unread (IOStream's max_buffer_size)
STREAM_CHUNK = 64 << 10  # plaintext sealed into records at a time; handshake reads
HEAD_END = re.compile(rb"\n\r?\n")  # the empty line that ends a head (CRLF or bare LF)
TRAILERS_END = re.compile(rb"\A\r?\n|\n\r?\n")  # also an empty section
LINE_END = re.compile(rb"\n")


class _Overflow(Exception):
    pass


_SCRATCH = bytearray(64 << 10)  # one receive buffer for every stream (one thread reads)
_SCRATCH_VIEW = memoryview(_SCRATCH)


class BoundedStream(IOStream):
    """The IOStream the proxy uses for plain TCP connections.

    * Delimited reads stop at ``max_bytes`` instead of closing the stream: Tornado
      closes a stream whose ``read_until*`` finds no delimiter within ``max_bytes``,
      which leaves no way to answer 431 or 414.  Here such a read returns the first
      ``max_bytes`` bytes; `complete` tells the two outcomes apart.
    * Cheaper per-request bookkeeping on the hot path: a write that the socket takes
      whole skips the future and buffer machinery; bytes already buffered can be taken
      synchronously (`read_buffered`, for any stream); reads go through one shared buffer
      instead of a fresh 64 KiB allocation each time; a read on a socket the event loop
      already watches waits for it instead of trying the socket first.
    """

    _written: Future[None] | None = None

    def _check_max_bytes(self, delimiter: object, size: int) -> None:
        if self._read_max_bytes is not None and size > self._read_max_bytes:
            raise _Overflow

    def _find_read_pos(self) -> int | None:
        try:
            return super()._find_read_pos()
        except _Overflow:
            return self._read_max_bytes

    def write(self, data: bytes | memoryview) -> Future[None]:
        """Write ``data``, trying the socket directly first when nothing is queued (one system
        call instead of a loop round); the rest is queued as by IOStream."""
        if data and not self._write_buffer and not self._connecting:
            self._check_closed()
            try:
                sent = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return super().write(data)  # the usual path reports the error
            self._total_write_index += sent
            self._total_write_done_index += sent
            if sent == len(data):
                done = self._written
                if done is None:
                    done = self._written = Future()
                    done.set_result(None)
                return done
            data = memoryview(data)[sent:]
        return super().write(data)

    def _try_inline_read(self) -> None:
        # IOStream tries a receive before it waits.  Where nothing is buffered and the
        # loop already watches the socket for reads (level-triggered: it reports bytes
        # that are there already), that receive finds nothing for nearly every head —
        # the next request, the origin's answer — and is a system call wasted.
        state = self._state
        if self._read_buffer_size or state is None or not state & IOLoop.READ:
            super()._try_inline_read()
            return
        pos = self._find_read_pos()
        if pos is not None:
            self._read_from_buffer(pos)
            return
        self._check_closed()

    def _read_to_buffer(self) -> int | None:
        if self._user_read_buffer:
            return super()._read_to_buffer()
        try:
            n = self.socket.recv_into(_SCRATCH)
        except BlockingIOError:
            return 0
        except OSError as e:
            self.close(exc_info=e)
            if self._is_connreset(e):
                return None
            raise
        if n == 0:
            self.close()
            return 0
        self._read_buffer += _SCRATCH_VIEW[:n]
        self._read_buffer_size += n
        if self._read_buffer_size > self.max_buffer_size:
            error = StreamBufferFullError("Reached maximum read buffer size")
            self.close(exc_info=error)
            raise error
        return n


class TLSStream(BoundedStream):
    """A `BoundedStream` speaking TLS through a `TLSStack` over a plain socket.

    Tornado's `SSLIOStream` reads and writes through `ssl.SSLSocket`; this stream keeps
    OpenSSL off the socket (see `eyewall.tls.layers` for why: a relayed half-close must
    not lose the peer's reply), and the same code serves TLS inside TLS.  A write
    completes once its records are handed to the kernel.  Records that arrived with the
    handshake's last flight (already fed to ``tls``) are decrypted at once; raises
    ssl.SSLError if they are not valid TLS.
    """

    def __init__(self, sock: socket.socket, tls: TLSStack) -> None:
        self.tls = tls
        self._sealed = 0  # bytes at the front of the write buffer whose records are queued
        # Decrypted bytes not delivered yet; first, records that came with the handshake.
        self._plain = bytearray(tls.receive(b""))
        super().__init__(sock, max_buffer_size=STREAM_BUFFER)

    def write(self, data: bytes | memoryview) -> Future[None]:
        """Queue ``data`` (as IOStream does: no direct send, the records are made first)."""
        return IOStream.write(self, data)

    def writing(self) -> bool:
        """Whether records or plaintext wait to be written."""
        return bool(self._write_buffer) or bool(self.tls.outgoing)

    def write_to_fd(self, data: memoryview) -> int:
        """Seal the front of the write buffer into records, once, and send them; the
        plaintext counts as written when all of its records are out."""
        if not self._sealed:
            self._sealed = min(len(data), STREAM_CHUNK)
            self.tls.send(data[: self._sealed])
        self._send_records()
        if self.tls.outgoing:
            return 0
        written, self._sealed = self._sealed, 0
        return written

    def _handle_write(self) -> None:
        if self.tls.outgoing:  # records OpenSSL made on its own (a KeyUpdate's answer)
            try:
                self._send_records()
            except OSError as e:
                self.close(exc_info=e)
                return
        super()._handle_write()

    def _send_records(self) -> None:
        """Hand queued records to the kernel until it takes no more."""
        out = self.tls.outgoing
        while out:
            try:
                sent = self.socket.send(out)
            except (BlockingIOError, InterruptedError):
                return
            del out[:sent]

    # Reads go through read_from_fd, so read_into works too (BoundedStream's shortcut
    # reads the socket directly).  And each read tries it first: decrypted bytes may
    # wait in ``_plain`` with nothing left on the socket to wake the loop.
    _read_to_buffer = IOStream._read_to_buffer
    _try_inline_read = IOStream._try_inline_read

    def read_from_fd(self, buf: bytearray | memoryview) -> int | None:
        """Decrypted bytes into ``buf``: what is left of the last records first, else
        what the socket has.  None: nothing yet (or a record is incomplete); 0: the end
        (TCP FIN or close_notify).  A TLS error closes the stream."""
        plain = self._plain
        if not plain:
            if self.tls.ended:
                return 0
            try:
                n = self.socket.recv_into(_SCRATCH)
            except BlockingIOError:
                return None
            if n == 0:
                return 0
            try:
                plain += self.tls.receive(_SCRATCH_VIEW[:n])
                if self.tls.outgoing:  # OpenSSL answered something on its own
                    self._send_records()
                    if self.tls.outgoing:
                        self._add_io_state(self.io_loop.WRITE)
            except ssl.SSLError as e:  # not TLS, or a broken record
                self.close(exc_info=e)
                return None
            if not plain:
                return 0 if self.tls.ended else None
        n = min(len(buf), len(plain))
        buf[:n] = plain[:n]
        del plain[:n]
        return n


async def start_tls(
    stream: IOStream,
    ctx: ssl.SSLContext,
    server_side: bool,
    server_hostname: str | None = None,
) -> TLSStream:
    """Speak TLS over ``stream`` and return the stream of the new connection, its
    handshake done.  ``stream`` may be a `TLSStream` itself (TLS inside TLS); it must
    have no read pending, and it is spent either way (its socket moves to the result,
    or is closed).  Raises ssl.SSLError (after sending the alert OpenSSL made), or
    StreamClosedError/OSError when the peer leaves.  Callers bound the time.
    """
    layer = TLSLayer(ctx, server_side, server_hostname)
    try:
        while True:
            done = layer.handshake()
            records = layer.outgoing.read()
            if records:
                await stream.write(records)
            if done:
                break
            layer.incoming.write(await stream.read_bytes(STREAM_CHUNK, partial=True))
        sock, received, below = take_over(stream)
    except ssl.SSLError:
        alert = layer.outgoing.read()
        if alert and not stream.closed():
            stream.write(alert).add_done_callback(lambda f: f.exception())
        stream.close()
        raise
    except BaseException:
        stream.close()
        raise
    layer.incoming.write(received)
    try:
        return TLSStream(sock, TLSStack([layer]) if below is None else below.inside(layer))
    except BaseException:
        sock.close()
        raise


def unread(stream: IOStream, data: bytes | memoryview) -> None:
    """Put bytes back at the front of ``stream``'s read buffer (any IOStream, TLS ones
    too; no read may be pending): bytes read past the end of a message belong to the
    next one."""
    if data:
        stream._read_buffer[0:0] = data
        stream._read_buffer_size += len(data)


def moved(stream: IOStream) -> int:
    """Bytes ``stream`` has handed to the kernel so far (grows as a slow reader takes
    them): with body byte counts, the progress the body-idle limit watches."""
    return stream._total_write_done_index


def unsent(sock: socket.socket | None) -> int:
    """Bytes in ``sock``'s kernel send queue: handed to the kernel, not yet acknowledged
    by the peer (SIOCOUTQ, Linux).  The queue shrinks as a slow peer takes bytes, while
    the socket may stay unwritable for seconds (a send buffer grown to megabytes only
    becomes writable again once a third of it is free).  0 where it cannot be read:
    other systems, no socket, a closed one."""
    if _OUTQ is None or sock is None:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), _OUTQ, bytes(4)), sys.byteorder)
    except (OSError, ValueError):
        return 0


def peer_gone(stream: IOStream) -> bool:
    """Whether the peer of ``stream`` has closed or reset its connection, seen without
    reading (a non-blocking peek; bytes waiting, even TLS records, mean it is there).
    For a stream nobody is reading, whose close IOStream has not noticed yet."""
    sock = stream.socket
    if stream.closed() or sock is None:
        return True
    with socket.socket(fileno=sock.fileno()) as raw:
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            raw.detach()


def complete(block: bytes) -> bool:
    """Whether a bounded read found its delimiter (all our delimiters end in LF)."""
    return block.endswith(b"\n")


def read_block(stream: IOStream, pattern: re.Pattern[bytes], limit: int) -> Awaitable[bytes]:
    """Read through ``pattern``, or ``limit`` bytes if it does not occur within them
    (on a `BoundedStream`)."""
    # Tornado annotates ``regex`` as bytes but compiles it with re.compile, which
    # passes a compiled pattern through; precompiling saves a cache lookup per read.
    return stream.read_until_regex(pattern, max_bytes=limit)  # type: ignore[arg-type]


async def read_head(stream: IOStream, limit: int, data: bytes = b"") -> bytes:
    """A message head through its empty line, or ``limit`` bytes without one; ``data``
    is what the caller already read of it.  Raises StreamClosedError if the stream ends
    first.

    This takes everything that has arrived and puts back what follows the head:
    reading to a delimiter leaves bytes in the buffer, and a stream with buffered bytes
    stops watching its socket and must be re-armed for the next read — two event-loop
    handler changes per request that this avoids.
    """
    if not data:
        data = await stream.read_bytes(limit, partial=True)
    found = HEAD_END.search(data)
    while found is None and len(data) < limit:
        data += await stream.read_bytes(limit - len(data), partial=True)
        found = HEAD_END.search(data)
    end = found.end() if found is not None and found.end() <= limit + 3 else limit
    unread(stream, data[end:])
    return data[:end]


def read_buffered(stream: IOStream, n: int) -> bytes | None:
    """``n`` bytes at once if they are already buffered and no read is pending (works on
    any IOStream, TLS ones included)."""
    if stream._read_future is None and stream._read_buffer_size >= n:
        return stream._consume(n)
    return None


def buffered_size(stream: IOStream) -> int:
    """Bytes the stream has read from its socket that nobody has consumed yet."""
    if isinstance(stream, TLSStream):
        return stream._read_buffer_size + len(stream._plain)
    return stream._read_buffer_size


def take_over(stream: IOStream) -> tuple[socket.socket, bytes, TLSStack | None]:
    """Detach the socket from ``stream`` along with the bytes already buffered, and its
    TLS stack when it is a `TLSStream`.

    IOStream reads ahead, so bytes the peer sent after the last consumed message may be
    in its buffer; they are returned (decrypted, for TLS) and must be relayed before
    anything read from the socket.  No read may be pending on the stream, and what was
    written must have completed; records not sent yet stay on the stack's ``outgoing``.
    The socket is duplicated, non-blocking, and the stream closed.
    """
    n = stream._read_buffer_size
    early = bytes(stream._read_buffer[:n]) if n else b""
    if stream.closed() or stream.socket is None:
        raise StreamClosedError()
    tls = None
    if isinstance(stream, TLSStream):
        tls = stream.tls
        early += stream._plain
    sock = stream.socket.dup()
    stream.close()
    sock.setblocking(False)
    return sock, early, tls


def end_output(stream: IOStream) -> None:
    """Half-close ``stream`` after its last write: a TLS close_notify (sent if the socket
    takes it at once), then TCP FIN.  Raises OSError."""
    if isinstance(stream, TLSStream) and not stream.closed():
        stream.tls.close_notify()
        stream._send_records()
    if stream.socket is not None:
        stream.socket.shutdown(socket.SHUT_WR)


def forget_cancelled_read(stream: IOStream) -> None:
    """A read whose waiter was cancelled leaves the stream marked as reading until bytes
    come, and IOStream refuses a second read ("Already reading"); forget it, so the
    stream can be read again.  (A read that got its bytes has ended by itself.)"""
    future = stream._read_future
    if future is not None and future.cancelled():
        stream._read_future = None
        stream._read_bytes = stream._read_delimiter = stream._read_regex = None
        stream._read_partial = False
        stream._read_until_close = False


async def lingering_close(stream: IOStream, seconds: float = 2.0, limit: int = 1 << 20) -> None:
    """Close after the last write without resetting it away.

    Closing a socket with unread input makes the kernel send RST, which can destroy the
    error response still in flight.  Half-close, discard what the client still sends
    (up to ``limit`` bytes or ``seconds``), then close.
    """
    if stream.closed():
        return
    forget_cancelled_read(stream)
    loop_time = stream.io_loop.time
    deadline = loop_time() + seconds
    handle = stream.io_loop.call_at(deadline, stream.close)
    try:
        end_output(stream)
        while limit > 0:
            limit -= len(await stream.read_bytes(65536, partial=True))
    except (StreamClosedError, OSError):
        pass
    finally:
        stream.io_loop.remove_timeout(handle)
        stream.close()
