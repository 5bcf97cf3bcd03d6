"""Forwarding one HTTP request to its origin and the response back (an `Exchange`).

    client ──head──▶ proxy ──head──▶ origin        (pooled connection; retried once on a
    client ──body──▶ proxy ──body──▶ origin         stale one if the method is idempotent)
    client ◀─1xx/head/body── proxy ◀── origin      (re-framed for the client)

The request body is uploaded by a task while the response is awaited, so an origin may
answer before it has read the whole body (a 413, or a 100-continue refused).  A 101 to a
WebSocket request turns both connections into a `Tunnel`.

The watchdog enforces the upstream response-head deadline and the body stall limit by
closing the upstream (and, once the response has begun, the client) stream; the
coroutine then sees `StreamClosedError` and reads ``self.expired`` to tell why.
"""

from __future__ import annotations

import asyncio
import enum
from http import HTTPStatus
from time import monotonic
from typing import TYPE_CHECKING

from tornado.iostream import StreamClosedError

from eyewall.addons.flow import HTTPFlow, Response
from eyewall.addons.runner import AddonFailed
from eyewall.errors import ErrorKind, ProxyError
from eyewall.http1 import fields as wire
from eyewall.http1 import framing as rules
from eyewall.http1.chunked import ChunkedDecoder
from eyewall.http1.framing import BodyKind, Framing
from eyewall.http1.parse import ParseError, RequestHead, ResponseHead
from eyewall.http1.response import parse_response_head
from eyewall.http1.target import Target
from eyewall.observe.flow import Flow
from eyewall.policy.rules import Decision
from eyewall.proxy import bodies
from eyewall.proxy.streams import complete, read_buffered, read_head, take_over
from eyewall.proxy.tunnel import Tunnel
from eyewall.proxy.upstream import Upstream

if TYPE_CHECKING:
    from eyewall.proxy.connection import ClientConnection

__all__ = ["Exchange"]

_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_KNOWN_STATUS = frozenset(s.value for s in HTTPStatus)

SMALL_BODY = 64 << 10  # responses up to this size are read whole and sent with the head
MAX_INTERIM = 10


class Phase(enum.Enum):
    CONNECTING = 1
    WAITING = 2  # request sent (or being sent); no response head yet
    RESPONDING = 3  # response head received; body in transit


class Exchange:
    __slots__ = (
        "addresses",
        "body",
        "conn",
        "deadline",
        "expired",
        "flow",
        "framing",
        "head",
        "hf",
        "last_active",
        "phase",
        "received",
        "responded",
        "resume",
        "sent",
        "target",
        "up",
        "upload",
        "upload_error",
        "uploading",
    )

    def __init__(
        self,
        conn: ClientConnection,
        head: RequestHead,
        target: Target,
        flow: Flow,
        framing: Framing,
        decision: Decision,
        hf: HTTPFlow | None = None,
    ) -> None:
        self.conn = conn
        self.hf = hf  # what addons see, when any are loaded
        self.body: bytes | None = None  # a request body read whole (for addons)
        self.resume: tuple[bytes, int | ChunkedDecoder] | None = (
            None  # (read prefix, resume) if too big
        )
        self.head = head
        self.target = target
        self.flow = flow
        self.framing = framing
        self.addresses = decision.addresses
        self.up: Upstream | None = None
        self.upload: asyncio.Future[None] | None = None
        self.uploading = False
        self.phase = Phase.CONNECTING
        self.deadline = 0.0
        capture = conn.proxy.settings.flows.body_limit
        self.sent = bodies.Meter(capture)  # request body bytes, client to origin
        self.received = bodies.Meter(capture)  # response body bytes, origin to client
        self.last_active = conn.loop.time()
        self.expired: ErrorKind | None = None
        self.upload_error: ProxyError | None = None
        self.responded = False  # a response head went to the client

    # -- watchdog ----------------------------------------------------------------------

    def check(self, now: float) -> None:
        if self.sent.active or self.received.active:
            self.sent.active = self.received.active = False
            self.last_active = now
            return
        t = self.conn.proxy.settings.timeouts
        if self.uploading or self.phase is Phase.RESPONDING:
            if now - self.last_active >= t.body_idle:
                self._expire(ErrorKind.BODY_STALLED)
        elif self.phase is Phase.WAITING and now >= self.deadline:
            self._expire(ErrorKind.UPSTREAM_TIMEOUT)

    def _expire(self, kind: ErrorKind) -> None:
        self.expired = kind
        if self.up is not None:
            self.up.stream.close()
        if self.responded or self.uploading:
            self.conn.stream.close()

    # -- the exchange ------------------------------------------------------------------

    async def run(self) -> bool:
        """Forward the request; True if the client connection may carry another."""
        head, flow, framing = self.head, self.flow, self.framing
        upgrade = rules.websocket_upgrade(head)
        keep_alive = rules.keep_alive(head)
        hf = self.hf
        try:
            if hf is not None:
                framing = await self._request_hooks(hf, framing)
                if hf.answer is not None or hf.killed:
                    body_left = framing.kind is not BodyKind.NONE and self.body is None
                    return await self._addon_answer(hf, keep_alive, body_left)
            response = await self._send(framing, upgrade)
            if response.status == 101:
                await self._switch(response)
                return False
            return await self._respond(response, keep_alive)
        except ProxyError as e:
            return await self._fail(e.kind, e.detail, keep_alive, framing)
        except StreamClosedError:
            kind, detail = self._closed_reason()
            return await self._fail(kind, detail, keep_alive, framing)
        except ParseError as e:  # broken chunked framing in the response body
            return await self._fail(ErrorKind.UPSTREAM_MALFORMED, str(e), keep_alive, framing)
        except AddonFailed as e:
            return await self._fail(ErrorKind.ADDON_FAILED, str(e), keep_alive, framing)
        finally:
            if self.upload is not None:
                await self._finish_upload()
            flow.bytes_in = self.sent.count
            flow.bytes_out = self.received.count
            flow.request_body = self.sent.capture
            flow.response_body = self.received.capture

    async def _send(self, framing: Framing, upgrade: bool) -> ResponseHead:
        """Send the request (retrying a stale pooled connection once); return the final
        response head, relaying interim ones."""
        conn, head, target, flow = self.conn, self.head, self.target, self.flow
        proxy = conn.proxy
        if self.hf is not None and self.hf.request is not None:
            target = self.target = self.hf.request.target  # an addon may change the path
        fields = wire.upstream_fields(head, target, framing, proxy.settings.via, upgrade)
        request = wire.render_request(head.method, target.path, fields)
        whole = framing.kind is BodyKind.NONE or self.body is not None
        retryable = whole and rules.is_idempotent(head.method)
        attempt = 0
        while True:
            self.phase = Phase.CONNECTING
            up = None if attempt else proxy.pool.take(target, self.addresses, not retryable)
            if up is None:
                started = monotonic()
                up = await proxy.pool.open(target, self.addresses)
                flow.connect_time = monotonic() - started
            self.up = up
            flow.upstream = up.peer
            flow.reused = up.uses > 0
            flow.t_connected = monotonic() - conn.t_head
            proxy.bus.emit("connected", flow)
            self.phase = Phase.WAITING
            self.deadline = conn.loop.time() + proxy.settings.timeouts.upstream_head
            try:
                if whole:
                    up.stream.write(request + self.body if self.body else request)
                else:
                    await up.stream.write(request)
                    self.uploading = True
                    self.upload = asyncio.ensure_future(self._upload_body(framing))
                return await self._read_final_head(upgrade)
            except StreamClosedError:
                # A pooled connection the origin closed just as we reused it: safe to
                # send again on a new one if nothing came back (RFC 9110 §9.2.2).
                if attempt or not retryable or not up.uses or self.expired is not None:
                    raise
                up.stream.close()
                attempt += 1

    async def _upload_body(self, framing: Framing) -> None:
        src, up = self.conn.stream, self.up
        assert up is not None
        limit = self.conn.proxy.settings.limits.max_header_size
        try:
            if self.resume is not None:  # an addon asked for a body too big to buffer
                prefix, resume = self.resume
                if framing.kind is BodyKind.LENGTH:
                    await bodies.copy_length(src, up.stream, framing.length, self.sent)
                else:
                    if prefix:
                        self.sent.count += len(prefix)
                        await up.stream.write(b"%x\r\n%s\r\n" % (len(prefix), prefix))
                    decoder = resume if isinstance(resume, ChunkedDecoder) else None
                    await bodies.copy_chunked(src, up.stream, True, self.sent, limit, decoder)
            elif framing.kind is BodyKind.LENGTH:
                await bodies.copy_length(src, up.stream, framing.length, self.sent)
            else:
                await bodies.copy_chunked(src, up.stream, True, self.sent, limit)
        except ParseError as e:
            # The client's chunked framing broke: stop the exchange; run() answers 400.
            self.upload_error = ProxyError(ErrorKind.BAD_REQUEST, f"request body: {e}")
            up.stream.close()
            raise
        except StreamClosedError:
            up.stream.close()  # wakes the response read; the reason is found there
            raise
        finally:
            self.uploading = False
            self.deadline = self.conn.loop.time() + self.conn.proxy.settings.timeouts.upstream_head

    async def _finish_upload(self) -> None:
        """Wait for or end the upload task so none outlives its exchange."""
        task = self.upload
        if task is None:
            return
        if not task.done():
            # The response is complete but the client is still sending: the rest of the
            # body can't be delimited from a next request, so the connection must close.
            self.conn.stream.close()
        try:
            await task
        except (StreamClosedError, ParseError, ProxyError):
            pass

    async def _read_final_head(self, upgrade: bool) -> ResponseHead:
        up, conn, head = self.up, self.conn, self.head
        assert up is not None
        limit = conn.proxy.settings.limits.max_header_size
        for _ in range(MAX_INTERIM + 1):
            data = await read_head(up.stream, limit)
            if not complete(data):
                raise ProxyError(ErrorKind.UPSTREAM_MALFORMED, "response head too large")
            try:
                response = parse_response_head(data)
            except ParseError as e:
                raise ProxyError(ErrorKind.UPSTREAM_MALFORMED, str(e)) from None
            if response.status == 101:
                if not upgrade or "websocket" not in response.headers.tokens("upgrade"):
                    raise ProxyError(ErrorKind.UPSTREAM_MALFORMED, "unrequested 101 response")
                return response
            if response.status >= 200:
                return response
            # RFC 9110 §15.2: forward interim responses, but never to an HTTP/1.0 client.
            if head.version == "HTTP/1.1":
                fields = wire.response_fields(
                    response, rules.NO_BODY, head.version, True, conn.proxy.settings.via
                )
                await conn.stream.write(
                    wire.render_response(response.status, response.reason, fields)
                )
        raise ProxyError(ErrorKind.UPSTREAM_MALFORMED, "too many interim responses")

    async def _respond(self, response: ResponseHead, keep_alive: bool) -> bool:
        conn, head, flow, up = self.conn, self.head, self.flow, self.up
        assert up is not None
        proxy = conn.proxy
        try:
            framing = rules.body_framing(response, head.method)
        except ParseError as e:
            raise ProxyError(ErrorKind.UPSTREAM_MALFORMED, str(e)) from None
        client, origin = conn.stream, up.stream
        hf = self.hf
        buffered: bytes | None = None  # a whole body an addon read (and may have changed)
        # A body too big for an addon: what was read, where to go on.
        prefix: bytes = b""
        resume: int | ChunkedDecoder = 0
        if hf is not None:
            hf.response = Response(response)
            await proxy.addons.call("responseheaders", hf)
            if hf.answer is not None or hf.killed:
                origin.close()  # its body is not read
                return await self._addon_answer(hf, keep_alive, body_left=self.uploading)
            # A body still carrying transfer codings cannot become a Content-Length one.
            if (
                hf.response.buffer_limit
                and framing.kind is not BodyKind.NONE
                and not framing.codings
            ):
                kind = {BodyKind.LENGTH: "length", BodyKind.CHUNKED: "chunked"}.get(
                    framing.kind, "close"
                )
                data, more = await bodies.read_upto(
                    origin, kind, framing.length, hf.response.buffer_limit,
                    proxy.settings.limits.max_header_size,
                )  # fmt: skip
                if more is None:
                    hf.response.body = data
                    await proxy.addons.call("response", hf)
                    if hf.answer is not None or hf.killed:
                        return await self._addon_answer(hf, keep_alive, body_left=self.uploading)
                    buffered = hf.response.body or b""
                    response.headers.remove("transfer-encoding")
                    response.headers.set("Content-Length", str(len(buffered)))
                    framing = Framing(BodyKind.LENGTH, len(buffered))
                else:
                    hf.response.truncated = True
                    prefix, resume = data, more
        out = rules.downstream_framing(framing, head.version)
        keep_alive = (
            keep_alive
            and out.kind is not BodyKind.CLOSE
            and not proxy.draining
            and not self.uploading
        )
        fields = wire.response_fields(response, out, head.version, keep_alive, proxy.settings.via)
        head_bytes = wire.render_response(response.status, response.reason, fields)
        flow.response = response
        flow.status = response.status
        flow.t_response = monotonic() - conn.t_head
        proxy.bus.emit("response", flow)
        self.phase = Phase.RESPONDING
        if buffered is not None:
            self.responded = True
            self.received.count = len(buffered)
            if self.received.capture is not None:
                self.received.keep(buffered)
            await client.write(head_bytes + buffered)
        elif framing.kind is BodyKind.NONE:
            self.responded = True
            await client.write(head_bytes)
        elif framing.kind is BodyKind.LENGTH and framing.length <= SMALL_BODY and not resume:
            body = b""
            if framing.length:
                body = read_buffered(origin, framing.length) or await origin.read_bytes(
                    framing.length
                )
            self.responded = True
            self.received.count = len(body)
            if self.received.capture is not None:
                self.received.keep(body)
            await client.write(head_bytes + body)
        else:
            self.responded = True
            chunked = out.kind is BodyKind.CHUNKED
            meter = self.received
            if prefix:  # read for an addon that could not have it whole: send it first
                meter.count += len(prefix)
                head_bytes += b"%x\r\n%s\r\n" % (len(prefix), prefix) if chunked else prefix
            await client.write(head_bytes)
            if framing.kind is BodyKind.LENGTH:
                await bodies.copy_length(origin, client, framing.length, meter)
            elif framing.kind is BodyKind.CHUNKED:
                limit = proxy.settings.limits.max_header_size
                decoder = resume if isinstance(resume, ChunkedDecoder) else None
                await bodies.copy_chunked(origin, client, chunked, meter, limit, decoder)
            else:
                await bodies.copy_until_close(origin, client, chunked, meter)
        if hf is not None and buffered is None:
            await proxy.addons.call("response", hf)  # after the fact: the body streamed
        upload = self.upload
        if upload is not None:
            await self._finish_upload()
        upload_ok = upload is None or (not upload.cancelled() and upload.exception() is None)
        if (
            upload_ok
            and framing.kind is not BodyKind.CLOSE
            and rules.keep_alive(response)
            and not origin.closed()
        ):
            proxy.pool.release(up, conn.loop.time())
        else:
            origin.close()
        return keep_alive and not client.closed()

    async def _request_hooks(self, hf: HTTPFlow, framing: Framing) -> Framing:
        """``requestheaders``, the body an addon asked for, ``request``; the framing the
        request is sent with afterwards."""
        addons = self.conn.proxy.addons
        await addons.call("requestheaders", hf)
        if hf.answer is not None or hf.killed:
            return framing
        request = hf.request
        assert request is not None
        if request.buffer_limit and framing.kind is not BodyKind.NONE:
            kind = "length" if framing.kind is BodyKind.LENGTH else "chunked"
            limit = self.conn.proxy.settings.limits.max_header_size
            try:
                data, resume = await bodies.read_upto(
                    self.conn.stream, kind, framing.length, request.buffer_limit, limit
                )
            except ParseError as e:
                raise ProxyError(ErrorKind.BAD_REQUEST, f"request body: {e}") from None
            if resume is None:
                request.body = data
            else:
                request.truncated = True
                self.resume = (data, resume)
        await addons.call("request", hf)
        body = request.body
        if body is None or self.resume is not None:
            return framing
        if framing.kind is not BodyKind.NONE and not request.buffer_limit:
            return framing  # the body is still unread: it streams as it is
        self.body = body
        self.sent.count = len(body)
        if self.sent.capture is not None:
            self.sent.keep(body)
        self.head.headers.remove("transfer-encoding")
        if body or framing.kind is not BodyKind.NONE:
            self.head.headers.set("Content-Length", str(len(body)))
        return Framing(BodyKind.LENGTH, len(body)) if body else rules.NO_BODY

    async def _addon_answer(self, hf: HTTPFlow, keep_alive: bool, body_left: bool) -> bool:
        """Send the answer an addon gave with ``flow.respond()``, or obey ``kill()``."""
        conn, flow = self.conn, self.flow
        if hf.killed:
            flow.fail(ErrorKind.CLIENT_ABORTED, "killed by an addon")
            conn.stream.close()
            return False
        answer = hf.answer
        assert answer is not None
        keep_alive = keep_alive and not body_left and not conn.proxy.draining
        fields = [(n, v) for n, v in answer.headers if n.lower() not in _FRAMING]
        fields.append(("Content-Length", str(len(answer.body))))
        if not keep_alive:
            fields.append(("Connection", "close"))
        reason = HTTPStatus(answer.status).phrase if answer.status in _KNOWN_STATUS else ""
        flow.status = answer.status
        flow.bytes_out = len(answer.body)
        self.responded = True
        await conn.stream.write(wire.render_response(answer.status, reason, fields) + answer.body)
        self.received.count = len(answer.body)
        if self.up is not None:
            self.up.stream.close()
        return keep_alive

    async def _switch(self, response: ResponseHead) -> None:
        """Relay the 101 and hand both connections to a tunnel (RFC 6455 §4.1)."""
        conn, flow, up = self.conn, self.flow, self.up
        assert up is not None
        proxy = conn.proxy
        fields = wire.response_fields(
            response, rules.NO_BODY, "HTTP/1.1", True, proxy.settings.via, True
        )
        self.responded = True
        await conn.stream.write(wire.render_response(101, response.reason, fields))
        flow.response = response
        flow.status = 101
        flow.kind = "websocket"
        client_sock, from_client = take_over(conn.stream)
        origin_sock, from_origin = take_over(up.stream)
        tunnel = Tunnel(
            client_sock,
            origin_sock,
            proxy.pipes,
            proxy.tunnel_closed,
            proxy.settings.timeouts.tunnel_idle,
            to_client=from_origin,
            to_upstream=from_client,
        )
        tunnel.down.count = len(from_origin)
        proxy.open_tunnel(tunnel, flow, conn.t_head)

    def _closed_reason(self) -> tuple[ErrorKind, str]:
        if self.upload_error is not None:
            return self.upload_error.kind, self.upload_error.detail
        if self.expired is ErrorKind.UPSTREAM_TIMEOUT:
            return self.expired, "origin sent no response in time"
        if self.expired is ErrorKind.BODY_STALLED:
            return self.expired, "body transfer stalled"
        if self.conn.stream.closed():
            return ErrorKind.CLIENT_ABORTED, "client closed the connection"
        if self.phase is Phase.RESPONDING:
            return ErrorKind.UPSTREAM_RESET, "origin closed the connection mid-response"
        return ErrorKind.UPSTREAM_RESET, "origin closed the connection before responding"

    async def _fail(self, kind: ErrorKind, detail: str, keep_alive: bool, framing: Framing) -> bool:
        if self.up is not None:
            self.up.stream.close()
        if self.hf is not None:
            self.flow.fail(kind, detail)
            try:
                await self.conn.proxy.addons.call("error", self.hf)
            except AddonFailed:
                pass  # the exchange has failed already
        if self.responded or self.conn.stream.closed():
            # Too late for an error page: closing is the only way to signal that the
            # body is truncated.
            self.flow.fail(kind, detail)
            self.conn.stream.close()
            return False
        body_left = framing.kind is not BodyKind.NONE and (
            self.upload is None or not self.upload.done()
        )
        close = body_left or not keep_alive or self.conn.proxy.draining
        return await self.conn.answer_error(self.flow, kind, detail, close=close)
