"""Unit tests for eyewall.http1.fields: which fields cross the hop (RFC 9110 §7.6) and
the heads the proxy writes."""

from __future__ import annotations

import pytest

from eyewall.http1 import fields as f
from eyewall.http1 import framing as m
from eyewall.http1.framing import NO_BODY, BodyKind, Framing
from eyewall.http1.parse import Headers, ParseError, RequestHead, ResponseHead
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
    return f.upstream_fields(head, target, m.body_framing(head), "eyewall", upgrade)


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
    framing = m.body_framing(head)
    sent = RequestHead("POST", "/p", "HTTP/1.1", Headers(forward(head)))
    assert m.body_framing(sent) == framing


# -- fields sent to the client -------------------------------------------------------------


def back(head, framing, client="HTTP/1.1", keep_alive=True, upgrade=False):
    return f.response_fields(head, framing, client, keep_alive, "eyewall", upgrade)


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
    out = Headers(back(head, m.downstream_framing(m.body_framing(head, "GET"), "HTTP/1.1")))
    assert out.get_all(CL) == ["5"]


def test_render_request_and_response():
    fields = [("Host", "o"), ("X", "")]
    assert f.render_request("GET", "/p?q", fields) == b"GET /p?q HTTP/1.1\r\nHost: o\r\nX: \r\n\r\n"
    assert f.render_request("GET", "*", []) == b"GET * HTTP/1.1\r\n\r\n"
    assert f.render_response(204, "", []) == b"HTTP/1.1 204 \r\n\r\n"
    assert f.render_response(200, "OK", [("A", "\xe9")]) == b"HTTP/1.1 200 OK\r\nA: \xe9\r\n\r\n"


@pytest.mark.parametrize(
    ("codings", "value"),
    [
        ((), "chunked"),
        (("gzip",), "gzip, chunked"),
        (("gzip", "x-foo;a=1"), "gzip, x-foo;a=1, chunked"),
    ],
)
def test_response_fields_list_the_codings_kept_before_chunked(codings, value):
    head = resp(200, (TE, "gzip, chunked"), (CL, "9"), ("X", "1"))
    out = Headers(back(head, Framing(BodyKind.CHUNKED, 0, codings)))
    assert out.get_all(TE) == [value]
    assert CL not in out and out.get("x") == "1"


def test_response_with_codings_reframed_end_to_end():
    head = resp(200, (TE, "gzip"), (TE, "chunked"))
    out = m.downstream_framing(m.body_framing(head, "GET"), "HTTP/1.1")
    assert Headers(back(head, out)).get_all(TE) == ["gzip, chunked"]


# -- Max-Forwards and TRACE (RFC 9110 §7.6.2, §9.3.8) ------------------------------------

MF = "Max-Forwards"


@pytest.mark.parametrize(
    ("method", "fields", "expected"),
    [
        ("OPTIONS", [], None),
        ("OPTIONS", [(MF, "0")], 0),
        ("TRACE", [(MF, "5")], 5),
        ("TRACE", [(MF, "007")], 7),
        ("TRACE", [(MF, "000")], 0),
        ("OPTIONS", [(MF, "2147483646")], 2147483646),
        ("OPTIONS", [(MF, "2147483647")], 2147483647),
        ("OPTIONS", [(MF, "2147483648")], 2147483647),
        ("OPTIONS", [(MF, "9" * 5000)], 2147483647),
        ("OPTIONS", [(MF, "0" * 5000 + "3")], 3),
        ("GET", [(MF, "0")], None),
        ("GET", [(MF, "junk")], None),
        ("POST", [(MF, "-1")], None),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None,
)
def test_max_forwards(method, fields, expected):
    assert f.max_forwards(req(*fields, method=method)) == expected


@pytest.mark.parametrize(
    "values", [["-1"], ["+1"], [""], ["1.5"], ["0x5"], ["\u0665"], ["\xb2"], ["1, 2"], ["1", "1"]]
)
def test_invalid_max_forwards_is_400(values):
    head = req(*[(MF, v) for v in values], method="TRACE")
    with pytest.raises(ParseError, match="Max-Forwards") as info:
        f.max_forwards(head)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("method", "value", "sent"),
    [
        ("OPTIONS", "5", "4"),
        ("TRACE", "1", "0"),
        ("TRACE", "99999999999", "2147483646"),
        ("OPTIONS", "0", "0"),
        ("OPTIONS", "junk", "junk"),
        ("GET", "5", "5"),
    ],
)
def test_upstream_fields_count_down_max_forwards(method, value, sent):
    head = req((MF, value), method=method)
    assert Headers(forward(head)).get_all(MF) == [sent]


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
@pytest.mark.parametrize("connection", ["Max-Forwards", "close, max-forwards"])
def test_a_connection_option_cannot_remove_max_forwards(method, connection):
    """RFC 9110 §7.6.2: each intermediary MUST update Max-Forwards; a Connection option
    naming it (§7.6.1 forbids naming an end-to-end field) would defeat the hop limit."""
    head = req(("Connection", connection), (MF, "3"), method=method)
    assert Headers(forward(head)).get_all(MF) == ["2"]


def test_on_other_methods_a_connection_option_removes_max_forwards():
    head = req(("Connection", "Max-Forwards"), (MF, "3"), method="GET")
    assert MF not in Headers(forward(head))


def test_connection_options_cannot_remove_the_fields_the_proxy_writes():
    head = req(
        ("Host", "elsewhere"),
        ("Connection", "host, content-length, expect, x-a"),
        (CL, "5"),
        ("Expect", "100-continue"),
        ("X-A", "1"),
    )
    sent = Headers(forward(head))
    assert sent.get_all("host") == ["o.test:8080"]  # from the target, always
    assert sent.get_all(CL) == ["5"]
    assert "expect" not in sent and "x-a" not in sent  # the proxy answers the Expect


def test_trace_echo_leaves_out_credentials():
    head = RequestHead(
        "TRACE",
        "http://o.test/p?q",
        "HTTP/1.1",
        Headers(
            [
                ("Host", "o.test"),
                ("Authorization", "Basic c2VjcmV0"),
                ("X-Trace", "1"),
                ("proxy-authorization", "Basic c2VjcmV0"),
                ("Cookie", "sid=secret"),
                (MF, "0"),
            ]
        ),
    )
    body = f.trace_echo(head)
    assert body == (
        b"TRACE http://o.test/p?q HTTP/1.1\r\nHost: o.test\r\nX-Trace: 1\r\nMax-Forwards: 0\r\n\r\n"
    )
    assert b"secret" not in body and b"c2VjcmV0" not in body
