"""Which header fields cross the hop, and the heads the proxy writes.

Pure functions over parsed heads and a `Framing`: the I/O layer sends what they return.
The RFC rule is named where it applies.
"""

from __future__ import annotations

from eyewall.http1.framing import BodyKind, Framing
from eyewall.http1.parse import Headers, ParseError, RequestHead, ResponseHead
from eyewall.http1.target import Target

__all__ = [
    "HOP_BY_HOP",
    "MAX_FORWARDS_CAP",
    "SENSITIVE",
    "max_forwards",
    "render_request",
    "render_response",
    "response_fields",
    "trace_echo",
    "upstream_fields",
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
# RFC 9110 §9.3.8: request fields likely to hold credentials, left out of a TRACE echo.
SENSITIVE = frozenset({"authorization", "proxy-authorization", "cookie"})
# Max-Forwards values above this count as this (2**31 - 1: what a 32-bit counter holds).
MAX_FORWARDS_CAP = 2**31 - 1


def max_forwards(head: RequestHead) -> int | None:
    """The Max-Forwards count of an OPTIONS or TRACE request (RFC 9110 §7.6.2).

    None when the field is absent or the method is another (the field means nothing
    there).  A value above `MAX_FORWARDS_CAP` counts as the cap, so any number of
    digits is read in constant time.  Anything but one line of ``1*DIGIT`` raises
    ParseError (400).

    At 0 the proxy is the final recipient and answers itself: a TRACE with 200,
    ``Content-Type: message/http`` and `trace_echo` as the body; an OPTIONS with 200,
    ``Content-Length: 0`` and no Allow field (the proxy claims no resource; RFC 9110
    §9.3.7).  Above 0 the request is forwarded with the count less one
    (`upstream_fields` does that).
    """
    if head.method not in ("OPTIONS", "TRACE") or "max-forwards" not in head.headers.index:
        return None
    values = head.headers.get_all("max-forwards")
    if len(values) != 1 or not (values[0].isascii() and values[0].isdigit()):
        raise ParseError("invalid Max-Forwards")
    digits = values[0].lstrip("0")
    if len(digits) > len(str(MAX_FORWARDS_CAP)):
        return MAX_FORWARDS_CAP
    return min(int(digits or "0"), MAX_FORWARDS_CAP)


def trace_echo(head: RequestHead) -> bytes:
    """The body of a TRACE answered by the proxy itself: the request as received, as a
    ``message/http`` document (RFC 9110 §9.3.8), without the `SENSITIVE` fields."""
    lines = [f"{head.method} {head.target} {head.version}"]
    lines.extend(f"{n}: {v}" for n, v in head.headers.fields if n.lower() not in SENSITIVE)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def _dropped(headers: Headers) -> frozenset[str]:
    """Fields removed at this hop: the fixed list and every Connection option, except
    that an option can never remove Content-Length (the framing actually used).

    The other fields the proxy acts on are safe from Connection options too: Host and
    Transfer-Encoding are written from the target and the framing, Upgrade only for a
    WebSocket upgrade, Max-Forwards is exempted by `upstream_fields`, and an Expect an
    option removes is answered by the proxy itself (`eyewall.proxy.exchange`)."""
    if "connection" not in headers.index:
        return HOP_BY_HOP
    named = headers.tokens("connection")
    if HOP_BY_HOP.issuperset(named):  # none, or "close", "keep-alive", "upgrade"
        return HOP_BY_HOP
    return HOP_BY_HOP.union(named).difference(("content-length",))


def upstream_fields(
    head: RequestHead, target: Target, framing: Framing, via: str, upgrade: bool = False
) -> list[tuple[str, str]]:
    """The request fields sent to the origin, as ``(name, value)`` pairs in order.

    Host comes first and is taken from the target (RFC 9112 §3.2.2); hop-by-hop fields
    and every field named by Connection are removed (RFC 9110 §7.6.1); Content-Length
    is normalised to one value; a chunked body is re-framed as chunked; Expect is dropped
    from HTTP/1.0 requests (RFC 9110 §10.1.1); the Max-Forwards of an OPTIONS or TRACE
    goes down by one (RFC 9110 §7.6.2: the caller answers a 0 itself, see
    `max_forwards`; a value it did not check is passed on as it is), even when a
    Connection option names it (each intermediary MUST update it; §7.6.1 forbids naming
    such an end-to-end field); Via is appended (RFC 9110 §7.6.3).
    """
    drop = _dropped(head.headers)
    out = [("Host", target.authority)]
    length_written = False
    http10 = head.version == "HTTP/1.0"
    count_hops = head.method in ("OPTIONS", "TRACE")
    if count_hops and "max-forwards" in drop:
        drop = drop.difference(("max-forwards",))
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
        elif key == "max-forwards" and count_hops:
            try:
                hops = max_forwards(head)
            except ParseError:
                hops = None
            if hops:
                value = str(hops - 1)
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
    """The response fields sent to the client, re-framed for it as ``framing`` (from
    `downstream_framing`) says.

    Hop-by-hop fields go as in `upstream_fields`.  Content-Length is kept only for a
    LENGTH body and for HEAD and 304 answers, which describe a representation (RFC 9110
    §8.6); a chunked body gets ``Transfer-Encoding`` listing the codings the proxy did
    not decode and then ``chunked`` (RFC 9112 §6.1).  Connection says ``close`` or
    ``keep-alive`` where the client's default differs from ``keep_alive`` (RFC 9112
    §9.3); Via is appended.
    """
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
        out.append(("Transfer-Encoding", ", ".join((*framing.codings, "chunked"))))
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
    """An HTTP/1.1 request head: request line, field lines, empty line (latin-1)."""
    lines = [f"{n}: {v}\r\n" for n, v in fields]
    return f"{method} {path} HTTP/1.1\r\n{''.join(lines)}\r\n".encode("latin-1")


def render_response(status: int, reason: str, fields: list[tuple[str, str]]) -> bytes:
    """An HTTP/1.1 response head: status line, field lines, empty line (latin-1)."""
    lines = [f"{n}: {v}\r\n" for n, v in fields]
    return f"HTTP/1.1 {status} {reason}\r\n{''.join(lines)}\r\n".encode("latin-1")
