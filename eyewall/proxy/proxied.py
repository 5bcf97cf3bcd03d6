"""Connections relayed by a load balancer: the PROXY protocol header read off the raw
socket, before TLS or HTTP touch it, and the client address it carries.

Who must send the header is configuration, never a guess (the specification's §5): a
peer in ``proxy_protocol.trusted`` must start every connection with one (version 1 or
2), any other peer must not.  `ProxyProtocolGate.client_of` applies that rule to a new
connection and returns the address the rest of the proxy sees as the client: the
header's source for a relayed connection, the peer itself for a LOCAL one (HAProxy's
health checks: served quietly, like any connection that closes without a request).

Refusals close the connection with one log line and are counted by reason:

    untrusted   a peer outside proxy_protocol.trusted began with a PROXY header
    missing     a trusted peer began with something else (a misconfigured balancer)
    invalid     a trusted peer sent a malformed header, or closed inside it
    timeout     a trusted peer's header was not complete within header_timeout
    closed      a trusted peer closed before sending a byte (a TCP health check:
                counted, not logged)

The header is read *exactly*: reads stop at its last byte, so what follows stays in
the kernel's buffer for whoever reads next — Tornado's IOStream for HTTP, or the TLS
handshake of an HTTPS listener, which must find nothing read ahead.  Both versions are
at least 15 bytes long; version 2 states its length in bytes 15-16; a version 1 line is
peeked at and consumed through its LF.

An untrusted peer's first bytes are only peeked at, without waiting, when the
connection is accepted (by then they have usually arrived: listeners use
TCP_DEFER_ACCEPT).  That check is for the log line and the count; if the bytes are not
there yet, the header is simply never parsed and the HTTP parser refuses it with 400.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable

from eyewall.policy.networks import NetworkSet
from eyewall.proxyproto import (
    MAX_V1_HEADER,
    ProxyHeader,
    ProxyProtocolError,
    looks_like_proxy_header,
    parse,
)

__all__ = [
    "MAX_HEADER_BYTES",
    "RESULTS",
    "NotAHeader",
    "PeerClosed",
    "ProxyProtocolGate",
    "read_header",
]

log = logging.getLogger("eyewall.proxy_protocol")

MAX_HEADER_BYTES = 8192  # a version 2 header announcing more is refused (TLVs included)
_SHORTEST = 15  # b"PROXY UNKNOWN\r\n"; a version 2 header has at least 16 bytes
# What happened to connections from the gate's point of view (the metric's labels).
RESULTS = ("proxy", "local", "untrusted", "missing", "invalid", "timeout", "closed")


class PeerClosed(Exception):
    """The peer closed the connection after ``received`` bytes of a header."""

    def __init__(self, received: int) -> None:
        super().__init__(f"closed after {received} bytes")
        self.received = received


class NotAHeader(ProxyProtocolError):
    """The connection does not begin with a PROXY header at all."""


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _recv(sock: socket.socket, n: int, flags: int = 0) -> bytes:
    """Up to ``n`` bytes from a non-blocking socket, waiting until some arrive."""
    while True:
        try:
            return sock.recv(n, flags)
        except (BlockingIOError, InterruptedError):
            await _readable(sock)


def _known_length(data: bytes | bytearray) -> int | None:
    """How long the header starting with ``data`` is, as far as its bytes tell: 15 (the
    shortest) until then, 16 plus the stated length for version 2, None for a version 1
    line that needs looking for its end."""
    if len(data) < _SHORTEST:
        return _SHORTEST
    if data[0] == ord("P"):  # version 1 ("PROXY ...\r\n"); parse has checked the rest
        return None
    if len(data) < 16:
        return 16
    return 16 + int.from_bytes(data[14:16], "big")


async def read_header(
    sock: socket.socket, max_length: int = MAX_HEADER_BYTES
) -> tuple[ProxyHeader, int]:
    """Read one PROXY header (version 1 or 2) from the non-blocking ``sock``, and not
    one byte more.  Returns the header and its length in bytes.

    Raises `NotAHeader` when the first bytes are no header's, `ProxyProtocolError` as
    soon as the bytes read prove the header invalid (§2.1, §2.2), `PeerClosed` when the
    peer closes first, OSError for a broken connection; bound the wait with a timeout
    around the call.
    """
    data = bytearray()
    while True:
        if looks_like_proxy_header(memoryview(data)) is False:
            raise NotAHeader(f"begins with {bytes(data[:16])!r}")
        result = parse(data, max_length=max_length)
        if result is not None:
            return result
        length = _known_length(data)
        if length is not None:
            chunk = await _recv(sock, length - len(data))
        else:  # a version 1 line: take what has come, through the LF if it is there
            seen = await _recv(sock, MAX_V1_HEADER - len(data), socket.MSG_PEEK)
            end = seen.find(b"\n")
            chunk = sock.recv(end + 1 if end >= 0 else len(seen)) if seen else b""
        if not chunk:
            raise PeerClosed(len(data))
        data += chunk


def _starts_with_header(sock: socket.socket) -> bool:
    """Whether the bytes already received on ``sock`` begin a PROXY header (peeked, so
    they stay there); False when none have arrived."""
    try:
        first = sock.recv(16, socket.MSG_PEEK)
    except OSError:  # BlockingIOError included: nothing yet
        return False
    return looks_like_proxy_header(first) is True


def _networks(values: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)


class ProxyProtocolGate:
    """The PROXY protocol rule for new connections (see the module docstring).

    ``trusted``: CIDR strings (``proxy_protocol.trusted``; empty turns the gate off);
    ``header_timeout``: seconds a trusted peer has for its whole header.  ``counts``
    holds a count per result of `RESULTS`.
    """

    def __init__(self, trusted: Iterable[str] = (), header_timeout: float = 3.0) -> None:
        self.counts = dict.fromkeys(RESULTS, 0)
        self.configure(trusted, header_timeout)

    def configure(self, trusted: Iterable[str], header_timeout: float) -> None:
        """Apply new settings (a reload) to connections accepted from now on."""
        self.trusted = NetworkSet(_networks(trusted), memo=4096)
        self.header_timeout = header_timeout

    @property
    def enabled(self) -> bool:
        """Whether any peer is trusted (else the PROXY protocol is off)."""
        return bool(self.trusted)

    def trusts(self, peer: str) -> bool:
        """Whether ``peer`` (an IP address; IPv4-mapped IPv6 counts as IPv4) is in a
        trusted network."""
        return peer in self.trusted

    async def client_of(self, sock: socket.socket, peer: tuple[str, int]) -> tuple[str, int] | None:
        """The client address of a connection accepted from ``peer``: the header's
        source, or ``peer`` itself (an untrusted peer, LOCAL, UNKNOWN or a unix-socket
        source).  None when the connection is refused: the caller closes it."""
        sock.setblocking(False)  # accepted sockets start blocking; IOStream does the same
        if not self.trusts(peer[0]):
            if _starts_with_header(sock):
                self._refuse(
                    "untrusted",
                    "%s sent a PROXY protocol header but is not in proxy_protocol.trusted",
                    peer[0],
                )
                return None
            return peer
        try:
            async with asyncio.timeout(self.header_timeout):
                header, _ = await read_header(sock)
        except TimeoutError:
            self._refuse(
                "timeout",
                "%s (trusted) sent no complete PROXY protocol header within %g s"
                " (proxy_protocol.header_timeout)",
                peer[0],
                self.header_timeout,
            )
            return None
        except PeerClosed as e:
            if e.received == 0:
                self.counts["closed"] += 1
            else:
                self._refuse("invalid", "%s closed inside its PROXY protocol header", peer[0])
            return None
        except NotAHeader:
            self._refuse(
                "missing",
                "%s is in proxy_protocol.trusted but did not begin with a PROXY protocol"
                " header (does the load balancer send it: send-proxy-v2?)",
                peer[0],
            )
            return None
        except ProxyProtocolError as e:
            self._refuse("invalid", "%s sent an invalid PROXY protocol header: %s", peer[0], e)
            return None
        except OSError as e:
            self.counts["closed"] += 1
            log.debug("reading the PROXY protocol header from %s: %s", peer[0], e)
            return None
        if header.command == "LOCAL":
            self.counts["local"] += 1
            return peer
        self.counts["proxy"] += 1
        return header.source or peer

    def _refuse(self, reason: str, message: str, *args: object) -> None:
        self.counts[reason] += 1
        log.warning("refused connection: " + message, *args)
