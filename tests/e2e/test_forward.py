"""Plain HTTP forwarding through the proxy, with real clients and real origins."""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import subprocess

import httpx
import pytest
import requests

from tests.conftest import raw_exchange, raw_request
from tests.origins import pattern


def curl(proxy, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x", proxy.url, *args],
        capture_output=True,
        check=False,
    )


def client(proxy) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, timeout=10, trust_env=False)


@pytest.mark.parametrize(
    "method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "BREW"]
)
def test_any_method_reaches_the_origin(proxy, origin, method):
    body = b"payload" if method in ("POST", "PUT", "PATCH", "BREW") else None
    with client(proxy) as c:
        r = c.request(method, f"{origin.url}/echo/m", content=body)
    assert r.status_code == 200
    seen = r.json()
    assert seen["method"] == method
    assert seen["body_len"] == (len(body) if body else 0)


def test_target_is_rewritten_to_origin_form_and_host_from_authority(proxy, origin):
    with socket.create_connection(proxy.address) as s:
        s.sendall(
            f"GET {origin.url}/echo/a%2Fb?q=%41%zz&x=1+2 HTTP/1.1\r\n"
            "Host: wrong.example\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    body = data.partition(b"\r\n\r\n")[2]
    seen = json.loads(body)
    assert seen["uri"] == "/echo/a%2Fb?q=%41%zz&x=1+2"  # byte-exact, no re-encoding
    hosts = [v for n, v in seen["headers"] if n == "Host"]
    assert hosts == [origin.authority]


def test_hop_by_hop_fields_do_not_reach_the_origin(proxy, origin):
    with socket.create_connection(proxy.address) as s:
        s.sendall(
            f"GET {origin.url}/echo HTTP/1.1\r\nHost: x\r\n"
            "Connection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
            "Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n"
            "TE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nX-End-To-End: kept\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    seen = json.loads(data.partition(b"\r\n\r\n")[2])
    names = {n.lower() for n, _ in seen["headers"]}
    for hop in (
        "x-secret-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    ):
        assert hop not in names
    assert ("X-End-To-End", "kept") in [tuple(h) for h in seen["headers"]]
    assert ("Via", "1.1 eyewall") in [tuple(h) for h in seen["headers"]]


def test_hop_by_hop_fields_from_the_origin_do_not_reach_the_client(proxy, raw_origin):
    def handler(sock):
        origin.read_head(sock)
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nConnection: X-Origin-Hop\r\nX-Origin-Hop: 1\r\n"
            b"Keep-Alive: timeout=5\r\nX-Mixed-CASE: Kept\r\nContent-Length: 2\r\n\r\nok"
        )

    origin = raw_origin(handler)
    data = raw_request(
        proxy.address,
        f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    head = data.partition(b"\r\n\r\n")[0].decode()
    assert "X-Origin-Hop" not in head
    assert "Keep-Alive" not in head
    assert "X-Mixed-CASE: Kept" in head  # names keep their spelling
    assert "Via: 1.1 eyewall" in head
    assert data.endswith(b"\r\n\r\nok")


def test_repeated_set_cookie_stay_separate(proxy, origin):
    r = requests.get(f"{origin.url}/cookies", proxies={"http": proxy.url}, timeout=10)
    assert r.raw.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]


def test_content_encoding_passes_through_untouched(proxy, origin):
    with socket.create_connection(proxy.address) as s:
        s.sendall(
            f"GET {origin.url}/gzip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            "Accept-Encoding: gzip\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head
    assert gzip.decompress(body) == b"hello gzip\n" * 100


@pytest.mark.parametrize("n", [0, 1, 70_000, 3_000_000])
def test_response_bodies_arrive_whole(proxy, origin, n):
    with client(proxy) as c:
        r = c.get(f"{origin.url}/bytes", params={"n": n})
    assert r.status_code == 200
    assert r.content == pattern(n)


@pytest.mark.parametrize("n", [1, 100_000, 2_000_000])
def test_chunked_response_is_rechunked_for_http11(proxy, origin, n):
    with client(proxy) as c:
        r = c.get(f"{origin.url}/bytes", params={"n": n, "chunked": 1, "piece": 5000})
    assert r.headers["transfer-encoding"] == "chunked"
    assert r.content == pattern(n)


@pytest.mark.parametrize("size", [0, 10, 200_000, 5_000_000])
def test_request_bodies_are_streamed_to_the_origin(proxy, origin, size):
    body = pattern(size)
    with client(proxy) as c:
        r = c.post(f"{origin.url}/upload", content=body)
    assert r.json() == {"size": size, "sha256": hashlib.sha256(body).hexdigest()}


def test_chunked_request_body_is_forwarded(proxy, origin):
    def gen():
        for i in range(20):
            yield pattern(1000 + i)

    with client(proxy) as c:
        r = c.post(f"{origin.url}/upload", content=gen())
    expected = b"".join(pattern(1000 + i) for i in range(20))
    assert r.json() == {"size": len(expected), "sha256": hashlib.sha256(expected).hexdigest()}


def test_curl_through_the_proxy(proxy, origin):
    result = curl(proxy, f"{origin.url}/bytes?n=1000")
    assert result.returncode == 0
    assert result.stdout == pattern(1000)


def test_curl_upload_with_expect_100_continue(proxy, origin):
    body = pattern(2_000_000)
    result = curl(
        proxy, "-H", "Expect: 100-continue", "--data-binary", "@-", f"{origin.url}/upload"
    )
    del result
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-x",
            proxy.url,
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            "@-",
            "-w",
            "\n%{http_code}",
            f"{origin.url}/upload",
        ],
        input=body,
        capture_output=True,
        check=False,
    )
    text = result.stdout.decode()
    payload, code = text.rsplit("\n", 1)
    assert code == "200"
    assert json.loads(payload) == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_head_response_has_no_body(proxy, origin):
    data = raw_request(
        proxy.address,
        f"HEAD {origin.url}/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 123" in head
    assert rest == b""


@pytest.mark.parametrize("code", [204, 304])
def test_bodyless_statuses_then_keep_alive(proxy, origin, code):
    with socket.create_connection(proxy.address, timeout=5) as s:
        s.sendall(
            f"GET {origin.url}/status?code={code} HTTP/1.1\r\nHost: x\r\n\r\n"
            f"GET {origin.url}/bytes?n=5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    first, _, second = data.partition(b"\r\n\r\n")
    assert first.startswith(f"HTTP/1.1 {code}".encode())
    assert b"Transfer-Encoding" not in first
    assert second.startswith(b"HTTP/1.1 200")
    assert second.endswith(pattern(5))


def test_pipelined_requests_are_answered_in_order(proxy, origin):
    reqs = (
        b"".join(
            f"GET {origin.url}/echo/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5)
        )
        + f"GET {origin.url}/echo/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    data = raw_exchange(proxy.address, reqs)
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in data.split(b"HTTP/1.1 200 OK")[1:]]
    uris = [json.loads(body[: body.index(b"}") + 1])["uri"] for body in bodies]
    assert uris == [f"/echo/{i}" for i in range(5)] + ["/echo/last"]


def test_http10_client_never_gets_chunked(proxy, origin):
    data = raw_request(
        proxy.address,
        f"GET {origin.url}/bytes?n=3000&chunked=1&piece=100 HTTP/1.0\r\n\r\n".encode(),
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert body == pattern(3000)  # delimited by the close


def test_http10_keep_alive_with_length(proxy, origin):
    with socket.create_connection(proxy.address, timeout=5) as s:
        s.sendall(
            f"GET {origin.url}/bytes?n=10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode()
        )
        data = b""
        while not data.endswith(pattern(10)):
            data += s.recv(65536)
        assert b"Connection: keep-alive" in data
        s.sendall(f"GET {origin.url}/bytes?n=7 HTTP/1.0\r\n\r\n".encode())
        more = b""
        while chunk := s.recv(65536):
            more += chunk
    assert more.endswith(pattern(7))


def test_keep_alive_to_client_and_pooled_origin_connections(proxy, origin):
    before = len(origin.seen_connections)
    with client(proxy) as c:
        for _ in range(20):
            assert c.get(f"{origin.url}/bytes?n=10").status_code == 200
    assert len(origin.seen_connections) - before <= 1
    line = proxy.access_entry("/bytes?n=10")
    assert "reused" in line


def test_access_line_names_request_and_result(proxy, origin):
    with client(proxy) as c:
        c.get(f"{origin.url}/bytes?n=4321&tag=access")
    line = proxy.access_entry("tag=access")
    assert " GET " in line and " 200 " in line and "out=4321" in line
