"""PROXY protocol on the listeners (eyewall/proxy/proxied.py): the header read exactly
off a real socket, whole and a byte at a time; the gate's rule (trusted peers must send
one, others must not); and a `Proxy` in this process serving relayed connections, so
the client address rules, limits and flows see is the header's."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from eyewall.app import build_policy
from eyewall.config import load_settings
from eyewall.flow import Flow
from eyewall.proxy.proxied import NotAHeader, PeerClosed, ProxyProtocolGate, read_header
from eyewall.proxy.server import Proxy
from eyewall.proxyproto import PP2_TYPE_UNIQUE_ID, ProxyHeader, ProxyProtocolError, encode
from tests.proxy.harness import Origin, read_request, until

V1 = encode(ProxyHeader(1, "PROXY", "TCP4", ("203.0.113.7", 40001), ("10.0.0.1", 8080)))
V2 = encode(
    ProxyHeader(
        2,
        "PROXY",
        "TCP6",
        ("2001:db8::7", 40002),
        ("2001:db8::1", 8080),
        ((PP2_TYPE_UNIQUE_ID, b"abc"),),
    )
)
LOCAL = encode(ProxyHeader(2, "LOCAL", "UNKNOWN", None, None))
REQUEST = b"GET http://example.test/ HTTP/1.1\r\nHost: example.test\r\n\r\n"


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def pair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): a connected TCP pair on loopback, ours non-blocking."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    return ours, theirs


def rest(sock: socket.socket) -> bytes:
    """What is left in the socket's receive buffer (the sender has closed)."""
    sock.setblocking(True)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("header", [V1, V2, LOCAL], ids=["v1", "v2-tlv", "local"])
def test_the_header_is_read_exactly_whole(header: bytes) -> None:
    async def main() -> None:
        ours, theirs = pair()
        with ours, theirs:
            theirs.sendall(header + REQUEST)
            theirs.shutdown(socket.SHUT_WR)
            parsed, length = await read_header(ours)
            assert length == len(header)
            assert encode(parsed) == header
            assert rest(ours) == REQUEST

    run(main)


@pytest.mark.parametrize("header", [V1, V2, LOCAL], ids=["v1", "v2-tlv", "local"])
def test_the_header_is_read_exactly_a_byte_at_a_time(header: bytes) -> None:
    async def main() -> None:
        ours, theirs = pair()
        with ours, theirs:
            reading = asyncio.ensure_future(read_header(ours))
            for byte in header:
                theirs.sendall(bytes([byte]))
                await asyncio.sleep(0)
            theirs.sendall(REQUEST)
            theirs.shutdown(socket.SHUT_WR)
            parsed, length = await asyncio.wait_for(reading, 10)
            assert (encode(parsed), length) == (header, len(header))
            assert rest(ours) == REQUEST

    run(main)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (REQUEST, NotAHeader),
        (b"\x16\x03\x01\x02\x00", NotAHeader),  # a TLS ClientHello
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", ProxyProtocolError),
        (V2[:12] + b"\x31" + V2[13:], ProxyProtocolError),  # version 3
        (V1[:10], PeerClosed),
        (b"", PeerClosed),
    ],
    ids=["http", "tls", "v1-bad", "v2-version", "truncated", "nothing"],
)
def test_what_is_not_a_header(data: bytes, error: type[Exception]) -> None:
    async def main() -> None:
        ours, theirs = pair()
        with ours, theirs:
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)
            with pytest.raises(error):
                await read_header(ours)

    run(main)


def test_a_version_2_header_longer_than_the_bound_is_refused_before_it_arrives() -> None:
    async def main() -> None:
        ours, theirs = pair()
        with ours, theirs:
            big = encode(ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, ((0xE0, b"x" * 500),)))
            theirs.sendall(big[:16])  # the length says 503 bytes follow; none are sent
            with pytest.raises(ProxyProtocolError):
                await asyncio.wait_for(read_header(ours, max_length=200), 10)

    run(main)


# -- the gate ---------------------------------------------------------------------------


async def gate_answer(
    gate: ProxyProtocolGate, data: bytes, peer: str, close: bool = True
) -> tuple[tuple[str, int] | None, bytes]:
    ours, theirs = pair()
    with ours, theirs:
        theirs.sendall(data)
        if close:
            theirs.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0)
        client = await gate.client_of(ours, (peer, 5555))
        return client, rest(ours) if close and client is not None else b""


def test_a_trusted_peer_names_the_client(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        gate = ProxyProtocolGate(["10.0.0.0/8", "127.0.0.2/32"])
        assert await gate_answer(gate, V1 + REQUEST, "127.0.0.2") == (
            ("203.0.113.7", 40001),
            REQUEST,
        )
        assert await gate_answer(gate, V2, "::ffff:10.1.2.3") == (("2001:db8::7", 40002), b"")
        # LOCAL (a health check): the peer itself, no log line
        assert await gate_answer(gate, LOCAL, "127.0.0.2") == (("127.0.0.2", 5555), b"")
        # closed without a byte (a TCP check without the header): quiet too
        assert await gate_answer(gate, b"", "127.0.0.2") == (None, b"")
        assert gate.counts == {
            "proxy": 2,
            "local": 1,
            "untrusted": 0,
            "missing": 0,
            "invalid": 0,
            "timeout": 0,
            "closed": 1,
        }

    with caplog.at_level(logging.DEBUG, "eyewall.proxy_protocol"):
        run(main)
    assert caplog.records == []


def test_refusals_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        gate = ProxyProtocolGate(["127.0.0.2/32"], header_timeout=0.05)
        # an untrusted peer with a header
        assert (await gate_answer(gate, V2 + REQUEST, "127.0.0.1"))[0] is None
        # an untrusted peer without one is an ordinary client
        assert await gate_answer(gate, REQUEST, "127.0.0.1") == (("127.0.0.1", 5555), REQUEST)
        # a trusted peer without one, with a bad one, with half of one
        assert (await gate_answer(gate, REQUEST, "127.0.0.2"))[0] is None
        assert (await gate_answer(gate, b"PROXY TCP9 x\r\n\r\n", "127.0.0.2"))[0] is None
        assert (await gate_answer(gate, V1[:20], "127.0.0.2", close=False))[0] is None
        assert {k: n for k, n in gate.counts.items() if n} == {
            "untrusted": 1,
            "missing": 1,
            "invalid": 1,
            "timeout": 1,
        }

    with caplog.at_level(logging.WARNING, "eyewall.proxy_protocol"):
        run(main)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert (
        "127.0.0.1 sent a PROXY protocol header but is not in proxy_protocol.trusted"
        in (messages[0])
    )
    assert "did not begin with a PROXY protocol header" in messages[1]
    assert "invalid PROXY protocol header" in messages[2]
    assert "proxy_protocol.header_timeout" in messages[3]


def test_reload_changes_who_is_trusted() -> None:
    gate = ProxyProtocolGate(["127.0.0.2/32"])
    assert gate.enabled and gate.trusts("127.0.0.2") and not gate.trusts("127.0.0.3")
    gate.configure(["127.0.0.0/29"], 3.0)
    assert gate.trusts("127.0.0.3") and gate.trusts("::ffff:127.0.0.7")
    gate.configure([], 3.0)
    assert not gate.enabled


# -- a proxy serving relayed connections ---------------------------------------------------


async def proxy_with(flows: list[Flow], **overrides: Any) -> Proxy:
    settings = load_settings(
        overrides={
            "listen": ["127.0.0.1:0"],
            "access.allow_private": True,
            "access.allow_clients": ["127.0.0.0/8", "203.0.113.0/24", "2001:db8::/32"],
            **overrides,
        }
    )
    proxy = Proxy(settings, build_policy(settings), publish=flows.append)
    proxy.start_listening()
    return proxy


async def exchange(port: int, data: bytes, source: str) -> bytes:
    """Send ``data`` from ``source`` (a loopback address) and read until close; b"" for
    a connection closed or reset without an answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(data)
        await writer.drain()
        return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def test_rules_limits_and_flows_see_the_header_client() -> None:
    async def main() -> None:
        async def origin_handler(reader: asyncio.StreamReader, writer: Any) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()

        origin = await Origin.start(origin_handler)
        flows: list[Flow] = []
        proxy = await proxy_with(
            flows,
            **{
                "proxy_protocol.trusted": ["127.0.0.2/32"],
                "rate_limits.client_rps": 0.001,
                "rate_limits.client_burst": 1,
            },
        )
        port = proxy.addresses[0][1]
        request = f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        try:
            first = await exchange(port, V1 + request, "127.0.0.2")
            assert first.startswith(b"HTTP/1.1 200")
            # the same client through the balancer again: its own bucket is empty
            again = await exchange(port, V1 + request, "127.0.0.2")
            assert again.startswith(b"HTTP/1.1 429")
            # another client through the same balancer has its own
            other = encode(ProxyHeader(1, "PROXY", "TCP4", ("203.0.113.8", 1), ("10.0.0.1", 80)))
            assert (await exchange(port, other + request, "127.0.0.2")).startswith(b"HTTP/1.1 200")
            # a client outside allow_clients is refused by the rules, by its real address
            outside = encode(ProxyHeader(1, "PROXY", "TCP4", ("198.51.100.1", 1), ("10.0.0.1", 80)))
            assert (await exchange(port, outside + request, "127.0.0.2")).startswith(
                b"HTTP/1.1 403"
            )
            # refused outright: an untrusted peer's header, a trusted peer without one
            assert await exchange(port, V1 + request, "127.0.0.3") == b""
            assert await exchange(port, request, "127.0.0.2") == b""
            await until(lambda: len(flows) == 4)
            assert [(f.client[0], f.status) for f in flows] == [
                ("203.0.113.7", 200),
                ("203.0.113.7", 429),
                ("203.0.113.8", 200),
                ("198.51.100.1", 403),
            ]
            assert flows[0].client == ("203.0.113.7", 40001)
            counts = proxy.proxy_protocol.counts
            assert (counts["proxy"], counts["untrusted"], counts["missing"]) == (4, 1, 1)
        finally:
            await proxy.shutdown()
            await origin.close()

    run(main)


def test_listeners_not_named_take_no_header() -> None:
    async def main() -> None:
        flows: list[Flow] = []
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()
        proxy = await proxy_with(
            flows,
            **{
                "listen": ["127.0.0.1:0", f"127.0.0.1:{free}"],
                "proxy_protocol.trusted": ["127.0.0.2/32"],
                "proxy_protocol.listeners": [f"127.0.0.1:{free}"],
            },
        )
        plain, relayed = proxy.addresses[0][1], free
        try:
            request = b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            # on the plain listener the balancer's address is an ordinary client
            answer = await exchange(plain, request, "127.0.0.2")
            assert answer.startswith(b"HTTP/1.1 502")  # nothing listens on port 9
            assert await exchange(relayed, request, "127.0.0.2") == b""
            await until(lambda: len(flows) == 1)
            assert flows[0].client[0] == "127.0.0.2"
        finally:
            await proxy.shutdown()

    run(main)


def test_an_https_listener_reads_the_header_before_the_handshake(ca: Any, tmp_path: Any) -> None:
    # The handshake must find nothing read ahead: the header is read exactly.
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)

    async def main() -> None:
        flows: list[Flow] = []
        proxy = await proxy_with(
            flows,
            **{
                "listen": [],
                "tls.listen": ["127.0.0.1:0"],
                "tls.certificate": str(cert),
                "tls.key": str(key),
                "proxy_protocol.trusted": ["127.0.0.2/32"],
            },
        )
        port = proxy.addresses[0][1]
        client_tls = ssl.create_default_context()
        ca.configure_trust(client_tls)
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=("127.0.0.2", 0)
            )
            writer.write(V2)
            await writer.drain()
            await writer.start_tls(client_tls, server_hostname="127.0.0.1")
            writer.write(
                b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 502")
            await until(lambda: len(flows) == 1)
            assert flows[0].client == ("2001:db8::7", 40002)
        finally:
            await proxy.shutdown()

    run(main)


@pytest.mark.parametrize(
    ("endpoint", "local", "expected"),
    [
        ("10.0.0.11:3128", ("10.0.0.11", 3128), True),
        ("10.0.0.11:3128", ("10.0.0.12", 3128), False),
        ("10.0.0.11:3128", ("10.0.0.11", 8080), False),
        ("0.0.0.0:3128", ("10.0.0.12", 3128), True),
        ("[::]:3128", ("::ffff:10.0.0.12", 3128), True),
        ("10.0.0.11:3128", ("::ffff:10.0.0.11", 3128), True),
        ("[2001:db8::1]:3128", ("2001:db8:0::1", 3128), True),
        ("localhost:3128", ("::1", 3128), True),
        ("localhost:3128", ("127.0.0.1", 3128), True),
        ("localhost:3128", ("10.0.0.1", 3128), False),
    ],
)
def test_which_listener_a_connection_reached(
    endpoint: str, local: tuple[str, int], expected: bool
) -> None:
    from eyewall.config import parse_endpoint
    from eyewall.proxy.server import _serves

    assert _serves(parse_endpoint(endpoint), *local) is expected
