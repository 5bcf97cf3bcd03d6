"""Unit tests for eyewall.http1.framing: where a message ends (RFC 9112 §6.3), whether its
connection persists (§9.3), and WebSocket upgrades."""

from __future__ import annotations

import pytest

from eyewall.http1 import framing as m
from eyewall.http1.framing import NO_BODY, BodyKind, Framing
from eyewall.http1.parse import Headers, ParseError, RequestHead, ResponseHead

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
    assert m.body_framing(req(*fields)) == expected


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
        m.body_framing(req(*fields))
    assert info.value.status == 400


@pytest.mark.parametrize("fields", [[(TE, "chunked")], [(TE, "chunked"), (CL, "5")]])
def test_transfer_encoding_in_http10_request_is_an_error(fields):
    with pytest.raises(ParseError):
        m.body_framing(req(*fields, version="HTTP/1.0"))


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
        ("CONNECT", 200, [(CL, "3")], "HTTP/1.1", NO_BODY),
        ("CONNECT", 407, [(CL, "3")], "HTTP/1.1", length(3)),
    ],
)
def test_response_framing(method, status, fields, version, expected):
    assert m.body_framing(resp(status, *fields, version=version), method) == expected


def test_response_content_length_zero_means_empty_body():
    framing = m.body_framing(resp(200, (CL, "0")), "GET")
    assert framing.kind in (BodyKind.LENGTH, BodyKind.NONE) and framing.length == 0


def coded(kind, *codings):
    return Framing(kind, 0, codings)


# Transfer-Encoding field lines of a 200 response to GET, and the framing. The evidence
# for each row (what curl does with the same response from a raw origin) is in
# docs/http.md and tests/test_origin_responses.py.
RESPONSE_CODINGS = [
    ("chunked", [(TE, "chunked")], CHUNKED),
    ("Chunked", [(TE, "Chunked")], CHUNKED),
    ("chunked twice in a list", [(TE, "chunked, chunked")], CHUNKED),
    ("chunked on two lines", [(TE, "chunked"), (TE, "chunked")], CHUNKED),
    ("empty elements", [(TE, ", chunked ,")], CHUNKED),
    ("gzip, chunked", [(TE, "gzip, chunked")], coded(BodyKind.CHUNKED, "gzip")),
    ("gzip then chunked lines", [(TE, "gzip"), (TE, "chunked")], coded(BodyKind.CHUNKED, "gzip")),
    ("two codings", [(TE, "GZip, br, chunked")], coded(BodyKind.CHUNKED, "gzip", "br")),
    ("gzip alone reads to close", [(TE, "gzip")], coded(BodyKind.CLOSE, "gzip")),
    ("unknown coding", [(TE, "x-foo, chunked")], coded(BodyKind.CHUNKED, "x-foo")),
    ("parameters kept", [(TE, "x-foo;a=1, chunked")], coded(BodyKind.CHUNKED, "x-foo;a=1")),
    ("identity dropped", [(TE, "identity, chunked")], CHUNKED),
    ("identity alone", [(TE, "identity")], CLOSE),
    ("empty value", [(TE, "")], CLOSE),
    ("te overrides cl", [(CL, "3"), (TE, "chunked")], CHUNKED),
    ("te overrides bad cl", [(CL, "x"), (TE, "gzip")], coded(BodyKind.CLOSE, "gzip")),
]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [case[1:] for case in RESPONSE_CODINGS],
    ids=[case[0] for case in RESPONSE_CODINGS],
)
def test_response_transfer_codings(fields, expected):
    assert m.body_framing(resp(200, *fields), "GET") == expected


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ([(TE, "chunked, gzip")], "not the final"),
        ([(TE, "chunked"), (TE, "gzip")], "not the final"),
        ([(TE, "chunked, gzip, chunked")], "not the final"),
        ([(TE, "chunked;x=1")], "parameters"),
        ([(TE, "gzip, chunked ; x=1")], "parameters"),
        ([(TE, "g(zip), chunked")], "invalid Transfer-Encoding"),
        ([(TE, "gzip;, chunked")], "invalid Transfer-Encoding"),
    ],
)
def test_response_transfer_coding_errors(fields, words):
    with pytest.raises(ParseError, match=words) as info:
        m.body_framing(resp(200, *fields), "GET")
    assert info.value.status == 502


@pytest.mark.parametrize(
    ("fields", "version"),
    [
        ([(TE, "chunked")], "HTTP/1.0"),
        ([(TE, "gzip")], "HTTP/1.0"),
        ([(CL, "3"), (CL, "4")], "HTTP/1.1"),
        ([(CL, "abc")], "HTTP/1.1"),
    ],
    ids=["te in 1.0", "gzip in 1.0", "unequal cl", "bad cl"],
)
def test_response_framing_errors_answer_502(fields, version):
    with pytest.raises(ParseError) as info:
        m.body_framing(resp(200, *fields, version=version), "GET")
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
        (coded(BodyKind.CHUNKED, "gzip"), "HTTP/1.1", coded(BodyKind.CHUNKED, "gzip")),
        (coded(BodyKind.CLOSE, "gzip", "br"), "HTTP/1.1", coded(BodyKind.CHUNKED, "gzip", "br")),
    ],
)
def test_downstream_framing(upstream, client, expected):
    assert m.downstream_framing(upstream, client) == expected


@pytest.mark.parametrize("kind", [BodyKind.CHUNKED, BodyKind.CLOSE])
def test_transfer_codings_cannot_reach_an_http10_client(kind):
    # RFC 9112 §6.1: no Transfer-Encoding to HTTP/1.0, and the proxy decodes only chunked.
    with pytest.raises(ParseError, match=r"gzip cannot be sent to an HTTP/1\.0 client") as info:
        m.downstream_framing(coded(kind, "gzip"), "HTTP/1.0")
    assert info.value.status == 502


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


@pytest.mark.parametrize("message", ["request", "response"])
@pytest.mark.parametrize(("version", "connection", "expected"), KEEP_ALIVE)
def test_keep_alive(message, version, connection, expected):
    fields = [("Connection", v) for v in connection]
    head = (
        req(*fields, version=version)
        if message == "request"
        else resp(200, *fields, version=version)
    )
    assert m.keep_alive(head) is expected


def test_a_response_framed_both_ways_ends_its_connection():
    # RFC 9112 §6.3 rule 3: Transfer-Encoding wins, but the sender is suspect.
    head = resp(200, (CL, "3"), (TE, "chunked"), ("Connection", "keep-alive"))
    assert m.body_framing(head, "GET") == CHUNKED
    assert m.keep_alive(head) is False


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


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("GET", True),
        ("HEAD", True),
        ("PUT", True),
        ("DELETE", True),
        ("OPTIONS", True),
        ("TRACE", True),
        ("PROPFIND", True),
        ("MOVE", True),
        ("POST", False),
        ("PATCH", False),
        ("LOCK", False),
        ("CONNECT", False),
        ("BREW", False),
        ("get", False),
    ],
)
def test_is_idempotent_follows_the_method_registry(method, expected):
    assert m.is_idempotent(method) is expected


@pytest.mark.parametrize(
    ("fields", "version", "expected"),
    [
        ([("Expect", "100-continue")], "HTTP/1.1", True),
        ([("expect", "100-Continue")], "HTTP/1.1", True),  # case-insensitive token
        ([("Expect", "foo, 100-continue")], "HTTP/1.1", True),
        ([("Expect", "100-continue")], "HTTP/1.0", False),  # no 1xx for HTTP/1.0
        ([("Expect", "200-ok")], "HTTP/1.1", False),
        ([], "HTTP/1.1", False),
    ],
)
def test_expects_continue(fields, version, expected):
    assert m.expects_continue(req(*fields, version=version)) is expected
