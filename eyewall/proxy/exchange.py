"""Forwarding one admitted HTTP request to its origin and the response back.

    client ──head──▶ proxy ──head──▶ origin        (pooled connection; retried once on a
    client ──body──▶ proxy ──body──▶ origin         stale one if the method is idempotent)
    client ◀─1xx/head/body── proxy ◀── origin      (re-framed for the client)

`Exchange.run` returns an `Outcome` and never calls back into the client loop: the
origin's response (interim responses included) is written here, and so is the one
interim response the proxy makes itself (a ``100 Continue`` when it reads a body for an
addon before asking the origin, or when a Connection option kept Expect from the
origin); every final answer the proxy makes itself — an error page, an addon's
``respond()`` — is written by the client loop from the outcome.

The request body is uploaded by a task while the response is awaited, so an origin may
answer before it has read the whole body (a 413, or a refused 100-continue).  Each wait
is a phase of the connection's `Watch` (`eyewall.proxy.timeouts`): SENDING while the
body goes up, WAITING for the response head (and for the first body byte of a client
that expects 100 Continue), HOOK while addon code runs, BUFFERING while a body is read
for an addon, RESPONDING while the response body goes down.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from time import monotonic

from tornado.iostream import IOStream, StreamClosedError

from eyewall.addons.api import Answer, HTTPFlow, Response
from eyewall.addons.hooks import (
    ErrorHook,
    RequestHeaders,
    RequestHook,
    ResponseHeaders,
    ResponseHook,
)
from eyewall.addons.runner import AddonFailed
from eyewall.errors import ErrorKind, ProxyError
from eyewall.flow import Flow
from eyewall.http1 import fields as wire
from eyewall.http1 import framing as rules
from eyewall.http1.chunked import ChunkedDecoder, encode_chunk
from eyewall.http1.framing import BodyKind, Framing
from eyewall.http1.parse import ParseError, RequestHead, ResponseHead
from eyewall.http1.response import parse_response_head
from eyewall.http1.target import Target
from eyewall.proxy import bodies
from eyewall.proxy.context import ProxyContext
from eyewall.proxy.streams import (
    complete,
    end_output,
    moved,
    read_buffered,
    read_head,
    unread,
    unsent,
)
from eyewall.proxy.timeouts import Phase, Watch
from eyewall.proxy.upstream import Upstream

log = logging.getLogger("eyewall.exchange")

__all__ = ["Answered", "Exchange", "Failed", "Killed", "Outcome", "Responded", "Upgraded"]

SMALL_BODY = 64 << 10  # responses up to this size that came with the head go out with it
INTERIM_BUDGET = 16  # interim response heads may total this many max_header_size
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Responded:
    """The origin's response went to the client whole."""

    keep_alive: bool


@dataclass(frozen=True, slots=True)
class Failed:
    """The exchange failed.  If nothing was sent yet the client gets the error page;
    otherwise it can only be closed.  ``close``: the connection cannot carry another
    request (a request body is left unread or broken)."""

    error: ProxyError
    responded: bool
    close: bool


@dataclass(frozen=True, slots=True)
class Answered:
    """An addon answered with ``flow.respond()``: send ``answer`` instead."""

    answer: Answer
    close: bool


@dataclass(frozen=True, slots=True)
class Killed:
    """An addon called ``flow.kill()``: close the connection without an answer."""


@dataclass(frozen=True, slots=True)
class Upgraded:
    """The origin's 101 went to the client: relay the two connections as bytes."""

    origin: Upstream


Outcome = Responded | Failed | Answered | Killed | Upgraded
FlowHook = RequestHeaders | RequestHook | ResponseHeaders | ResponseHook | ErrorHook


def _body_stalled_by_client() -> ProxyError:
    return ProxyError(ErrorKind.CLIENT_TIMEOUT, "request body: no byte came for timeouts.body_idle")


class Exchange:
    """One request and its response.  ``addresses`` are the destination's addresses
    admission allowed; ``hf`` is what addons see (None without addons)."""

    __slots__ = (
        "aborted",
        "addresses",
        "body",
        "buffered",
        "client",
        "ctx",
        "flow",
        "framing",
        "head",
        "hf",
        "opening",
        "reading",
        "received",
        "responded",
        "resume",
        "sent",
        "t_head",
        "target",
        "up",
        "upload",
        "upload_error",
        "upload_waits",
        "watch",
    )

    def __init__(
        self,
        ctx: ProxyContext,
        client: IOStream,
        watch: Watch,
        head: RequestHead,
        target: Target,
        flow: Flow,
        framing: Framing,
        addresses: tuple[str, ...],
        hf: HTTPFlow | None = None,
        t_head: float = 0.0,
    ) -> None:
        self.ctx = ctx
        self.client = client
        self.watch = watch
        self.head = head
        self.target = target
        self.flow = flow
        self.framing = framing
        self.addresses = addresses
        self.hf = hf
        self.t_head = t_head or monotonic()
        self.body: bytes | None = None  # a request body read whole (for addons)
        # A body too big for an addon: (what was read, where to go on).
        self.resume: tuple[bytes, int | ChunkedDecoder] | None = None
        self.up: Upstream | None = None
        # A new connection being opened (a task of its own: the watch cancels it, and
        # the client is answered 504, when the connect outlives its limit).
        self.opening: asyncio.Future[Upstream] | None = None
        self.upload: asyncio.Future[None] | None = None
        # The read of a request body an addon buffers (a task of its own: a client
        # that stalls it is answered 408, which closing its stream would not allow).
        self.reading: asyncio.Future[tuple[bytes, int | ChunkedDecoder | None]] | None = None
        self.upload_error: ProxyError | None = None
        self.aborted: ProxyError | None = None  # why the proxy cut it (`abort`)
        self.upload_waits = False  # the client has not begun a body it sends on 100
        self.responded = False  # a response head went to the client
        capture = ctx.settings.flows.body_limit
        self.sent = bodies.Meter(capture)  # request body bytes, client to origin
        self.received = bodies.Meter(capture)  # response body bytes, origin to client
        self.buffered = bodies.Meter()  # bytes read for an addon (progress only)

    # -- phases ------------------------------------------------------------------------

    def _progress(self) -> int:
        """Bytes moved so far, both ways (what the body-idle limit watches)."""
        sent, received = self.sent, self.received
        n = sent.count + sent.framing + received.count + received.framing + self.buffered.count
        n += moved(self.client)
        up = self.up
        return n + moved(up.stream) if up is not None else n

    def _unsent(self) -> int:
        """Bytes still in the kernel's send queues, both ways (they shrink as peers read)."""
        up = self.up
        n = unsent(self.client.socket)
        return n + unsent(up.stream.socket) if up is not None else n

    def _unsent_up(self) -> int:
        """Bytes of the request still in the kernel's send queue to the origin."""
        up = self.up
        return unsent(up.stream.socket) if up is not None else 0

    def _enter(self, phase: Phase) -> None:
        limit = phase.limit(self.ctx.settings.timeouts)
        if phase.idle:
            self.watch.enter(phase, self.ctx.clock(), limit, self._progress, self._unsent)
        elif phase is Phase.WAITING:  # the head's deadline runs once the request is out
            grace = self.ctx.settings.timeouts.body_idle
            self.watch.enter(phase, self.ctx.clock(), limit, None, self._unsent_up, grace)
        else:
            self.watch.enter(phase, self.ctx.clock(), limit)

    def abort(self, detail: str) -> bool:
        """Cut the exchange (the proxy is stopping): it ends as a failure,
        ``connection_terminated`` with ``detail``, and is recorded.  Its origin
        connection is closed; so is the client's, unless nothing was sent to the client
        yet (a connect, a request body on its way, the wait for the head, a body read
        for an addon): then the client is answered 502, and this returns True."""
        self.aborted = ProxyError(ErrorKind.CONNECTION_TERMINATED, detail)
        opening = self.opening
        if opening is not None and not opening.done():
            opening.cancel()  # `_open` raises ``aborted``: the client is answered 502
            return True
        up = self.up
        if up is not None:
            up.stream.close()
            if not self.responded:  # sending the body, waiting, buffering for an addon
                return True
        self.client.close()
        return False

    def expire(self, phase: Phase) -> None:
        """The watch ran out in ``phase``: wake the waiting coroutine by closing what it
        waits on.  The client stays open when an answer can still be sent: while a
        connection is opened (504), while the response head is awaited, and when the
        client stopped sending its request body (`client_timeout`, 408, RFC 9110
        §15.5.9; the origin is cut)."""
        up, reading, opening = self.up, self.reading, self.opening
        if phase is Phase.CONNECTING and opening is not None and not opening.done():
            opening.cancel()  # answered 504 by the exchange (`_open`)
            return
        if phase is Phase.BUFFERING and reading is not None and not reading.done():
            self.upload_error = _body_stalled_by_client()  # the origin is not asked yet
            reading.cancel()
            return
        client_stalled = phase is Phase.SENDING and not self.responded and self._client_stalled()
        if client_stalled:
            self.upload_error = _body_stalled_by_client()
        if up is not None:
            up.stream.close()
        answerable = not self.responded and (
            phase is Phase.WAITING
            or client_stalled
            or (phase is Phase.BUFFERING and up is not None)  # a body from the origin: 504
        )
        if not answerable:
            self.client.close()

    def _client_stalled(self) -> bool:
        """Whether the upload waits for the client, with nothing queued for the origin."""
        up = self.up
        return (
            self.client.reading()
            and up is not None
            and not up.stream.writing()
            and not self._unsent_up()
        )

    # -- the exchange ------------------------------------------------------------------

    async def run(self) -> Outcome:
        """Forward the request and relay the response; never raises for a failure of
        the client, the origin or an addon (those are outcomes)."""
        head, flow, framing, hf = self.head, self.flow, self.framing, self.hf
        upgrade = rules.websocket_upgrade(head)
        try:
            if hf is not None:
                framing = await self._request_hooks(hf, framing)
                if hf.killed:
                    return Killed()
                if hf.answer is not None:
                    body_left = framing.kind is not BodyKind.NONE and self.body is None
                    return Answered(hf.answer, body_left)
            response = await self._send(framing, upgrade)
            if response.status == 101:
                return await self._switch(response)
            return await self._respond(response, rules.keep_alive(head))
        except ProxyError as e:
            return await self._failed(e, framing)
        except StreamClosedError:
            return await self._failed(self._closed_reason(), framing)
        except ParseError as e:  # broken chunked framing in the response body
            return await self._failed(ProxyError(ErrorKind.HTTP_PROTOCOL_ERROR, str(e)), framing)
        except AddonFailed as e:
            return await self._failed(ProxyError(ErrorKind.ADDON_FAILED, str(e)), framing)
        except BaseException:  # a bug, or cancellation: the origin connection is unusable
            if self.up is not None:
                self.up.stream.close()
            raise
        finally:
            if self.upload is not None and self.responded:
                await self._finish_upload()
            flow.bytes_in = self.sent.count
            flow.bytes_out = self.received.count
            flow.request_body = self.sent.capture
            flow.response_body = self.received.capture

    async def _hook(self, hook: type[FlowHook]) -> None:
        assert self.hf is not None
        self._enter(Phase.HOOK)  # not the origin's time: the runner bounds async hooks
        await self.ctx.addons.call(hook(self.hf))

    async def _open(self, target: Target) -> Upstream:
        """A new connection to ``target``; ProxyError as `UpstreamPool.open` raises it,
        or CONNECTION_TIMEOUT when the watch cut the connect short (`expire`)."""
        # Bounded by the watch (Phase.CONNECTING), which waits out a stall of the loop
        opening = asyncio.ensure_future(self.ctx.pool.open(target, self.addresses))
        self.opening = opening
        try:
            return await opening
        except asyncio.CancelledError:
            if not opening.cancelled() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # not the watch's doing: this exchange itself is cancelled
            if self.aborted is not None:
                raise self.aborted from None
            if self.client.closed():  # the client left (`ClientConnection.check`)
                raise ProxyError(
                    ErrorKind.CLIENT_ABORTED, "client left while the proxy connected"
                ) from None
            what = (
                "TLS connection (TCP and handshake)" if target.scheme == "https" else "connection"
            )
            raise ProxyError(
                ErrorKind.CONNECTION_TIMEOUT,
                f"no {what} to {target.authority} in time (timeouts.upstream_connect)",
            ) from None
        finally:
            self.opening = None
            if not opening.done():
                opening.cancel()

    async def _send(self, framing: Framing, upgrade: bool) -> ResponseHead:
        """Send the request (retrying a stale pooled connection once); return the final
        response head, relaying interim ones."""
        ctx, head, flow = self.ctx, self.head, self.flow
        if self.hf is not None and self.hf.request is not None:
            self.target = self.hf.request.target  # an addon may change the path
        target = self.target
        fields = wire.upstream_fields(head, target, framing, ctx.settings.via, upgrade)
        request = wire.render_request(head.method, target.path, fields)
        whole = framing.kind is BodyKind.NONE or self.body is not None
        retryable = whole and rules.is_idempotent(head.method)
        attempt = 0
        while True:
            up = None if attempt else ctx.pool.take(target, self.addresses, not retryable)
            if up is None or not whole:  # a pooled connection for a whole request: no wait
                self._enter(Phase.CONNECTING)
            if up is None:
                started = monotonic()
                up = await self._open(target)
                flow.connect_time = monotonic() - started
            self.up = up
            flow.upstream = up.peer
            flow.reused = up.uses > 0
            flow.t_connected = monotonic() - self.t_head
            try:
                if whole:
                    self._enter(Phase.WAITING)
                    up.stream.write(request + self.body if self.body else request)
                else:
                    # A client expecting 100 (Continue) sends nothing until an answer
                    # comes: that wait is the response head's (RFC 9110 §10.1.1).
                    waits = rules.expects_continue(head)
                    if waits and "expect" in head.headers.tokens("connection"):
                        # A Connection option made the expectation this hop's, and the
                        # origin does not get it: the proxy meets it (§7.6.1).
                        await self.client.write(CONTINUE)
                        waits = False
                    self._enter(Phase.WAITING if waits else Phase.SENDING)
                    await up.stream.write(request)
                    self.upload = asyncio.ensure_future(self._upload_body(framing, waits))
                return await self._read_final_head(upgrade)
            except StreamClosedError:
                # A pooled connection the origin closed just as we reused it: safe to
                # send again on a new one if nothing came back (RFC 9110 §9.2.2).
                if (
                    attempt
                    or not retryable
                    or not up.uses
                    or self.watch.expired is not None
                    or self.aborted is not None  # cut by the proxy's stop, not stale
                ):
                    raise
                up.stream.close()
                attempt += 1

    async def _upload_body(self, framing: Framing, waits: bool = False) -> None:
        """Stream the request body to the origin; ``waits``: the client sends it only
        after a 100 (Continue), so the phase is WAITING until its first byte comes."""
        src, up = self.client, self.up
        assert up is not None
        limit = self.ctx.settings.limits.max_header_size
        try:
            if waits:
                self.upload_waits = True
                unread(src, await src.read_bytes(1, partial=True))  # the body begins
                self.upload_waits = False
                if self.watch.phase is Phase.WAITING and self.watch.expired is None:
                    self._enter(Phase.SENDING)
            if self.resume is not None:  # an addon asked for a body too big to buffer
                prefix, resume = self.resume
                if framing.kind is BodyKind.LENGTH:
                    await bodies.copy_length(src, up.stream, framing.length, self.sent)
                else:
                    if prefix:
                        self._count(self.sent, prefix)
                        await up.stream.write(encode_chunk(prefix))
                    decoder = resume if isinstance(resume, ChunkedDecoder) else None
                    await bodies.copy_chunked(src, up.stream, True, self.sent, limit, decoder)
            elif framing.kind is BodyKind.LENGTH:
                await bodies.copy_length(src, up.stream, framing.length, self.sent)
            else:
                await bodies.copy_chunked(src, up.stream, True, self.sent, limit)
        except ParseError as e:
            # The client's chunked framing broke: stop the exchange; it answers 400.
            self.upload_error = ProxyError(ErrorKind.BAD_REQUEST, f"request body: {e}")
            up.stream.close()
            raise
        except StreamClosedError:
            up.stream.close()  # wakes the response read; the reason is found there
            raise
        if self.watch.phase is Phase.SENDING:
            self._enter(Phase.WAITING)

    async def settle(self, seconds: float = 2.0) -> None:
        """After the client loop answered a failed exchange: let a request body upload
        still running end (its origin is gone, so it stops at its next write), for at
        most ``seconds``; then close the client, whose body cannot be delimited.  A
        client still waiting for a 100 (Continue) has sent no body to wait for: it is
        closed at once."""
        task = self.upload
        if task is None or task.done() or self.upload_waits:
            await self._finish_upload()
            return
        error = self.upload_error
        if error is not None and error.kind is ErrorKind.CLIENT_TIMEOUT:
            # The upload waits for the client, which has its 408: its end of input,
            # so that it closes (and the upload ends) instead of waiting out ``seconds``.
            try:
                end_output(self.client)
            except OSError:
                pass
        try:
            async with asyncio.timeout(seconds):
                await asyncio.shield(task)
        except (TimeoutError, StreamClosedError, ParseError, ProxyError):
            pass
        await self._finish_upload()
        self.flow.bytes_in = self.sent.count

    async def _finish_upload(self) -> None:
        """Wait for or end the upload task so none outlives its exchange."""
        task = self.upload
        if task is None:
            return
        if not task.done():
            # The response is complete but the client is still sending: the rest of the
            # body can't be delimited from a next request, so the connection must close.
            self.client.close()
        try:
            await task
        except (StreamClosedError, ParseError, ProxyError):
            pass

    def _request_complete(self) -> bool:
        """Whether the whole request body was read (the connection can carry another)."""
        if self.framing.kind is BodyKind.NONE or self.body is not None:
            return True
        task = self.upload
        return (
            task is not None
            and task.done()
            and not task.cancelled()
            and task.exception() is None
            and self.upload_error is None
        )

    async def _read_final_head(self, upgrade: bool) -> ResponseHead:
        """Interim responses are relayed (RFC 9110 §15.2: a proxy MUST forward them,
        except to HTTP/1.0 clients), bounded by the WAITING deadline and by bytes."""
        up, head = self.up, self.head
        assert up is not None
        limit = self.ctx.settings.limits.max_header_size
        budget = limit * INTERIM_BUDGET
        while True:
            data = await read_head(up.stream, limit)
            if not complete(data):
                raise ProxyError(ErrorKind.HTTP_PROTOCOL_ERROR, "response head too large")
            try:
                response = parse_response_head(data)
            except ParseError as e:
                raise ProxyError(ErrorKind.HTTP_PROTOCOL_ERROR, str(e)) from None
            self.flow.head_bytes += len(data)
            if response.repairs:
                self._log_repairs("head", response.repairs)
            if response.status == 101:
                if not upgrade or "websocket" not in response.headers.tokens("upgrade"):
                    raise ProxyError(ErrorKind.HTTP_PROTOCOL_ERROR, "unrequested 101 response")
                return response
            if response.status >= 200:
                return response
            budget -= len(data)
            if budget < 0:
                raise ProxyError(ErrorKind.HTTP_PROTOCOL_ERROR, "interim responses too large")
            if head.version == "HTTP/1.1":
                fields = wire.response_fields(
                    response, rules.NO_BODY, head.version, True, self.ctx.settings.via
                )
                written = self.client.write(
                    wire.render_response(response.status, response.reason, fields)
                )
                if not written.done():  # a client slow to take them: body idleness
                    self._enter(Phase.RESPONDING)
                    await written
                    self._enter(Phase.WAITING)  # the interim budget bounds the rounds
                if response.status == 100 and self.upload_waits:
                    # The origin asked for the body: from now on the wait is the
                    # client's (body_idle, a 408), not the origin's head.
                    self._enter(Phase.SENDING)

    async def _respond(self, response: ResponseHead, keep_alive: bool) -> Outcome:
        ctx, head, flow, up = self.ctx, self.head, self.flow, self.up
        assert up is not None
        try:
            framing = rules.body_framing(response, head.method)
        except ParseError as e:
            raise ProxyError(ErrorKind.HTTP_PROTOCOL_ERROR, str(e)) from None
        client, origin = self.client, up.stream
        flow.response = response
        flow.t_response = monotonic() - self.t_head
        hf = self.hf
        buffered: bytes | None = None  # a whole body an addon read (and may have changed)
        # A body too big for an addon: what was read, where to go on.
        prefix: bytes = b""
        resume: int | ChunkedDecoder = 0
        limit = ctx.settings.limits.max_header_size
        # Response trailers are read as leniently as response heads.
        decoder = (
            ChunkedDecoder(bodies.CHUNK_LINE_LIMIT, limit, repair=True)
            if framing.kind is BodyKind.CHUNKED
            else None
        )
        dropped = False  # the origin's body is left unread: its connection cannot be reused
        if hf is not None:
            status = response.status
            hf.response = Response(response)
            await self._hook(ResponseHeaders)
            if hf.killed or hf.answer is not None:
                origin.close()  # its body is not read
                return self._addon_outcome(hf)
            # A body still carrying transfer codings cannot become a Content-Length one.
            if (
                hf.response.buffer_limit
                and framing.kind is not BodyKind.NONE
                and not framing.codings
            ):
                kind = {BodyKind.LENGTH: "length", BodyKind.CHUNKED: "chunked"}.get(
                    framing.kind, "close"
                )
                self._enter(Phase.BUFFERING)
                data, more = await bodies.read_upto(
                    origin,
                    kind,
                    framing.length,
                    hf.response.buffer_limit,
                    limit,
                    self.buffered,
                    decoder,
                )
                if more is None:
                    hf.response.body = data
                    await self._hook(ResponseHook)
                    if hf.killed or hf.answer is not None:
                        origin.close()
                        return self._addon_outcome(hf)
                    buffered = hf.response.body or b""
                    response.headers.remove("transfer-encoding")
                    response.headers.set("Content-Length", str(len(buffered)))
                    framing = Framing(BodyKind.LENGTH, len(buffered))
                else:
                    hf.response.truncated = True
                    prefix, resume = data, more
            bodiless = (204, 304)
            if response.status != status and response.status in bodiless:
                # An addon made it a 204 or 304: no content, and no field that would
                # frame one (RFC 9110 §6.4.1, §15.3.5, §15.4.5); the origin's body is
                # dropped, read or not.
                response.headers.remove("content-length")
                response.headers.remove("transfer-encoding")
                dropped = framing.kind is not BodyKind.NONE and buffered is None
                framing, prefix = rules.NO_BODY, b""
                buffered = b"" if buffered is not None else None
            elif response.status != status and status in bodiless and head.method != "HEAD":
                # Made from a 204 or 304 into a status with content: an empty one.
                response.headers.set("Content-Length", "0")
                framing = Framing(BodyKind.LENGTH, 0)
        out = rules.downstream_framing(framing, head.version)
        keep_alive = (
            keep_alive
            and out.kind is not BodyKind.CLOSE
            and not ctx.draining
            and (self.upload is None or self.upload.done())
        )
        fields = wire.response_fields(response, out, head.version, keep_alive, ctx.settings.via)
        head_bytes = wire.render_response(response.status, response.reason, fields)
        flow.status = response.status
        received = self.received
        whole: bytes | None = None  # the whole response, when it goes out in one write
        if buffered is not None:
            self._count(received, buffered)
            whole = head_bytes + buffered
        elif framing.kind is BodyKind.NONE:
            whole = head_bytes
        elif (
            framing.kind is BodyKind.LENGTH
            and framing.length <= SMALL_BODY
            and not resume
            and (small := read_buffered(origin, framing.length)) is not None
        ):
            # a small body that came with the head goes out with it, in one write; one
            # still on its way streams like any other (the head is not held back for it)
            self._count(received, small)
            whole = head_bytes + small
        self.responded = True
        if whole is not None:
            written = client.write(whole)
            if not written.done():  # the socket did not take it all: a wait to watch
                self._enter(Phase.RESPONDING)
            await written
        else:
            self._enter(Phase.RESPONDING)
            chunked = out.kind is BodyKind.CHUNKED
            if prefix:  # read for an addon that could not have it whole: send it first
                self._count(received, prefix)
                head_bytes += encode_chunk(prefix) if chunked else prefix
            await client.write(head_bytes)
            if framing.kind is BodyKind.LENGTH:
                await bodies.copy_length(origin, client, framing.length, received)
            elif framing.kind is BodyKind.CHUNKED:
                await bodies.copy_chunked(origin, client, chunked, received, limit, decoder)
            else:
                await bodies.copy_until_close(origin, client, chunked, received)
        if decoder is not None and decoder.repairs:
            self._log_repairs("trailers", decoder.repairs)
        if hf is not None and buffered is None:
            await self._hook(ResponseHook)  # after the fact: the body streamed
        upload = self.upload
        if upload is not None:
            await self._finish_upload()
        if (
            self._request_complete()
            and not dropped
            and framing.kind is not BodyKind.CLOSE
            and rules.keep_alive(response)
            and not origin.closed()
        ):
            self.up = None  # the pool's now: nothing here may close it
            ctx.pool.release(up, ctx.clock())
        else:
            origin.close()
        return Responded(keep_alive and not client.closed() and self._request_complete())

    def _log_repairs(self, section: str, repairs: tuple[str, ...]) -> None:
        assert self.up is not None
        log.info(
            "%s: repaired the response %s from %s (RFC 9112 §5): %s",
            self.flow.id,
            section,
            self.up.peer,
            "; ".join(repairs),
        )

    @staticmethod
    def _count(meter: bodies.Meter, data: bytes) -> None:
        meter.count += len(data)
        if meter.capture is not None:
            meter.keep(data)

    async def _request_hooks(self, hf: HTTPFlow, framing: Framing) -> Framing:
        """``requestheaders``, the body an addon asked for, ``request``; the framing the
        request is sent with afterwards."""
        await self._hook(RequestHeaders)
        if hf.answer is not None or hf.killed:
            return framing
        request = hf.request
        assert request is not None
        if request.buffer_limit and framing.kind is not BodyKind.NONE:
            kind = "length" if framing.kind is BodyKind.LENGTH else "chunked"
            limit = self.ctx.settings.limits.max_header_size
            if rules.expects_continue(self.head):
                # The proxy reads the body before the origin is asked: it answers the
                # expectation itself, and the origin gets none (RFC 9110 §10.1.1).
                self.head.headers.remove("expect")
                await self.client.write(CONTINUE)
            self._enter(Phase.BUFFERING)
            reading = self.reading = asyncio.ensure_future(
                bodies.read_upto(
                    self.client, kind, framing.length, request.buffer_limit, limit, self.buffered
                )
            )
            try:
                data, resume = await reading
            except ParseError as e:
                self.upload_error = ProxyError(ErrorKind.BAD_REQUEST, f"request body: {e}")
                raise self.upload_error from None
            except asyncio.CancelledError:
                if reading.cancelled() and self.upload_error is not None:  # `expire`
                    raise self.upload_error from None
                raise
            finally:
                self.reading = None
            if resume is None:
                request.body = data
            else:
                request.truncated = True
                self.resume = (data, resume)
        await self._hook(RequestHook)
        body = request.body
        if body is None or self.resume is not None:
            return framing
        if framing.kind is not BodyKind.NONE and not request.buffer_limit:
            return framing  # the body is still unread: it streams as it is
        self.body = body
        self._count(self.sent, body)
        self.head.headers.remove("transfer-encoding")
        if body or framing.kind is not BodyKind.NONE:
            self.head.headers.set("Content-Length", str(len(body)))
        return Framing(BodyKind.LENGTH, len(body)) if body else rules.NO_BODY

    def _addon_outcome(self, hf: HTTPFlow) -> Outcome:
        if self.up is not None:
            self.up.stream.close()
        if hf.killed:
            return Killed()
        assert hf.answer is not None
        return Answered(hf.answer, not self._request_complete())

    async def _switch(self, response: ResponseHead) -> Outcome:
        """Relay the 101 (RFC 6455 §4.1); the client loop turns both connections into a
        relay."""
        up = self.up
        assert up is not None
        via = self.ctx.settings.via
        fields = wire.response_fields(response, rules.NO_BODY, "HTTP/1.1", True, via, True)
        self.responded = True
        await self.client.write(wire.render_response(101, response.reason, fields))
        self.flow.response = response
        self.flow.status = 101
        self.flow.kind = "websocket"
        return Upgraded(up)

    def _closed_reason(self) -> ProxyError:
        """Why a stream closed under us: the watch's phase ran out, the client's body
        broke, the client left, or the origin did."""
        if self.upload_error is not None:
            return self.upload_error
        if self.aborted is not None:
            return self.aborted
        expired = self.watch.expired
        if expired is not None and expired.kind is not None:
            return ProxyError(
                expired.kind, f"{expired.what} took too long (timeouts.{expired.setting})"
            )
        if self.client.closed():
            return ProxyError(ErrorKind.CLIENT_ABORTED, "client closed the connection")
        if self.responded or self.flow.response is not None:  # (an addon buffers it)
            return ProxyError(
                ErrorKind.CONNECTION_TERMINATED, "origin closed the connection mid-response"
            )
        return ProxyError(
            ErrorKind.CONNECTION_TERMINATED, "origin closed the connection before responding"
        )

    async def _failed(self, error: ProxyError, framing: Framing) -> Failed:
        if self.up is not None:
            self.up.stream.close()
        self.flow.fail(error.kind, error.detail)
        if self.hf is not None:
            try:
                await self._hook(ErrorHook)
            except AddonFailed:
                pass  # the exchange has failed already
        close = not self._request_complete() or error.kind is ErrorKind.BAD_REQUEST
        return Failed(error, self.responded or self.client.closed(), close)
