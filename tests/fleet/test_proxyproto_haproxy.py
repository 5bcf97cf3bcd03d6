"""The PROXY protocol parser reads the bytes a real HAProxy writes: `send-proxy-v2` and
`send-proxy` for relayed connections, over IPv4 and IPv6, the LOCAL header of its
health checks, and the CRC32C and unique-id vectors of `proxy-v2-options`."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from eyewall.proxyproto import PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID, ProxyHeader, parse
from tests.services import Backend, HAProxy, free_port, haproxy_config

pytestmark = pytest.mark.fleet

StartHAProxy = Callable[[Callable[[Path], str]], HAProxy]


@dataclass(frozen=True)
class Received:
    """One connection HAProxy made to the node: who it came from, and what it sent."""

    peer: tuple[str, int]
    data: bytes

    def header(self) -> tuple[ProxyHeader, bytes]:
        result = parse(self.data)
        assert result is not None, self.data
        header, consumed = result
        for end in range(consumed):  # the same bytes, as if they came one at a time
            assert parse(self.data[:end]) is None
        return header, self.data[consumed:]


class Node:
    """A stand-in for an Eyewall node behind HAProxy: records every connection's bytes
    up to the sender's end of stream, then answers ``ok``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.received: queue.Queue[Received] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            conn.settimeout(10)
            chunks = []
            try:
                while chunk := conn.recv(4096):
                    chunks.append(chunk)
                self.received.put(Received(peer[:2], b"".join(chunks)))
                conn.sendall(b"ok")
            except OSError:
                self.received.put(Received(peer[:2], b"".join(chunks)))

    def wait(self, match: Callable[[Received], bool]) -> Received:
        """The first recorded connection that ``match`` accepts."""
        while True:
            item = self.received.get(timeout=20)
            if match(item):
                return item

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    yield n
    n.close()


def ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


def relay(lb_host: str, lb_port: int, payload: bytes) -> tuple[tuple[str, int], bytes]:
    """Connect to HAProxy, send ``payload`` and end the stream; our address and the reply."""
    family = socket.AF_INET6 if ":" in lb_host else socket.AF_INET
    with socket.socket(family) as client:
        client.settimeout(10)
        client.connect((lb_host, lb_port))
        me = client.getsockname()[:2]
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := client.recv(4096):
            reply += chunk
    return me, reply


@pytest.mark.parametrize(("option", "version"), [("send-proxy-v2", 2), ("send-proxy", 1)])
@pytest.mark.parametrize("lb_host", ["127.0.0.1", "::1"])
def test_relayed_connection_carries_the_client_address(
    haproxy: StartHAProxy, node: Node, option: str, version: int, lb_host: str
) -> None:
    if lb_host == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")

    def bind() -> str:
        return f"127.0.0.1:{free_port()}" if lb_host == "127.0.0.1" else f"[::1]:{free_ipv6_port()}"

    backend = Backend("node1", node.port, options=f"{option} check inter 100ms")
    lb = haproxy(lambda d: haproxy_config(d, bind(), [backend]))
    lb_port = lb.frontend[1]
    lb.wait_status("nodes", "node1", "UP")

    me, reply = relay(lb_host, lb_port, b"GET / HTTP/1.1\r\n\r\n")
    assert reply == b"ok"
    got = node.wait(lambda r: b"GET /" in r.data)
    header, rest = got.header()
    assert rest == b"GET / HTTP/1.1\r\n\r\n"
    assert (header.version, header.command) == (version, "PROXY")
    assert header.family == ("TCP4" if lb_host == "127.0.0.1" else "TCP6")
    assert header.source == me
    assert header.destination == (lb_host, lb_port)


def free_ipv6_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port: int = s.getsockname()[1]
        return port


def test_v2_health_checks_send_local(haproxy: StartHAProxy, node: Node) -> None:
    # send-proxy-v2 puts the header on health checks too, with the LOCAL command.
    backend = Backend("node1", node.port, options="send-proxy-v2 check inter 100ms")
    lb = haproxy(lambda d: haproxy_config(d, f"127.0.0.1:{free_port()}", [backend]))
    check = node.wait(lambda r: r.data != b"")
    header, rest = check.header()
    assert header == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None)
    assert rest == b""
    lb.wait_status("nodes", "node1", "UP")


def test_v1_health_checks_send_the_check_connection_addresses(
    haproxy: StartHAProxy, node: Node
) -> None:
    # Version 1 has no LOCAL: the spec asks for the check connection's own endpoints.
    backend = Backend("node1", node.port, options="send-proxy check inter 100ms")
    haproxy(lambda d: haproxy_config(d, f"127.0.0.1:{free_port()}", [backend]))
    check = node.wait(lambda r: r.data != b"")
    header, _ = check.header()
    assert (header.version, header.command, header.family) == (1, "PROXY", "TCP4")
    assert header.source == check.peer
    assert header.destination == ("127.0.0.1", node.port)


def test_v2_crc32c_and_unique_id_vectors(haproxy: StartHAProxy, node: Node) -> None:
    backend = Backend(
        "node1", node.port, options="send-proxy-v2 proxy-v2-options crc32c,unique-id check"
    )
    lb = haproxy(
        lambda d: haproxy_config(
            d,
            f"127.0.0.1:{free_port()}",
            [backend],
            frontend_lines=('unique-id-format "%{+X}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid"',),
        )
    )
    lb_port = lb.frontend[1]
    lb.wait_status("nodes", "node1", "UP")
    me, _ = relay("127.0.0.1", lb_port, b"hello")
    got = node.wait(lambda r: r.data.endswith(b"hello"))
    header, rest = got.header()  # parse() verified the checksum HAProxy computed
    assert rest == b"hello"
    assert header.source == me
    crc = header.tlv(PP2_TYPE_CRC32C)
    assert crc is not None and len(crc) == 4
    unique_id = header.tlv(PP2_TYPE_UNIQUE_ID)
    assert unique_id is not None
    assert unique_id.startswith(f"7F000001:{me[1]:04X}_".encode())
    # A bit flipped anywhere in the header fails the check.
    corrupted = bytearray(got.data)
    corrupted[20] ^= 0x01
    with pytest.raises(ValueError, match="CRC32C"):
        parse(bytes(corrupted))
