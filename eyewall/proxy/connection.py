"""One client connection: read request heads in order, answer each, keep alive.

Requests are handled one at a time, so pipelined requests are answered in order; the
next head waits in the stream's buffer.  A CONNECT (or a WebSocket upgrade) ends the
loop by handing the socket to a tunnel.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from time import monotonic
from typing import TYPE_CHECKING

from tornado.iostream import IOStream, SSLIOStream, StreamClosedError

from eyewall.addons.flow import HTTPFlow, Request
from eyewall.addons.runner import AddonFailed
from eyewall.errors import ErrorKind, ProxyError, error_page, status_of
from eyewall.http1.fields import render_response
from eyewall.http1.framing import BodyKind, body_framing, keep_alive
from eyewall.http1.parse import ParseError, RequestHead, parse_request_head
from eyewall.http1.target import Target, TargetError, parse_authority, parse_target
from eyewall.observe.flow import Flow
from eyewall.policy.engine import RateLimiters
from eyewall.policy.rules import Action, Decision
from eyewall.proxy.forward import Exchange
from eyewall.proxy.gate import admit, admit_now
from eyewall.proxy.streams import (
    HEAD_END,
    buffered_size,
    complete,
    lingering_close,
    read_block,
    take_over,
)
from eyewall.proxy.tunnel import Tunnel

if TYPE_CHECKING:
    from eyewall.proxy.server import Proxy

__all__ = ["ClientConnection"]

log = logging.getLogger("eyewall.connection")

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class ClientConnection:
    __slots__ = (
        "address",
        "busy",
        "exchange",
        "head_started",
        "local",
        "loop",
        "proxy",
        "requests",
        "since",
        "stream",
        "t_head",
        "tunnel",
    )

    def __init__(self, proxy: Proxy, stream: IOStream, address: tuple[str, int]) -> None:
        self.proxy = proxy
        self.stream = stream
        self.address = (address[0], address[1])
        self.loop = asyncio.get_running_loop()
        self.since = self.loop.time()  # start of the current idle period
        self.head_started: float | None = None  # when the watchdog first saw head bytes
        self.requests = 0
        self.busy = False
        self.exchange: Exchange | None = None
        self.t_head = 0.0
        self.tunnel: Target | None = None  # set while serving an intercepted tunnel

    # -- watchdog ----------------------------------------------------------------------

    def check(self, now: float) -> None:
        if self.exchange is not None:
            self.exchange.check(now)
            return
        if self.busy or self.stream.closed():
            return
        t = self.proxy.settings.timeouts
        if buffered_size(self.stream):
            if self.head_started is None:
                self.head_started = now
            elif now - self.head_started >= t.client_header:
                self._request_timeout()
        elif now - self.since >= (t.client_header if self.requests == 0 else t.keepalive_idle):
            self.stream.close()

    def _request_timeout(self) -> None:
        flow = self._new_flow()
        flow.fail(ErrorKind.CLIENT_TIMEOUT, "request head not received in time")
        flow.status = status_of(ErrorKind.CLIENT_TIMEOUT)
        page = error_page(
            ErrorKind.CLIENT_TIMEOUT,
            flow.error_detail,
            flow.id,
            proxy_name=self.proxy.settings.via,
            close=True,
        )
        try:
            self.stream.write(page)
        except StreamClosedError:
            pass
        self.loop.call_soon(self.stream.close)
        self.proxy.end_flow(flow, monotonic())

    # -- the request loop --------------------------------------------------------------

    async def serve(self) -> None:
        limit = self.proxy.settings.limits.max_header_size
        try:
            while True:
                stream = self.stream  # changes once if a CONNECT is intercepted
                data = await read_block(stream, HEAD_END, limit)
                self.t_head = monotonic()
                self.head_started = None
                self.requests += 1
                self.busy = True
                if not await self._handle(data) or self.proxy.draining or self.stream.closed():
                    break
                self.busy = False
                self.since = self.loop.time()
        except StreamClosedError:
            pass
        finally:
            self.stream.close()
            self.proxy.connection_closed(self)

    def _new_flow(self) -> Flow:
        return Flow(self.proxy.next_id(), "http", self.address, time.time())

    async def _handle(self, data: bytes) -> bool:
        """Answer one request; True if the connection may carry another."""
        flow = self._new_flow()
        try:
            return await self._dispatch(data, flow)
        except StreamClosedError:
            raise
        except Exception:
            # A bug must cost one exchange, never the proxy: log it, answer 500 if
            # nothing was sent yet, and drop this connection only.
            log.exception("internal error handling %s %s", flow.id, flow.url)
            exchange = self.exchange
            if (exchange is None or not exchange.responded) and not self.stream.closed():
                await self.answer_error(flow, ErrorKind.INTERNAL, "internal error", close=True)
            flow.fail(ErrorKind.INTERNAL, "internal error")
            self.stream.close()
            return False
        finally:
            self.exchange = None
            self.proxy.end_flow(flow, self.t_head)

    async def _dispatch(self, data: bytes, flow: Flow) -> bool:
        limits = self.proxy.settings.limits
        if not complete(data):
            first_line_ends = data.find(b"\n")
            if first_line_ends == -1 or first_line_ends > limits.max_target_length:
                return await self.answer_error(
                    flow, ErrorKind.TARGET_TOO_LONG, "request line too long", close=True
                )
            return await self.answer_error(
                flow, ErrorKind.HEADERS_TOO_LARGE, "request header section too large", close=True
            )
        try:
            head = parse_request_head(data)
        except ParseError as e:
            kind = ErrorKind.VERSION_NOT_SUPPORTED if e.status == 505 else ErrorKind.BAD_REQUEST
            return await self.answer_error(flow, kind, str(e), close=True)
        flow.method = head.method
        flow.request = head
        flow.url = head.target
        if len(head.target) > limits.max_target_length:
            return await self.answer_error(
                flow, ErrorKind.TARGET_TOO_LONG, "request target too long", close=True
            )
        try:
            target = (
                parse_target(head.method, head.target)
                if self.tunnel is None
                else inner_target(self.tunnel, head)
            )
        except TargetError as e:
            if e.origin_form:
                kind, detail = (
                    ErrorKind.NOT_PROXY_REQUEST,
                    "this is a forward proxy: send requests with an absolute URL"
                    " (http://host/path), or use CONNECT host:port for tunnels",
                )
            elif head.method == "CONNECT" or self.tunnel is not None:
                kind, detail = ErrorKind.BAD_CONNECT, str(e)
            else:
                kind, detail = ErrorKind.BAD_REQUEST, str(e)
            return await self.answer_error(flow, kind, detail, close=True)
        flow.url = target.url()
        flow.host = target.host
        flow.port = target.port
        flow.intercepted = self.tunnel is not None
        self.proxy.bus.emit("request", flow)
        connect = head.method == "CONNECT"
        try:
            framing = body_framing(head)
        except ParseError as e:
            kind = ErrorKind.BAD_CONNECT if connect else ErrorKind.BAD_REQUEST
            return await self.answer_error(flow, kind, str(e), close=True)
        if connect and framing.kind is not BodyKind.NONE:
            return await self.answer_error(
                flow, ErrorKind.BAD_CONNECT, "CONNECT request with a body", close=True
            )
        # After a refusal the connection carries on only if no request body is left unread.
        close = framing.kind is not BodyKind.NONE or not keep_alive(head)
        decision = admit_now(self, head, target, flow) or await admit(
            self, head, target, flow, close
        )
        if decision is None:
            return not close and not self.stream.closed()
        hf = None
        addons = self.proxy.addons
        if addons.enabled:
            hf = HTTPFlow(flow, Request(head, target))
            if connect and addons.has("http_connect"):
                try:
                    await addons.call("http_connect", hf)
                except AddonFailed as e:
                    return await self.answer_error(flow, ErrorKind.ADDON_FAILED, str(e), close)
                if hf.killed or hf.answer is not None:
                    return await self._addon_refusal(hf, flow, close)
        if connect:
            if decision.action is Action.INTERCEPT and not self.proxy.is_pinned(target.host):
                return await self._intercept(target, flow)
            return await self._connect(head, target, flow, decision, close)
        exchange = self.exchange = Exchange(self, head, target, flow, framing, decision, hf)
        return await exchange.run()

    async def _addon_refusal(self, hf: HTTPFlow, flow: Flow, close: bool) -> bool:
        """An addon answered a CONNECT itself, or killed it."""
        if hf.killed or hf.answer is None:
            flow.fail(ErrorKind.CLIENT_ABORTED, "killed by an addon")
            self.stream.close()
            return False
        answer = hf.answer
        fields = [
            (n, v) for n, v in answer.headers if n.lower() not in ("content-length", "connection")
        ]
        fields += [("Content-Length", str(len(answer.body))), ("Connection", "close")]
        flow.status = answer.status
        flow.bytes_out = len(answer.body)
        await self.stream.write(render_response(answer.status, "", fields) + answer.body)
        await lingering_close(self.stream)
        return False

    async def _connect(
        self, head: RequestHead, target: Target, flow: Flow, decision: Decision, close: bool
    ) -> bool:
        flow.kind = "tunnel"
        proxy = self.proxy
        limits = proxy.policy.limits
        client = self.address[0]
        limited = limits.client_tunnels.acquire(client)
        if limited is None and flow.user is not None:
            limited = limits.user_tunnels.acquire(flow.user)
            if limited is not None:
                limits.client_tunnels.release(client)
        if limited is not None:
            return await self.answer_error(
                flow, ErrorKind.RATE_LIMITED, limited.describe(), close, (("Retry-After", "1"),)
            )
        opened = False
        try:
            started = monotonic()
            sock, peer = await proxy.pool.open_socket(target, decision.addresses)
            flow.connect_time = monotonic() - started
            flow.upstream = peer
            opened = True
            proxy.bus.emit("connected", flow)
        except ProxyError as e:
            return await self.answer_error(flow, e.kind, e.detail, close)
        finally:
            if not opened:
                _release_tunnel(limits, client, flow.user)
        flow.t_connected = monotonic() - self.t_head
        try:
            client_sock, early = take_over(self.stream)
        except StreamClosedError:
            sock.close()
            flow.fail(ErrorKind.CLIENT_ABORTED, "client left before the tunnel opened")
            return False
        flow.status = 200
        flow.release = lambda: _release_tunnel(limits, client, flow.user)
        tunnel = Tunnel(
            client_sock,
            sock,
            proxy.pipes,
            proxy.tunnel_closed,
            proxy.settings.timeouts.tunnel_idle,
            to_client=CONNECT_ESTABLISHED,
            to_upstream=early,
        )
        proxy.open_tunnel(tunnel, flow, self.t_head)
        return False

    async def _intercept(self, target: Target, flow: Flow) -> bool:
        """Answer the CONNECT, then speak TLS to the client with a certificate for the
        host and keep serving the decrypted requests on this connection."""
        proxy = self.proxy
        flow.kind = "tunnel"
        flow.intercepted = True
        client = self.address[0]
        if buffered_size(self.stream):
            # The client sent its TLS hello before our answer: those bytes are already in
            # our buffer, where TLS cannot read them.  Curl, browsers and httpx all wait.
            log.warning(
                "%s sent TLS data before the CONNECT answer for %s; intercepted tunnels need"
                " the client to wait for it (closed)", client, target.authority,
            )  # fmt: skip
            flow.fail(ErrorKind.BAD_CONNECT, "TLS data sent before the CONNECT answer")
            self.stream.close()
            return False
        try:
            leaves = proxy.certificates()
            ctx = await self.loop.run_in_executor(None, leaves.context, target.host)
        except (OSError, ValueError) as e:
            return await self.answer_error(flow, ErrorKind.INTERNAL, f"interception: {e}", True)
        await self.stream.write(CONNECT_ESTABLISHED)
        flow.status = 200
        sock, _ = take_over(self.stream)
        tls = SSLIOStream(
            ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False),
            max_buffer_size=self.stream.max_buffer_size,
        )
        self.stream = tls
        try:
            async with asyncio.timeout(proxy.settings.tls.handshake_timeout):
                await tls.wait_for_handshake()
        except (ssl.SSLError, OSError, StreamClosedError, TimeoutError) as e:
            reason = getattr(e, "reason", None) or e.__class__.__name__
            if reason in _REFUSED_CERTIFICATE:
                log.warning(
                    "client %s refused the interception certificate for %s (%s): is the"
                    " Eyewall CA installed there, or does the client pin certificates?",
                    client, target.host, reason,
                )  # fmt: skip
                proxy.client_refused(target.host)
            flow.fail(ErrorKind.CLIENT_ABORTED, f"TLS handshake with the client failed: {reason}")
            tls.close()
            return False
        self.tunnel = target
        return True

    async def answer_error(
        self,
        flow: Flow,
        kind: ErrorKind,
        detail: str,
        close: bool,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> bool:
        """Send the error page for ``kind``; True if the connection stays open."""
        flow.fail(kind, detail)
        flow.status = status_of(kind)
        close = close or self.proxy.draining
        page = error_page(
            kind, detail, flow.id, proxy_name=self.proxy.settings.via, close=close, extra=extra
        )
        flow.bytes_out = len(page) - page.index(b"\r\n\r\n") - 4
        try:
            await self.stream.write(page)
        except StreamClosedError:
            return False
        if close:
            self.busy = True
            await lingering_close(self.stream)
            return False
        return True

    def close(self) -> None:
        self.stream.close()


_REFUSED_CERTIFICATE = frozenset(
    {"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"}
)


def inner_target(tunnel: Target, head: RequestHead) -> Target:
    """The target of a request read inside an intercepted tunnel to ``tunnel``.

    Origin-form is the norm there; the Host field names the host when it agrees with the
    tunnel's, which is where the connection goes either way.
    """
    if head.method == "CONNECT":
        raise TargetError("CONNECT inside an intercepted tunnel")
    target = head.target
    if target.startswith("/") or (target == "*" and head.method == "OPTIONS"):
        host_field = head.headers.get("host")
        authority = tunnel.authority
        if host_field:
            try:
                named = parse_authority(host_field, default_port=tunnel.port)
            except TargetError:
                named = None
            if named is not None and (named.host, named.port) == (tunnel.host, tunnel.port):
                authority = named.authority
        return Target("https", tunnel.host, tunnel.port, authority, target)
    absolute = parse_target(head.method, target)
    if (absolute.host, absolute.port) != (tunnel.host, tunnel.port):
        raise TargetError("request inside a tunnel names another host")
    return absolute


def _release_tunnel(limits: RateLimiters, client: str, user: str | None) -> None:
    limits.client_tunnels.release(client)
    if user is not None:
        limits.user_tunnels.release(user)
