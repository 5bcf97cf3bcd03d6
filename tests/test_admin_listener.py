"""The admin listener's own connection bounds, in-process over real sockets: a client
that never finishes a request head (a TLS ClientHello, or nothing) is closed after the
admin's idle limit, not held for Tornado's default hour."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from eyewall.config import Endpoint
from eyewall.dashboard.app import AdminServer
from eyewall.observe.live import LiveFeed

HELLO = bytes.fromhex("160301") + (200).to_bytes(2, "big") + b"\x01" + os.urandom(199)


def exchange(first: bytes, idle: float = 0.3, token: str = "") -> bytes:
    """What an admin listener (idle limit ``idle`` seconds) answers to ``first``, read
    until it closes (a socket timeout of 10 s fails the test)."""

    async def main() -> bytes:
        live = LiveFeed(dict, list)
        admin = AdminServer(None, None, None, live, Endpoint("127.0.0.1", 0), token)  # type: ignore[arg-type]
        admin.idle = idle
        host, port = admin.start()[0]
        loop = asyncio.get_running_loop()
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(first)
                answer = b""
                while chunk := await loop.run_in_executor(None, sock.recv, 65536):
                    answer += chunk
                return answer
        finally:
            await admin.stop()

    return asyncio.run(main())


@pytest.mark.parametrize(
    "first",
    [b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b""],  # a head never finished
    ids=["partial-head", "nothing"],
)
def test_a_connection_without_a_whole_head_is_closed_at_the_idle_limit(first):
    assert exchange(first) == b""


@pytest.mark.parametrize("first", [HELLO, HELLO[:1]], ids=["hello", "one-byte"])
def test_tls_spoken_to_the_admin_listener_gets_an_alert_at_once(first, caplog):
    # an idle limit beyond the socket's 10 s timeout: only the alert ends this in time
    assert exchange(first, idle=30) == b"\x15\x03\x01\x00\x02\x02\x28"
    assert "spoke TLS to the admin listener" in caplog.text


def test_plain_http_is_still_served_after_the_first_bytes_are_looked_at():
    answer = exchange(b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404"), answer[:100]


@pytest.mark.parametrize("host", ["[", "[::1", "a]", "[zz]", "[::1]x"])
@pytest.mark.parametrize("path", ["/healthz", "/api/flows", "/login?token=s3cret-token"])
def test_a_host_that_is_no_host_is_refused_and_no_token_is_logged(host, path, caplog):
    """403 (the DNS-rebinding guard), not a 500; and nothing logged repeats the query
    (the token) or the headers."""
    caplog.set_level("DEBUG")
    answer = exchange(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer s3cret-token\r\n"
        "Connection: close\r\n\r\n".encode(),
        token="s3cret-token",
    )
    assert answer.startswith(b"HTTP/1.1 403"), answer[:100]
    assert "s3cret" not in caplog.text
    assert "Traceback" not in caplog.text
