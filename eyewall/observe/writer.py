"""One thread for the observers' disk writes: the access log's lines and the flow
store's rows go through the same bounded queue to the same writer thread.

The event loop only hands over batches (`BatchWriter.submit`); the thread does the
I/O.  One thread rather than one per observer: every hand-over of the interpreter lock
between the loop and a writer costs the loop time, and the batches of both observers
can share the hand-overs.  When more than ``max_pending`` bytes (estimated) wait,
`submit` refuses the batch and its owner counts it as dropped: traffic never waits on
a disk or a stalled pipe.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BatchWriter"]

log = logging.getLogger("eyewall.writer")

MAX_PENDING = 8 << 20


class BatchWriter:
    """Runs ``write(batch)`` calls in order on one daemon thread."""

    def __init__(
        self,
        max_pending: int = MAX_PENDING,
        idle: Callable[[], None] | None = None,
        idle_every: float = 5.0,
    ) -> None:
        self.max_pending = max_pending
        self._idle = idle  # called on the thread when it has waited idle_every seconds
        self._idle_every = idle_every
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], None], Any, int] | None] = (
            queue.SimpleQueue()
        )
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="eyewall-writer", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[Any], None], batch: Any, size: int) -> bool:
        """Queue ``write(batch)``; False (nothing queued) when ``size`` more bytes would
        exceed the bound."""
        with self._lock:
            if self._pending + size > self.max_pending:
                return False
            self._pending += size
        self._queue.put((write, batch, size))
        return True

    def room(self) -> int:
        """Bytes that may still be queued before `submit` refuses."""
        with self._lock:
            return max(0, self.max_pending - self._pending)

    def on_idle(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the writer thread when it has nothing else to do (at most
        every ``idle_every`` seconds): retention passes and the like."""
        self._idle = callback

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._idle_every)
            except queue.Empty:
                if self._idle is not None:
                    self._call(self._idle)
                continue
            if item is None:
                if self._idle is not None:
                    self._call(self._idle)
                return
            write, batch, size = item
            try:
                write(batch)
            except Exception:
                log.exception("observer write failed")
            with self._lock:
                self._pending -= size

    @staticmethod
    def _call(work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            log.exception("observer write failed")
