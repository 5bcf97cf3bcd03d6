"""In-process harness for the request lifecycle: a fake `ProxyContext` with an injected
clock, a client connection served over a socket pair, and scripted origins on loopback
port 0 — all in the test's own event loop, no subprocess and no sleep.

Time only moves when a test says so (``ctx.advance(seconds)`` moves the clock and runs
the watchdog's sweep), and tests wait for conditions by yielding to the loop
(`until`), never for a duration.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from eyewall.addons.runner import Addons
from eyewall.app import build_policy
from eyewall.config import Settings, load_settings
from eyewall.flow import Flow
from eyewall.policy.engine import Policy
from eyewall.policy.networks import OwnListeners
from eyewall.policy.state import AdmissionState
from eyewall.proxy.client import ClientConnection
from eyewall.proxy.intercept import Interception
from eyewall.proxy.streams import BoundedStream
from eyewall.proxy.timeouts import Watchdog
from eyewall.proxy.tunnel import PipePool, Relay
from eyewall.proxy.upstream import UpstreamPool
from eyewall.proxy.verifier import Verifier

DEFAULTS = {"access.allow_private": True, "access.connect_ports": ["1-65535"]}


async def until(condition: Callable[[], object], what: str = "", rounds: int = 20_000) -> None:
    """Yield to the loop until ``condition()`` holds (bounded in rounds, not seconds);
    real sockets need real loop turns, so a round may wait for I/O briefly."""
    for i in range(rounds):
        if condition():
            return
        await asyncio.sleep(0 if i < 1000 else 0.001)
    raise AssertionError(f"never happened: {what or condition}")


class FakeContext:
    """A `ProxyContext` for tests: real pool, policy and state; a clock the test moves;
    finished flows collected in ``flows``."""

    def __init__(self, addons: Addons | None = None, **overrides: Any) -> None:
        self.settings: Settings = load_settings(overrides={**DEFAULTS, **overrides})
        self.policy: Policy = build_policy(self.settings)
        self.state = AdmissionState()
        self.own = OwnListeners()
        self.pool = UpstreamPool(8, self.settings.pool.idle_timeout)
        self.pipes = PipePool()
        self.addons = addons or Addons()
        self.now = 1000.0
        self.watchdog = Watchdog(1.0, self.clock)  # never started: `advance` sweeps
        self.verifier = Verifier()
        self.interception = Interception(None)
        self.flows: list[Flow] = []
        self.tunnels: list[Relay] = []
        self.closed: list[object] = []
        self._draining = False
        self._ids = 0

    @property
    def draining(self) -> bool:
        return self._draining

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock and sweep, as the watchdog would."""
        self.now += seconds
        self.watchdog.sweep()

    def new_flow(self, client: tuple[str, int]) -> Flow:
        """As the proxy's, on the test's clock (``started`` and ``t_start``)."""
        self._ids += 1
        flow = Flow(f"t-{self._ids}", "http", client, self.now)
        flow.t_start = self.now
        return flow

    def end_flow(self, flow: Flow) -> None:
        """As the proxy's, on the test's clock: the duration, then the flow is kept."""
        flow.duration = self.now - flow.t_start
        self.flows.append(flow)

    def open_tunnel(self, relay: Relay, flow: Flow, release: Callable[[], None]) -> None:
        def closed(relay: Relay, error: BaseException | None) -> None:
            release()
            self.end_flow(flow)

        relay.on_close = closed
        self.tunnels.append(relay)
        self.watchdog.add(relay)
        relay.start()

    def connection_closed(self, conn: object) -> None:
        self.closed.append(conn)

    def close(self) -> None:
        self.pool.close_all()
        self.pipes.close()
        self.verifier.close()


class BlackHole:
    """Stands in for `UpstreamPool.open_socket`: a connect nobody answers (a SYN that is
    dropped); ``opened`` lists the targets asked for."""

    def __init__(self) -> None:
        self.opened: list[object] = []

    async def __call__(self, target: object, addresses: object) -> object:
        self.opened.append(target)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class Client:
    """The test's end of a client connection served by a `ClientConnection`: a socket
    pair, or with ``rcvbuf`` a loopback TCP connection whose client end has that
    receive buffer (for tests of what TCP's send buffers do)."""

    def __init__(self, ctx: FakeContext, rcvbuf: int = 0) -> None:
        if rcvbuf:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                self.sock = socket.socket()
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                self.sock.connect(listener.getsockname())
                theirs, _ = listener.accept()
        else:
            self.sock, theirs = socket.socketpair()
        self.sock.setblocking(False)
        self.ctx = ctx
        self.conn = ClientConnection(ctx, BoundedStream(theirs), ("127.0.0.1", 40000))  # type: ignore[arg-type]
        ctx.watchdog.add(self.conn)
        self.task = asyncio.ensure_future(self.conn.serve())
        self.received = b""

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv_some(self) -> bytes:
        chunk = await asyncio.get_running_loop().sock_recv(self.sock, 1 << 20)
        self.received += chunk
        return chunk

    async def response(self) -> bytes:
        """Everything until the proxy closes the connection."""
        while await self.recv_some():
            pass
        return self.received

    async def until_received(self, needle: bytes) -> bytes:
        while needle not in self.received:
            if not await self.recv_some():
                raise AssertionError(f"closed before {needle!r}: {self.received!r}")
        return self.received

    async def finish(self) -> None:
        self.sock.close()
        await asyncio.wait_for(self.task, 5)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Origin:
    """A scripted origin on 127.0.0.1, port 0."""

    def __init__(self, server: asyncio.Server) -> None:
        self.server = server
        self.port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, handler: Handler) -> Origin:
        async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        return cls(await asyncio.start_server(guarded, "127.0.0.1", 0))

    async def close(self) -> None:
        self.server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """A request head (an origin's helper)."""
    return await reader.readuntil(b"\r\n\r\n")


def status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])
