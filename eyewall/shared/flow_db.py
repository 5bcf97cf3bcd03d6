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

The table, ``eyewall_flows`` (created at first contact, columns added when Eyewall
adds them; a DBA can run `SCHEMA` beforehand and grant only INSERT, SELECT, DELETE)::

    seq bigserial   the order rows were recorded in (retention by count)
    node text       the node that recorded the flow (fleet.node)
    size integer    the row's payload in bytes (retention by bytes)
    batch bigint    the batch it was written in (random), named by the NOTIFY on
                    ``CHANNEL`` that follows each batch: "BATCH LOW HIGH NODE"
    + the columns of `eyewall.observe.records.COLUMNS`, typed as `COLUMN_TYPES` says

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
from typing import TYPE_CHECKING, Any

import asyncpg

from eyewall.flow import Flow
from eyewall.observe.records import COLUMNS, Record, row_of, summary
from eyewall.observe.store import summarise_refused

__all__ = ["COLUMN_TYPES", "SCHEMA", "TABLE", "FlowDatabase", "FlowDatabaseError"]

log = logging.getLogger("eyewall.flows")

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection = PoolConnectionProxy[asyncpg.Record]

TABLE = "eyewall_flows"
FLUSH_INTERVAL = 1.0  # seconds, as the SQLite store
FLUSH_FLOWS = 1000
PRUNE_EVERY = 10.0  # seconds between retention passes
MAX_BACKOFF = 10.0  # seconds between tries while the database does not take batches
FLOW_OVERHEAD = 1024  # bytes a waiting flow costs besides its heads and bodies
_LOCK = 0x6579_6577_616C_6C  # pg advisory lock key: "eyewall" (schema and retention)

COLUMN_TYPES: dict[str, str] = {
    "id": "text NOT NULL",
    "started": "double precision NOT NULL",
    "kind": "text",
    "client": "text",
    "client_port": "integer",
    "user": "text",
    "method": "text",
    "url": "text",
    "host": "text",
    "port": "integer",
    "status": "integer",
    "upstream": "text",
    "reused": "smallint",
    "bytes_in": "bigint",
    "bytes_out": "bigint",
    "duration": "double precision",
    "ttfb": "double precision",
    "connect": "double precision",
    "rule": "text",
    "error": "text",
    "error_detail": "text",
    "intercepted": "smallint",
    "request_version": "text",
    "request_headers": "text",
    "response_version": "text",
    "reason": "text",
    "response_headers": "text",
    "request_body": "bytea",
    "response_body": "bytea",
}
_WRITTEN = ("seq", "batch", "node", *COLUMNS, "size")
_READ = ", ".join(f'"{c}"' for c in ("node", *COLUMNS))

_NEXTVALS = (
    f"SELECT array_agg(nextval(pg_get_serial_sequence('{TABLE}', 'seq')))"
    " FROM generate_series(1, $1)"
)
CHANNEL = TABLE  # NOTIFY payload per batch: "BATCH LOW_SEQ HIGH_SEQ NODE"
_NOTIFY = f"SELECT pg_notify('{CHANNEL}', $1)"

SCHEMA = "\n".join(
    [
        f"CREATE TABLE IF NOT EXISTS {TABLE} (",
        "    seq bigserial PRIMARY KEY,",
        "    node text NOT NULL,",
        "    size integer NOT NULL,",
        "    batch bigint,",
        *(f'    "{c}" {COLUMN_TYPES[c]},' for c in COLUMNS[:-1]),
        f'    "{COLUMNS[-1]}" {COLUMN_TYPES[COLUMNS[-1]]}',
        ");",
        f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS batch bigint;",
        *(
            f'ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS "{c}" '
            + COLUMN_TYPES[c].replace(" NOT NULL", "")
            + ";"
            for c in COLUMNS
        ),
        f"CREATE INDEX IF NOT EXISTS {TABLE}_started ON {TABLE} (started);",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_id ON {TABLE} (id);",
    ]
)


class FlowDatabaseError(Exception):
    """The database could not be reached, did not answer in time, or refused the query;
    ``__cause__`` is the driver's error."""


def _text(value: Any) -> Any:
    """A string PostgreSQL's text takes: no NUL, valid UTF-8 (what the HTTP parser let
    through is ASCII or Latin-1 anyway)."""
    if isinstance(value, str) and not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, str) and "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return value


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
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._schema_ready = not create
        self._writer: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._closing = False
        self._last_prune = 0.0
        self._written_at_prune = 0  # a node that wrote nothing since leaves it to others

    # -- recording (the event loop's side) ---------------------------------------------

    def __call__(self, flow: Flow) -> None:
        if flow.error is not None and not flow.upstream:
            summarise_refused(flow)
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
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

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
            async with self._connection() as conn, conn.transaction():
                # Row numbers taken first, so that the notification can name them: a
                # follower fetches exactly this batch once it is committed.
                seqs = await conn.fetchval(_NEXTVALS, len(rows), timeout=self.command_timeout)
                await conn.copy_records_to_table(
                    TABLE,
                    records=[(seq, batch_id, *row) for seq, row in zip(seqs, rows, strict=True)],
                    columns=_WRITTEN,
                    timeout=self.command_timeout,
                )
                payload = f"{batch_id} {min(seqs)} {max(seqs)} {self.node}"
                await conn.execute(_NOTIFY, payload, timeout=self.command_timeout)
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
        return (self.node, *(_text(v) for v in row_of(flow)), _size(flow))

    async def _prune(self) -> None:
        self._last_prune = self.clock()
        self._written_at_prune = self.written
        try:
            async with self._connection() as conn, conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
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
        """Flows started at or after ``since`` (epoch seconds), to ``host`` if given,
        the newest ``limit`` of them, oldest first.  Raises `FlowDatabaseError`."""
        where = "started >= $1"
        args_: list[Any] = [since]
        if host:
            where += " AND host = $2"
            args_.append(host)
        query = (
            f"SELECT {_READ} FROM (SELECT * FROM {TABLE} WHERE {where}"
            f" ORDER BY started DESC LIMIT ${len(args_) + 1}) t ORDER BY started"
        )
        return await self._fetch(query, [*args_, limit])

    async def find(self, flow_id: str) -> Record | None:
        """The flow with ``flow_id`` (the newest, should two nodes have made the same
        id), or None.  Raises `FlowDatabaseError`."""
        rows = await self._fetch(
            f"SELECT {_READ} FROM {TABLE} WHERE id = $1 ORDER BY seq DESC LIMIT 1", [flow_id]
        )
        return rows[0] if rows else None

    async def summaries(self, query: dict[str, str], limit: int = 200) -> list[dict[str, Any]]:
        """Flow summaries (as the flows API shows them, with ``node``), newest first,
        filtered as the API filters (docs/admin-api.md): host and q are
        case-insensitive substrings, status a code or a class (2xx), method, user.
        Raises `FlowDatabaseError`."""
        conditions, args = self._filters(query)
        where = " AND ".join(conditions) or "true"
        rows = await self._fetch(
            f"SELECT {_READ} FROM {TABLE} WHERE {where} ORDER BY started DESC"
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
                    f"SELECT {_READ} FROM {TABLE} WHERE seq BETWEEN $2 AND $3 AND batch = $1"
                    " ORDER BY seq",
                    [batch, low, high],
                )
            except FlowDatabaseError as e:
                log.debug("reading another node's batch failed: %s", e)
                continue
            for record in records:
                show(summary(record))

    @staticmethod
    def _filters(query: dict[str, str]) -> tuple[list[str], list[Any]]:
        conditions: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.get("host"):
            conditions.append(f"strpos(lower(host), lower({arg(query['host'])})) > 0")
        status = query.get("status", "").strip().lower()
        if len(status) == 3 and status.endswith("xx") and status[0].isdigit():
            low = int(status[0]) * 100
            conditions.append(f"status >= {arg(low)} AND status < {arg(low + 100)}")
        elif status.isdigit():
            conditions.append(f"status = {arg(int(status))}")
        elif status:
            conditions.append("false")
        if query.get("method"):
            conditions.append(f"upper(method) = {arg(query['method'].upper())}")
        if query.get("user"):
            conditions.append(f'"user" = {arg(query["user"])}')
        if query.get("q"):
            text = arg(query["q"].lower())
            conditions.append(
                "("
                + " OR ".join(
                    f"strpos(lower(coalesce({c}, '')), {text}) > 0"
                    for c in ("url", "host", "error", "error_detail")
                )
                + ")"
            )
        return conditions, args

    async def _fetch(self, query: str, args: Sequence[Any]) -> list[Record]:
        async with self._connection() as conn:
            rows = await conn.fetch(query, *args, timeout=self.command_timeout)
        return [_record(row) for row in rows]

    # -- connections ---------------------------------------------------------------------

    def _connection(self) -> _Connection:
        return _Connection(self)

    async def _acquire(self) -> Connection:
        async with self._pool_lock:
            if self._pool is None:  # with min_size 0 this connects nothing yet
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=0,
                    max_size=4,
                    timeout=self.connect_timeout,
                    command_timeout=self.command_timeout,
                    max_inactive_connection_lifetime=60.0,
                )
        pool = self._pool
        conn = await pool.acquire(timeout=self.connect_timeout)
        if not self._schema_ready:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
                    await conn.execute(SCHEMA, timeout=self.command_timeout)
            except BaseException:
                await pool.release(conn)
                raise
            self._schema_ready = True
        return conn

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


class _Connection:
    """``async with``: a pooled connection, every driver error as `FlowDatabaseError`."""

    def __init__(self, db: FlowDatabase) -> None:
        self.db = db
        self.conn: Connection | None = None

    async def __aenter__(self) -> Connection:
        try:
            self.conn = await self.db._acquire()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
            raise FlowDatabaseError(_describe(e)) from e
        return self.conn

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        pool, conn = self.db._pool, self.conn
        if pool is not None and conn is not None:
            try:
                await pool.release(conn)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                conn.terminate()
        if isinstance(
            error, asyncpg.PostgresError | asyncpg.InterfaceError | OSError | TimeoutError
        ):
            raise FlowDatabaseError(_describe(error)) from error


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _record(row: asyncpg.Record) -> Record:
    record = dict(row.items())
    for column in ("request_body", "response_body"):
        if record[column] is not None:
            record[column] = bytes(record[column])
    return record
