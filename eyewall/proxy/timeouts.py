"""Every wait has a named phase and a limit: `Phase`, `Watch` and the `Watchdog`.

A client connection always is in exactly one phase — waiting for a request head,
connecting to an origin, waiting for its response head, moving a body, running an
addon hook, ... — and its `Watch` records which, since when, and the limit.  The
`Watchdog` sweeps every watch periodically and expires those over their limit: the
watch's ``on_expire`` closes the streams involved, the waiting coroutine wakes with
`StreamClosedError` and `Watch.expired` says which phase ran out, hence the error kind.

Two kinds of limit:

* a deadline (``client_header``, ``upstream_connect``, ``upstream_head``,
  ``keepalive_idle``, the TLS handshake): the phase may last at most that long;
* an idle limit (``body_idle``): the phase may go on for ever as long as bytes move.
  Progress is read from counters the data path keeps anyway (body bytes read, bytes
  each stream handed to the kernel) only when the sweep looks, so the data path pays
  nothing per piece; when they stand still, from the kernel's send queues, which
  shrink as a peer takes bytes (`Watch.check`).  A slow but steady reader or writer is
  never cut off, and the wait for a response head never counts as body idleness
  (entering a phase starts its clock afresh).

Addon hooks run in phase ``HOOK``, which the sweep never expires: the hook runner
enforces ``timeouts.addon_hook`` itself, so a slow addon is never reported as a silent
origin.

Why a sweep and not a timer per operation: see docs/design.md (measured).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Protocol

from tornado.ioloop import PeriodicCallback

from eyewall.config import Timeouts
from eyewall.errors import ErrorKind

__all__ = ["Phase", "Watch", "Watchdog", "Watched", "sweep_interval"]

log = logging.getLogger("eyewall.timeouts")


@enum.unique
class Phase(enum.Enum):
    """(what is waited for, in words; the `Timeouts` setting that limits the phase,
    idle-based?, the error kind when it runs out; None: the connection is closed
    quietly).  The words make every value distinct: members with equal values would be
    aliases of one another, and RESPONDING would be SENDING."""

    IDLE = ("idle", "keepalive_idle", False, None)  # between requests, kept alive
    CLIENT_HEAD = ("the request head", "client_header", False, ErrorKind.CLIENT_TIMEOUT)
    RESOLVING = (
        "resolving the origin's name",
        "upstream_connect",
        False,
        ErrorKind.CONNECTION_TIMEOUT,
    )
    CONNECTING = (
        "connecting to the origin",
        "upstream_connect",
        False,
        ErrorKind.CONNECTION_TIMEOUT,
    )
    SENDING = (  # request body, no response yet
        "sending the request body (no byte moved)",
        "body_idle",
        True,
        ErrorKind.BODY_STALLED,
    )
    WAITING = (  # request sent
        "waiting for the origin's response head",
        "upstream_head",
        False,
        ErrorKind.READ_TIMEOUT,
    )
    BUFFERING = (  # a body read for an addon
        "reading a body for an addon (no byte moved)",
        "body_idle",
        True,
        ErrorKind.BODY_STALLED,
    )
    RESPONDING = (  # response body in transit
        "the response body (no byte moved)",
        "body_idle",
        True,
        ErrorKind.BODY_STALLED,
    )
    # User code: the addon runner enforces timeouts.addon_hook.
    HOOK = ("an addon hook", "", False, None)
    AUTHENTICATING = ("checking a password", "", False, None)  # bounded by its queue
    # Bounded by tls.handshake_timeout where the handshake runs.
    HANDSHAKE = ("the TLS handshake", "", False, ErrorKind.CLIENT_TLS_ERROR)
    CLOSING = ("closing", "", False, None)  # an answer is out; the connection is closing

    def __init__(self, what: str, setting: str, idle: bool, kind: ErrorKind | None) -> None:
        self.what = what
        self.setting = setting
        self.idle = idle
        self.kind = kind

    def limit(self, timeouts: Timeouts) -> float | None:
        """Seconds this phase may last (or stay idle) under ``timeouts``; None: no limit
        enforced by the sweep."""
        return float(getattr(timeouts, self.setting)) if self.setting else None


_NEVER = float("inf")


class Watch:
    """The phase one connection is in, for the `Watchdog`.

    ``on_expire(phase)`` is called once when the phase runs out; it must wake whatever
    waits (usually by closing streams).  For idle-based phases, ``progress`` returns a
    number that grows whenever the proxy moves bytes, and ``unsent`` (optional) the
    bytes still in the kernel's send queues of the sockets involved (see `check`).
    """

    __slots__ = (
        "deadline",
        "expired",
        "grace",
        "limit",
        "on_expire",
        "phase",
        "progress",
        "queued",
        "seen",
        "since",
        "unsent",
    )

    def __init__(self, on_expire: Callable[[Phase], None]) -> None:
        self.on_expire = on_expire
        self.phase = Phase.CLOSING
        self.limit: float | None = None
        self.deadline = float("inf")
        self.since = 0.0
        self.progress: Callable[[], int] | None = None
        self.unsent: Callable[[], int] | None = None
        self.seen = 0
        self.queued: int | None = None  # ``unsent()`` when last read; None: not read
        self.grace = 0.0  # seconds a deadline phase waits on a queue that stands still
        self.expired: Phase | None = None

    def enter(
        self,
        phase: Phase,
        now: float,
        limit: float | None,
        progress: Callable[[], int] | None = None,
        unsent: Callable[[], int] | None = None,
        grace: float = 0.0,
    ) -> None:
        """Start ``phase`` at ``now`` (loop time, seconds) with ``limit`` seconds (None:
        unlimited).  An idle-based phase needs ``progress``; ``unsent`` is optional (for
        a deadline phase: a send queue still shrinking at the deadline moves it, and
        while it holds bytes the phase ends only after ``grace`` seconds without a
        change, see `check`).  A phase that ran out before is history: the new one has
        its own limit (``expired`` goes back to None)."""
        self.phase = phase
        self.expired = None
        self.limit = limit
        self.since = now
        self.deadline = _NEVER if limit is None or phase.idle else now + limit
        self.progress = progress
        self.unsent = unsent
        self.seen = progress() if progress is not None else 0
        self.queued = None
        self.grace = grace

    def check(self, now: float) -> None:
        """Expire the phase if it is over its limit at ``now``.

        An idle-based phase runs out when no byte moved, either way, for its limit.
        The proxy's counters see a byte when the proxy reads it or hands it to the
        kernel; but a kernel send buffer of megabytes stays full (unwritable) for seconds
        while a slow reader steadily takes bytes from it.  So the first sweep that finds
        the counters unchanged notes ``unsent()``, and at the limit a smaller queue is
        progress too: bytes moved on the wire.  (With no new bytes handed over, the
        queue can only shrink.)  Where ``unsent`` cannot be read it stays 0, and only
        the counters count.
        """
        if self.expired is not None or self.limit is None:
            return
        if not self.phase.idle:
            if now >= self.deadline:
                # A deadline phase given ``unsent`` (the wait for a response head) starts
                # once the request is on the wire: while the kernel still holds some of
                # it for a slowly reading origin, a queue that shrank moves the deadline.
                queued = self.unsent() if self.unsent is not None else 0
                if queued != self.queued and (queued or self.queued):  # it moved
                    self.queued = queued
                    self.since = now
                    self.deadline = now + self.limit
                    return
                if queued and now - self.since < self.grace:
                    return  # still in the queue: the body's idle limit governs its pauses
                self._expire()
            return
        assert self.progress is not None
        moved = self.progress()
        if moved != self.seen:
            self.seen = moved
            self.since = now
            self.queued = None
        elif self.queued is None:
            self.queued = self.unsent() if self.unsent is not None else 0
        elif now - self.since >= self.limit:
            queued = self.unsent() if self.unsent is not None else 0
            if queued == self.queued:
                self._expire()
            else:
                self.queued = queued
                self.since = now

    def _expire(self) -> None:
        self.expired = self.phase
        try:
            self.on_expire(self.phase)
        except Exception:
            log.exception("expiring %s failed", self.phase.name)


class Watched(Protocol):
    """Anything the watchdog checks: connections, tunnels."""

    def check(self, now: float) -> None:
        """Act on any limit passed by ``now`` (loop time, seconds)."""


class Watchdog:
    """Calls ``check(now)`` on everything watched, every ``interval`` seconds."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self.watched: set[Watched] = set()
        self._timer: PeriodicCallback | None = None
        self._last: float | None = None  # when the timer last swept (or skipped)
        self._skipped = False

    def start(self) -> None:
        """Start sweeping every ``interval`` seconds."""
        self._timer = PeriodicCallback(self.tick, self.interval * 1000)
        self._timer.start()

    def tick(self) -> None:
        """The timer's sweep.  One that comes more than an interval late follows a
        stall of the event loop (an addon holding it, a starved machine): what peers
        did meanwhile — an origin's answer, a connection made — is still unread, and
        expiring now would blame them for the proxy's own delay.  That sweep is
        skipped, once: the next comes after the loop has caught up."""
        now = self.clock()
        last, self._last = self._last, now
        if last is not None and now - last > 2 * self.interval and not self._skipped:
            self._skipped = True
            log.debug("the event loop was held for %.1f s: expiry waits a sweep", now - last)
            return
        self._skipped = False
        self.sweep(now)

    def set_interval(self, interval: float) -> None:
        """Sweep every ``interval`` seconds from now on (after a reload)."""
        if interval != self.interval:
            self.interval = interval
            if self._timer is not None:
                self._timer.stop()
                self.start()

    def stop(self) -> None:
        """Stop sweeping."""
        if self._timer is not None:
            self._timer.stop()

    def add(self, item: Watched) -> None:
        """Watch ``item`` until discarded."""
        self.watched.add(item)

    def discard(self, item: Watched) -> None:
        """Stop watching ``item`` (no error if it was not watched)."""
        self.watched.discard(item)

    def sweep(self, now: float | None = None) -> None:
        """Check everything at ``now`` (default: the clock); tests pass their own time."""
        now = self.clock() if now is None else now
        for item in list(self.watched):
            try:
                item.check(now)
            except Exception:
                log.exception("watchdog check of %r failed", item)


def sweep_interval(timeouts: Timeouts, pool_idle: float) -> float:
    """A tenth of the smallest limit, between 50 ms and 1 s.  A phase ends at most two
    sweeps after its limit: an idle-based one is first seen idle up to one interval after
    its last byte, and a sweep that runs a little late puts the next one a hair short of
    the limit, so expiry can wait for one sweep more.  Limits of 0.5 to 10 s are
    enforced within 20%, shorter ones within 0.1 s, longer ones within 2 s."""
    smallest = min(
        timeouts.client_header,
        timeouts.keepalive_idle,
        timeouts.upstream_connect,
        timeouts.upstream_head,
        timeouts.body_idle,
        timeouts.tunnel_idle,
        pool_idle,
    )
    return min(1.0, max(0.05, smallest / 10))
