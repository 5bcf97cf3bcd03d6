"""WebSocket through the proxy: inside a CONNECT tunnel, and as a plain-HTTP upgrade."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

from websockets.asyncio.client import connect

from tests.conftest import read_response


def test_websocket_over_connect_with_the_websockets_library(proxy, origin):
    async def talk() -> list[str | bytes]:
        url = origin.url.replace("http://", "ws://") + "/ws"
        async with connect(url, proxy=proxy.url) as ws:
            replies = []
            for message in ("hello", b"\x00\x01binary", "x" * 200_000):
                await ws.send(message)
                replies.append(await ws.recv())
            return replies

    replies = asyncio.run(talk())
    assert replies == ["hello", b"\x00\x01binary", "x" * 200_000]


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame (RFC 6455 §5.2), payload shorter than 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def test_websocket_upgrade_on_an_absolute_form_get_becomes_a_relay(proxy, origin):
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(
            f"GET {origin.url}/ws HTTP/1.1\r\nHost: {origin.authority}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n".encode()
            + masked_frame(b"first")  # sent before the 101 arrives: must not be lost
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, data = data.partition(b"\r\n\r\n")  # frames may follow at once
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"Upgrade: websocket" in head
        while len(data) < 7:
            data += sock.recv(100)
        assert data[:7] == bytes([0x81, 5]) + b"first"
        sock.sendall(masked_frame(b"second"))
        data = data[7:]
        while len(data) < 8:
            data += sock.recv(100)
        assert data[:8] == bytes([0x81, 6]) + b"second"
        sock.sendall(masked_frame(b"", opcode=0x8))  # close
        assert sock.recv(100)[:1] == b"\x88"
    line = proxy.access_entry(f"{origin.url}/ws")
    assert " 101 " in line


def test_upgrade_to_something_else_is_not_relayed(proxy, origin):
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(
            f"GET {origin.url}/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            "Upgrade: h2c\r\n\r\n".encode()
        )
        data = read_response(sock)
    assert data.startswith(b"HTTP/1.1 200")
    assert b'"Upgrade"' not in data  # the origin never saw the upgrade request
