"""Request targets a forward proxy accepts (RFC 9112 §3.2).

* absolute-form ``http://host[:port]/path?query`` for every method but CONNECT;
* authority-form ``host:port`` for CONNECT.

The path and query are kept byte for byte: a proxy must not re-encode what it forwards.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from eyewall.http1.parse import ParseError

__all__ = [
    "Target",
    "TargetError",
    "canonical_host",
    "parse_authority",
    "parse_target",
    "redact_userinfo",
]

DEFAULT_PORTS = {"http": 80, "https": 443}
# Labels of letters, digits, "-" and "_", not starting or ending with "-"; one trailing
# dot (a fully qualified name) allowed.
_REG_NAME = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?\.)*[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?\.?"
)
_PORT = re.compile(r"[0-9]{1,5}")
# The common case in one match: a name or IPv4 host, an optional port, a path or query.
_SIMPLE_ABSOLUTE = re.compile(
    r"(?ai:(http|https))://((?![.-])[A-Za-z0-9_.-]{1,253})(?::([0-9]{1,5}))?([/?][^#]*)?"
)


_AUTHORITY_END = re.compile(r"[/?#\\]")  # WHATWG URL parsers also end it at a backslash
_AUTHORITY_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[/\\]+|://|[/\\]{2,}")


def canonical_host(host: str) -> str:
    """``host`` (lower-case, IPv6 without brackets) with an IP address in its one
    written form: an IPv4 address in any spelling the resolver takes for one
    (``inet_aton``: ``127.1``, ``0x7f.1``, ``2130706433``, ``0177.0.0.1``) in dotted
    decimal, an IPv6 address compressed (RFC 5952), and an IPv4-mapped one
    (``::ffff:127.0.0.1``) as its IPv4 address — so that rules, logs and the proxy's
    own checks see the address a connection would reach.  Names come back as they are.
    Never raises."""
    if ":" in host:
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        mapped = ip.ipv4_mapped
        return str(mapped) if mapped is not None else str(ip)
    if not host or not (host[-1].isdigit() or "0x" in host):
        return host  # a name: its last label is not a number
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return host


class TargetError(ParseError):
    """A target the proxy cannot use (status 400); ``origin_form`` marks a request sent
    as to a server (origin-form or ``*``) rather than to a proxy."""

    def __init__(self, message: str, origin_form: bool = False) -> None:
        super().__init__(message, 400)
        self.origin_form = origin_form


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes, and the request-target to send there.

    ``path`` is the origin-form for the next hop, byte for byte (``*`` for an OPTIONS
    to an empty path and no query, RFC 9112 §3.2.4), and "" for CONNECT.
    """

    scheme: str  # "http", "https", or "" for a CONNECT authority
    host: str  # lower-case name or IP literal, IPv6 without brackets
    port: int
    authority: str  # host[:port] as it goes in the Host field (brackets kept)
    path: str  # origin-form for the next hop; "" for CONNECT

    def url(self) -> str:
        """The target written back as a URL (for logs and records)."""
        if not self.scheme:
            return self.authority
        return f"{self.scheme}://{self.authority}{self.path}"


def parse_target(method: str, target: str) -> Target:
    """The `Target` of a request sent to a forward proxy (RFC 9112 §3.2).

    CONNECT takes authority-form ``host:port``; every other method absolute-form
    ``http[s]://host[:port][path][?query]``; the scheme and host are case-insensitive.
    An empty path becomes ``/``, or ``*`` for OPTIONS without a query (§3.2.1, §3.2.4).
    TargetError (400) for anything else, with ``origin_form`` set for origin-form and
    ``*`` targets.
    """
    if method == "CONNECT":
        return parse_authority(target, require_port=True)
    if target.startswith("/") or target == "*":
        raise TargetError("origin-form target sent to a proxy", origin_form=True)
    if "#" in target:
        raise TargetError("fragment in request target")
    simple = _SIMPLE_ABSOLUTE.fullmatch(target)
    if simple is not None and _REG_NAME.fullmatch(simple.group(2)):
        scheme, host, port_text, path = simple.groups()
        scheme = scheme.lower()
        authority_host = host.lower()
        host = authority_host.removesuffix(".")
        canonical = canonical_host(host)
        if canonical != host:  # an address in another spelling
            host = authority_host = canonical
        port = DEFAULT_PORTS[scheme] if port_text is None else int(port_text)
        if 0 < port < 65536:
            if not path or path[0] == "?":
                path = ("*" if method == "OPTIONS" and not path else "/") + (path or "")
            authority = authority_host if port_text is None else f"{authority_host}:{port_text}"
            return Target(scheme, host, port, authority, path)
    scheme, sep, rest = target.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise TargetError("target must be an absolute http:// or https:// URL")
    end = len(rest)
    for ch in "/?":
        i = rest.find(ch)
        if i != -1 and i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    parsed = parse_authority(authority, default_port=DEFAULT_PORTS[scheme])
    if not path.startswith("/"):
        # RFC 9112 §3.2.1 and §3.2.4: an empty path is "/", or "*" for OPTIONS.
        path = ("*" if method == "OPTIONS" and not path else "/") + path
    return Target(scheme, parsed.host, parsed.port, parsed.authority, path)


def parse_authority(
    authority: str, default_port: int | None = None, require_port: bool = False
) -> Target:
    """Parse ``host[:port]`` (a reg-name, IPv4 or bracketed IPv6 literal) into a `Target`
    with no scheme and no path.  ``default_port`` stands in for a missing port unless
    ``require_port``.  TargetError (400) for userinfo (RFC 9110 §4.2.4), zone
    identifiers, invalid hosts and ports outside 1-65535."""
    if "@" in authority:
        raise TargetError("userinfo in target authority")
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise TargetError("unterminated IPv6 literal")
        host, after = authority[1:close], authority[close + 1 :]
        if "%" in host:
            raise TargetError("zone identifiers are not allowed in targets")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise TargetError("invalid IPv6 literal") from None
        if after and not after.startswith(":"):
            raise TargetError("junk after IPv6 literal")
        port_text: str | None = after[1:] if after else None
        host = canonical_host(host.lower())
        shown = f"[{host}]" if ":" in host else host
    else:
        host, colon, port_text = authority.rpartition(":")
        if not colon:
            host, port_text = authority, None
        if len(host.removesuffix(".")) > 253 or not _REG_NAME.fullmatch(host):
            raise TargetError("invalid host in target")
        shown = host.lower()
        host = shown.removesuffix(".")
        canonical = canonical_host(host)
        if canonical != host:  # an address in another spelling
            host = shown = canonical
    if port_text:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise TargetError("invalid port in target")
        port = int(port_text)
        shown = f"{shown}:{port_text}"
    elif require_port:
        raise TargetError("CONNECT target must be host:port")
    elif default_port is None:
        raise TargetError("target has no port")
    else:
        port = default_port
    return Target("", host, port, shown, "")


def redact_userinfo(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced by ``***`` (for logs).

    Works on any string, valid or not: in each authority everything up to the last
    ``@`` before the authority ends (at ``/``, ``?``, ``#`` or a backslash) goes, so a
    password holding an ``@`` or spaces goes too.  An authority starts after
    ``scheme:`` and any run of slashes or backslashes (``http:\\\\u:p@h`` and
    ``HTTP:/u:p@h`` too: browsers read both as ``http://``), after ``://``, and after
    ``//`` anywhere (a scheme-relative reference; a path with a doubled slash may lose a
    segment holding ``@``, which a log can spare).  Text with none of them is taken as
    an authority-form target (``user:pw@host:443``) unless it starts with ``/`` or ``*``.
    Linear in the length of ``text``; text without ``@`` comes back as it is.
    """
    if "@" not in text:
        return text
    starts = [m.end() for m in _AUTHORITY_START.finditer(text)]
    if not starts:
        if text.startswith(("/", "*", "\\")):
            return text
        starts = [0]  # the whole text is an authority
    parts = []
    pos = 0
    for begin in starts:
        if begin < pos:
            continue
        found = _AUTHORITY_END.search(text, begin)
        end = found.start() if found is not None else len(text)
        at = text.rfind("@", begin, end)
        if at != -1:
            parts.append(text[pos:begin])
            parts.append("***")
            pos = at
    parts.append(text[pos:])
    return "".join(parts)
