"""The limits of every worker in one place: `SharedLimits`, a `LimitsStore` in shared
memory (`eyewall.workers.shm`).

Synchronous like `AdmissionState` (``asynchronous = False``): admission performs its
limit steps on it without awaiting, each a few microseconds under one lock.  Four
tables:

* ``buckets``: token buckets of ``client_rps`` and ``user_rps``, keyed by limit and key
  (tokens, last update).  A full set forgets the bucket updated longest ago (the one
  closest to full again).
* ``totals``: connections and tunnels open per (counter, key), summed over workers.
* ``holdings``: the same counts per worker slot.  When a worker dies, its supervisor
  (`reap`) subtracts what the slot held from the totals: a worker killed with
  connections open does not leave them counted forever.
* ``logins``: failed logins per source and per user name (the newest
  `LoginThrottle` allowances of timestamps), evicting the stalest.

Counts are written holdings first on acquire and totals first on release, so a worker
killed between the two writes leaves an under-count, never a count that stays.  A
full set in ``totals`` or ``holdings`` (far beyond any configured cap) lets the
connection through uncounted and bumps the ``overflows`` statistic.

Time (``now``) is the caller's monotonic clock, the same in every process
(CLOCK_MONOTONIC); a bucket never moves backwards when two workers' clocks are read
a moment apart.
"""

from __future__ import annotations

from eyewall.policy.auth import LoginThrottle, source_key
from eyewall.policy.state import CredentialCache
from eyewall.workers.shm import EMPTY, MAX_SLOTS, Segment, Table, TableSpec

__all__ = ["TABLES", "SharedLimits", "create_segment", "reap"]

TABLES = (
    TableSpec("buckets", 1 << 14, "<dd"),  # 131,072 buckets: tokens, last update
    TableSpec("totals", 1 << 13, "<Ixxxx"),  # 65,536 keys with something open: count
    TableSpec("holdings", 1 << 14, "<16sHxxI"),  # totals tag, slot, count
    TableSpec("logins", 1 << 12, "<I4x20d"),  # 32,768 keys: events kept, timestamps
)
KEEP = 20  # timestamps a login entry holds: at least the largest allowance
EVICTIONS, OVERFLOWS = 0, 1  # Segment.stat indexes
CACHE = 4096  # digests remembered per process (then the cache starts over)


def create_segment() -> Segment:
    """A new segment for `SharedLimits` (the supervisor's; about 15 MiB, touched as
    used).  Raises OSError."""
    return Segment.create(TABLES)


class SharedLimits:
    """The `LimitsStore` of a worker in ``slot`` of ``segment``; see the module
    docstring.  ``throttle`` gives the login throttle's window and allowances (its
    own state is not used).  The verified-login cache is this process's own."""

    asynchronous = False

    def __init__(self, segment: Segment, slot: int, throttle: LoginThrottle | None = None) -> None:
        if not 0 <= slot < MAX_SLOTS:
            raise ValueError(f"slot {slot} out of range")
        self.segment = segment
        self.slot = slot
        t = throttle or LoginThrottle()
        if max(t.per_source, t.per_user) > KEEP:
            raise ValueError(f"login allowances above {KEEP} do not fit shared memory")
        self.window, self.per_source, self.per_user = t.window, t.per_source, t.per_user
        self.logins = t  # its parameters (a Redis store reads them); its state is unused
        self.credentials = CredentialCache()
        tables = segment.tables
        self._buckets = tables["buckets"]
        self._totals = tables["totals"]
        self._holdings = tables["holdings"]
        self._logins = tables["logins"]
        self._tags: dict[str, tuple[bytes, int]] = {}

    def _tag(self, table: Table, key: str) -> tuple[bytes, int]:
        found = self._tags.get(key)
        if found is None:
            if len(self._tags) >= CACHE:
                self._tags.clear()
            tag = self.segment.digest(key.encode("utf-8", "surrogatepass"))
            found = self._tags[key] = (tag, table.set_of(tag))
        return found

    # -- token buckets -----------------------------------------------------------------

    def take(self, limit: str, key: str, now: float, rate: float, burst: float) -> float | None:
        """Spend a token of bucket ``limit`` for ``key`` at ``now`` (monotonic seconds),
        ``rate`` per second up to ``burst``: None, or the seconds until the next one."""
        burst = max(burst, 1.0)
        table = self._buckets
        tag, set_index = self._tag(table, f"b\0{limit}\0{key}")
        segment = self.segment
        segment.lock()
        try:
            index = table.find(tag, set_index)
            if index == -1:
                index = table.claim(tag, set_index, self._stalest_bucket)
                table.write(index, burst - 1.0, now)
                return None
            tokens: float
            last: float
            tokens, last = table.read(index)
            if now > last:
                tokens = min(burst, tokens + (now - last) * rate)
                last = now
            if tokens >= 1.0:
                table.write(index, tokens - 1.0, last)
                return None
            table.write(index, tokens, last)
            return (1.0 - tokens) / rate
        finally:
            segment.unlock()

    def _stalest_bucket(self, set_index: int) -> int:
        table = self._buckets
        self.segment.bump(EVICTIONS)
        return min(table.entries_of_set(set_index), key=lambda i: float(table.read(i)[1]))

    # -- connections and tunnels ---------------------------------------------------------

    def acquire(self, counter: str, key: str, maximum: int) -> bool:
        """Count one more open ``counter`` for ``key`` unless ``maximum`` (0: no limit)
        are open in all workers together."""
        totals, holdings = self._totals, self._holdings
        total_tag, total_set = self._tag(totals, f"t\0{counter}\0{key}")
        held_tag, held_set = self._tag(holdings, f"h\0{self.slot}\0{counter}\0{key}")
        segment = self.segment
        segment.lock()
        try:
            t = totals.find(total_tag, total_set)
            n = int(totals.read(t)[0]) if t != -1 else 0
            if maximum and n >= maximum:
                return False
            h = holdings.find(held_tag, held_set)
            if h == -1:
                h = holdings.claim(held_tag, held_set)
                if h == -1:
                    segment.bump(OVERFLOWS)
                    return True
                held = 0
            else:
                held = int(holdings.read(h)[2])
            if t == -1:
                t = totals.claim(total_tag, total_set)
                if t == -1:
                    if not held:
                        holdings.clear(h)
                    segment.bump(OVERFLOWS)
                    return True
            holdings.write(h, total_tag, self.slot, held + 1)  # holdings first: see above
            totals.write(t, n + 1)
            return True
        finally:
            segment.unlock()

    def release(self, counter: str, key: str) -> None:
        """One ``counter`` for ``key`` closed (one this worker acquired)."""
        totals, holdings = self._totals, self._holdings
        total_tag, total_set = self._tag(totals, f"t\0{counter}\0{key}")
        held_tag, held_set = self._tag(holdings, f"h\0{self.slot}\0{counter}\0{key}")
        segment = self.segment
        segment.lock()
        try:
            h = holdings.find(held_tag, held_set)
            if h == -1:
                return  # never counted (an overflow), or reaped
            _decrement(totals, totals.find(total_tag, total_set), 1)  # totals first
            held = int(holdings.read(h)[2])
            if held > 1:
                holdings.write(h, total_tag, self.slot, held - 1)
            else:
                holdings.clear(h)
        finally:
            segment.unlock()

    def count(self, counter: str, key: str) -> int:
        """Open ``counter`` for ``key`` in all workers (for tests and the admin API)."""
        totals = self._totals
        tag, set_index = self._tag(totals, f"t\0{counter}\0{key}")
        with self.segment.locked():
            t = totals.find(tag, set_index)
            return int(totals.read(t)[0]) if t != -1 else 0

    # -- failed logins ----------------------------------------------------------------------

    def login_wait(self, client: str, user: str | None, now: float) -> float | None:
        """Seconds ``client``'s source or ``user`` is locked out for, or None."""
        waits = []
        segment = self.segment
        keys = self._login_keys(client, user)
        segment.lock()
        try:
            for (tag, set_index), allowance in keys:
                events = self._events(tag, set_index, now)[1]
                if len(events) >= allowance:
                    waits.append(events[-allowance] + self.window - now)
        finally:
            segment.unlock()
        return max(waits) if waits else None

    def login_failed(self, client: str, user: str | None, now: float) -> None:
        """Count a failed login of ``user`` from ``client`` at ``now``."""
        logins = self._logins
        keys = self._login_keys(client, user)
        segment = self.segment
        segment.lock()
        try:
            for (tag, set_index), _ in keys:
                index, events = self._events(tag, set_index, now)
                if index == -1:
                    index = logins.claim(tag, set_index, self._stalest_login)
                events.append(now)
                kept = events[-KEEP:]
                logins.write(index, len(kept), *kept, *[0.0] * (KEEP - len(kept)))
        finally:
            segment.unlock()

    def _login_keys(self, client: str, user: str | None) -> list[tuple[tuple[bytes, int], int]]:
        keys = [(self._tag(self._logins, f"s\0{source_key(client)}"), self.per_source)]
        if user is not None:
            keys.append((self._tag(self._logins, f"u\0{user}"), self.per_user))
        return keys

    def _events(self, tag: bytes, set_index: int, now: float) -> tuple[int, list[float]]:
        """The entry of ``tag`` (-1 if none) and its failures within the window."""
        logins = self._logins
        index = logins.find(tag, set_index)
        if index == -1:
            return -1, []
        n, *stamps = logins.read(index)
        cutoff = now - self.window
        return index, [t for t in stamps[: int(n)] if t > cutoff]

    def _stalest_login(self, set_index: int) -> int:
        logins = self._logins
        self.segment.bump(EVICTIONS)

        def newest(index: int) -> float:
            n, *stamps = logins.read(index)
            return float(stamps[int(n) - 1]) if n else 0.0

        return min(logins.entries_of_set(set_index), key=newest)

    # -- the supervisor's side ---------------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        """Evictions (a full set forgot an entry) and overflows (a count not kept)."""
        with self.segment.locked():
            segment = self.segment
            return {"evictions": segment.stat(EVICTIONS), "overflows": segment.stat(OVERFLOWS)}


def reap(segment: Segment, slot: int, chunk: int = 4096) -> int:
    """Release everything worker ``slot`` held (its process is gone) and free the
    slot; returns how many counts were released.  Scans the holdings table a chunk at
    a time, releasing the lock in between."""
    holdings, totals = segment.tables["holdings"], segment.tables["totals"]
    released = 0
    for start in range(0, holdings.capacity, chunk):
        with segment.locked():
            for h in range(start, min(start + chunk, holdings.capacity)):
                if holdings.tag(h) == EMPTY:
                    continue
                total_tag, owner, held = holdings.read(h)
                if owner != slot:
                    continue
                _decrement(totals, totals.find(total_tag, totals.set_of(total_tag)), held)
                holdings.clear(h)
                released += held
    with segment.locked():
        segment.set_slot(slot, 0, 0)
    return released


def _decrement(totals: Table, index: int, by: int) -> None:
    if index == -1:
        return
    n = int(totals.read(index)[0])
    if n > by:
        totals.write(index, n - by)
    else:
        totals.clear(index)
