"""Many cores on one machine: ``workers = N`` (or ``auto``) runs a supervisor and N
worker processes.

* The supervisor (`eyewall.workers.supervisor`) binds the listening sockets once and
  passes them to every worker; it owns the observers (access log, flow store, metrics,
  live feed, admin listener), the configuration (validated once, sent to every worker),
  the signals, and the shared memory of the limits.  It restarts a worker that dies.
  It starts, watches and restarts the workers (`eyewall.workers.pool`).
* A worker (`eyewall.workers.worker`) runs the proxy on those sockets, its limits in
  shared memory (`eyewall.workers.limits`, on `eyewall.workers.shm`), spreads new
  connections with the others (`eyewall.workers.balance`), and sends finished flows to
  the supervisor (`eyewall.workers.wire`, `eyewall.workers.channel`).
* A restart (`eyewall.workers.handover`) starts a new generation beside the running one
  on the same sockets, then drains the old.

docs/scaling.md explains the design and its numbers.  ``workers = 1`` (the default)
runs none of this: one process, as before.
"""

from __future__ import annotations

import os

__all__ = ["worker_count"]


def worker_count(value: int | str) -> int:
    """The number of workers a ``workers`` setting asks for: ``auto`` is the CPUs this
    process may run on (its affinity mask, as ``taskset`` or a cgroup cpuset set it)."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    return int(value)
