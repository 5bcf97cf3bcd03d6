"""The PostgreSQL side of a fleet's shared flows (`eyewall.shared.flow_db`): the table,
the statements, and a pool of connections at whose boundary every driver error
becomes `FlowDatabaseError`.

The table, ``eyewall_flows``, is created at first contact and gains the columns
Eyewall adds later (``ALTER TABLE ... ADD COLUMN IF NOT EXISTS``); a DBA can apply
`SCHEMA` beforehand and grant only SELECT, INSERT and DELETE::

    seq bigserial   the order rows were recorded in (retention by count)
    node text       the node that recorded the flow (fleet.node)
    size integer    the row's payload in bytes (retention by bytes)
    batch bigint    the batch it was written in (random), named by the NOTIFY on
                    `CHANNEL` that follows each batch: "BATCH LOW HIGH NODE"
    + the columns of `eyewall.observe.records.COLUMNS`, typed as `COLUMN_TYPES` says
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import asyncpg

from eyewall.observe.records import COLUMNS, Record

__all__ = [
    "CHANNEL",
    "COLUMN_TYPES",
    "LOCK",
    "NEXTVALS",
    "NOTIFY",
    "READ",
    "SCHEMA",
    "TABLE",
    "WRITTEN",
    "Connections",
    "FlowDatabaseError",
    "describe",
    "record",
    "summary_filters",
    "text",
]

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection = PoolConnectionProxy[asyncpg.Record]

TABLE = "eyewall_flows"
LOCK = 0x6579_6577_616C_6C  # pg advisory lock key: "eyewall" (schema and retention)
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

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
    "worker": "integer",
}
WRITTEN = ("seq", "batch", "node", *COLUMNS, "size")  # what a batch's COPY sends
READ = ", ".join(f'"{c}"' for c in ("node", *COLUMNS))  # what reads select

NEXTVALS = (  # $1 row numbers, taken before a COPY so that its NOTIFY can name them
    f"SELECT array_agg(nextval(pg_get_serial_sequence('{TABLE}', 'seq')))"
    " FROM generate_series(1, $1)"
)
CHANNEL = TABLE  # NOTIFY payload per batch: "BATCH LOW_SEQ HIGH_SEQ NODE"
NOTIFY = f"SELECT pg_notify('{CHANNEL}', $1)"

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


def text(value: Any) -> Any:
    """A string PostgreSQL's text takes: no NUL, valid UTF-8 (what the HTTP parser let
    through is ASCII or Latin-1 anyway)."""
    if isinstance(value, str) and not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, str) and "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return value


def record(row: asyncpg.Record) -> Record:
    """A row read back as a record of `eyewall.observe.records` (with ``node``)."""
    out = dict(row.items())
    for column in ("request_body", "response_body"):
        if out[column] is not None:
            out[column] = bytes(out[column])
    return out


def summary_filters(query: dict[str, str]) -> tuple[list[str], list[Any]]:
    """SQL conditions (to join with AND) and their arguments ($1, $2, ...) for the flows
    API's filters (docs/admin-api.md): ``host`` and ``q`` case-insensitive substrings
    (of the host; of URL, host or error), ``status`` a code or a class (``2xx``; else
    nothing matches), ``method``, ``user``."""
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
                for c in ("id", "url", "host", "error", "error_detail")
            )
            + ")"
        )
    return conditions, args


class Connections:
    """A pool of at most four connections to ``dsn``, made at first use (a database
    that is down delays nothing before), which creates or extends the table at first
    contact when ``create``.  ``connect_timeout`` and ``command_timeout`` (seconds)
    bound every wait."""

    def __init__(
        self, dsn: str, connect_timeout: float, command_timeout: float, create: bool = True
    ) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._schema_ready = not create

    def connection(self) -> _Connection:
        """``async with``: a pooled connection; raises `FlowDatabaseError`."""
        return _Connection(self)

    def close(self) -> None:
        """Close every connection now."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

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
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
                    await conn.execute(SCHEMA, timeout=self.command_timeout)
            except BaseException:
                await pool.release(conn)
                raise
            self._schema_ready = True
        return conn


class _Connection:
    """``async with``: a pooled connection, every driver error as `FlowDatabaseError`."""

    def __init__(self, db: Connections) -> None:
        self.db = db
        self.conn: Connection | None = None

    async def __aenter__(self) -> Connection:
        try:
            self.conn = await self.db._acquire()
        except _DRIVER_ERRORS as e:
            raise FlowDatabaseError(describe(e)) from e
        return self.conn

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        pool, conn = self.db._pool, self.conn
        if pool is not None and conn is not None:
            try:
                await pool.release(conn)
            except _DRIVER_ERRORS:
                conn.terminate()
        if isinstance(
            error, asyncpg.PostgresError | asyncpg.InterfaceError | OSError | TimeoutError
        ):
            raise FlowDatabaseError(describe(error)) from error


def describe(error: BaseException) -> str:
    """A driver error as one line: its type and message."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
