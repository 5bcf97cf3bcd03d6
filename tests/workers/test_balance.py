"""Spreading new connections: a worker with more open connections than the least busy
one of its group (plus the slack) declines, but never more than MAX_DEFERRALS times in
a row; workers of another group, or draining, do not count."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from eyewall.workers.balance import MAX_DEFERRALS, SLACK, Balancer
from eyewall.workers.limits import create_segment
from eyewall.workers.shm import Segment


@pytest.fixture
def segment() -> Iterator[Segment]:
    s = create_segment()
    yield s
    s.close()


class Worker:
    def __init__(self, segment: Segment, slot: int, group: int = 100) -> None:
        self.open = 0
        segment.set_slot(slot, 1000 + slot, 1)
        self.gate = Balancer(segment, slot, group, lambda: self.open)
        self.gate.join()


def refreshed(*workers: Worker) -> None:
    for w in workers:
        w.gate.refresh()


def test_alone_a_worker_always_accepts(segment) -> None:
    a = Worker(segment, 0)
    a.open = 1000
    assert all(a.gate() for _ in range(10))


def test_the_busier_worker_declines_within_a_bound(segment) -> None:
    a, b = Worker(segment, 0), Worker(segment, 1)
    refreshed(a, b)
    segment.set_load(1, 3)  # b's last published count
    a.open = 3 + SLACK
    assert a.gate()  # within the slack
    a.open = 4 + SLACK
    answers = [a.gate() for _ in range(MAX_DEFERRALS + 1)]
    assert answers == [False] * MAX_DEFERRALS + [True]  # declines, then takes it anyway
    assert not a.gate()  # and declines again after
    b.open = a.open
    assert b.gate()  # b caught up (and published it): even again
    assert a.gate()


def test_other_groups_and_draining_workers_do_not_count(segment) -> None:
    a, b, old = Worker(segment, 0), Worker(segment, 1), Worker(segment, 2, group=99)
    refreshed(a, b, old)
    assert a.gate.peers == [1]  # the other generation's worker is not a peer
    b.gate.leave()
    refreshed(a)
    assert a.gate.peers == []
    a.open = 500
    assert a.gate()
