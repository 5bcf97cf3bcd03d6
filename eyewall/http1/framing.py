"""Where each message the proxy relays ends, and whether its connection carries another.

Small pure decisions over parsed heads, each following one RFC section (the step is
named at each rule, as h11's ``_body_framing`` and ``_keep_alive`` do).  Errors are
`ParseError`: status 400 for a request (the client broke HTTP), 502 for a response (the
origin did).
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple, overload

from eyewall.http1.methods import REGISTERED
from eyewall.http1.parse import ParseError, RequestHead, ResponseHead

__all__ = [
    "NO_BODY",
    "BodyKind",
    "Framing",
    "body_framing",
    "content_length",
    "downstream_framing",
    "expects_continue",
    "is_idempotent",
    "keep_alive",
    "websocket_upgrade",
]


class BodyKind(enum.Enum):
    """How a body is delimited on the wire (RFC 9112 §6.3)."""

    NONE = "none"  # no body at all
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # the chunked transfer coding (RFC 9112 §7.1)
    CLOSE = "close"  # everything until the sender closes (responses only)


class Framing(NamedTuple):
    """How one body is framed.

    ``length`` is the byte count of a LENGTH body (0 otherwise).  ``codings`` are the
    transfer codings other than chunked that the sender applied, in the order applied,
    lower-cased (``("gzip",)`` for ``Transfer-Encoding: gzip, chunked``): the proxy does
    not decode them, so they travel on to the client in its Transfer-Encoding field.
    They only occur on responses; requests carry exactly ``chunked`` or nothing.
    """

    kind: BodyKind
    length: int = 0
    codings: tuple[str, ...] = ()


NO_BODY = Framing(BodyKind.NONE)
CHUNKED = Framing(BodyKind.CHUNKED)
UNTIL_CLOSE = Framing(BodyKind.CLOSE)

# RFC 9112 §7 transfer-coding: token *( OWS ";" OWS token "=" ( token / quoted-string ) )
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9a-z]+"
_CODING = re.compile(
    rf'{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\.)*"))*'
)


def is_idempotent(method: str) -> bool:
    """RFC 9110 §9.2.2: whether a request may be sent again after a connection failure.

    True for the methods the IANA method registry marks idempotent (see `methods`);
    an unregistered method is not.
    """
    entry = REGISTERED.get(method)
    return entry is not None and entry[1]


def content_length(values: list[str], status: int = 400) -> int:
    """The value of the Content-Length lines ``values``, in bytes.

    RFC 9112 §6.3 rule 5: a list of identical values (in one line or several) is that
    value; anything else (different values, a sign, a non-ASCII digit, more than 18
    digits) raises ParseError with ``status``.
    """
    if len(values) == 1 and values[0].isdigit() and values[0].isascii() and len(values[0]) < 19:
        return int(values[0])
    seen = set()
    for value in values:
        for part in value.split(","):
            part = part.strip(" \t")
            if not (part.isascii() and part.isdigit()) or len(part) > 18:
                raise ParseError("invalid Content-Length", status)
            seen.add(int(part))
    if len(seen) != 1:
        raise ParseError("conflicting Content-Length values", status)
    return seen.pop()


@overload
def body_framing(head: RequestHead, request_method: None = None) -> Framing: ...
@overload
def body_framing(head: ResponseHead, request_method: str) -> Framing: ...
def body_framing(head: RequestHead | ResponseHead, request_method: str | None = None) -> Framing:
    """How the body of ``head`` is delimited: RFC 9112 §6.3, rule by rule.

    For a request, ``request_method`` is None; for a response it is the method of the
    request answered.  Requests are held to exactly one unambiguous framing (smuggling
    defence): errors carry status 400.  Responses follow the RFC's recipient rules,
    repairing what it lets a recipient repair: errors carry status 502.
    """
    if request_method is None:
        if not isinstance(head, RequestHead):
            raise TypeError("a response needs the method of its request")
        return _request_framing(head)
    if not isinstance(head, ResponseHead):
        raise TypeError("request_method is for responses")
    status = head.status
    # 1. A response to HEAD, and any 1xx, 204 or 304 response, ends with its head.
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    # 2. A 2xx response to CONNECT turns the connection into a tunnel: no body.
    if request_method == "CONNECT" and status < 300:
        return NO_BODY
    headers = head.headers
    if "transfer-encoding" in headers.index:
        # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing.
        if head.version == "HTTP/1.0":
            raise ParseError("Transfer-Encoding in an HTTP/1.0 response", 502)
        # 3. Transfer-Encoding overrides Content-Length (which `response_fields` drops,
        # and after which `keep_alive` closes the connection).  "identity" (an obsolete
        # no-op coding) is dropped, as curl does.
        codings = [c for c in headers.tokens("transfer-encoding") if c != "identity"]
        for coding in codings:
            if not _CODING.fullmatch(coding):
                raise ParseError("invalid Transfer-Encoding", 502)
        final = len(codings)
        while final and codings[final - 1] == "chunked":
            final -= 1
        kept = tuple(codings[:final])
        for coding in kept:
            if coding.partition(";")[0].rstrip(" \t") == "chunked":
                raise ParseError(
                    "chunked is not the final transfer coding"
                    if coding == "chunked"
                    else "parameters on the chunked transfer coding",
                    502,
                )
        if final < len(codings):
            # 3. chunked is the final coding: read chunks.  A repeated final chunked is
            # decoded once, as curl and Chromium do (RFC 9112 §6.1 forbids sending it twice).
            return Framing(BodyKind.CHUNKED, 0, kept)
        # 4. Transfer-Encoding without a final chunked: read until the origin closes.
        return Framing(BodyKind.CLOSE, 0, kept)
    if "content-length" in headers.index:
        # 5. A valid Content-Length gives the length; an invalid one is an error.
        return Framing(BodyKind.LENGTH, content_length(headers.get_all("content-length"), 502))
    # 7. Otherwise a response body lasts until the origin closes the connection.
    return UNTIL_CLOSE


def _request_framing(head: RequestHead) -> Framing:
    # RFC 9112 §6.3 for requests, refusing every ambiguity a smuggler could use.
    headers = head.headers
    index = headers.index
    if "transfer-encoding" in index:
        # 3. Both framings at once may be a smuggling attempt: refused (RFC 9112 §6.1).
        if "content-length" in index:
            raise ParseError("both Content-Length and Transfer-Encoding")
        # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing.
        if head.version == "HTTP/1.0":
            raise ParseError("Transfer-Encoding in an HTTP/1.0 request")
        # 4. Anything but chunked alone cannot be delimited reliably: 400.
        if headers.tokens("transfer-encoding") != ["chunked"]:
            raise ParseError("unsupported Transfer-Encoding")
        return CHUNKED
    if "content-length" in index:
        # 5. A valid Content-Length gives the length.
        length = content_length(headers.get_all("content-length"))
        return Framing(BodyKind.LENGTH, length) if length else NO_BODY
    # 6. A request with neither has no body.
    return NO_BODY


def downstream_framing(upstream: Framing, client_version: str) -> Framing:
    """How the proxy frames a body for a client speaking ``client_version``.

    A length is kept.  A chunked or close-delimited body is sent chunked to an HTTP/1.1
    client, with the transfer codings it still carries listed before chunked.  An
    HTTP/1.0 client cannot receive transfer codings (RFC 9112 §6.1): it gets the body
    close-delimited, or, when the body carries codings the proxy does not decode,
    a ParseError with status 502.
    """
    if upstream.kind in (BodyKind.CHUNKED, BodyKind.CLOSE):
        if client_version == "HTTP/1.1":
            return Framing(BodyKind.CHUNKED, 0, upstream.codings)
        if upstream.codings:
            raise ParseError(
                f"transfer coding {', '.join(upstream.codings)} cannot be sent to an"
                " HTTP/1.0 client",
                502,
            )
        return UNTIL_CLOSE
    return upstream


def keep_alive(head: RequestHead | ResponseHead) -> bool:
    """Whether the connection the message came on may carry another (RFC 9112 §9.3).

    ``close`` in Connection ends it; HTTP/1.1 persists by default and HTTP/1.0 only with
    ``keep-alive``.  A message with both Content-Length and Transfer-Encoding (only a
    response gets this far) ends it too: its sender's framing is suspect (RFC 9112
    §6.1, §6.3 rule 3).  Whether the body's framing allows reuse is the caller's part.
    """
    index = head.headers.index
    if "transfer-encoding" in index and "content-length" in index:
        return False
    if "connection" not in index:
        return head.version == "HTTP/1.1"
    tokens = head.headers.tokens("connection")
    if "close" in tokens:
        return False
    return head.version == "HTTP/1.1" or "keep-alive" in tokens


def websocket_upgrade(head: RequestHead) -> bool:
    """A GET asking to switch to WebSocket (RFC 6455 §4.1); other upgrades are dropped."""
    return (
        head.method == "GET"
        and "upgrade" in head.headers.index
        and head.version == "HTTP/1.1"
        and "upgrade" in head.headers.tokens("connection")
        and "websocket" in head.headers.tokens("upgrade")
    )


def expects_continue(head: RequestHead) -> bool:
    """Whether the client waits for ``100 (Continue)`` before sending the body: an
    HTTP/1.1 request with ``Expect: 100-continue`` (RFC 9110 §10.1.1; an HTTP/1.0
    client cannot receive a 1xx, so its Expect means nothing).  The caller knows whether
    a body is announced."""
    return (
        head.version == "HTTP/1.1"
        and "expect" in head.headers.index
        and "100-continue" in head.headers.tokens("expect")
    )
