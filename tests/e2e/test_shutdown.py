"""Graceful shutdown on SIGTERM/SIGINT: stop accepting, finish in-flight work within
the drain deadline (telling clients the connection closes), then close the rest."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.conftest import read_response


def test_in_flight_request_finishes_with_connection_close(make_proxy, origin):
    p = make_proxy("--drain-timeout", "5", "--drain-grace", "0")
    with socket.create_connection(p.address, timeout=10) as s:
        s.sendall(f"GET {origin.url}/sleep?seconds=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.3)
        p.signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(p.address, timeout=2).close()
        response = read_response(s)
        assert s.recv(10) == b""  # and then the proxy closes
    assert response.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in response
    assert response.endswith(b"slept\n")
    assert p.process.wait(10) == 0
    assert "/sleep?seconds=1 200" in p.access_entry("/sleep")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_idle_connections_close_at_once_and_tunnels_at_the_deadline(
    make_proxy, raw_origin, origin, sig
):
    def echo(sock):
        while data := sock.recv(65536):
            sock.sendall(data)

    upstream = raw_origin(echo)
    p = make_proxy("--drain-timeout", "0.5", "--drain-grace", "0")
    idle = socket.create_connection(p.address, timeout=5)  # keep-alive, between requests
    idle.sendall(f"GET {origin.url}/bytes?n=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert read_response(idle).startswith(b"HTTP/1.1 200")
    tunnel = socket.create_connection(p.address, timeout=5)
    tunnel.sendall(f"CONNECT {upstream.authority} HTTP/1.1\r\n\r\n".encode())
    assert read_response(tunnel, head_only=True).startswith(b"HTTP/1.1 200")
    p.signal(sig)
    assert idle.recv(10) == b""
    tunnel.sendall(b"still here")  # the tunnel keeps working while draining
    assert tunnel.recv(100) == b"still here"
    assert tunnel.recv(10) == b""  # closed once the drain deadline passed
    assert p.process.wait(10) == 0
    idle.close()
    tunnel.close()
