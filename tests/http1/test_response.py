"""Unit tests for eyewall.http1.response: origin response heads, read strictly when valid
and repaired where RFC 9112 tells a proxy to (what curl does with the same bytes is in
tests/test_origin_responses.py)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eyewall.http1.parse import ParseError, check_field
from eyewall.http1.response import (
    MAX_REPAIRS,
    parse_response_head,
    parse_response_trailers,
    repair_response_head,
)
from tests.http1.scaling import LINEAR, doubling_ratio

EOLS = pytest.mark.parametrize("eol", ["\r\n", "\n"], ids=["crlf", "lf"])


def head(start: str, *fields: str, eol: str = "\r\n") -> bytes:
    """A head built from parts: the start line, field lines, and the empty line."""
    return "".join(line + eol for line in (start, *fields, "")).encode("latin-1")


# -- status lines ----------------------------------------------------------------------------


@EOLS
@pytest.mark.parametrize(
    ("line", "version", "status", "reason"),
    [
        ("HTTP/1.1 200 OK", "HTTP/1.1", 200, "OK"),
        ("HTTP/1.0 404 Not Found", "HTTP/1.0", 404, "Not Found"),
        ("HTTP/1.1 204", "HTTP/1.1", 204, ""),
        ("HTTP/1.1 204 ", "HTTP/1.1", 204, ""),
        ("HTTP/1.1 200 \tS\xfcper\t", "HTTP/1.1", 200, "\tS\xfcper\t"),
        ("HTTP/1.2 200 OK", "HTTP/1.1", 200, "OK"),
    ]
    + [(f"HTTP/1.1 {code} R", "HTTP/1.1", code, "R") for code in (100, 101, 199, 301, 499, 599)],
)
def test_valid_status_lines(eol, line, version, status, reason):
    parsed = parse_response_head(head(line, "Content-Length: 0", eol=eol))
    assert (parsed.version, parsed.status, parsed.reason) == (version, status, reason)
    assert parsed.headers.fields == [("Content-Length", "0")]
    assert parsed.repairs == ()


# line, (version, status, reason), the repair noted
REPAIRED_STATUS_LINES = [
    ("http/1.1 200 OK", ("HTTP/1.1", 200, "OK"), "http read as HTTP"),
    ("Http/1.0 200 OK", ("HTTP/1.0", 200, "OK"), "Http read as HTTP"),
    ("HTTP/1.1  200 OK", ("HTTP/1.1", 200, "OK"), "'  ' before the status code"),
    ("HTTP/1.1\t200 OK", ("HTTP/1.1", 200, "OK"), "'\\t' before the status code"),
    ("HTTP/2.0 200 OK", ("HTTP/1.1", 200, "OK"), "HTTP/2.0 read as HTTP/1.1"),
    ("HTTP/3.0 200 OK", ("HTTP/1.1", 200, "OK"), "HTTP/3.0 read as HTTP/1.1"),
    ("HTTP/1.1 200OK", ("HTTP/1.1", 200, "OK"), "no space before the reason"),
    ("HTTP/1.1 600 X", ("HTTP/1.1", 600, "X"), "outside 100-599"),
    ("HTTP/1.1 999 X", ("HTTP/1.1", 999, "X"), "outside 100-599"),
    ("HTTP/1.1 200 O\rK", ("HTTP/1.1", 200, "O K"), "bare CR in the reason phrase"),
]


@EOLS
@pytest.mark.parametrize(
    ("line", "expected", "repair"),
    REPAIRED_STATUS_LINES,
    ids=[case[0] for case in REPAIRED_STATUS_LINES],
)
def test_repaired_status_lines(eol, line, expected, repair):
    parsed = parse_response_head(head(line, "A: 1", eol=eol))
    assert (parsed.version, parsed.status, parsed.reason) == expected
    assert parsed.headers.fields == [("A", "1")]
    assert len(parsed.repairs) == 1 and repair in parsed.repairs[0]


def test_other_controls_in_the_reason_are_kept():
    parsed = parse_response_head(head("HTTP/1.1 200 O\x01K\x7f"))
    assert parsed.reason == "O\x01K\x7f" and parsed.repairs == ()


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("HTTP/1.1 099 X", "malformed status line"),
        ("HTTP/1.1 20 OK", "malformed status line"),
        ("HTTP/1.1 2000 OK", "malformed status line"),
        ("HTTP/1.1 2OO OK", "malformed status line"),
        ("HTTP/1.1 abc", "malformed status line"),
        ("HTTP/1.1200 OK", "malformed status line"),
        (" HTTP/1.1 200 OK", "malformed status line"),
        ("HTTP/1 200 OK", "malformed status line"),
        ("HTTPS/1.1 200 OK", "malformed status line"),
        ("ICY 200 OK", "malformed status line"),
        ("HTTP/0.9 200 OK", "HTTP/0 status line"),
        ("HTTP/5.0 200 OK", "HTTP/5 status line"),
        ("HTTP/2 200 OK", "malformed status line"),
        ("HTTP/1.1 200 O\x00K", "NUL in the reason phrase"),
        ("HTTP/1.1", "malformed status line"),
        ("", "malformed status line"),
    ],
)
def test_invalid_status_lines(line, words):
    with pytest.raises(ParseError, match=words) as info:
        parse_response_head(head(line))
    assert info.value.status == 502


@pytest.mark.parametrize("data", [b"", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK\r\nA: 1\r\n"])
def test_unterminated_heads_are_refused(data):
    with pytest.raises(ParseError):
        parse_response_head(data)


# -- field lines -----------------------------------------------------------------------------

# id, field lines, parsed fields, repairs noted (substrings, in order)
REPAIRED_FIELDS = [
    (
        "space before colon",
        ["X-Frame-Note : yes", "B: 2"],
        [("X-Frame-Note", "yes"), ("B", "2")],
        ["whitespace before the colon of X-Frame-Note removed"],
    ),
    ("tab before colon", ["X\t \t: y"], [("X", "y")], ["colon of X removed"]),
    (
        "obs-fold",
        ["X: a", "  b", "\tc ", "Y: 1"],
        [("X", "a b c"), ("Y", "1")],
        ["obs-fold in X", "obs-fold in X"],
    ),
    ("fold of an empty value", ["X:", " b"], [("X", "b")], ["obs-fold in X"]),
    ("empty fold", ["X: a", " "], [("X", "a")], ["obs-fold in X"]),
    (
        "invalid name dropped",
        ["A: 1", "X(A): yes", "B: 2"],
        [("A", "1"), ("B", "2")],
        ["invalid name 'X(A)' dropped"],
    ),
    ("obs-text name dropped", ["X\xe9: yes"], [], ["invalid name 'X\xe9' dropped"]),
    ("space in name dropped", ["Bad Header: x"], [], ["invalid name 'Bad Header' dropped"]),
    ("empty name dropped", [": yes", "A: 1"], [("A", "1")], ["empty field name dropped"]),
    ("no colon dropped", ["A: 1", "X-A yes", "B: 2"], [("A", "1"), ("B", "2")], ["colon dropped"]),
    (
        "whitespace lines before the first field dropped",
        [" X: 1", "\tY: 2", "Z: 3", " z"],
        [("Z", "3 z")],
        ["line starting with whitespace before the first field dropped", "obs-fold in Z"],
    ),
    (
        "fold of a dropped field goes with it",
        ["X(A): a", " b", "C: 3"],
        [("C", "3")],
        ["invalid name"],
    ),
    ("bare CR in value", ["X: a\rb"], [("X", "a b")], ["bare CR in header X replaced by SP"]),
    ("bare CR at the end", ["X: a\r "], [("X", "a")], ["bare CR in header X"]),
    ("controls kept", ["X: a\x01b\x7f", "Y: \x1b[0m"], [("X", "a\x01b\x7f"), ("Y", "\x1b[0m")], []),
    (
        "framing fields untouched by repairs elsewhere",
        ["Content-Length: 2", "X : y"],
        [("Content-Length", "2"), ("X", "y")],
        ["colon of X"],
    ),
]


@EOLS
@pytest.mark.parametrize(
    ("lines", "fields", "repairs"),
    [case[1:] for case in REPAIRED_FIELDS],
    ids=[case[0] for case in REPAIRED_FIELDS],
)
def test_repaired_fields(eol, lines, fields, repairs):
    parsed = parse_response_head(head("HTTP/1.1 200 OK", *lines, eol=eol))
    assert parsed.headers.fields == fields
    assert len(parsed.repairs) == len(repairs)
    for noted, words in zip(parsed.repairs, repairs, strict=True):
        assert words in noted
    for name, value in parsed.headers:
        check_field(name, value)  # whatever is kept can be written out again


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        (["X: a\x00b"], "NUL in header X"),
        (["Content-Length 2"], "without a colon that may be Content-Length"),
        (["Transfer-Encoding"], "without a colon that may be Content-Length"),
        ([" Content-Length: 2"], "before the first field that may be Content-Length"),
        (["\ttransfer-encoding: chunked"], "first field that may be Content-Length"),
        (["A: 1", "", "B: 2"], "empty line inside"),
        # Repairs that would touch the framing fields: recipients disagree, so refuse.
        (["Content-Length : 2"], "colon of Content-Length"),
        (["transfer-encoding\t: chunked"], "colon of transfer-encoding"),
        (["Content-Length: 2", " 3"], "obs-fold in Content-Length"),
        (["Transfer-Encoding: gzip,", " chunked"], "obs-fold in Transfer-Encoding"),
        (["Content-Length: 2\r"], "bare CR in header Content-Length"),
        (["Transfer-Encoding: chunked\rx"], "bare CR in header Transfer-Encoding"),
        (["Content-Length\x0b: 2"], "may be Content-Length or Transfer-Encoding"),
        (["Transfer Encoding: chunked"], "may be Content-Length or Transfer-Encoding"),
        (["\xa0Content-Length: 2"], "may be Content-Length or Transfer-Encoding"),
    ],
)
def test_unrepairable_fields_are_502(lines, words):
    with pytest.raises(ParseError, match=words) as info:
        parse_response_head(head("HTTP/1.1 200 OK", *lines))
    assert info.value.status == 502


def test_repairs_are_counted_past_the_limit():
    lines = [f"X{i} : v" for i in range(MAX_REPAIRS + 5)]
    parsed = parse_response_head(head("HTTP/1.1 200 OK", *lines))
    assert len(parsed.headers) == MAX_REPAIRS + 5
    assert len(parsed.repairs) == MAX_REPAIRS
    assert parsed.repairs[-1] == "and 6 more repairs"


# -- properties --------------------------------------------------------------------------

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VISIBLE = "".join(chr(c) for c in (*range(0x21, 0x7F), *range(0x80, 0x100)))
WORDS = st.lists(st.text(VISIBLE, min_size=1, max_size=8), max_size=4)
FIELD = st.tuples(
    st.text(TOKEN_CHARS, min_size=1, max_size=16),
    st.tuples(WORDS, st.sampled_from([" ", "  ", "\t", " \t "])).map(lambda p: p[1].join(p[0])),
    st.sampled_from(["", " ", "\t", " \t"]),
    st.sampled_from(["", " ", "\t", " \t"]),
)
STATUS = st.sampled_from(
    ["HTTP/1.1 200 OK", "HTTP/1.0 404 Not Found", "HTTP/1.1 204", "HTTP/1.1 103 "]
)


@settings(max_examples=300, database=None)
@given(st.lists(FIELD, max_size=12), st.sampled_from(["\r\n", "\n"]), STATUS)
def test_valid_heads_read_the_same_on_both_paths(fields, eol, status):
    lines = [f"{name}:{before}{value}{after}" for name, value, before, after in fields]
    data = head(status, *lines, eol=eol)
    parsed = parse_response_head(data)
    assert parsed.headers.fields == [(name, value) for name, value, _, _ in fields]
    assert parsed.repairs == ()
    assert repair_response_head(data.decode("latin-1")) == parsed


FRAGMENTS = [
    b"HTTP/1.1 ",
    b"http/1.0 ",
    b"200",
    b"600 ",
    b" ",
    b"\t",
    b"\r\n",
    b"\n",
    b"\r",
    b":",
    b" :",
    b"X",
    b"(",
    b"Content-Length",
    b"Transfer-Encoding",
    b"\x00",
    b"\x01",
    b"\x7f",
    b"\xff",
    b"5",
]
ARBITRARY = st.binary(max_size=300) | st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(
    b"".join
)


@settings(max_examples=500, database=None)
@given(ARBITRARY)
def test_any_bytes_parse_or_raise_parse_error_502(data):
    try:
        parsed = parse_response_head(data)
    except ParseError as e:
        assert e.status == 502
        return
    assert 100 <= parsed.status <= 999
    assert parsed.version in ("HTTP/1.0", "HTTP/1.1")
    assert "\0" not in parsed.reason and "\r" not in parsed.reason
    for name, value in parsed.headers:
        check_field(name, value)
    assert len(parsed.repairs) <= MAX_REPAIRS


# -- cost ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda n: b"HTTP/1.1 200 OK\r\nX:" + b"\t" * n + b"\x00x\r\n\r\n",
        lambda n: b"HTTP/1.1 200 OK\r\n" + b"X : y\r\n a\r\n" * (n // 12) + b"\r\n",
        lambda n: b"HTTP/1.1 200 OK\r\n" + b"(: y\r\n" * (n // 6) + b"\r\n",
    ],
    ids=["whitespace run", "repaired lines", "dropped lines"],
)
def test_response_heads_take_linear_time(make):
    n = 15_000

    def parse(size):
        data = make(size)

        def run():
            try:
                parse_response_head(data)
            except ParseError:
                pass

        return run

    assert doubling_ratio(parse, n) < LINEAR


# -- trailer sections of chunked responses: read like heads, no framing guards --------------


@pytest.mark.parametrize(
    ("section", "fields", "repairs"),
    [
        (b"\r\n", [], []),
        (b"X-T: v\r\n\r\n", [("X-T", "v")], []),
        (b"X-T : v\r\n\r\n", [("X-T", "v")], ["whitespace before the colon of X-T"]),
        (b"X-T: a\r\n b\r\n\r\n", [("X-T", "a b")], ["obs-fold in X-T"]),
        (b"no colon\r\nX-T: v\r\n\r\n", [("X-T", "v")], ["line without a colon dropped"]),
        (b" lead\r\nX-T: v\n\n", [("X-T", "v")], ["line starting with whitespace"]),
        (b"X(A): 1\r\n\r\n", [], ["invalid name"]),
        # No trailer field frames anything: no 502 for a repair of these names.
        (b"Content-Length : 5\r\n\r\n", [("Content-Length", "5")], ["colon of Content-Length"]),
        (b"Transfer-Encoding\r\n\r\n", [], ["line without a colon dropped"]),
        (b"X-T: a\rb\r\n\r\n", [("X-T", "a b")], ["bare CR in header X-T"]),
    ],
)
def test_response_trailers_are_repaired_like_heads(section, fields, repairs):
    got, noted = parse_response_trailers(section)
    assert got == fields
    assert len(noted) == len(repairs)
    for note, words in zip(noted, repairs, strict=True):
        assert words in note


@pytest.mark.parametrize(
    ("section", "words"),
    [(b"X-T: a\x00b\r\n\r\n", "NUL in header X-T"), (b"X-T: v\r\n", "malformed header section")],
)
def test_unreadable_response_trailers_are_502(section, words):
    with pytest.raises(ParseError, match=words) as info:
        parse_response_trailers(section)
    assert info.value.status == 502
