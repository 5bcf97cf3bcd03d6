"""What a forward proxy decides about each message it relays: body framing, connection
reuse, and which fields cross the hop.  Pure functions; the RFC step is named at each rule.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from eyewall.http1.parse import Headers, ParseError, RequestHead, ResponseHead
from eyewall.http1.target import Target

__all__ = [
    "HOP_BY_HOP",
    "NO_BODY",
    "BodyKind",
    "Framing",
    "client_keeps_alive",
    "downstream_framing",
    "render_request",
    "render_response",
    "request_framing",
    "response_fields",
    "response_framing",
    "upstream_fields",
    "upstream_reusable",
    "websocket_upgrade",
]

# RFC 9110 §7.6.1 and RFC 9112 §6-7: fields that describe one hop, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class BodyKind(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    CLOSE = "close"  # delimited by the end of the connection (responses only)


class Framing(NamedTuple):
    kind: BodyKind
    length: int = 0


NO_BODY = Framing(BodyKind.NONE)
CHUNKED = Framing(BodyKind.CHUNKED)
UNTIL_CLOSE = Framing(BodyKind.CLOSE)


def is_idempotent(method: str) -> bool:
    """RFC 9110 §9.2.2: requests that may be sent again after a connection failure."""
    return method in _IDEMPOTENT


def content_length(values: list[str], status: int = 400) -> int:
    """RFC 9112 §6.3 rule 5: identical repeated values collapse, anything else is an error."""
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


def request_framing(head: RequestHead) -> Framing:
    """RFC 9112 §6.3 for requests, refusing every ambiguity a smuggler could use."""
    headers = head.headers
    index = headers.index
    te = index.get("transfer-encoding")
    cl = index.get("content-length")
    if te is not None:
        if cl:
            raise ParseError("both Content-Length and Transfer-Encoding")
        if head.version == "HTTP/1.0":
            raise ParseError("Transfer-Encoding in an HTTP/1.0 request")
        if headers.tokens("transfer-encoding") != ["chunked"]:
            raise ParseError("unsupported Transfer-Encoding")
        return CHUNKED
    if cl is not None:
        length = content_length(headers.get_all("content-length"))
        return Framing(BodyKind.LENGTH, length) if length else NO_BODY
    return NO_BODY


def response_framing(method: str, head: ResponseHead) -> Framing:
    """RFC 9112 §6.3 for a response to ``method``; errors carry status 502."""
    status = head.status
    if method == "HEAD" or status in (204, 304) or status < 200:
        return NO_BODY
    headers = head.headers
    index = headers.index
    te = index.get("transfer-encoding")
    cl = index.get("content-length")
    if te is not None:
        if cl:
            raise ParseError("both Content-Length and Transfer-Encoding", 502)
        if head.version == "HTTP/1.0":
            raise ParseError("Transfer-Encoding in an HTTP/1.0 response", 502)
        if headers.tokens("transfer-encoding") != ["chunked"]:
            raise ParseError("unsupported Transfer-Encoding", 502)
        return CHUNKED
    if cl is not None:
        return Framing(BodyKind.LENGTH, content_length(headers.get_all("content-length"), 502))
    return UNTIL_CLOSE


def downstream_framing(upstream: Framing, client_version: str) -> Framing:
    """How the proxy frames a body for its client.

    A length is kept; chunked and close-delimited bodies become chunked for HTTP/1.1
    clients and close-delimited for HTTP/1.0 clients, which never see chunked framing.
    """
    if upstream.kind in (BodyKind.CHUNKED, BodyKind.CLOSE):
        return CHUNKED if client_version == "HTTP/1.1" else UNTIL_CLOSE
    return upstream


def client_keeps_alive(head: RequestHead) -> bool:
    """RFC 9112 §9.3: whether the client expects the connection to persist."""
    if "connection" not in head.headers.index:
        return head.version == "HTTP/1.1"
    tokens = head.headers.tokens("connection")
    if "close" in tokens:
        return False
    return head.version == "HTTP/1.1" or "keep-alive" in tokens


def upstream_reusable(head: ResponseHead) -> bool:
    """Whether the origin lets the connection carry another request (RFC 9112 §9.3)."""
    if "connection" not in head.headers.index:
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


def _dropped(headers: Headers) -> frozenset[str]:
    """Fields removed at this hop: the fixed list and every Connection option, except
    that an option can never remove Content-Length (the framing actually used)."""
    if "connection" not in headers.index:
        return HOP_BY_HOP
    named = headers.tokens("connection")
    if not named:
        return HOP_BY_HOP
    return HOP_BY_HOP.union(named).difference(("content-length",))


def upstream_fields(
    head: RequestHead, target: Target, framing: Framing, via: str, upgrade: bool = False
) -> list[tuple[str, str]]:
    """The request fields sent to the origin.

    Host comes first and is taken from the target (RFC 9112 §3.2.2); hop-by-hop fields
    and every field named by Connection are removed (RFC 9110 §7.6.1); Content-Length
    is normalised to one value; a chunked body is re-framed as chunked; Expect is dropped
    from HTTP/1.0 requests (RFC 9110 §10.1.1); Via is appended (RFC 9110 §7.6.3).
    """
    drop = _dropped(head.headers)
    out = [("Host", target.authority)]
    length_written = False
    http10 = head.version == "HTTP/1.0"
    for name, value in head.headers.fields:
        key = name.lower()
        if key in drop or key == "host":
            continue
        if key == "content-length":
            if length_written:
                continue
            value = str(framing.length)
            length_written = True
        elif key == "expect" and http10:
            continue
        out.append((name, value))
    if framing.kind is BodyKind.CHUNKED:
        out.append(("Transfer-Encoding", "chunked"))
    if upgrade:
        out.append(("Connection", "upgrade"))
        out.append(("Upgrade", head.headers.get("upgrade") or "websocket"))
    out.append(("Via", f"{head.version[5:]} {via}"))
    return out


def response_fields(
    head: ResponseHead,
    framing: Framing,
    client_version: str,
    keep_alive: bool,
    via: str,
    upgrade: bool = False,
) -> list[tuple[str, str]]:
    """The response fields sent to the client, re-framed for it as ``framing`` says."""
    drop = _dropped(head.headers)
    status = head.status
    # HEAD and 304 responses keep the length of the representation they describe;
    # 1xx and 204 never carry one (RFC 9110 §8.6).
    keep_length = framing.kind is BodyKind.LENGTH or (
        framing.kind is BodyKind.NONE and status >= 200 and status != 204
    )
    out = []
    length_written = False
    for name, value in head.headers.fields:
        key = name.lower()
        if key in drop:
            continue
        if key == "content-length":
            if length_written or not keep_length:
                continue
            if framing.kind is BodyKind.LENGTH:
                value = str(framing.length)
            length_written = True
        out.append((name, value))
    if framing.kind is BodyKind.CHUNKED:
        out.append(("Transfer-Encoding", "chunked"))
    if upgrade:
        out.append(("Connection", "upgrade"))
        out.append(("Upgrade", head.headers.get("upgrade") or "websocket"))
    elif head.status >= 200:
        if not keep_alive and client_version == "HTTP/1.1":
            out.append(("Connection", "close"))
        elif keep_alive and client_version == "HTTP/1.0":
            out.append(("Connection", "keep-alive"))
    out.append(("Via", f"{head.version[5:]} {via}"))
    return out


def render_request(method: str, path: str, fields: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    lines.extend(f"{n}: {v}" for n, v in fields)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def render_response(status: int, reason: str, fields: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{n}: {v}" for n, v in fields)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")
