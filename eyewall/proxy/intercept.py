"""TLS interception of CONNECT tunnels: the proxy answers the CONNECT, speaks TLS to the
client with a certificate for the host minted by its own CA, and serves the decrypted
requests through the normal request path.

`Interception` holds what interception keeps between tunnels: the leaf-certificate
cache for the current CA, and which clients refused the certificate for which hosts
(``tls.passthrough_pinned``: a client that pins certificates gets a plain tunnel to
that host for an hour — that client and user only, so one client, or one user behind a
shared address, cannot turn interception off for another).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import OrderedDict

from tornado.iostream import IOStream, StreamClosedError

from eyewall.policy.auth import source_key
from eyewall.proxy.streams import TLSStream, start_tls
from eyewall.tls.ca import CertificateAuthority
from eyewall.tls.leaves import LeafCache

__all__ = ["CONNECT_ESTABLISHED", "HandshakeFailed", "Interception", "handshake_reason"]

log = logging.getLogger("eyewall.intercept")

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
PINNED_FOR = 3600.0  # seconds a client that refused interception gets a plain tunnel
PINNED_MAX = 10_000

_REFUSED_CERTIFICATE = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate_unknown",
}


class HandshakeFailed(Exception):
    """The client's TLS handshake failed; ``reason`` is a short label for metrics
    (``unknown_ca``, ``bad_certificate``, ``timeout``, ``closed``, ``protocol``) and
    ``refused_certificate`` tells whether the client rejected our certificate."""

    def __init__(self, reason: str, detail: str, refused_certificate: bool) -> None:
        super().__init__(detail)
        self.reason = reason
        self.refused_certificate = refused_certificate


def handshake_reason(error: BaseException) -> HandshakeFailed:
    """Classify an exception from a server-side TLS handshake."""
    if isinstance(error, TimeoutError):
        return HandshakeFailed("timeout", "TLS handshake timed out", False)
    reason = getattr(error, "reason", None) or ""
    label = _REFUSED_CERTIFICATE.get(reason)
    if label is not None:
        return HandshakeFailed(label, f"client refused the certificate ({reason})", True)
    if isinstance(error, ssl.SSLError):
        return HandshakeFailed("protocol", f"TLS handshake failed: {reason or error}", False)
    return HandshakeFailed("closed", "client closed the connection during the handshake", False)


class Interception:
    """What interception keeps: the CA (None until one is loaded), its leaf cache and
    the hosts pinned per client source and user."""

    def __init__(self, ca: CertificateAuthority | None, cache_size: int = 1024) -> None:
        self.ca = ca
        self.cache_size = cache_size
        self._leaves: LeafCache | None = None
        self._pinned: OrderedDict[tuple[str, str | None, str], float] = OrderedDict()

    def certificates(self) -> LeafCache:
        """The minted-certificate cache for the current CA (made on first use).
        Raises ValueError when no CA is loaded."""
        ca = self.ca
        if ca is None:
            raise ValueError("no interception CA loaded (run eyewall ca init)")
        if self._leaves is None or self._leaves.ca is not ca:
            if self._leaves is not None:
                self._leaves.close()
            self._leaves = LeafCache(ca, self.cache_size)
        return self._leaves

    def refused(self, client: str, user: str | None, host: str, now: float | None = None) -> None:
        """``client`` (an address), as ``user`` (None without authentication), refused our
        certificate for ``host``: tunnel their CONNECTs to it without interception for
        `PINNED_FOR` seconds."""
        now = time.monotonic() if now is None else now
        key = (source_key(client), user, host)
        self._pinned[key] = now + PINNED_FOR
        self._pinned.move_to_end(key)
        while len(self._pinned) > PINNED_MAX:
            self._pinned.popitem(last=False)
        who = client if user is None else f"user {user!r} at {client}"
        log.warning("%s will be tunnelled without interception for %s for an hour", host, who)

    def is_pinned(self, client: str, user: str | None, host: str, now: float | None = None) -> bool:
        """Whether ``client`` as ``user`` refused an intercepted handshake to ``host``
        recently (certificate pinning); such hosts are tunnelled for a while instead."""
        key = (source_key(client), user, host)
        until = self._pinned.get(key)
        if until is None:
            return False
        if until < (time.monotonic() if now is None else now):
            del self._pinned[key]
            return False
        return True

    def forget_pinned(self) -> int:
        """Intercept every host again (a reload: the client may trust the CA now); how
        many pinned hosts were forgotten."""
        n = len(self._pinned)
        self._pinned.clear()
        return n

    async def accept(self, sock_stream: IOStream, host: str, timeout: float) -> TLSStream:
        """Speak TLS to the client on ``sock_stream`` (its socket is taken over) with a
        certificate for ``host``; the handshake must finish within ``timeout`` seconds.
        Raises HandshakeFailed, or ValueError/OSError when no certificate can be made."""
        leaves = self.certificates()
        loop = asyncio.get_running_loop()
        ctx = await loop.run_in_executor(None, leaves.context, host)
        return await accept_tls(sock_stream, ctx, timeout)

    def close(self) -> None:
        """Remove the leaf certificates written to disk."""
        if self._leaves is not None:
            self._leaves.close()


async def accept_tls(stream: IOStream, ctx: ssl.SSLContext, timeout: float) -> TLSStream:
    """Speak TLS to the client on ``stream`` as the server, the handshake done within
    ``timeout`` seconds.  ``stream`` may already speak TLS (an intercepted CONNECT
    through the HTTPS proxy listener: TLS inside TLS); no read may be pending.  Raises
    HandshakeFailed; ``stream`` is spent either way."""
    try:
        async with asyncio.timeout(timeout):
            return await start_tls(stream, ctx, server_side=True)
    except (ssl.SSLError, OSError, StreamClosedError, TimeoutError) as e:
        raise handshake_reason(e) from None
