"""The proxy server: listeners, the registries of connections and tunnels, reload, and
shutdown.  `Proxy` is the `ProxyContext` every client connection works in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets

from eyewall.addons.api import Client, HTTPFlow
from eyewall.addons.hooks import ClientConnected, ClientDisconnected, Hook, TunnelEnd, TunnelStart
from eyewall.addons.runner import AddonFailed, Addons
from eyewall.config import Endpoint, Settings
from eyewall.errors import ErrorKind, error_answer
from eyewall.flow import Flow
from eyewall.policy.engine import Policy
from eyewall.policy.networks import OwnListeners
from eyewall.policy.state import AdmissionState, LimitsStore, LimitsUnavailable
from eyewall.proxy.admission import pending, settled
from eyewall.proxy.client import ClientConnection, render_answer, request_line_hint
from eyewall.proxy.intercept import HandshakeFailed, Interception, accept_tls
from eyewall.proxy.proxied import ProxyProtocolGate
from eyewall.proxy.streams import (
    STREAM_BUFFER,
    STREAM_CHUNK,
    BoundedStream,
    lingering_close,
    unread,
)
from eyewall.proxy.timeouts import Watchdog, sweep_interval
from eyewall.proxy.tunnel import PipePool, Relay
from eyewall.proxy.upstream import (
    UpstreamPool,
    default_tls_context,
    format_address,
    is_local_address,
)
from eyewall.proxy.verifier import Verifier
from eyewall.tls.ca import CertificateAuthority
from eyewall.tls.layers import INTERNAL_ERROR, alert, starts_tls

__all__ = ["LoginRevoked", "Proxy", "ProxyStopped", "bind_endpoint"]

log = logging.getLogger("eyewall")

ACCEPT_BATCH = 128  # connections accepted per wake-up at most (Tornado's number)
REFUSAL_WAIT = 1.0  # seconds a refused HTTPS-listener client has to show it speaks TLS
ACCEPT_PAUSE = 0.005  # seconds a process declining to accept leaves it to the others
CUT_GRACE = 1.0  # seconds connections cut at the drain deadline have to end and be recorded


class LoginRevoked(Exception):
    """A tunnel's user was removed from the user file: the tunnel is closed."""


class ProxyStopped(Exception):
    """The proxy stopped with the tunnel still open (the drain deadline, or a second
    stop signal): recorded as `connection_terminated`, as exchanges cut then are."""


class Proxy:
    """Listeners and everything the connections share (see `ProxyContext`).

    ``state`` (admission counters) outlives reloads and may be shared with the caller;
    ``publish`` receives every finished flow; ``clock`` is the monotonic time the
    limits and phases use (time.monotonic, the event loop's own clock, unless a test
    injects one).
    """

    def __init__(
        self,
        settings: Settings,
        policy: Policy,
        *,
        state: LimitsStore | None = None,
        addons: Addons | None = None,
        ca: CertificateAuthority | None = None,
        publish: Callable[[Flow], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.state: LimitsStore = state or AdmissionState()
        self.addons = addons or Addons()
        self.publish = publish or (lambda flow: None)
        # asyncio's loop.time() is time.monotonic(); calling it directly spares a
        # loop lookup on every phase change
        self.clock: Callable[[], float] = clock or time.monotonic
        self.pool = UpstreamPool(
            settings.pool.idle_per_origin,
            settings.pool.idle_timeout,
            default_tls_context(settings.tls.upstream_ca_bundle or None),
        )
        self.pipes = PipePool()
        self.verifier = Verifier()
        self.interception = Interception(ca, settings.tls.certificate_cache)
        self.watchdog = Watchdog(
            sweep_interval(settings.timeouts, settings.pool.idle_timeout), self.clock
        )
        self.watchdog.add(self.pool)
        self.own = OwnListeners()
        pp = settings.proxy_protocol
        self.proxy_protocol = ProxyProtocolGate(pp.trusted, pp.header_timeout)
        self.connections: set[ClientConnection] = set()
        self.tunnels: dict[Relay, tuple[Flow, Callable[[], None]]] = {}
        self.stopping = False  # SIGTERM seen: /healthz says 503 (listeners may still serve)
        self._draining = False  # new responses close their connection; no new connections
        self.addresses: list[tuple[str, int]] = []  # what the proxy listeners are bound to
        self.bound: dict[tuple[str, str], list[socket.socket]] = {}  # (setting, endpoint)
        self.protected: list[tuple[str, int]] = []  # other listeners of this process
        self._listeners: list[tuple[socket.socket, Callable[[], None]]] = []
        # Asked before each accept (workers sharing the socket: is another one less
        # busy?); False pauses this process's accepting for ACCEPT_PAUSE seconds.
        self.accept_gate: Callable[[], bool] | None = None
        self.accepted = 0  # client connections accepted and not yet ended (any state)
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(3)
        self._idle = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop signal: the drain deadline is now
        self._local: dict[str, bool] = {}

    # -- the context the connections see ------------------------------------------------

    @property
    def draining(self) -> bool:
        """Whether the proxy is shutting down (no new requests on kept-alive connections)."""
        return self._draining

    def new_flow(self, client: tuple[str, int]) -> Flow:
        """A new flow record for a request from ``client`` (IP, port), its id unique in this
        process."""
        flow = Flow(f"{self._id_prefix}-{next(self._ids):x}", "http", client, time.time())
        flow.t_start = time.monotonic()
        return flow

    def end_flow(self, flow: Flow) -> None:
        """Set the flow's duration and publish it to the observers."""
        flow.duration = time.monotonic() - flow.t_start
        self.publish(flow)

    def open_tunnel(self, relay: Relay, flow: Flow, release: Callable[[], None]) -> None:
        """Start relaying ``relay`` under the watchdog; ``release`` frees its admission slots
        when it closes."""
        self.tunnels[relay] = (flow, release)
        relay.on_close = self._tunnel_closed
        self.watchdog.add(relay)
        relay.start()
        self._hook_later(TunnelStart, flow)

    def connection_closed(self, conn: object) -> None:
        """Forget a closed client connection and free its connection slot."""
        assert isinstance(conn, ClientConnection)
        self.connections.discard(conn)
        self.watchdog.discard(conn)
        self._release("client_connections", conn.address[0])
        if self._draining:
            self._idle.set()

    def _release(self, counter: str, key: str) -> None:
        result = self.state.release(counter, key)
        if pending(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- listening -----------------------------------------------------------------------

    def start_listening(
        self, bound: Mapping[tuple[str, str], list[socket.socket]] | None = None
    ) -> list[tuple[str, int]]:
        """Bind every configured address (``listen`` and ``tls.listen``); returns the
        bound (host, port) pairs.  ``bound`` holds sockets already bound (by a
        supervisor, or inherited from the generation before), by (setting, endpoint
        text): those are used instead.  Raises OSError naming the address and the
        setting."""
        tls = self.settings.tls
        server_tls = _server_context(tls.certificate, tls.key) if tls.listen else None
        for setting, endpoints, secure in (
            ("listen", self.settings.listen, None),
            ("tls.listen", tls.listen, server_tls),
        ):
            for endpoint in endpoints:
                given = bound.get((setting, str(endpoint))) if bound else None
                sockets = given or bind_endpoint(endpoint, setting)
                self.bound[(setting, str(endpoint))] = sockets
                for sock in sockets:
                    _defer_accept(sock, self.settings.timeouts.client_header)

                    def accept(s: socket.socket, address: Any, secure: Any = secure) -> None:
                        self._accept(s, address, secure)

                    remove = _accept_handler(sock, accept, ACCEPT_BATCH, self.accept_gate)
                    self._listeners.append((sock, remove))
                    self.addresses.append(sock.getsockname()[:2])
        self._refresh_own()
        self.watchdog.start()
        return self.addresses

    def protect(self, addresses: list[tuple[str, int]]) -> None:
        """Refuse requests aimed at ``addresses`` too (the admin listener's sockets)."""
        self.protected.extend(addresses)
        self._refresh_own()

    def _refresh_own(self) -> None:
        self.own = OwnListeners([*self.addresses, *self.protected], self._is_local)

    def _is_local(self, address: str) -> bool:
        """Whether ``address`` belongs to this host (cached; asked only for addresses
        aimed at one of the proxy's own ports)."""
        known = self._local.get(address)
        if known is None:
            known = is_local_address(address)
            if len(self._local) > 4096:
                self._local.clear()
            self._local[address] = known
        return known

    def stop_listening(self) -> None:
        """Close the listening sockets (existing connections carry on)."""
        for sock, remove_handler in self._listeners:
            remove_handler()
            sock.close()
        self._listeners.clear()

    def _accept(self, sock: socket.socket, address: Any, secure: ssl.SSLContext | None) -> None:
        if self.proxy_protocol.enabled and self._relayed(sock):
            self._spawn(self._serve_relayed(sock, address, secure))
            return
        stream = BoundedStream(sock, max_buffer_size=STREAM_BUFFER)
        self._spawn(self._serve(stream, address, secure))

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        self.accepted += 1
        task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.accepted -= 1

    def _relayed(self, sock: socket.socket) -> bool:
        """Whether the connection ``sock`` reached a listener that takes PROXY headers
        from trusted peers (proxy_protocol.listeners; empty: every listener)."""
        listeners = self.settings.proxy_protocol.listeners
        if not listeners:
            return True
        try:
            local = sock.getsockname()
        except OSError:
            return True  # gone already: the gate will find nothing to read
        return any(_serves(endpoint, local[0], local[1]) for endpoint in listeners)

    async def _serve_relayed(
        self, sock: socket.socket, peer: Any, secure: ssl.SSLContext | None
    ) -> None:
        """Serve a connection to a listener that takes PROXY headers from trusted peers
        (`eyewall.proxy.proxied`): the client is the one the header names."""
        try:
            client = await self.proxy_protocol.client_of(sock, (peer[0], peer[1]))
        except BaseException:
            sock.close()
            raise
        if client is None:
            sock.close()
            return
        await self._serve(BoundedStream(sock, max_buffer_size=STREAM_BUFFER), client, secure)

    async def _serve(self, stream: IOStream, address: Any, secure: ssl.SSLContext | None) -> None:
        client = (address[0], address[1])
        refusal: tuple[ErrorKind, str] | None = None
        # Accepted before the listeners closed: served (one exchange, then closed) even
        # when draining has begun since — its request is on its way, maybe already here.
        if len(self.connections) >= self.settings.limits.max_connections:
            refusal = (ErrorKind.OVERLOADED, "too many connections")
            log.warning("refused connection from %s: too many connections", client[0])
        else:
            maximum = self.policy.limits.client_connections
            try:
                counted = await settled(
                    self.state.acquire("client_connections", client[0], maximum)
                )
            except LimitsUnavailable as e:  # a shared store that fails closed
                refusal = (ErrorKind.OVERLOADED, str(e))
            else:
                if not counted:
                    refusal = (
                        ErrorKind.RATE_LIMITED,
                        f"rate limit client_connections reached for {client[0]}",
                    )
        if refusal is not None:
            await self._refuse(stream, client, *refusal, secure=secure is not None)
            return
        stream.set_nodelay(True)
        if secure is not None:
            deadline = self.settings.tls.handshake_timeout
            started = time.monotonic()
            try:
                first = await _first_bytes(stream, deadline)
                if first is None:
                    log.info("%s sent no TLS handshake in time", format_address(client))
                elif not starts_tls(first):
                    await self._plain_to_tls(stream, client, first)
                    first = None
                if first is None:
                    self._release("client_connections", client[0])
                    stream.close()
                    return
                unread(stream, first)
                remaining = max(0.0, deadline - (time.monotonic() - started))
                stream = await accept_tls(stream, secure, remaining)
            except HandshakeFailed as e:
                log.info("TLS handshake with %s failed: %s", format_address(client), e)
                self._release("client_connections", client[0])
                return
        conn = ClientConnection(self, stream, client, secure=secure is not None)
        self.connections.add(conn)
        self.watchdog.add(conn)
        addons = self.addons
        peer = Client(client) if addons.enabled else None
        try:
            if peer is not None and addons.has(ClientConnected):
                await self._hook(ClientConnected(peer))
            await conn.serve()
        finally:
            if peer is not None and addons.has(ClientDisconnected):
                await self._hook(ClientDisconnected(peer))

    async def _refuse(
        self,
        stream: IOStream,
        client: tuple[str, int],
        kind: ErrorKind,
        detail: str,
        secure: bool = False,
        request: bytes = b"",
    ) -> None:
        """Answer a connection the proxy will not serve (before reading a request), and
        close it.  On an HTTPS listener (``secure``) a client that starts a TLS
        handshake gets a fatal internal_error alert, not a plain-text page it would
        take for a broken record; the reason is in the log and the flow.  ``request``:
        what the client sent already, for the record's method and URL."""
        flow = self.new_flow(client)
        flow.method, flow.url = request_line_hint(request)
        flow.fail(kind, detail)
        if kind is ErrorKind.RATE_LIMITED:
            flow.cause = "client_connections"
        status, fields, body = error_answer(kind, detail, flow.id, self.settings.via)
        flow.status = status
        flow.bytes_out = len(body)
        try:
            first = await _first_bytes(stream, REFUSAL_WAIT) if secure else b""
            if first is None:
                return
            if starts_tls(first):
                flow.bytes_out = 0
                await stream.write(alert(INTERNAL_ERROR))
            else:
                await stream.write(render_answer("GET", status, fields, body, True))
            await lingering_close(stream, seconds=1.0)
        except StreamClosedError:
            pass
        finally:
            stream.close()
            self.end_flow(flow)

    async def _plain_to_tls(self, stream: IOStream, client: tuple[str, int], first: bytes) -> None:
        """A client spoke plain HTTP to an HTTPS proxy listener (``first``: its first
        bytes): answer 400 in plain text, saying which proxy URL to use, and close."""
        detail = (
            "this is an HTTPS proxy listener (tls.listen): use an https:// proxy URL here,"
            " or the plain listener (listen) for http:// proxy URLs"
        )
        log.warning("%s spoke plain HTTP to the HTTPS proxy listener", format_address(client))
        await self._refuse(stream, client, ErrorKind.BAD_REQUEST, detail, request=first)

    # -- addons ------------------------------------------------------------------------

    async def _hook(self, hook: Hook) -> None:
        """Run an addon hook that cannot change the traffic (policy addons included)."""
        try:
            await self.addons.call(hook)
        except AddonFailed:
            pass  # logged by the runner; nothing to refuse at this point

    def _hook_later(self, hook: type[TunnelStart] | type[TunnelEnd], flow: Flow) -> None:
        if self.addons.has(hook):
            task = asyncio.ensure_future(self._hook(hook(HTTPFlow(flow))))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- tunnels -----------------------------------------------------------------------

    def _tunnel_closed(self, relay: Relay, error: BaseException | None) -> None:
        self.watchdog.discard(relay)
        flow, release = self.tunnels.pop(relay)
        flow.bytes_in = relay.bytes_up
        flow.bytes_out = relay.bytes_down
        if isinstance(error, TimeoutError):
            flow.fail(ErrorKind.TUNNEL_IDLE, "no byte either way for timeouts.tunnel_idle")
        elif isinstance(error, LoginRevoked):
            flow.cause = "revoked"
            flow.fail(ErrorKind.AUTH_REQUIRED, "the user was removed from the user file")
        elif isinstance(error, ProxyStopped):
            flow.fail(ErrorKind.CONNECTION_TERMINATED, str(error))
        elif error is not None and relay.failed_side == "client":
            flow.fail(ErrorKind.CLIENT_ABORTED, f"client ended the tunnel: {error}")
        elif error is not None:
            flow.fail(ErrorKind.CONNECTION_TERMINATED, f"origin ended the tunnel: {error}")
        release()
        self.end_flow(flow)
        self._hook_later(TunnelEnd, flow)
        if self._draining:
            self._idle.set()

    # -- reload and shutdown -------------------------------------------------------------

    def reload(self, settings: Settings, policy: Policy, ca: CertificateAuthority | None) -> None:
        """Apply new settings and policy to new requests; connections stay up and the
        admission state (limits, counters, failed logins) is kept."""
        self.settings = settings
        self.policy = policy
        self.interception.ca = ca
        forgotten = self.interception.forget_pinned()
        if forgotten:
            log.info(
                "intercepting again the %d host(s) pinned clients were tunnelled to", forgotten
            )
        pp = settings.proxy_protocol
        self.proxy_protocol.configure(pp.trusted, pp.header_timeout)
        pool = self.pool
        pool.idle_per_origin = settings.pool.idle_per_origin
        pool.idle_timeout = settings.pool.idle_timeout
        pool.tls_context = default_tls_context(settings.tls.upstream_ca_bundle or None)
        self.watchdog.set_interval(sweep_interval(settings.timeouts, settings.pool.idle_timeout))
        self._end_revoked(policy)

    def _end_revoked(self, policy: Policy) -> None:
        """Close the tunnels of users the new user file no longer has (removing a user
        revokes what they have open, not only their next login); an intercepted
        tunnel's next request is answered 407 and the tunnel closed (`ClientConnection`)."""
        users = policy.users
        if not users.enabled:
            return
        for relay, (flow, _) in list(self.tunnels.items()):
            if flow.user is not None and users.stored(flow.user) is None:
                log.info("closing %s's tunnel %s: no longer in the user file", flow.user, flow.id)
                relay.close(LoginRevoked(flow.user))

    def hurry(self) -> bool:
        """End the drain now (a second stop signal): what is still in flight is cut,
        answered where it can be and recorded, as at the drain deadline.  False when it
        was hurried already."""
        if self._hurry.is_set():
            return False
        self._hurry.set()
        self._idle.set()  # wakes `_settle`
        return True

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or until hurried."""
        try:
            async with asyncio.timeout(seconds):
                await self._hurry.wait()
        except TimeoutError:
            pass

    async def _settle(self, seconds: float, tunnels: bool, hurried: bool = True) -> None:
        """Wait up to ``seconds`` for the client connections (and the tunnels, if
        ``tunnels``) to end; each one that ends wakes the wait (`connection_closed`).
        Unless ``hurried`` is False, `hurry` ends the wait too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (
            (self.connections or (tunnels and self.tunnels))
            and loop.time() < deadline
            and not (hurried and self._hurry.is_set())
        ):
            self._idle.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self._idle.wait()
            except TimeoutError:
                return

    async def shutdown(self, grace: float = 0.0) -> None:
        """Stop: for ``grace`` seconds keep serving while health checks say 503 (a load
        balancer stops sending), then stop accepting, let in-flight work finish up to
        the drain deadline (timeouts.drain), and close the rest."""
        self.stopping = True
        if grace > 0:
            await self._pause(grace)
        self._draining = True
        self.stop_listening()
        for conn in list(self.connections):
            if conn.idle():
                conn.stream.close()
        await self._settle(self.settings.timeouts.drain, tunnels=True)
        why = (
            "the proxy was told to stop at once (a second stop signal)"
            if self._hurry.is_set()
            else "the proxy stopped at its drain deadline"
        )
        for relay in list(self.tunnels):
            relay.close(ProxyStopped(why))
        for conn in list(self.connections):
            # it may wait on its origin (a connect, a response head): cut that too
            if not conn.abort(why):
                conn.stream.close()
        # Let the cut exchanges end and be recorded (each is a few loop turns away).
        await self._settle(CUT_GRACE, tunnels=False, hurried=False)
        self.pool.close_all()
        self.pipes.close()
        self.interception.close()
        self.verifier.close()
        self.watchdog.stop()
        await asyncio.sleep(0)  # let the closing connections run their finally blocks


def _accept_handler(
    sock: socket.socket,
    callback: Callable[[socket.socket, Any], None],
    batch: int,
    gate: Callable[[], bool] | None = None,
) -> Callable[[], None]:
    """Call ``callback(connection, address)`` for connections accepted on ``sock``, at
    most ``batch`` per wake-up (`tornado.netutil.add_accept_handler` with the batch
    as a parameter); when ``gate()``, asked before each, says no, stop watching
    ``sock`` for `ACCEPT_PAUSE` seconds (the connections wait for another process sharing the
    socket).  Returns the function that stops it."""
    loop = IOLoop.current()
    removed = False
    paused = False

    def resume() -> None:
        nonlocal paused
        paused = False
        if not removed:
            loop.add_handler(sock, accept, IOLoop.READ)

    def accept(fd: Any, events: int) -> None:
        nonlocal paused
        for _ in range(batch):
            if removed:
                return
            if gate is not None and not gate():
                paused = True
                loop.remove_handler(sock)
                loop.call_later(ACCEPT_PAUSE, resume)
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            callback(connection, address)

    def remove() -> None:
        nonlocal removed
        if not paused:
            loop.remove_handler(sock)
        removed = True

    loop.add_handler(sock, accept, IOLoop.READ)
    return remove


def _serves(endpoint: Endpoint, host: str, port: int) -> bool:
    """Whether a listener on ``endpoint`` accepts connections to ``host``:``port`` (the
    wildcard addresses take every address; localhost, the loopback ones)."""
    if endpoint.port != port:
        return False
    if endpoint.host in ("0.0.0.0", "::"):
        return True
    local = ipaddress.ip_address(host.partition("%")[0])
    if local.version == 6 and local.ipv4_mapped is not None:
        local = local.ipv4_mapped
    if endpoint.host == "localhost":
        return local.is_loopback
    return local == ipaddress.ip_address(endpoint.host)


def bind_endpoint(endpoint: Endpoint, setting: str) -> list[socket.socket]:
    """Listening sockets for ``endpoint`` (two for "localhost": IPv4 and IPv6).  Raises
    OSError naming the address and ``setting``."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_UNSPEC
    try:
        return bind_sockets(endpoint.port, endpoint.host, family=family, backlog=1024)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {endpoint} ({setting}): {e.strerror}") from None


async def _first_bytes(stream: IOStream, seconds: float) -> bytes | None:
    """The first bytes a client sends (at most STREAM_CHUNK), or None when it sends
    none within ``seconds`` or leaves."""
    try:
        async with asyncio.timeout(seconds):
            return await stream.read_bytes(STREAM_CHUNK, partial=True)
    except (TimeoutError, StreamClosedError):
        return None


def _no_passphrase() -> bytes:
    raise ssl.SSLError("the key is encrypted (tls.key)")  # never a terminal prompt


def _server_context(certificate: str, key: str) -> ssl.SSLContext:
    """The TLS context of the HTTPS proxy listeners.  Raises OSError or ssl.SSLError."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certificate, key, password=_no_passphrase)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _defer_accept(sock: socket.socket, seconds: float) -> None:
    """Linux: wake the proxy for a new connection only once its first bytes arrived.

    Saves an event-loop round trip on every new connection (the request is readable
    at accept), and connections that never send anything never reach the proxy.
    """
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(seconds)))
        except OSError:
            pass
