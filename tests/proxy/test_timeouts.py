"""`Watch.check` alone, with made-up counters and kernel send queues: what counts as
bytes moving in an idle-based phase."""

from __future__ import annotations

import pytest

from eyewall.config import load_settings
from eyewall.proxy.timeouts import Phase, Watch, sweep_interval


class Wire:
    """The counters the data path keeps and the kernel's send queue, set by the test."""

    def __init__(self) -> None:
        self.counted = 0
        self.queued = 0

    def progress(self) -> int:
        return self.counted

    def unsent(self) -> int:
        return self.queued


def waiting(queued: int, limit: float, grace: float = 0.0) -> tuple[Wire, list[Phase], Watch]:
    """A watch in the wait for a response head (``limit`` seconds from 0), ``queued``
    bytes of the request still in the send queue; the phases that expired."""
    wire = Wire()
    wire.queued = queued
    expired: list[Phase] = []
    w = Watch(expired.append)
    w.enter(Phase.WAITING, 0.0, limit, None, wire.unsent, grace=grace)
    return wire, expired, w


def watch(wire: Wire, with_queue: bool = True) -> tuple[Watch, list[Phase]]:
    expired: list[Phase] = []
    w = Watch(expired.append)
    w.enter(Phase.RESPONDING, 0.0, 3.0, wire.progress, wire.unsent if with_queue else None)
    return w, expired


def test_a_shrinking_send_queue_is_progress_while_the_counters_stand_still() -> None:
    wire = Wire()
    wire.queued = 4 << 20
    w, expired = watch(wire)
    for t in range(1, 31):  # 30 s without a byte counted; the queue drains 64 KiB/s
        wire.queued -= 64 << 10
        w.check(float(t))
    assert expired == []
    for t in range(31, 35):  # now nothing moves at all
        w.check(float(t))
    assert expired == [Phase.RESPONDING]


def test_a_full_queue_that_stays_full_is_a_stall() -> None:
    wire = Wire()
    wire.queued = 4 << 20
    w, expired = watch(wire)
    w.check(1.0)  # notes the queue
    w.check(2.9)
    assert expired == []
    w.check(3.0)
    assert expired == [Phase.RESPONDING]


def test_counted_bytes_reset_the_clock_and_the_noted_queue() -> None:
    wire = Wire()
    w, expired = watch(wire)
    for t in range(1, 10):
        wire.counted += 1
        wire.queued = 100 * t  # changes only while bytes are counted: not needed then
        w.check(float(t))
    w.check(10.0)  # first quiet sweep: notes the queue
    w.check(11.9)
    assert expired == []
    w.check(12.0)
    assert expired == [Phase.RESPONDING]


def test_without_a_send_queue_only_the_counters_count() -> None:
    """Where the queue cannot be read (``unsent`` None or always 0) the limit works as
    before: the counters alone."""
    wire = Wire()
    w, expired = watch(wire, with_queue=False)
    w.check(1.0)
    w.check(2.9)
    assert expired == []
    w.check(3.0)
    assert expired == [Phase.RESPONDING]


def test_deadline_phases_ignore_progress() -> None:
    expired: list[Phase] = []
    w = Watch(expired.append)
    w.enter(Phase.WAITING, 0.0, 5.0)
    w.check(4.9)
    assert expired == []
    w.check(5.0)
    assert expired == [Phase.WAITING]


def test_the_head_deadline_runs_from_when_the_request_left_the_kernel() -> None:
    """An upload the kernel absorbed whole, to an origin reading it slowly: while the
    send queue shrinks the wait for the response head has not begun; once it stops
    (drained, or stuck), the deadline holds."""
    wire, expired, w = waiting(800 << 10, 5.0)
    for t in range(5, 21, 5):  # the origin reads 200 KiB per 5 s: drained by t = 20
        wire.queued -= 200 << 10
        w.check(float(t))
    assert expired == [] and wire.queued == 0
    w.check(24.9)
    assert expired == []
    w.check(25.0)  # 5 s after the sweep that saw the last of the request leave
    assert expired == [Phase.WAITING]


def test_a_stuck_request_gets_one_more_deadline_at_most() -> None:
    _, expired, w = waiting(100, 5.0)
    w.check(5.0)  # notes the queue: maybe moving
    assert expired == []
    w.check(10.0)  # it did not
    assert expired == [Phase.WAITING]


def test_a_request_still_queued_pauses_within_the_body_idle_grace() -> None:
    """An origin reading an upload in bursts 3 s apart, upstream_head 2 s, body_idle
    10 s: between bursts the queue stands still for longer than the head's limit, but
    not for the body's idle limit: no expiry while bytes remain; once they are gone
    the head deadline holds."""
    wire, expired, w = waiting(90_000, 2.0, grace=10.0)
    for t in range(1, 29):
        if t % 3 == 0:
            wire.queued -= 10_000  # a burst read every 3 s
        w.check(float(t))
    assert wire.queued == 0 and expired == []  # drained at t = 27, noticed then
    w.check(28.9)
    assert expired == []
    w.check(29.0)  # the head's 2 s from the sweep that saw the queue empty
    assert expired == [Phase.WAITING]


def test_a_stuck_queue_ends_after_the_grace() -> None:
    _, expired, w = waiting(100, 2.0, grace=10.0)
    w.check(2.0)  # notes the queue, moves the deadline to 4
    w.check(11.9)
    assert expired == []
    w.check(12.0)  # 10 s without a change
    assert expired == [Phase.WAITING]


# -- how late a limit runs out, at the sweep interval the proxy uses ----------------------


@pytest.mark.parametrize("limit", [0.3, 2.0, 7.0, 10.0, 30.0, 120.0])
@pytest.mark.parametrize("stop", [0.0, 0.01, 0.5, 0.99])  # when the last byte moves, in sweeps
def test_an_idle_phase_ends_no_earlier_than_its_limit_and_within_a_fifth_after(
    limit: float, stop: float
) -> None:
    """Sweeping at `sweep_interval`, each sweep up to 1% of an interval late (as the
    event loop runs timers): an idle-based phase never ends before ``limit`` seconds
    without a byte, and at most 20% later (limits of 0.5 to 10 s; 0.1 s below, 2 s above)."""
    timeouts = load_settings(overrides={"timeouts.body_idle": limit}).timeouts
    interval = sweep_interval(timeouts, 30.0)
    wire = Wire()
    expired: list[Phase] = []
    w = Watch(expired.append)
    w.enter(Phase.RESPONDING, 0.0, limit, wire.progress, wire.unsent)
    last_byte = (3 + stop) * interval  # bytes moved until then
    ended = None
    for k in range(1, 100_000):
        now = (k + (k * 7919 % 13) / 1300) * interval  # on a grid, a little late
        if now - interval < last_byte:  # bytes moved since the last sweep
            wire.counted += 1
        w.check(now)
        if expired:
            ended = now
            break
    assert ended is not None
    late = ended - last_byte - limit
    assert late >= 0
    bound = 0.1 if limit < 0.5 else 0.2 * limit if limit <= 10 else 2.0  # (50 ms sweeps)
    assert late <= bound + 1e-9


def test_a_sweep_that_comes_late_after_a_stall_of_the_loop_is_skipped_once() -> None:
    """After the loop was held (an addon blocking it), peers' answers are still unread:
    the late sweep expires nothing, the next one (after the loop caught up) does.  A
    loop late all the time is still swept every other time."""
    from eyewall.proxy.timeouts import Watchdog

    now = [0.0]
    dog = Watchdog(1.0, lambda: now[0])
    seen: list[float] = []

    class Item:
        def check(self, at: float) -> None:
            seen.append(at)

    dog.add(Item())
    for at in (1.0, 2.0, 6.0, 7.0, 12.0, 17.0, 22.0):
        now[0] = at
        dog.tick()
    assert seen == [1.0, 2.0, 7.0, 17.0]


def test_a_phase_entered_after_an_expiry_has_its_own_limit() -> None:
    """A connection kept open after a phase ran out (a 504 on a kept-alive connection)
    is watched again from its next phase on."""
    expired: list[Phase] = []
    w = Watch(expired.append)
    w.enter(Phase.WAITING, 0.0, 2.0)
    w.check(2.5)
    assert expired == [Phase.WAITING] and w.expired is Phase.WAITING
    w.enter(Phase.IDLE, 3.0, 5.0)
    assert w.expired is None
    w.check(7.9)
    assert expired == [Phase.WAITING]
    w.check(8.1)
    assert expired == [Phase.WAITING, Phase.IDLE]


@pytest.mark.parametrize(
    "setting", ["client_header", "keepalive_idle", "upstream_connect", "upstream_head", "body_idle"]
)
def test_every_deadline_is_swept_at_a_tenth_of_itself(setting: str) -> None:
    """The smallest limit sets the sweep: a 0.3 s limit is enforced within 0.1 s."""
    timeouts = load_settings(overrides={f"timeouts.{setting}": 0.3}).timeouts
    assert sweep_interval(timeouts, 30.0) == pytest.approx(0.05)
