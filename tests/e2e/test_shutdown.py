"""Graceful shutdown on SIGTERM/SIGINT: stop accepting, finish in-flight work within
the drain deadline (telling clients the connection closes), then close the rest."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

from tests.conftest import poll, read_response, refuses_connections


def gated_origin(raw_origin, gate: threading.Event):
    """Reads a request, then answers only once ``gate`` is set: the request stays in
    flight exactly as long as the test needs."""

    def handler(sock):
        origin.read_head(sock)
        gate.wait(30)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nslept\n")

    origin = raw_origin(handler)
    return origin


def test_in_flight_request_finishes_with_connection_close(make_proxy, raw_origin):
    gate = threading.Event()
    origin = gated_origin(raw_origin, gate)
    p = make_proxy("--drain-timeout", "5", "--drain-grace", "0")
    with socket.create_connection(p.address, timeout=10) as s:
        s.sendall(f"GET {origin.url}/held HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        poll(lambda: origin.requests, what="the request to reach the origin")
        p.signal(signal.SIGTERM)
        poll(lambda: refuses_connections(p.address), what="the listener to close")
        gate.set()
        response = read_response(s)
        assert s.recv(10) == b""  # and then the proxy closes
    assert response.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in response
    assert response.endswith(b"slept\n")
    assert p.process.wait(10) == 0
    assert "/held 200" in p.access_entry("/held")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_idle_connections_close_at_once_and_tunnels_at_the_deadline(
    make_proxy, raw_origin, origin, sig
):
    def echo(sock):
        while data := sock.recv(65536):
            sock.sendall(data)

    upstream = raw_origin(echo)
    # Long enough for the checks below to run while the tunnel is still draining, on a
    # busy machine too; the test waits it out once.
    p = make_proxy("--drain-timeout", "2", "--drain-grace", "0")
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
    line = p.access_entry("CONNECT")  # the proxy's stop, as for exchanges cut then
    assert "err=connection_terminated" in line and "drain deadline" in line, line


def test_exchanges_cut_at_the_drain_deadline_are_recorded(make_proxy, raw_origin):
    """An exchange still waiting on its origin at the deadline is cut there and still
    gets its access line and flow, blamed on the proxy's stop, not on the client."""
    gate = threading.Event()
    origin = gated_origin(raw_origin, gate)  # never answers within the test
    p = make_proxy("--drain-timeout", "1", "--drain-grace", "0")
    clients = []
    for i in range(3):
        s = socket.create_connection(p.address, timeout=10)
        s.sendall(f"GET {origin.url}/stuck/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        clients.append(s)
    poll(lambda: len(origin.requests) == 3, what="the requests to reach the origin")
    p.signal(signal.SIGTERM)
    for s in clients:  # each is told, not just closed
        answer = read_response(s)
        assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
        assert b"the proxy stopped at its drain deadline" in answer
    assert p.process.wait(15) == 0
    gate.set()
    for s in clients:
        s.close()
    lines = [p.access_entry(f"/stuck/{i}") for i in range(3)]
    assert all("err=connection_terminated" in line for line in lines), lines
    assert all("drain deadline" in line for line in lines), lines


def test_a_second_signal_cuts_in_flight_work_now_and_records_it(make_proxy, raw_origin):
    """Ctrl-C twice: the second does not wait out the drain, and what it cuts is still
    answered and recorded (it used to be closed without a byte or a record)."""
    gate = threading.Event()
    origin = gated_origin(raw_origin, gate)
    p = make_proxy("--drain-timeout", "600", "--drain-grace", "0")
    s = socket.create_connection(p.address, timeout=10)
    s.sendall(f"GET {origin.url}/slow HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    poll(lambda: len(origin.requests) == 1, what="the request to reach the origin")
    p.signal(signal.SIGINT)
    p.log_with("shutting down")
    p.signal(signal.SIGINT)
    answer = read_response(s)
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
    assert p.process.wait(15) == 0
    gate.set()
    s.close()
    assert "err=connection_terminated" in p.access_entry("/slow")
    assert "second signal" in p.log_with("second signal")
