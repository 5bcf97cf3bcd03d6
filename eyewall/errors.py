"""Every way a proxied exchange can fail, the status each one answers with, and the
short plain-text page the client gets.

    ProxyError(kind, detail)
      client broke HTTP ........ 400 bad_request, not_proxy_request, bad_connect
                                 408 client_timeout · 414 target_too_long
                                 431 headers_too_large · 505 version_not_supported
      proxy refused ............ 403 loop, denied · 407 auth_required
                                 429 rate_limited · 503 overloaded
      upstream failed .......... 502 dns_failure, upstream_refused, upstream_unreachable,
                                     upstream_reset, upstream_malformed, upstream_tls
                                 504 connect_timeout, upstream_timeout
      after the response began . body_stalled, client_aborted (no status: connection closed)
      a policy addon raised .... 502 addon_failed
      a bug .................... 500 internal

Pages carry the status, the reason, a request id, and a ``Proxy-Status`` field (RFC 9209)
naming the error type, so tools can tell a proxy error from an origin's.
"""

from __future__ import annotations

import enum
import re
from http import HTTPStatus
from typing import assert_never

__all__ = ["ErrorKind", "ProxyError", "error_page", "status_of"]


class ErrorKind(enum.Enum):
    BAD_REQUEST = "bad_request"
    NOT_PROXY_REQUEST = "not_proxy_request"
    BAD_CONNECT = "bad_connect"
    CLIENT_TIMEOUT = "client_timeout"
    TARGET_TOO_LONG = "target_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"
    VERSION_NOT_SUPPORTED = "version_not_supported"
    LOOP = "loop"
    DENIED = "denied"
    AUTH_REQUIRED = "auth_required"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    DNS_FAILURE = "dns_failure"
    UPSTREAM_REFUSED = "upstream_refused"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_RESET = "upstream_reset"
    UPSTREAM_MALFORMED = "upstream_malformed"
    UPSTREAM_TLS = "upstream_tls"
    CONNECT_TIMEOUT = "connect_timeout"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    BODY_STALLED = "body_stalled"
    CLIENT_ABORTED = "client_aborted"
    ADDON_FAILED = "addon_failed"
    INTERNAL = "internal"


class ProxyError(Exception):
    """An exchange failed in a way the proxy answers for."""

    def __init__(self, kind: ErrorKind, detail: str = "") -> None:
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)
        self.kind = kind
        self.detail = detail


def status_of(kind: ErrorKind) -> int:
    match kind:
        case ErrorKind.BAD_REQUEST | ErrorKind.NOT_PROXY_REQUEST | ErrorKind.BAD_CONNECT:
            return 400
        case ErrorKind.CLIENT_TIMEOUT:
            return 408
        case ErrorKind.TARGET_TOO_LONG:
            return 414
        case ErrorKind.HEADERS_TOO_LARGE:
            return 431
        case ErrorKind.VERSION_NOT_SUPPORTED:
            return 505
        case ErrorKind.LOOP | ErrorKind.DENIED:
            return 403
        case ErrorKind.AUTH_REQUIRED:
            return 407
        case ErrorKind.RATE_LIMITED:
            return 429
        case ErrorKind.OVERLOADED:
            return 503
        case (
            ErrorKind.DNS_FAILURE
            | ErrorKind.UPSTREAM_REFUSED
            | ErrorKind.UPSTREAM_UNREACHABLE
            | ErrorKind.UPSTREAM_RESET
            | ErrorKind.UPSTREAM_MALFORMED
            | ErrorKind.UPSTREAM_TLS
        ):
            return 502
        case ErrorKind.CONNECT_TIMEOUT | ErrorKind.UPSTREAM_TIMEOUT | ErrorKind.BODY_STALLED:
            return 504
        case ErrorKind.CLIENT_ABORTED:
            return 499  # never sent: the client is gone; used in logs only
        case ErrorKind.ADDON_FAILED:
            return 502
        case ErrorKind.INTERNAL:
            return 500
        case _:
            assert_never(kind)


def proxy_status_type(kind: ErrorKind) -> str:
    """The RFC 9209 error type for ``kind``."""
    match kind:
        case ErrorKind.DNS_FAILURE:
            return "dns_error"
        case ErrorKind.UPSTREAM_REFUSED:
            return "connection_refused"
        case ErrorKind.UPSTREAM_UNREACHABLE:
            return "destination_unavailable"
        case ErrorKind.UPSTREAM_RESET:
            return "connection_terminated"
        case ErrorKind.UPSTREAM_MALFORMED:
            return "http_protocol_error"
        case ErrorKind.UPSTREAM_TLS:
            return "tls_certificate_error"
        case ErrorKind.CONNECT_TIMEOUT:
            return "connection_timeout"
        case ErrorKind.UPSTREAM_TIMEOUT | ErrorKind.BODY_STALLED:
            return "connection_read_timeout"
        case ErrorKind.LOOP:
            return "proxy_loop_detected"
        case ErrorKind.DENIED | ErrorKind.AUTH_REQUIRED | ErrorKind.RATE_LIMITED:
            return "http_request_denied"
        case ErrorKind.OVERLOADED:
            return "connection_limit_reached"
        case ErrorKind.INTERNAL | ErrorKind.ADDON_FAILED:
            return "proxy_internal_error"
        case (
            ErrorKind.BAD_REQUEST
            | ErrorKind.NOT_PROXY_REQUEST
            | ErrorKind.BAD_CONNECT
            | ErrorKind.CLIENT_TIMEOUT
            | ErrorKind.TARGET_TOO_LONG
            | ErrorKind.HEADERS_TOO_LARGE
            | ErrorKind.VERSION_NOT_SUPPORTED
            | ErrorKind.CLIENT_ABORTED
        ):
            return "http_request_error"
        case _:
            assert_never(kind)


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _clean(text: str, limit: int = 300) -> str:
    return _UNPRINTABLE.sub("?", text)[:limit]


def error_page(
    kind: ErrorKind,
    detail: str,
    request_id: str,
    *,
    proxy_name: str = "eyewall",
    close: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A complete HTTP/1.1 response for a proxy-generated error."""
    status = status_of(kind)
    reason = HTTPStatus(status).phrase
    detail = _clean(detail)
    body = f"{status} {reason}\n{detail}\nrequest id: {request_id}\n".encode()
    quoted = detail.replace("\\", "\\\\").replace('"', '\\"')
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        f'Proxy-Status: {proxy_name}; error={proxy_status_type(kind)}; details="{quoted}"',
        f"X-Request-Id: {request_id}",
    ]
    lines.extend(f"{n}: {v}" for n, v in extra)
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
