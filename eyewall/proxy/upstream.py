"""Connections to origins: name resolution, connecting, and the keep-alive pool.

Names are resolved once, off the event loop (the loop's getaddrinfo runs in a thread),
checked by admission, and the proxy connects to exactly the addresses it checked —
there is no second lookup a changed DNS answer could slip through.  With several
addresses the connection races them as RFC 8305 (Happy Eyeballs) says: the next
address is tried 250 ms after the previous one if that has not connected (at once if
it failed), alternating address families, and the first to connect wins; a black-holed
first address costs 250 ms, not the whole connect timeout.

The pool keeps idle HTTP connections per (scheme, host, port), newest first.  An idle
connection is checked for staleness (closed by the origin, or unsolicited bytes) when it
is taken, not watched while idle.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass, field

from tornado.iostream import IOStream, StreamClosedError

from eyewall.errors import ErrorKind, ProxyError
from eyewall.http1.target import Target
from eyewall.proxy.streams import STREAM_BUFFER, BoundedStream, buffered_size, start_tls

__all__ = [
    "Resolver",
    "Upstream",
    "UpstreamPool",
    "connect",
    "format_address",
    "is_local_address",
]

log = logging.getLogger("eyewall.upstream")

Address = tuple[int, tuple[str, int]]  # (family, (ip, port))

ATTEMPT_DELAY = 0.25  # RFC 8305 §5: the recommended Connection Attempt Delay


def format_address(sockaddr: tuple[str, int]) -> str:
    """``ip:port``, with brackets around IPv6."""
    ip, port = sockaddr[0], sockaddr[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Resolver:
    """getaddrinfo off the loop, with a small cache: answers are kept ``ttl`` seconds
    (getaddrinfo does not report DNS TTLs); when ``max_entries`` are held the cache is
    emptied (cheaper than tracking recency; a miss costs one lookup)."""

    def __init__(self, ttl: float = 10.0, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: dict[tuple[str, int], tuple[float, list[Address]]] = {}

    def known(self, host: str, port: int) -> list[Address] | None:
        """The addresses without waiting, when ``host`` is an IP literal or cached."""
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > time.monotonic():  # the loop's clock
            return cached[1]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        addrs: list[Address] = [(int(family), (host, port))]
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[(host, port)] = (float("inf"), addrs)
        return addrs

    async def resolve(self, host: str, port: int) -> list[Address]:
        """The addresses of ``host``, in getaddrinfo's order, without duplicates.
        Raises ProxyError(DNS_ERROR) when the name does not resolve."""
        known = self.known(host, port)
        if known is not None:
            return known
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            reason = e.strerror if isinstance(e, socket.gaierror) else "invalid name"
            raise ProxyError(ErrorKind.DNS_ERROR, f"cannot resolve {host}: {reason}") from None
        addrs = []
        for family, _, _, _, sockaddr in infos:
            entry = (int(family), (str(sockaddr[0]), int(sockaddr[1])))
            if entry not in addrs:
                addrs.append(entry)
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[(host, port)] = (now + self.ttl, addrs)
        return addrs


def _classify(error: OSError, where: str) -> ProxyError:
    """The ProxyError for a failed connect to ``where``, worded by the error number
    (asyncio's own message repeats the address in Python's spelling)."""
    if isinstance(error, ConnectionRefusedError):
        return ProxyError(ErrorKind.CONNECTION_REFUSED, f"connection refused by {where}")
    if isinstance(error, TimeoutError):
        return ProxyError(ErrorKind.CONNECTION_TIMEOUT, f"no answer from {where}")
    reason = os.strerror(error.errno) if error.errno else str(error.strerror or error)
    if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return ProxyError(ErrorKind.DESTINATION_UNAVAILABLE, f"{where}: {reason}")
    return ProxyError(ErrorKind.CONNECTION_TERMINATED, f"{where}: {reason}")


async def _attempt(family: int, sockaddr: tuple[str, int]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _interleave(addrs: list[Address]) -> list[Address]:
    """RFC 8305 §4: alternate address families, starting with the first one listed."""
    if len({family for family, _ in addrs}) < 2:
        return addrs
    first = addrs[0][0]
    ours = [a for a in addrs if a[0] == first]
    others = [a for a in addrs if a[0] != first]
    out: list[Address] = []
    for i in range(max(len(ours), len(others))):
        out.extend(group[i] for group in (ours, others) if i < len(group))
    return out


async def connect(addrs: list[Address], delay: float = ATTEMPT_DELAY) -> tuple[socket.socket, str]:
    """Connect to one of ``addrs`` (the first to accept, racing them as RFC 8305 says);
    returns the socket and its "ip:port".  Raises ProxyError (the last address's
    error) when none accepts; the caller bounds the time."""
    if not addrs:
        raise ProxyError(ErrorKind.DNS_ERROR, "no address to connect to")
    if len(addrs) == 1:
        family, sockaddr = addrs[0]
        try:
            return await _attempt(family, sockaddr), format_address(sockaddr)
        except OSError as e:
            raise _classify(e, format_address(sockaddr)) from None
    order = _interleave(addrs)
    running: dict[asyncio.Task[socket.socket], tuple[str, int]] = {}
    error: ProxyError | None = None
    winner: tuple[socket.socket, str] | None = None
    try:
        while winner is None:
            if order:
                family, sockaddr = order.pop(0)
                running[asyncio.ensure_future(_attempt(family, sockaddr))] = sockaddr
            if not running:
                break
            done, _ = await asyncio.wait(
                running, timeout=delay if order else None, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                sockaddr = running.pop(task)
                failure = task.exception()
                if failure is None and winner is None:
                    winner = task.result(), format_address(sockaddr)
                elif failure is None:
                    task.result().close()
                elif isinstance(failure, OSError):
                    error = _classify(failure, format_address(sockaddr))
                else:
                    raise failure
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
            for task in running:
                if not task.cancelled() and task.exception() is None:
                    task.result().close()
    if winner is None:
        assert error is not None
        raise error
    return winner


@dataclass(eq=False, slots=True)
class Upstream:
    """An origin connection carrying HTTP exchanges."""

    stream: IOStream
    key: tuple[str, str, int]
    peer: str  # "ip:port" as shown in logs
    ip: str
    uses: int = 0  # exchanges carried before the current one
    idle_since: float = field(default=0.0)


class UpstreamPool:
    """New connections to origins, and the idle ones kept for reuse.

    ``idle_per_origin`` and ``idle_timeout`` (seconds) bound the idle connections
    kept; ``tls_context`` verifies origins.  Attributes are replaced on reload.  The
    pool sets no time limit of its own on connecting: the caller's watch bounds it
    (`eyewall.proxy.timeouts`, phase CONNECTING, ``timeouts.upstream_connect``), and
    cancelling `open` or `open_socket` cancels every attempt under way.  A timer here
    would fire after a stall of the event loop and blame the origin; the watch waits
    such a stall out.
    """

    def __init__(
        self,
        idle_per_origin: int,
        idle_timeout: float,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.resolver = Resolver()
        self.idle_per_origin = idle_per_origin
        self.idle_timeout = idle_timeout
        self.tls_context = tls_context or default_tls_context()
        self._idle: dict[tuple[str, str, int], list[Upstream]] = {}
        self.closing = False

    async def open_socket(
        self, target: Target, addresses: tuple[str, ...]
    ) -> tuple[socket.socket, str]:
        """A new TCP connection to ``target`` at one of ``addresses`` (resolved and
        allowed by admission), as ``(socket, "ip:port")``.  Raises ProxyError."""
        return await connect([(family_of(ip), (ip, target.port)) for ip in addresses])

    def take(
        self, target: Target, addresses: tuple[str, ...] | None = None, probe: bool = True
    ) -> Upstream | None:
        """An idle pooled connection to ``target``, newest first, or None.

        A pooled connection is used only if its address is among ``addresses`` (when
        given).  ``probe`` checks a pooled socket for staleness first; a caller that can
        safely retry on a new connection (an idempotent request without a body) skips it.
        """
        idle = self._idle.get((target.scheme, target.host, target.port))
        if idle:
            for i in range(len(idle) - 1, -1, -1):
                up = idle[i]
                if addresses is not None and up.ip not in addresses:
                    continue
                del idle[i]
                if up.stream.closed() or buffered_size(up.stream) or (probe and stale(up.stream)):
                    up.stream.close()
                    continue
                up.uses += 1
                return up
        return None

    async def open(self, target: Target, addresses: tuple[str, ...]) -> Upstream:
        """A new connection to ``target`` (with TLS for https).  Raises ProxyError."""
        key = (target.scheme, target.host, target.port)
        sock, peer = await self.open_socket(target, addresses)
        ip = peer.rsplit(":", 1)[0].strip("[]")
        stream: IOStream = BoundedStream(sock, max_buffer_size=STREAM_BUFFER)
        if target.scheme == "https":
            stream = await self._start_tls(stream, target)
        return Upstream(stream, key, peer, ip)

    async def _start_tls(self, stream: IOStream, target: Target) -> IOStream:
        """TLS to the origin, verified against the trusted CAs and the host name.

        ``stream`` is spent either way: its socket moves to the TLS stream, or is closed
        when the handshake fails or is cancelled."""
        try:
            return await start_tls(stream, self.tls_context, False, target.host)
        except ssl.SSLCertVerificationError as e:
            raise ProxyError(
                ErrorKind.TLS_CERTIFICATE_ERROR,
                f"certificate of {target.host} failed verification: {e.verify_message}",
            ) from None
        except (ssl.SSLError, StreamClosedError, OSError) as e:
            raise ProxyError(ErrorKind.TLS_PROTOCOL_ERROR, f"TLS handshake failed: {e}") from None

    def release(self, up: Upstream, now: float) -> None:
        """Return a connection whose exchange ended cleanly and may carry another."""
        idle = self._idle.setdefault(up.key, [])
        if self.closing or up.stream.closed() or len(idle) >= self.idle_per_origin:
            up.stream.close()
            return
        up.idle_since = now
        idle.append(up)

    def check(self, now: float) -> None:
        """Close idle connections older than ``idle_timeout`` (for the watchdog)."""
        limit = now - self.idle_timeout
        for key, idle in list(self._idle.items()):
            while idle and idle[0].idle_since < limit:
                idle.pop(0).stream.close()
            if not idle:
                del self._idle[key]

    def idle_count(self) -> int:
        """Idle pooled connections, over all origins."""
        return sum(len(v) for v in self._idle.values())

    def close_all(self) -> None:
        """Close every idle connection and stop pooling (shutdown)."""
        self.closing = True
        for idle in self._idle.values():
            for up in list(idle):
                up.stream.close()
        self._idle.clear()


def is_local_address(address: str) -> bool:
    """Whether ``address`` (an IP literal) belongs to this host: it can be bound."""
    with socket.socket(family_of(address), socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def family_of(ip: str) -> int:
    """The socket family of an IP literal."""
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def stale(stream: IOStream) -> bool:
    """An idle connection is stale if the origin closed it or sent unasked-for bytes.

    Checked when the connection is taken from the pool, with one non-blocking peek,
    rather than by watching every idle socket (which costs two epoll changes per
    request).
    """
    sock = stream.socket
    if sock is None:
        return True
    try:
        return _peek(sock.fileno())
    except OSError:
        return True


def _peek(fd: int) -> bool:
    """True unless reading ``fd`` would block (EOF or data both mean stale)."""
    with socket.socket(fileno=fd) as s:
        try:
            s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        finally:
            s.detach()
    return True


def default_tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client context verifying origins against ``cafile`` or the system store,
    offering only http/1.1 by ALPN."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
