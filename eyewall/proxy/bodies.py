"""Streaming a message body from one IOStream to another, re-framed on the way.

Every write is awaited before the next read, so a slow reader on one side stops the
reading on the other: memory per transfer stays at one buffer.  Each piece moved is
counted in a `Meter` and sets its ``active`` flag for the watchdog's stall check.

The functions raise what the streams raise (`StreamClosedError`) and `ParseError` for
broken chunked framing; the caller decides which side was at fault.
"""

from __future__ import annotations

from tornado.iostream import IOStream, StreamClosedError

from eyewall.http1.fields import HOP_BY_HOP
from eyewall.http1.parse import ParseError, parse_chunk_size, parse_fields
from eyewall.proxy.streams import LINE_END, TRAILERS_END, complete, read_block

__all__ = ["Meter", "copy_chunked", "copy_length", "copy_until_close", "read_upto"]

PIECE = 64 << 10  # read size for bodies moved as bytes
BIG_BUFFER = 256 << 10  # reusable buffer for long bodies
CHUNK_LINE_LIMIT = 4096
_FRAMING_FIELDS = HOP_BY_HOP | {"content-length", "host"}


class Meter:
    """Body bytes moved in one direction, whether any moved since the last look, and
    optionally a copy of the first ``limit`` bytes (for the flow recorder)."""

    __slots__ = ("active", "capture", "count", "limit")

    def __init__(self, limit: int = 0) -> None:
        self.active = False
        self.count = 0
        self.limit = limit
        self.capture: bytearray | None = bytearray() if limit else None

    def keep(self, data: bytes | memoryview) -> None:
        capture = self.capture
        assert capture is not None
        room = self.limit - len(capture)
        if room > 0:
            capture += data[:room]


def _chunk(data: bytes | memoryview) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _copy_pieces(
    src: IOStream, dst: IOStream, remaining: int, chunked: bool, meter: Meter
) -> None:
    """Move ``remaining`` bytes in pieces of at most `PIECE`, each framed as a chunk
    when ``chunked``."""
    while remaining:
        piece = await src.read_bytes(min(remaining, PIECE), partial=True)
        remaining -= len(piece)
        meter.count += len(piece)
        meter.active = True
        if meter.capture is not None:
            meter.keep(piece)
        await dst.write(_chunk(piece) if chunked else piece)


async def _copy_chunk_data(
    src: IOStream, dst: IOStream, size: int, chunked: bool, meter: Meter
) -> int:
    """Move one chunk's data and check the CRLF after it."""
    await _copy_pieces(src, dst, size, chunked, meter)
    end = await read_block(src, LINE_END, CHUNK_LINE_LIMIT)
    if end not in (b"\r\n", b"\n"):
        raise ParseError("chunk data not followed by CRLF")
    return size


async def read_upto(
    src: IOStream, kind: str, length: int, limit: int, trailer_limit: int
) -> tuple[bytes, int | None]:
    """Read a whole body into memory if it fits in ``limit`` bytes (for addons).

    Returns ``(body, None)`` when complete.  Otherwise ``(prefix, resume)``: for a
    fixed length, nothing was read (``resume`` is the length); for chunked framing,
    ``prefix`` is the data of the complete chunks read and ``resume`` the size of the
    chunk whose size line was read but not its data (give it to `copy_chunked`); for
    a close-delimited body, ``prefix`` is what was read and ``resume`` is -1.
    """
    if kind == "length":
        if length > limit:
            return b"", length
        data = await src.read_bytes(length) if length else b""
        return data, None
    parts: list[bytes] = []
    size_so_far = 0
    if kind == "close":
        while size_so_far <= limit:
            try:
                piece = await src.read_bytes(PIECE, partial=True)
            except StreamClosedError:
                return b"".join(parts), None
            parts.append(piece)
            size_so_far += len(piece)
        return b"".join(parts), -1
    while True:
        size_line = await read_block(src, LINE_END, CHUNK_LINE_LIMIT)
        if not complete(size_line):
            raise ParseError("chunk size line too long")
        size = parse_chunk_size(size_line)
        if size == 0:
            block = await read_block(src, TRAILERS_END, trailer_limit)
            if not complete(block):
                raise ParseError("trailer section too large")
            return b"".join(parts), None
        if size_so_far + size > limit:
            return b"".join(parts), size
        parts.append(await src.read_bytes(size))
        size_so_far += size
        end = await read_block(src, LINE_END, CHUNK_LINE_LIMIT)
        if end not in (b"\r\n", b"\n"):
            raise ParseError("chunk data not followed by CRLF")


async def copy_length(src: IOStream, dst: IOStream, length: int, meter: Meter) -> int:
    """Move exactly ``length`` bytes; a source that ends early raises StreamClosedError."""
    remaining = length
    if remaining <= PIECE * 2:
        await _copy_pieces(src, dst, remaining, False, meter)
        return length
    view = memoryview(bytearray(BIG_BUFFER))
    while remaining:
        n = await src.read_into(view[: min(remaining, BIG_BUFFER)], partial=True)  # type: ignore[arg-type]
        remaining -= n
        meter.count += n
        meter.active = True
        if meter.capture is not None:
            meter.keep(view[:n])
        await dst.write(view[:n])
    return length


async def copy_until_close(src: IOStream, dst: IOStream, chunked: bool, meter: Meter) -> int:
    """Move everything until ``src`` ends, as chunks if ``chunked``."""
    total = 0
    view = memoryview(bytearray(BIG_BUFFER))
    while True:
        try:
            n = await src.read_into(view, partial=True)  # type: ignore[arg-type]
        except StreamClosedError:
            break
        total += n
        meter.count += n
        meter.active = True
        if meter.capture is not None:
            meter.keep(view[:n])
        await dst.write(_chunk(view[:n]) if chunked else view[:n])
    if chunked:
        await dst.write(b"0\r\n\r\n")
    return total


async def copy_chunked(
    src: IOStream,
    dst: IOStream,
    chunked: bool,
    meter: Meter,
    trailer_limit: int,
    remaining: int = 0,
) -> int:
    """Decode a chunked body from ``src``; write it chunked (with trailers) or raw.

    Chunk extensions are dropped.  Trailer fields are forwarded, minus framing and
    hop-by-hop fields, only when the output is chunked.  ``remaining`` resumes a body
    whose current chunk still has that many bytes to come (see `read_upto`).
    """
    total = 0
    if remaining:
        total += await _copy_chunk_data(src, dst, remaining, chunked, meter)
    while True:
        size_line = await read_block(src, LINE_END, CHUNK_LINE_LIMIT)
        if not complete(size_line):
            raise ParseError("chunk size line too long")
        size = parse_chunk_size(size_line)
        if size == 0:
            break
        total += await _copy_chunk_data(src, dst, size, chunked, meter)
    block = await read_block(src, TRAILERS_END, trailer_limit)
    if not complete(block):
        raise ParseError("trailer section too large")
    if chunked:
        trailers = [
            f"{n}: {v}\r\n"
            for n, v in parse_fields(block.decode("latin-1"))
            if n.lower() not in _FRAMING_FIELDS
        ]
        await dst.write(b"0\r\n" + "".join(trailers).encode("latin-1") + b"\r\n")
    return total
