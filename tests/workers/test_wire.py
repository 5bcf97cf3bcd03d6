"""What workers send their supervisor: flows survive the trip with everything the
observers read, frames keep their boundaries, and the channel never lets a worker wait
for a slow supervisor (a bounded buffer, drops counted)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from eyewall.errors import ErrorKind
from eyewall.flow import Flow
from eyewall.http1.parse import Headers, RequestHead, ResponseHead
from eyewall.observe.logformats import FORMATS
from eyewall.observe.records import record_of, row_of, summary
from eyewall.workers.channel import Channel, StreamClosedError
from eyewall.workers.wire import (
    FLOWS,
    HEAD,
    INIT,
    STATS,
    decode,
    encode,
    frame,
    pack,
    read_frame,
    unpack,
)


def full_flow() -> Flow:
    flow = Flow("abc123-7f", "http", ("2001:db8::5", 50123), time.time())
    flow.method, flow.url = "POST", "http://example.test/up?q=1"
    flow.host, flow.port = "example.test", 80
    flow.request = RequestHead(
        "POST",
        "http://example.test/up?q=1",
        "HTTP/1.1",
        Headers([("Host", "example.test"), ("User-Agent", "curl/8 \u00e9"),
                 ("Referer", 'http://x/"y"'), ("Proxy-Authorization", "Basic c2VjcmV0")]),
    )  # fmt: skip
    flow.response = ResponseHead(
        "HTTP/1.0",
        503,
        "Service Unavailable",
        Headers([("Content-Type", "text/html; charset=utf-8"), ("Set-Cookie", "a=1"),
                 ("Set-Cookie", "b=2")]),
        ("obs-fold replaced",),
    )  # fmt: skip
    flow.status, flow.upstream, flow.reused = 503, "192.0.2.1:80", True
    flow.bytes_in, flow.bytes_out = 12, 3456
    flow.error, flow.error_detail, flow.cause = ErrorKind.RATE_LIMITED, "slow down", "user_rps"
    flow.t_connected, flow.t_response, flow.duration = 0.001, 0.0125, 0.25
    flow.user, flow.rule, flow.connect_time = "alice", "r1", 0.0009
    flow.request_body, flow.response_body = bytearray(b"\x00\x01up"), bytearray(b"down")
    flow.intercepted, flow.head_bytes = True, 321
    return flow


def test_a_flow_arrives_with_everything_the_observers_read() -> None:
    sent = full_flow()
    data = pack([sent, Flow("x-1", "tunnel", ("127.0.0.1", 1), 0.0)])
    length, kind = HEAD.unpack(data[: HEAD.size])
    assert kind == FLOWS and length == len(data) - HEAD.size + 1
    got, tunnel = unpack(data[HEAD.size :], worker=2)
    assert got.worker == 2 and tunnel.worker == 2 and tunnel.request is None
    sent.worker = 2
    for name, format_line in FORMATS.items():
        assert format_line(got) == format_line(sent), name
    assert row_of(got) == row_of(sent)
    assert summary(record_of(got))["worker"] == 2
    assert (got.error, got.cause, got.head_bytes) == (sent.error, sent.cause, sent.head_bytes)
    assert got.response is not None and got.response.repairs == ("obs-fold replaced",)
    assert got.request is not None and got.request.headers.get_all("set-cookie") == []
    assert got.response.headers.get_all("set-cookie") == ["a=1", "b=2"]


def test_the_worker_shows_in_access_lines() -> None:
    flow = full_flow()
    flow.worker = 3
    assert FORMATS["json"](flow).endswith(',"worker":3}\n')
    assert " worker=3 " in FORMATS["text"](flow)
    flow.worker = 0
    assert FORMATS["json"](flow).endswith(',"worker":0}\n')
    assert " worker=" not in FORMATS["text"](flow)


def test_control_frames_round_trip_over_a_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode(STATS, {"connections": 3}) + frame(INIT, b""))
        kind, payload = read_frame(b)
        assert (kind, decode(payload)) == (STATS, {"connections": 3})
        assert read_frame(b) == (INIT, b"")
        a.close()
        with pytest.raises(EOFError):
            read_frame(b)


def test_a_frame_of_absurd_length_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(HEAD.pack(0, STATS))
        with pytest.raises(ValueError):
            read_frame(b)


def test_the_channel_refuses_past_its_bound_and_never_waits() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        channel = Channel(ours, max_pending=1 << 20)
        big = frame(FLOWS, b"x" * (256 << 10))
        sent = [channel.send(big) for _ in range(64)]  # nobody reads: the buffer fills
        assert sent.count(False) == channel.refused > 0
        assert channel.pending <= 1 << 20
        assert channel.send(encode(STATS, None), force=True)  # control frames always go
        reader = Channel(theirs)
        for _ in range(sent.count(True)):
            assert await reader.receive() == (FLOWS, b"x" * (256 << 10))
        assert await reader.receive() == (STATS, encode(STATS, None)[HEAD.size :])
        await channel.drained()
        assert channel.pending == 0
        channel.close()
        with pytest.raises(StreamClosedError):
            await reader.receive()
        assert not channel.send(big)
        reader.close()

    asyncio.run(main())
