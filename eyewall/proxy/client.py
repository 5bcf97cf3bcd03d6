"""One client connection, from its first byte to its close: the request loop.

Requests are handled one at a time, so pipelined requests are answered in order (the
next head waits in the stream's buffer).  For each: read the head (phase CLIENT_HEAD;
between requests IDLE), parse it, admit it (`eyewall.proxy.admission`), then forward it
(`Exchange`), open a tunnel, or intercept a CONNECT and go on reading the decrypted
requests on the same connection.

This module is the ONE place that writes answers the proxy makes itself — error pages,
407 challenges, 429s, addon answers, its own answers to ``Max-Forwards: 0`` — all
through `render_answer`, which follows RFC 9110 §9.3.2, §6.4.1 and §9.3.6: no body for
HEAD (with the Content-Length the body would have had), none for 1xx, 204 and 304, nor
for a 2xx to CONNECT.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from time import monotonic
from typing import Any

from tornado.iostream import IOStream, StreamClosedError

from eyewall.addons.api import Answer, HTTPFlow, Request
from eyewall.addons.hooks import HttpConnect
from eyewall.addons.runner import AddonFailed
from eyewall.errors import ErrorKind, ProxyError, error_answer
from eyewall.flow import Flow
from eyewall.http1 import framing as rules
from eyewall.http1.fields import max_forwards, trace_echo
from eyewall.http1.framing import BodyKind, body_framing
from eyewall.http1.parse import Headers, ParseError, RequestHead, ResponseHead, parse_request_head
from eyewall.http1.target import (
    Target,
    TargetError,
    parse_authority,
    parse_target,
    redact_userinfo,
)
from eyewall.observe.logformats import escape
from eyewall.policy.admission import Allow, Refusal, Step, Ticket
from eyewall.policy.auth import parse_basic
from eyewall.policy.rules import Action
from eyewall.policy.state import LimitsUnavailable
from eyewall.proxy.admission import admit, admit_now, pending, settled
from eyewall.proxy.context import ProxyContext
from eyewall.proxy.exchange import Answered, Exchange, Failed, Killed, Responded, Upgraded
from eyewall.proxy.intercept import CONNECT_ESTABLISHED, HandshakeFailed, accept_tls
from eyewall.proxy.streams import (
    TLSStream,
    buffered_size,
    complete,
    lingering_close,
    moved,
    peer_gone,
    read_head,
    take_over,
    unsent,
)
from eyewall.proxy.timeouts import Phase, Watch
from eyewall.proxy.tunnel import Tunnel
from eyewall.tls.layers import HANDSHAKE_FAILURE, alert, starts_tls

__all__ = ["ClientConnection", "inner_target", "method_hint", "render_answer", "request_line_hint"]

log = logging.getLogger("eyewall.client")
auth_log = logging.getLogger("eyewall.auth")
SHOWN_USER = 64  # characters of a user name a log line shows


def shown_user(user: str | None) -> str:
    """A user name as log lines show it: escaped (`escape`) and cut at `SHOWN_USER`
    characters, with its length when cut; ``-`` for none."""
    if user is None:
        return "-"
    if len(user) <= SHOWN_USER:
        return escape(user)
    return f"{escape(user[:SHOWN_USER])}...({len(user)} characters)"


_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_KNOWN_STATUS = frozenset(s.value for s in HTTPStatus)
HTTPS_PORT = 443  # the port an https URI without one names (RFC 9110 §4.2.2)
LINGER_DRAINING = 0.5  # seconds an answer's lingering close may take while draining


def _readable(stream: IOStream) -> bool:
    """Whether bytes (or the end) wait in the kernel for ``stream`` to read."""
    sock = stream.socket
    if sock is None:
        return False
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True  # an error or a TLS socket: let the exchange find out
    return True


def render_answer(
    method: str,
    status: int,
    fields: list[tuple[str, str]],
    body: bytes,
    close: bool,
    reason: str = "",
) -> bytes:
    """A complete response the proxy sends itself, as bytes.

    ``fields`` must not frame the message: Content-Length and ``Connection: close`` are
    added here.  A HEAD gets the head alone, with the length the body would have had
    (RFC 9110 §9.3.2); 1xx, 204 and 304 carry no body and no length (§6.4.1, §8.6), nor
    does a 2xx to CONNECT (§9.3.6: what follows it is the tunnel's).  A caller that
    could not read the method (a head too large or malformed) passes what the head
    starts with (`method_hint`) and closes the connection.
    """
    if not reason:
        reason = HTTPStatus(status).phrase if status in _KNOWN_STATUS else ""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{n}: {v}" for n, v in fields if n.lower() not in _FRAMING)
    bodiless = status < 200 or status in (204, 304) or (method == "CONNECT" and status < 300)
    if not bodiless:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if bodiless or method == "HEAD" else head + body


def method_hint(data: bytes) -> str:
    """The method a request head that could not be parsed seems to have (its first
    token, after an optional empty line), for `render_answer`: "HEAD" gets no body.
    "GET" when there is no such token."""
    method, space, _ = data.lstrip(b"\r\n")[:32].partition(b" ")
    return method.decode("latin-1") if space and method.isalpha() else "GET"


SHOWN_TARGET = 2048  # characters of an unparsed head's request-target a record keeps


def request_line_hint(data: bytes) -> tuple[str, str]:
    """(method, request-target) as the first line of a request head that could not be
    parsed seems to give them, for the flow record and the access line: the method
    when it is letters only (up to 32), the target cut at `SHOWN_TARGET` characters
    with userinfo redacted; "" for what is not there.  Never raises."""
    line = data.lstrip(b"\r\n")[: 33 + SHOWN_TARGET + 1].split(b"\n", 1)[0]
    method, space, rest = line.partition(b" ")
    if not (space and method.isalpha() and len(method) <= 32):
        return "", ""
    target = rest.strip(b" \r").partition(b" ")[0].decode("latin-1")
    if len(target) > SHOWN_TARGET:
        target = target[:SHOWN_TARGET] + "..."
    return method.decode("latin-1"), redact_userinfo(target)


class ClientConnection:
    """Serves one client connection until it closes or is handed to a tunnel."""

    __slots__ = (
        "aborted",
        "address",
        "ctx",
        "exchange",
        "head_first",
        "head_started",
        "opening",
        "release",
        "requests",
        "secure",
        "serving",
        "stream",
        "t_head",
        "tunnel",
        "tunnel_user",
        "watch",
    )

    def __init__(
        self, ctx: ProxyContext, stream: IOStream, address: tuple[str, int], secure: bool = False
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.address = (address[0], address[1])
        self.secure = secure  # the client speaks TLS to the proxy (an HTTPS listener)
        self.watch = Watch(self._expired)
        self.requests = 0
        self.exchange: Exchange | None = None
        self.head_started = False  # bytes of the next request head have arrived
        self.head_first = b""  # the first bytes of a head not read whole yet (for a 408)
        self.t_head = 0.0
        self.tunnel: Target | None = None  # set while serving an intercepted tunnel
        self.tunnel_user: str | None = None  # who authenticated the intercepted CONNECT
        self.release: Callable[[], None] | None = None  # the intercepted tunnel's limits
        # A CONNECT's connect while it runs (`_connect`): what the watch and `abort` cut.
        self.opening: asyncio.Future[tuple[socket.socket, str]] | None = None
        self.aborted: str | None = None  # why `abort` cut what the connection waited on
        # The task in `serve` while it handles a request: what `abort` cancels when the
        # request waits on no origin (admission, a hook, a body for an addon, an answer).
        self.serving: asyncio.Task[Any] | None = None
        self._enter(Phase.CLIENT_HEAD, ctx.settings.timeouts.client_header)  # from accept

    # -- time limits -------------------------------------------------------------------

    def check(self, now: float) -> None:
        """For the watchdog: the watch's limit, and a client that left while the proxy
        connects for it (nobody reads its stream then, so nothing else would notice
        before the connect ends): the connect is cut, the flow ends ``client_aborted``
        and its tunnel slot, if any, is given back."""
        watch = self.watch
        if watch.phase is Phase.CONNECTING and watch.expired is None and peer_gone(self.stream):
            exchange = self.exchange
            opening = exchange.opening if exchange is not None else self.opening
            if opening is not None and not opening.done():
                self.stream.close()  # the exchange (`_closed_reason`) or `_connect` sees it
                opening.cancel()
                return
        watch.check(now)

    def _expired(self, phase: Phase) -> None:
        if self.exchange is not None:
            self.exchange.expire(phase)
            return
        opening = self.opening
        if phase is Phase.CONNECTING and opening is not None and not opening.done():
            opening.cancel()  # answered 504 by `_connect`
            return
        if phase is Phase.CLIENT_HEAD and self.head_started:
            flow = self.ctx.new_flow(self.address)
            waited = self.ctx.clock() - self.watch.since  # the request began back then
            flow.started -= waited
            flow.t_start -= waited
            detail = "request head not received in time (timeouts.client_header)"
            flow.method, flow.url = request_line_hint(self.head_first)
            flow.fail(ErrorKind.CLIENT_TIMEOUT, detail)
            status, fields, body = error_answer(
                ErrorKind.CLIENT_TIMEOUT, detail, flow.id, self.ctx.settings.via
            )
            answer = render_answer(method_hint(self.head_first), status, fields, body, True)
            flow.status = status
            flow.bytes_out = len(answer) - answer.index(b"\r\n\r\n") - 4  # none for HEAD
            try:
                self.stream.write(answer)
            except StreamClosedError:
                pass
            self.ctx.end_flow(flow)
        self.stream.io_loop.add_callback(self.stream.close)

    def abort(self, detail: str) -> bool:
        """Cut what the connection waits on (the proxy is stopping at its drain deadline):
        an exchange with an origin (`Exchange.abort`), the connect of a CONNECT, or a
        request anywhere else (admission, a hook, a body read for an addon, an answer).
        True when the client is still to be answered (502 ``connection_terminated``
        with ``detail``, then the connection closes) and the flow recorded; False when
        the caller should close the connection (nothing is in flight)."""
        exchange = self.exchange
        if exchange is not None and (
            exchange.up is not None or exchange.opening is not None or exchange.responded
        ):
            return exchange.abort(detail)  # it waits on its origin, or answers
        opening = self.opening
        if opening is not None and not opening.done():
            self.aborted = detail
            opening.cancel()  # answered by `_connect`
            return True
        serving = self.serving
        if serving is not None and not serving.done():
            self.aborted = detail
            serving.cancel()  # answered and recorded by `_handle`
            return True
        return False

    def _enter(self, phase: Phase, limit: float | None) -> None:
        self.watch.enter(phase, self.ctx.clock(), limit)

    def idle(self) -> bool:
        """Waiting for a request that has not started, no byte of it received yet, not
        even by the kernel (safe to close when draining).  A head read and not yet
        answered is not idle, exchange or not (admission may be waiting), nor are bytes
        read for a coroutine that has not resumed yet (no read pending)."""
        return (
            self.exchange is None
            and not self.head_started
            and self.stream.reading()
            and self.watch.phase in (Phase.IDLE, Phase.CLIENT_HEAD)
            and not buffered_size(self.stream)
            and not self.stream.closed()
            and not _readable(self.stream)
        )

    # -- the request loop --------------------------------------------------------------

    async def serve(self) -> None:
        """Answer requests until the connection closes, a request cannot be followed by
        another, or the connection becomes a tunnel."""
        ctx = self.ctx
        try:
            while True:
                data = await self._read_head()
                if data is None:
                    break
                self.t_head = monotonic()
                self.requests += 1
                if not await self._handle(data) or ctx.draining or self.stream.closed():
                    break
                self._enter(Phase.IDLE, ctx.settings.timeouts.keepalive_idle)
                if buffered_size(self.stream):
                    # The next request is here already: its head read and perhaps its
                    # answer (the proxy's own, a write the socket takes) complete without
                    # a wait, so without this turn a client pipelining such requests
                    # would hold the event loop, and every other client, for good.
                    await asyncio.sleep(0)
        except StreamClosedError:
            pass
        finally:
            if self.stream.socket is not None:  # None: handed to TLS (start_tls) or a tunnel
                self.stream.close()
            if self.release is not None:
                self.release()
            ctx.connection_closed(self)

    async def _read_head(self) -> bytes | None:
        """The next request head (up to max_header_size bytes), or None when the
        client spoke TLS to a plain listener (answered with an alert)."""
        stream = self.stream
        limit = self.ctx.settings.limits.max_header_size
        self.head_started = False
        first = await stream.read_bytes(limit, partial=True)
        self.head_started = True
        self.head_first = first
        if self.watch.phase is Phase.IDLE:
            self._enter(Phase.CLIENT_HEAD, self.ctx.settings.timeouts.client_header)
        if starts_tls(first) and isinstance(stream, TLSStream):
            # A handshake inside TLS (the HTTPS listener, an intercepted tunnel) where a
            # request was expected: no head will ever end, so answer now.
            log.warning(
                "%s:%d sent a TLS handshake inside its TLS connection where an HTTP"
                " request was expected",
                *self.address,
            )
            flow = self.ctx.new_flow(self.address)
            await self._error(
                flow, "GET", ErrorKind.BAD_REQUEST, "a TLS handshake is not an HTTP request", True
            )
            self.ctx.end_flow(flow)
            return None
        if starts_tls(first) and not isinstance(stream, TLSStream):
            log.warning(
                "%s:%d spoke TLS to the plain HTTP proxy listener: use an http:// proxy"
                " URL, or %s for https:// proxy URLs",
                *self.address,
                "the HTTPS listener (tls.listen, named at start-up)"
                if self.ctx.settings.tls.listen
                else "configure an HTTPS listener (tls.listen)",
            )
            stream.write(alert(HANDSHAKE_FAILURE))
            await lingering_close(stream, seconds=1.0)
            return None
        head = await read_head(stream, limit, first)
        self.head_first = b""
        return head

    async def _handle(self, data: bytes) -> bool:
        """Answer one request; True if the connection may carry another."""
        flow = self.ctx.new_flow(self.address)
        handed_over = False
        self.serving = asyncio.current_task()
        try:
            handed_over, keep = await self._dispatch(data, flow)
            return keep
        except asyncio.CancelledError:
            detail = self.aborted
            if detail is None:
                raise  # not `abort`'s doing
            # Cut at the drain deadline in admission, an addon hook, reading a body for
            # one, or answering: answered (unless an answer is under way) and recorded
            # like an exchange cut there.
            flow.fail(ErrorKind.CONNECTION_TERMINATED, detail)
            if not flow.status and not self.stream.closed():
                await self._error(
                    flow, flow.method or "GET", ErrorKind.CONNECTION_TERMINATED, detail, True
                )
            self.stream.close()
            return False
        except StreamClosedError:
            flow.fail(ErrorKind.CLIENT_ABORTED, "client closed the connection")
            raise
        except Exception:
            # A bug must cost one exchange, never the proxy: log it, answer 500 if
            # nothing was sent yet, and drop this connection only.
            log.exception("internal error handling %s %s", flow.id, flow.url)
            exchange = self.exchange
            if (exchange is None or not exchange.responded) and not self.stream.closed():
                method = flow.method or "GET"
                await self._error(flow, method, ErrorKind.INTERNAL, "internal error", True)
            flow.fail(ErrorKind.INTERNAL, "internal error")
            self.stream.close()
            return False
        finally:
            self.exchange = None
            self.serving = None
            if not handed_over:
                self.ctx.end_flow(flow)

    async def _dispatch(self, data: bytes, flow: Flow) -> tuple[bool, bool]:
        """(the flow was handed to a tunnel, the connection may carry another request)"""
        ctx = self.ctx
        limits = ctx.settings.limits
        flow.intercepted = self.tunnel is not None
        if not complete(data):
            first_line_ends = data.find(b"\n")
            if first_line_ends == -1 or first_line_ends > limits.max_target_length:
                kind, detail = (
                    ErrorKind.TARGET_TOO_LONG,
                    "request line too long (limits.max_target_length)",
                )
            else:
                kind, detail = (
                    ErrorKind.HEADERS_TOO_LARGE,
                    "request header section too large (limits.max_header_size)",
                )
            flow.method, flow.url = request_line_hint(data)
            return False, await self._error(flow, method_hint(data), kind, detail, True)
        try:
            head = parse_request_head(data)
        except ParseError as e:
            kind = ErrorKind.VERSION_NOT_SUPPORTED if e.status == 505 else ErrorKind.BAD_REQUEST
            flow.method, flow.url = request_line_hint(data)
            return False, await self._error(flow, method_hint(data), kind, str(e), True)
        flow.method = head.method
        flow.request = head
        flow.head_bytes = len(data)
        flow.url = redact_userinfo(head.target)
        method = head.method
        if len(head.target) > limits.max_target_length:
            return False, await self._error(
                flow,
                method,
                ErrorKind.TARGET_TOO_LONG,
                "request target too long (limits.max_target_length)",
                True,
            )
        try:
            target = (
                parse_target(method, head.target)
                if self.tunnel is None
                else inner_target(self.tunnel, head)
            )
        except TargetError as e:
            if e.origin_form and self.tunnel is None:
                kind, detail = (
                    ErrorKind.NOT_PROXY_REQUEST,
                    "this is a forward proxy: send requests with an absolute URL"
                    " (http://host/path), or use CONNECT host:port for tunnels",
                )
            elif method == "CONNECT" or self.tunnel is not None:
                kind, detail = ErrorKind.BAD_CONNECT, str(e)
            else:
                kind, detail = ErrorKind.BAD_REQUEST, str(e)
            return False, await self._error(flow, method, kind, detail, True)
        flow.url = target.url()
        flow.host = target.host
        flow.port = target.port
        connect = method == "CONNECT"
        try:
            framing = body_framing(head)
        except ParseError as e:
            kind = ErrorKind.BAD_CONNECT if connect else ErrorKind.BAD_REQUEST
            return False, await self._error(flow, method, kind, str(e), True)
        if connect and framing.kind is not BodyKind.NONE:
            return False, await self._error(
                flow, method, ErrorKind.BAD_CONNECT, "CONNECT request with a body", True
            )
        # After a refusal the connection carries on only if no request body is left unread.
        close = framing.kind is not BodyKind.NONE or not rules.keep_alive(head)
        ticket, step = self._admit_now(head, target, flow)
        # the common case is decided at once; waiting, or a refusal to answer, is awaited
        decision = (
            step
            if isinstance(step, Allow)
            else await self._admit(ticket, step, flow, method, close)
        )
        if decision is None:
            return False, not close and not self.stream.closed()
        flow.rule = decision.rule
        flow.user = decision.user
        hf = None
        addons = ctx.addons
        if addons.enabled:
            hf = HTTPFlow(flow, Request(head, target))
            if connect and addons.has(HttpConnect):
                self._enter(Phase.HOOK, None)
                try:
                    await addons.call(HttpConnect(hf))
                except AddonFailed as e:
                    return False, await self._error(
                        flow, method, ErrorKind.ADDON_FAILED, str(e), close
                    )
                if hf.killed:
                    return False, self._kill(flow)
                if hf.answer is not None:
                    return False, await self._answer_addon(flow, method, hf.answer, True)
        if method in ("OPTIONS", "TRACE"):
            try:
                hops = max_forwards(head)
            except ParseError as e:
                return False, await self._error(flow, method, ErrorKind.BAD_REQUEST, str(e), True)
            if hops == 0:  # RFC 9110 §7.6.2: the proxy is the final recipient
                return False, await self._answer_itself(flow, head, close)
        if connect:
            if decision.action is Action.INTERCEPT and not (
                ctx.settings.tls.passthrough_pinned
                and ctx.interception.is_pinned(self.address[0], decision.user, target.host)
            ):
                return await self._intercept(target, flow, decision)
            return await self._connect(target, flow, decision, close)
        relay_slot = None  # a WebSocket upgrade may become a tunnel: its limits first
        if rules.websocket_upgrade(head) and self.tunnel is None:  # else the CONNECT's
            limited = await self._acquire_tunnel(decision.user)
            if limited is not None:
                flow.cause = "tunnels"
                return False, await self._error(
                    flow, method, *limited, close, [("Retry-After", "1")]
                )
            relay_slot = self._releaser(decision.user)
        exchange = self.exchange = Exchange(
            ctx,
            self.stream,
            self.watch,
            head,
            target,
            flow,
            framing,
            decision.addresses,
            hf,
            self.t_head,
        )
        outcome = await exchange.run()
        if relay_slot is not None and not isinstance(outcome, Upgraded):
            relay_slot()
        match outcome:
            case Responded(keep_alive):
                return False, keep_alive
            case Failed(error, responded, close_after):
                if responded:
                    await exchange.settle(0)
                    self.stream.close()
                    return False, False
                keep = rules.keep_alive(head) and not close_after
                return False, await self._error(
                    flow, method, error.kind, error.detail, not keep, settle=exchange.settle
                )
            case Answered(answer, close_after):
                keep = rules.keep_alive(head) and not close_after
                return False, await self._answer_addon(flow, method, answer, not keep)
            case Killed():
                return False, self._kill(flow)
            case Upgraded(origin):
                self.exchange = None
                if self.tunnel is not None:  # the intercepted CONNECT's slot goes with it
                    relay_slot, self.release = self.release, None
                return await self._relay(flow, origin.stream, relay_slot), False
        raise AssertionError(f"unhandled outcome {outcome!r}")

    # -- admission ---------------------------------------------------------------------

    def _admit_now(
        self, head: RequestHead, target: Target, flow: Flow
    ) -> tuple[Ticket, Allow | Step]:
        """The request's ticket and admission as far as it goes without waiting (the
        common case: a decision)."""
        ctx = self.ctx
        ticket = Ticket(
            self.address[0],
            head.method,
            "connect" if head.method == "CONNECT" else target.scheme,
            target.host,
            target.port,
            parse_basic(head.headers.get("proxy-authorization")),
        )
        if self.tunnel_user is not None:
            # Inside an intercepted tunnel, requests carry the user who authenticated
            # the CONNECT (browsers send Proxy-Authorization on the CONNECT only) — as
            # long as the user file still has them: a removed user's next request ends
            # the tunnel (the client must CONNECT, and log in, again).
            if ctx.policy.auth_required and ctx.policy.users.stored(self.tunnel_user) is None:
                flow.user = self.tunnel_user
                return ticket, Refusal(
                    ErrorKind.AUTH_REQUIRED,
                    "auth",
                    "the tunnel's user is no longer valid; connect again",
                    login="revoked",
                    user=self.tunnel_user,
                )
            ticket.user = self.tunnel_user
            ticket.login_done = True
        return ticket, admit_now(ctx, ticket)

    async def _admit(
        self, ticket: Ticket, step: Step, flow: Flow, method: str, close: bool
    ) -> Allow | None:
        """Finish admission of ``ticket`` from ``step``: the decision, or None once a
        refusal was answered."""
        if not isinstance(step, Allow | Refusal):
            stream = self.stream
            step = await admit(self.ctx, ticket, step, self.watch, lambda: not peer_gone(stream))
        if isinstance(step, Allow):
            return step
        if ticket.user is not None:
            flow.user = ticket.user  # refused after logging in: the audit trail names them
        # a revoked tunnel user's connection ends: the client must CONNECT, and log in, again
        await self._refuse(flow, method, step, close or step.login == "revoked")
        return None

    async def _refuse(self, flow: Flow, method: str, refusal: Refusal, close: bool) -> bool:
        """Answer a refusal from admission (407 with a challenge, 429 with Retry-After,
        403 naming the rule); failed logins are logged here (without the password)."""
        ctx = self.ctx
        flow.rule = refusal.rule
        flow.cause = refusal.login or (
            refusal.rule if refusal.kind is ErrorKind.RATE_LIMITED else ""
        )
        extra: list[tuple[str, str]] = []
        if refusal.retry_after is not None:
            extra.append(("Retry-After", str(max(1, round(refusal.retry_after + 0.49)))))
        if refusal.login is not None:
            flow.user = refusal.user
            if refusal.login != "missing":
                # The address first and the user name escaped: no name can move the
                # address a log watcher (fail2ban) reads, nor add a line.
                auth_log.warning(
                    "authentication failed from %s for user %s: %s",
                    self.address[0],
                    shown_user(refusal.user),
                    refusal.login,
                )
        if refusal.kind is ErrorKind.AUTH_REQUIRED:
            realm = ctx.settings.auth.realm.replace('"', "'")
            extra.append(("Proxy-Authenticate", f'Basic realm="{realm}", charset="UTF-8"'))
        message = refusal.message
        if refusal.kind is ErrorKind.DENIED and refusal.rule != "client-network":
            message = f"denied by rule {refusal.rule}" + (f": {message}" if message else "")
        if refusal.rule == "private-destination":
            message += " (to allow private destinations: access.allow_private, or a rule)"
        return await self._error(flow, method, refusal.kind, message, close, extra)

    # -- answers the proxy makes itself --------------------------------------------------

    async def _error(
        self,
        flow: Flow,
        method: str,
        kind: ErrorKind,
        detail: str,
        close: bool,
        extra: list[tuple[str, str]] | tuple[()] = (),
        settle: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """Send the page for ``kind``; True if the connection stays open."""
        flow.fail(kind, detail)
        status, fields, body = error_answer(kind, detail, flow.id, self.ctx.settings.via)
        return await self._send_answer(flow, method, status, [*fields, *extra], body, close, settle)

    async def _answer_addon(self, flow: Flow, method: str, answer: Answer, close: bool) -> bool:
        """Send an addon's answer (`HTTPFlow.respond`); the flow records it as its
        response, so that records show what the client got and that no origin did."""
        fields = list(answer.headers)
        reason = HTTPStatus(answer.status).phrase if answer.status in _KNOWN_STATUS else ""
        flow.response = ResponseHead("HTTP/1.1", answer.status, reason, Headers(fields))
        limit = self.ctx.settings.flows.body_limit  # captured as an origin's would be
        sent = answer.body if method != "HEAD" else b""
        flow.response_body = bytearray(sent[:limit]) if limit else None
        return await self._send_answer(flow, method, answer.status, fields, answer.body, close)

    async def _send_answer(
        self,
        flow: Flow,
        method: str,
        status: int,
        fields: list[tuple[str, str]],
        body: bytes,
        close: bool,
        settle: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """Write an answer of the proxy's own (see `render_answer`); True if the
        connection stays open.  ``settle`` runs once the answer is out (a failed
        exchange ends its request-body upload)."""
        close = close or self.ctx.draining
        if method == "CONNECT" and not close:
            # Bytes sent after a CONNECT before its answer are meant for the tunnel (a
            # TLS ClientHello sent early): never read as a request.  With nothing after
            # it, the connection stays usable (a retry with credentials, a request).
            close = bool(buffered_size(self.stream)) or _readable(self.stream)
        data = render_answer(method, status, fields, body, close)
        flow.status = status
        flow.bytes_out = len(data) - data.index(b"\r\n\r\n") - 4
        stream = self.stream
        try:
            written = stream.write(data)
            if not written.done():
                # A client slow to take the answer is body-idle, not slow with its next
                # head (nor is an exchange's phase still running).
                limit = self.ctx.settings.timeouts.body_idle
                self.watch.enter(
                    Phase.RESPONDING,
                    self.ctx.clock(),
                    limit,
                    lambda: moved(stream),
                    lambda: unsent(stream.socket),
                )
            await written
        except StreamClosedError:
            if self.watch.expired is Phase.RESPONDING:
                flow.fail(
                    ErrorKind.BODY_STALLED,
                    "the client stopped reading the proxy's answer (timeouts.body_idle)",
                )
            return False
        finally:
            if settle is not None:
                await settle()
        if close:
            self._enter(Phase.CLOSING, None)
            # draining: the proxy stops soon, and the flow is recorded after this
            await lingering_close(
                self.stream, seconds=LINGER_DRAINING if self.ctx.draining else 2.0
            )
            return False
        return True

    async def _answer_itself(self, flow: Flow, head: RequestHead, close: bool) -> bool:
        """OPTIONS or TRACE with ``Max-Forwards: 0``: 200, with the request echoed as
        ``message/http`` for TRACE (credentials left out, RFC 9110 §9.3.8)."""
        if head.method == "TRACE":
            fields = [("Content-Type", "message/http")]
            body = trace_echo(head)
        else:
            fields, body = [], b""
        fields.append(("Via", f"{head.version[5:]} {self.ctx.settings.via}"))
        return await self._send_answer(flow, head.method, 200, fields, body, close)

    def _kill(self, flow: Flow) -> bool:
        flow.fail(ErrorKind.ADDON_KILLED, "killed by an addon")
        self.stream.close()
        return False

    # -- tunnels -----------------------------------------------------------------------

    async def _acquire_tunnel(self, user: str | None) -> tuple[ErrorKind, str] | None:
        """Count a tunnel against the client's and the user's limits; why it was
        refused (a limit reached: RATE_LIMITED; a shared store failing closed:
        OVERLOADED), or None."""
        ctx = self.ctx
        state, limits = ctx.state, ctx.policy.limits
        client = self.address[0]
        try:
            if not await settled(state.acquire("client_tunnels", client, limits.client_tunnels)):
                return ErrorKind.RATE_LIMITED, f"rate limit client_tunnels reached for {client}"
            try:
                counted = user is None or await settled(
                    state.acquire("user_tunnels", user, limits.user_tunnels)
                )
            except LimitsUnavailable:
                await settled(state.release("client_tunnels", client))
                raise
            if not counted:
                await settled(state.release("client_tunnels", client))
                return ErrorKind.RATE_LIMITED, f"rate limit user_tunnels reached for {user}"
        except LimitsUnavailable as e:
            return ErrorKind.OVERLOADED, str(e)
        return None

    def _releaser(self, user: str | None) -> Callable[[], None]:
        state, client = self.ctx.state, self.address[0]
        loop = self.stream.io_loop

        def release() -> None:
            for counter, key in (("client_tunnels", client), ("user_tunnels", user)):
                if key is not None:
                    result = state.release(counter, key)
                    if pending(result):
                        loop.add_future(asyncio.ensure_future(result), _quiet)

        return release

    async def _connect(
        self, target: Target, flow: Flow, decision: Allow, close: bool
    ) -> tuple[bool, bool]:
        ctx = self.ctx
        limited = await self._acquire_tunnel(decision.user)
        if limited is not None:
            flow.cause = "tunnels"
            return False, await self._error(
                flow, "CONNECT", *limited, close, [("Retry-After", "1")]
            )
        release = self._releaser(decision.user)
        # Bounded by the watch, which waits out a stall of the loop (a timer of the
        # pool's own would fire after one and blame the origin), as an exchange's is.
        self._enter(Phase.CONNECTING, ctx.settings.timeouts.upstream_connect)
        started = monotonic()
        opening = asyncio.ensure_future(ctx.pool.open_socket(target, decision.addresses))
        self.opening = opening
        try:
            sock, peer = await opening
        except ProxyError as e:
            release()
            return False, await self._error(flow, "CONNECT", e.kind, e.detail, close)
        except asyncio.CancelledError:
            release()
            if not opening.cancelled() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # not the watch's or `abort`'s doing: this connection is cancelled
            if self.stream.closed():  # the client left (`check`)
                flow.fail(ErrorKind.CLIENT_ABORTED, "client left while the proxy connected")
                return False, False
            if self.aborted is not None:  # the proxy stops
                kind, detail = ErrorKind.CONNECTION_TERMINATED, self.aborted
            else:
                kind = ErrorKind.CONNECTION_TIMEOUT
                detail = f"no connection to {target.authority} in time (timeouts.upstream_connect)"
            return False, await self._error(flow, "CONNECT", kind, detail, close)
        except BaseException:
            release()
            raise
        finally:
            self.opening = None
            if not opening.done():
                opening.cancel()
        flow.connect_time = monotonic() - started
        flow.upstream = peer
        flow.t_connected = monotonic() - self.t_head
        flow.status = 200
        flow.kind = "tunnel"  # a refused or failed CONNECT stays "http", as a refused GET
        try:
            client_sock, early, client_tls = take_over(self.stream)
        except StreamClosedError:
            sock.close()
            release()
            flow.fail(ErrorKind.CLIENT_ABORTED, "client left before the tunnel opened")
            return False, False
        tunnel = Tunnel(
            client_sock,
            sock,
            ctx.pipes,
            ctx.settings.timeouts.tunnel_idle,
            to_client=CONNECT_ESTABLISHED,
            to_upstream=early,
            client_tls=client_tls,
        )
        flow.t_response = monotonic() - self.t_head
        ctx.open_tunnel(tunnel, flow, release)
        return True, False

    async def _relay(
        self, flow: Flow, origin: IOStream, release: Callable[[], None] | None = None
    ) -> bool:
        """Hand the client and ``origin`` to a byte relay after a 101, under the tunnel
        limits unless ``release`` says they are already held; True once the flow belongs
        to the relay.  Either side may be TLS (`eyewall.proxy.tunnel`)."""
        ctx = self.ctx
        if release is None:
            limited = await self._acquire_tunnel(flow.user)
            if limited is not None:
                flow.fail(*limited)
                flow.cause = "tunnels"
                origin.close()
                self.stream.close()
                return False
            release = self._releaser(flow.user)
        try:
            client_sock, from_client, client_tls = take_over(self.stream)
            origin_sock, from_origin, origin_tls = take_over(origin)
        except StreamClosedError:
            origin.close()
            self.stream.close()
            release()
            flow.fail(ErrorKind.CLIENT_ABORTED, "client left before the relay started")
            return False
        tunnel = Tunnel(
            client_sock,
            origin_sock,
            ctx.pipes,
            ctx.settings.timeouts.tunnel_idle,
            to_client=from_origin,
            to_upstream=from_client,
            client_tls=client_tls,
            upstream_tls=origin_tls,
        )
        tunnel.down.count = len(from_origin)
        ctx.open_tunnel(tunnel, flow, release)
        return True

    async def _intercept(self, target: Target, flow: Flow, decision: Allow) -> tuple[bool, bool]:
        """Answer the CONNECT, then speak TLS to the client with a certificate for the
        host and keep serving the decrypted requests on this connection."""
        ctx = self.ctx
        flow.intercepted = True
        client = self.address[0]
        if buffered_size(self.stream):
            # The client sent its TLS hello before our answer: those bytes are already in
            # our buffer, where TLS cannot read them.  Curl, browsers and httpx all wait.
            log.warning(
                "%s sent TLS data before the CONNECT answer for %s; intercepted tunnels need"
                " the client to wait for it (closed)",
                client,
                target.authority,
            )
            flow.fail(ErrorKind.BAD_CONNECT, "TLS data sent before the CONNECT answer")
            self.stream.close()
            return False, False
        limited = await self._acquire_tunnel(decision.user)
        if limited is not None:
            flow.cause = "tunnels"
            return False, await self._error(
                flow, "CONNECT", *limited, False, [("Retry-After", "1")]
            )
        release = self._releaser(decision.user)
        try:
            leaves = ctx.interception.certificates()
            loop = self.stream.io_loop
            ssl_ctx = await loop.run_in_executor(None, leaves.context, target.host)
        except (OSError, ValueError) as e:
            release()
            return False, await self._error(
                flow, "CONNECT", ErrorKind.INTERNAL, f"interception: {e}", True
            )
        await self.stream.write(CONNECT_ESTABLISHED)
        flow.status = 200
        flow.kind = "tunnel"
        self._enter(Phase.HANDSHAKE, None)  # bounded by tls.handshake_timeout below
        try:
            tls = await accept_tls(self.stream, ssl_ctx, ctx.settings.tls.handshake_timeout)
        except HandshakeFailed as e:
            release()
            if e.refused_certificate:
                log.warning(
                    "client %s refused the interception certificate for %s (%s): is the"
                    " Eyewall CA installed there, or does the client pin certificates?",
                    client,
                    target.host,
                    e.reason,
                )
                if ctx.settings.tls.passthrough_pinned:
                    ctx.interception.refused(client, decision.user, target.host)
            flow.fail(ErrorKind.CLIENT_TLS_ERROR, str(e))
            flow.cause = e.reason
            return False, False
        self.stream = tls
        self.tunnel = target
        self.tunnel_user = decision.user
        self.release = release
        return False, True


def _quiet(future: asyncio.Future[Any]) -> None:
    """Retrieve a background release's outcome (a store down is logged by the store)."""
    if not future.cancelled():
        future.exception()


def inner_target(tunnel: Target, head: RequestHead) -> Target:
    """The target of a request read inside an intercepted tunnel to ``tunnel``.

    Origin-form is the norm there; the Host field's spelling is kept when it names the
    tunnel's host and port (a Host without a port names 443, as for any https URI),
    otherwise the CONNECT's authority stands: the connection goes there either way, and
    the URL recorded carries the real port.  Raises TargetError for a CONNECT inside the
    tunnel or an absolute-form target naming another host.
    """
    if head.method == "CONNECT":
        raise TargetError("CONNECT inside an intercepted tunnel")
    target = head.target
    if target.startswith("/") or (target == "*" and head.method == "OPTIONS"):
        host_field = head.headers.get("host")
        authority = tunnel.authority
        if host_field:
            try:
                named = parse_authority(host_field, default_port=HTTPS_PORT)
            except TargetError:
                named = None
            if named is not None and (named.host, named.port) == (tunnel.host, tunnel.port):
                authority = named.authority
        return Target("https", tunnel.host, tunnel.port, authority, target)
    absolute = parse_target(head.method, target)
    if (absolute.host, absolute.port) != (tunnel.host, tunnel.port):
        raise TargetError("request inside a tunnel names another host")
    return absolute
