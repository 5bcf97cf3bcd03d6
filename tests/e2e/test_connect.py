"""CONNECT tunnels through the proxy: TLS clients, raw bytes, half-close, limits."""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import threading

import httpx
import pytest

from tests.conftest import raw_request, read_response
from tests.origins import pattern


class Tunnel(socket.socket):
    """A client socket through a CONNECT tunnel; bytes that came with the 200 are kept."""

    leftover = b""

    def recv(self, n: int, flags: int = 0) -> bytes:
        if self.leftover:
            data, self.leftover = self.leftover[:n], self.leftover[n:]
            return data
        return super().recv(n, flags)


def open_tunnel(proxy, authority: str, early: bytes = b"") -> Tunnel:
    plain = socket.create_connection(proxy.address, timeout=10)
    sock = Tunnel(fileno=plain.detach())
    sock.settimeout(10)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode() + early)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = socket.socket.recv(sock, 65536)
        assert chunk, data
        data += chunk
    head, _, sock.leftover = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def echo_origin(raw_origin):
    def handler(sock):
        while data := sock.recv(65536):
            sock.sendall(data)

    return raw_origin(handler)


def test_https_with_curl(proxy, tls_origin, ca_file):
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            ca_file,
            "-x",
            proxy.url,
            f"{tls_origin.url}/bytes?n=5000",
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == pattern(5000)
    line = proxy.access_entry(f"CONNECT {tls_origin.authority}")
    assert " 200 " in line
    assert "out=" in line and "out=0 " not in line


def test_https_with_httpx_keeps_the_tunnel_for_many_requests(proxy, tls_origin, ca_file):
    verify = ssl.create_default_context(cafile=ca_file)
    with httpx.Client(proxy=proxy.url, verify=verify, timeout=10, trust_env=False) as c:
        for n in (10, 100_000, 3):
            r = c.get(f"{tls_origin.url}/bytes", params={"n": n})
            assert r.content == pattern(n)
        body = pattern(300_000)
        r = c.post(f"{tls_origin.url}/upload", content=body)
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()


def test_bytes_sent_with_the_connect_head_are_not_lost(proxy, raw_origin):
    origin = echo_origin(raw_origin)
    sock = open_tunnel(proxy, origin.authority, early=b"early bytes")
    with sock:
        data = b""
        while len(data) < 11:
            data += sock.recv(100)
    assert data == b"early bytes"


def test_half_close_is_relayed(proxy, raw_origin):
    def handler(sock):
        received = recv_all(sock)  # until the client's EOF arrives through the tunnel
        sock.sendall(b"pong:" + received)

    origin = raw_origin(handler)
    with open_tunnel(proxy, origin.authority) as sock:
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"pong:ping"


@pytest.mark.parametrize("size", [1, 65536 * 3 + 7, 40_000_000])
def test_large_transfers_both_ways_are_intact(proxy, raw_origin, size):
    payload = pattern(size)

    def handler(sock):
        got = hashlib.sha256()
        n = 0
        while n < size:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got.update(chunk)
            n += len(chunk)
        sock.sendall(got.hexdigest().encode() + payload)
        sock.shutdown(socket.SHUT_WR)

    origin = raw_origin(handler)
    with open_tunnel(proxy, origin.authority) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        data = recv_all(sock)
        sender.join()
    digest = hashlib.sha256(payload).hexdigest().encode()
    assert data[:64] == digest
    assert data[64:] == payload
    line = proxy.access_entry(f"CONNECT {origin.authority}")
    assert f"in={size} out={size + 64} " in line


def test_idle_tunnel_is_closed(make_proxy, raw_origin):
    # Long enough that a busy machine does not idle the tunnel out before the echo below.
    p = make_proxy("--tunnel-idle-timeout", "1")
    origin = echo_origin(raw_origin)
    with open_tunnel(p, origin.authority) as sock:
        sock.sendall(b"x")
        assert sock.recv(10) == b"x"
        assert sock.recv(10) == b""  # closed by the proxy before the socket timeout
    line = p.access_entry(f"CONNECT {origin.authority}")
    assert "err=tunnel_idle" in line


def test_many_concurrent_tunnels(proxy, raw_origin):
    origin = echo_origin(raw_origin)
    socks = [open_tunnel(proxy, origin.authority) for _ in range(100)]
    try:
        for i, s in enumerate(socks):
            s.sendall(f"msg{i}".encode())
        for i, s in enumerate(socks):
            expected = f"msg{i}".encode()
            data = b""
            while len(data) < len(expected):
                data += s.recv(100)
            assert data == expected
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize(
    ("request_bytes", "words"),
    [
        (b"CONNECT example.com HTTP/1.1\r\n\r\n", "host:port"),
        (b"CONNECT example.com:99999 HTTP/1.1\r\n\r\n", "port"),
        (b"CONNECT http://example.com:443 HTTP/1.1\r\n\r\n", "host"),
        (b"CONNECT user@example.com:443 HTTP/1.1\r\n\r\n", "userinfo"),
        (b"CONNECT example.com:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", "body"),
        (
            b"CONNECT example.com:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "body",
        ),
    ],
)
def test_bad_connect_requests_are_400(proxy, request_bytes, words):
    data = raw_request(proxy.address, request_bytes)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert words in data.partition(b"\r\n\r\n")[2].decode()


def test_failed_connect_is_502_and_the_connection_stays_usable(proxy, origin):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 502")
        sock.sendall(f"GET {origin.url}/bytes?n=4 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        second = read_response(sock)
    assert second.startswith(b"HTTP/1.1 200") and second.endswith(pattern(4))
