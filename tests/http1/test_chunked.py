"""Unit tests for eyewall.http1.chunked: the incremental chunked decoder (RFC 9112 §7.1).

Every input is fed whole, one byte at a time, and split in two at every point; the
decoder must give the same answer each way.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eyewall.http1.chunked import ChunkedDecoder, encode_chunk, last_chunk
from eyewall.http1.parse import ParseError

Result = tuple[bytes, list[tuple[str, str]], bytes]


def decode(pieces: list[bytes], **limits: int) -> Result:
    """Feed ``pieces`` in order; bytes after the end go to ``unused`` (as a caller that
    reads past the body would find them).  Returns (data, trailers, unused)."""
    decoder = ChunkedDecoder(**limits)
    out = bytearray()
    extra = b""
    for piece in pieces:
        if decoder.done:
            extra += piece
            continue
        for part in decoder.feed(piece):
            assert isinstance(part, (bytes, memoryview)) and len(part)
            out += part
        assert decoder.done or decoder.wanted > 0, "asks for nothing, yet not done"
    assert decoder.done, "body not complete"
    assert decoder.wanted == 0
    return bytes(out), decoder.trailers, decoder.unused + extra


def splits(data: bytes) -> list[list[bytes]]:
    """``data`` whole, one byte at a time, and cut in two at every point."""
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    return ways


def decode_every_way(data: bytes, **limits: int) -> Result:
    results = [decode(pieces, **limits) for pieces in splits(data)]
    assert all(r == results[0] for r in results)
    return results[0]


def refuse_every_way(data: bytes, **limits: int) -> str:
    messages = set()
    for pieces in splits(data):
        with pytest.raises(ParseError) as info:
            decode(pieces, **limits)
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    return messages.pop()


# id, input, (data, trailers, unused)
VALID = [
    ("one chunk", b"5\r\nhello\r\n0\r\n\r\n", (b"hello", [], b"")),
    ("two chunks", b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", (b"abcde", [], b"")),
    ("empty body", b"0\r\n\r\n", (b"", [], b"")),
    ("bare LF everywhere", b"3\nabc\n0\n\n", (b"abc", [], b"")),
    ("mixed line ends", b"3\r\nabc\n0\n\r\n", (b"abc", [], b"")),
    (
        "hex digits",
        b"a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n",
        (b"0123456789" * 2, [], b""),
    ),
    ("leading zeros", b"0003\r\nabc\r\n000\r\n\r\n", (b"abc", [], b"")),
    ("extension", b"3;name=value\r\nabc\r\n0;last\r\n\r\n", (b"abc", [], b"")),
    ("quoted extension", b'3;a="b; c";d\r\nabc\r\n0\r\n\r\n', (b"abc", [], b"")),
    ("whitespace before extension", b"3 \t;x\r\nabc\r\n0\r\n\r\n", (b"abc", [], b"")),
    ("trailing whitespace", b"3 \r\nabc\r\n0\r\n\r\n", (b"abc", [], b"")),
    ("CRLF inside data", b"4\r\n\r\n\r\n\r\n0\r\n\r\n", (b"\r\n\r\n", [], b"")),
    ("binary data", b"3\r\n\x00\xff\n\r\n0\r\n\r\n", (b"\x00\xff\n", [], b"")),
    (
        "trailers",
        b"1\r\nx\r\n0\r\nExpires: never\r\nx-sum: 1\r\n\r\n",
        (b"x", [("Expires", "never"), ("x-sum", "1")], b""),
    ),
    ("trailer with LF", b"0\nA: 1\n\n", (b"", [("A", "1")], b"")),
    (
        "next message after",
        b"1\r\nx\r\n0\r\n\r\nGET / HTTP/1.1\r\n",
        (b"x", [], b"GET / HTTP/1.1\r\n"),
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"), [case[1:] for case in VALID], ids=[case[0] for case in VALID]
)
def test_valid_bodies(data, expected):
    assert decode_every_way(data) == expected


# id, input, words in the error
INVALID = [
    ("empty size", b"\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    ("non-hex", b"g\r\n", "malformed chunk size"),
    ("0x prefix", b"0x4\r\nabcd\r\n0\r\n\r\n", "malformed chunk size"),
    ("negative", b"-1\r\n", "malformed chunk size"),
    ("plus sign", b"+1\r\nx\r\n0\r\n\r\n", "malformed chunk size"),
    ("leading space", b" 1\r\nx\r\n0\r\n\r\n", "malformed chunk size"),
    ("17 hex digits", b"1" * 17 + b"\r\n", "malformed chunk size"),
    ("bare CR in size line", b"1\rx\r\n", "malformed chunk size"),
    ("NUL in extension", b"1;\x00\r\nx\r\n0\r\n\r\n", "malformed chunk size"),
    ("missing CRLF after data", b"3\r\nabcd\r\n0\r\n\r\n", "not followed by CRLF"),
    ("CR without LF after data", b"3\r\nabc\rx0\r\n\r\n", "not followed by CRLF"),
    ("two CRs after data", b"3\r\nabc\r\r\n0\r\n\r\n", "not followed by CRLF"),
    ("malformed trailer", b"0\r\nno colon\r\n\r\n", "malformed header field name"),
    ("folded trailer", b"0\r\nA: 1\r\n 2\r\n\r\n", "obsolete line folding"),
    ("NUL in trailer", b"0\r\nA: \x00\r\n\r\n", "invalid character in header A"),
]


@pytest.mark.parametrize(
    ("data", "words"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_invalid_bodies(data, words):
    assert words in refuse_every_way(data)


# A response's trailer section is read as leniently as its head (``repair=True``);
# a request's stays strict (the INVALID cases above).
REPAIRED_TRAILERS = [
    ("whitespace before colon", b"0\r\nX-T : v\r\n\r\n", [("X-T", "v")], True),
    ("obs-fold", b"0\r\nX-T: a\r\n b\r\n\r\n", [("X-T", "a b")], True),
    ("no colon", b"0\r\nno colon\r\nX-T: v\r\n\r\n", [("X-T", "v")], True),
    ("valid", b"0\r\nX-T: v\r\n\r\n", [("X-T", "v")], False),
]


@pytest.mark.parametrize(
    ("data", "trailers", "repaired"),
    [case[1:] for case in REPAIRED_TRAILERS],
    ids=[case[0] for case in REPAIRED_TRAILERS],
)
def test_response_trailers_are_repaired_and_request_trailers_are_not(data, trailers, repaired):
    body = b"5\r\nhello\r\n" + data
    for pieces in splits(body):
        decoder = ChunkedDecoder(repair=True)
        out = b"".join(bytes(p) for piece in pieces for p in decoder.feed(piece))
        assert decoder.done and (out, decoder.trailers) == (b"hello", trailers)
        assert bool(decoder.repairs) is repaired
    if repaired:
        with pytest.raises(ParseError):
            decode([body])  # a request's trailers: strict


def test_size_line_limit_counts_the_line_end():
    line = b"1;" + b"x" * 4 + b"\r\n"  # 8 bytes
    assert decode_every_way(line + b"a\r\n0\r\n\r\n", max_line=8)[0] == b"a"
    assert "chunk size line too long" in refuse_every_way(line + b"a\r\n", max_line=7)


def test_an_endless_size_line_is_refused_at_the_limit():
    decoder = ChunkedDecoder(max_line=100)
    decoder.feed(b"1" + b" " * 98)
    assert decoder.in_line and decoder.wanted == 1
    with pytest.raises(ParseError, match="too long"):
        decoder.feed(b" ")


def test_trailer_section_limit():
    body = b"0\r\nA: 1\r\n\r\n"  # trailer section: 8 bytes with its empty line
    assert decode_every_way(body, max_trailers=8)[1] == [("A", "1")]
    assert "trailer section too large" in refuse_every_way(body, max_trailers=7)


def test_a_trailer_section_that_fills_its_limit_before_its_end_is_refused():
    """Trailer lines that end exactly at ``max_trailers`` leave no room for the empty
    line: refused at once.  (The decoder asked for 0 bytes there, and a reader following
    its hints read nothing, forever.)"""
    body = b"5\r\nhello\r\n0\r\n" + b"X-A: b\r\n" * 2 + b"\r\n"
    assert "trailer section too large" in refuse_every_way(body, max_trailers=16)
    decoder = ChunkedDecoder(max_trailers=16)
    pos = 0
    with pytest.raises(ParseError, match="trailer section too large"):
        for _ in range(100):  # a reader following the hints, as proxy/bodies.py does
            want = decoder.wanted
            assert want > 0
            stop = min(body.index(b"\n", pos) + 1, pos + want) if decoder.in_line else pos + want
            decoder.feed(body[pos:stop])
            pos = stop
    assert decode_every_way(body, max_trailers=18)[1] == [("X-A", "b"), ("X-A", "b")]


def test_hints_let_a_reader_stop_exactly_at_the_end():
    # A reader that takes ``wanted`` bytes, or one line while ``in_line``, never reads
    # into the next message: a stream with no way to put bytes back can use it.
    body = b"3;x\r\nabc\n10\r\n" + b"y" * 16 + b"\r\n0\r\nT: 1\r\n\r\n"
    stream = body + b"NEXT"
    decoder = ChunkedDecoder()
    pos, out, reads = 0, b"", 0
    while not decoder.done:
        want = decoder.wanted
        stop = min(stream.index(b"\n", pos) + 1, pos + want) if decoder.in_line else pos + want
        reads += 1
        out += b"".join(decoder.feed(stream[pos:stop]))
        pos = stop
    assert (out, decoder.trailers, decoder.unused) == (b"abc" + b"y" * 16, [("T", "1")], b"")
    assert stream[pos:] == b"NEXT"
    # Size line; data, its LF and "1" of the next size line; the rest of that line; data
    # and CRLF; the last chunk; one read per trailer line.
    assert reads == 7


def test_pieces_are_slices_of_the_input():
    data = b"5\r\nhello\r\n0\r\n\r\n"
    decoder = ChunkedDecoder()
    (piece,) = decoder.feed(memoryview(data))
    assert isinstance(piece, memoryview) and piece.obj is data and piece == b"hello"
    decoder = ChunkedDecoder()
    decoder.feed(b"5\r\n")
    assert decoder.wanted == 7
    whole = b"hello"
    assert decoder.feed(whole)[0] is whole


def test_feed_after_the_end_is_a_programming_error():
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n\r\nrest")
    assert decoder.done and decoder.unused == b"rest"
    with pytest.raises(RuntimeError):
        decoder.feed(b"more")


def test_encode_chunk_and_last_chunk():
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(memoryview(b"x" * 26)) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert encode_chunk(b"") == b""
    assert last_chunk() == b"0\r\n\r\n"
    assert last_chunk([("A", "1"), ("b", "\xe9")]) == b"0\r\nA: 1\r\nb: \xe9\r\n\r\n"


# -- properties --------------------------------------------------------------------------

CHUNKS = st.lists(st.binary(min_size=1, max_size=40), max_size=6)
EXTENSION = st.sampled_from([b"", b";a", b";a=b", b' ;q="x;y"', b";n=v;m"])
TRAILERS = st.lists(
    st.tuples(st.sampled_from(["A", "x-sum", "Expires"]), st.sampled_from(["", "1", "a b"])),
    max_size=3,
)


@st.composite
def encoded_bodies(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[str, str]]]:
    """A chunked body from random chunks, extensions, trailers and line ends."""
    chunks = draw(CHUNKS)
    trailers = draw(TRAILERS)
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    out = b""
    for chunk in chunks:
        size = b"%x" % len(chunk)
        size = draw(st.sampled_from([size, size.upper(), b"0" + size]))
        out += size + draw(EXTENSION) + eol + chunk + eol
    out += b"0" + draw(EXTENSION) + eol
    out += b"".join(f"{n}: {v}".encode() + eol for n, v in trailers) + eol
    return out, b"".join(chunks), trailers


@settings(max_examples=300, database=None)
@given(encoded_bodies(), st.lists(st.integers(0, 400), max_size=8))
def test_decoding_recovers_the_data_for_any_split(body, cuts):
    encoded, data, trailers = body
    points = sorted({min(c, len(encoded)) for c in cuts} | {0, len(encoded)})
    pieces = [encoded[a:b] for a, b in itertools.pairwise(points)]
    assert decode([*pieces, b"NEXT"]) == (data, trailers, b"NEXT")


FRAGMENTS = [b"0", b"1", b"5", b"f", b"F", b"g", b";", b"=", b'"', b" ", b"\t", b"\r", b"\n"]
FRAGMENTS += [b"\r\n", b"0x", b"-", b"A: 1", b":", b"\x00", b"\xff", b"hello"]
ARBITRARY = st.binary(max_size=200) | st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(
    b"".join
)


@settings(max_examples=500, database=None)
@given(ARBITRARY)
def test_any_bytes_decode_or_raise_parse_error(data):
    # Whole or one byte at a time: the same data, or the same error, and nothing else.
    outcomes = []
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        decoder = ChunkedDecoder(max_line=64, max_trailers=128)
        out = b""
        try:
            for piece in pieces:
                if decoder.done:
                    break
                out += b"".join(decoder.feed(piece))
        except ParseError as e:
            assert e.status == 400
            outcomes.append(("error", str(e)))
            continue
        outcomes.append(("ok", out, decoder.done, decoder.trailers))
    assert outcomes[0] == outcomes[1]
