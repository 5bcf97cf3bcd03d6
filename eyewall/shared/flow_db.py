"""Flows of every node in one PostgreSQL table, so that the flows API, HAR export and
dashboard of any node show the whole fleet's traffic.

Recording works as the SQLite store does (`eyewall.observe.store`): finished flows
are appended to a pending batch on the event loop, and a writer task sends the batch
every second (or at 1,000 flows) with one ``COPY`` (asyncpg's binary copy).  The data
path never waits: when more than ``max_pending`` bytes (estimated) wait, new flows are
dropped and counted (``dropped``).  A batch the database does not take (unreachable,
too slow, refusing) goes back to the front of the queue and is tried again after a
pause that doubles up to 10 s; the bound still holds, so a long outage drops flows
rather than memory.  The first failure logs a warning, the recovery another.

Retention is the flow store's (``flows.max_count``, ``max_age``, ``max_bytes``, the
bytes being the rows' payload as Eyewall estimates it): every 10 s one node — whichever
takes the advisory lock — deletes what is over.

The table and the statements are `eyewall.shared.flow_schema`'s.

`follow` shows a node's dashboard the other nodes' flows as their batches commit.
Reading (`records`, `find`, `summaries`) returns the records of
`eyewall.observe.records` with ``node`` added.  Every database error is turned into
`FlowDatabaseError` at this boundary.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from eyewall.flow import Flow
from eyewall.observe.records import Record, row_of, summary
from eyewall.observe.store import summarise
from eyewall.shared.flow_schema import (
    CHANNEL,
    LOCK,
    NEXTVALS,
    NOTIFY,
    READ,
    TABLE,
    WRITTEN,
    Connections,
    FlowDatabaseError,
    summary_filters,
    text,
)
from eyewall.shared.flow_schema import record as as_record

__all__ = ["FLUSH_FLOWS", "FlowDatabase", "FlowDatabaseError"]

log = logging.getLogger("eyewall.flows")

FLUSH_INTERVAL = 1.0  # seconds, as the SQLite store
FLUSH_FLOWS = 1000
PRUNE_EVERY = 10.0  # seconds between retention passes
MAX_BACKOFF = 10.0  # seconds between tries while the database does not take batches
FLOW_OVERHEAD = 1024  # bytes a waiting flow costs besides its heads and bodies


def _size(flow: Flow) -> int:
    size = FLOW_OVERHEAD + flow.head_bytes
    for body in (flow.request_body, flow.response_body):
        if body is not None:
            size += len(body)
    return size


class FlowDatabase:
    """Records finished flows (an observer: call it with each) to PostgreSQL at
    ``dsn`` as node ``node``, and reads the fleet's back.

    ``connect_timeout`` and ``command_timeout`` (seconds) bound every wait;
    ``max_pending`` (bytes) bounds what waits to be written; ``max_count``,
    ``max_age`` (seconds) and ``max_bytes`` are the retention limits; ``create``:
    create (or extend) the table at first contact (False: only read).  `start` begins
    the writer on the running loop; `close` writes what waits (within
    ``command_timeout``) and closes the connections.  ``written``, ``dropped`` and
    ``failures`` count flows and failed batches.
    """

    def __init__(
        self,
        dsn: str,
        node: str,
        *,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
        max_pending: int = 8 << 20,
        max_count: int = 100_000,
        max_age: float = 7 * 86400.0,
        max_bytes: int = 1 << 30,
        clock: Callable[[], float] = time.time,
        create: bool = True,
    ) -> None:
        self.dsn = dsn
        self.node = node
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_pending = max_pending
        self.max_count = max_count
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.clock = clock
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self.batch_seconds: list[float] = []  # the last batches' write times
        self.up = True
        self._pending: list[Flow] = []
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self.db = Connections(dsn, connect_timeout, command_timeout, create)
        self._writer: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._closing = False
        self._last_prune = 0.0
        self._written_at_prune = 0  # a node that wrote nothing since leaves it to others

    # -- recording (the event loop's side) ---------------------------------------------

    def __call__(self, flow: Flow) -> None:
        summarise(flow)
        size = _size(flow)
        if self._pending_bytes + size > self.max_pending:
            self.dropped += 1
            return
        self._pending.append(flow)
        self._pending_bytes += size
        if len(self._pending) >= FLUSH_FLOWS:
            self._wake.set()

    @property
    def pending(self) -> int:
        """Flows waiting to be written."""
        return len(self._pending)

    def start(self) -> None:
        """Begin writing (on the running loop).  Nothing is connected before the first
        batch or read: a database that is down delays no start-up."""
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_forever())

    async def close(self) -> None:
        """Write what waits (once, within command_timeout), then close."""
        self._closing = True
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None
        if self._writer is not None:
            self._wake.set()
            try:
                async with asyncio.timeout(self.connect_timeout + self.command_timeout):
                    await self._writer
            except TimeoutError:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        if self._pending:
            self.dropped += len(self._pending)
            log.warning(
                "%d flows were not recorded: the database did not take them", len(self._pending)
            )
            self._pending.clear()
        self.db.close()

    async def _write_forever(self) -> None:
        backoff = 0.0
        while True:
            if not self._closing:
                try:
                    async with asyncio.timeout(backoff or FLUSH_INTERVAL):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            if self._pending and (await self._flush()):
                backoff = 0.0
            elif self._pending:
                backoff = min(MAX_BACKOFF, max(1.0, backoff * 2))
            if self._closing:
                return
            due = self.clock() - self._last_prune >= PRUNE_EVERY
            if due and self.written > self._written_at_prune:
                await self._prune()

    async def _flush(self) -> bool:
        """Write the pending flows; False (and they stay pending) if the database did
        not take them."""
        batch, self._pending = self._pending, []
        size, self._pending_bytes = self._pending_bytes, 0
        started = time.perf_counter()
        batch_id = secrets.randbits(63)
        try:
            rows = [self._row(flow) for flow in batch]
            async with self.db.connection() as conn, conn.transaction():
                # Row numbers taken first, so that the notification can name them: a
                # follower fetches exactly this batch once it is committed.
                seqs = await conn.fetchval(NEXTVALS, len(rows), timeout=self.command_timeout)
                await conn.copy_records_to_table(
                    TABLE,
                    records=[(seq, batch_id, *row) for seq, row in zip(seqs, rows, strict=True)],
                    columns=WRITTEN,
                    timeout=self.command_timeout,
                )
                payload = f"{batch_id} {min(seqs)} {max(seqs)} {self.node}"
                await conn.execute(NOTIFY, payload, timeout=self.command_timeout)
        except FlowDatabaseError as e:
            self.failures += 1
            self._pending[:0] = batch
            self._pending_bytes += size
            self._drop_over_bound()
            self._down(e)
            return False
        self.written += len(batch)
        self.batch_seconds = [*self.batch_seconds[-99:], time.perf_counter() - started]
        self._up()
        return True

    def _drop_over_bound(self) -> None:
        """Keep at most max_pending bytes waiting: the oldest go first."""
        while self._pending and self._pending_bytes > self.max_pending:
            self._pending_bytes -= _size(self._pending.pop(0))
            self.dropped += 1

    def _row(self, flow: Flow) -> tuple[Any, ...]:
        return (self.node, *(text(v) for v in row_of(flow)), _size(flow))

    async def _prune(self) -> None:
        self._last_prune = self.clock()
        self._written_at_prune = self.written
        try:
            async with self.db.connection() as conn, conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK):
                    return  # another node is at it
                timeout = self.command_timeout
                await conn.execute(
                    f"DELETE FROM {TABLE} WHERE started < $1",
                    self.clock() - self.max_age,
                    timeout=timeout,
                )
                await conn.execute(
                    f"DELETE FROM {TABLE} WHERE seq <= (SELECT max(seq) FROM {TABLE}) - $1",
                    self.max_count,
                    timeout=timeout,
                )
                await conn.execute(
                    f"DELETE FROM {TABLE} WHERE seq <= (SELECT max(seq) FROM"
                    f" (SELECT seq, sum(size) OVER (ORDER BY seq DESC) AS kept FROM {TABLE}) r"
                    " WHERE kept > $1)",
                    self.max_bytes,
                    timeout=timeout,
                )
        except FlowDatabaseError as e:
            log.warning("flow retention pass failed: %s", e)

    # -- reading ------------------------------------------------------------------------

    async def records(
        self, since: float = 0.0, host: str = "", limit: int = 10_000
    ) -> list[Record]:
        """HTTP exchanges (what HAR holds: no opaque tunnels) started at or after
        ``since`` (epoch seconds), to ``host`` if given, the newest ``limit`` of them,
        oldest first.  Raises `FlowDatabaseError`."""
        where = "started >= $1 AND kind <> 'tunnel' AND method NOT IN ('', 'CONNECT')"
        args_: list[Any] = [since]
        if host:
            where += " AND host = $2"
            args_.append(host)
        query = (
            f"SELECT {READ} FROM (SELECT * FROM {TABLE} WHERE {where}"
            f" ORDER BY started DESC LIMIT ${len(args_) + 1}) t ORDER BY started"
        )
        return await self._fetch(query, [*args_, limit])

    async def find(self, flow_id: str) -> Record | None:
        """The flow with ``flow_id`` (the newest, should two nodes have made the same
        id), or None.  Raises `FlowDatabaseError`."""
        rows = await self._fetch(
            f"SELECT {READ} FROM {TABLE} WHERE id = $1 ORDER BY seq DESC LIMIT 1", [flow_id]
        )
        return rows[0] if rows else None

    async def summaries(self, query: dict[str, str], limit: int = 200) -> list[dict[str, Any]]:
        """Flow summaries (as the flows API shows them, with ``node``), newest first,
        filtered as the API filters (docs/admin-api.md): host and q are
        case-insensitive substrings, status a code or a class (2xx), method, user.
        Raises `FlowDatabaseError`."""
        conditions, args = summary_filters(query)
        where = " AND ".join(conditions) or "true"
        rows = await self._fetch(
            f"SELECT {READ} FROM {TABLE} WHERE {where} ORDER BY started DESC"
            f" LIMIT ${len(args) + 1}",
            [*args, limit],
        )
        return [summary(r) for r in rows]

    def follow(self, show: Callable[[dict[str, Any]], None], wanted: Callable[[], bool]) -> None:
        """Call ``show`` with the summary of every flow other nodes record from now on,
        batch by batch as they commit (LISTEN on a connection of its own, re-opened
        after a pause when lost), while ``wanted()`` — a dashboard is open — holds.
        Batches that arrive faster than they can be read are skipped (at most 100
        wait)."""
        if self._follower is None:
            self._follower = asyncio.ensure_future(self._follow(show, wanted))

    async def _follow(
        self, show: Callable[[dict[str, Any]], None], wanted: Callable[[], bool]
    ) -> None:
        batches: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue(100)

        def notified(conn: Any, pid: int, channel: str, payload: object) -> None:
            batch, low, high, node = str(payload).split(" ", 3)
            if node != self.node and wanted() and not batches.full():
                batches.put_nowait((int(batch), int(low), int(high)))

        reader = asyncio.ensure_future(self._show_batches(batches, show))
        pause = 1.0
        try:
            while True:
                lost = asyncio.Event()
                try:
                    conn = await asyncpg.connect(
                        self.dsn, timeout=self.connect_timeout, command_timeout=self.command_timeout
                    )
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                    await asyncio.sleep(pause)
                    pause = min(MAX_BACKOFF, pause * 2)
                    continue
                try:
                    conn.add_termination_listener(lambda _, lost=lost: lost.set())
                    await conn.add_listener(CHANNEL, notified)
                    pause = 1.0
                    await lost.wait()
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                    await asyncio.sleep(pause)
                finally:
                    conn.terminate()
        finally:
            reader.cancel()

    async def _show_batches(
        self, batches: asyncio.Queue[tuple[int, int, int]], show: Callable[[dict[str, Any]], None]
    ) -> None:
        while True:
            batch, low, high = await batches.get()
            try:
                records = await self._fetch(
                    f"SELECT {READ} FROM {TABLE} WHERE seq BETWEEN $2 AND $3 AND batch = $1"
                    " ORDER BY seq",
                    [batch, low, high],
                )
            except FlowDatabaseError as e:
                log.debug("reading another node's batch failed: %s", e)
                continue
            for found in records:
                show(summary(found))

    async def _fetch(self, query: str, args: Sequence[Any]) -> list[Record]:
        async with self.db.connection() as conn:
            rows = await conn.fetch(query, *args, timeout=self.command_timeout)
        return [as_record(row) for row in rows]

    def _down(self, error: Exception) -> None:
        if self.up:
            self.up = False
            log.warning(
                "recording flows to PostgreSQL failed (%s); flows wait (up to"
                " shared_flows.max_pending bytes, then they are dropped and counted) and"
                " batches are tried again",
                error,
            )

    def _up(self) -> None:
        if not self.up:
            self.up = True
            log.warning(
                "recording flows to PostgreSQL works again; %d flows dropped so far", self.dropped
            )
