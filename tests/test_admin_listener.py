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


@pytest.mark.parametrize(
    "first",
    [
        bytes.fromhex("160301") + (200).to_bytes(2, "big") + b"\x01" + os.urandom(199),
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # a head never finished
        b"",
    ],
    ids=["tls-hello", "partial-head", "nothing"],
)
def test_a_connection_without_a_whole_head_is_closed_at_the_idle_limit(first):
    async def main() -> bytes:
        live = LiveFeed(dict, list)
        admin = AdminServer(None, None, None, live, Endpoint("127.0.0.1", 0), "")  # type: ignore[arg-type]
        admin.idle = 0.3
        host, port = admin.start()[0]
        loop = asyncio.get_running_loop()
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(first)
                # recv returns b"" when the admin closes; a socket timeout (10 s) fails
                return await loop.run_in_executor(None, sock.recv, 100)
        finally:
            await admin.stop()

    assert asyncio.run(main()) == b""
