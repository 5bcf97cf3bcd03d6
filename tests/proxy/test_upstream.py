"""Origin connections in-process: racing several addresses as RFC 8305 says (a refused
address gives way at once, a silent one after the attempt delay, a late winner is
closed, a timeout leaves no attempt behind), how failures to connect are classified,
the resolver's cache, and the pool's checks of an idle connection when it is taken."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator

import pytest

from eyewall.errors import ErrorKind, ProxyError
from eyewall.http1.target import parse_target
from eyewall.proxy import upstream
from eyewall.proxy.streams import BoundedStream
from eyewall.proxy.upstream import Resolver, Upstream, UpstreamPool, _classify, connect
from tests.proxy.harness import until

V4, V6 = int(socket.AF_INET), int(socket.AF_INET6)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture
def listener() -> Iterator[tuple[str, int]]:
    """An address that accepts connections (the kernel completes them; nobody reads)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()


def refusing() -> tuple[str, int]:
    """An address that refuses connections: a port just bound and given back."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


class Attempts:
    """Stands in for `upstream._attempt`: addresses in ``silent`` never answer (their
    attempts wait until cancelled); the others wait for ``gate`` when given, then
    connect for real."""

    def __init__(self, silent: set[tuple[str, int]], gate: asyncio.Event | None = None):
        self.silent = silent
        self.gate = gate
        self.started: list[tuple[str, int]] = []
        self.cancelled: list[tuple[str, int]] = []
        self.sockets: list[socket.socket] = []
        self.real = upstream._attempt

    async def __call__(self, family: int, sockaddr: tuple[str, int]) -> socket.socket:
        self.started.append(sockaddr)
        try:
            if sockaddr in self.silent:
                await asyncio.Event().wait()
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(sockaddr)
            raise
        sock = await self.real(family, sockaddr)
        self.sockets.append(sock)
        return sock


def test_a_refused_address_gives_way_to_the_next_at_once(listener):
    async def main() -> None:
        first = refusing()
        async with asyncio.timeout(10):  # far less than the attempt delay
            sock, peer = await connect([(V4, first), (V4, listener)], delay=600)
        assert peer == f"127.0.0.1:{listener[1]}"
        assert sock.getpeername() == listener
        sock.close()

    run(main())


def test_a_silent_address_is_raced_after_the_delay_and_then_cancelled(listener, monkeypatch):
    async def main() -> None:
        silent = ("127.0.0.1", 9)
        attempts = Attempts({silent})
        monkeypatch.setattr(upstream, "_attempt", attempts)
        sock, peer = await connect([(V4, silent), (V4, listener)], delay=0.01)
        assert peer == f"127.0.0.1:{listener[1]}"
        assert attempts.started == [silent, listener]
        assert attempts.cancelled == [silent]  # the loser does not linger
        sock.close()

    run(main())


def test_when_two_connect_together_one_wins_and_the_other_is_closed(listener, monkeypatch):
    async def main() -> None:
        server = socket.create_server(("127.0.0.1", 0))
        other = server.getsockname()
        gate = asyncio.Event()
        attempts = Attempts(set(), gate)
        monkeypatch.setattr(upstream, "_attempt", attempts)
        task = asyncio.ensure_future(connect([(V4, listener), (V4, other)], delay=0.01))
        await until(lambda: len(attempts.started) == 2, "both attempts under way")
        gate.set()
        sock, peer = await task
        assert len(attempts.sockets) == 2
        winner, loser = sorted(attempts.sockets, key=lambda s: s is not sock)
        assert winner.fileno() != -1 and loser.fileno() == -1
        assert peer == f"127.0.0.1:{winner.getpeername()[1]}"
        sock.close()
        server.close()

    run(main())


def test_when_every_address_refuses_the_last_error_is_raised():
    async def main() -> None:
        first, last = refusing(), refusing()
        with pytest.raises(ProxyError) as info:
            await connect([(V4, first), (V4, last)], delay=600)
        assert info.value.kind is ErrorKind.CONNECTION_REFUSED
        assert info.value.detail == f"connection refused by 127.0.0.1:{last[1]}"

    run(main())


def test_no_address_at_all_is_a_dns_error():
    async def main() -> None:
        with pytest.raises(ProxyError) as info:
            await connect([])
        assert info.value.kind is ErrorKind.DNS_ERROR

    run(main())


def test_cancelling_a_connect_cancels_every_attempt(monkeypatch):
    """The pool has no timer of its own (the caller's watch bounds a connect): what it
    must do is leave no attempt running when the caller gives up."""

    async def main() -> None:
        silent = {("127.0.0.1", 9), ("127.0.0.2", 9)}
        attempts = Attempts(silent)
        monkeypatch.setattr(upstream, "_attempt", attempts)
        pool = UpstreamPool(idle_per_origin=1, idle_timeout=60)
        opening = asyncio.ensure_future(
            pool.open_socket(parse_target("GET", "http://h:9/"), ("127.0.0.1", "127.0.0.2"))
        )
        await until(lambda: attempts.started)  # at least the first was tried
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert sorted(attempts.cancelled) == sorted(attempts.started)

    run(main())


def test_address_families_alternate_starting_with_the_first_listed():
    a4, b4, c4 = ((V4, (f"192.0.2.{i}", 80)) for i in (1, 2, 3))
    a6, b6 = ((V6, (f"2001:db8::{i}", 80)) for i in (1, 2))
    assert upstream._interleave([a4, b4, c4, a6, b6]) == [a4, a6, b4, b6, c4]
    assert upstream._interleave([a6, a4, b4, b6]) == [a6, a4, b6, b4]
    assert upstream._interleave([a4, b4]) == [a4, b4]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), ErrorKind.CONNECTION_REFUSED),
        (TimeoutError(errno.ETIMEDOUT, "timed out"), ErrorKind.CONNECTION_TIMEOUT),
        (OSError(errno.ENETUNREACH, "unreachable"), ErrorKind.DESTINATION_UNAVAILABLE),
        (OSError(errno.EHOSTUNREACH, "no route"), ErrorKind.DESTINATION_UNAVAILABLE),
        (OSError(errno.EADDRNOTAVAIL, "not available"), ErrorKind.DESTINATION_UNAVAILABLE),
        (ConnectionResetError(errno.ECONNRESET, "reset"), ErrorKind.CONNECTION_TERMINATED),
    ],
)
def test_connection_failures_are_classified(error, kind):
    failure = upstream._classify(error, "192.0.2.1:80")
    assert failure.kind is kind
    assert "192.0.2.1:80" in failure.detail


# -- the resolver ------------------------------------------------------------------------


class Lookups:
    """Stands in for the loop's getaddrinfo: answers from ``answers``, counts calls."""

    def __init__(self, answers: dict[str, object]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int, **kwargs: object) -> list[tuple]:
        self.calls.append(host)
        answer = self.answers[host]
        if isinstance(answer, BaseException):
            raise answer
        return [(family, socket.SOCK_STREAM, 6, "", (ip, port)) for family, ip in answer]  # type: ignore[attr-defined]


def test_names_are_resolved_once_while_cached_without_duplicates():
    async def main() -> None:
        lookups = Lookups(
            {"h": [(V6, "2001:db8::1"), (V4, "192.0.2.1"), (V6, "2001:db8::1")], "g": []}
        )
        asyncio.get_running_loop().getaddrinfo = lookups  # type: ignore[method-assign]
        resolver = Resolver(ttl=600)
        expected = [(V6, ("2001:db8::1", 443)), (V4, ("192.0.2.1", 443))]
        assert await resolver.resolve("h", 443) == expected
        assert await resolver.resolve("h", 443) == expected
        assert resolver.known("h", 443) == expected
        assert lookups.calls == ["h"]
        assert resolver.known("h", 80) is None  # another port is another entry
        short = Resolver(ttl=0)  # answers kept no time at all
        await short.resolve("h", 443)
        await short.resolve("h", 443)
        assert lookups.calls == ["h", "h", "h"]

    run(main())


def test_ip_literals_need_no_lookup():
    async def main() -> None:
        lookups = Lookups({})
        asyncio.get_running_loop().getaddrinfo = lookups  # type: ignore[method-assign]
        resolver = Resolver()
        assert await resolver.resolve("192.0.2.7", 80) == [(V4, ("192.0.2.7", 80))]
        assert await resolver.resolve("2001:db8::7", 80) == [(V6, ("2001:db8::7", 80))]
        assert lookups.calls == []

    run(main())


def test_a_full_cache_is_emptied_rather_than_grown():
    async def main() -> None:
        answer = [(V4, "192.0.2.1")]
        lookups = Lookups({"a": answer, "b": answer, "c": answer})
        asyncio.get_running_loop().getaddrinfo = lookups  # type: ignore[method-assign]
        resolver = Resolver(ttl=600, max_entries=2)
        for host in ("a", "b", "c", "a"):
            await resolver.resolve(host, 80)
        assert lookups.calls == ["a", "b", "c", "a"]  # "a" went with the emptied cache
        assert resolver.known("c", 80) is not None

    run(main())


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "Name or service not known",
        ),
        (UnicodeError("label too long"), "invalid name"),
    ],
)
def test_a_name_that_does_not_resolve_is_a_dns_error(failure, reason):
    async def main() -> None:
        asyncio.get_running_loop().getaddrinfo = Lookups({"x.invalid": failure})  # type: ignore[method-assign]
        with pytest.raises(ProxyError) as info:
            await Resolver().resolve("x.invalid", 80)
        assert info.value.kind is ErrorKind.DNS_ERROR
        assert info.value.detail == f"cannot resolve x.invalid: {reason}"

    run(main())


# -- the pool: taking an idle connection ---------------------------------------------------

TARGET = parse_target("GET", "http://origin.test/")


def pooled(pool: UpstreamPool, ip: str = "192.0.2.1") -> tuple[Upstream, socket.socket]:
    """An idle connection in ``pool`` over a socket pair; returns it and the origin's end."""
    ours, theirs = socket.socketpair()
    up = Upstream(BoundedStream(ours), ("http", "origin.test", 80), f"{ip}:80", ip)
    pool.release(up, now=0.0)
    return up, theirs


def test_an_idle_connection_the_origin_closed_is_not_taken():
    async def main() -> None:
        pool = UpstreamPool(4, 60)
        up, origin = pooled(pool)
        origin.close()
        assert pool.take(TARGET) is None
        assert up.stream.closed() and pool.idle_count() == 0

    run(main())


def test_an_idle_connection_with_unasked_for_bytes_is_not_taken():
    async def main() -> None:
        pool = UpstreamPool(4, 60)
        up, origin = pooled(pool)
        origin.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        assert pool.take(TARGET) is None
        assert up.stream.closed()
        origin.close()

    run(main())


def test_a_live_idle_connection_is_taken_newest_first_and_probing_can_be_skipped():
    async def main() -> None:
        pool = UpstreamPool(4, 60)
        older, origin1 = pooled(pool)
        newer, origin2 = pooled(pool)
        taken = pool.take(TARGET)
        assert taken is newer and taken.uses == 1
        origin1.close()
        # A caller that may retry elsewhere (an idempotent request without a body) skips
        # the probe: the closed connection is handed out and fails on use instead.
        assert pool.take(TARGET, probe=False) is older
        for s in (older.stream, newer.stream):
            s.close()
        origin2.close()

    run(main())


def test_an_idle_connection_to_an_address_no_longer_allowed_stays_in_the_pool():
    async def main() -> None:
        pool = UpstreamPool(4, 60)
        up, origin = pooled(pool, ip="192.0.2.1")
        assert pool.take(TARGET, addresses=("192.0.2.99",)) is None
        assert pool.idle_count() == 1 and not up.stream.closed()
        assert pool.take(TARGET, addresses=("192.0.2.1",)) is up
        up.stream.close()
        origin.close()

    run(main())


def test_released_connections_beyond_the_limit_or_after_closing_are_closed():
    async def main() -> None:
        pool = UpstreamPool(1, 60)
        kept, origin1 = pooled(pool)
        extra, origin2 = pooled(pool)
        assert pool.idle_count() == 1 and extra.stream.closed() and not kept.stream.closed()
        pool.close_all()
        assert kept.stream.closed()
        late, origin3 = pooled(pool)
        assert late.stream.closed() and pool.idle_count() == 0
        for s in (origin1, origin2, origin3):
            s.close()

    run(main())


def test_a_failed_connect_is_worded_by_its_error_number_not_by_asyncio() -> None:
    """asyncio words a failed connect as "Connect call failed ('::127.0.0.2', 80, 0,
    0)": the address again, in Python's spelling. The page says what happened."""
    error = OSError(errno.EHOSTUNREACH, "Connect call failed ('::127.0.0.2', 80, 0, 0)")
    failed = _classify(error, "[::7f00:2]:80")
    assert failed.kind is ErrorKind.DESTINATION_UNAVAILABLE
    assert failed.detail == "[::7f00:2]:80: No route to host"
    other = _classify(OSError(errno.ECONNRESET, "Connect call failed (...)"), "h:80")
    assert other.detail == "h:80: Connection reset by peer"
