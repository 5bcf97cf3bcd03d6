"""Unit tests for eyewall.http1.parse: request and response heads, field sections,
chunk-size lines and the Headers container (RFC 9112 §2-§7)."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eyewall.http1.methods import REGISTERED, canonical_method
from eyewall.http1.parse import (
    Headers,
    ParseError,
    parse_chunk_size,
    parse_fields,
    parse_request_head,
)
from tests.http1.scaling import LINEAR, doubling_ratio

EOLS = pytest.mark.parametrize("eol", ["\r\n", "\n"], ids=["crlf", "lf"])


def head(start: str, *fields: str, eol: str = "\r\n") -> bytes:
    """A head built from parts: the start line, field lines, and the empty line."""
    return "".join(line + eol for line in (start, *fields, "")).encode("latin-1")


# -- request heads -----------------------------------------------------------------------

# id, request line, field lines, (method, target, version), parsed fields
VALID_REQUESTS = [
    (
        "absolute",
        "GET http://a.test/p?q HTTP/1.1",
        ["Host: a.test"],
        ("GET", "http://a.test/p?q", "HTTP/1.1"),
        [("Host", "a.test")],
    ),
    ("http/1.0", "GET http://a/ HTTP/1.0", [], ("GET", "http://a/", "HTTP/1.0"), []),
    ("http/1.2 is 1.1", "GET http://a/ HTTP/1.2", [], ("GET", "http://a/", "HTTP/1.1"), []),
    ("extension method", "BREW http://pot/ HTTP/1.1", [], ("BREW", "http://pot/", "HTTP/1.1"), []),
    (
        "token chars method",
        "X!#$%&'*+-.^_`|~9 http://a/ HTTP/1.1",
        [],
        ("X!#$%&'*+-.^_`|~9", "http://a/", "HTTP/1.1"),
        [],
    ),
    (
        "authority form",
        "CONNECT a.test:443 HTTP/1.1",
        ["Host: a.test:443"],
        ("CONNECT", "a.test:443", "HTTP/1.1"),
        [("Host", "a.test:443")],
    ),
    ("origin form", "GET /p?q=1 HTTP/1.1", [], ("GET", "/p?q=1", "HTTP/1.1"), []),
    ("asterisk", "OPTIONS * HTTP/1.1", [], ("OPTIONS", "*", "HTTP/1.1"), []),
    ("empty value", "GET / HTTP/1.1", ["X-Empty:"], ("GET", "/", "HTTP/1.1"), [("X-Empty", "")]),
    (
        "only OWS value",
        "GET / HTTP/1.1",
        ["X-Empty: \t "],
        ("GET", "/", "HTTP/1.1"),
        [("X-Empty", "")],
    ),
    (
        "OWS trimmed",
        "GET / HTTP/1.1",
        ["A: \t v a\tl \t"],
        ("GET", "/", "HTTP/1.1"),
        [("A", "v a\tl")],
    ),
    ("no OWS", "GET / HTTP/1.1", ["A:b"], ("GET", "/", "HTTP/1.1"), [("A", "b")]),
    (
        "obs-text",
        "GET / HTTP/1.1",
        ["X: caf\xe9 \x80\xff"],
        ("GET", "/", "HTTP/1.1"),
        [("X", "caf\xe9 \x80\xff")],
    ),
    (
        "name case kept",
        "GET / HTTP/1.1",
        ["cOnTeNt-TyPe: a/b"],
        ("GET", "/", "HTTP/1.1"),
        [("cOnTeNt-TyPe", "a/b")],
    ),
    (
        "repeated fields",
        "GET / HTTP/1.1",
        ["Set-Cookie: a=1", "X: y", "set-cookie: b=2"],
        ("GET", "/", "HTTP/1.1"),
        [("Set-Cookie", "a=1"), ("X", "y"), ("set-cookie", "b=2")],
    ),
    (
        "colon in value",
        "GET / HTTP/1.1",
        ["Host: a:80"],
        ("GET", "/", "HTTP/1.1"),
        [("Host", "a:80")],
    ),
]


@EOLS
@pytest.mark.parametrize(
    ("line", "fields", "start", "expected"),
    [case[1:] for case in VALID_REQUESTS],
    ids=[case[0] for case in VALID_REQUESTS],
)
def test_valid_request_heads(eol, line, fields, start, expected):
    parsed = parse_request_head(head(line, *fields, eol=eol))
    assert (parsed.method, parsed.target, parsed.version) == start
    assert parsed.headers.fields == expected
    # Invariants of a head built from parts: one entry per field line, and the same
    # result for either line ending, with or without one leading empty line.
    assert len(parsed.headers) == len(fields)
    for prefix in ("\r\n", "\n"):
        again = parse_request_head(prefix.encode() + head(line, *fields, eol=eol))
        assert again == parsed


@pytest.mark.parametrize(
    ("method", "canonical"),
    [
        ("get", "GET"),
        ("Get", "GET"),
        ("head", "HEAD"),
        ("Delete", "DELETE"),
        ("cOnNeCt", "CONNECT"),
        ("options", "OPTIONS"),
        ("trace", "TRACE"),
        ("propfind", "PROPFIND"),
        ("Version-Control", "VERSION-CONTROL"),
        ("pri", "PRI"),
    ],
)
def test_case_variants_of_registered_methods_are_refused(method, canonical):
    # RFC 9110 §9.1: method names are case-sensitive, but origins that match them
    # case-insensitively would answer "head" as HEAD while the proxy frames it as a GET.
    with pytest.raises(ParseError, match=f"send {canonical}, not {method}") as info:
        parse_request_head(f"{method} http://a/ HTTP/1.1\r\n\r\n".encode())
    assert info.value.status == 400


@pytest.mark.parametrize(
    "method", ["GET", "PROPFIND", "VERSION-CONTROL", "BREW", "brew", "Brew", "X-get"]
)
def test_registered_spellings_and_other_tokens_pass_unchanged(method):
    assert parse_request_head(f"{method} http://a/ HTTP/1.1\r\n\r\n".encode()).method == method


def test_method_registry_names_are_tokens_in_upper_case():
    for name, (safe, idempotent) in REGISTERED.items():
        assert name == name.upper() and re.fullmatch(r"[A-Z-]+", name)
        assert idempotent or not safe  # RFC 9110 §9.2.2: safe methods are idempotent
        assert canonical_method(name.lower()) == name


def test_mixed_line_endings():
    parsed = parse_request_head(b"GET / HTTP/1.1\nA: 1\r\nB: 2\n\r\n")
    assert parsed.headers.fields == [("A", "1"), ("B", "2")]


REQ = "GET http://a/ HTTP/1.1"
INVALID_REQUESTS = [
    ("obs-fold space", [REQ, "X: a", " b"], 400),
    ("obs-fold tab", [REQ, "X: a", "\tb"], 400),
    ("space before colon", [REQ, "X : a"], 400),
    ("tab before colon", [REQ, "X\t: a"], 400),
    ("empty name", [REQ, ": a"], 400),
    ("no colon", [REQ, "X a"], 400),
    ("name not a token", [REQ, "X(y): a"], 400),
    ("obs-text in name", [REQ, "X\xe9: a"], 400),
    ("NUL in value", [REQ, "X: a\x00b"], 400),
    ("control char in value", [REQ, "X: a\x01b"], 400),
    ("vertical tab in value", [REQ, "X: a\x0bb"], 400),
    ("DEL in value", [REQ, "X: a\x7fb"], 400),
    ("bare CR in value", [REQ, "X: a\rb"], 400),
    ("bare CR before OWS", [REQ, "X: a\r "], 400),
    ("missing space", ["GET http://a/HTTP/1.1"], 400),
    ("double space after method", ["GET  http://a/ HTTP/1.1"], 400),
    ("double space before version", ["GET http://a/  HTTP/1.1"], 400),
    ("tab separator", ["GET\thttp://a/ HTTP/1.1"], 400),
    ("missing version", ["GET http://a/"], 400),
    ("missing target", ["GET HTTP/1.1"], 400),
    ("lowercase version", ["GET http://a/ http/1.1"], 400),
    ("junk after version", ["GET http://a/ HTTP/1.1x"], 400),
    ("space after version", ["GET http://a/ HTTP/1.1 "], 400),
    ("version without minor", ["GET http://a/ HTTP/1"], 400),
    ("method not a token", ["G(T http://a/ HTTP/1.1"], 400),
    ("obs-text in target", ["GET http://a/\xe9 HTTP/1.1"], 400),
    ("empty line in fields", [REQ, "A: 1", "", "B: 2"], 400),
    ("two leading empty lines", ["", "", REQ], 400),
    ("HTTP/2.0", ["GET http://a/ HTTP/2.0"], 505),
    ("HTTP/0.9", ["GET http://a/ HTTP/0.9"], 505),
    ("HTTP/3", ["GET http://a/ HTTP/3"], 505),
    ("h2 preface", ["PRI * HTTP/2.0", "", "SM"], 505),
]


@EOLS
@pytest.mark.parametrize(
    ("lines", "status"),
    [case[1:] for case in INVALID_REQUESTS],
    ids=[case[0] for case in INVALID_REQUESTS],
)
def test_invalid_request_heads(eol, lines, status):
    with pytest.raises(ParseError) as info:
        parse_request_head(head(*lines, eol=eol))
    assert info.value.status == status


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n",
        b"GET http://a/ HTTP/1.1\r\n",
        b"GET http://a/ HTTP/1.1\r\nA: 1\r\n",
        b"GET http://a/ HTTP/1.1\r\n\r\nx",
        b"GET http://a/ HTTP/1.1\r\n\r\n\r\n",
    ],
    ids=["empty", "empty line", "no end", "unterminated fields", "trailing data", "extra line"],
)
def test_truncated_or_overlong_request_heads(data):
    with pytest.raises(ParseError) as info:
        parse_request_head(data)
    assert info.value.status == 400


# -- field sections (trailers) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pos", "fields"),
    [
        ("\r\n", 0, []),
        ("\n", 0, []),
        ("A: 1\r\n\r\n", 0, [("A", "1")]),
        ("A: 1\nB:2\n\n", 0, [("A", "1"), ("B", "2")]),
        ("junk\r\nA: 1\r\n\r\n", 6, [("A", "1")]),
    ],
)
def test_parse_fields(text, pos, fields):
    assert parse_fields(text, pos).fields == fields


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("A: 1\r\n b\r\n\r\n", "obsolete line folding"),
        ("A b\r\n\r\n", "malformed header field name"),
        ("X-Bad: a\x01\r\n\r\n", "invalid character in header X-Bad"),
        ("", "malformed"),
        ("A: 1\r\n", "malformed"),
    ],
)
def test_parse_fields_errors_say_what_is_wrong(text, words):
    with pytest.raises(ParseError, match=words):
        parse_fields(text)


# -- chunk-size lines --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "size"),
    [
        (b"0\r\n", 0),
        (b"5\r\n", 5),
        (b"a\r\n", 10),
        (b"A\r\n", 10),
        (b"fF\r\n", 255),
        (b"1a2B\n", 0x1A2B),
        (b"000010\r\n", 16),
        (b"f" * 16 + b"\r\n", 2**64 - 1),
        (b"5;name=value\r\n", 5),
        (b'5;a;b="q r"\r\n', 5),
        (b"5 ;ext\r\n", 5),
        (b"5\t;ext\r\n", 5),
    ],
)
def test_valid_chunk_sizes(line, size):
    assert parse_chunk_size(line) == size


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\r\n",
        b"0x5\r\n",
        b"-1\r\n",
        b"+5\r\n",
        b"1 2\r\n",
        b" 5\r\n",
        b"5",
        b"g\r\n",
        b"1" * 17 + b"\r\n",
        b"5\r\n\r\n",
        b"5;a\rb\r\n",
        b"5;\x00\r\n",
        b"5\r\r\n",
        b"5,6\r\n",
    ],
)
def test_invalid_chunk_sizes(line):
    with pytest.raises(ParseError):
        parse_chunk_size(line)


# -- Headers -----------------------------------------------------------------------------


def sample() -> Headers:
    return Headers(
        [
            ("Host", "a"),
            ("Connection", "Keep-Alive, , Upgrade"),
            ("Set-Cookie", "x=1"),
            ("connection", "\tclose "),
            ("set-cookie", "y=2"),
        ]
    )


def test_headers_lookups_ignore_case():
    h = sample()
    assert h.get("HOST") == "a"
    assert h.get("missing") is None
    assert h.get("missing", "d") == "d"
    assert h.get_all("SET-COOKIE") == ["x=1", "y=2"]
    assert h.get_all("missing") == []
    assert h.tokens("CONNECTION") == ["keep-alive", "upgrade", "close"]
    assert h.tokens("missing") == []
    assert "set-cookie" in h and "nope" not in h and 5 not in h


def test_headers_set_replaces_all_at_the_first_position():
    h = sample()
    h.set("CONNECTION", "close")
    assert h.fields == [
        ("Host", "a"),
        ("CONNECTION", "close"),
        ("Set-Cookie", "x=1"),
        ("set-cookie", "y=2"),
    ]
    h.set("Via", "1.1 p")
    assert h.fields[-1] == ("Via", "1.1 p")


def test_headers_remove():
    h = sample()
    h.remove("set-COOKIE")
    h.remove("absent")
    assert [n for n, _ in h] == ["Host", "Connection", "connection"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X", "a\rb"),
        ("X", "a\nb"),
        ("X", "a\x00b"),
        ("", "v"),
        ("X Y", "v"),
        ("X:", "v"),
        ("X\r\nY", "v"),
        ("X\xe9", "v"),
    ],
)
def test_headers_refuse_fields_that_break_framing(name, value):
    h = sample()
    with pytest.raises(ValueError):
        h.add(name, value)
    with pytest.raises(ValueError):
        h.set(name, value)
    assert h == sample()


def test_headers_index_follows_mutations():
    h = sample()
    assert h.get("x") is None  # builds the index
    h.add("X", "1")
    assert h.get("x") == "1" and "x" in h
    h.add("x", "2")
    assert h.get_all("X") == ["1", "2"]
    h.set("X", "3")
    assert h.get_all("x") == ["3"]
    h.remove("x")
    assert h.get("x") is None and "x" not in h
    assert h.tokens("connection") == ["keep-alive", "upgrade", "close"]
    h.set("connection", "Close")
    assert h.tokens("connection") == ["close"]


def test_headers_index_is_incremental():
    # Every mutation leaves the container as if built from its fields afresh.
    h = Headers()
    script = [
        ("add", "A", "1"),
        ("add", "b", "2"),
        ("add", "a", "3"),
        ("set", "B", "4"),
        ("add", "A", "5"),
        ("remove", "a", ""),
        ("set", "c", "6"),
        ("set", "C", "7"),
        ("add", "c", "8"),
        ("remove", "nope", ""),
    ]
    for op, name, value in script:
        if op == "remove":
            h.remove(name)
        else:
            getattr(h, op)(name, value)
        fresh = Headers(h.fields)
        assert h.index == fresh.index
        for key in ("a", "b", "c"):
            assert h.get_all(key) == fresh.get_all(key)
            assert h.tokens(key) == fresh.tokens(key)
    assert h.fields == [("B", "4"), ("C", "7"), ("c", "8")]
    assert h.get_all("c") == ["7", "8"]


def test_headers_get_all_returns_a_copy():
    h = Headers([("A", "1")])
    h.get_all("a").append("2")
    assert h.get_all("a") == ["1"]


def test_adding_fields_takes_linear_time():
    def adds(n):
        def run():
            h = Headers()
            for i in range(n):
                h.add(f"X-{i % 50}", "v")
            h.set("New", "1")
            h.remove("absent")

        return run

    assert doubling_ratio(adds, 2000) < LINEAR


# -- properties --------------------------------------------------------------------------

FRAGMENTS = [
    b"GET",
    b"HTTP/1.1 ",
    b" ",
    b"\t",
    b"http://a/",
    b"/",
    b" HTTP/1.1",
    b" HTTP/2.0",
    b"HTTP/1.0 200 OK",
    b"\r\n",
    b"\n",
    b"\r",
    b":",
    b"X",
    b"\x00",
    b"\x7f",
    b"\xff",
    b"5",
    b"f",
    b";",
    b"=",
    b",",
    b"0x",
]
ARBITRARY = st.binary(max_size=300) | st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(
    b"".join
)


@settings(max_examples=400, database=None)
@given(ARBITRARY)
def test_parsers_return_or_raise_parse_error(data):
    for parse in (parse_request_head, parse_chunk_size):
        try:
            parse(data)
        except ParseError as e:
            assert e.status in (400, 505)


TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VISIBLE = "".join(chr(c) for c in (*range(0x21, 0x7F), *range(0x80, 0x100)))
WORDS = st.lists(st.text(VISIBLE, min_size=1, max_size=8), max_size=4)
FIELD = st.tuples(
    st.text(TOKEN_CHARS, min_size=1, max_size=16),
    st.tuples(WORDS, st.sampled_from([" ", "  ", "\t", " \t "])).map(lambda p: p[1].join(p[0])),
    st.sampled_from(["", " ", "\t", " \t"]),
    st.sampled_from(["", " ", "\t", " \t"]),
)


@settings(max_examples=300, database=None)
@given(st.lists(FIELD, max_size=12), st.sampled_from(["\r\n", "\n"]))
def test_fields_round_trip(fields, eol):
    lines = [f"{name}:{before}{value}{after}" for name, value, before, after in fields]
    parsed = parse_request_head(head("POST http://a.test/ HTTP/1.1", *lines, eol=eol))
    assert parsed.headers.fields == [(name, value) for name, value, _, _ in fields]


# -- cost ----------------------------------------------------------------------------------

WHITESPACE = 15_000  # twice this stays under the 64 KiB default max_header_size


def refuse(parse, data):
    def run():
        with pytest.raises(ParseError):
            parse(data)

    return run


@pytest.mark.parametrize(
    ("parse", "make"),
    [
        (
            parse_request_head,
            lambda n: b"GET http://a/ HTTP/1.1\r\nX:" + b" " * n + b"\x01\r\n\r\n",
        ),
        (lambda d: parse_fields(d.decode("latin-1")), lambda n: b"T:" + b" " * n + b"\x00\r\n\r\n"),
    ],
    ids=["request", "trailers"],
)
def test_rejecting_a_whitespace_run_takes_linear_time(parse, make):
    # A head is parsed on the event loop: refusing it must cost about as much as reading
    # it, not grow with the square of its length (a backtracking regex would).
    assert doubling_ratio(lambda n: refuse(parse, make(n)), WHITESPACE) < LINEAR
