"""The proxy server: listeners, connection and tunnel registries, and shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import logging
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.netutil import add_accept_handler, bind_sockets

from eyewall.addons.api import Client, HTTPFlow
from eyewall.addons.runner import AddonFailed, Addons
from eyewall.config import Settings
from eyewall.errors import ErrorKind, ProxyError, error_page, status_of
from eyewall.flow import Flow
from eyewall.http1.target import Target
from eyewall.observe.events import EventBus
from eyewall.policy.engine import Policy
from eyewall.proxy.client import ClientConnection
from eyewall.proxy.streams import BoundedStream
from eyewall.proxy.tunnel import PipePool, Tunnel
from eyewall.proxy.upstream import Address, Resolver, UpstreamPool, default_tls_context
from eyewall.proxy.watchdog import Watchdog, sweep_interval
from eyewall.tls.leaves import LeafCache

__all__ = ["Proxy"]

log = logging.getLogger("eyewall")

STREAM_BUFFER = 8 << 20
PINNED_FOR = 3600.0  # seconds a host that refused interception is passed through


class Proxy:
    def __init__(
        self,
        settings: Settings,
        policy: Policy,
        bus: EventBus | None = None,
        addons: Addons | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.addons = addons or Addons()
        self.bus = bus or EventBus()
        t = settings.timeouts
        self.pool = UpstreamPool(
            Resolver(),
            self.refuse_self,
            t.upstream_connect,
            settings.pool.idle_per_origin,
            settings.pool.idle_timeout,
            default_tls_context(settings.tls.upstream_ca_bundle or None),
        )
        self.pipes = PipePool()
        self.watchdog = Watchdog(sweep_interval(_smallest_timeout(settings)))
        self.watchdog.add(self.pool)
        self.connections: set[ClientConnection] = set()
        self.tunnels: dict[Tunnel, tuple[Flow, float]] = {}
        self.draining = False
        self.addresses: list[tuple[str, int]] = []  # what the listeners are bound to
        self._listeners: list[tuple[socket.socket, Callable[[], None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._local_ips: set[str] = set()
        self._protected: list[tuple[str, int]] = []  # other listeners of this process
        self._leaves: LeafCache | None = None
        self._pinned: OrderedDict[str, float] = OrderedDict()  # host -> until (monotonic)
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(3)
        self._idle_event = asyncio.Event()

    # -- start and stop ----------------------------------------------------------------

    def start_listening(self) -> list[tuple[str, int]]:
        """Bind every configured address; returns the bound (host, port) pairs."""
        for endpoint in self.settings.listen:
            family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_UNSPEC
            for sock in bind_sockets(endpoint.port, endpoint.host, family=family, backlog=1024):
                _defer_accept(sock, self.settings.timeouts.client_header)
                self._listeners.append((sock, add_accept_handler(sock, self._accept)))
                host, port = sock.getsockname()[:2]
                self.addresses.append((host, port))
        self._local_ips = _local_addresses()
        self.watchdog.start()
        return self.addresses

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight work finish up to the drain deadline, then close."""
        self.draining = True
        self.stop_listening()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeouts.drain
        while (self.connections or self.tunnels) and loop.time() < deadline:
            self._idle_event.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self._idle_event.wait()
            except TimeoutError:
                break
        for tunnel in list(self.tunnels):
            tunnel.close(ConnectionAbortedError("proxy shutting down"))
        for conn in list(self.connections):
            conn.close()
        self.pool.close_all()
        self.pipes.close()
        if self._leaves is not None:
            self._leaves.close()
        self.watchdog.stop()
        await asyncio.sleep(0)  # let the closing connections run their finally blocks

    # -- connections -------------------------------------------------------------------

    def stop_listening(self) -> None:
        for sock, remove_handler in self._listeners:
            remove_handler()
            sock.close()
        self._listeners.clear()

    def _accept(self, sock: socket.socket, address: Any) -> None:
        stream = BoundedStream(sock, max_buffer_size=STREAM_BUFFER)
        task = asyncio.ensure_future(self._serve(stream, address))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: BoundedStream, address: Any) -> None:
        client = address[0]
        policy = self.policy
        refusal: tuple[ErrorKind, str] | None
        if self.draining:
            refusal = (ErrorKind.OVERLOADED, "shutting down")
        elif len(self.connections) >= self.settings.limits.max_connections:
            refusal = (ErrorKind.OVERLOADED, "too many connections")
            log.warning("refused connection from %s: too many connections", client)
        elif not policy.client_allowed(client):
            refusal = (ErrorKind.DENIED, f"client address {client} may not use this proxy")
        else:
            limited = policy.limits.client_connections.acquire(client)
            refusal = None if limited is None else (ErrorKind.RATE_LIMITED, limited.describe())
        if refusal is not None:
            await self._refuse(stream, (client, address[1]), *refusal)
            return
        addons = self.addons
        peer = Client((client, address[1])) if addons.enabled else None
        try:
            stream.set_nodelay(True)
            conn = ClientConnection(self, stream, address)
            self.connections.add(conn)
            self.watchdog.add(conn)
            if peer is not None and addons.has("client_connected"):
                await self._hook("client_connected", peer)
            await conn.serve()
        finally:
            policy.limits.client_connections.release(client)
            if peer is not None and addons.has("client_disconnected"):
                await self._hook("client_disconnected", peer)

    async def _hook(self, name: str, *args: Any) -> None:
        """Run an addon hook that cannot change the traffic (policy addons included)."""
        try:
            await self.addons.call(name, *args)
        except AddonFailed:
            pass  # logged by the runner; nothing to refuse at this point

    def _hook_later(self, name: str, flow: Flow) -> None:
        if self.addons.has(name):
            task = asyncio.ensure_future(self._hook(name, HTTPFlow(flow)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _refuse(
        self, stream: BoundedStream, client: tuple[str, int], kind: ErrorKind, detail: str
    ) -> None:
        """Answer a connection the proxy will not serve, and log it."""
        flow = Flow(self.next_id(), "http", client, time.time())
        flow.fail(kind, detail)
        flow.status = status_of(kind)
        page = error_page(kind, detail, flow.id, proxy_name=self.settings.via, close=True)
        started = time.monotonic()
        try:
            await stream.write(page)
        except StreamClosedError:
            pass
        finally:
            stream.close()
            self.end_flow(flow, started)

    def reload(self, settings: Settings, policy: Policy) -> None:
        """Apply new settings and policy to new requests; connections stay up."""
        if settings.listen != self.settings.listen:
            log.warning("listen addresses changed in the configuration: restart to apply")
            settings = dataclasses.replace(settings, listen=self.settings.listen)
        self.settings = settings
        self.policy.verifier.shutdown(wait=False)
        self.policy = policy
        self.pool.connect_timeout = settings.timeouts.upstream_connect
        self.pool.idle_per_origin = settings.pool.idle_per_origin
        self.pool.idle_timeout = settings.pool.idle_timeout
        self.pool.tls_context = default_tls_context(settings.tls.upstream_ca_bundle or None)
        self.watchdog.set_interval(sweep_interval(_smallest_timeout(settings)))

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.watchdog.discard(conn)
        if self.draining:
            self._idle_event.set()

    def open_tunnel(self, tunnel: Tunnel, flow: Flow, t_start: float) -> None:
        flow.deferred = True
        self.tunnels[tunnel] = (flow, t_start)
        self.watchdog.add(tunnel)
        tunnel.start()
        self.bus.emit("tunnel_open", flow)
        self._hook_later("tunnel_start", flow)

    def tunnel_closed(self, tunnel: Tunnel, error: BaseException | None) -> None:
        self.watchdog.discard(tunnel)
        flow, t_start = self.tunnels.pop(tunnel)
        flow.bytes_in = tunnel.bytes_up
        flow.bytes_out = tunnel.bytes_down
        if isinstance(error, TimeoutError):
            flow.fail(ErrorKind.BODY_STALLED, "tunnel idle timeout")
        elif isinstance(error, ConnectionAbortedError):
            flow.fail(ErrorKind.CLIENT_ABORTED, str(error))
        elif error is not None and tunnel.failed_side == "client":
            flow.fail(ErrorKind.CLIENT_ABORTED, f"client ended the tunnel: {error}")
        elif error is not None:
            flow.fail(ErrorKind.UPSTREAM_RESET, f"origin ended the tunnel: {error}")
        flow.deferred = False
        if flow.release is not None:
            flow.release()
        self.end_flow(flow, t_start)
        self._hook_later("tunnel_end", flow)
        if self.draining:
            self._idle_event.set()

    # -- flows -------------------------------------------------------------------------

    def next_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids):x}"

    def end_flow(self, flow: Flow, t_start: float) -> None:
        if flow.deferred:
            return  # a tunnel reports it when it closes
        flow.duration = time.monotonic() - t_start
        self.bus.emit("flow_end", flow)

    # -- self-protection ---------------------------------------------------------------

    def refuse_self(self, target: Target, addrs: list[Address]) -> list[Address]:
        """Refuse a destination that is one of this proxy's own listeners."""
        for _, sockaddr in addrs:
            if self.is_own_listener(sockaddr[0], sockaddr[1]):
                raise ProxyError(ErrorKind.LOOP, "request aimed at the proxy itself")
        return addrs

    # -- interception ---------------------------------------------------------------

    def certificates(self) -> LeafCache:
        """The minted-certificate cache for the current CA (made on first use)."""
        ca = self.policy.ca
        if ca is None:
            raise ValueError("no interception CA loaded (run eyewall ca init)")
        if self._leaves is None or self._leaves.ca is not ca:
            if self._leaves is not None:
                self._leaves.close()
            self._leaves = LeafCache(ca, self.settings.tls.certificate_cache)
        return self._leaves

    def client_refused(self, host: str) -> None:
        if self.settings.tls.passthrough_pinned:
            self._pinned[host] = time.monotonic() + PINNED_FOR
            while len(self._pinned) > 10_000:
                self._pinned.popitem(last=False)
            log.warning("%s will be tunnelled without interception for an hour", host)

    def is_pinned(self, host: str) -> bool:
        until = self._pinned.get(host)
        if until is None:
            return False
        if until < time.monotonic():
            del self._pinned[host]
            return False
        return True

    def protect(self, address: tuple[str, int]) -> None:
        """Refuse requests aimed at ``address`` too (the admin listener)."""
        self._protected.append(address)

    def is_own_listener(self, host: str, port: int) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for bound_host, bound_port in (*self.addresses, *self._protected):
            if bound_port != port:
                continue
            bound = ipaddress.ip_address(bound_host)
            if bound == ip:
                return True
            if bound.is_unspecified and (
                ip.is_loopback or ip.is_unspecified or str(ip) in self._local_ips
            ):
                return True
        return False


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


def _smallest_timeout(settings: Settings) -> float:
    t = settings.timeouts
    return min(t.client_header, t.keepalive_idle, t.upstream_head, t.body_idle, t.tunnel_idle,
               settings.pool.idle_timeout)  # fmt: skip


def _local_addresses() -> set[str]:
    """Addresses of this host as its name resolves (for wildcard listeners)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return set()
    return {str(info[4][0]) for info in infos}
