"""Every way a proxied exchange can fail, the status each one answers with, and the
short plain-text page the client gets.

    ProxyError(kind, detail)
      client broke HTTP ........ 400 bad_request, not_proxy_request, bad_connect
                                 408 client_timeout · 414 target_too_long
                                 431 headers_too_large · 505 version_not_supported
      proxy refused ............ 403 proxy_loop_detected, denied · 407 auth_required
                                 429 rate_limited · 503 overloaded
      upstream failed .......... 502 dns_error, connection_refused, destination_unavailable,
                                     connection_terminated, http_protocol_error,
                                     tls_protocol_error, tls_certificate_error
                                 504 connection_timeout, connection_read_timeout
      while bytes were moving .. body_stalled (504 if nothing was sent yet), tunnel_idle,
                                 client_aborted, client_tls_error (no status: the
                                 connection is closed)
      an addon ................. 502 addon_failed · addon_killed (closed, no status)
      a bug .................... 500 proxy_internal_error

A kind's name is the same everywhere: access log, metrics, flows API and, where RFC 9209
defines that error type, the ``Proxy-Status`` field.  Kinds finer than any RFC 9209
type (``denied``, ``rate_limited``, ...) are sent in ``Proxy-Status`` as the broader
type (`proxy_status_type`), with the kind's own name in the details.

Pages carry the status, the reason, a request id, and the ``Proxy-Status`` field, so
tools can tell a proxy error from an origin's.
"""

from __future__ import annotations

import enum
import re
from http import HTTPStatus
from typing import assert_never

__all__ = ["ErrorKind", "ProxyError", "error_answer", "proxy_status_type", "status_of"]


class ErrorKind(enum.Enum):
    """Why an exchange or tunnel failed; the value is the name used everywhere."""

    BAD_REQUEST = "bad_request"
    NOT_PROXY_REQUEST = "not_proxy_request"
    BAD_CONNECT = "bad_connect"
    CLIENT_TIMEOUT = "client_timeout"
    TARGET_TOO_LONG = "target_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"
    VERSION_NOT_SUPPORTED = "version_not_supported"
    LOOP = "proxy_loop_detected"
    DENIED = "denied"
    AUTH_REQUIRED = "auth_required"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    DNS_ERROR = "dns_error"
    CONNECTION_REFUSED = "connection_refused"
    DESTINATION_UNAVAILABLE = "destination_unavailable"
    CONNECTION_TERMINATED = "connection_terminated"
    HTTP_PROTOCOL_ERROR = "http_protocol_error"
    TLS_PROTOCOL_ERROR = "tls_protocol_error"
    TLS_CERTIFICATE_ERROR = "tls_certificate_error"
    CONNECTION_TIMEOUT = "connection_timeout"
    READ_TIMEOUT = "connection_read_timeout"
    BODY_STALLED = "body_stalled"
    TUNNEL_IDLE = "tunnel_idle"
    CLIENT_ABORTED = "client_aborted"
    CLIENT_TLS_ERROR = "client_tls_error"
    ADDON_FAILED = "addon_failed"
    ADDON_KILLED = "addon_killed"
    INTERNAL = "proxy_internal_error"


class ProxyError(Exception):
    """An exchange failed in a way the proxy answers for."""

    def __init__(self, kind: ErrorKind, detail: str = "") -> None:
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)
        self.kind = kind
        self.detail = detail


def status_of(kind: ErrorKind) -> int:
    """The status a client gets for ``kind`` (499 for kinds that are never answered,
    because the connection is already gone or mid-message: used in logs only)."""
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
            ErrorKind.DNS_ERROR
            | ErrorKind.CONNECTION_REFUSED
            | ErrorKind.DESTINATION_UNAVAILABLE
            | ErrorKind.CONNECTION_TERMINATED
            | ErrorKind.HTTP_PROTOCOL_ERROR
            | ErrorKind.TLS_PROTOCOL_ERROR
            | ErrorKind.TLS_CERTIFICATE_ERROR
            | ErrorKind.ADDON_FAILED
        ):
            return 502
        case ErrorKind.CONNECTION_TIMEOUT | ErrorKind.READ_TIMEOUT | ErrorKind.BODY_STALLED:
            return 504
        case (
            ErrorKind.CLIENT_ABORTED
            | ErrorKind.CLIENT_TLS_ERROR
            | ErrorKind.ADDON_KILLED
            | ErrorKind.TUNNEL_IDLE
        ):
            return 499
        case ErrorKind.INTERNAL:
            return 500
        case _:
            assert_never(kind)


def proxy_status_type(kind: ErrorKind) -> str:
    """The RFC 9209 error type for ``kind`` (§2.3)."""
    match kind:
        case (
            ErrorKind.DNS_ERROR
            | ErrorKind.CONNECTION_REFUSED
            | ErrorKind.DESTINATION_UNAVAILABLE
            | ErrorKind.CONNECTION_TERMINATED
            | ErrorKind.HTTP_PROTOCOL_ERROR
            | ErrorKind.TLS_PROTOCOL_ERROR
            | ErrorKind.TLS_CERTIFICATE_ERROR
            | ErrorKind.CONNECTION_TIMEOUT
            | ErrorKind.LOOP
        ):
            return str(kind.value)
        case ErrorKind.READ_TIMEOUT | ErrorKind.BODY_STALLED | ErrorKind.TUNNEL_IDLE:
            return "connection_read_timeout"
        case ErrorKind.DENIED | ErrorKind.AUTH_REQUIRED | ErrorKind.RATE_LIMITED:
            return "http_request_denied"
        case ErrorKind.OVERLOADED:
            return "connection_limit_reached"
        case ErrorKind.INTERNAL | ErrorKind.ADDON_FAILED | ErrorKind.ADDON_KILLED:
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
            | ErrorKind.CLIENT_TLS_ERROR
        ):
            return "http_request_error"
        case _:
            assert_never(kind)


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _clean(text: str, limit: int = 300) -> str:
    return _UNPRINTABLE.sub("?", text)[:limit]


def error_answer(
    kind: ErrorKind, detail: str, request_id: str, proxy_name: str = "eyewall"
) -> tuple[int, list[tuple[str, str]], bytes]:
    """The page for ``kind``: (status, fields, body).  The fields do not include
    framing (Content-Length, Connection): the writer adds them for the request the
    page answers (a HEAD gets no body)."""
    status = status_of(kind)
    reason = HTTPStatus(status).phrase
    detail = _clean(detail)
    body = f"{status} {reason}\n{detail}\nrequest id: {request_id}\n".encode()
    rfc_type = proxy_status_type(kind)
    shown = detail if rfc_type == kind.value else f"{kind.value}: {detail}"
    quoted = shown.replace("\\", "\\\\").replace('"', '\\"')
    fields = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Proxy-Status", f'{proxy_name}; error={rfc_type}; details="{quoted}"'),
        ("X-Request-Id", request_id),
    ]
    return status, fields, body
