"""Streaming a message body from one IOStream to another, re-framed on the way.

Every write is awaited before the next read, so a slow reader on one side stops the
reading on the other: memory per transfer stays at one buffer.  Each piece read is
counted in a `Meter`; the body-idle limit watches those counts (and the streams' own
write counts), so a slow but steady transfer is never mistaken for a stalled one.
Chunked bodies are decoded by `eyewall.http1.chunked.ChunkedDecoder`, read only as
far as its hints say, so nothing past the body's end is ever consumed.

The functions raise what the streams raise (`StreamClosedError`) and `ParseError` for
broken chunked framing; the caller decides which side was at fault.
"""

from __future__ import annotations

from collections.abc import Awaitable

from tornado.iostream import IOStream, StreamClosedError

from eyewall.http1.chunked import ChunkedDecoder, encode_chunk, last_chunk
from eyewall.http1.fields import HOP_BY_HOP
from eyewall.http1.parse import ParseError
from eyewall.proxy.streams import LINE_END, read_block

__all__ = ["Meter", "copy_chunked", "copy_length", "copy_until_close", "read_upto"]

PIECE = 64 << 10  # read size for bodies moved as bytes
BIG_BUFFER = 256 << 10  # reusable buffer for long bodies
CHUNK_LINE_LIMIT = 4096
_FRAMING_FIELDS = HOP_BY_HOP | {"content-length", "host"}


class Meter:
    """Body bytes read in one direction (``count``), the chunked framing read around
    them (``framing``: size lines, extensions, trailers; progress for the body-idle
    limit, not body), and optionally a copy of the first ``limit`` bytes (for the flow
    recorder)."""

    __slots__ = ("capture", "count", "framing", "limit")

    def __init__(self, limit: int = 0) -> None:
        self.count = 0
        self.framing = 0
        self.limit = limit
        self.capture: bytearray | None = bytearray() if limit else None

    def keep(self, data: bytes | memoryview) -> None:
        """Copy what fits of ``data`` into the capture (up to ``limit`` bytes in all)."""
        capture = self.capture
        assert capture is not None
        room = self.limit - len(capture)
        if room > 0:
            capture += data[:room]


async def _copy_pieces(
    src: IOStream, dst: IOStream, remaining: int, chunked: bool, meter: Meter
) -> None:
    """Move ``remaining`` bytes in pieces of at most `PIECE`, each framed as a chunk
    when ``chunked``."""
    while remaining:
        piece = await src.read_bytes(min(remaining, PIECE), partial=True)
        remaining -= len(piece)
        meter.count += len(piece)
        if meter.capture is not None:
            meter.keep(piece)
        await dst.write(encode_chunk(piece) if chunked else piece)


def _read_chunked(src: IOStream, decoder: ChunkedDecoder) -> Awaitable[bytes]:
    """The next bytes of a chunked body, as the decoder's hints say: never past its end.
    ParseError if the decoder, not done, wants nothing (a read of 0 bytes would return
    at once, and the caller would loop)."""
    if decoder.wanted <= 0:
        raise ParseError("chunked body: the decoder wants no more bytes before its end")
    if decoder.in_line:
        return read_block(src, LINE_END, decoder.wanted)
    return src.read_bytes(min(decoder.wanted, PIECE), partial=True)


async def _read_exactly(src: IOStream, n: int, meter: Meter) -> bytes:
    parts = []
    while n:
        piece = await src.read_bytes(min(n, PIECE), partial=True)
        n -= len(piece)
        meter.count += len(piece)
        parts.append(piece)
    return b"".join(parts)


async def read_upto(
    src: IOStream,
    kind: str,
    length: int,
    limit: int,
    trailer_limit: int,
    meter: Meter,
    decoder: ChunkedDecoder | None = None,
) -> tuple[bytes, int | ChunkedDecoder | None]:
    """Read a whole body into memory if it fits in ``limit`` bytes (for addons),
    counting what is read in ``meter`` (which does not capture: the caller does).
    A chunked body is decoded with ``decoder`` (default: a new strict one).

    Returns ``(body, None)`` when complete.  Otherwise ``(prefix, resume)``: for a
    fixed length, nothing was read (``resume`` is the length); for chunked framing,
    ``prefix`` is the data decoded so far (up to one read past ``limit``) and
    ``resume`` the decoder to give `copy_chunked`; for a close-delimited body,
    ``prefix`` is what was read and ``resume`` is -1.  Raises StreamClosedError if
    ``src`` ends early, ParseError for broken chunking.
    """
    if kind == "length":
        if length > limit:
            return b"", length
        return await _read_exactly(src, length, meter), None
    parts: list[bytes] = []
    size_so_far = 0
    if kind == "close":
        while size_so_far <= limit:
            try:
                piece = await src.read_bytes(PIECE, partial=True)
            except StreamClosedError:
                return b"".join(parts), None
            meter.count += len(piece)
            parts.append(piece)
            size_so_far += len(piece)
        return b"".join(parts), -1
    if decoder is None:
        decoder = ChunkedDecoder(CHUNK_LINE_LIMIT, trailer_limit)
    while not decoder.done:
        data = await _read_chunked(src, decoder)
        meter.count += len(data)
        for part in decoder.feed(data):
            parts.append(bytes(part))
            size_so_far += len(part)
        if size_so_far > limit and not decoder.done:
            return b"".join(parts), decoder
    return b"".join(parts), None


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
        if meter.capture is not None:
            meter.keep(view[:n])
        await dst.write(encode_chunk(view[:n]) if chunked else view[:n])
    if chunked:
        await dst.write(b"0\r\n\r\n")
    return total


async def copy_chunked(
    src: IOStream,
    dst: IOStream,
    chunked: bool,
    meter: Meter,
    trailer_limit: int,
    decoder: ChunkedDecoder | None = None,
) -> int:
    """Decode a chunked body from ``src``; write it chunked (with trailers) or raw.

    Chunk extensions are dropped.  Trailer fields are forwarded, minus framing and
    hop-by-hop fields, only when the output is chunked.  ``decoder`` resumes a body
    `read_upto` began.
    """
    if decoder is None:
        decoder = ChunkedDecoder(CHUNK_LINE_LIMIT, trailer_limit)
    total = 0
    while not decoder.done:
        data = await _read_chunked(src, decoder)
        meter.framing += len(data)  # less the data, below: a size line moves too
        for piece in decoder.feed(data):
            total += len(piece)
            meter.count += len(piece)
            meter.framing -= len(piece)
            if meter.capture is not None:
                meter.keep(piece)
            await dst.write(encode_chunk(piece) if chunked else piece)
    if chunked:
        trailers = [(n, v) for n, v in decoder.trailers if n.lower() not in _FRAMING_FIELDS]
        await dst.write(last_chunk(trailers))
    return total
