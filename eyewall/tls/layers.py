"""TLS driven through memory: OpenSSL objects (`ssl.SSLObject`) fed and drained by the
proxy's own socket code through `ssl.MemoryBIO` buffers, never reading a socket
themselves.

Why not `ssl.SSLSocket`: the proxy relays half-closes, and a half-close over TLS is a
close_notify after which the peer may still send (RFC 8446 §6.1).  CPython's shutdown
call runs SSL_shutdown twice; the second call reads, and when the peer's application
data has already arrived OpenSSL fails the connection (APPLICATION_DATA_AFTER_CLOSE_NOTIFY)
and the data is lost.  On a socket that is a race the proxy loses whenever the peer
answers quickly.  Here the second call reads from the incoming buffer, which is empty
whenever the proxy sends a close_notify (every `TLSStack.receive` drains it), so there is
nothing for it to find; the data is read later, by a read.

Memory buffers also stack: a TLS connection inside another (an intercepted CONNECT sent
through the HTTPS proxy listener) is one more `TLSLayer`, whose records travel as the
application data of the layer beneath it.
"""

from __future__ import annotations

import ssl

__all__ = ["TLSLayer", "TLSStack", "alert", "starts_tls"]

READ_SIZE = 1 << 14  # the most plaintext one TLS record carries (RFC 8446 §5.1)
HANDSHAKE_RECORD = 0x16  # ContentType handshake (RFC 8446 §5.1)
SSL2_CLIENT_HELLO = 0x01  # an SSL 2.0-format CLIENT-HELLO (RFC 6101 §E.1)
HANDSHAKE_FAILURE = 40  # AlertDescription values (RFC 8446 §6)
INTERNAL_ERROR = 80


def alert(description: int) -> bytes:
    """A fatal alert record (RFC 8446 §6) with ``description`` (an AlertDescription),
    for a peer whose handshake will not be answered: it reads a reason instead of an
    unexplained end of the connection."""
    return bytes([0x15, 3, 1, 0, 2, 2, description])


def starts_tls(data: bytes) -> bool:
    """Whether ``data``, the first bytes a client sent, begin a TLS handshake: a
    handshake record, or the SSL 2.0-format ClientHello old clients still send (a
    two-byte header with the top bit set, then message type 1).  No HTTP request starts
    with either byte: a method is ASCII."""
    if not data:
        return False
    if data[0] == HANDSHAKE_RECORD:
        return True
    return data[0] >= 0x80 and (len(data) < 3 or data[2] == SSL2_CLIENT_HELLO)


class TLSLayer:
    """One TLS connection, spoken through two memory buffers: ``incoming`` (records
    from the peer) and ``outgoing`` (records for the peer)."""

    __slots__ = ("ended", "incoming", "obj", "outgoing")

    def __init__(
        self, ctx: ssl.SSLContext, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.ended = False  # the peer's close_notify arrived

    def handshake(self) -> bool:
        """Take the handshake as far as the records fed so far allow; True once it is
        complete.  Raises ssl.SSLError (ssl.SSLCertVerificationError for a certificate
        that fails verification)."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def read(self) -> bytes:
        """All the application data the records fed so far complete (the incoming buffer
        is empty afterwards).  Raises ssl.SSLError."""
        chunks = []
        while not self.ended:
            try:
                chunk = self.obj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify, after ours
                chunk = b""
            if chunk:
                chunks.append(chunk)
            else:  # close_notify
                self.ended = True
        return b"".join(chunks)


class TLSStack:
    """The TLS layers spoken over one socket: ``layers[0]`` on the socket itself, each
    next one inside the one before.  Application data is the innermost layer's;
    ``outgoing`` holds records for the socket not sent yet, in the order they must go."""

    __slots__ = ("layers", "outgoing")

    def __init__(self, layers: list[TLSLayer], outgoing: bytearray | None = None) -> None:
        self.layers = layers
        self.outgoing = bytearray() if outgoing is None else outgoing

    def inside(self, layer: TLSLayer) -> TLSStack:
        """This stack with ``layer`` spoken inside its innermost layer (TLS in TLS);
        records not sent yet go with it."""
        return TLSStack([*self.layers, layer], self.outgoing)

    @property
    def ended(self) -> bool:
        """Whether a close_notify ended the input: no more application data will come."""
        return any(layer.ended for layer in self.layers)

    def receive(self, data: bytes | memoryview) -> bytes:
        """The application data that ``data``, bytes read from the socket, completes.
        Anything OpenSSL answers on its own (a KeyUpdate's answer) is queued on
        ``outgoing``.  Raises ssl.SSLError."""
        for layer in self.layers:
            if data:
                layer.incoming.write(data)
            data = layer.read()
        self._seal(b"")
        return bytes(data)

    def send(self, data: bytes | memoryview) -> None:
        """Queue ``data`` on ``outgoing`` as records of the innermost layer (wrapped in the
        layers beneath it)."""
        self._seal(data)

    def close_notify(self) -> None:
        """End the innermost layer's output (RFC 8446 §6.1): its close_notify is queued on
        ``outgoing``; the peer may still send, and reading goes on.

        Safe because `receive` leaves no unread record behind: OpenSSL's second shutdown
        step finds the incoming buffer empty and waits, where on a socket it could read
        the peer's next record and fail the connection with it."""
        try:
            self.layers[-1].obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # ours is out; the peer's is not in yet
        self._seal(b"")

    def _seal(self, data: bytes | memoryview) -> None:
        """Write ``data`` to the innermost layer, then carry every layer's output down
        through the layers beneath it onto ``outgoing``."""
        for layer in reversed(self.layers):
            while data:
                written = layer.obj.write(data)
                data = memoryview(data)[written:]
            data = layer.outgoing.read()
        self.outgoing += data
