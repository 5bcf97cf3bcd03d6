"""Recorded flows: the most recent in memory, all of them in SQLite.

The event loop only keeps finished flows in a bounded in-memory window and appends
them to a batch; a timer hands batches to a writer thread that owns the SQLite
connection.  Traffic never waits on the disk: when the writer falls behind by more
than `MAX_BATCHES` batches, new batches are dropped and counted.  Retention (count and
age) is applied by the writer as it goes.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tornado.ioloop import PeriodicCallback

from eyewall.flow import Flow
from eyewall.observe.records import COLUMNS, Record, record_of, row_of

__all__ = ["FlowStore", "default_path", "read_records"]

log = logging.getLogger("eyewall.flows")

MAX_BATCHES = 64
ROWS_PER_STATEMENT = 30  # 30 x 29 parameters stays under SQLite's 999 limit
FLUSH_INTERVAL = 1.0  # seconds
PRUNE_EVERY = 5.0  # seconds between retention passes

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
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "eyewall" / "flows.sqlite3"


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")  # a crash may lose the last flows, never traffic
    return db


class FlowStore:
    """Subscriber for ``flow_end``: keeps recent flows and records all of them."""

    def __init__(self, path: Path | None, max_count: int, max_age: float, memory: int) -> None:
        self.path = path
        self.max_count = max_count
        self.max_age = max_age
        self.memory = memory
        self.recent: deque[Flow] = deque(maxlen=memory)  # oldest first
        self.dropped = 0
        self._pending: list[Flow] = []
        self._batches: queue.Queue[list[Flow] | None] = queue.Queue(MAX_BATCHES)
        self._thread: threading.Thread | None = None
        self._timer: PeriodicCallback | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))  # traffic is private
            _connect(path).executescript(_SCHEMA)  # fail at start-up, not in the thread
            self._thread = threading.Thread(target=self._write_loop, name="flows", daemon=True)
            self._thread.start()
            self._timer = PeriodicCallback(self.flush, FLUSH_INTERVAL * 1000)
            self._timer.start()

    def __call__(self, event: str, flow: Flow) -> None:
        self.recent.append(flow)
        if self.path is not None:
            self._pending.append(flow)
            if len(self._pending) >= 1000:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            self._batches.put_nowait(batch)
        except queue.Full:
            self.dropped += len(batch)

    def close(self, timeout: float = 5.0) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.flush()
        if self._thread is not None:
            try:
                self._batches.put(None, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)

    def _write_loop(self) -> None:
        assert self.path is not None
        db = _connect(self.path)
        last_prune = 0.0
        dirty = False
        while True:
            try:
                batch = self._batches.get(timeout=PRUNE_EVERY)
            except queue.Empty:
                batch = []
            if batch is None:
                break
            try:
                if batch:
                    self._insert(db, [row_of(f) for f in batch])
                    dirty = True
                now = time.monotonic()
                if dirty and now - last_prune >= PRUNE_EVERY:
                    last_prune = now
                    dirty = False
                    self._prune(db)
            except (sqlite3.Error, OSError):
                self.dropped += len(batch)
                log.exception("recording %d flows failed", len(batch))
        db.close()

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
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
        with db:
            db.execute("DELETE FROM flows WHERE started < ?", (time.time() - self.max_age,))
            db.execute(
                "DELETE FROM flows WHERE rowid <= (SELECT MAX(rowid) FROM flows) - ?",
                (self.max_count,),
            )

    # -- reading ------------------------------------------------------------------------

    def recent_records(self) -> Iterator[Record]:
        """Recent flows, newest first."""
        for flow in reversed(self.recent):
            yield record_of(flow)

    def find_recent(self, flow_id: str) -> Record | None:
        """A flow by id from memory (on the event loop)."""
        for flow in reversed(self.recent):
            if flow.id == flow_id:
                return record_of(flow)
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
        rows = db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM (SELECT * FROM flows WHERE {where}"
            " ORDER BY started DESC LIMIT ?) ORDER BY started",
            (*params, limit),
        ).fetchall()
    finally:
        db.close()
    return [dict(row) for row in rows]
