"""Byte relay between two sockets: CONNECT tunnels and upgraded WebSocket connections.

Each direction is a `_Pump` driven by the event loop's reader/writer callbacks (no
coroutine per tunnel, so an idle tunnel costs a few small objects).  On Linux the bytes
move with ``splice(2)`` through a pipe and never enter Python; elsewhere, or if the
kernel refuses, with ``recv_into``/``send`` through a buffer.  Pipes come from a shared
pool and are held only while data is in flight, so thousands of idle tunnels do not
hold thousands of pipes.

Backpressure: a pump stops reading while its destination cannot take more.  Half-close:
end of input on one side becomes ``shutdown(SHUT_WR)`` on the other, and the tunnel
ends when both directions have ended, or at the first error.

Either socket may be a TLS one (`ssl.SSLSocket`, non-blocking) where the proxy
terminates TLS: a WebSocket upgraded inside an intercepted tunnel, to an ``https://``
origin, or any tunnel through the HTTPS proxy listener.  Bytes then pass through Python
(no splice: the kernel sees only ciphertext); "would block" comes as
`ssl.SSLWantReadError`/`SSLWantWriteError`; decrypted bytes OpenSSL holds
(``pending()``) are read without waiting for the socket; and end of input is passed on
as a TLS close_notify, after which the other direction keeps flowing.  OpenSSL discards
(as an error) records that arrive while it sends close_notify, and Python's shutdown
call waits for them once, so the close_notify is sent only at a moment nothing is
waiting to be read on that socket; until then it is held back.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import ssl
from collections.abc import Callable

from eyewall.proxy.streams import unsent

__all__ = ["PipePool", "Relay", "Tunnel"]

log = logging.getLogger("eyewall.tunnel")

PIPE_SIZE = 1 << 20
COPY_BUFFER = 256 << 10
_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class PipePool:
    """Empty non-blocking pipes for splice, reused across tunnels."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._free: list[tuple[int, int]] = []

    def acquire(self) -> tuple[int, int]:
        """A non-blocking pipe (read fd, write fd) of PIPE_SIZE bytes where the kernel allows."""
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default size works, just more slowly
        return r, w

    def release(self, pipe: tuple[int, int], empty: bool) -> None:
        """Return ``pipe`` for reuse when ``empty`` and the pool has room; otherwise close it."""
        if empty and len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        """Close every pooled pipe."""
        while self._free:
            r, w = self._free.pop()
            os.close(r)
            os.close(w)


class _Pump:
    """Moves bytes from ``src`` to ``dst`` until end of input or an error."""

    __slots__ = (
        "buffer",
        "count",
        "dst",
        "dst_fd",
        "eof",
        "in_flight",
        "loop",
        "pending",
        "pipe",
        "reading",
        "splice",
        "src",
        "src_fd",
        "tls_in",
        "tunnel",
        "writing",
    )

    def __init__(
        self, tunnel: Tunnel, src: socket.socket, dst: socket.socket, pending: bytes
    ) -> None:
        self.tunnel = tunnel
        self.loop = tunnel.loop
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.pending = memoryview(pending) if pending else None  # user-space bytes first
        self.pipe: tuple[int, int] | None = None
        self.in_flight = 0  # bytes in the pipe
        self.buffer: bytearray | None = None
        self.count = 0
        self.eof = False
        self.reading = False
        self.writing = False
        self.tls_in = isinstance(src, ssl.SSLSocket)
        self.splice = tunnel.splice and not self.tls_in and not isinstance(dst, ssl.SSLSocket)

    def start(self) -> None:
        self._flush()

    # -- event handlers ---------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            if self.splice:
                self._splice_in()
            else:
                self._recv()
        except OSError as e:
            self.tunnel.abort(e, self.src)
            return
        self.tunnel.active = True
        self._flush()
        if self.tunnel.notify_pending is self.src and not self.tunnel.closed:
            self.tunnel.half_close(self.src)
        if self.reading and self.tls_in and self.src.pending():  # type: ignore[attr-defined]
            self.loop.call_soon(self._on_readable)  # decrypted bytes: no socket event comes

    def _on_writable(self) -> None:
        self._flush()

    def _splice_in(self) -> None:
        if self.pipe is None:
            self.pipe = self.tunnel.pipes.acquire()
        try:
            n = os.splice(self.src_fd, self.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS) and self.count == 0:
                self.splice = self.tunnel.splice = False  # this kernel refuses splice
                self._recv()
                return
            raise
        if n == 0:
            self.eof = True
        self.in_flight += n
        self.count += n

    def _recv(self) -> None:
        if self.buffer is None:
            self.buffer = bytearray(COPY_BUFFER)
        try:
            n = self.src.recv_into(self.buffer)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except ssl.SSLZeroReturnError:  # the peer's close_notify: end of its input
            n = 0
        if n == 0:
            self.eof = True
        else:
            self.pending = memoryview(self.buffer)[:n]
            self.count += n

    # -- moving data out --------------------------------------------------------------

    def _flush(self) -> None:
        """Write what is held; then read again, wait for the destination, or finish."""
        try:
            blocked = self._write_out()
        except OSError as e:
            self.tunnel.abort(e, self.dst)
            return
        if blocked:
            self._set_reading(False)
            if not self.writing:
                self.loop.add_writer(self.dst_fd, self._on_writable)
                self.writing = True
            return
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False
        if self.eof:
            self._set_reading(False)
            self.tunnel.finished(self)
        else:
            self._set_reading(True)

    def _write_out(self) -> bool:
        """True if the destination is full and data is still held."""
        while self.pending is not None:
            try:
                sent = self.dst.send(self.pending)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return True
            self.pending = self.pending[sent:] if sent < len(self.pending) else None
        while self.in_flight:
            assert self.pipe is not None
            try:
                moved = os.splice(self.pipe[0], self.dst_fd, self.in_flight, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return True
            self.in_flight -= moved
        if self.pipe is not None:
            self.tunnel.pipes.release(self.pipe, empty=True)
            self.pipe = None
        return False

    def _set_reading(self, on: bool) -> None:
        if on and not self.reading:
            self.loop.add_reader(self.src_fd, self._on_readable)
            if self.tls_in and self.src.pending():  # type: ignore[attr-defined]
                self.loop.call_soon(self._on_readable)
        elif not on and self.reading:
            self.loop.remove_reader(self.src_fd)
        self.reading = on

    def stop(self) -> None:
        """Unregister from the loop and give back the pipe."""
        self._set_reading(False)
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False
        if self.pipe is not None:
            self.tunnel.pipes.release(self.pipe, empty=self.in_flight == 0)
            self.pipe = None
        self.pending = None
        self.buffer = None


class Tunnel:
    """Relays between ``client`` and ``upstream`` until both directions end.

    ``to_client`` and ``to_upstream`` are bytes to deliver before anything read from the
    sockets (the CONNECT answer; bytes IOStream had read ahead); ``to_upstream`` counts
    as bytes from the client.  ``on_close`` (set before `start`) is called once, with
    the exception that ended the tunnel or None.  The watchdog calls `check` to enforce
    ``idle_timeout`` (seconds without a byte either way).
    """

    __slots__ = (
        "_ended",
        "active",
        "client",
        "closed",
        "down",
        "failed_side",
        "idle_since",
        "idle_timeout",
        "loop",
        "notify_pending",
        "on_close",
        "pipes",
        "queued",
        "splice",
        "up",
        "upstream",
    )

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        pipes: PipePool,
        idle_timeout: float,
        to_client: bytes = b"",
        to_upstream: bytes = b"",
        on_close: Callable[[Tunnel, BaseException | None], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client, self.upstream = client, upstream
        self.pipes = pipes
        self.splice = _SPLICE
        self.on_close = on_close
        self.idle_timeout = idle_timeout
        self.active = True  # set on every read; the watchdog clears it
        self.idle_since = self.loop.time()
        self.queued: int | None = None  # the kernel's send queues at the first quiet check
        self.closed = False
        self.failed_side = ""  # "client" or "upstream" when an error ended the tunnel
        self.up = _Pump(self, client, upstream, to_upstream)
        self.down = _Pump(self, upstream, client, to_client)
        self.up.count = len(to_upstream)
        self._ended: set[_Pump] = set()
        self.notify_pending: socket.socket | None = None  # a held-back close_notify

    @property
    def bytes_up(self) -> int:
        """Bytes relayed from client to upstream so far."""
        return self.up.count

    @property
    def bytes_down(self) -> int:
        """Bytes relayed from upstream to client so far."""
        return self.down.count

    def start(self) -> None:
        """Start relaying in both directions."""
        self.down.start()
        self.up.start()

    def check(self, now: float) -> None:
        """The watchdog's check: close the tunnel once no byte has moved for ``idle_timeout``
        seconds (``now``: loop time).  As for body idleness (`Watch.check`), a kernel
        send queue that shrank since the first quiet check counts as bytes moved: a
        slow reader behind a full send buffer lets the pumps read nothing for long."""
        if self.active:
            self.active = False
            self.idle_since = now
            self.queued = None
        elif self.queued is None:
            self.queued = unsent(self.client) + unsent(self.upstream)
        elif now - self.idle_since >= self.idle_timeout:
            queued = unsent(self.client) + unsent(self.upstream)
            if queued == self.queued:
                self.close(TimeoutError("tunnel idle"))
            else:
                self.queued = queued
                self.idle_since = now

    def finished(self, pump: _Pump) -> None:
        """``pump`` saw end of input and delivered everything: pass the EOF on."""
        self._ended.add(pump)
        if len(self._ended) == 2:
            self.close()
            return
        self.half_close(pump.dst)

    def half_close(self, sock: socket.socket) -> None:
        """End output on ``sock`` (TCP FIN, or TLS close_notify when nothing waits to be
        read there; otherwise retried after the next read from it)."""
        self.notify_pending = None
        try:
            if isinstance(sock, ssl.SSLSocket) and _readable_now(sock):
                self.notify_pending = sock
            else:
                _end_output(sock)
        except OSError as e:
            self.abort(e, sock)

    def abort(self, error: BaseException, side: socket.socket) -> None:
        """End the tunnel after ``error`` on ``side``'s socket."""
        self.failed_side = "client" if side is self.client else "upstream"
        self.close(error)

    def close(self, error: BaseException | None = None) -> None:
        """Close both sides and report once, with ``error`` when one ended it."""
        if self.closed:
            return
        self.closed = True
        self.up.stop()
        self.down.stop()
        self.client.close()
        self.upstream.close()
        if self.on_close is None:
            return
        try:
            self.on_close(self, error)
        except Exception:
            log.exception("tunnel close handler failed")


Relay = Tunnel  # what the proxy tracks as an open tunnel


def _readable_now(sock: ssl.SSLSocket) -> bool:
    """Whether decrypted bytes or raw bytes wait on ``sock`` (a non-blocking peek)."""
    if sock.pending():
        return True
    with socket.socket(fileno=sock.fileno()) as raw:
        try:
            return bool(raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False
        finally:
            raw.detach()


def _end_output(sock: socket.socket) -> None:
    """Half-close ``sock``: TCP FIN, or a TLS close_notify (reading goes on: OpenSSL
    reads after sending close_notify until the peer's arrives)."""
    if isinstance(sock, ssl.SSLSocket):
        tls = getattr(sock, "_sslobj", None)  # SSLSocket.shutdown() would drop TLS both ways
        if tls is not None:
            try:
                tls.shutdown()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # close_notify is out; the peer's is not in yet
            except ssl.SSLError as e:
                raise OSError(str(e)) from None
        return
    sock.shutdown(socket.SHUT_WR)
