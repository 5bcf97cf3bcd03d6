"""The PROXY protocol parser against the specification's examples and limits, fed whole
and one byte at a time, and fuzzed against its contract.  Real HAProxy bytes are in
tests/fleet/test_proxyproto_haproxy.py."""

from __future__ import annotations

import dataclasses
import socket
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from eyewall import proxyproto
from eyewall.proxyproto import (
    MAX_V1_HEADER,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    crc32c,
    encode,
    looks_like_proxy_header,
    parse,
    parse_tlvs,
)

AFTER = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


def v2(command: int, family: int, body: bytes, length: int | None = None) -> bytes:
    """A version 2 header written field by field (§2.2), independent of `encode`."""
    n = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", command, family, n) + body


def parse_whole_and_bytewise(data: bytes) -> tuple[ProxyHeader, int]:
    """Parse ``data`` whole, with the connection's first bytes after it, and grown one
    byte at a time: every proper prefix is incomplete (None), the whole header parses
    the same way every time."""
    whole = parse(data)
    assert whole is not None
    header, consumed = whole
    assert consumed == len(data)
    assert parse(data + AFTER) == whole
    assert parse(bytearray(data)) == whole
    assert parse(memoryview(b"xx" + data + AFTER)[2:]) == whole
    for end in range(len(data)):
        assert parse(data[:end]) is None, f"prefix of {end} bytes"
    return header, consumed


def fails_whole_and_bytewise(data: bytes) -> int:
    """``data`` raises ProxyProtocolError whole; grown one byte at a time it is
    incomplete until some length, raises from there on, and never parses.  Returns
    the length at which it is first refused."""
    with pytest.raises(ProxyProtocolError):
        parse(data)
    first = None
    for end in range(len(data) + 1):
        try:
            result = parse(data[:end])
        except ProxyProtocolError:
            first = end if first is None else first
            continue
        assert result is None, f"prefix of {end} bytes parsed: {result}"
        assert first is None, f"refused at {first} bytes, then incomplete at {end}"
    assert first is not None
    return first


# -- version 1 (§2.1) --------------------------------------------------------------------


def test_v1_example_from_the_spec() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    header, consumed = parse_whole_and_bytewise(line)
    assert header == ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert (line + AFTER)[consumed:] == AFTER


@pytest.mark.parametrize(
    ("line", "family", "source", "destination"),
    [
        # The maximum line lengths of §2.1, 56, 104 and 15 bytes.
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            "TCP4",
            ("255.255.255.255", 65535),
            ("255.255.255.255", 65535),
        ),
        (
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
            b"FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF 65535 65535\r\n",
            "TCP6",
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ),
        (b"PROXY UNKNOWN\r\n", "UNKNOWN", None, None),
        (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 1\r\n", "TCP4", ("0.0.0.0", 0), ("10.0.0.1", 1)),
        # IPv6 comes out canonical, whatever form it came in; HAProxy writes an
        # IPv4-mapped client with a dotted tail.
        (
            b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:127.0.0.1 1 2\r\n",
            "TCP6",
            ("2001:db8::1", 1),
            ("::ffff:127.0.0.1", 2),
        ),
    ],
)
def test_v1_lines(
    line: bytes,
    family: str,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
) -> None:
    header, _ = parse_whole_and_bytewise(line)
    assert (header.version, header.command, header.family) == (1, "PROXY", family)
    assert (header.source, header.destination) == (source, destination)
    assert header.tlvs == ()


def test_v1_unknown_worst_case_of_107_bytes_is_accepted_and_its_rest_ignored() -> None:
    f = "ffff:" * 7 + "ffff"
    line = f"PROXY UNKNOWN {f} {f} 65535 65535\r\n".encode()
    assert len(line) == MAX_V1_HEADER
    header, _ = parse_whole_and_bytewise(line)
    assert header == ProxyHeader(1, "PROXY", "UNKNOWN", None, None)


V1_BAD = {
    "lowercase signature": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "two spaces": b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "bad protocol": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "UDP4 is not version 1": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "UNKNOWN glued": b"PROXY UNKNOWNX\r\n",
    "missing port": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "extra field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "trailing space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "octet over 255": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "leading zero in address": b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n",
    "three octets": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "v6 address in TCP4": b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
    "v4 address in TCP6": b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    "two double colons": b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
    "zone id": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "port over 65535": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "leading zero in port": b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n",
    "signed port": b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n",
    "non-ASCII digit": "PROXY TCP4 1.2.3.4 5.6.7.8 8\u0660 2\r\n".encode(),
    "bare LF": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "bare CR": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
    "LF before CRLF in UNKNOWN": b"PROXY UNKNOWN a\nb\r\n",
    "no CRLF within 107 bytes": b"PROXY UNKNOWN " + b"x" * 93 + b"\r\n",
}


@pytest.mark.parametrize("data", V1_BAD.values(), ids=V1_BAD.keys())
def test_v1_malformed(data: bytes) -> None:
    fails_whole_and_bytewise(data)


def test_v1_refused_as_soon_as_the_protocol_field_is_wrong() -> None:
    assert fails_whole_and_bytewise(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n") == len(b"PROXY TCP5")
    assert fails_whole_and_bytewise(b"PROXY UNKNOWNX\r\n") == len(b"PROXY UNKNOWNX")
    assert fails_whole_and_bytewise(b"GET / HTTP/1.1\r\n") == 1


def test_v1_line_without_crlf_is_refused_at_107_bytes_not_before() -> None:
    data = b"PROXY UNKNOWN " + b"x" * 200
    assert parse(data[:106]) is None
    assert fails_whole_and_bytewise(data) == MAX_V1_HEADER


# -- version 2 (§2.2) --------------------------------------------------------------------


def test_v2_tcp4() -> None:
    body = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + struct.pack("!HH", 56324, 443)
    header, _ = parse_whole_and_bytewise(v2(0x21, 0x11, body))
    assert header == ProxyHeader(2, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443))


def test_v2_tcp6_with_tlvs() -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("00000000000000000000ffff7f000001")
    tlvs = b"\x05\x00\x03abc" + b"\x04\x00\x00" + b"\x02\x00\x0bexample.com"
    header, _ = parse_whole_and_bytewise(v2(0x21, 0x21, src + dst + b"\x01\xbb\x00\x50" + tlvs))
    assert header.family == "TCP6"
    assert header.source == ("2001:db8::1", 443)
    assert header.destination == ("::ffff:127.0.0.1", 80)
    assert header.tlvs == ((5, b"abc"), (4, b""), (2, b"example.com"))
    assert header.tlv(PP2_TYPE_UNIQUE_ID) == b"abc"
    assert header.tlv(0xEE) is None


def test_v2_local_health_check_as_haproxy_sends_it() -> None:
    # LOCAL, AF_UNSPEC, no address: the receiver keeps the real endpoints.
    header, consumed = parse_whole_and_bytewise(v2(0x20, 0x00, b""))
    assert header == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None)
    assert consumed == 16


def test_v2_local_ignores_family_and_addresses_but_skips_them() -> None:
    # "Receivers MUST always consider this field to skip the appropriate number of bytes
    # and must not assume zero is presented for LOCAL connections."
    body = bytes(12) + b"\x05\x00\x01z"
    header, consumed = parse_whole_and_bytewise(v2(0x20, 0x11, body))
    assert header == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, ((5, b"z"),))
    assert consumed == 16 + len(body)
    header, _ = parse_whole_and_bytewise(v2(0x20, 0x00, b"\x04\x00\x02\x00\x00"))
    assert header.tlvs == ((PP2_TYPE_NOOP, b"\0\0"),)


@pytest.mark.parametrize(
    ("family_byte", "family", "address_length"),
    [(0x00, "UNKNOWN", 0), (0x10, "UNKNOWN", 0), (0x31, "UNIX_STREAM", 216)],
)
def test_v2_unspec_and_unix_are_unknown_sources(
    family_byte: int, family: str, address_length: int
) -> None:
    body = b"/run/lb.sock".ljust(108, b"\0") * 2 if address_length else b"ignored"
    header, consumed = parse_whole_and_bytewise(v2(0x21, family_byte, body))
    assert (header.command, header.family, header.source, header.destination) == (
        "PROXY",
        family,
        None,
        None,
    )
    assert consumed == 16 + len(body)


def test_v2_udp4_is_reported_as_such() -> None:
    header, _ = parse_whole_and_bytewise(
        v2(0x21, 0x12, bytes([1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]))
    )
    assert (header.family, header.source, header.destination) == (
        "UDP4",
        ("1.2.3.4", 1),
        ("5.6.7.8", 2),
    )


def test_v2_crc32c_is_checked() -> None:
    body = bytes([10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2]) + b"\x03\x00\x04\0\0\0\0"
    zeroed = v2(0x21, 0x11, body)
    good = zeroed[:-4] + crc32c(zeroed).to_bytes(4, "big")
    header, _ = parse_whole_and_bytewise(good)
    assert header.tlv(PP2_TYPE_CRC32C) == good[-4:]
    bad = good[:-1] + bytes([good[-1] ^ 1])
    fails_whole_and_bytewise(bad)


def test_crc32c_check_value() -> None:
    # RFC 3720 B.4 / the standard "123456789" check value of CRC-32C.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA


def test_v2_length_limit_is_enforced_before_the_bytes_arrive() -> None:
    head = v2(0x21, 0x11, b"", length=4000)
    assert parse(head) is None
    with pytest.raises(ProxyProtocolError, match="exceeds 1000"):
        parse(head, max_length=1000)
    longest = v2(0x20, 0x00, b"\x04\xff\xfc" + bytes(0xFFFC))
    assert len(longest) == proxyproto.MAX_HEADER
    assert parse(longest) == (
        ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, ((4, bytes(0xFFFC)),)),
        len(longest),
    )


def test_v2_ssl_sub_vectors_can_be_read() -> None:
    ssl = b"\x01" + bytes(4) + b"\x21\x00\x07TLSv1.3"
    assert parse_tlvs(ssl, 5) == ((0x21, b"TLSv1.3"),)
    body = bytes(12) + struct.pack("!BH", PP2_TYPE_SSL, len(ssl)) + ssl
    header, _ = parse_whole_and_bytewise(v2(0x21, 0x11, body))
    value = header.tlv(PP2_TYPE_SSL)
    assert value is not None and parse_tlvs(value, 5) == ((0x21, b"TLSv1.3"),)


V4 = bytes([1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2])
V2_BAD = {
    "bad signature": b"\r\n\r\n\x00\r\nQUIT\r" + b"\x21\x11\x00\x0c" + V4,
    "version 1 nibble": V2_SIGNATURE + b"\x11\x11\x00\x0c" + V4,
    "version 3 nibble": V2_SIGNATURE + b"\x31\x11\x00\x0c" + V4,
    "command 2": V2_SIGNATURE + b"\x22\x11\x00\x0c" + V4,
    "command 15": V2_SIGNATURE + b"\x2f\x11\x00\x0c" + V4,
    "family 4": V2_SIGNATURE + b"\x21\x41\x00\x0c" + V4,
    "transport 3": V2_SIGNATURE + b"\x21\x13\x00\x0c" + V4,
    "truncated IPv4 addresses": V2_SIGNATURE + b"\x21\x11\x00\x0b" + V4[:11],
    "truncated IPv6 addresses": V2_SIGNATURE + b"\x21\x21\x00\x0c" + V4,
    "truncated UNIX addresses": V2_SIGNATURE + b"\x21\x31\x00\x0c" + V4,
    "truncated TLV header": V2_SIGNATURE + b"\x21\x11\x00\x0e" + V4 + b"\x05\x00",
    "TLV past the end": V2_SIGNATURE + b"\x21\x11\x00\x10" + V4 + b"\x05\x00\x02a",
    "CRC32C of 3 bytes": V2_SIGNATURE + b"\x21\x11\x00\x12" + V4 + b"\x03\x00\x03abc",
    "unique id over 128 bytes": V2_SIGNATURE
    + struct.pack("!BBH", 0x21, 0x11, 12 + 3 + 129)
    + V4
    + b"\x05\x00\x81"
    + bytes(129),
}


@pytest.mark.parametrize("data", V2_BAD.values(), ids=V2_BAD.keys())
def test_v2_malformed(data: bytes) -> None:
    fails_whole_and_bytewise(data)


def test_v2_refused_at_the_byte_that_shows_it() -> None:
    assert fails_whole_and_bytewise(V2_BAD["bad signature"]) == 12
    assert fails_whole_and_bytewise(V2_BAD["version 1 nibble"]) == 13
    assert fails_whole_and_bytewise(V2_BAD["command 2"]) == 13
    assert fails_whole_and_bytewise(V2_BAD["family 4"]) == 14


# -- detection -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b"", None),
        (b"PROX", None),
        (b"PROXY", None),
        (b"PROXY ", True),
        (b"PROXY TCP4", True),
        (b"PROXYZ", False),
        (b"\r\n\r\n\x00", None),
        (V2_SIGNATURE, None),
        (V2_SIGNATURE + b"\x21", True),
        (V2_SIGNATURE + b"\x20", True),
        (V2_SIGNATURE + b"\x11", False),
        (b"\r\n\r\n\x01", False),
        (b"GET / HTTP/1.1\r\n", False),
        (b"CONNECT example.com:443 HTTP/1.1\r\n", False),
        (b"\x16\x03\x01\x02\x00", False),  # a TLS ClientHello
        (b"\r\n", None),
    ],
)
def test_looks_like_proxy_header(prefix: bytes, expected: bool | None) -> None:
    assert looks_like_proxy_header(prefix) is expected


# -- encode ---------------------------------------------------------------------------------


def test_encode_writes_what_the_spec_shows() -> None:
    h = ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert encode(h) == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode(ProxyHeader(2, "LOCAL", "UNKNOWN", None, None)) == v2(0x20, 0x00, b"")
    h2 = ProxyHeader(2, "PROXY", "TCP4", ("1.2.3.4", 1), ("5.6.7.8", 2))
    assert encode(h2) == v2(0x21, 0x11, V4)


@pytest.mark.parametrize(
    "header",
    [
        ProxyHeader(1, "LOCAL", "UNKNOWN", None, None),
        ProxyHeader(1, "PROXY", "UDP4", ("1.2.3.4", 1), ("5.6.7.8", 2)),
        ProxyHeader(1, "PROXY", "TCP4", None, None),
        ProxyHeader(1, "PROXY", "UNKNOWN", None, None, ((4, b""),)),
        ProxyHeader(2, "PROXY", "TCP4", None, None),
        ProxyHeader(2, "PROXY", "UNKNOWN", None, None, ((4, bytes(0xFFFF)),)),
    ],
)
def test_encode_refuses_what_its_version_cannot_carry(header: ProxyHeader) -> None:
    with pytest.raises(ValueError):
        encode(header)


# -- the contract, fuzzed -------------------------------------------------------------------


def check_contract(data: bytes) -> None:
    """``parse`` returns None, or a header no longer than the input, or raises
    ProxyProtocolError; nothing else.  A parsed header encodes to bytes that parse back
    to it."""
    try:
        result = parse(data)
    except ProxyProtocolError:
        return
    if result is None:
        assert len(data) < proxyproto.MAX_HEADER
        return
    header, consumed = result
    assert 0 < consumed <= len(data)
    assert parse(data[:consumed]) == result
    again = parse(encode(header))
    assert again is not None and without_crc(again[0]) == without_crc(header)


def without_crc(header: ProxyHeader) -> ProxyHeader:
    """``header`` with its CRC32C value zeroed (`encode` computes it anew)."""
    tlvs = tuple((k, bytes(4) if k == PP2_TYPE_CRC32C else v) for k, v in header.tlvs)
    return dataclasses.replace(header, tlvs=tlvs)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_honour_the_contract(data: bytes) -> None:
    check_contract(data)


@given(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE]),
    st.binary(max_size=300),
)
@example(V2_SIGNATURE, b"\x21\x11\x00\x0c" + V4)
@example(b"PROXY TCP4 ", b"1.2.3.4 5.6.7.8 1 2\r\n")
def test_bytes_after_a_signature_honour_the_contract(prefix: bytes, rest: bytes) -> None:
    check_contract(prefix + rest)


ipv4 = st.ip_addresses(v=4).map(str)
# canonical as inet_ntop writes it (str() of an IPv4-mapped address differs by Python version)
ipv6 = st.ip_addresses(v=6).map(lambda a: socket.inet_ntop(socket.AF_INET6, a.packed))
ports = st.integers(0, 0xFFFF)
tlv = st.tuples(
    st.integers(0, 255).filter(lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID)),
    st.binary(max_size=40),
)


@st.composite
def headers(draw: st.DrawFn) -> ProxyHeader:
    version = draw(st.sampled_from([1, 2]))
    family = draw(
        st.sampled_from(
            ["TCP4", "TCP6", "UNKNOWN"]
            if version == 1
            else ["TCP4", "TCP6", "UDP4", "UDP6", "UNIX_STREAM", "UNKNOWN"]
        )
    )
    command = "LOCAL" if version == 2 and draw(st.booleans()) else "PROXY"
    if command == "LOCAL":
        family = "UNKNOWN"
    source = destination = None
    if family in ("TCP4", "UDP4", "TCP6", "UDP6"):
        addresses = ipv4 if family.endswith("4") else ipv6
        source = (draw(addresses), draw(ports))
        destination = (draw(addresses), draw(ports))
    tlvs: tuple[tuple[int, bytes], ...] = ()
    if (version == 2 and family != "UNKNOWN") or command == "LOCAL":
        tlvs = tuple(draw(st.lists(tlv, max_size=4)))
        if draw(st.booleans()):
            tlvs += ((PP2_TYPE_UNIQUE_ID, draw(st.binary(max_size=128))),)
        if draw(st.booleans()):
            tlvs += ((PP2_TYPE_CRC32C, bytes(4)),)
    return ProxyHeader(version, command, family, source, destination, tlvs)  # type: ignore[arg-type]


@given(headers(), st.binary(max_size=20))
def test_generated_headers_round_trip(header: ProxyHeader, after: bytes) -> None:
    data = encode(header)
    result = parse(data + after)
    assert result is not None
    parsed, consumed = result
    assert consumed == len(data)
    assert without_crc(parsed) == header
    crc = parsed.tlv(PP2_TYPE_CRC32C)
    if crc is not None:  # encode filled the checksum in, over the header with it zeroed
        assert crc32c(encode(header)[:consumed].replace(crc, bytes(4))) == int.from_bytes(crc)
    assert looks_like_proxy_header(data[:13]) is True


@given(headers(), st.data())
def test_generated_headers_byte_at_a_time(header: ProxyHeader, data: st.DataObject) -> None:
    wire = encode(header)
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert parse(wire[:cut]) is None


@given(headers(), st.integers(0, 10_000), st.integers(1, 255))
def test_corrupted_headers_honour_the_contract(header: ProxyHeader, at: int, flip: int) -> None:
    wire = bytearray(encode(header))
    wire[at % len(wire)] ^= flip
    check_contract(bytes(wire))


def test_the_parser_is_pure() -> None:
    # Stdlib only, no event loop: the I/O layer of any framework can feed it.
    from tests.test_purity import imported_names, tornado_modules_after_importing

    assert tornado_modules_after_importing("eyewall.proxyproto") == []
    top = {name.split(".")[0] for name in imported_names("eyewall.proxyproto")}
    assert top <= {"__future__", "dataclasses", "socket", "struct", "typing"}, top


def test_public_api_is_pinned() -> None:
    # A change here is a change for every caller: make it on purpose.
    assert set(proxyproto.__all__) == {
        "MAX_HEADER",
        "MAX_V1_HEADER",
        "MAX_V2_HEADER",
        "PP2_TYPE_ALPN",
        "PP2_TYPE_AUTHORITY",
        "PP2_TYPE_CRC32C",
        "PP2_TYPE_NETNS",
        "PP2_TYPE_NOOP",
        "PP2_TYPE_SSL",
        "PP2_TYPE_UNIQUE_ID",
        "V2_SIGNATURE",
        "Command",
        "Family",
        "ProxyHeader",
        "ProxyProtocolError",
        "crc32c",
        "encode",
        "looks_like_proxy_header",
        "parse",
        "parse_tlvs",
    }
    assert [f.name for f in dataclasses.fields(ProxyHeader)] == [
        "version",
        "command",
        "family",
        "source",
        "destination",
        "tlvs",
    ]
