"""Fault classes found by replaying public bug reports of other proxies and by a
security review, each through the real proxy (a subprocess; raw sockets where the bytes
matter): the reported input and further members of its class.  The classes are
numbered as in the issue that named them; timing-sensitive members also have
in-process tests with an injected clock (tests/proxy/test_lifecycle.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import bcrypt
import httpx
import pytest
import trustme
from websockets.asyncio.client import connect

from tests.conftest import (
    ROOT,
    ProxyProcess,
    poll,
    raw_exchange,
    raw_request,
    read_response,
)
from tests.e2e.test_websocket import masked_frame
from tests.origins import pattern
from tests.tlspeer import TLSPeer


def status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def head_and_rest(data: bytes) -> tuple[bytes, bytes]:
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def recv_until(sock: socket.socket, needle: bytes, data: bytes = b"") -> bytes:
    while needle not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before {needle!r}: {data[-300:]!r}")
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def eyewall(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "eyewall", *args], capture_output=True, timeout=60, cwd=ROOT
    )


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fault-ca") / "ca"
    assert eyewall("ca", "init", "--ca-dir", str(directory)).returncode == 0
    return directory


def intercepting(tmp_path: Path, ca_dir: Path, bundle: str, extra: str = "") -> str:
    path = tmp_path / "intercept.toml"
    path.write_text(
        f'[tls]\nca_dir = "{ca_dir}"\nupstream_ca_bundle = "{bundle}"\n{extra}'
        '[[rules]]\nid = "mitm"\naction = "intercept"\nhosts = ["localhost"]\n'
    )
    return str(path)


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- 1. byte relays where Eyewall terminates TLS ------------------------------------------


def test_1_websocket_inside_an_intercepted_tunnel(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path
):
    p = make_proxy("--config", intercepting(tmp_path, ca_dir, ca_file))
    trust = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))

    async def talk() -> list[str | bytes]:
        url = tls_origin.url.replace("https://", "wss://") + "/ws"
        async with connect(url, proxy=p.url, ssl=trust, max_size=None) as ws:
            replies = []
            for message in ("hello", b"\x00\x01binary", "x" * 300_000):
                await ws.send(message)
                replies.append(await ws.recv())
            return replies

    assert asyncio.run(talk()) == ["hello", b"\x00\x01binary", "x" * 300_000]
    line = p.access_entry(" 101 ")
    assert "websocket" in line or "/ws" in line


def test_1_websocket_upgrade_to_an_https_origin_on_a_plain_connection(
    make_proxy, tls_origin, ca_file
):
    p = make_proxy("--upstream-ca-bundle", ca_file)
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(p.address, timeout=10) as sock:
        sock.sendall(
            f"GET {tls_origin.url}/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            "\r\n".encode()
        )
        head, rest = head_and_rest(recv_until(sock, b"\r\n\r\n"))
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.sendall(masked_frame(b"over tls"))
        data = rest
        while len(data) < 10:
            data += sock.recv(100)
        assert data[:10] == bytes([0x81, 8]) + b"over tls"


@pytest.fixture(scope="module")
def listener_cert(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("listener")
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = directory / "proxy.pem", directory / "proxy.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def https_proxy(make_proxy, listener_cert, *args: str) -> tuple[ProxyProcess, int]:
    cert, key = listener_cert
    p = make_proxy(
        "--tls-listen", "127.0.0.1:0", "--tls-certificate", cert, "--tls-key", key, *args
    )
    tls_port = int(p.listening[1].rsplit(":", 1)[1])
    return p, tls_port


def test_1_8_an_https_proxy_listener_serves_requests_and_tunnels(
    make_proxy, listener_cert, origin, tls_origin, ca_file
):
    """curl --proxy https://...: TLS to the proxy itself, then a request or a CONNECT
    inside it (the tunnel relays a TLS client connection)."""
    p, tls_port = https_proxy(make_proxy, listener_cert)
    # which of the listeners is the HTTPS one, said at start-up
    assert f"HTTPS proxy listener (https:// proxy URLs) on 127.0.0.1:{tls_port}" in p.stderr()
    base = [
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--proxy",
        f"https://localhost:{tls_port}",
        "--proxy-cacert",
        ca_file,
    ]
    plain = subprocess.run([*base, f"{origin.url}/echo/plain"], capture_output=True)
    assert plain.returncode == 0, plain.stderr
    assert b'"/echo/plain"' in plain.stdout
    tunnelled = subprocess.run(
        [*base, "--cacert", ca_file, f"{tls_origin.url}/echo/tunnelled"], capture_output=True
    )
    assert tunnelled.returncode == 0, tunnelled.stderr
    assert b'"/echo/tunnelled"' in tunnelled.stdout
    assert " 200 " in p.access_entry("CONNECT localhost")


def test_1_8_interception_through_the_https_proxy_listener(
    make_proxy, listener_cert, tls_origin, ca_file, ca_dir, tmp_path
):
    """curl --proxy https://... to an intercepted host: TLS inside the TLS to the proxy."""
    p, tls_port = https_proxy(
        make_proxy, listener_cert, "--config", intercepting(tmp_path, ca_dir, ca_file)
    )
    command = [
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--proxy",
        f"https://localhost:{tls_port}",
        "--proxy-cacert",
        ca_file,
        "--cacert",
        str(ca_dir / "ca.pem"),  # only Eyewall's CA: the origin's certificate would fail
    ]
    for path in ("/echo/one", "/echo/two"):
        done = subprocess.run([*command, tls_origin.url + path], capture_output=True)
        assert done.returncode == 0, done.stderr
        assert f'"{path}"'.encode() in done.stdout
        assert " 200 " in p.access_entry(f"GET {tls_origin.url}{path}")
    upload = subprocess.run(
        [*command, "--data-binary", "@-", f"{tls_origin.url}/upload"],
        input=os.urandom(3_000_000),
        capture_output=True,
    )
    assert upload.returncode == 0 and b'"size": 3000000' in upload.stdout, upload.stderr


def test_1_8_websocket_inside_an_intercepted_tunnel_through_the_https_listener(
    make_proxy, listener_cert, tls_origin, ca_file, ca_dir, tmp_path
):
    p, tls_port = https_proxy(
        make_proxy, listener_cert, "--config", intercepting(tmp_path, ca_dir, ca_file)
    )
    outer = ssl.create_default_context(cafile=ca_file)
    inner = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))

    async def talk() -> list[str | bytes]:
        url = tls_origin.url.replace("https://", "wss://") + "/ws"
        proxy_url = f"https://localhost:{tls_port}"
        async with connect(url, proxy=proxy_url, proxy_ssl=outer, ssl=inner, max_size=None) as ws:
            replies = []
            for message in ("hello", b"\x00\x01binary", "x" * 300_000):
                await ws.send(message)
                replies.append(await ws.recv())
            return replies

    assert asyncio.run(talk()) == ["hello", b"\x00\x01binary", "x" * 300_000]
    assert " 101 " in p.access_entry("/ws")


def replies_after_eof(context: ssl.SSLContext):
    """A TLS WebSocket origin (raw bytes after the 101) that answers only once the
    client's end of input (close_notify) has reached it, then closes."""

    def handle(sock: socket.socket) -> None:
        with context.wrap_socket(sock, server_side=True) as tls:
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(65536)
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(
                hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            tls.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            got = head.partition(b"\r\n\r\n")[2]
            while chunk := tls.recv(65536):
                got += chunk
            tls.sendall(b"after EOF: " + got)
            tls.unwrap()  # our close_notify; the client's came already

    return handle


def upgrade_request(target: str, host: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
        f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    ).encode()


REPEATS = 30  # the loss was a race (8 runs in 12): each repeat is a new chance to lose


@pytest.mark.parametrize("route", ["absolute-form", "intercepted", "intercepted-in-https-proxy"])
def test_1_data_after_a_half_close_arrives_when_eyewall_speaks_tls_to_the_origin(
    make_proxy, raw_origin, listener_cert, ca, ca_file, ca_dir, tmp_path, route
):
    """The client sends, then ends its output (TCP FIN, or close_notify on TLS); the
    origin answers after seeing that end.  The answer must reach the client, whose
    end is relayed to the origin as a close_notify (RFC 8446 §6.1)."""
    origin_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(origin_context)
    origin = raw_origin(replies_after_eof(origin_context))
    authority = f"localhost:{origin.port}"
    config = intercepting(tmp_path, ca_dir, ca_file)
    p, tls_port = https_proxy(make_proxy, listener_cert, "--config", config)
    ours = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    for attempt in range(REPEATS):
        sock = socket.create_connection(p.address, timeout=10)
        if route == "absolute-form":
            peer: socket.socket | TLSPeer = sock
            request = upgrade_request(f"https://{authority}/ws", authority)
        else:
            transport: socket.socket | TLSPeer = sock
            if route == "intercepted-in-https-proxy":
                sock.close()
                sock = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
                transport = TLSPeer(sock, ssl.create_default_context(cafile=ca_file), "localhost")
            transport.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            assert recv_until(transport, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
            peer = TLSPeer(transport, ours, "localhost")
            request = upgrade_request("/ws", authority)
        with sock:
            peer.sendall(request)
            head, rest = head_and_rest(recv_until(peer, b"\r\n\r\n"))
            assert head.startswith(b"HTTP/1.1 101"), head
            peer.sendall(b"ping %d" % attempt)
            if isinstance(peer, TLSPeer):
                peer.close_notify()
                answer = peer.recv_until_eof(rest)
            else:
                peer.shutdown(socket.SHUT_WR)
                answer = rest + recv_all(peer)
        assert answer == b"after EOF: ping %d" % attempt, (attempt, answer)
    assert "origin ended the tunnel" not in p.stderr() + "\n".join(p.access_lines())


def test_8_tls_spoken_to_the_plain_listener_gets_an_alert_at_once(proxy):
    hello = bytes.fromhex("160301") + (200).to_bytes(2, "big") + b"\x01" + os.urandom(199)
    started = time.monotonic()
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(hello)
        data = recv_all(sock)
    assert data[:1] == b"\x15"  # a TLS alert record, then the connection closes
    assert time.monotonic() - started < 5  # not the 10 s header deadline
    proxy.log_with("spoke TLS to the plain HTTP proxy listener")


def client_hello(ssl2: bool = False) -> bytes:
    """The first bytes of a ClientHello: a handshake record, or the SSL 2.0 format."""
    if ssl2:
        return bytes([0x80, 46, 0x01, 3, 1]) + os.urandom(44)
    return bytes.fromhex("160301") + (200).to_bytes(2, "big") + b"\x01" + os.urandom(199)


@pytest.mark.parametrize("member", ["ssl2-hello", "after-a-request"])
def test_8_every_tls_hello_on_the_plain_listener_gets_an_alert(proxy, origin, member):
    """Class members: the SSL 2.0-format hello old clients send, and a hello as the
    second message of a kept-alive connection."""
    with socket.create_connection(proxy.address, timeout=10) as sock:
        if member == "after-a-request":
            sock.sendall(f"GET {origin.url}/echo/first HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert status(read_response(sock)) == 200
        sock.sendall(client_hello(ssl2=member == "ssl2-hello"))
        data = recv_all(sock)  # ends: no wait for a head that never comes
    assert data == b"\x15\x03\x01\x00\x02\x02\x28"  # fatal handshake_failure alert
    poll(lambda: "spoke TLS to the plain HTTP proxy listener" in proxy.stderr(), what="log")


def test_8_tls_to_the_plain_listener_points_at_the_https_listener(make_proxy, listener_cert):
    """With an HTTPS listener configured, the log line says to use it, not to make one."""
    p, _ = https_proxy(make_proxy, listener_cert)
    with socket.create_connection(p.address, timeout=10) as sock:
        sock.sendall(client_hello())
        assert recv_all(sock)[:1] == b"\x15"
    text = p.log_with("spoke TLS to the plain HTTP proxy listener")
    assert "the HTTPS listener (tls.listen, named at start-up)" in text
    assert "configure an HTTPS listener" not in text


def test_8_plain_http_to_the_https_listener_gets_a_plain_400(make_proxy, listener_cert, origin):
    p, tls_port = https_proxy(make_proxy, listener_cert)
    request = f"GET {origin.url}/echo/x HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer = raw_request(("127.0.0.1", tls_port), request)
    assert status(answer) == 400
    assert b"use an https:// proxy URL" in answer
    assert re.search(rb"request id: [0-9a-f-]{8,}", answer), answer  # and in the access log
    poll(lambda: any(" 400 " in line for line in p.access_lines()), what="the 400 line")
    line = next(line for line in p.access_lines() if " 400 " in line)
    assert f"GET {origin.url}/echo/x" in line  # the record says what was asked
    poll(lambda: "spoke plain HTTP to the HTTPS proxy listener" in p.stderr(), what="log")
    # curl with an http:// proxy URL aimed at the HTTPS port reads the same page
    curl = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--proxy",
            f"http://127.0.0.1:{tls_port}",
            f"{origin.url}/echo/x",
        ],
        capture_output=True,
    )
    assert b"use an https:// proxy URL" in curl.stdout, curl


@pytest.mark.parametrize("after_a_request", [False, True])
def test_8_a_tls_hello_inside_the_https_listeners_tls_is_answered_at_once(
    make_proxy, listener_cert, ca_file, origin, after_a_request
):
    """TLS inside TLS without a CONNECT: no head will ever end, so a 400 now, not a
    408 after the header deadline (30 s here: longer than the socket's 10 s)."""
    p, tls_port = https_proxy(make_proxy, listener_cert, "--client-header-timeout", "30")
    sock = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
    with sock:
        peer = TLSPeer(sock, ssl.create_default_context(cafile=ca_file), "localhost")
        if after_a_request:
            peer.sendall(f"GET {origin.url}/echo/a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert recv_until(peer, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        peer.sendall(client_hello())
        answer = peer.recv_until_eof()
    assert b"HTTP/1.1 400" in answer and b"a TLS handshake is not an HTTP request" in answer
    poll(lambda: "TLS handshake inside its TLS connection" in p.stderr(), what="log line")


def test_8_a_refused_tls_client_gets_an_alert_not_a_plain_page(make_proxy, listener_cert, ca_file):
    """Over its connection cap, a client of the HTTPS listener is refused in TLS's own
    language (an alert), and the refusal is logged and recorded as 429."""
    p, tls_port = https_proxy(make_proxy, listener_cert, "--client-connections", "1")
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as held:
        TLSPeer(held, context, "localhost")  # holds the client's one connection
        second = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
        with second, pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
            context.wrap_socket(second, server_hostname="localhost")
    poll(lambda: any(" 429 " in line for line in p.access_lines()), what="the 429 line")


def test_1_16_websocket_relays_count_against_the_tunnel_limit(make_proxy, origin):
    p = make_proxy("--client-tunnels", "1")
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = (
        f"GET {origin.url}/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    ).encode()
    with socket.create_connection(p.address, timeout=10) as first:
        first.sendall(upgrade)
        assert recv_until(first, b"\r\n\r\n").startswith(b"HTTP/1.1 101")
        second = raw_request(p.address, upgrade)
        assert status(second) == 429  # before the origin was even asked
    with socket.create_connection(p.address, timeout=10) as third:  # the slot came back
        third.sendall(upgrade)
        deadline = time.monotonic() + 5
        data = recv_until(third, b"\r\n\r\n")
        while status(data) == 429 and time.monotonic() < deadline:
            data = raw_request(p.address, upgrade)
        assert status(data) == 101


# -- 2. body idle measures bytes moved, both ways ------------------------------------------


def test_2_a_slow_upload_with_short_gaps_is_not_cut(make_proxy, origin):
    p = make_proxy("--body-idle-timeout", "1")
    with socket.create_connection(p.address, timeout=10) as sock:
        sock.sendall(
            f"POST {origin.url}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 6000\r\n\r\n".encode()
        )
        for _ in range(15):  # 400 bytes every 0.3 s: 4.5 s in all, no gap near 1 s
            sock.sendall(b"u" * 400)
            time.sleep(0.3)  # the input's own pace, not a synchronisation
        data = read_response(sock)
    assert status(data) == 200 and b'"size": 6000' in data


def test_2_the_head_wait_does_not_count_as_body_idleness(make_proxy, raw_origin):
    def slow(sock: socket.socket) -> None:
        origin.read_head(sock)
        time.sleep(1.2)  # the origin's own pace (the input), not a synchronisation
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        time.sleep(0.6)  # likewise
        sock.sendall(b"hello")

    origin = raw_origin(slow)
    p = make_proxy("--body-idle-timeout", "1")
    data = raw_request(p.address, f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status(data) == 200 and data.endswith(b"hello")


def test_2_a_small_body_trickling_in_streams_and_is_not_cut(make_proxy, raw_origin):
    """A short Content-Length body whose bytes come 0.6 s apart, body_idle 1 s, 3.6 s in
    all: the head goes out at once (as from a direct connection), each byte as it
    comes, and the body is whole; a small body is sent with the head only when it came
    with it."""

    def trickle(sock: socket.socket) -> None:
        origin.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abcdef":
            time.sleep(0.6)  # the origin's own pace (the input), not a synchronisation
            sock.sendall(bytes([byte]))

    origin = raw_origin(trickle)
    p = make_proxy("--body-idle-timeout", "1")
    with socket.create_connection(p.address, timeout=10) as sock:
        sock.sendall(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = recv_until(sock, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert not head.endswith(b"abcdef")  # the head did not wait for the body
        data = head
        while not data.endswith(b"abcdef"):
            chunk = sock.recv(100)
            assert chunk, data
            data += chunk
    assert "body_stalled" not in p.access_entry("/")


def test_2_the_head_wait_starts_when_the_upload_has_left_the_kernel(make_proxy, raw_origin):
    """An upload the kernel buffers take whole looks finished to the proxy while a slow
    origin still reads it: the wait for the response head (upstream_head 1 s) counts
    from when the bytes left, not from the proxy's last write."""
    size = 1536 << 10

    def slow_reader(sock: socket.socket) -> None:
        # a small receive window keeps the upload in the proxy's send queue, where the
        # proxy can see it shrink (an origin's own buffer it cannot see)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        head = origin.read_head(sock)
        assert b"Content-Length: %d" % size in head
        got = len(head.partition(b"\r\n\r\n")[2])  # body bytes read with the head
        while got < size:  # 256 KiB per 0.4 s: the origin's own pace (the input)
            time.sleep(0.4)
            goal = min(size, got + (256 << 10))
            while got < goal:
                got += len(sock.recv(goal - got))
        sock.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")

    origin = raw_origin(slow_reader)
    p = make_proxy("--upstream-head-timeout", "1", "--body-idle-timeout", "1")
    request = (
        f"POST {origin.url}/up HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
    ).encode() + pattern(size)
    data = raw_request(p.address, request)
    assert status(data) == 201, data[:300]
    assert data.endswith(b"ok")


# 2a. Body idle is "no byte moved on the wire": a slow but steady reader or writer behind
# a kernel send buffer of megabytes (autotuned; writable again only once a third of it
# is free) leaves the proxy's own counters still for longer than body_idle.

BIG = 8 << 20
SLOW_PART = 2 << 20  # read slowly: longer than the first wait for a writable buffer
PACE = 0.05  # seconds per 64 KiB: about 1.3 MB/s, the reader's own pace


def take_slowly(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """Everything until the proxy closes, the first `SLOW_PART` bytes 64 KiB at a time."""
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
        if len(data) < SLOW_PART:  # the pace of the reader under test, not a synchronisation
            time.sleep(PACE * len(chunk) / 65536)
    return bytes(data)


def body_of(response: bytes) -> bytes:
    """The body of a response read to the close, de-chunked when chunked."""
    head, _, body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    out = bytearray()
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            return bytes(out)
        out += body[:size]
        body = body[size + 2 :]


def small_receive_buffer() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.settimeout(20)
    return sock


@pytest.mark.parametrize(
    ("query", "version"),
    [("", "HTTP/1.1"), ("&chunked=1", "HTTP/1.1"), ("", "HTTP/1.0")],
    ids=["length", "chunked", "http1.0"],
)
def test_2a_a_slow_steady_reader_gets_the_whole_body(make_proxy, origin, query, version):
    p = make_proxy("--body-idle-timeout", "0.5")
    with small_receive_buffer() as sock:
        sock.connect(p.address)
        sock.sendall(
            f"GET {origin.url}/bytes?n={BIG}{query} {version}\r\nHost: x\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = take_slowly(sock)
    assert status(data) == 200
    assert body_of(data) == pattern(BIG)
    assert "err=" not in p.access_entry("/bytes")


@pytest.mark.parametrize("listener", ["https", "intercepted"])
def test_2a_a_slow_steady_reader_over_tls_gets_the_whole_body(
    make_proxy, listener_cert, tls_origin, ca_file, ca_dir, tmp_path, listener
):
    if listener == "https":
        p, port = https_proxy(
            make_proxy,
            listener_cert,
            "--body-idle-timeout",
            "0.5",
            "--upstream-ca-bundle",
            ca_file,
        )
        target, trust = f"{tls_origin.url}/bytes?n={BIG}", ssl.create_default_context()
    else:
        p = make_proxy(
            "--config", intercepting(tmp_path, ca_dir, ca_file), "--body-idle-timeout", "0.5"
        )
        port, target = p.port, f"/bytes?n={BIG}"
        trust = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    trust.load_verify_locations(ca_file)
    with small_receive_buffer() as raw:
        raw.connect(("127.0.0.1", port))
        if listener == "https":
            sock = trust.wrap_socket(raw, server_hostname="localhost")
        else:
            host = tls_origin.authority
            raw.sendall(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert recv_until(raw, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
            sock = trust.wrap_socket(raw, server_hostname="localhost")
        with sock:
            sock.sendall(
                f"GET {target} HTTP/1.1\r\nHost: {tls_origin.authority}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            data = take_slowly(sock)
    assert status(data) == 200
    assert body_of(data) == pattern(BIG)
    assert "err=" not in p.access_entry("/bytes")


def test_2a_a_slow_steady_reader_keeps_its_connect_tunnel(make_proxy, raw_origin):
    """The same class for tunnel_idle: the relay reads nothing while the send buffer
    to the client is full, yet bytes move."""

    def flood(sock: socket.socket) -> None:
        sock.sendall(pattern(BIG))

    source = raw_origin(flood)
    p = make_proxy("--tunnel-idle-timeout", "0.5")
    with small_receive_buffer() as sock:
        sock.connect(p.address)
        sock.sendall(f"CONNECT {source.authority} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = take_slowly(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert status(head) == 200 and body == pattern(BIG)
    assert "err=" not in p.access_entry("CONNECT")


def test_2a_a_reader_that_stops_is_still_cut(make_proxy, origin):
    p = make_proxy("--body-idle-timeout", "0.5")
    with small_receive_buffer() as sock:
        sock.connect(p.address)
        sock.sendall(f"GET {origin.url}/bytes?n={BIG} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        recv_until(sock, b"\r\n\r\n")  # then reads no more
        line = p.access_entry("err=body_stalled", timeout=20)
    assert "the response body (no byte moved)" in line


def slow_origin_reader(origin_box: list, stop: threading.Event | None = None):
    """An origin handler that reads the request body from a small receive buffer, the
    first `SLOW_PART` bytes 64 KiB at a time, then answers with the size it read; with
    ``stop``, it stops reading after 1 MiB until ``stop`` is set."""

    def handler(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        head, _, got = origin_box[0].read_head(sock).partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        size = len(got)
        while size < length:
            if stop is not None and size >= 1 << 20:
                stop.wait(30)  # until the test has seen the proxy give up
                return
            chunk = sock.recv(65536)
            size += len(chunk)
            if size < SLOW_PART:  # the origin's own pace
                time.sleep(PACE * len(chunk) / 65536)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(size)), size))

    return handler


def test_2a_an_upload_to_a_slow_steady_origin_reader_goes_through(make_proxy, raw_origin):
    box: list = []
    box.append(raw_origin(slow_origin_reader(box)))
    p = make_proxy("--body-idle-timeout", "0.5")
    with socket.create_connection(p.address, timeout=20) as sock:
        sock.sendall(
            f"POST {box[0].url}/up HTTP/1.1\r\nHost: x\r\nContent-Length: {BIG}\r\n\r\n".encode()
        )
        sock.sendall(b"u" * BIG)
        data = read_response(sock)
    assert status(data) == 200 and data.endswith(b"\r\n\r\n%d" % BIG)
    assert "err=" not in p.access_entry("/up")


def test_2a_an_origin_that_stops_reading_an_upload_is_cut_naming_the_request_body(
    make_proxy, raw_origin
):
    box: list = []
    stop = threading.Event()
    box.append(raw_origin(slow_origin_reader(box, stop)))
    p = make_proxy("--body-idle-timeout", "0.5")
    try:
        with socket.create_connection(p.address, timeout=20) as sock:
            sock.sendall(
                f"POST {box[0].url}/up HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {BIG}\r\n\r\n".encode()
            )
            try:
                sock.sendall(b"u" * BIG)
            except OSError:
                pass  # the proxy closed the connection with the body half sent
            line = p.access_entry("err=body_stalled", timeout=20)
    finally:
        stop.set()
    assert "sending the request body (no byte moved)" in line


# 2b. Waiting for 100 Continue is the wait for the response head (RFC 9110 §10.1.1).


def late_continue(origin_box: list):
    def handler(sock: socket.socket) -> None:
        origin_box[0].read_head(sock)
        time.sleep(1.5)  # the origin's pace: longer than body_idle
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = b""
        while len(body) < 5:
            body += sock.recv(5 - len(body))
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)

    return handler


def test_2b_a_late_100_continue_is_not_body_idleness(make_proxy, raw_origin):
    box: list = []
    box.append(raw_origin(late_continue(box)))
    p = make_proxy("--body-idle-timeout", "1")
    with socket.create_connection(p.address, timeout=10) as sock:
        sock.sendall(
            f"POST {box[0].url}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        interim = recv_until(sock, b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(b"hello")
        data = recv_until(sock, b"\r\n\r\nhello", interim.partition(b"\r\n\r\n")[2])
    assert status(data) == 200
    assert "err=" not in p.access_entry(" 200 ")


def test_2b_curl_waiting_for_a_late_100_continue_gets_the_answer(make_proxy, raw_origin):
    box: list = []
    box.append(raw_origin(late_continue(box)))
    p = make_proxy("--body-idle-timeout", "1")
    result = subprocess.run(
        [
            "curl", "-sS", "--max-time", "20", "-x", p.url, "--expect100-timeout", "30",
            "-H", "Expect: 100-continue", "--data-binary", "hello", f"{box[0].url}/",
        ],
        capture_output=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello"


BUFFER_REQUESTS = """
class Buffer:
    def requestheaders(self, flow):
        flow.request.buffer(1 << 20)
"""


def test_2b_an_addon_reading_the_body_answers_100_continue_itself(make_proxy, origin, tmp_path):
    """The proxy reads the body before asking the origin: it sends the 100 the client
    waits for (curl would wait 30 s here, body_idle is 1 s) and the origin gets no
    Expect."""
    addon = tmp_path / "buffer.py"
    addon.write_text(BUFFER_REQUESTS)
    p = make_proxy("--addon", str(addon), "--body-idle-timeout", "1")
    result = subprocess.run(
        [
            "curl", "-sS", "--max-time", "20", "-x", p.url, "--expect100-timeout", "30",
            "-H", "Expect: 100-continue", "--data-binary", "hello", f"{origin.url}/echo/x",
        ],
        capture_output=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert b'"body_len": 5' in result.stdout
    assert b"expect" not in result.stdout.lower()


# -- 3. answers the proxy makes follow the method (RFC 9110 §9.3.2, §6.4.1) ----------------


def dead_origin_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_3_head_to_a_dead_origin_gets_a_bodiless_502_and_the_connection_stays_clean(proxy, origin):
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(f"HEAD {dead_origin_url()}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.sendall(f"GET {origin.url}/echo/next HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = recv_until(sock, b'"/echo/next"')
    first, rest = head_and_rest(data)
    assert status(first) == 502 and b"Content-Length: " in first
    assert rest.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_3_every_refusal_is_bodiless_for_head(make_proxy, origin, tmp_path, method):
    config = tmp_path / "c.toml"
    config.write_text(
        f'[auth.users]\nalice = "{hashed("pw")}"\n[rate_limits]\nclient_rps = 0.01\n'
        "client_burst = 2\n"
        '[[rules]]\nid = "no-deny"\naction = "deny"\nhosts = ["deny.example"]\n'
    )
    p = make_proxy("--config", str(config))
    with socket.create_connection(p.address, timeout=10) as sock:
        sock.sendall(f"{method} {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # 407
        auth = basic("alice", "pw")
        sock.sendall(
            f"{method} http://deny.example/ HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {auth}\r\n\r\n".encode()
        )
        sock.sendall(
            f"{method} {origin.url}/ HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {auth}\r\n\r\n".encode()
        )  # 429, fmt: skip
        data = b""
        for _ in range(3):
            sock.settimeout(10)
            data = recv_until(sock, b"\r\n\r\n", data)
            head, data = head_and_rest(data)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert length > 0
            if method == "GET":
                while len(data) < length:
                    data += sock.recv(65536)
                data = data[length:]
            assert status(head) in (407, 403, 429)
        assert data == b""  # no stray body on the connection for HEAD


ANSWERING = """
class Answer:
    def requestheaders(self, flow):
        status = flow.request.headers.get("x-status")
        if status:
            flow.respond(int(status), {"X-Answered": "yes"}, b"addon body")
"""


@pytest.mark.parametrize(
    ("method", "answer", "body"),
    [
        ("HEAD", 200, b""),
        ("GET", 204, b""),
        ("GET", 304, b""),
        ("GET", 200, b"addon body"),
    ],
)
def test_3_addon_answers_follow_the_method_and_status(
    make_proxy, origin, tmp_path, method, answer, body
):
    addon = tmp_path / "answer.py"
    addon.write_text(ANSWERING)
    p = make_proxy("--addon", str(addon))
    with socket.create_connection(p.address, timeout=10) as sock:
        sock.sendall(
            f"{method} {origin.url}/ HTTP/1.1\r\nHost: x\r\nX-Status: {answer}\r\n\r\n"
            f"GET {origin.url}/echo/after HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        data = recv_until(sock, b'"/echo/after"')
    head, rest = head_and_rest(data)
    assert status(head) == answer and b"X-Answered: yes" in head
    assert rest.startswith(body + b"HTTP/1.1 200")
    if answer in (204, 304):
        assert b"Content-Length" not in head


STATUS_ADDON = """
class Change:
    def requestheaders(self, flow):
        answer = flow.request.headers.get("x-respond")
        if answer:
            flow.respond(int(answer), {}, b"addon body")

    def responseheaders(self, flow):
        if flow.request.headers.get("x-buffer"):
            flow.response.buffer(1 << 20)
        elif flow.request.headers.get("x-to"):
            flow.response.status = int(flow.request.headers.get("x-to"))

    def response(self, flow):
        if flow.response.body is not None and flow.request.headers.get("x-to"):
            flow.response.status = int(flow.request.headers.get("x-to"))
"""


CONNECT_ANSWER = """
class Answer:
    def http_connect(self, flow):
        flow.respond(int(flow.request.headers.get("x-respond")), {"X-A": "1"}, b"not a tunnel")
"""


@pytest.mark.parametrize("answer", [200, 403])
def test_3_an_addon_answer_to_connect_has_no_body_when_it_is_a_2xx(make_proxy, tmp_path, answer):
    """RFC 9110 §9.3.6: after a 2xx to CONNECT the bytes are the tunnel's, so the
    answer carries no body and no length; the connection closes."""
    addon = tmp_path / "connect.py"
    addon.write_text(CONNECT_ANSWER)
    p = make_proxy("--addon", str(addon))
    data = raw_exchange(
        p.address,
        f"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: x\r\nX-Respond: {answer}\r\n\r\n".encode(),
    )
    head, rest = head_and_rest(data)
    assert status(head) == answer and b"X-A: 1" in head
    if answer == 200:
        assert b"Content-Length" not in head and rest == b""
    else:
        assert rest == b"not a tunnel"


@pytest.fixture
def status_proxy(make_proxy, tmp_path) -> ProxyProcess:
    addon = tmp_path / "status.py"
    addon.write_text(STATUS_ADDON)
    return make_proxy("--addon", str(addon))


@pytest.mark.parametrize("to", [204, 304])
@pytest.mark.parametrize(
    ("query", "extra"),
    [("", ""), ("&chunked=1", ""), ("", "X-Buffer: 1\r\n"), ("&n=300000", "")],
    ids=["length", "chunked", "buffered", "large"],
)
def test_3_a_204_or_304_made_by_an_addon_has_no_body_and_the_connection_stays_in_step(
    status_proxy, origin, to, query, extra
):
    with socket.create_connection(status_proxy.address, timeout=10) as sock:
        sock.sendall(
            f"GET {origin.url}/bytes?n=11{query} HTTP/1.1\r\nHost: x\r\nX-To: {to}\r\n"
            f"{extra}\r\nGET {origin.url}/echo/next HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        data = recv_until(sock, b'"/echo/next"')
    head, rest = head_and_rest(data)
    assert status(head) == to
    assert b"Content-Length" not in head and b"Transfer-Encoding" not in head
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
@pytest.mark.parametrize("to", [204, 304])
def test_3_node_keep_alive_agent_reads_an_addon_made_204_or_304_and_the_next(
    status_proxy, origin, tmp_path, to
):
    """The client that reported it: Node's keep-alive agent failed the next request
    with HPE_INVALID_CONSTANT when a body followed the 204."""
    script = tmp_path / "get.js"
    script.write_text(NODE_GETS)
    result = subprocess.run(
        ["node", str(script), str(status_proxy.port), origin.url, str(to)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [f"{to} body=''", "200 body='next'"]


NODE_GETS = """
const http = require('http');
const agent = new http.Agent({keepAlive: true, maxSockets: 1});
const [port, origin, to] = process.argv.slice(2);
function get(path, headers) {
  return new Promise((resolve, reject) => {
    const r = http.request(
      {host: '127.0.0.1', port: +port, path: origin + path, headers, agent},
      (res) => {
        let body = '';
        res.on('data', (d) => body += d);
        res.on('end', () => resolve(`${res.statusCode} body='${body}'`));
      });
    r.on('error', reject);
    r.end();
  });
}
(async () => {
  console.log(await get('/bytes?n=11', {'X-To': to}));
  console.log(await get('/echo/next', {}).then((line) => line.replace(/body='.*'/, "body='next'")));
  agent.destroy();
})().catch((e) => { console.error(e.code, e.message); process.exit(1); });
"""


@pytest.mark.parametrize("interim", [100, 101, 103, 199])
def test_3_an_addon_cannot_make_a_1xx_the_final_response(status_proxy, origin, interim):
    """respond() and the status setter raise (RFC 9110 §15.2); the hook's failure is
    logged and the exchange goes on with the origin's response."""
    status_proxy.expected_errors.append("failed in")
    for name in ("X-Respond", "X-To"):
        data = raw_request(
            status_proxy.address,
            f"GET {origin.url}/echo/x HTTP/1.1\r\nHost: x\r\n{name}: {interim}\r\n\r\n".encode(),
        )
        assert status(data) == 200 and b'"/echo/x"' in data
        assert data.count(b"HTTP/1.1 ") == 1
    status_proxy.log_with(f"status {interim} is interim (1xx)")


def test_3_a_200_made_from_a_204_has_an_empty_delimited_body(status_proxy, origin):
    with socket.create_connection(status_proxy.address, timeout=10) as sock:
        sock.sendall(
            f"GET {origin.url}/status?code=204 HTTP/1.1\r\nHost: x\r\nX-To: 200\r\n\r\n"
            f"GET {origin.url}/echo/next HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        data = recv_until(sock, b'"/echo/next"')
    head, rest = head_and_rest(data)
    assert status(head) == 200 and b"Content-Length: 0\r\n" in head
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"HEAD http://example.com/ HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",  # 431
        b"HEAD http://example.com/" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",  # 414
        b"HEAD http://example.com/ HTTP/1.1\r\nBad Field: x\r\n\r\n",  # 400
        b"HEAD http://example.com/ HTTP/2.0\r\nHost: x\r\n\r\n",  # 505
    ],
    ids=["431", "414", "400", "505"],
)
def test_3_answers_to_heads_the_proxy_could_not_parse_have_no_body_for_head(proxy, request_bytes):
    with socket.create_connection(proxy.address, timeout=10) as sock:
        try:
            sock.sendall(request_bytes)
        except OSError:
            pass  # the proxy may answer and close before reading it all
        data = recv_all(sock)
    head, rest = head_and_rest(data)
    assert status(head) in (400, 414, 431, 505)
    assert b"Content-Length: " in head and b"Connection: close" in head
    assert rest == b""


# -- 4. responses are read as leniently as RFC 9112 lets a proxy read them ----------------

# fault: (the trailer section sent, the trailer forwarded, curl 7.88's exit code direct)
FAULTY_TRAILERS = {
    "whitespace before the colon": (b"X-T : v\r\n", b"X-T: v\r\n", 0),
    "obs-fold": (b"X-T: a\r\n b\r\n", b"X-T: a b\r\n", 0),
    # curl refuses it (43) as it refuses such a line in a head; Chromium ignores it in a
    # head, and the proxy drops it in both, as docs/http.md says.
    "no colon": (b"garbage\r\nX-T: v\r\n", b"X-T: v\r\n", 43),
}


def trailing(trailer: bytes):
    def handler(sock: socket.socket) -> None:
        while True:
            if not handler_origin[0].read_head(sock):
                return
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n"
            )

    handler_origin: list = []
    return handler, handler_origin


@pytest.mark.parametrize("fault", sorted(FAULTY_TRAILERS))
def test_4_response_trailers_are_repaired_like_response_heads(make_proxy, raw_origin, fault):
    sent, forwarded, curl_direct = FAULTY_TRAILERS[fault]
    handler, box = trailing(sent)
    box.append(raw_origin(handler))
    url = f"{box[0].url}/t"
    direct = subprocess.run(["curl", "-sS", "--max-time", "10", url], capture_output=True)
    assert (direct.returncode, direct.stdout) == (curl_direct, b"hello")
    p = make_proxy()
    proxied = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x", p.url, url], capture_output=True
    )
    assert (proxied.returncode, proxied.stdout) == (0, b"hello"), proxied.stderr
    end = b"5\r\nhello\r\n0\r\n" + forwarded + b"\r\n"
    with socket.create_connection(p.address, timeout=10) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 2)
        data = b""
        while data.count(end) < 2:  # both responses whole, one after the other
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 2 and data.endswith(end)
    p.log_with("repaired the response trailers")


def test_4_trailers_of_a_body_buffered_for_an_addon_are_repaired_too(status_proxy, raw_origin):
    handler, box = trailing(b"X-T : v\r\n")
    box.append(raw_origin(handler))
    data = raw_request(
        status_proxy.address,
        f"GET {box[0].url}/t HTTP/1.1\r\nHost: x\r\nX-Buffer: 1\r\n\r\n".encode(),
    )
    head, body = head_and_rest(data)
    assert status(head) == 200 and b"Content-Length: 5" in head and body == b"hello"


def test_4_request_trailers_stay_strict(proxy, origin):
    data = raw_exchange(
        proxy.address,
        f"POST {origin.url}/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\nX-T : v\r\n\r\n".encode(),
    )
    assert status(data) == 400 and data.count(b"HTTP/1.1 ") == 1


# -- 6. interim responses are forwarded, bounded by time and bytes -------------------------


def test_6_twelve_102s_then_the_final_response(proxy, raw_origin):
    def chatty(sock: socket.socket) -> None:
        origin.read_head(sock)
        sock.sendall(b"HTTP/1.1 102 Processing\r\n\r\n" * 12)
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        sock.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")

    origin = raw_origin(chatty)
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        )
        data = recv_until(sock, b"\r\n\r\nok")
    assert data.count(b"HTTP/1.1 102") == 12
    assert b"HTTP/1.1 103" in data and b"Link: </a.css>" in data
    assert b"HTTP/1.1 201" in data


def test_6_an_endless_stream_of_interim_responses_is_bounded(make_proxy, raw_origin):
    def flood(sock: socket.socket) -> None:
        origin.read_head(sock)
        try:
            for _ in range(100_000):
                sock.sendall(b"HTTP/1.1 102 Processing\r\nX-Pad: " + b"p" * 1000 + b"\r\n\r\n")
        except OSError:
            pass

    origin = raw_origin(flood)
    p = make_proxy("--max-header-size", "4096")  # interim heads may total 16 x 4 KiB
    with socket.create_connection(p.address, timeout=10) as sock:
        sock.sendall(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = recv_until(sock, b"interim responses too large")
    assert b"HTTP/1.1 502" in data
    assert data.count(b"HTTP/1.1 102") < 100


# -- 7. Max-Forwards and OPTIONS * (RFC 9110 §7.6.2, RFC 9112 §3.2.4) -----------------------


def test_7_max_forwards_zero_is_answered_by_the_proxy(proxy, raw_origin):
    origin = raw_origin(lambda sock: origin.read_head(sock))
    for method in ("OPTIONS", "TRACE"):
        data = raw_request(
            proxy.address,
            f"{method} {origin.url}/x HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n"
            "Cookie: secret=1\r\nX-Kept: yes\r\n\r\n".encode(),
        )
        head, body = head_and_rest(data)
        assert status(head) == 200, data
        if method == "TRACE":
            assert b"Content-Type: message/http" in head
            assert body.startswith(f"TRACE {origin.url}/x HTTP/1.1".encode())
            assert b"X-Kept: yes" in body and b"secret" not in body
        else:
            assert b"Content-Length: 0" in head
    assert origin.accepted == 0


def test_7_max_forwards_is_counted_down_and_options_star_forwarded(proxy, raw_origin):
    def record(sock: socket.socket) -> None:
        origin.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    origin = raw_origin(record)
    for target in (origin.url, origin.url.upper().replace("HTTP", "http", 1)):
        data = raw_request(
            proxy.address,
            f"OPTIONS {target} HTTP/1.1\r\nHost: x\r\nMax-Forwards: 5\r\n\r\n".encode(),
        )
        assert status(data) == 200
    assert all(r.startswith(b"OPTIONS * HTTP/1.1\r\n") for r in origin.requests)
    assert all(b"Max-Forwards: 4\r\n" in r for r in origin.requests)
    bad = raw_request(
        proxy.address,
        f"TRACE {origin.url}/ HTTP/1.1\r\nHost: x\r\nMax-Forwards: x\r\n\r\n".encode(),
    )
    assert status(bad) == 400


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
def test_7_a_connection_option_naming_max_forwards_does_not_defeat_it(proxy, raw_origin, method):
    """RFC 9110 §7.6.2: every intermediary MUST update Max-Forwards before forwarding;
    naming it in Connection (which §7.6.1 forbids for such a field) changes nothing."""

    def record(sock: socket.socket) -> None:
        origin.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    origin = raw_origin(record)
    for connection in ("Max-Forwards", "keep-alive, max-forwards"):
        data = raw_request(
            proxy.address,
            f"{method} {origin.url}/x HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n"
            "Max-Forwards: 3\r\n\r\n".encode(),
        )
        assert status(data) == 200
        assert b"Max-Forwards: 2\r\n" in origin.requests[-1], origin.requests[-1]
    answered = raw_request(
        proxy.address,
        f"{method} {origin.url}/x HTTP/1.1\r\nHost: x\r\nConnection: Max-Forwards\r\n"
        "Max-Forwards: 0\r\n\r\n".encode(),
    )
    assert status(answered) == 200 and len(origin.requests) == 2  # the proxy answered


@pytest.mark.parametrize(
    ("framing", "body"),
    [("Content-Length: 5", "hello"), ("Transfer-Encoding: chunked", "5\r\nhello\r\n0\r\n\r\n")],
)
def test_7_connection_options_cannot_remove_the_fields_the_proxy_acts_on(
    proxy, origin, framing, body
):
    """Host comes from the target, the body keeps its framing, whatever Connection names."""
    data = raw_request(
        proxy.address,
        f"POST {origin.url}/echo/c HTTP/1.1\r\nHost: elsewhere\r\n"
        f"Connection: host, content-length, transfer-encoding\r\n{framing}\r\n\r\n{body}".encode(),
    )
    assert status(data) == 200 and b'"body_len": 5' in data
    assert f'["Host", "{origin.authority}"]'.encode() in data


def test_7_an_expect_named_by_connection_is_met_by_the_proxy(proxy, origin):
    """The option makes the expectation this hop's and keeps it from the origin, so the
    proxy sends the 100 (Continue) the client waits for."""
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(
            f"POST {origin.url}/echo/e HTTP/1.1\r\nHost: x\r\nConnection: expect\r\n"
            "Expect: 100-continue\r\nContent-Length: 5\r\n\r\n".encode()
        )
        interim = recv_until(sock, b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        data = read_response(sock)
    assert status(data) == 200 and b'"body_len": 5' in data
    assert b"xpect" not in data  # the origin got no Expect


# -- 9. requests aimed at the proxy itself, in every spelling -------------------------------


def test_9_the_proxy_and_its_admin_listener_are_refused_in_every_spelling(tmp_path):
    p = ProxyProcess(tmp_path, "--allow-private", "--connect-port", "1-65535")
    try:
        admin_port = int(p.admin_url.rsplit(":", 1)[1])
        for host in (
            "0.0.0.0",
            "[::ffff:0.0.0.0]",
            "127.0.0.1",
            "[::ffff:127.0.0.1]",
            "localhost",
            "0",
        ):
            for port in (admin_port, p.port):
                data = raw_request(
                    p.address,
                    f"GET http://{host}:{port}/api/flows HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                )
                assert status(data) in (400, 403), (host, port, data[:200])
                assert b"/api/flows" not in data.split(b"\r\n\r\n", 1)[1][:20]
        for target in (f"0.0.0.0:{p.port}", f"[::]:{admin_port}", f"127.0.0.1:{p.port}"):
            data = raw_request(p.address, f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert status(data) == 403, (target, data[:200])
            assert b"proxy_loop_detected" in data
    finally:
        p.stop()
    p.check_clean()


def test_9_an_admin_on_ipv6_loopback_is_protected_from_the_unspecified_address(tmp_path):
    p = ProxyProcess(tmp_path, "--allow-private", "--admin-listen", "[::1]:0")
    try:
        admin_port = int(p.admin_url.rsplit(":", 1)[1])
        data = raw_request(
            p.address,
            f"GET http://[::]:{admin_port}/api/flows HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        )
        assert status(data) == 403 and b"proxy_loop_detected" in data
    finally:
        p.stop()
    p.check_clean()


# -- 10. pre-auth retention is bounded --------------------------------------------------------


def test_10_refused_heads_do_not_accumulate_in_memory_or_on_disk(make_proxy, tmp_path):
    config = tmp_path / "auth.toml"
    config.write_text(f'[auth.users]\nalice = "{hashed("pw")}"\n')
    p = make_proxy("--config", str(config), "--client-rps", "0")
    fields = "".join(f"{i:x}:v\r\n" for i in range(7_900))  # ~58 KB: 7,900 short fields
    request = f"GET http://example.com/ HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode()
    assert len(request) > 55_000
    raw_request(p.address, request)
    before = p.rss()
    for _ in range(240):
        assert status(raw_request(p.address, request)) == 407
    growth = p.rss() - before
    assert growth < 24 << 20, f"RSS grew by {growth / 2**20:.1f} MiB for 240 refused heads"
    with httpx.Client(timeout=10, trust_env=False) as admin:
        flows = admin.get(p.admin_url + "/api/flows?limit=1").json()["flows"]
        detail = admin.get(p.admin_url + f"/api/flows/{flows[0]['id']}").json()
    headers = detail["request"]["headers"]
    assert len(headers) < 600
    assert headers[-1][0] == "X-Eyewall-Omitted"


# -- 11. authentication under attack ----------------------------------------------------------


def test_11_a_guesser_is_locked_out_whatever_the_password(make_proxy, origin, tmp_path):
    config = tmp_path / "auth.toml"
    config.write_text(f'[auth.users]\nalice = "{hashed("right")}"\n')
    p = make_proxy("--config", str(config))
    url = f"{origin.url}/echo/x"
    for i in range(5):
        data = raw_request(
            p.address,
            f"GET {url} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic('alice', f'guess{i}')}\r\n\r\n".encode(),
        )
        assert status(data) == 407
    locked = raw_request(
        p.address,
        f"GET {url} HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: {basic('alice', 'right')}\r\n\r\n".encode(),
    )
    assert status(locked) == 429 and b"Retry-After: " in locked
    assert b"too many failed logins" in locked
    line = p.access_entry("err=rate_limited")
    assert "rule=login-throttle" in line
    p.log_with("for user alice: ")
    with httpx.Client(timeout=10, trust_env=False) as admin:
        metrics = admin.get(p.admin_url + "/metrics").text
    assert 'eyewall_auth_failures_total{reason="wrong"} 5.0' in metrics
    assert 'eyewall_auth_failures_total{reason="throttled"} 1.0' in metrics


def test_11_clients_that_hang_up_cost_no_bcrypt_check(make_proxy, origin, tmp_path):
    """60 made-up logins from 60 addresses, each hanging up at once, then a real user."""
    config = tmp_path / "auth.toml"
    config.write_text(
        f'[auth.users]\nalice = "{bcrypt.hashpw(b"right", bcrypt.gensalt(10)).decode()}"\n'
        '[access]\nallow_clients = ["127.0.0.0/8"]\n'
    )
    p = make_proxy("--config", str(config))
    for i in range(60):
        with socket.socket() as s:
            s.bind((f"127.0.0.{10 + i}", 0))
            s.connect(p.address)
            s.sendall(
                f"GET http://example.com/ HTTP/1.1\r\nHost: x\r\n"
                f"Proxy-Authorization: {basic(f'u{i}', 'x')}\r\n\r\n".encode()
            )
    data = raw_request(
        p.address,
        f"GET {origin.url}/echo/real HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: {basic('alice', 'right')}\r\n\r\n".encode(),
    )
    assert status(data) == 200
    with httpx.Client(timeout=10, trust_env=False) as admin:
        metrics = admin.get(p.admin_url + "/metrics").text
    skipped = float(metrics.split('eyewall_login_checks_total{result="skipped"} ')[1].split()[0])
    assert skipped > 0  # made-up logins whose clients had left were never hashed


# -- 12. a malformed body ends the connection (no desync) ------------------------------------


def test_11_a_half_closed_client_with_a_new_login_gets_its_answer(make_proxy, origin, tmp_path):
    """Shutting down the sending side after the request is legal (RFC 9112 §9.6); on an
    idle proxy the login is checked and the response delivered, not a 503."""
    config = tmp_path / "auth.toml"
    config.write_text(f'[auth.users]\nalice = "{hashed("pw")}"\n')
    p = make_proxy("--config", str(config))
    with socket.create_connection(p.address, timeout=10) as s:
        s.sendall(
            f"GET {origin.url}/echo/half HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Proxy-Authorization: {basic('alice', 'pw')}\r\n\r\n".encode()
        )
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s)
    assert status(answer) == 200 and b"/echo/half" in answer


@pytest.mark.parametrize(
    "body",
    [
        b"4\r\nabcdXX0\r\n\r\n",  # chunk data not followed by CRLF
        b"0x4\r\nabcd\r\n0\r\n\r\n",  # a size line in another notation
        b"fffffffffffffffff\r\n",  # a size beyond 64 bits
        b"4;" + b"e" * 5000 + b"\r\nabcd\r\n0\r\n\r\n",  # a size line too long
        b"-1\r\n",
    ],
)
def test_12_after_a_malformed_chunked_body_the_next_request_never_reaches_the_origin(
    proxy, raw_origin, body
):
    def record(sock: socket.socket) -> None:
        while chunk := sock.recv(65536):
            origin.requests.append(chunk)

    origin = raw_origin(record)
    smuggled = f"GET {origin.url}/smuggled HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(
            f"POST {origin.url}/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + body
            + smuggled
        )
        data = recv_all(sock)
    assert status(data) == 400 and data.count(b"HTTP/1.1 ") == 1
    assert b"Connection: close" in data
    assert not any(b"/smuggled" in chunk for chunk in origin.requests)


# -- 13. method names are case-sensitive; case-variants of registered ones refused ------------


def test_13_case_variants_of_registered_methods_are_refused(make_proxy, origin, tmp_path):
    config = tmp_path / "rules.toml"
    config.write_text(
        '[[rules]]\nid = "ro"\naction = "deny"\nmethods = ["DELETE", "PUT", "brew"]\n'
    )
    p = make_proxy("--config", str(config))
    for method in ("delete", "Delete", "put", "head", "cOnNeCt"):
        data = raw_request(
            p.address, f"{method} {origin.url}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        assert status(data) == 400, method
        assert method.upper().encode() in data  # names the registered spelling
    for method in ("DELETE", "BREW", "brew"):
        data = raw_request(
            p.address, f"{method} {origin.url}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        assert status(data) == 403, method  # rules match methods whatever their case
    ok = raw_request(p.address, f"PROPFIND {origin.url}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status(ok) == 200


# -- 14, 15, 16. interception: pinning per client, auth inside, tunnel limits --------------


def curl_through(
    p: ProxyProcess, url: str, cacert: str, *extra: str, source: str = ""
) -> subprocess.CompletedProcess[bytes]:
    command = ["curl", "-sS", "--max-time", "10", "--cacert", cacert, "-x", p.url, *extra, url]
    if source:
        command[1:1] = ["--interface", source]
    return subprocess.run(command, capture_output=True)


def test_14_one_client_refusing_interception_does_not_turn_it_off_for_others(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path
):
    p = make_proxy(
        "--config",
        intercepting(tmp_path, ca_dir, ca_file),
        "--passthrough-pinned",
        "--allow-client",
        "127.0.0.0/8",
    )
    refused = curl_through(p, f"{tls_origin.url}/echo/a", ca_file, source="127.0.0.2")
    assert refused.returncode == 60
    p.log_with("will be tunnelled without interception")
    pinned = curl_through(p, f"{tls_origin.url}/echo/a", ca_file, source="127.0.0.2")
    assert pinned.returncode == 0  # that client now gets the origin's own certificate
    other = curl_through(p, f"{tls_origin.url}/echo/b", str(ca_dir / "ca.pem"), source="127.0.0.3")
    assert other.returncode == 0, other.stderr  # still intercepted for everyone else
    assert " 200 " in p.access_entry("/echo/b")
    # a reload forgets the pin (the client may trust the CA now): intercepted again
    p.signal(signal.SIGHUP)
    p.log_with("intercepting again the 1 host(s)")
    again = curl_through(p, f"{tls_origin.url}/echo/c", ca_file, source="127.0.0.2")
    assert again.returncode == 60


def test_14_one_user_refusing_interception_does_not_turn_it_off_for_another_at_that_address(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path
):
    """The pin is kept per (source, user, host): alice and bob share 127.0.0.1."""
    config = intercepting(tmp_path, ca_dir, ca_file)
    text = Path(config).read_text()
    Path(config).write_text(
        f'[auth.users]\nalice = "{hashed("a")}"\nbob = "{hashed("b")}"\n' + text
    )
    p = make_proxy("--config", config, "--passthrough-pinned")
    url = f"{tls_origin.url}/echo/pin"
    alice, bob = ("--proxy-user", "alice:a"), ("--proxy-user", "bob:b")
    assert curl_through(p, url, ca_file, *alice).returncode == 60  # refuses our certificate
    p.log_with("for user 'alice' at 127.0.0.1 for an hour")
    assert curl_through(p, url, ca_file, *alice).returncode == 0  # alice: passed through
    inspected = curl_through(p, url, str(ca_dir / "ca.pem"), *bob)  # trusts only our CA
    assert inspected.returncode == 0, inspected.stderr  # so bob is still intercepted
    assert "user=bob" in p.access_entry("GET https://" + tls_origin.authority)


def test_15_requests_inside_an_authenticated_intercepted_tunnel_inherit_its_user(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path
):
    config = intercepting(tmp_path, ca_dir, ca_file)
    text = Path(config).read_text()
    Path(config).write_text(
        f'[auth.users]\nalice = "{hashed("pw")}"\n'
        '[[rules]]\nid = "ro"\naction = "deny"\nmethods = ["POST"]\nusers = ["alice"]\n' + text
    )
    p = make_proxy("--config", config)
    ok = curl_through(
        p, f"{tls_origin.url}/echo/in", str(ca_dir / "ca.pem"), "--proxy-user", "alice:pw"
    )
    assert ok.returncode == 0, ok.stderr
    assert b'"/echo/in"' in ok.stdout
    denied = curl_through(
        p,
        f"{tls_origin.url}/echo/post",
        str(ca_dir / "ca.pem"),
        "--proxy-user",
        "alice:pw",
        "-d",
        "x",
        "-w",
        "%{http_code}",
    )
    assert denied.stdout.endswith(b"403")
    assert "user=alice" in p.access_entry("/echo/in")
    assert "user=alice" in p.access_entry("/echo/post")  # refusals name the user too


def test_15_removing_a_user_ends_what_they_have_open(
    make_proxy, origin, tls_origin, ca_file, ca_dir, tmp_path
):
    """Revocation: the user file loses alice while a rule still names her. The reload
    applies (a warning, not a refusal), her opaque tunnel is closed, and her
    intercepted tunnel answers its next request with 407 and closes."""
    users = tmp_path / "htpasswd"
    users.write_text(f"alice:{hashed('pw')}\nbob:{hashed('pw')}\n")
    config = intercepting(tmp_path, ca_dir, ca_file, f'[auth]\nhtpasswd = "{users}"\n')
    text = Path(config).read_text()
    Path(config).write_text(text + '[[rules]]\nid = "a"\naction = "allow"\nusers = ["alice"]\n')
    p = make_proxy("--config", config, "--connect-port", "1024-65535")
    login = f"Proxy-Authorization: {basic('alice', 'pw')}\r\n"
    opaque = socket.create_connection(p.address, timeout=10)
    opaque.sendall(f"CONNECT {origin.authority} HTTP/1.1\r\n{login}\r\n".encode())
    assert recv_until(opaque, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    host = tls_origin.url.split("//")[1]
    inner = socket.create_connection(p.address, timeout=10)
    inner.sendall(f"CONNECT {host} HTTP/1.1\r\n{login}\r\n".encode())
    assert recv_until(inner, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    tls = context.wrap_socket(inner, server_hostname="localhost")
    ask = f"GET /echo/x HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    tls.sendall(ask)
    assert status(read_response(tls)) == 200
    users.write_text(f"bob:{hashed('pw')}\n")  # the watcher reloads the user file
    p.expected_errors.append("no user 'alice'")
    p.log_with("configuration reloaded", timeout=15)
    assert "reload refused" not in p.stderr()
    assert "rules[1].users: no user 'alice' in the user file" in p.stderr()
    assert recv_all(opaque) == b""  # closed by the proxy
    tls.sendall(ask)
    assert status(read_response(tls)) == 407
    assert recv_all(tls) == b""
    assert "err=auth_required" in p.access_entry(f"CONNECT {origin.authority}")
    bob = f"Proxy-Authorization: {basic('bob', 'pw')}\r\n"
    again = raw_request(
        p.address, f"GET {origin.url}/echo HTTP/1.1\r\nHost: x\r\n{login}\r\n".encode()
    )
    assert status(again) == 407
    for s in (opaque, tls):
        s.close()
    assert (
        status(
            raw_request(
                p.address, f"GET {origin.url}/echo HTTP/1.1\r\nHost: x\r\n{bob}\r\n".encode()
            )
        )
        == 200
    )


def intercepted_socket(p: ProxyProcess, authority: str, ca_dir: Path) -> ssl.SSLSocket:
    """A TLS connection to the proxy's interception of ``authority`` (raw CONNECT)."""
    sock = socket.create_connection(p.address, timeout=10)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert recv_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    return context.wrap_socket(sock, server_hostname=authority.rsplit(":", 1)[0])


@pytest.mark.parametrize("host_field", ["localhost", "localhost:{port}", "LocalHost:{port}"])
def test_15_inner_requests_are_recorded_with_the_tunnels_port(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path, host_field
):
    """A Host field without a port names 443: the URL recorded and the Host sent on
    carry the port the CONNECT named."""
    p = make_proxy("--config", intercepting(tmp_path, ca_dir, ca_file))
    port = tls_origin.port
    with intercepted_socket(p, tls_origin.authority, ca_dir) as tls:
        host = host_field.format(port=port)
        tls.sendall(f"GET /echo/inner HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        response = read_response(tls)
    assert status(response) == 200
    assert f'["Host", "localhost:{port}"]' in response.decode()
    assert f"https://localhost:{port}/echo/inner" in p.access_entry("/echo/inner")


def test_16_intercepted_tunnels_count_against_the_tunnel_limit(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path
):
    p = make_proxy("--config", intercepting(tmp_path, ca_dir, ca_file), "--client-tunnels", "1")
    context = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    host = tls_origin.url.split("//")[1]
    with socket.create_connection(p.address, timeout=10) as held:
        held.sendall(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert recv_until(held, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        tls = context.wrap_socket(held, server_hostname="localhost")
        second = raw_request(p.address, f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert status(second) == 429
        tls.close()


def connect_status(p: ProxyProcess, authority: str) -> int:
    """The status of the proxy's answer to a CONNECT (the connection is then closed)."""
    with socket.create_connection(p.address, timeout=10) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        return status(recv_until(sock, b"\r\n\r\n"))


def test_16_a_websocket_inside_an_intercepted_tunnel_counts_once(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path
):
    """The CONNECT's tunnel slot covers the WebSocket relay it becomes."""
    p = make_proxy("--config", intercepting(tmp_path, ca_dir, ca_file), "--client-tunnels", "1")
    trust = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))

    async def talk() -> tuple[str | bytes, int]:
        url = tls_origin.url.replace("https://", "wss://") + "/ws"
        async with connect(url, proxy=p.url, ssl=trust) as ws:
            await ws.send("hello")
            reply = await ws.recv()
            other = await asyncio.to_thread(connect_status, p, tls_origin.authority)
            return reply, other

    assert asyncio.run(talk()) == ("hello", 429)  # the one slot is the WebSocket's
    deadline = time.monotonic() + 5
    again = connect_status(p, tls_origin.authority)
    while again == 429 and time.monotonic() < deadline:  # released when the relay closes
        again = connect_status(p, tls_origin.authority)
    assert again == 200
    assert " 101 " in p.access_entry("/ws")


def test_16_one_client_cannot_take_every_connection_slot_by_default(proxy):
    held = []
    try:
        for _ in range(256):
            s = socket.create_connection(proxy.address, timeout=10)
            s.sendall(b"GET http://a/ HTTP/1.1\r\n")  # a head begun, never finished
            held.append(s)
        data = raw_request(proxy.address, b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
        assert status(data) == 429 and b"client_connections" in data
    finally:
        for s in held:
            s.close()


# -- 17. secrets and files --------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "squid", "common", "combined", "json"])
def test_17_user_names_cannot_forge_access_lines(make_proxy, tmp_path, log_format):
    config = tmp_path / "auth.toml"
    config.write_text(f'[auth.users]\nalice = "{hashed("pw")}"\n')
    p = make_proxy("--config", str(config), "--log-format", log_format)
    forged = "eve\n2026-11-30T00:00:00.000Z 10.0.0.1:1 x-1 GET http://forged/ 200"
    raw_request(
        p.address,
        f"GET http://example.com/ HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: {basic(forged, 'x')}\r\n\r\n".encode(),
    )
    lines = p.access_lines(wait_for=1)
    assert len(lines) == 1, lines
    assert "http://forged/" not in lines[0] or "\\x0a" in lines[0] or "\\n" in lines[0]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_17_line_separators_do_not_split_access_lines(make_proxy, tmp_path, log_format):
    """Readers that split at U+2028, U+0085 or at DEL (Python's splitlines, JavaScript)
    must see one line too: the JSON format escapes every non-ASCII character."""
    config = tmp_path / "auth.toml"
    config.write_text(f'[auth.users]\nalice = "{hashed("pw")}"\n')
    p = make_proxy("--config", str(config), "--log-format", log_format)
    for n, separator in enumerate(("\u2028", "\x85", "\x7f", "\u2029")):
        raw_request(
            p.address,
            f"GET http://example.com/{n} HTTP/1.1\r\nHost: x\r\n"
            f"Proxy-Authorization: {basic('eve' + separator + 'forged', 'x')}\r\n\r\n".encode(),
        )
    lines = p.access_lines(wait_for=4)
    text = p.access_path.read_text(encoding="utf-8")
    assert len(lines) == 4 and len(text.splitlines()) == 4, text
    if log_format == "json":
        assert [json.loads(line)["user"] for line in lines] == [
            "eve\u2028forged",
            "eve\x85forged",
            "eve\x7fforged",
            "eve\u2029forged",
        ]


def test_17_a_user_name_cannot_move_the_address_a_log_watcher_reads(make_proxy, tmp_path):
    config = tmp_path / "auth.toml"
    config.write_text(f'[auth.users]\nalice = "{hashed("pw")}"\n')
    p = make_proxy("--config", str(config))
    forged = "x' from 203.0.113.9 for user y: wrong\nauthentication failed from 203.0.113.9 for"
    raw_request(
        p.address,
        f"GET http://example.com/ HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: {basic(forged, 'x')}\r\n\r\n".encode(),
    )
    p.log_with("authentication failed from")
    [line] = [x for x in p.stderr().splitlines() if "authentication failed" in x]
    # What a fail2ban filter would read: the first address after the fixed text.
    assert re.findall(r"authentication failed from (\S+) for user", line) == ["127.0.0.1"]
    assert "203.0.113.9" in line  # the forged text is there, escaped, after the address


def test_10_an_over_long_user_name_is_never_checked_logged_or_recorded(make_proxy, tmp_path):
    config = tmp_path / "auth.toml"
    config.write_text(f'[auth.users]\nalice = "{hashed("pw")}"\n')
    p = make_proxy("--config", str(config))
    huge = "u" + "A" * 45_000
    data = raw_request(
        p.address,
        f"GET http://example.com/ HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: {basic(huge, 'pw')}\r\n\r\n".encode(),
    )
    assert status(data) == 407
    line = p.access_entry(" 407 ")
    assert len(line) < 1000 and "AAAA" not in line
    assert "AAAA" not in p.stderr()
    with httpx.Client(timeout=10, trust_env=False) as admin:
        assert "AAAA" not in admin.get(p.admin_url + "/api/flows").text


def test_17_an_admin_token_with_a_space_logs_in_and_the_cookie_is_not_the_token(make_proxy):
    p = make_proxy("--admin-token", "open sesame")
    with httpx.Client(timeout=10, trust_env=False, follow_redirects=False) as c:
        assert c.get(p.admin_url + "/api/flows").status_code == 401
        login = c.get(p.admin_url + "/login", params={"token": "open sesame"})
        assert login.status_code == 302
        cookie = login.cookies.get("eyewall_admin")
        assert cookie and "sesame" not in cookie
        assert c.get(p.admin_url + "/api/flows").status_code == 200
    with httpx.Client(timeout=10, trust_env=False) as anonymous:
        assert anonymous.get(p.admin_url + "/healthz").status_code == 200
    unauthorized = httpx.get(p.admin_url + "/api/stats", timeout=10, trust_env=False)
    assert unauthorized.status_code == 401 and "/login" in unauthorized.text
    for scheme in ("Bearer", "bearer", "BEARER"):  # case-insensitive (RFC 9110 §11.1)
        authorized = httpx.get(
            p.admin_url + "/api/stats",
            headers={"Authorization": f"{scheme} open sesame"},
            timeout=10,
            trust_env=False,
        )
        assert authorized.status_code == 200, scheme
    # Metrics reveal no traffic: a scraper on this host needs no token even with one set.
    assert httpx.get(p.admin_url + "/metrics", timeout=10, trust_env=False).status_code == 200
    assert "sesame" not in p.stderr()


def test_17_log_and_pid_files_are_not_world_readable(make_proxy, tmp_path):
    pid_file = tmp_path / "eyewall.pid"
    p = make_proxy("--pid-file", str(pid_file))
    raw_request(p.address, b"GET http://example.invalid/ HTTP/1.1\r\nHost: x\r\n\r\n")
    p.access_lines(wait_for=1)
    for path in (p.access_path, pid_file):
        assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0, path


def test_17_addon_files_others_can_write_are_refused(tmp_path):
    addon = tmp_path / "addon.py"
    addon.write_text("class A:\n    def request(self, flow):\n        pass\n")
    addon.chmod(0o664)
    result = eyewall("--listen", "127.0.0.1:0", "--admin-listen", "off", "--addon", str(addon))
    assert result.returncode != 0
    assert b"writable by group or others" in result.stderr


def test_17_origin_credentials_in_a_target_never_reach_logs_or_records(make_proxy):
    p = make_proxy()
    data = raw_request(
        p.address, b"GET http://user:hunter2@example.com/ HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status(data) == 400
    line = p.access_entry(" 400 ")
    assert "hunter2" not in line
    with httpx.Client(timeout=10, trust_env=False) as admin:
        assert "hunter2" not in admin.get(p.admin_url + "/api/flows").text
    assert "hunter2" not in p.stderr()


@pytest.mark.parametrize("log_format", ["json", "text", "squid", "combined"])
def test_17_credentials_in_a_query_never_reach_the_access_log(make_proxy, origin, log_format):
    p = make_proxy("--log-format", log_format)
    query = "x=1&access_token=t0k3n&X-Amz-Signature=s1g&token=abc123"
    url = f"{origin.url}/echo/q;jsessionid=j5e55?{query}"
    referer = "http://other.example/?access_token=r3f3r3r"
    data = raw_request(
        p.address, f"GET {url} HTTP/1.1\r\nHost: x\r\nReferer: {referer}\r\n\r\n".encode()
    )
    assert status(data) == 200
    line = p.access_entry("/echo/q")
    assert "x=1" in line and "[redacted]" in line, line
    for secret in ("t0k3n", "s1g", "abc123", "j5e55", "r3f3r3r"):
        assert secret not in line, line


def test_17_metrics_and_health_need_no_token_on_the_default_loopback_admin(proxy):
    with httpx.Client(timeout=10, trust_env=False) as c:
        assert c.get(proxy.admin_url + "/metrics").status_code == 200
        assert c.get(proxy.admin_url + "/healthz").status_code == 200


# -- 18. found by reading the code, verified with the real proxy -----------------------------


def test_18_a_reload_keeps_connection_counts(make_proxy, tmp_path):
    config = tmp_path / "limits.toml"
    config.write_text("[rate_limits]\nclient_connections = 2\n")
    p = make_proxy("--config", str(config))
    held = [socket.create_connection(p.address, timeout=10) for _ in range(2)]
    for s in held:
        s.sendall(b"GET http://a/ HTTP/1.1\r\n")
    try:
        p.signal(signal.SIGHUP)
        p.log_with("configuration reloaded")
        data = raw_request(p.address, b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
        assert status(data) == 429
    finally:
        for s in held:
            s.close()


SLOW_POLICY = """
import asyncio

class Slow:
    async def requestheaders(self, flow):
        await asyncio.sleep(3600)  # a hook that never ends (the input)
"""


def test_18_a_slow_policy_hook_fails_as_an_addon_never_as_the_origin(make_proxy, origin, tmp_path):
    addon = tmp_path / "slow.py"
    addon.write_text(SLOW_POLICY)
    p = make_proxy(
        "--policy-addon",
        str(addon),
        "--addon-hook-timeout",
        "0.3",
        "--upstream-head-timeout",
        "0.1",
    )
    p.expected_errors.append("took longer than timeouts.addon_hook")
    data = raw_request(p.address, f"GET {origin.url}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status(data) == 502 and b"addon_failed" in data
    assert "err=addon_failed" in p.access_entry("/echo")


def test_18_a_reload_applies_a_new_addon_hook_limit(make_proxy, origin, tmp_path):
    """timeouts.addon_hook is read anew by a reload, as every timeout is."""
    addon = tmp_path / "slow.py"
    addon.write_text(SLOW_POLICY)
    config = tmp_path / "hooks.toml"
    config.write_text(f'policy_addons = ["{addon}"]\n[timeouts]\naddon_hook = 60\n')
    p = make_proxy("--config", str(config))
    p.expected_errors.append("took longer than timeouts.addon_hook")
    config.write_text(f'policy_addons = ["{addon}"]\n[timeouts]\naddon_hook = 0.3\n')
    p.signal(signal.SIGHUP)
    p.log_with("configuration reloaded")
    data = raw_request(p.address, f"GET {origin.url}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status(data) == 502 and b"addon_failed" in data
    assert "timeouts.addon_hook (0.3 s)" in p.log_with("timeouts.addon_hook")


def test_18_the_certificate_cache_survives_concurrent_minting(ca_dir):
    from eyewall.tls.ca import CertificateAuthority
    from eyewall.tls.leaves import LeafCache

    cache = LeafCache(CertificateAuthority.load(ca_dir), size=16)
    errors: list[BaseException] = []

    def mint(worker: int) -> None:
        try:
            for i in range(60):
                cache.context(f"h{(worker * 7 + i) % 40}.example")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=mint, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    assert errors == [] and len(cache) <= 16
