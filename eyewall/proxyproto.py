"""The PROXY protocol, versions 1 (text) and 2 (binary): parse and build the header a
load balancer such as HAProxy puts before a relayed connection's first byte.

Followed: HAProxy's "The PROXY protocol, Versions 1 & 2" (doc/proxy-protocol.txt in the
HAProxy sources); section numbers below are that document's.

Pure: bytes in, values out, nothing read from a socket and no clock.  The I/O layer
feeds `parse` whatever it has read so far and acts on the answer:

* ``None``: the bytes so far are a valid beginning; read more (the caller bounds the
  wait: §2 suggests a few seconds, at least 3);
* ``(header, consumed)``: the header is whole; the connection's own data starts at
  ``buffer[consumed:]``;
* `ProxyProtocolError`: drop the connection (§2.1: "abort the connection as soon as
  possible").  Errors are raised as soon as the bytes received prove the header bad,
  not only once it would be complete.

Nothing else escapes `parse`: the fuzz tests hold it to that contract.

Security (§5): a listener either requires the header or never accepts it, by
configuration, and should take it only from trusted load balancers.
`looks_like_proxy_header` is for diagnostics (a clear log line when a client talks to a
PROXY listener directly, or HAProxy to a plain one), never for guessing.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
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
]

Command = Literal["PROXY", "LOCAL"]
# What the sender announced.  Version 1 knows TCP4, TCP6 and UNKNOWN; version 2 adds
# UDP and UNIX sockets.  UNKNOWN also stands for every version 2 header whose address
# family or transport is UNSPEC, and for every LOCAL header (§2.2: "the family ... is
# ignored").
Family = Literal["TCP4", "TCP6", "UDP4", "UDP6", "UNIX_STREAM", "UNIX_DGRAM", "UNKNOWN"]

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"  # §2.2, the 12-byte block
_V1_PREFIX: Final = b"PROXY "  # §2.1: "PROXY" then exactly one space
MAX_V1_HEADER: Final = 107  # §2.1: the worst-case line, CRLF included
MAX_V2_HEADER: Final = 16 + 0xFFFF  # §2.2: 16 bytes, then a 16-bit length
MAX_HEADER: Final = MAX_V2_HEADER  # the most `parse` may need to see

# §2.2, the registered TLV types.  PP2_TYPE_SSL's value is a byte of client flags, a
# 32-bit verify result, then sub-TLVs: `parse_tlvs(value[5:])` reads those.
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30
_UNIQUE_ID_MAX: Final = 128  # §2.2.5: "up to 128 bytes"

# §2.2: the 14th byte, address family (high nibble) and transport (low nibble), of the
# combinations whose addresses this module reads.  The other valid nibbles (0 =
# UNSPEC, AF_UNIX) make a header whose addresses are skipped.
_FAMILIES: Final[dict[int, tuple[Family, int]]] = {
    0x11: ("TCP4", 12),
    0x12: ("UDP4", 12),
    0x21: ("TCP6", 36),
    0x22: ("UDP6", 36),
    0x31: ("UNIX_STREAM", 216),
    0x32: ("UNIX_DGRAM", 216),
}
_FAMILY_BYTES: Final[dict[Family, int]] = {name: byte for byte, (name, _) in _FAMILIES.items()}


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header: the receiver must drop the
    connection (§2.1, §2.2)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY protocol header.

    ``version``: 1 (text) or 2 (binary).
    ``command``: "PROXY" for a relayed connection; "LOCAL" for one the load balancer
    opened itself, such as a health check (version 2 only; §2.2).
    ``family``: what the sender announced, see `Family`.
    ``source``, ``destination``: ``(address, port)`` of the original client and of the
    address it connected to, for TCP4/TCP6/UDP4/UDP6 PROXY headers; ``None`` otherwise,
    and then the receiver uses the real connection's endpoints (§2.1 UNKNOWN, §2.2
    LOCAL, UNSPEC and AF_UNIX).  Addresses are canonical text (``inet_ntop``): the same
    client gives the same string whichever version carried it.
    ``tlvs``: version 2 type-length-value vectors in wire order, values raw; empty for
    version 1.  A CRC32C vector has been checked already (§2.2.3).
    """

    version: Literal[1, 2]
    command: Command
    family: Family
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type ``kind``, or ``None`` if there is none."""
        for t, value in self.tlvs:
            if t == kind:
                return value
        return None


def looks_like_proxy_header(prefix: bytes | memoryview) -> bool | None:
    """Whether a connection that starts with ``prefix`` carries a PROXY header.

    True once the version 1 prefix ``"PROXY "`` (6 bytes) or the version 2 signature
    and version nibble (13 bytes) are seen; False as soon as a byte rules both out;
    None while ``prefix`` is too short to tell.  Decides on the signature alone (§2.2,
    "Identifying the protocol version"): `parse` still has the last word.  For
    diagnostics only, see the module's note on §5.
    """
    data = bytes(prefix[:13])
    v1 = _V1_PREFIX.startswith(data[:6])
    if v1 and len(data) >= 6:
        return True
    v2 = V2_SIGNATURE.startswith(data[:12])
    if v2 and len(data) >= 13:
        return data[12] >> 4 == 2
    return None if v1 or v2 else False


def parse(
    buffer: bytes | bytearray | memoryview, *, max_length: int = MAX_HEADER
) -> tuple[ProxyHeader, int] | None:
    """Parse the PROXY header at the start of ``buffer``.

    Returns ``None`` while ``buffer`` is a valid but incomplete beginning, else
    ``(header, consumed)`` where ``consumed`` is the header's length in bytes; the bytes
    after it belong to the relayed connection and are not looked at.  ``max_length``
    (bytes, at least `MAX_V1_HEADER`) refuses a version 2 header announcing more, before
    its bytes arrive.

    Raises `ProxyProtocolError` for anything that is not exactly a header of §2.1 or
    §2.2, as soon as the bytes received show it.
    """
    data = memoryview(buffer).cast("B")
    if looks_like_proxy_header(data) is False:
        raise ProxyProtocolError("not a PROXY protocol header")
    if _V1_PREFIX.startswith(bytes(data[:6])):
        return _parse_v1(bytes(data[:MAX_V1_HEADER]))
    return _parse_v2(data, max_length)


# -- version 1 (§2.1) -------------------------------------------------------------------


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    cr = data.find(b"\r")
    lf = data.find(b"\n")
    if lf != -1 and (cr == -1 or lf < cr):
        raise ProxyProtocolError("version 1 line ends with a bare LF")
    if cr == -1 or cr + 1 == len(data):
        if len(data) >= MAX_V1_HEADER:
            raise ProxyProtocolError("version 1 line has no CRLF within 107 bytes")
        _check_v1_prefix(data if cr == -1 else data[:cr])
        return None
    if data[cr + 1] != 0x0A:
        raise ProxyProtocolError("version 1 line has a bare CR")
    return _parse_v1_line(data[:cr]), cr + 2


_V1_PROTOCOLS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ")


def _check_v1_prefix(line: bytes) -> None:
    """Fail early on an incomplete line whose protocol field is already wrong."""
    rest = line[len(_V1_PREFIX) :]
    if not any(p.startswith(rest[: len(p)]) for p in _V1_PROTOCOLS):
        raise ProxyProtocolError("version 1 protocol is not TCP4, TCP6 or UNKNOWN")


def _parse_v1_line(line: bytes) -> ProxyHeader:
    rest = line[len(_V1_PREFIX) :]
    if rest == b"UNKNOWN" or rest.startswith(b"UNKNOWN "):
        # "the receiver must ignore anything presented before the CRLF"
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None)
    fields = rest.split(b" ")
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("version 1 line is not 'PROXY TCP4|TCP6 src dst sport dport'")
    family: Family = "TCP4" if fields[0] == b"TCP4" else "TCP6"
    parse_address = _v1_ipv4 if family == "TCP4" else _v1_ipv6
    source = (parse_address(fields[1]), _v1_port(fields[3]))
    destination = (parse_address(fields[2]), _v1_port(fields[4]))
    return ProxyHeader(1, "PROXY", family, source, destination)


def _v1_ipv4(text: bytes) -> str:
    """Four decimal numbers 0-255, dot-separated, without leading zeros."""
    parts = text.split(b".")
    if len(parts) != 4 or not all(_is_decimal(p, 3) and int(p) <= 255 for p in parts):
        raise ProxyProtocolError(f"bad IPv4 address in version 1 line: {text[:40]!r}")
    return text.decode("ascii")


def _v1_ipv6(text: bytes) -> str:
    """Colon-separated hex groups with at most one "::", as ``inet_pton`` takes them (and
    as HAProxy writes them, so an IPv4-mapped tail in dotted form is accepted)."""
    if len(text) > 45 or not text.isascii() or b"%" in text:
        raise ProxyProtocolError(f"bad IPv6 address in version 1 line: {text[:45]!r}")
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text.decode()))
    except (OSError, ValueError):
        raise ProxyProtocolError(f"bad IPv6 address in version 1 line: {text!r}") from None


def _v1_port(text: bytes) -> int:
    if not _is_decimal(text, 5) or int(text) > 0xFFFF:
        raise ProxyProtocolError(f"bad port in version 1 line: {text[:8]!r}")
    return int(text)


def _is_decimal(text: bytes, digits: int) -> bool:
    """1 to ``digits`` ASCII digits, no leading zero unless the number is 0."""
    return (
        0 < len(text) <= digits
        and text.isdigit()
        and text.isascii()
        and (text[:1] != b"0" or len(text) == 1)
    )


# -- version 2 (§2.2) -------------------------------------------------------------------


def _parse_v2(data: memoryview, max_length: int) -> tuple[ProxyHeader, int] | None:
    _check_v2_command(data)
    if len(data) >= 14 and data[12] & 0x0F == 0x01:
        _v2_family(data[13])  # fail early on a PROXY header's bad family byte
    if len(data) < 16:
        return None
    total = 16 + ((data[14] << 8) | data[15])
    if total > max_length:
        raise ProxyProtocolError(f"version 2 header of {total} bytes exceeds {max_length}")
    if len(data) < total:
        return None
    header = bytes(data[:total])
    if header[12] & 0x0F == 0x00:
        # LOCAL (§2.2): "discard the protocol block including the family which is
        # ignored"; vectors follow the addresses when a known family says how long they
        # are, else the 16-byte header directly (as HAProxy reads them).
        length = _FAMILIES.get(header[13], ("UNKNOWN", 0))[1]
        start = 16 + length if total >= 16 + length else 16
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, _v2_tlvs(header, start)), total
    family, length = _v2_family(header[13])
    if total < 16 + length:
        raise ProxyProtocolError(f"version 2 {family} addresses need {length} bytes")
    source = destination = None
    if family in ("TCP4", "UDP4"):
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", header, 16)
        source = (socket.inet_ntop(socket.AF_INET, src), sport)
        destination = (socket.inet_ntop(socket.AF_INET, dst), dport)
    elif family in ("TCP6", "UDP6"):
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", header, 16)
        source = (socket.inet_ntop(socket.AF_INET6, src), sport)
        destination = (socket.inet_ntop(socket.AF_INET6, dst), dport)
    elif family == "UNKNOWN":
        # UNSPEC: "the receiver should ignore address information", and with it the
        # rest of the block, whose layout is not known.
        return ProxyHeader(2, "PROXY", family, None, None), total
    tlvs = _v2_tlvs(header, 16 + length)
    return ProxyHeader(2, "PROXY", family, source, destination, tlvs), total


def _check_v2_command(data: memoryview) -> None:
    if len(data) >= 13:
        if data[12] >> 4 != 2:  # unreachable after looks_like_proxy_header; kept for clarity
            raise ProxyProtocolError("version 2 signature with a version other than 2")
        if data[12] & 0x0F > 1:
            raise ProxyProtocolError(f"version 2 command {data[12] & 0x0F} is unassigned")


def _v2_family(byte: int) -> tuple[Family, int]:
    """(family, address length) of a PROXY header's 14th byte (§2.2)."""
    if byte >> 4 > 3 or byte & 0x0F > 2:
        raise ProxyProtocolError(f"version 2 family/transport byte {byte:#04x} is unassigned")
    return _FAMILIES.get(byte, ("UNKNOWN", 0))


def _v2_tlvs(header: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    crc_seen = False
    for at, kind, value in _split_tlvs(header, start):
        if kind == PP2_TYPE_CRC32C:
            if len(value) != 4 or crc_seen:
                raise ProxyProtocolError("CRC32C vector is not one vector of 4 bytes")
            crc_seen = True
            zeroed = header[: at + 3] + b"\0\0\0\0" + header[at + 7 :]
            if crc32c(zeroed) != int.from_bytes(value, "big"):
                raise ProxyProtocolError("CRC32C of the version 2 header does not match")
        elif kind == PP2_TYPE_UNIQUE_ID and len(value) > _UNIQUE_ID_MAX:
            raise ProxyProtocolError("unique id vector is longer than 128 bytes")
        tlvs.append((kind, value))
    return tuple(tlvs)


def parse_tlvs(data: bytes, start: int = 0) -> tuple[tuple[int, bytes], ...]:
    """Split ``data[start:]`` into ``(type, value)`` vectors (§2.2: one type byte, a
    16-bit big-endian length, the value).  Also reads the sub-vectors of a
    PP2_TYPE_SSL value: ``parse_tlvs(value, 5)``.  No vector is interpreted or checked.

    Raises `ProxyProtocolError` if a vector runs past the end.
    """
    return tuple((kind, value) for _, kind, value in _split_tlvs(data, start))


def _split_tlvs(data: bytes, start: int) -> list[tuple[int, int, bytes]]:
    """(offset, type, value) of each vector in ``data[start:]``."""
    tlvs: list[tuple[int, int, bytes]] = []
    at, end = start, len(data)
    while at < end:
        if at + 3 > end:
            raise ProxyProtocolError("truncated TLV header")
        length = (data[at + 1] << 8) | data[at + 2]
        if at + 3 + length > end:
            raise ProxyProtocolError("TLV value runs past the end of the header")
        tlvs.append((at, data[at], data[at + 3 : at + 3 + length]))
        at += 3 + length
    return tlvs


# -- building headers --------------------------------------------------------------------


def encode(header: ProxyHeader) -> bytes:
    """The wire form of ``header``: what a sender writes and `parse` reads back.

    Version 1 needs family TCP4, TCP6 (with addresses) or UNKNOWN, and command PROXY.
    Version 2 writes addresses for TCP4/TCP6/UDP4/UDP6 PROXY headers, none otherwise;
    a PP2_TYPE_CRC32C vector among ``tlvs`` gets its checksum filled in.

    Raises `ValueError` if ``header`` cannot be written in its version.
    """
    if header.version == 1:
        return _encode_v1(header)
    return _encode_v2(header)


def _encode_v1(header: ProxyHeader) -> bytes:
    if header.command != "PROXY" or header.tlvs:
        raise ValueError("version 1 has neither LOCAL nor TLVs")
    if header.family == "UNKNOWN":
        return b"PROXY UNKNOWN\r\n"
    if header.family not in ("TCP4", "TCP6") or not header.source or not header.destination:
        raise ValueError(f"version 1 cannot carry {header.family} without addresses")
    (src, sport), (dst, dport) = header.source, header.destination
    return f"PROXY {header.family} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def _encode_v2(header: ProxyHeader) -> bytes:
    addresses = b""
    fam = 0x00
    inet = header.family in ("TCP4", "TCP6", "UDP4", "UDP6")
    if header.command == "PROXY" and inet and header.source and header.destination:
        fam = _FAMILY_BYTES[header.family]
        af = socket.AF_INET if header.family in ("TCP4", "UDP4") else socket.AF_INET6
        addresses = struct.pack(
            "!4s4sHH" if af == socket.AF_INET else "!16s16sHH",
            socket.inet_pton(af, header.source[0]),
            socket.inet_pton(af, header.destination[0]),
            header.source[1],
            header.destination[1],
        )
    elif header.command == "PROXY" and header.family in ("UNIX_STREAM", "UNIX_DGRAM"):
        fam = _FAMILY_BYTES[header.family]
        addresses = bytes(216)  # the socket paths are not kept by `parse`
    elif header.command == "PROXY" and header.family != "UNKNOWN":
        raise ValueError(f"version 2 cannot carry {header.family} without addresses")
    body = bytearray(addresses)
    crc_at = None
    for kind, value in header.tlvs:
        if kind == PP2_TYPE_CRC32C:
            crc_at = 16 + len(body) + 3
            value = b"\0\0\0\0"
        body += struct.pack("!BH", kind, len(value)) + value
    if len(body) > 0xFFFF:
        raise ValueError("version 2 header longer than 65535 bytes after its first 16")
    command = 0x21 if header.command == "PROXY" else 0x20
    out = bytearray(V2_SIGNATURE + struct.pack("!BBH", command, fam, len(body)) + body)
    if crc_at is not None:
        out[crc_at : crc_at + 4] = crc32c(bytes(out)).to_bytes(4, "big")
    return bytes(out)


# -- CRC32c (§2.2.3: RFC 4960 appendix B, the Castagnoli polynomial) ---------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli) of ``data``, as the PP2_TYPE_CRC32C vector carries it."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
