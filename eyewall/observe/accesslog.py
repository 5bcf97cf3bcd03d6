"""One access line per HTTP exchange or tunnel, written off the event loop.

The loop formats each finished flow into a line and appends it to a list; a timer hands
the batch to the shared writer thread (`eyewall.observe.writer`).  A slow disk or a
stalled stderr pipe never blocks traffic: batches the writer cannot take are dropped
and counted, and the count is reported in the log and in the metrics.

A log file is created readable by its owner and group only (0640, less what the umask
takes away); SIGUSR1 reopens it after rotation, and a reload may change its path or
format.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO

from tornado.ioloop import PeriodicCallback

from eyewall.flow import Flow
from eyewall.observe.logformats import FORMATS
from eyewall.observe.writer import BatchWriter

__all__ = ["AccessLog", "open_log"]

log = logging.getLogger("eyewall.access")

FLUSH_INTERVAL = 0.1  # seconds
FLUSH_LINES = 1000


def open_log(path: str) -> IO[str]:
    """Open ``path`` for appending, created 0640 (access lines name clients, users and
    URLs: not for everyone; the group is for log readers).  Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")


class AccessLog:
    """Observer writing lines to ``target`` ("-": stderr, else a file path) in
    ``format`` ("auto": text on a terminal, json otherwise).  Raises OSError when the
    file cannot be opened."""

    def __init__(self, target: str, format: str, writer: BatchWriter) -> None:
        self.writer = writer
        self.dropped = 0
        self._reported_dropped = 0
        self._lines: list[str] = []
        self.target = ""
        self._file: IO[str] = sys.stderr
        self.configure(target, format)
        self._timer = PeriodicCallback(self.flush, FLUSH_INTERVAL * 1000)
        self._timer.start()

    def configure(self, target: str, format: str) -> None:
        """Write to ``target`` in ``format`` from now on (a reload).  Raises OSError
        (and changes nothing) when the new file cannot be opened."""
        new = sys.stderr if target == "-" else open_log(target)
        if format == "auto":
            format = "text" if new.isatty() else "json"
        self.flush()
        old, self._file, self.target = self._file, new, target
        self.format = FORMATS[format]
        self.format_name = format
        if old is not sys.stderr:
            self.writer.submit(lambda f: f.close(), old, 0)

    def __call__(self, flow: Flow) -> None:
        self._lines.append(self.format(flow))
        if len(self._lines) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered lines to the writer thread (and report lines dropped since the last
        flush)."""
        if self.dropped != self._reported_dropped:
            log.warning("access log writer is behind: %d lines dropped", self.dropped)
            self._reported_dropped = self.dropped
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        text = "".join(lines)
        if not self.writer.submit(self._write, (self._file, text), len(text)):
            self.dropped += len(lines)

    def _write(self, item: tuple[IO[str], str]) -> None:
        file, text = item
        try:
            file.write(text)
            file.flush()
        except (OSError, ValueError):
            self.dropped += text.count("\n")

    def reopen(self) -> None:
        """Reopen the file (after log rotation); stderr is left alone."""
        if self.target != "-":
            try:
                self.configure(self.target, self.format_name)
            except OSError as e:
                log.error("cannot reopen the access log %s: %s", self.target, e.strerror)

    def close(self) -> None:
        """Stop the flush timer, flush, and close the file (after the writer has written it)."""
        self._timer.stop()
        self.flush()
        if self._file is not sys.stderr:
            self.writer.submit(lambda f: f.close(), self._file, 0)
