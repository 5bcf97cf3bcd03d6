"""Bodies stream with backpressure: moving 1 GiB to a slow reader, or from a fast client
to a slow origin, must not grow the proxy's memory (RSS read from /proc)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.conftest import read_response
from tests.origins import BLOCK

GIB = 1 << 30
LIMIT = 32 << 20


class RssSampler:
    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.baseline = proxy.rss()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.proxy.rss())

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


@pytest.fixture
def fresh_proxy(make_proxy):
    p = make_proxy()
    # Warm up: code paths and buffers allocated once should not count as growth.
    with socket.create_connection(p.address) as s:
        s.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(s)
    return p


def test_download_of_1gib_to_a_slow_reader(fresh_proxy, origin):
    sampler = RssSampler(fresh_proxy)
    with socket.create_connection(fresh_proxy.address, timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.sendall(f"GET {origin.url}/bytes?n={GIB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        received = len(head.partition(b"\r\n\r\n")[2])
        time.sleep(2)  # a reader that stalls: without backpressure the proxy would buffer
        while received < GIB:
            chunk = s.recv(1 << 18)
            assert chunk, f"connection closed after {received} bytes"
            received += len(chunk)
    growth = sampler.growth()
    print(f"download: RSS growth {growth / 2**20:.1f} MiB")
    assert received == GIB
    assert growth < LIMIT, f"RSS grew by {growth >> 20} MiB"


def test_upload_of_1gib_to_a_slow_origin(fresh_proxy, origin):
    sampler = RssSampler(fresh_proxy)
    with socket.create_connection(fresh_proxy.address, timeout=60) as s:
        s.sendall(
            f"POST {origin.url}/upload?stall=2 HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {GIB}\r\n\r\n".encode()
        )
        for _ in range(GIB // len(BLOCK)):
            s.sendall(BLOCK)
        response = read_response(s)
    growth = sampler.growth()
    print(f"upload: RSS growth {growth / 2**20:.1f} MiB")
    body = json.loads(response.partition(b"\r\n\r\n")[2])
    assert body["size"] == GIB
    assert growth < LIMIT, f"RSS grew by {growth >> 20} MiB"
