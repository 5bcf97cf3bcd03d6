"""Unit tests for eyewall.http1.message (framing, persistence, which fields cross the hop)
and eyewall.errors (error kinds, statuses, error pages)."""

from __future__ import annotations

import re
from http import HTTPStatus

import pytest

from eyewall.errors import ErrorKind, error_page, proxy_status_type, status_of
from eyewall.http1 import message as m
from eyewall.http1.message import NO_BODY, BodyKind, Framing
from eyewall.http1.parse import Headers, ParseError, RequestHead, ResponseHead, parse_response_head
from eyewall.http1.target import parse_target

CHUNKED = Framing(BodyKind.CHUNKED)
CLOSE = Framing(BodyKind.CLOSE)
CL, TE = "Content-Length", "Transfer-Encoding"


def req(*fields, version="HTTP/1.1", method="POST"):
    return RequestHead(method, "http://o.test/p", version, Headers(fields))


def resp(status, *fields, version="HTTP/1.1"):
    return ResponseHead(version, status, "R", Headers(fields))


def length(n):
    return Framing(BodyKind.LENGTH, n)


# -- request framing (RFC 9112 §6.1-§6.3) -------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([], NO_BODY),
        ([(CL, "5")], length(5)),
        ([(CL, "0")], NO_BODY),
        ([(CL, "007")], length(7)),
        ([(CL, "5"), ("content-length", "5")], length(5)),
        ([(CL, "5, 5")], length(5)),
        ([(CL, "5,5"), (CL, "5")], length(5)),
        ([(TE, "chunked")], CHUNKED),
        ([(TE, "Chunked")], CHUNKED),
    ],
    ids=[
        "none",
        "cl",
        "cl 0",
        "leading zeros",
        "equal lines",
        "equal list",
        "list and line",
        "chunked",
        "Chunked",
    ],
)
def test_request_framing(fields, expected):
    assert m.request_framing(req(*fields)) == expected


@pytest.mark.parametrize(
    "fields",
    [
        [(CL, "5"), (CL, "6")],
        [(CL, "5, 6")],
        [(CL, "+5")],
        [(CL, "-1")],
        [(CL, "\xb2")],
        [(CL, "\u0665")],
        [(CL, "")],
        [(CL, "5 5")],
        [(CL, "0x5")],
        [(CL, "5,")],
        [(CL, "1" * 19)],
        [(CL, "3"), (TE, "chunked")],
        [(TE, "chunked, chunked")],
        [(TE, "chunked"), (TE, "chunked")],
        [(TE, "gzip, chunked")],
        [(TE, "chunked, gzip")],
        [(TE, "identity")],
        [(TE, "")],
        [(TE, ",")],
    ],
    ids=[
        "unequal lines",
        "unequal list",
        "plus",
        "negative",
        "superscript two",
        "arabic digit",
        "empty",
        "inner space",
        "hex",
        "trailing comma",
        "19 digits",
        "cl+te",
        "chunked twice",
        "two te lines",
        "gzip,chunked",
        "chunked,gzip",
        "identity",
        "empty te",
        "comma te",
    ],
)
def test_request_framing_errors(fields):
    with pytest.raises(ParseError) as info:
        m.request_framing(req(*fields))
    assert info.value.status == 400


@pytest.mark.parametrize("fields", [[(TE, "chunked")], [(TE, "chunked"), (CL, "5")]])
def test_transfer_encoding_in_http10_request_is_an_error(fields):
    with pytest.raises(ParseError):
        m.request_framing(req(*fields, version="HTTP/1.0"))


# -- response framing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status", "fields", "version", "expected"),
    [
        ("HEAD", 200, [(CL, "10")], "HTTP/1.1", NO_BODY),
        ("HEAD", 200, [(CL, "1"), (TE, "chunked")], "HTTP/1.1", NO_BODY),
        ("GET", 100, [], "HTTP/1.1", NO_BODY),
        ("GET", 103, [("Link", "</s>")], "HTTP/1.1", NO_BODY),
        ("GET", 204, [(CL, "5")], "HTTP/1.1", NO_BODY),
        ("GET", 304, [(CL, "10")], "HTTP/1.1", NO_BODY),
        ("GET", 200, [(CL, "10")], "HTTP/1.1", length(10)),
        ("POST", 201, [(CL, "2, 2")], "HTTP/1.1", length(2)),
        ("GET", 200, [(TE, "chunked")], "HTTP/1.1", CHUNKED),
        ("GET", 200, [], "HTTP/1.1", CLOSE),
        ("GET", 200, [], "HTTP/1.0", CLOSE),
        ("GET", 200, [(CL, "3")], "HTTP/1.0", length(3)),
    ],
)
def test_response_framing(method, status, fields, version, expected):
    assert m.response_framing(method, resp(status, *fields, version=version)) == expected


def test_response_content_length_zero_means_empty_body():
    framing = m.response_framing("GET", resp(200, (CL, "0")))
    assert framing.kind in (BodyKind.LENGTH, BodyKind.NONE) and framing.length == 0


@pytest.mark.parametrize(
    ("fields", "version"),
    [
        ([(CL, "3"), (TE, "chunked")], "HTTP/1.1"),
        ([(TE, "chunked")], "HTTP/1.0"),
        ([(CL, "3"), (CL, "4")], "HTTP/1.1"),
        ([(CL, "abc")], "HTTP/1.1"),
    ],
    ids=["cl+te", "te in 1.0", "unequal cl", "bad cl"],
)
def test_response_framing_errors_answer_502(fields, version):
    with pytest.raises(ParseError) as info:
        m.response_framing("GET", resp(200, *fields, version=version))
    assert info.value.status == 502


@pytest.mark.parametrize(
    ("upstream", "client", "expected"),
    [
        (CHUNKED, "HTTP/1.1", CHUNKED),
        (CLOSE, "HTTP/1.1", CHUNKED),
        (CHUNKED, "HTTP/1.0", CLOSE),
        (CLOSE, "HTTP/1.0", CLOSE),
        (length(4), "HTTP/1.0", length(4)),
        (NO_BODY, "HTTP/1.1", NO_BODY),
    ],
)
def test_downstream_framing(upstream, client, expected):
    assert m.downstream_framing(upstream, client) == expected


# -- persistence and upgrades (RFC 9112 §9.3, RFC 6455 §4.1) ------------------------------

KEEP_ALIVE = [
    ("HTTP/1.1", [], True),
    ("HTTP/1.1", ["close"], False),
    ("HTTP/1.1", ["Close"], False),
    ("HTTP/1.1", ["keep-alive, CLOSE"], False),
    ("HTTP/1.1", ["foo", " close"], False),
    ("HTTP/1.1", ["foo, bar"], True),
    ("HTTP/1.1", ["closed"], True),
    ("HTTP/1.0", [], False),
    ("HTTP/1.0", ["keep-alive"], True),
    ("HTTP/1.0", ["Keep-Alive"], True),
    ("HTTP/1.0", ["foo ,keep-alive"], True),
    ("HTTP/1.0", ["keep-alive, close"], False),
]


@pytest.mark.parametrize(("version", "connection", "expected"), KEEP_ALIVE)
def test_client_keeps_alive(version, connection, expected):
    head = req(*[("Connection", v) for v in connection], version=version)
    assert m.client_keeps_alive(head) is expected


@pytest.mark.parametrize(("version", "connection", "expected"), KEEP_ALIVE)
def test_upstream_reusable(version, connection, expected):
    head = resp(200, *[("Connection", v) for v in connection], version=version)
    assert m.upstream_reusable(head) is expected


@pytest.mark.parametrize(
    ("method", "version", "fields", "expected"),
    [
        ("GET", "HTTP/1.1", [("Connection", "Upgrade"), ("Upgrade", "websocket")], True),
        (
            "GET",
            "HTTP/1.1",
            [("Connection", "keep-alive, upgrade"), ("Upgrade", "WebSocket")],
            True,
        ),
        ("POST", "HTTP/1.1", [("Connection", "Upgrade"), ("Upgrade", "websocket")], False),
        ("GET", "HTTP/1.0", [("Connection", "Upgrade"), ("Upgrade", "websocket")], False),
        ("GET", "HTTP/1.1", [("Upgrade", "websocket")], False),
        ("GET", "HTTP/1.1", [("Connection", "Upgrade"), ("Upgrade", "h2c")], False),
        ("GET", "HTTP/1.1", [("Connection", "Upgrade")], False),
    ],
)
def test_websocket_upgrade(method, version, fields, expected):
    assert m.websocket_upgrade(req(*fields, version=version, method=method)) is expected


# -- fields sent upstream (RFC 9110 §7.6) --------------------------------------------------

HOP = [
    ("Connection", "X-Secret, close"),
    ("Keep-Alive", "timeout=5"),
    ("x-secret", "s"),
    ("Proxy-Connection", "keep-alive"),
    ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("TE", "trailers"),
    ("Trailer", "X-T"),
    ("Upgrade", "h2c"),
]


def forward(head, url="http://o.test:8080/p", upgrade=False):
    target = parse_target(head.method, url)
    return m.upstream_fields(head, target, m.request_framing(head), "eyewall", upgrade)


def test_upstream_fields_host_first_and_hop_by_hop_removed():
    head = req(
        ("Accept", "*/*"),
        *HOP,
        ("Host", "evil.test"),
        (CL, "2, 2"),
        ("X-B", "1"),
        ("Expect", "100-continue"),
        ("Via", "1.0 other"),
    )
    assert forward(head) == [
        ("Host", "o.test:8080"),
        ("Accept", "*/*"),
        (CL, "2"),
        ("X-B", "1"),
        ("Expect", "100-continue"),
        ("Via", "1.0 other"),
        ("Via", "1.1 eyewall"),
    ]


def test_upstream_fields_http10():
    head = req(("Expect", "100-continue"), (CL, "1"), (CL, "1"), version="HTTP/1.0")
    assert forward(head, "http://[::1]/") == [("Host", "[::1]"), (CL, "1"), ("Via", "1.0 eyewall")]


def test_upstream_fields_rechunk():
    head = req(("transfer-encoding", "Chunked"), ("X", "1"))
    assert forward(head) == [
        ("Host", "o.test:8080"),
        ("X", "1"),
        (TE, "chunked"),
        ("Via", "1.1 eyewall"),
    ]


def test_upstream_fields_upgrade():
    head = req(
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "k"),
        method="GET",
    )
    assert forward(head, upgrade=True) == [
        ("Host", "o.test:8080"),
        ("Sec-WebSocket-Key", "k"),
        ("Connection", "upgrade"),
        ("Upgrade", "websocket"),
        ("Via", "1.1 eyewall"),
    ]


@pytest.mark.parametrize(
    "fields",
    [
        [(CL, "5")],
        [(CL, "5"), ("Connection", "content-length")],
        [("Connection", "Content-Length, close"), (CL, "5, 5")],
        [(TE, "chunked"), ("Connection", "transfer-encoding")],
        [(CL, "0"), (CL, "0")],
    ],
    ids=[
        "cl",
        "connection names cl",
        "connection names cl, close",
        "connection names te",
        "cl 0 twice",
    ],
)
def test_forwarded_request_frames_the_same_body(fields):
    # Whatever the client's Connection field names, the origin must see the framing the
    # proxy uses to send the body (RFC 9112 §6.3), or the body becomes a second request.
    head = req(*fields)
    framing = m.request_framing(head)
    sent = RequestHead("POST", "/p", "HTTP/1.1", Headers(forward(head)))
    assert m.request_framing(sent) == framing


# -- fields sent to the client -------------------------------------------------------------


def back(head, framing, client="HTTP/1.1", keep_alive=True, upgrade=False):
    return m.response_fields(head, framing, client, keep_alive, "eyewall", upgrade)


@pytest.mark.parametrize(
    ("status", "framing", "cl_out", "te_out"),
    [
        (200, length(5), "5", False),
        (200, NO_BODY, "5, 5", False),
        (304, NO_BODY, "5, 5", False),
        (204, NO_BODY, None, False),
        (103, NO_BODY, None, False),
        (200, CHUNKED, None, True),
        (200, CLOSE, None, False),
    ],
    ids=["length", "head", "304", "204", "1xx", "chunked", "close"],
)
def test_response_fields_framing(status, framing, cl_out, te_out):
    out = Headers(back(resp(status, (CL, "5, 5"), *HOP), framing))
    assert out.get_all(CL) == ([] if cl_out is None else [cl_out])
    assert out.get_all(TE) == (["chunked"] if te_out else [])
    assert not any(name in out for name, _ in HOP)


@pytest.mark.parametrize(
    ("status", "client", "keep_alive", "connection"),
    [
        (200, "HTTP/1.1", True, []),
        (200, "HTTP/1.1", False, ["close"]),
        (200, "HTTP/1.0", True, ["keep-alive"]),
        (200, "HTTP/1.0", False, []),
        (100, "HTTP/1.1", False, []),
    ],
)
def test_response_fields_connection(status, client, keep_alive, connection):
    out = Headers(back(resp(status, ("Connection", "keep-alive")), NO_BODY, client, keep_alive))
    assert out.get_all("connection") == connection


def test_response_fields_keep_cookies_and_append_via():
    head = resp(
        200, ("Set-Cookie", "a=1"), ("Via", "1.1 cdn"), ("set-cookie", "b=2"), version="HTTP/1.0"
    )
    assert back(head, length(0)) == [
        ("Set-Cookie", "a=1"),
        ("Via", "1.1 cdn"),
        ("set-cookie", "b=2"),
        ("Via", "1.0 eyewall"),
    ]


def test_response_fields_upgrade():
    head = resp(
        101, ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Accept", "x")
    )
    assert back(head, NO_BODY, keep_alive=False, upgrade=True) == [
        ("Sec-WebSocket-Accept", "x"),
        ("Connection", "upgrade"),
        ("Upgrade", "websocket"),
        ("Via", "1.1 eyewall"),
    ]


def test_response_connection_cannot_strip_content_length():
    head = resp(200, (CL, "5"), ("Connection", "Content-Length"))
    out = Headers(back(head, m.downstream_framing(m.response_framing("GET", head), "HTTP/1.1")))
    assert out.get_all(CL) == ["5"]


def test_render_request_and_response():
    fields = [("Host", "o"), ("X", "")]
    assert m.render_request("GET", "/p?q", fields) == b"GET /p?q HTTP/1.1\r\nHost: o\r\nX: \r\n\r\n"
    assert m.render_request("GET", "*", []) == b"GET * HTTP/1.1\r\n\r\n"
    assert m.render_response(204, "", []) == b"HTTP/1.1 204 \r\n\r\n"
    assert m.render_response(200, "OK", [("A", "\xe9")]) == b"HTTP/1.1 200 OK\r\nA: \xe9\r\n\r\n"


# -- errors -------------------------------------------------------------------------------

STATUS = {
    400: "bad_request not_proxy_request bad_connect",
    408: "client_timeout",
    414: "target_too_long",
    431: "headers_too_large",
    505: "version_not_supported",
    403: "loop denied",
    407: "auth_required",
    429: "rate_limited",
    503: "overloaded",
    502: "dns_failure upstream_refused upstream_unreachable upstream_reset "
    "upstream_malformed upstream_tls addon_failed",
    504: "connect_timeout upstream_timeout body_stalled",
    499: "client_aborted",
    500: "internal",
}
EXPECTED_STATUS = {kind: code for code, kinds in STATUS.items() for kind in kinds.split()}
RFC9209_TYPES = {
    "dns_timeout",
    "dns_error",
    "destination_not_found",
    "destination_unavailable",
    "destination_ip_prohibited",
    "destination_ip_unroutable",
    "connection_refused",
    "connection_terminated",
    "connection_timeout",
    "connection_read_timeout",
    "connection_write_timeout",
    "connection_limit_reached",
    "tls_protocol_error",
    "tls_certificate_error",
    "tls_alert_received",
    "http_request_error",
    "http_request_denied",
    "http_response_incomplete",
    "http_upgrade_failed",
    "http_protocol_error",
    "proxy_internal_response",
    "proxy_internal_error",
    "proxy_configuration_error",
    "proxy_loop_detected",
}
SENT = [k for k in ErrorKind if k is not ErrorKind.CLIENT_ABORTED]  # that one has no page


@pytest.mark.parametrize("kind", list(ErrorKind), ids=lambda k: k.value)
def test_every_kind_has_a_status_and_a_proxy_status_type(kind):
    assert status_of(kind) == EXPECTED_STATUS[kind.value]
    assert proxy_status_type(kind) in RFC9209_TYPES


@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize("kind", SENT, ids=lambda k: k.value)
def test_error_page_is_a_valid_response(kind, close):
    page = error_page(kind, "it broke", "req-42", close=close, extra=(("Retry-After", "1"),))
    head, sep, body = page.partition(b"\r\n\r\n")
    parsed = parse_response_head(head + sep)
    assert parsed.status == status_of(kind)
    assert parsed.reason == HTTPStatus(parsed.status).phrase
    assert parsed.headers.get("content-length") == str(len(body))
    assert parsed.headers.get("x-request-id") == "req-42"
    assert parsed.headers.get("retry-after") == "1"
    assert parsed.headers.get("proxy-status") == (
        f'eyewall; error={proxy_status_type(kind)}; details="it broke"'
    )
    assert parsed.headers.get_all("connection") == (["close"] if close else [])
    assert body.decode().splitlines() == [
        f"{parsed.status} {parsed.reason}",
        "it broke",
        "request id: req-42",
    ]


@pytest.mark.parametrize(
    "detail",
    [
        "x\r\nSet-Cookie: a=b\r\n\r\nHTTP/1.1 200 OK\r\n",
        "\x00\x01\x7f\u2028\x85 tail",
        'q"uote\\ and \u00e9',
    ],
)
def test_error_page_detail_cannot_inject(detail):
    page = error_page(ErrorKind.BAD_REQUEST, detail, "r1")
    head, sep, body = page.partition(b"\r\n\r\n")
    parsed = parse_response_head(head + sep)
    names = [n for n, _ in parsed.headers]
    assert names == [
        "Content-Type",
        "Content-Length",
        "Cache-Control",
        "X-Content-Type-Options",
        "Proxy-Status",
        "X-Request-Id",
    ]
    assert parsed.headers.get("content-length") == str(len(body))
    assert len(body.decode().splitlines()) == 3
    assert all(0x20 <= b < 0x7F for b in body.splitlines()[1])
    shown = re.sub(r"[^\x20-\x7e]", "?", detail)
    quoted = re.fullmatch(
        r'eyewall; error=http_request_error; details="((?:[^"\\]|\\.)*)"',
        parsed.headers.get("proxy-status", ""),
    )
    assert quoted is not None
    assert re.sub(r"\\(.)", r"\1", quoted.group(1)) == shown
