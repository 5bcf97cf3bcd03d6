"""Operational logging that can never block the event loop.

Records go through a bounded queue to a thread that writes them to stderr.  If stderr
stalls (a full pipe nobody reads), records beyond the bound are dropped and counted
instead of freezing the proxy.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys

__all__ = ["DroppingQueueHandler", "setup_logging"]

MAX_RECORDS = 10_000


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """A queue handler that drops records when the queue is full (counted in ``dropped``)
    instead of blocking the event loop."""

    def __init__(self, q: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        """Put ``record`` on the queue, or count it as dropped."""
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def setup_logging(level: str) -> tuple[DroppingQueueHandler, logging.handlers.QueueListener]:
    """Route every log record through a bounded queue to a stderr-writing thread."""
    q: queue.Queue[logging.LogRecord] = queue.Queue(MAX_RECORDS)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler = DroppingQueueHandler(q)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Tornado warns about every failed TLS handshake; the proxy logs what matters itself.
    logging.getLogger("tornado.general").setLevel(logging.ERROR)
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    listener = logging.handlers.QueueListener(q, stream, respect_handler_level=False)
    listener.start()
    return handler, listener
