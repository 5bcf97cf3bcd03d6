"""Answers the proxy writes itself: error kinds, their statuses and RFC 9209 types, the
page for each, and `render_answer`'s rules for HEAD, 1xx, 204 and 304 (RFC 9110 §9.3.2,
§6.4.1)."""

from __future__ import annotations

import re
from http import HTTPStatus

import pytest

from eyewall.errors import ErrorKind, error_answer, proxy_status_type, status_of
from eyewall.http1.response import parse_response_head
from eyewall.proxy.client import SHOWN_TARGET, method_hint, render_answer, request_line_hint

STATUS = {
    400: "bad_request not_proxy_request bad_connect",
    408: "client_timeout",
    414: "target_too_long",
    431: "headers_too_large",
    505: "version_not_supported",
    403: "proxy_loop_detected denied",
    407: "auth_required",
    429: "rate_limited",
    503: "overloaded",
    502: "dns_error connection_refused destination_unavailable connection_terminated "
    "http_protocol_error tls_protocol_error tls_certificate_error addon_failed",
    504: "connection_timeout connection_read_timeout body_stalled",
    499: "client_aborted client_tls_error addon_killed tunnel_idle",
    500: "proxy_internal_error",
}
EXPECTED_STATUS = {kind: code for code, kinds in STATUS.items() for kind in kinds.split()}
# RFC 9209 §2.3, the registered Proxy-Status error types.
RFC9209_TYPES = set(
    [
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
        "http_response_header_section_size",
        "http_response_header_size",
        "http_response_body_size",
        "http_response_trailer_section_size",
        "http_response_trailer_size",
        "http_response_transfer_coding",
        "http_response_content_coding",
        "http_response_timeout",
        "http_upgrade_failed",
        "http_protocol_error",
        "proxy_internal_response",
        "proxy_internal_error",
        "proxy_configuration_error",
        "proxy_loop_detected",
    ]
)
ANSWERED = [k for k in ErrorKind if status_of(k) != 499]  # the others close instead


@pytest.mark.parametrize("kind", list(ErrorKind), ids=lambda k: k.value)
def test_every_kind_has_a_status_and_a_proxy_status_type(kind):
    assert status_of(kind) == EXPECTED_STATUS[kind.value]
    assert proxy_status_type(kind) in RFC9209_TYPES


def test_kinds_named_after_an_rfc_type_use_its_name():
    """One name per error kind everywhere: where RFC 9209 has the type, the kind is it."""
    for kind in ErrorKind:
        if kind.value in RFC9209_TYPES:
            assert proxy_status_type(kind) == kind.value


@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize("kind", ANSWERED, ids=lambda k: k.value)
def test_error_page_is_a_valid_response(kind, close):
    status, fields, body = error_answer(kind, "it broke", "req-42")
    page = render_answer("GET", status, [*fields, ("Retry-After", "1")], body, close)
    head, sep, rest = page.partition(b"\r\n\r\n")
    parsed = parse_response_head(head + sep)
    assert parsed.status == status_of(kind)
    assert parsed.reason == HTTPStatus(parsed.status).phrase
    assert parsed.headers.get("content-length") == str(len(rest)) == str(len(body))
    assert parsed.headers.get("x-request-id") == "req-42"
    assert parsed.headers.get("retry-after") == "1"
    detail = "it broke" if proxy_status_type(kind) == kind.value else f"{kind.value}: it broke"
    assert parsed.headers.get("proxy-status") == (
        f'eyewall; error={proxy_status_type(kind)}; details="{detail}"'
    )
    assert parsed.headers.get_all("connection") == (["close"] if close else [])
    assert rest.decode().splitlines() == [
        f"{parsed.status} {parsed.reason}",
        "it broke",
        "request id: req-42",
    ]


@pytest.mark.parametrize("kind", ANSWERED, ids=lambda k: k.value)
def test_head_gets_the_head_with_a_truthful_length_and_no_body(kind):
    status, fields, body = error_answer(kind, "it broke", "req-1")
    page = render_answer("HEAD", status, fields, body, False)
    assert page.endswith(b"\r\n\r\n") and page.count(b"\r\n\r\n") == 1
    parsed = parse_response_head(page)
    assert parsed.headers.get("content-length") == str(len(body))


@pytest.mark.parametrize("status", [100, 101, 103, 204, 304])
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_bodiless_statuses_carry_neither_body_nor_length(status, method):
    page = render_answer(method, status, [("X-A", "1"), ("Content-Length", "99")], b"body", True)
    parsed = parse_response_head(page)
    assert page.endswith(b"\r\n\r\n")
    assert "content-length" not in parsed.headers
    assert parsed.headers.get("x-a") == "1"


@pytest.mark.parametrize("status", [200, 204, 299])
def test_a_2xx_to_connect_carries_neither_body_nor_length(status):
    """RFC 9110 §9.3.6: after a 2xx to CONNECT the bytes are the tunnel's."""
    page = render_answer("CONNECT", status, [("X-A", "1")], b"body", True)
    assert page.endswith(b"\r\n\r\n") and b"Content-Length" not in page
    refused = render_answer("CONNECT", 403, [], b"no", True)
    assert refused.endswith(b"Content-Length: 2\r\nConnection: close\r\n\r\nno")


@pytest.mark.parametrize(
    ("data", "method"),
    [
        (b"HEAD http://a/ HTTP/1.1\r\nX: " + b"a" * 100, "HEAD"),
        (b"\r\nHEAD http://a/ HTTP/1.1\r\n", "HEAD"),
        (b"HEAD " + b"/" * 10000, "HEAD"),  # a request line too long
        (b"GET http://a/ HTTP/1.1\r\nBad Field: x\r\n\r\n", "GET"),
        (b"POST http://a/ HTTP/3.0\r\n\r\n", "POST"),
        (b"\x16\x03\x01", "GET"),
        (b"", "GET"),
        (b"HEAD\r\n\r\n", "GET"),
    ],
)
def test_the_method_of_an_unparsed_head_is_guessed_so_head_gets_no_body(data, method):
    assert method_hint(data) == method
    page = render_answer(method_hint(data), 431, [], b"too large", True)
    assert page.endswith(b"\r\n\r\n") is (method == "HEAD")


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        (b"GET http://a/x HTTP/1.1\r\nBad Field: x\r\n\r\n", ("GET", "http://a/x")),
        (b"\r\nPOST http://a/ HTTP/3.0\r\n\r\n", ("POST", "http://a/")),
        (b"GET http://u:secret@a/ HTTP/1.1\r\n", ("GET", "http://***@a/")),  # redacted
        (b"GET  http://a/  HTTP/1.1\r\n", ("GET", "http://a/")),
        (b"GET\r\n\r\n", ("", "")),
        (b"G3T http://a/ HTTP/1.1\r\n", ("", "")),
        (b"\x16\x03\x01\x02\x00", ("", "")),
        (b"", ("", "")),
        (b"A" * 40 + b" http://a/ HTTP/1.1\r\n", ("", "")),
    ],
)
def test_an_unparsed_request_line_gives_what_it_can_to_the_record(data, hint):
    assert request_line_hint(data) == hint


def test_an_unparsed_request_target_is_cut_for_the_record():
    method, target = request_line_hint(b"GET http://a/" + b"x" * 70_000 + b" HTTP/1.1\r\n")
    assert method == "GET" and len(target) == SHOWN_TARGET + 3 and target.endswith("...")


def test_framing_fields_of_an_answer_are_replaced():
    page = render_answer(
        "GET",
        200,
        [
            ("Content-Length", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "keep-alive"),
            ("X-Y", "z"),
        ],
        b"hello",
        True,
    )
    parsed = parse_response_head(page.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
    assert [n for n, _ in parsed.headers] == ["X-Y", "Content-Length", "Connection"]
    assert parsed.headers.get("content-length") == "5"
    assert page.endswith(b"hello")


@pytest.mark.parametrize(
    "detail",
    [
        "x\r\nSet-Cookie: a=b\r\n\r\nHTTP/1.1 200 OK\r\n",
        "\x00\x01\x7f\u2028\x85 tail",
        'q"uote\\ and \u00e9',
    ],
)
def test_error_page_detail_cannot_inject(detail):
    status, fields, body = error_answer(ErrorKind.BAD_REQUEST, detail, "r1")
    page = render_answer("GET", status, fields, body, False)
    head, sep, rest = page.partition(b"\r\n\r\n")
    parsed = parse_response_head(head + sep)
    names = [n for n, _ in parsed.headers]
    assert names == [
        "Content-Type",
        "Cache-Control",
        "X-Content-Type-Options",
        "Proxy-Status",
        "X-Request-Id",
        "Content-Length",
    ]
    assert len(rest.decode().splitlines()) == 3
    assert all(0x20 <= b < 0x7F for b in rest.splitlines()[1])
    shown = "bad_request: " + re.sub(r"[^\x20-\x7e]", "?", detail)
    quoted = re.fullmatch(
        r'eyewall; error=http_request_error; details="((?:[^"\\]|\\.)*)"',
        parsed.headers.get("proxy-status", ""),
    )
    assert quoted is not None
    assert re.sub(r"\\(.)", r"\1", quoted.group(1)) == shown
