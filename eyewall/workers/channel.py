"""Frames (`eyewall.workers.wire`) over a Unix stream socket, on the event loop.

`Channel.send` never waits: the frame joins the stream's write buffer, which is
bounded — past ``max_pending`` bytes not yet written, a frame sent without ``force``
is refused (the caller counts it as dropped).  A worker's flows may be lost that way
when the supervisor falls behind; its traffic never waits for the supervisor.
"""

from __future__ import annotations

import socket
from concurrent.futures import Future as ConcurrentFuture

from tornado.iostream import IOStream, StreamClosedError

from eyewall.workers.wire import HEAD, MAX_FRAME

__all__ = ["Channel", "StreamClosedError"]

MAX_PENDING = 8 << 20


class Channel:
    """One end of a supervisor-worker socket pair."""

    def __init__(self, sock: socket.socket, max_pending: int = MAX_PENDING) -> None:
        sock.setblocking(False)
        self.stream = IOStream(sock, max_buffer_size=MAX_FRAME + HEAD.size)
        self.max_pending = max_pending
        self.pending = 0  # bytes handed to the stream and not yet written
        self.refused = 0  # frames refused by the bound

    def send(self, data: bytes, force: bool = False) -> bool:
        """Queue a frame; False (nothing queued) when the channel is closed, or when
        it would exceed the bound and ``force`` is not set."""
        if self.stream.closed():
            return False
        size = len(data)
        if not force and self.pending + size > self.max_pending:
            self.refused += 1
            return False
        self.pending += size
        try:
            written = self.stream.write(data)
        except StreamClosedError:
            self.pending -= size
            return False

        def done(future: ConcurrentFuture[None] | object) -> None:
            self.pending -= size
            exception = getattr(future, "exception", None)
            if exception is not None:
                exception()  # retrieved: a closed channel is noticed by the reader

        written.add_done_callback(done)
        return True

    async def receive(self) -> tuple[int, bytes]:
        """The next frame; raises StreamClosedError when the other end is gone."""
        head = await self.stream.read_bytes(HEAD.size)
        length, kind = HEAD.unpack(head)
        if not 1 <= length <= MAX_FRAME:
            self.stream.close()
            raise StreamClosedError(real_error=ValueError(f"frame of {length} bytes"))
        payload = await self.stream.read_bytes(length - 1) if length > 1 else b""
        return kind, payload

    async def drained(self) -> None:
        """Everything queued so far is written (or the channel closed)."""
        if self.stream.closed() or not self.pending:
            return
        try:
            await self.stream.write(b"")
        except StreamClosedError:
            pass

    def close(self) -> None:
        """Close this end (the other end reads end of file)."""
        self.stream.close()
