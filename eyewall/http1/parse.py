"""Request heads, field sections, chunk-size lines and the `Headers` container
(RFC 9112 §2-§7).

Pure functions over complete byte strings: the I/O layer reads a whole head (up to the
blank line) and hands it here.  Each function returns a value or raises `ParseError`;
nothing else escapes (the fuzz tests hold the module to that contract).

Requests are parsed strictly, because a request the proxy and the origin read
differently is a smuggled request.  Leniency, on purpose and nowhere else: a bare LF is
accepted as a line end and one empty line before the request line is skipped (RFC 9112
§2.2).  Refused with 400: obs-fold, whitespace before a colon, control characters and
bare CR in values, a case-variant of a registered method (see `methods`), malformed
chunk sizes.  Responses from origins are read by `eyewall.http1.response`, which
repairs what RFC 9112 tells a proxy to repair.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from eyewall.http1.methods import REGISTERED, canonical_method

__all__ = [
    "Headers",
    "ParseError",
    "RequestHead",
    "ResponseHead",
    "check_field",
    "match_fields",
    "parse_chunk_size",
    "parse_fields",
    "parse_request_head",
]

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE_CHARS = r"[\t\x20-\x7e\x80-\xff]"
# One whole line per match, anchored at line starts: a line that is not a valid field
# matches nothing, which `parse_fields` detects by counting lines.
# Possessive quantifiers keep it linear: no input makes the value part backtrack.
_VISIBLE = r"[\x21-\x7e\x80-\xff]"
_FIELD = re.compile(
    rf"^({_TOKEN}):[ \t]*+((?:{_VISIBLE}++(?:[ \t]++{_VISIBLE}++)*+)?)[ \t]*+\r?\n",
    re.MULTILINE,
)
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/1\.([0-9])\r?\n")
_ANY_VERSION = re.compile(r"\S+ \S+ HTTP/([0-9])(?:\.[0-9])?\r?\n")
_CHUNK_SIZE = re.compile(rf"([0-9A-Fa-f]{{1,16}})[ \t]*(?:;{_VALUE_CHARS}*)?\r?\n")
_TOKEN_RE = re.compile(_TOKEN)


class ParseError(ValueError):
    """The bytes are not a valid HTTP/1.1 message element.

    ``status`` is the answer a server gives a client that sent them: 400 for most,
    505 for an HTTP major version other than 1.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Headers:
    """An ordered list of header fields that keeps names as received.

    ``fields`` holds ``(name, value)`` pairs in order; lookups ignore case; repeated
    fields (``Set-Cookie``) stay separate lines.  ``index`` maps each lower-cased name to
    its value, or to the list of its values in order when the name occurs more than
    once (one string per name keeps a head of many short fields small): use it for
    membership tests, and `get`, `get_all` or `tokens` for values.  Both are kept in
    step by `add`, `set` and `remove`, which update the index in place (an `add` costs
    O(1), a `set` or `remove` of a present name one pass over the fields): change
    ``fields`` only through them.  Methods that add a field raise ``ValueError`` for one
    that could not be written out (see `check_field`).
    """

    __slots__ = ("_tokens", "fields", "index")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self.fields: list[tuple[str, str]] = list(fields)
        index: dict[str, str | list[str]] = {}
        for name, value in self.fields:
            key = name.lower()
            if key == name:
                key = name  # one string for both when the name is lower-case already
            values = index.get(key)
            if values is None:
                index[key] = value
            elif isinstance(values, str):
                index[key] = [values, value]
            else:
                values.append(value)
        self.index = index
        self._tokens: dict[str, list[str]] | None = None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and other.fields == self.fields

    def __repr__(self) -> str:
        return f"Headers({self.fields!r})"

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (any case), or ``default``."""
        values = self.index.get(name.lower())
        if values is None:
            return default
        return values if isinstance(values, str) else values[0]

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` (any case) in order; empty if there is none."""
        values = self.index.get(name.lower())
        if values is None:
            return []
        return [values] if isinstance(values, str) else list(values)

    def tokens(self, name: str) -> list[str]:
        """The comma-separated list elements of every ``name`` line, stripped of
        whitespace and lower-cased; empty elements are skipped (RFC 9110 §5.6.1).
        Cached until ``name`` changes."""
        key = name.lower()
        cache = self._tokens
        if cache is None:
            cache = self._tokens = {}
        else:
            cached = cache.get(key)
            if cached is not None:
                return cached
        out = []
        values = self.index.get(key, ())
        for value in (values,) if isinstance(values, str) else values:
            for token in value.split(","):
                token = token.strip(" \t")
                if token:
                    out.append(token.lower())
        cache[key] = out
        return out

    def add(self, name: str, value: str) -> None:
        """Append a field line."""
        check_field(name, value)
        self.fields.append((name, value))
        key = name.lower()
        values = self.index.get(key)
        if values is None:
            self.index[key] = value
        elif isinstance(values, str):
            self.index[key] = [values, value]
        else:
            values.append(value)
        self._forget(key)

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` line by one line, keeping the first one's place (or
        appending it when there is none)."""
        check_field(name, value)
        key = name.lower()
        self._forget(key)
        if key not in self.index:
            self.fields.append((name, value))
            self.index[key] = value
            return
        out: list[tuple[str, str]] = []
        placed = False
        for n, v in self.fields:
            if n.lower() != key:
                out.append((n, v))
            elif not placed:
                out.append((name, value))
                placed = True
        self.fields = out
        self.index[key] = value

    def remove(self, name: str) -> None:
        """Remove every ``name`` line (nothing happens if there is none)."""
        key = name.lower()
        if self.index.pop(key, None) is None:
            return
        self.fields = [(n, v) for n, v in self.fields if n.lower() != key]
        self._forget(key)

    def _forget(self, key: str) -> None:
        if self._tokens is not None:
            self._tokens.pop(key, None)


def check_field(name: str, value: str) -> None:
    """Refuse (ValueError) a field that would break the head when written out: a name
    that is not a token, a value with CR, LF or NUL (RFC 9110 §5.1, §5.5)."""
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"invalid characters in value of {name}")


@dataclass(slots=True)
class RequestHead:
    """A parsed request line and header section.

    ``target`` is the request-target exactly as sent (see `eyewall.http1.target`);
    ``version`` is ``"HTTP/1.0"`` or ``"HTTP/1.1"`` (a higher 1.x minor reads as 1.1,
    RFC 9112 §2.3).
    """

    method: str
    target: str
    version: str
    headers: Headers


@dataclass(slots=True)
class ResponseHead:
    """A parsed status line and header section.

    ``version`` as for `RequestHead`; ``status`` is 100-999 (600-999 are invalid codes
    a client treats as 5xx, RFC 9110 §15); ``reason`` may be empty.  ``repairs`` lists,
    in plain words, what the parser changed or dropped to read an origin's faulty head
    (see `eyewall.http1.response`), for the caller to log; empty for a valid head.
    """

    version: str
    status: int
    reason: str
    headers: Headers
    repairs: tuple[str, ...] = ()


def match_fields(text: str, pos: int = 0) -> list[tuple[str, str]] | None:
    """The valid field lines of ``text`` from ``pos`` through the terminating empty line,
    as ``(name, value)`` pairs; None if any line there is not a valid field line or
    the section does not end with an empty line (RFC 9112 §5)."""
    fields: list[tuple[str, str]] = _FIELD.findall(text, pos)
    if len(fields) != text.count("\n", pos) - 1 or not (
        text.endswith("\n\r\n") or text.endswith("\n\n") or text[pos:] in ("\r\n", "\n")
    ):
        return None
    return fields


def parse_fields(text: str, pos: int = 0, status: int = 400) -> Headers:
    """Parse the field lines of ``text`` from ``pos`` through the terminating empty line
    (a header or trailer section, RFC 9112 §5); ParseError with ``status`` names the
    first fault."""
    fields = match_fields(text, pos)
    if fields is None:
        raise ParseError(_describe_bad_fields(text, pos), status)
    return Headers(fields)


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request line and its header section; ``data`` ends with the empty line.

    ParseError: 505 for an HTTP major version other than 1, 400 for anything else
    malformed, including a method that is a case-variant of a registered one
    (RFC 9110 §9.1: ``get`` is not GET, but many origins would serve it as GET).
    """
    text = data.decode("latin-1")
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request.
    start = 2 if text.startswith("\r\n") else 1 if text.startswith("\n") else 0
    m = _REQUEST_LINE.match(text, start)
    if m is None:
        v = _ANY_VERSION.match(text, start)
        if v is not None and v.group(1) != "1":
            raise ParseError("HTTP version not supported", 505)
        raise ParseError("malformed request line")
    method = m.group(1)
    if method not in REGISTERED:
        canonical = canonical_method(method)
        if canonical is not None:
            raise ParseError(f"method names are case-sensitive: send {canonical}, not {method}")
    version = "HTTP/1.0" if m.group(3) == "0" else "HTTP/1.1"
    return RequestHead(method, m.group(2), version, parse_fields(text, m.end()))


def parse_chunk_size(line: bytes) -> int:
    """The chunk size in bytes from one chunk-size line with its line end (RFC 9112
    §7.1): 1-16 hex digits, optional whitespace and extensions (dropped).  ParseError
    (400) for anything else: a sign, ``0x``, no digits, more than 16 digits."""
    m = _CHUNK_SIZE.fullmatch(line.decode("latin-1"))
    if m is None:
        raise ParseError("malformed chunk size line")
    return int(m.group(1), 16)


def _describe_bad_fields(text: str, pos: int) -> str:
    for line in text[pos:].split("\n"):
        line = line.removesuffix("\r")
        if not line:
            break
        if line[0] in " \t":
            return "obsolete line folding in header"
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN_RE.fullmatch(name):
            return "malformed header field name"
        if re.search(r"[^\t\x20-\x7e\x80-\xff]", value):
            return f"invalid character in header {name}"
    return "malformed header section"
