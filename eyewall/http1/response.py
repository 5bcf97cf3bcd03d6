"""Response heads from origins, read the way RFC 9112 tells a proxy to read them.

Requests are parsed strictly (`parse_request_head`): a request the proxy and the origin
read differently is a smuggled request.  A faulty response head is another matter: the
origin is the proxy's own peer, RFC 9112 tells a proxy to repair some faults before
forwarding, and refusing what a direct client reads turns a working site into a 502.
Each fault is decided on its own, by the RFC section or by what direct clients do with
the same bytes from a raw origin: curl (`tests/test_origin_responses.py`) and Chromium
(the table in docs/http.md has both):

================================================  ==========================================
fault                                             decision
================================================  ==========================================
whitespace between field name and colon           removed (§5.1 tells a proxy to)
obs-fold (a line starting with SP or HTAB)        replaced by one SP (§5.2)
such lines right after the status line            dropped (§2.2 allows it; Chromium too)
bare CR in a value or the reason phrase           replaced by SP (§2.2)
other controls (not NUL) in a value or reason     kept (RFC 9110 §5.5 allows it; both clients)
a field name that is not a token, an empty name,  line dropped (Chromium drops it; curl
a line without a colon                            refuses only the colon-less line)
``http/1.1``, tabs or spaces before the status    accepted (Chromium reads all of them, curl
code, no space before the reason, status          all but the tab)
600-999, ``HTTP/2.0`` and ``HTTP/3.0`` (read
as 1.1)
NUL anywhere                                      502 (RFC 9110 §5.5; both clients refuse)
================================================  ==========================================

Framing stays unambiguous: any repair that would touch Content-Length or
Transfer-Encoding (a fold, whitespace before the colon, a bare CR, a dropped line that
reads as one of them once everything but letters is ignored) is a 502 instead, because
recipients disagree about such a field and so about where the body ends (curl ignores
``Content-Length : 2``, Chromium obeys it).  Every repair
is listed in `ResponseHead.repairs` for the caller to log.

The trailer section of a chunked response is read the same way
(`parse_response_trailers`): a fault there would otherwise cut a body the client has
almost whole.  No trailer field frames anything (those named Content-Length or
Transfer-Encoding are not forwarded), so none of the framing guards apply; NUL still
cannot be read.  Request trailers stay strict (`eyewall.http1.parse`).
"""

from __future__ import annotations

import re

from eyewall.http1.parse import Headers, ParseError, ResponseHead, match_fields

__all__ = ["MAX_REPAIRS", "parse_response_head", "parse_response_trailers", "repair_response_head"]

MAX_REPAIRS = 10  # repairs listed one by one; more are counted in a last entry

_STATUS_LINE = re.compile(r"HTTP/1\.([0-9]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?\r?\n")
_LENIENT_STATUS = re.compile(
    r"([Hh][Tt][Tt][Pp])/([0-9])\.([0-9])([ \t]+)([0-9]{3})(?![0-9])( ?)(.*)", re.DOTALL
)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_NOT_LETTERS = re.compile(r"[^a-z]+")


def parse_response_head(data: bytes) -> ResponseHead:
    """Parse a status line and its header section; ``data`` ends with the empty line.

    A valid head is read as is; a faulty one is repaired as the module documentation
    says, with each repair named in ``repairs``.  ParseError (status 502) for what
    cannot be read safely.
    """
    text = data.decode("latin-1")
    m = _STATUS_LINE.match(text)
    if m is not None:
        fields = match_fields(text, m.end())
        if fields is not None:
            version = "HTTP/1.0" if m.group(1) == "0" else "HTTP/1.1"
            return ResponseHead(version, int(m.group(2)), m.group(3) or "", Headers(fields))
    return repair_response_head(text)


def parse_response_trailers(data: bytes) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """The fields of a chunked response's trailer section (``data``: the field lines
    and the empty line that ends them, RFC 9112 §7.1.2), and the repairs made, as
    `parse_response_head` makes them.  ParseError (502) for NUL or a section that does
    not end with its empty line."""
    text = data.decode("latin-1")
    fields = match_fields(text)
    if fields is not None:
        return fields, ()
    repairs = _Repairs()
    fields = _repair_fields(text, 0, repairs, guarded=frozenset())
    return fields, repairs.summary()


class _Repairs(list[str]):
    """The repairs made so far: the first `MAX_REPAIRS` - 1 kept, the rest counted."""

    more = 0

    def append(self, repair: str) -> None:
        if len(self) < MAX_REPAIRS:
            super().append(repair)
        else:
            self.more += 1

    def summary(self) -> tuple[str, ...]:
        if not self.more:
            return tuple(self)
        return (*self[: MAX_REPAIRS - 1], f"and {self.more + 1} more repairs")


def repair_response_head(text: str) -> ResponseHead:
    """The slow path of `parse_response_head` over the decoded head: every line checked
    and repaired one by one.  A valid head gives the same result as the fast path."""
    repairs = _Repairs()
    end = text.find("\n")
    m = _LENIENT_STATUS.fullmatch(text[:end].removesuffix("\r")) if end != -1 else None
    if m is None:
        raise ParseError("malformed status line", 502)
    name, major, minor, gap, code, space, reason = m.groups()
    status = int(code)
    if major not in "123":
        raise ParseError(f"HTTP/{major} status line", 502)
    if status < 100:
        raise ParseError("malformed status line", 502)
    if name != "HTTP":
        repairs.append(f"status line: {name} read as HTTP")
    if major != "1":
        # Both curl and browsers read such a line from an HTTP/1.1 connection as 1.1.
        repairs.append(f"status line: HTTP/{major}.{minor} read as HTTP/1.1")
        minor = "1"
    if gap != " ":
        repairs.append(f"status line: {gap!r} before the status code")
    if reason and not space:
        repairs.append("status line: no space before the reason phrase")
    if status > 599:
        repairs.append(f"status {status} is outside 100-599 (clients treat it as 5xx)")
    reason = _clean(reason, "the reason phrase", repairs, framing=False)
    fields = _repair_fields(text, end + 1, repairs)
    version = "HTTP/1.0" if minor == "0" else "HTTP/1.1"
    return ResponseHead(version, status, reason, Headers(fields), repairs.summary())


def _repair_fields(
    text: str, pos: int, repairs: list[str], guarded: frozenset[str] = _FRAMING
) -> list[tuple[str, str]]:
    """Read the field lines of ``text`` from ``pos``, repairing what can be; a repair
    of a field named in ``guarded`` (lower case) is a ParseError instead."""
    lines = text[pos:].split("\n")
    # The section ends with its empty line, and nothing follows.
    if len(lines) < 2 or lines[-1] or lines[-2] not in ("", "\r"):
        raise ParseError("malformed header section", 502)
    fields: list[tuple[str, str]] = []
    dropped = False  # the last field line was dropped: its continuation lines go too
    for raw in lines[:-2]:
        line = raw.removesuffix("\r")
        if not line:
            raise ParseError("empty line inside the header section", 502)
        if line[0] in " \t":
            if not fields and not dropped:
                # RFC 9112 §2.2: whitespace-preceded lines right after the start line
                # are refused or ignored, with the lines folded onto them.
                _drop(
                    line, "line starting with whitespace before the first field", repairs, guarded
                )
                dropped = True
                continue
            if dropped:
                continue
            # RFC 9112 §5.2: a proxy replaces obs-fold with SP before forwarding.
            name, value = fields[-1]
            if name.lower() in guarded:
                raise ParseError(f"obs-fold in {name}", 502)
            more = _clean(line, f"header {name}", repairs, framing=False).strip(" \t")
            fields[-1] = (name, f"{value} {more}" if value and more else value or more)
            repairs.append(f"obs-fold in {name} replaced by SP")
            continue
        name, colon, value = line.partition(":")
        if not colon:
            _drop(line, "line without a colon", repairs, guarded)
            dropped = True
            continue
        stripped = name.rstrip(" \t")
        if not _TOKEN.fullmatch(stripped):
            what = f"field with invalid name {stripped[:40]!r}" if stripped else "empty field name"
            _drop(name, what, repairs, guarded)
            dropped = True
            continue
        dropped = False
        framing = stripped.lower() in guarded
        if stripped != name:
            # RFC 9112 §5.1: a proxy removes such whitespace from a response.
            if framing:
                raise ParseError(f"whitespace before the colon of {stripped}", 502)
            repairs.append(f"whitespace before the colon of {stripped} removed")
        value = _clean(value, f"header {stripped}", repairs, framing)
        fields.append((stripped, value.strip(" \t")))
    return fields


def _drop(text: str, what: str, repairs: list[str], guarded: frozenset[str]) -> None:
    """Note a line dropped for being ``what``, unless framing fields are ``guarded`` and
    ``text`` (its name part) reads as Content-Length or Transfer-Encoding once
    everything but letters is ignored: some recipient may take it for that field, so
    the framing would be ambiguous."""
    if guarded and _NOT_LETTERS.sub("", text.lower()).startswith(
        ("contentlength", "transferencoding")
    ):
        raise ParseError(f"{what} that may be Content-Length or Transfer-Encoding", 502)
    repairs.append(f"{what} dropped")


def _clean(value: str, where: str, repairs: list[str], framing: bool) -> str:
    """``value`` with each bare CR replaced by SP (RFC 9112 §2.2); ParseError for NUL
    (RFC 9110 §5.5), and for a bare CR in a framing field."""
    if "\0" in value:
        raise ParseError(f"NUL in {where}", 502)
    if "\r" in value:
        if framing:
            raise ParseError(f"bare CR in {where}", 502)
        repairs.append(f"bare CR in {where} replaced by SP")
        value = value.replace("\r", " ")
    return value
