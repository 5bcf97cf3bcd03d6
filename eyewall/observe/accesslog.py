"""One access line per HTTP exchange or tunnel, written off the event loop.

The loop only appends formatted lines to a list; a timer hands the batch to a writer
thread.  A slow disk or a stalled stderr pipe therefore never blocks traffic: when more
than `MAX_PENDING` bytes of lines wait for the writer, new batches are dropped and
counted, and the count is reported in the log and in the metrics.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from typing import IO

from tornado.ioloop import IOLoop, PeriodicCallback

from eyewall.flow import Flow
from eyewall.observe.logformats import FORMATS

__all__ = ["AccessLog"]

log = logging.getLogger("eyewall.access")

MAX_PENDING = 4 << 20  # bytes of lines waiting for the writer thread
FLUSH_INTERVAL = 0.1  # seconds


class AccessLog:
    """Subscriber for ``flow_end`` events that writes lines to ``target`` in ``format``
    ("auto": text when writing to a terminal, json otherwise)."""

    def __init__(self, target: str, format: str = "auto") -> None:
        self._target = target
        self._lines: list[str] = []
        self._batches: queue.Queue[str | None] = queue.Queue()
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self.dropped = 0
        self._reported_dropped = 0
        self._file: IO[str] = sys.stderr if target == "-" else open(target, "a")  # noqa: SIM115
        if format == "auto":
            format = "text" if self._file.isatty() else "json"
        self.format = FORMATS[format]
        self._thread = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self._thread.start()
        self._timer = PeriodicCallback(self.flush, FLUSH_INTERVAL * 1000)
        self._timer.start()

    def __call__(self, event: str, flow: Flow) -> None:
        if event == "flow_end":
            self._lines.append(self.format(flow))
            if len(self._lines) >= 1000:
                self.flush()

    def flush(self) -> None:
        if self.dropped != self._reported_dropped:
            log.warning("access log writer is behind: %d lines dropped", self.dropped)
            self._reported_dropped = self.dropped
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        text = "".join(lines)
        with self._lock:
            if self._pending_bytes + len(text) > MAX_PENDING:
                self.dropped += len(lines)
                return
            self._pending_bytes += len(text)
        self._batches.put_nowait(text)

    def close(self, timeout: float = 2.0) -> None:
        self._timer.stop()
        self.flush()
        self._batches.put(None)
        self._thread.join(timeout)

    def reopen(self) -> None:
        """Reopen the file (after log rotation); stderr is left alone."""
        if self._target != "-":
            IOLoop.current().run_in_executor(None, self._reopen_file)

    def _reopen_file(self) -> None:
        old, self._file = self._file, open(self._target, "a")  # noqa: SIM115
        old.close()

    def _write_loop(self) -> None:
        while True:
            text = self._batches.get()
            if text is None:
                break
            try:
                self._file.write(text)
                self._file.flush()
            except (OSError, ValueError):
                self.dropped += text.count("\n")
            with self._lock:
                self._pending_bytes -= len(text)
        if self._file is not sys.stderr:
            self._file.close()
