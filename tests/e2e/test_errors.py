"""Bad input and failing origins: a clear answer, a log line, and service goes on."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from eyewall.http1.response import parse_response_head
from tests.conftest import raw_request, read_response


def status_of(data: bytes) -> int:
    head = data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    return parse_response_head(head).status


def assert_error_page(data: bytes, status: int, words: str = "") -> str:
    assert status_of(data) == status, data[:300]
    head, _, body = data.partition(b"\r\n\r\n")
    text = body.decode()
    assert text.startswith(f"{status} ")
    assert "request id: " in text
    assert b"Proxy-Status: eyewall; error=" in head
    assert words in text
    assert "Traceback" not in text
    return text


@pytest.fixture
def still_serving(proxy, origin):
    """After each test, the proxy still answers a normal request."""
    yield
    data = raw_request(
        proxy.address,
        f"GET {origin.url}/bytes?n=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


BAD_REQUESTS = [
    (b"GET  http://a/ HTTP/1.1\r\n\r\n", 400, "malformed request line"),
    (b"GET http://a/\r\n\r\n", 400, "malformed request line"),
    (b"GET http://a/ HTTP/1.1\r\nBad Header : x\r\n\r\n", 400, "header"),
    (b"GET http://a/ HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "invalid character"),
    (b"GET http://a/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400, "folding"),
    (
        b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "both Content-Length and Transfer-Encoding",
    ),
    (
        b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        400,
        "conflicting Content-Length",
    ),
    (
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
        "unsupported Transfer-Encoding",
    ),
    (b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n", 400, "forward proxy"),
    (b"GET ftp://a/ HTTP/1.1\r\n\r\n", 400, "absolute http"),
    (b"GET http://user:pw@a/ HTTP/1.1\r\n\r\n", 400, "userinfo"),
    (b"GET http://a/ HTTP/2.0\r\n\r\n", 505, "version"),
]


@pytest.mark.parametrize(("request_bytes", "status", "words"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_error(proxy, still_serving, request_bytes, status, words):
    data = raw_request(proxy.address, request_bytes)
    text = assert_error_page(data, status, words)
    request_id = text.split("request id: ")[1].strip()
    line = proxy.access_entry(request_id)
    assert f" {status} " in line and "err=" in line


def test_header_section_too_large_is_431(proxy, still_serving):
    data = raw_request(
        proxy.address, b"GET http://a/ HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    )
    assert_error_page(data, 431, "too large")


def test_request_line_too_long_is_414(proxy, still_serving):
    data = raw_request(proxy.address, b"GET http://a/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    assert_error_page(data, 414, "too long")
    data = raw_request(proxy.address, b"GET http://a/" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert_error_page(data, 414, "too long")


def test_request_aimed_at_the_proxy_itself_is_refused(proxy, still_serving):
    for target in (f"http://127.0.0.1:{proxy.port}/", f"http://localhost:{proxy.port}/x"):
        data = raw_request(proxy.address, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert_error_page(data, 403, "proxy itself")
    data = raw_request(proxy.address, f"CONNECT 127.0.0.1:{proxy.port} HTTP/1.1\r\n\r\n".encode())
    assert_error_page(data, 403, "proxy itself")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_origin_is_502(proxy, still_serving):
    port = closed_port()
    data = raw_request(
        proxy.address,
        f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        timeout=2,
    )
    assert_error_page(data, 502, "refused")


def test_unresolvable_name_is_502_with_the_reason(proxy, still_serving):
    data = raw_request(
        proxy.address, b"GET http://no-such-host.invalid/ HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3
    )
    assert_error_page(data, 502, "cannot resolve no-such-host.invalid")


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\nx",
        b"HTTP/2 200\r\n\r\n",
    ],
)
def test_malformed_origin_response_is_502(proxy, raw_origin, still_serving, response):
    def handler(sock):
        origin.read_head(sock)
        sock.sendall(response)

    origin = raw_origin(handler)
    data = raw_request(proxy.address, f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert_error_page(data, 502)


def test_origin_closing_without_answer_is_502(proxy, raw_origin, still_serving):
    origin = raw_origin(lambda sock: origin.read_head(sock))
    data = raw_request(proxy.address, f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert_error_page(data, 502, "before responding")


def test_origin_reset_is_502(proxy, raw_origin, still_serving):
    def handler(sock):
        origin.read_head(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    origin = raw_origin(handler)
    data = raw_request(proxy.address, f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert_error_page(data, 502)


def test_slow_origin_is_504(make_proxy, origin):
    p = make_proxy("--upstream-head-timeout", "0.5")
    data = raw_request(
        p.address, f"GET {origin.url}/sleep?seconds=3 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert_error_page(
        data, 504, "response head took too long"
    )  # the origin would answer 200 at 3 s


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    ],
)
def test_origin_breaking_mid_body_closes_the_client(proxy, raw_origin, still_serving, response):
    def handler(sock):
        origin.read_head(sock)
        sock.sendall(response)

    origin = raw_origin(handler)
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "-x", proxy.url, "-o", "/dev/null", f"{origin.url}/"],
        capture_output=True,
        check=False,
    )
    assert result.returncode in (18, 56), result  # partial file / receive failure
    line = proxy.access_entry(origin.authority)
    assert "err=connection_terminated" in line or "err=http_protocol_error" in line


def test_slowloris_gets_408(make_proxy):
    p = make_proxy("--client-header-timeout", "0.5")
    with socket.create_connection(p.address, timeout=5) as s:
        s.sendall(b"GET http://a/ HTTP/1.1\r\nX-Slow: ")
        try:
            for _ in range(50):  # a byte now and then, never the end of the head
                time.sleep(0.05)  # the input's own pace, not a synchronisation
                s.sendall(b"a")
        except OSError:
            pass  # the proxy gave up on us, as it should
        data = s.recv(65536)
    assert status_of(data) == 408


def test_idle_new_connection_is_closed(make_proxy):
    p = make_proxy("--client-header-timeout", "0.3")
    with socket.create_connection(p.address, timeout=5) as s:
        assert s.recv(100) == b""  # closed by the proxy, well before the 5 s socket timeout


def test_request_fed_one_byte_at_a_time(proxy, origin):
    request = (
        f"POST {origin.url}/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ).encode()
    with socket.create_connection(proxy.address, timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in request:
            s.send(bytes([b]))
        data = read_response(s)
    assert status_of(data) == 200
    assert b'"size": 5' in data
