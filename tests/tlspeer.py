"""A blocking TLS peer for tests, spoken through memory buffers (`ssl.SSLObject`) over
any transport with ``sendall`` and ``recv``: a socket, or another `TLSPeer` (TLS inside
TLS, as a client of an HTTPS proxy speaks to an intercepted host).

Unlike `ssl.SSLSocket.unwrap`, `TLSPeer.close_notify` never reads from the transport, so
a test can half-close its TLS output and still read what the other side sends after it
(RFC 8446 §6.1) without racing that data.
"""

from __future__ import annotations

import ssl
from typing import Protocol

__all__ = ["TLSPeer"]


class Transport(Protocol):
    def sendall(self, data: bytes) -> None: ...

    def recv(self, size: int) -> bytes: ...


class TLSPeer:
    """A TLS connection over ``transport``, its handshake done on construction;
    ``first`` is application data sent with the handshake's last flight."""

    def __init__(
        self,
        transport: Transport,
        ctx: ssl.SSLContext,
        server_hostname: str | None = None,
        server_side: bool = False,
        first: bytes = b"",
    ) -> None:
        self.transport = transport
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("closed during the TLS handshake") from None
            except ssl.SSLError:
                self._flush()  # the alert
                raise
        if first:
            self.obj.write(first)
        self._flush()

    @property
    def socket(self) -> Transport:
        """The transport at the bottom (a socket), however deep the TLS."""
        transport = self.transport
        while isinstance(transport, TLSPeer):
            transport = transport.transport
        return transport

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.transport.sendall(data)

    def _fill(self) -> bool:
        data = self.transport.recv(1 << 16)
        if data:
            self.incoming.write(data)
        return bool(data)

    def sendall(self, data: bytes) -> None:
        """Send ``data`` as application data."""
        self.obj.write(data)
        self._flush()

    def recv(self, size: int = 1 << 16) -> bytes:
        """Up to ``size`` bytes of application data; b"" after the peer's close_notify or
        the transport's end."""
        while True:
            try:
                return self.obj.read(size)
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def recv_until_eof(self, data: bytes = b"") -> bytes:
        """Everything until the peer's close_notify (or the transport's end)."""
        while chunk := self.recv():
            data += chunk
        return data

    def close_notify(self) -> None:
        """End our output: send close_notify and go on reading."""
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._flush()
