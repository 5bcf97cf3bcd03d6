"""Unit tests for eyewall.errors: every error kind has a status and an RFC 9209 type, and
error pages are valid responses that cannot be used for injection."""

from __future__ import annotations

import re
from http import HTTPStatus

import pytest

from eyewall.errors import ErrorKind, error_page, proxy_status_type, status_of
from eyewall.http1.response import parse_response_head

# -- errors -------------------------------------------------------------------------------

STATUS = {
    400: "bad_request not_proxy_request bad_connect",
    408: "client_timeout",
    414: "target_too_long",
    431: "headers_too_large",
    505: "version_not_supported",
    403: "loop denied",
    407: "auth_required",
    429: "rate_limited",
    503: "overloaded",
    502: "dns_failure upstream_refused upstream_unreachable upstream_reset "
    "upstream_malformed upstream_tls addon_failed",
    504: "connect_timeout upstream_timeout body_stalled",
    499: "client_aborted",
    500: "internal",
}
EXPECTED_STATUS = {kind: code for code, kinds in STATUS.items() for kind in kinds.split()}
RFC9209_TYPES = {
    "dns_timeout",
    "dns_error",
    "destination_not_found",
    "destination_unavailable",
    "destination_ip_prohibited",
    "destination_ip_unroutable",
    "connection_refused",
    "connection_terminated",
    "connection_timeout",
    "connection_read_timeout",
    "connection_write_timeout",
    "connection_limit_reached",
    "tls_protocol_error",
    "tls_certificate_error",
    "tls_alert_received",
    "http_request_error",
    "http_request_denied",
    "http_response_incomplete",
    "http_upgrade_failed",
    "http_protocol_error",
    "proxy_internal_response",
    "proxy_internal_error",
    "proxy_configuration_error",
    "proxy_loop_detected",
}
SENT = [k for k in ErrorKind if k is not ErrorKind.CLIENT_ABORTED]  # that one has no page


@pytest.mark.parametrize("kind", list(ErrorKind), ids=lambda k: k.value)
def test_every_kind_has_a_status_and_a_proxy_status_type(kind):
    assert status_of(kind) == EXPECTED_STATUS[kind.value]
    assert proxy_status_type(kind) in RFC9209_TYPES


@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize("kind", SENT, ids=lambda k: k.value)
def test_error_page_is_a_valid_response(kind, close):
    page = error_page(kind, "it broke", "req-42", close=close, extra=(("Retry-After", "1"),))
    head, sep, body = page.partition(b"\r\n\r\n")
    parsed = parse_response_head(head + sep)
    assert parsed.status == status_of(kind)
    assert parsed.reason == HTTPStatus(parsed.status).phrase
    assert parsed.headers.get("content-length") == str(len(body))
    assert parsed.headers.get("x-request-id") == "req-42"
    assert parsed.headers.get("retry-after") == "1"
    assert parsed.headers.get("proxy-status") == (
        f'eyewall; error={proxy_status_type(kind)}; details="it broke"'
    )
    assert parsed.headers.get_all("connection") == (["close"] if close else [])
    assert body.decode().splitlines() == [
        f"{parsed.status} {parsed.reason}",
        "it broke",
        "request id: req-42",
    ]


@pytest.mark.parametrize(
    "detail",
    [
        "x\r\nSet-Cookie: a=b\r\n\r\nHTTP/1.1 200 OK\r\n",
        "\x00\x01\x7f\u2028\x85 tail",
        'q"uote\\ and \u00e9',
    ],
)
def test_error_page_detail_cannot_inject(detail):
    page = error_page(ErrorKind.BAD_REQUEST, detail, "r1")
    head, sep, body = page.partition(b"\r\n\r\n")
    parsed = parse_response_head(head + sep)
    names = [n for n, _ in parsed.headers]
    assert names == [
        "Content-Type",
        "Content-Length",
        "Cache-Control",
        "X-Content-Type-Options",
        "Proxy-Status",
        "X-Request-Id",
    ]
    assert parsed.headers.get("content-length") == str(len(body))
    assert len(body.decode().splitlines()) == 3
    assert all(0x20 <= b < 0x7F for b in body.splitlines()[1])
    shown = re.sub(r"[^\x20-\x7e]", "?", detail)
    quoted = re.fullmatch(
        r'eyewall; error=http_request_error; details="((?:[^"\\]|\\.)*)"',
        parsed.headers.get("proxy-status", ""),
    )
    assert quoted is not None
    assert re.sub(r"\\(.)", r"\1", quoted.group(1)) == shown
