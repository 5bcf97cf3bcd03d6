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

Either side may speak TLS the proxy terminates (a `TLSStack` comes with its socket): a
WebSocket upgraded inside an intercepted tunnel or to an ``https://`` origin, any tunnel
through the HTTPS proxy listener, or all at once.  Bytes then pass through Python (no
splice: the kernel sees only records), and end of input is passed on as a TLS
close_notify, after which the other direction keeps flowing (RFC 8446 §6.1) — through
memory buffers, so a reply already on its way cannot be lost (`eyewall.tls.layers`).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Callable

from eyewall.proxy.streams import unsent
from eyewall.tls.layers import TLSStack

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


_PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})


class _Pump:
    """Moves bytes from ``src`` to ``dst`` until end of input or an error; either side
    may speak TLS (``src_tls``, ``dst_tls``)."""

    __slots__ = (
        "buffer",
        "count",
        "dst",
        "dst_fd",
        "dst_tls",
        "eof",
        "in_flight",
        "loop",
        "output_ended",
        "pending",
        "pipe",
        "reading",
        "splice",
        "src",
        "src_fd",
        "src_tls",
        "tunnel",
        "writing",
    )

    def __init__(
        self,
        tunnel: Tunnel,
        src: socket.socket,
        dst: socket.socket,
        src_tls: TLSStack | None,
        dst_tls: TLSStack | None,
        pending: bytes,
    ) -> None:
        self.tunnel = tunnel
        self.loop = tunnel.loop
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.src_tls, self.dst_tls = src_tls, dst_tls
        self.pending: memoryview | None = None  # plaintext bytes for a plain dst
        self.pipe: tuple[int, int] | None = None
        self.in_flight = 0  # bytes in the pipe
        self.buffer: bytearray | None = None
        self.count = 0
        self.eof = False
        self.output_ended = False  # the end of input was passed on to dst
        self.reading = False
        self.writing = False
        self.splice = tunnel.splice and src_tls is None and dst_tls is None
        if pending:  # user-space bytes first
            self._hold(pending)

    def start(self) -> None:
        self._flush()

    # -- event handlers ---------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            if self.splice:
                self._splice_in()
            else:
                self._recv()
        except OSError as e:  # ssl.SSLError too
            self.tunnel.abort(e, self.src)
            return
        self.tunnel.active = True
        self._flush()

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
        except BlockingIOError:
            return
        if n == 0:
            self.eof = True
            return
        data: bytes | memoryview = memoryview(self.buffer)[:n]
        tls = self.src_tls
        if tls is not None:
            data = tls.receive(data)
            self.eof = tls.ended
            if tls.outgoing:  # OpenSSL answered on its own: the other pump writes to src
                self.tunnel.pump_into(self.src)._flush()
        if data:
            self.count += len(data)
            self._hold(data)

    def _hold(self, data: bytes | memoryview) -> None:
        """Keep ``data`` until ``dst`` takes it: as records on its stack, or as they are."""
        if self.dst_tls is not None:
            self.dst_tls.send(data)
        else:
            self.pending = memoryview(data)

    # -- moving data out --------------------------------------------------------------

    def _flush(self) -> None:
        """Write what is held; then read again, wait for the destination, or pass the
        end of input on and finish."""
        while not self.tunnel.closed:
            try:
                blocked = self._write_out()
            except OSError as e:
                self._failed(e)
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
            if not self.eof:
                self._set_reading(True)
                return
            self._set_reading(False)
            if self.output_ended:
                self.tunnel.finished(self)
                return
            self.output_ended = True
            try:  # TCP FIN now, or a close_notify written on the next pass
                if self.dst_tls is not None:
                    self.dst_tls.close_notify()
                else:
                    self.dst.shutdown(socket.SHUT_WR)
            except OSError as e:
                self._failed(e)
                return

    def _failed(self, error: OSError) -> None:
        """Writing to ``dst`` failed.  A peer that had ended its own output and then
        closed (writes to it meet a reset, EPIPE or ENOTCONN) ended its connection the
        ordinary way: what it was sent after is lost, as on a direct connection, and
        this direction ends without an error.  Otherwise the tunnel ends with
        ``error``."""
        tunnel = self.tunnel
        reverse = tunnel.down if self is tunnel.up else tunnel.up
        if reverse.eof and error.errno in _PEER_GONE:
            self.stop()
            self.eof = self.output_ended = True
            tunnel.finished(self)
            return
        tunnel.abort(error, self.dst)

    def _write_out(self) -> bool:
        """True if the destination is full and data is still held."""
        if self.dst_tls is not None:
            out = self.dst_tls.outgoing
            while out:
                try:
                    sent = self.dst.send(out)
                except BlockingIOError:
                    return True
                del out[:sent]
            return False
        while self.pending is not None:
            try:
                sent = self.dst.send(self.pending)
            except BlockingIOError:
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
    as bytes from the client.  ``client_tls`` and ``upstream_tls`` are the TLS the proxy
    speaks on either socket, if any (records not sent yet are sent first).
    ``on_close`` (set before `start`) is called once, with the exception that ended the
    tunnel or None.  The watchdog calls `check` to enforce ``idle_timeout`` (seconds
    without a byte either way).
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
        client_tls: TLSStack | None = None,
        upstream_tls: TLSStack | None = None,
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
        self.up = _Pump(self, client, upstream, client_tls, upstream_tls, to_upstream)
        self.down = _Pump(self, upstream, client, upstream_tls, client_tls, to_client)
        self.up.count = len(to_upstream)
        self._ended: set[_Pump] = set()

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

    def pump_into(self, sock: socket.socket) -> _Pump:
        """The pump that writes to ``sock``."""
        return self.up if sock is self.upstream else self.down

    def finished(self, pump: _Pump) -> None:
        """``pump`` delivered everything and passed its end of input on; the tunnel
        closes when both have."""
        self._ended.add(pump)
        if len(self._ended) == 2:
            self.close()

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
