"""Spreading new connections over workers that share one listening socket.

A shared socket wakes every worker waiting on it, and the first one to run accepts.
On a busy host that is the worker already running: measured with wrk -c100 through two
workers, one took all 100 connections in three runs of four, and kept them (keep-alive)
for the whole run.  So each worker publishes how many client connections it has open
(in its slot of the shared segment) and, before accepting, compares: one with more than
the least busy worker of its generation, plus a slack, leaves the connection to the
others for a few milliseconds (`eyewall.proxy.server.ACCEPT_PAUSE`).  It never defers
more than `MAX_DEFERRALS` times in a row, so a worker that is stuck, or a count that is
stale, delays a new connection by milliseconds, never refuses it.
"""

from __future__ import annotations

from collections.abc import Callable

from eyewall.workers.shm import MAX_SLOTS, Segment

__all__ = ["Balancer"]

SLACK = 2  # connections more than the least busy worker that still accept
MAX_DEFERRALS = 2  # accepts in a row a worker may leave to the others


class Balancer:
    """The accept gate of the worker in ``slot`` of ``group`` (its supervisor's pid):
    call it before accepting; ``connections`` counts this worker's open ones."""

    def __init__(self, segment: Segment, slot: int, group: int, connections: Callable[[], int]):
        self.segment = segment
        self.slot = slot
        self.group = group
        self.connections = connections
        self.deferred = 0
        self.peers: list[int] = []
        self.seen = -1  # the membership the peers were read at
        self.refresh()

    def refresh(self) -> None:
        """Find the other workers of the group accepting now (a scan of the slots; the
        gate does it when the segment's membership number changed)."""
        segment, group = self.segment, self.group
        self.seen = segment.membership()
        self.peers = [i for i in range(MAX_SLOTS) if i != self.slot and segment.slot(i)[2] == group]

    def join(self) -> None:
        """Start taking part: this worker accepts from now on."""
        self.segment.set_load(self.slot, self.connections())
        self.segment.set_group(self.slot, self.group)

    def leave(self) -> None:
        """Stop taking part (draining): the others no longer wait for this worker."""
        self.segment.set_group(self.slot, 0)

    def __call__(self) -> bool:
        """Whether to accept now; publishes this worker's count either way."""
        mine = self.connections()
        segment = self.segment
        segment.set_load(self.slot, mine)
        if segment.membership() != self.seen:  # a worker joined or left
            self.refresh()
        if not self.peers:
            return True
        least = min(segment.load(i) for i in self.peers)
        if mine <= least + max(SLACK, least // 8) or self.deferred >= MAX_DEFERRALS:
            self.deferred = 0
            return True
        self.deferred += 1
        return False
