"""The chunked transfer coding (RFC 9112 §7.1): an incremental decoder, and encoders.

`ChunkedDecoder` takes the bytes of one chunked body in pieces of any size, as they
arrive, and gives back the data they carry; it never reads from a stream itself.

    decoder = ChunkedDecoder()
    while not decoder.done:
        data = <read up to decoder.wanted bytes; up to the next LF if decoder.in_line>
        for piece in decoder.feed(data):
            <use piece>
    decoder.trailers, decoder.unused

A caller that reads as the hints say never reads past the end of the body, so
``unused`` stays empty; a caller that reads more finds the rest in ``unused``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from eyewall.http1.parse import ParseError, parse_chunk_size, parse_fields
from eyewall.http1.response import parse_response_trailers

__all__ = ["ChunkedDecoder", "encode_chunk", "last_chunk"]

_LF = re.compile(rb"\n")
_SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)


class ChunkedDecoder:
    """Decodes one chunked body fed in pieces of any size (RFC 9112 §7.1).

    `feed` returns the chunk data in the bytes given, as a list of ``bytes`` or
    ``memoryview`` slices of the input (no copy; a slice of a buffer the caller reuses
    must be used before the buffer is refilled).  Chunk extensions are read and
    dropped; a bare LF ends a line as CRLF does (RFC 9112 §2.2).

    Limits, in bytes: a chunk-size line with its line end is at most ``max_line``; the
    trailer section with its empty line at most ``max_trailers``.  ``repair``: the body
    is a response's, and its trailer section is read as leniently as a response head
    (`eyewall.http1.response.parse_response_trailers`); a request's is read strictly.

    Attributes, read-only:

    * ``done``: the last chunk and the trailer section have been read.
    * ``trailers``: the trailer fields, ``(name, value)`` with names as received.
    * ``repairs``: what was repaired or dropped in the trailer section (``repair`` only),
      for the caller to log.
    * ``unused``: bytes fed after the end of the body (they belong to whatever follows).
    * ``wanted``: at most this many more bytes are useful now: the rest of the chunk
      data and its CRLF, or the room left in the current line.
    * ``in_line``: a chunk-size line or the trailer section is being read.  There the
      end of the body cannot be foreseen: a caller that must not read past it reads up
      to the next LF (at most ``wanted`` bytes); elsewhere ``wanted`` bytes never
      reach past it.

    Errors raise `ParseError` (status 400; the caller decides whose fault it is): a
    malformed or too long chunk-size line, chunk data not followed by CRLF, a trailer
    section too large or malformed.  `feed` after ``done`` raises RuntimeError.
    """

    __slots__ = (
        "_cr",
        "_line",
        "_remaining",
        "_state",
        "max_line",
        "max_trailers",
        "repair",
        "repairs",
        "trailers",
        "unused",
    )

    def __init__(
        self, max_line: int = 4096, max_trailers: int = 65536, repair: bool = False
    ) -> None:
        self.max_line = max_line
        self.max_trailers = max_trailers
        self.repair = repair
        self.repairs: tuple[str, ...] = ()
        self.trailers: list[tuple[str, str]] = []
        self.unused = b""
        self._state = _SIZE
        self._line = bytearray()  # the partial size line or trailer section
        self._remaining = 0  # chunk data still to come
        self._cr = False  # a CR after chunk data was seen, its LF not yet

    @property
    def done(self) -> bool:
        """The last chunk and the trailer section have been read."""
        return self._state == _DONE

    @property
    def in_line(self) -> bool:
        """A chunk-size line or the trailer section is being read (see the class)."""
        return self._state in (_SIZE, _TRAILERS)

    @property
    def wanted(self) -> int:
        """At most this many more bytes are useful now (0 once done; see the class)."""
        state = self._state
        if state == _DATA:
            return self._remaining + 2
        if state == _DATA_END:
            return 1 if self._cr else 2
        if state == _SIZE:
            return self.max_line - len(self._line)
        if state == _TRAILERS:
            return self.max_trailers - len(self._line)
        return 0

    def feed(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """Decode ``data``, the next bytes of the body; return the chunk data in it."""
        if self._state == _DONE:
            raise RuntimeError("feed after the end of the chunked body")
        out: list[bytes | memoryview] = []
        end = len(data)
        pos = 0
        view: memoryview | None = None
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                if take == end and isinstance(data, bytes):
                    out.append(data)
                else:
                    if view is None:
                        view = memoryview(data)
                    out.append(view[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _DATA_END:
                byte = data[pos]
                pos += 1
                if byte == 0x0A:  # LF, after a CR or alone (RFC 9112 §2.2)
                    self._cr = False
                    self._state = _SIZE
                elif byte == 0x0D and not self._cr:
                    self._cr = True
                else:
                    raise ParseError("chunk data not followed by CRLF")
            else:
                pos = self._read_line(data, pos, end)
                if self._state == _DONE:
                    self.unused = bytes(data[pos:])
                    break
        return out

    def _read_line(self, data: bytes | memoryview, pos: int, end: int) -> int:
        """Take bytes up to the next LF into the current line; act on a complete one.
        Return the position after what was taken."""
        limit = self.max_line if self._state == _SIZE else self.max_trailers
        room = limit - len(self._line)
        found = _LF.search(data, pos, min(end, pos + room))
        if found is None:
            self._line += data[pos : min(end, pos + room)]
            if len(self._line) >= limit:
                raise ParseError(
                    "chunk size line too long"
                    if self._state == _SIZE
                    else "trailer section too large"
                )
            return end
        stop = found.end()
        self._line += data[pos:stop]
        line = self._line
        if self._state == _SIZE:
            size = parse_chunk_size(bytes(line))
            line.clear()
            if size:
                self._remaining = size
                self._state = _DATA
            else:
                self._state = _TRAILERS  # the last chunk: trailer lines follow
        elif line.endswith((b"\n\n", b"\n\r\n")) or (len(line) <= 2 and line.strip(b"\r") == b"\n"):
            # The empty line that ends the trailer section (RFC 9112 §7.1.2).
            if self.repair:
                self.trailers, self.repairs = parse_response_trailers(bytes(line))
            else:
                self.trailers = parse_fields(line.decode("latin-1")).fields
            line.clear()
            self._state = _DONE
        elif len(line) >= limit:  # a trailer line filled the section: no room for its end
            raise ParseError("trailer section too large")
        return stop


def encode_chunk(data: bytes | memoryview) -> bytes:
    """``data`` as one chunk: size in hex, CRLF, data, CRLF.  Empty data gives b"" (an
    empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: Sequence[tuple[str, str]] = ()) -> bytes:
    """The end of a chunked body: the zero-size chunk, ``trailers`` (already checked
    with `check_field`, hop-by-hop ones removed), and the empty line."""
    lines = "".join(f"{n}: {v}\r\n" for n, v in trailers)
    return b"0\r\n" + lines.encode("latin-1") + b"\r\n"
