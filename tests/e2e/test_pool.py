"""The upstream keep-alive pool: reuse, staleness, retries, limits."""

from __future__ import annotations

import socket
import threading

from tests.conftest import poll, raw_request

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def keep_alive_origin(raw_origin):
    """Answers every request on a connection, forever."""

    def handler(sock):
        while origin.read_head(sock):
            sock.sendall(OK)

    origin = raw_origin(handler)
    return origin


def get(proxy, origin, path="/", method="GET", body=b""):
    head = f"{method} {origin.url}{path} HTTP/1.1\r\nHost: x\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return raw_request(proxy.address, head.encode() + b"\r\n" + body)


def test_connections_are_reused_across_clients(proxy, raw_origin):
    origin = keep_alive_origin(raw_origin)
    for _ in range(5):
        assert get(proxy, origin).endswith(b"ok")
    assert origin.accepted == 1


def dies_on_second_request(raw_origin):
    """First connection: answers one request, then closes when the next arrives (the
    race a pooled connection can lose).  Later connections behave."""

    def handler(sock):
        first = origin.accepted == 1
        origin.read_head(sock)
        sock.sendall(OK)
        if first:
            origin.read_head(sock)
            return  # close without answering
        while origin.read_head(sock):
            sock.sendall(OK)

    origin = raw_origin(handler)
    return origin


def test_idempotent_request_is_retried_once_on_a_stale_connection(proxy, raw_origin):
    origin = dies_on_second_request(raw_origin)
    assert get(proxy, origin, "/one").endswith(b"ok")
    assert get(proxy, origin, "/two").endswith(b"ok")  # failed on the pooled one, retried
    assert origin.accepted == 2
    assert sum(b"/two" in r for r in origin.requests) == 2


def test_post_is_not_retried(proxy, raw_origin):
    origin = dies_on_second_request(raw_origin)
    assert get(proxy, origin, "/one").endswith(b"ok")
    # The connection goes back to the pool before the exchange's access line is written.
    proxy.access_entry(f"{origin.url}/one")
    data = get(proxy, origin, "/two", method="POST", body=b"data")
    # Either the pool saw the stale socket first (then a new connection works), or the
    # POST failed on it; it is never sent twice.
    assert sum(b"/two" in r for r in origin.requests) == 1
    assert data.startswith((b"HTTP/1.1 200", b"HTTP/1.1 502"))


def test_origin_closing_idle_connection_is_noticed(proxy, raw_origin):
    pooled = threading.Event()

    def handler(sock):
        first = origin.accepted == 1
        origin.read_head(sock)
        sock.sendall(OK)
        if first:
            pooled.wait(10)
            sock.shutdown(socket.SHUT_RDWR)  # keep-alive promised, then closed while idle

    origin = raw_origin(handler)
    assert get(proxy, origin).endswith(b"ok")
    proxy.access_entry(f"{origin.url}/ ")  # pooled by now
    pooled.set()
    poll(lambda: origin.finished, what="the origin to close the pooled connection")
    assert get(proxy, origin, method="POST", body=b"x").endswith(b"ok")
    assert origin.accepted == 2


def test_idle_pooled_connections_expire(make_proxy, raw_origin):
    p = make_proxy("--pool-idle-timeout", "0.3")
    origin = keep_alive_origin(raw_origin)
    assert get(p, origin).endswith(b"ok")
    poll(lambda: origin.finished, what="the proxy to close the idle pooled connection")
    assert get(p, origin).endswith(b"ok")
    assert origin.accepted == 2


def test_pool_can_be_disabled(make_proxy, raw_origin):
    p = make_proxy("--pool-idle-per-origin", "0")
    origin = keep_alive_origin(raw_origin)
    for _ in range(3):
        assert get(p, origin).endswith(b"ok")
    assert origin.accepted == 3


def test_connection_close_from_origin_is_not_pooled(proxy, raw_origin):
    def handler(sock):
        origin.read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")

    origin = raw_origin(handler)
    for _ in range(3):
        assert get(proxy, origin).endswith(b"ok")
    assert origin.accepted == 3
