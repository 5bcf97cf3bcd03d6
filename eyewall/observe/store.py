"""Recorded flows: the most recent in memory, all of them in SQLite.

The event loop turns each finished flow into its row once (`records.row_of`: heads as
text, credentials redacted), keeps the most recent rows in a window bounded in count and
in bytes, and appends them to a batch; a timer hands batches to the shared writer
thread, which owns the SQLite connection, only inserts, and applies retention (count,
age, bytes) as it goes.  Rows rather than `Flow` objects: a row is a few strings, cheap
to keep and to free, and the writer holds the interpreter lock only to bind it.  Traffic
never waits on the disk: when the writer falls behind, new batches are dropped and
counted.

Requests refused before they reached an origin (a 407 to a client without credentials,
a 403, a malformed request) keep only a capped summary of their head: an attacker who
needs no password must not be able to fill memory or disk with 64 KB heads.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from tornado.ioloop import PeriodicCallback

from eyewall.flow import Flow
from eyewall.http1.parse import Headers, RequestHead, ResponseHead
from eyewall.observe.records import COLUMNS, Record, Row, row_of
from eyewall.observe.writer import BatchWriter

__all__ = ["FlowStore", "default_path", "read_records", "summarise"]

log = logging.getLogger("eyewall.flows")

ROWS_PER_STATEMENT = 30  # 30 x 29 parameters stays under SQLite's 999 limit
FLUSH_INTERVAL = 0.25  # seconds: small batches, short bursts of work on the writer
FLUSH_FLOWS = 250
PRUNE_EVERY = 5.0  # seconds between retention passes
DROP_WARNING_EVERY = 60.0  # seconds between log lines about flows not recorded
REFUSED_HEAD = 2048  # bytes of a refused request's fields kept, at most
REFUSED_FIELDS = 32  # fields of a refused request kept, at most
REFUSED_METHOD = 32  # characters of a refused request's method kept (its URL: REFUSED_HEAD)
KEPT_FIELDS = 256  # fields of any other head kept, at most (a browser sends ~20)
KEPT_HEAD = 1 << 20  # bytes of any other head's fields: limits.max_header_size bounds them
ROW_OVERHEAD = 1024  # bytes a recorded row costs in memory besides its texts and bodies

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS flows (
    {", ".join(f"{c} {'TEXT PRIMARY KEY' if c == 'id' else ''}" for c in COLUMNS)}
);
CREATE INDEX IF NOT EXISTS flows_started ON flows (started);
"""
_ROW = f"({', '.join('?' * len(COLUMNS))})"
_INSERT = f"INSERT OR REPLACE INTO flows ({', '.join(COLUMNS)}) VALUES {_ROW}"
_INSERT_MANY = _INSERT + f", {_ROW}" * (ROWS_PER_STATEMENT - 1)


def default_path() -> Path:
    """Where flows are recorded when ``flows.path`` is unset:
    ``$XDG_DATA_HOME/eyewall/flows.sqlite3`` (default ``~/.local/share``)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "eyewall" / "flows.sqlite3"


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")  # a crash may lose the last flows, never traffic
    return db


def summarise(flow: Flow) -> None:
    """Cap what ``flow`` keeps of its heads, then note what was left out: a request
    refused before any origin saw it keeps its first `REFUSED_FIELDS` fields within
    `REFUSED_HEAD` bytes (and `REFUSED_METHOD` characters of its method, `REFUSED_HEAD`
    of its URL), any other head its first `KEPT_FIELDS` fields.  Uncapped, a
    burst of heads of thousands of short fields (still within max_header_size) would
    push every other client's flows out of the window and the writer's queue, and a
    client without credentials could fill them with 64 KB heads."""
    request, response = flow.request, flow.response
    if flow.error is not None and not flow.upstream:
        if request is not None:
            _cap(request, REFUSED_FIELDS, REFUSED_HEAD, flow.head_bytes)
        # the request line too: any method token, any target, up to a head's size
        if len(flow.method) > REFUSED_METHOD:
            flow.method = flow.method[:REFUSED_METHOD] + "..."
        if len(flow.url) > REFUSED_HEAD:
            flow.url = flow.url[:REFUSED_HEAD] + "..."
        return
    # the common case decided by two lengths
    if request is not None and len(request.headers.fields) > KEPT_FIELDS:
        _cap(request, KEPT_FIELDS, KEPT_HEAD, flow.head_bytes)
    if response is not None and len(response.headers.fields) > KEPT_FIELDS:
        _cap(response, KEPT_FIELDS, KEPT_HEAD, 0)


def _cap(head: RequestHead | ResponseHead, most: int, budget: int, head_bytes: int) -> None:
    fields = head.headers.fields
    if len(fields) <= most and (budget >= KEPT_HEAD or _text(fields) <= budget):
        return
    kept: list[tuple[str, str]] = []
    size = 0
    for name, value in fields:
        size += len(name) + len(value) + 4
        if size > budget or len(kept) == most:
            break
        kept.append((name, value))
    left = len(fields) - len(kept)
    whole = f" ({head_bytes} byte head)" if head_bytes else ""
    kept.append(("X-Eyewall-Omitted", f"{left} more fields{whole}"))
    head.headers = Headers(kept)


def _text(fields: list[tuple[str, str]]) -> int:
    return sum(map(len, chain.from_iterable(fields))) + 4 * len(fields)


# Every column that holds text or bytes: a client chooses the method and the target,
# an origin the reason phrase, and any of them can be as long as a head.
_TEXTS = tuple(
    COLUMNS.index(c)
    for c in (
        "id", "kind", "client", "user", "method", "url", "host", "upstream", "rule",
        "error", "error_detail", "request_version", "request_headers", "response_version",
        "reason", "response_headers", "request_body", "response_body",
    )
)  # fmt: skip


def _size(row: Row) -> int:
    """What ``row`` holds in memory, in bytes (an estimate: its texts and bodies plus
    `ROW_OVERHEAD`): what `FlowStore`'s ``memory_bytes`` and the writer's queue bound."""
    size = ROW_OVERHEAD
    for i in _TEXTS:
        value = row[i]
        if value is not None:
            size += len(value)
    return size


class FlowStore:
    """Observer of finished flows: keeps the rows of the most recent (at most ``memory``
    flows and ``memory_bytes``, `_size`) and records all of them in SQLite at ``path``
    (None: memory only) through ``writer``, keeping ``max_count`` rows no older than
    ``max_age`` seconds.  Credential values are redacted in both unless
    ``credentials``.  Raises OSError or sqlite3.Error when the database cannot be
    created."""

    def __init__(
        self,
        path: Path | None,
        max_count: int,
        max_age: float,
        memory: int,
        memory_bytes: int = 64 << 20,
        writer: BatchWriter | None = None,
        max_bytes: int = 1 << 30,
        credentials: bool = False,
    ) -> None:
        self.path = path
        self.credentials = credentials  # record Authorization, Cookie, Set-Cookie values
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.max_age = max_age
        self.memory = memory
        self.memory_bytes = memory_bytes
        self.recent: deque[Row] = deque()  # rows of `COLUMNS`, oldest first
        self._sizes: deque[int] = deque()  # `_size` of each, in step with ``recent``
        self.recent_bytes = 0
        self.dropped = 0
        self._warned = -DROP_WARNING_EVERY  # when flows not recorded were last logged
        self._pending: list[Row] = []
        self._pending_sizes: list[int] = []  # `_size` of each, in step with ``_pending``
        self._timer: PeriodicCallback | None = None
        self._db: sqlite3.Connection | None = None  # the writer thread's own
        self._last_prune = 0.0
        self.writer = writer
        if path is not None:
            assert writer is not None, "recording to a file needs a writer"
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))  # traffic is private
            db = _connect(path)  # fail at start-up, not in the thread
            db.executescript(_SCHEMA)
            with db:  # a database written by an earlier version gains the new columns
                for column in sorted(set(COLUMNS) - _columns(db), key=COLUMNS.index):
                    db.execute(f"ALTER TABLE flows ADD COLUMN {column}")
            try:
                self._restore(db)
            finally:
                db.close()
            writer.on_idle(self._prune_now)
            self._timer = PeriodicCallback(self.flush, FLUSH_INTERVAL * 1000)
            self._timer.start()

    def _restore(self, db: sqlite3.Connection) -> None:
        """Fill the window with the most recent recorded flows (a restart keeps the
        dashboard's and the flows API's list), as recorded."""
        if not self.memory:
            return
        newest = db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM flows ORDER BY rowid DESC LIMIT ?", (self.memory,)
        ).fetchall()
        for row in reversed(newest):
            size = _size(row)
            self.recent.append(row)
            self._sizes.append(size)
            self.recent_bytes += size
        self._trim()

    def configure(
        self,
        max_count: int,
        max_age: float,
        max_bytes: int,
        memory: int,
        memory_bytes: int,
        credentials: bool,
    ) -> None:
        """Apply reloaded ``flows.*`` settings: retention from the next pass, redaction
        from the next flow (rows already recorded stay as they were), and the window's
        bounds at once."""
        self.max_count, self.max_age, self.max_bytes = max_count, max_age, max_bytes
        self.memory, self.memory_bytes = memory, memory_bytes
        self.credentials = credentials
        self._trim()

    def _trim(self) -> None:
        recent, sizes = self.recent, self._sizes
        while len(recent) > self.memory or (self.recent_bytes > self.memory_bytes and recent):
            recent.popleft()
            self.recent_bytes -= sizes.popleft()

    def __call__(self, flow: Flow) -> None:
        summarise(flow)
        row = row_of(flow, self.credentials)
        recent, sizes = self.recent, self._sizes
        size = _size(row)
        recent.append(row)
        sizes.append(size)
        self.recent_bytes += size
        if len(recent) > self.memory or self.recent_bytes > self.memory_bytes:
            self._trim()
        if self.path is not None:
            self._pending.append(row)
            self._pending_sizes.append(size)
            if len(self._pending) >= FLUSH_FLOWS:
                self.flush()

    def flush(self) -> None:
        """Hand pending flows to the writer thread; counts them as dropped if it is behind."""
        if not self._pending or self.writer is None:
            return
        batch, self._pending = self._pending, []
        sizes, self._pending_sizes = self._pending_sizes, []
        if self.writer.submit(self._write, batch, sum(sizes)):
            return
        # The writer is behind.  Keep what fits, the smallest flows first, so that a few
        # big ones cannot push everybody else's records out.
        room = self.writer.room()
        chosen: list[int] = []
        for i in sorted(range(len(batch)), key=sizes.__getitem__):
            if sizes[i] > room:
                break
            room -= sizes[i]
            chosen.append(i)
        chosen.sort()
        kept = [batch[i] for i in chosen]
        if not kept or not self.writer.submit(self._write, kept, sum(sizes[i] for i in chosen)):
            kept = []
        lost = len(batch) - len(kept)
        self.dropped += lost
        now = time.monotonic()
        if now - self._warned >= DROP_WARNING_EVERY:
            self._warned = now
            log.warning(
                "the flow store is behind: %d flows not recorded"
                ' (eyewall_events_dropped_total{subscriber="flows"} counts them all)',
                lost,
            )

    def close(self) -> None:
        """Hand the last batch to the writer (which the caller then closes)."""
        if self._timer is not None:
            self._timer.stop()
        self.flush()
        if self.writer is not None and self.path is not None:
            self.writer.submit(lambda _: self._close_db(), None, 0)

    # -- the writer thread -------------------------------------------------------------

    def _write(self, rows: list[Row]) -> None:
        assert self.path is not None
        if self._db is None:
            self._db = _connect(self.path)
        try:
            self._insert(self._db, rows)
        except (sqlite3.Error, OSError):
            self.dropped += len(rows)
            log.exception("recording %d flows failed", len(rows))
            return
        if time.monotonic() - self._last_prune >= PRUNE_EVERY:
            self._prune_now()

    def _prune_now(self) -> None:
        if self._db is None:
            return
        self._last_prune = time.monotonic()
        try:
            self._prune(self._db)
        except sqlite3.Error:
            log.exception("flow retention pass failed")

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: list[Row]) -> None:
        """Many rows per statement: each statement is one step with the GIL released and
        taken back, and on a busy core each of those hand-overs costs more than the
        insert itself."""
        with db:
            full = len(rows) - len(rows) % ROWS_PER_STATEMENT
            if full:
                params = [value for row in rows[:full] for value in row]
                step = ROWS_PER_STATEMENT * len(COLUMNS)
                db.executemany(
                    _INSERT_MANY, (params[i : i + step] for i in range(0, len(params), step))
                )
            if full < len(rows):
                db.executemany(_INSERT, rows[full:])

    def _prune(self, db: sqlite3.Connection) -> None:
        """Retention: age, count, then bytes (pages in use; freed pages are reused, so
        the file stops growing rather than shrinks)."""
        with db:
            db.execute("DELETE FROM flows WHERE started < ?", (time.time() - self.max_age,))
            db.execute(
                "DELETE FROM flows WHERE rowid <= (SELECT MAX(rowid) FROM flows) - ?",
                (self.max_count,),
            )
        for _ in range(20):
            page = db.execute("PRAGMA page_size").fetchone()[0]
            used = db.execute("PRAGMA page_count").fetchone()[0]
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            if (used - free) * page <= self.max_bytes:
                return
            with db:  # the oldest tenth goes
                db.execute(
                    "DELETE FROM flows WHERE rowid <= (SELECT MIN(rowid) FROM flows)"
                    " + (SELECT COUNT(*) FROM flows) / 10 + 1"
                )

    # -- reading ------------------------------------------------------------------------

    def recent_records(self) -> Iterator[Record]:
        """Recent flows, newest first."""
        for row in reversed(self.recent):
            yield dict(zip(COLUMNS, row, strict=True))

    def find_recent(self, flow_id: str) -> Record | None:
        """A flow by id from memory (on the event loop)."""
        for row in reversed(self.recent):
            if row[0] == flow_id:
                return dict(zip(COLUMNS, row, strict=True))
        return None

    def find_stored(self, flow_id: str) -> Record | None:
        """A flow by id from the database (blocking: run it in a thread)."""
        if self.path is None or not self.path.exists():
            return None
        rows = read_records(self.path, "id = ?", (flow_id,), limit=1)
        return rows[0] if rows else None


def read_records(
    path: Path, where: str = "1", params: tuple[Any, ...] = (), limit: int = 1000
) -> list[Record]:
    """Recorded flows matching ``where``, oldest first (blocking; for threads and CLIs)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        present = _columns(db)  # an earlier version's database lacks the newer ones
        selected = ", ".join(c if c in present else f"NULL AS {c}" for c in COLUMNS)
        rows = db.execute(
            f"SELECT {selected} FROM (SELECT * FROM flows WHERE {where}"
            " ORDER BY started DESC LIMIT ?) ORDER BY started",
            (*params, limit),
        ).fetchall()
    finally:
        db.close()
    return [dict(row) for row in rows]


def _columns(db: sqlite3.Connection) -> set[str]:
    return {row[1] for row in db.execute("PRAGMA table_info(flows)")}
