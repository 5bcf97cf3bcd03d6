"""Connections to origins: name resolution, connecting, and the keep-alive pool.

Names are resolved once, off the event loop (the loop's getaddrinfo runs in a thread),
and the proxy connects to exactly the addresses it resolved and checked — there is no
second lookup a changed DNS answer could slip through.

The pool keeps idle HTTP connections per (scheme, host, port), newest first.  An idle
connection that the origin closed, or that received unsolicited bytes, is stale and
dropped (IOStream watches idle sockets for that once a close callback is set).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from tornado.iostream import IOStream, StreamClosedError

from eyewall.errors import ErrorKind, ProxyError
from eyewall.http1.target import Target
from eyewall.proxy.streams import BoundedStream, buffered_size

__all__ = ["Address", "Resolver", "Upstream", "UpstreamPool", "connect"]

log = logging.getLogger("eyewall.upstream")

Address = tuple[int, tuple[str, int]]  # (family, (ip, port)) — IPv6 sockaddrs may be longer
Guard = Callable[[Target, list[Address]], list[Address]]

STREAM_BUFFER = 8 << 20


def format_address(sockaddr: tuple[str, int]) -> str:
    ip, port = sockaddr[0], sockaddr[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Resolver:
    """getaddrinfo off the loop, with a small time-bounded cache of answers."""

    def __init__(self, ttl: float = 10.0, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: dict[tuple[str, int], tuple[float, list[Address]]] = {}

    def known(self, host: str, port: int) -> list[Address] | None:
        """The addresses without waiting, when ``host`` is an IP literal or cached."""
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > asyncio.get_running_loop().time():
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
        known = self.known(host, port)
        if known is not None:
            return known
        loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            reason = e.strerror if isinstance(e, socket.gaierror) else "invalid name"
            raise ProxyError(ErrorKind.DNS_FAILURE, f"cannot resolve {host}: {reason}") from None
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
    if isinstance(error, ConnectionRefusedError):
        return ProxyError(ErrorKind.UPSTREAM_REFUSED, f"connection refused by {where}")
    if isinstance(error, TimeoutError):
        return ProxyError(ErrorKind.CONNECT_TIMEOUT, f"no answer from {where}")
    if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return ProxyError(ErrorKind.UPSTREAM_UNREACHABLE, f"{where}: {error.strerror}")
    return ProxyError(ErrorKind.UPSTREAM_RESET, f"{where}: {error.strerror or error}")


async def connect(addrs: list[Address]) -> tuple[socket.socket, str]:
    """Connect to the first address that accepts; errors become `ProxyError`."""
    loop = asyncio.get_running_loop()
    error: ProxyError | None = None
    for family, sockaddr in addrs:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        where = format_address(sockaddr)
        try:
            await loop.sock_connect(sock, sockaddr)
        except OSError as e:
            sock.close()
            error = _classify(e, where)
            continue
        except BaseException:
            sock.close()
            raise
        return sock, where
    assert error is not None, "connect() needs at least one address"
    raise error


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
    def __init__(
        self,
        resolver: Resolver,
        guard: Guard,
        connect_timeout: float,
        idle_per_origin: int,
        idle_timeout: float,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.resolver = resolver
        self.guard = guard
        self.connect_timeout = connect_timeout
        self.idle_per_origin = idle_per_origin
        self.idle_timeout = idle_timeout
        self.tls_context = tls_context or default_tls_context()
        self._idle: dict[tuple[str, str, int], list[Upstream]] = {}
        self.closing = False

    async def open_socket(
        self, target: Target, addresses: tuple[str, ...] | None = None
    ) -> tuple[socket.socket, str]:
        """A new connection to ``target`` within the connect timeout: to ``addresses``
        (already resolved and allowed by the policy), or else to what the name resolves
        to.  The guard refuses the proxy's own listeners either way."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                if addresses is None:
                    addrs = await self.resolver.resolve(target.host, target.port)
                else:
                    addrs = [(family_of(ip), (ip, target.port)) for ip in addresses]
                return await connect(self.guard(target, addrs))
        except TimeoutError:
            raise ProxyError(
                ErrorKind.CONNECT_TIMEOUT, f"no connection to {target.authority} in time"
            ) from None

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

    async def open(self, target: Target, addresses: tuple[str, ...] | None = None) -> Upstream:
        """A new connection to ``target`` (with TLS for https)."""
        key = (target.scheme, target.host, target.port)
        sock, peer = await self.open_socket(target, addresses)
        ip = peer.rsplit(":", 1)[0].strip("[]")
        stream: IOStream = BoundedStream(sock, max_buffer_size=STREAM_BUFFER)
        if target.scheme == "https":
            stream = await self._start_tls(stream, target)
        return Upstream(stream, key, peer, ip)

    async def _start_tls(self, stream: IOStream, target: Target) -> IOStream:
        """TLS to the origin, verified against the trusted CAs and the host name.

        ``stream`` is spent either way: Tornado hands its socket to the TLS stream,
        which closes it when the handshake fails or is cancelled."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await stream.start_tls(False, self.tls_context, server_hostname=target.host)
        except TimeoutError:
            raise ProxyError(ErrorKind.CONNECT_TIMEOUT, "TLS handshake timed out") from None
        except ssl.SSLCertVerificationError as e:
            raise ProxyError(
                ErrorKind.UPSTREAM_TLS,
                f"certificate of {target.host} failed verification: {e.verify_message}",
            ) from None
        except (ssl.SSLError, StreamClosedError, OSError) as e:
            raise ProxyError(ErrorKind.UPSTREAM_TLS, f"TLS handshake failed: {e}") from None

    def release(self, up: Upstream, now: float) -> None:
        """Return a connection whose exchange ended cleanly and may carry another."""
        idle = self._idle.setdefault(up.key, [])
        if self.closing or up.stream.closed() or len(idle) >= self.idle_per_origin:
            up.stream.close()
            return
        up.idle_since = now
        idle.append(up)

    def check(self, now: float) -> None:
        limit = now - self.idle_timeout
        for key, idle in list(self._idle.items()):
            while idle and idle[0].idle_since < limit:
                idle.pop(0).stream.close()
            if not idle:
                del self._idle[key]

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close_all(self) -> None:
        self.closing = True
        for idle in self._idle.values():
            for up in list(idle):
                up.stream.close()
        self._idle.clear()


def family_of(ip: str) -> int:
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
        if isinstance(sock, ssl.SSLSocket):
            return bool(sock.pending()) or _peek(sock.fileno())
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
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
