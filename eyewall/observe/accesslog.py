"""One access line per HTTP exchange or tunnel, written off the event loop.

The loop only appends formatted lines to a list; a timer hands the batch to a writer
thread.  A slow disk or a stalled stderr pipe therefore never blocks traffic: when the
writer falls behind by more than `MAX_BATCHES` batches, new batches are dropped and
counted, and the count is reported in the log.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from typing import IO

from tornado.ioloop import IOLoop, PeriodicCallback

from eyewall.observe.flow import Flow

__all__ = ["AccessLog", "format_text"]

log = logging.getLogger("eyewall.access")

MAX_BATCHES = 256
FLUSH_INTERVAL = 0.1  # seconds


_second: list[object] = [-1, ""]  # the last whole second formatted, and its text


def _timestamp(t: float) -> str:
    second = int(t)
    if _second[0] != second:
        _second[0] = second
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int(t * 1000) % 1000:03d}Z"


def format_text(flow: Flow) -> str:
    """``time client id method url status in out duration up=… [err=…]``"""
    client = f"{flow.client[0]}:{flow.client[1]}"
    line = (
        f"{_timestamp(flow.started)} {client} {flow.id} {flow.method or '-'} {flow.url or '-'}"
        f" {flow.status or '-'} in={flow.bytes_in} out={flow.bytes_out}"
        f" {flow.duration * 1000:.1f}ms up={flow.upstream or '-'}"
    )
    if flow.reused:
        line += " reused"
    if flow.user is not None:
        line += f" user={flow.user}"
    if flow.rule:
        line += f" rule={flow.rule}"
    if flow.error is not None:
        detail = flow.error_detail.replace('"', "'")
        line += f' err={flow.error.value} "{detail}"'
    return line + "\n"


class AccessLog:
    """Subscriber for ``flow_end`` events that writes lines to ``target``."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._lines: list[str] = []
        self._batches: queue.Queue[list[str] | None] = queue.Queue(MAX_BATCHES)
        self.dropped = 0
        self._reported_dropped = 0
        self._file: IO[str] = sys.stderr if target == "-" else open(target, "a")  # noqa: SIM115
        self._thread = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self._thread.start()
        self._timer = PeriodicCallback(self.flush, FLUSH_INTERVAL * 1000)
        self._timer.start()

    def __call__(self, event: str, flow: Flow) -> None:
        if event == "flow_end":
            self._lines.append(format_text(flow))
            if len(self._lines) >= 1000:
                self.flush()

    def flush(self) -> None:
        if self.dropped != self._reported_dropped:
            log.warning("access log writer is behind: %d lines dropped", self.dropped)
            self._reported_dropped = self.dropped
        if not self._lines:
            return
        batch, self._lines = self._lines, []
        try:
            self._batches.put_nowait(batch)
        except queue.Full:
            self.dropped += len(batch)

    def close(self, timeout: float = 2.0) -> None:
        self._timer.stop()
        self.flush()
        try:
            self._batches.put(None, timeout=timeout)
        except queue.Full:
            return
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
            batch = self._batches.get()
            if batch is None:
                break
            try:
                self._file.write("".join(batch))
                self._file.flush()
            except (OSError, ValueError):
                self.dropped += len(batch)
        if self._file is not sys.stderr:
            self._file.close()
