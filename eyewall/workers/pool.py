"""The worker processes of a supervisor (`eyewall.workers.supervisor`): starting them
with their sockets, slot and configuration, reading what they send, noticing at once
when one exits (a pidfd), releasing its counts in the shared limits
(`eyewall.workers.limits.reap`) and starting it again after a back-off that grows
while it keeps dying young (`backoff`)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from tornado.ioloop import PeriodicCallback

from eyewall import __version__
from eyewall.flow import Flow
from eyewall.workers.channel import Channel, StreamClosedError
from eyewall.workers.handover import Bound
from eyewall.workers.limits import reap
from eyewall.workers.shm import MAX_SLOTS, Segment, process_start
from eyewall.workers.spawn import child_process
from eyewall.workers.stats import WorkerState
from eyewall.workers.wire import (
    EXIT_INVALID_CONFIG,
    FLOWS,
    INIT,
    READY,
    RELOAD,
    RELOADED,
    STATS,
    Snapshot,
    WorkerInit,
    decode,
    encode,
    unpack,
)

__all__ = ["WorkerPool", "WorkerProcess", "backoff"]

log = logging.getLogger("eyewall")

STABLE = 60.0  # seconds a worker must live for its next death to be restarted at once
MAX_BACKOFF = 30.0
RELOAD_TIMEOUT = 10.0  # seconds a worker has to apply a reload
SWEEP_INTERVAL = 5.0  # seconds between checks for slots whose process is gone


def backoff(failures: int) -> float:
    """Seconds to wait before restarting a worker that died ``failures`` times in a row
    without living `STABLE` seconds: at once the first time, then 0.5 s doubling up to
    `MAX_BACKOFF`."""
    return 0.0 if failures <= 1 else min(MAX_BACKOFF, 0.5 * 2 ** (failures - 2))


class WorkerProcess:
    """One running worker process."""

    def __init__(self, state: WorkerState, slot: int, process: subprocess.Popen[bytes]) -> None:
        self.state = state
        self.slot = slot
        self.process = process
        self.started = time.monotonic()
        self.channel: Channel | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Event = asyncio.Event()  # its channel reached end of file
        self.reload_answer: asyncio.Future[str | None] | None = None
        self.snapshot: Snapshot | None = None  # the configuration it was last sent


class WorkerPool:
    """``count`` workers, numbered 1..count.  Set ``segment``, ``bound`` (the listening
    sockets), ``protected`` (the admin listener's addresses), ``snapshot`` and
    ``publish`` (where their flows go) before `start`."""

    def __init__(self, count: int) -> None:
        self.states = {n: WorkerState(n) for n in range(1, count + 1)}
        self.processes: dict[int, WorkerProcess] = {}  # running, by worker number
        self.failures = dict.fromkeys(self.states, 0)
        self.segment: Segment
        self.bound: Bound = {}
        self.protected: list[tuple[str, int]] = []
        self.snapshot: Snapshot | None = None
        self.publish: Callable[[Flow], None] = lambda flow: None
        self.stopping = False  # no more restarts
        self.started_up = False  # every worker listened once
        self.start_failed = False
        self.start_status = 1  # the exit status of a failed start (2: invalid configuration)
        self.all_ready = asyncio.Event()
        self.tasks: set[asyncio.Future[Any]] = set()

    def start(self) -> None:
        """Start every worker (`started` says when they all listen)."""
        for number in self.states:
            self._spawn(number)

    async def started(self) -> None:
        """Return once every worker listens, or one failed to start
        (``start_failed``)."""
        while not self.start_failed and not all(s.ready for s in self.states.values()):
            self.all_ready.clear()
            await self.all_ready.wait()

    def send_all(self, data: bytes) -> None:
        """Send a control frame to every running worker."""
        for worker in self.processes.values():
            if worker.channel is not None:
                worker.channel.send(data, force=True)

    def _later(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _spawn(self, number: int) -> None:
        state = self.states[number]
        snapshot = self.snapshot
        assert snapshot is not None, "configure the pool before starting it"
        with self.segment.locked():
            slot = self.segment.free_slot()
            if slot == -1 or slot == MAX_SLOTS - 1:
                log.error("no free slot in the shared limits for worker %d", number)
                return
            self.segment.set_slot(slot, os.getpid(), process_start(os.getpid()))  # reserved
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), self.segment.fd]
        fds += [s.fileno() for socks in self.bound.values() for s in socks]
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        argv, env = child_process("eyewall.workers.worker", [str(theirs.fileno())], env)
        try:
            process = subprocess.Popen(argv, pass_fds=fds, env=env)
        except OSError as e:
            log.error("cannot start worker %d: %s", number, e)
            ours.close()
            with self.segment.locked():
                self.segment.set_slot(slot, 0, 0)
            self.failures[number] += 1
            self._restart_later(number, backoff(self.failures[number]))
            return
        finally:
            theirs.close()
        with self.segment.locked():
            self.segment.set_slot(slot, process.pid, process_start(process.pid))
        if self.started_up:
            log.info("worker %d started (pid %d)", number, process.pid)
        worker = WorkerProcess(state, slot, process)
        state.pid = process.pid
        state.ready = False
        self.processes[number] = worker
        channel = worker.channel = Channel(ours)
        listeners = tuple(
            (setting, endpoint, tuple(s.fileno() for s in socks))
            for (setting, endpoint), socks in self.bound.items()
        )
        init = WorkerInit(
            number,
            slot,
            self.segment.fd,
            listeners,
            tuple(self.protected),
            snapshot,
            __version__,
        )
        channel.send(encode(INIT, init), force=True)
        worker.snapshot = snapshot
        self._later(lambda: self._listen(worker))
        self._watch_exit(worker)

    async def _listen(self, worker: WorkerProcess) -> None:
        """Frames from one worker until its channel closes."""
        assert worker.channel is not None
        state = worker.state
        publish = self.publish
        try:
            while True:
                kind, payload = await worker.channel.receive()
                if kind == FLOWS:
                    for flow in unpack(payload, state.number):
                        publish(flow)
                elif kind == STATS:
                    state.gauges = decode(payload)
                elif kind == READY:
                    state.ready = True
                    log.debug("worker %d (pid %d) ready", state.number, worker.process.pid)
                    if worker.snapshot is not self.snapshot:  # reloaded while it started
                        worker.snapshot = self.snapshot
                        worker.channel.send(encode(RELOAD, self.snapshot), force=True)
                    self.all_ready.set()
                elif kind == RELOADED:
                    answer = worker.reload_answer
                    if answer is not None and not answer.done():
                        answer.set_result(decode(payload))
        except StreamClosedError:
            pass
        except (ValueError, TypeError, EOFError):
            log.exception("worker %d sent a malformed frame; closing its channel", state.number)
        finally:
            worker.channel.close()
            worker.closed.set()

    def _watch_exit(self, worker: WorkerProcess) -> None:
        loop = asyncio.get_running_loop()
        process = worker.process
        try:
            pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            timer = PeriodicCallback(lambda: self._poll(worker, timer), 100)
            timer.start()
            return

        def exited() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._exited(worker, process.wait())

        loop.add_reader(pidfd, exited)

    def _poll(self, worker: WorkerProcess, timer: PeriodicCallback) -> None:
        code = worker.process.poll()
        if code is not None:
            timer.stop()
            self._exited(worker, code)

    def _exited(self, worker: WorkerProcess, code: int) -> None:
        state = worker.state
        state.retire()
        released = reap(self.segment, worker.slot)
        if self.processes.get(state.number) is worker:
            del self.processes[state.number]
        worker.exited.set_result(code)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if self.stopping:
            if code != 0:
                log.warning("worker %d (pid %d) %s", state.number, worker.process.pid, how)
            return
        if not self.started_up:
            log.error("worker %d (pid %d) %s while starting", state.number, worker.process.pid, how)
            self.start_failed = True
            if code == EXIT_INVALID_CONFIG:
                self.start_status = EXIT_INVALID_CONFIG
            self.all_ready.set()
            return
        lived = time.monotonic() - worker.started
        self.failures[state.number] = 1 if lived >= STABLE else self.failures[state.number] + 1
        delay = backoff(self.failures[state.number])
        state.restarts += 1
        log.warning(
            "worker %d (pid %d) %s after %.1f s%s; restarting it%s",
            state.number,
            worker.process.pid,
            how,
            lived,
            f", releasing {released} connection and tunnel counts" if released else "",
            f" in {delay:g} s" if delay else "",
        )
        self._restart_later(state.number, delay)

    def _restart_later(self, number: int, delay: float) -> None:
        def again() -> None:
            if not self.stopping and number not in self.processes:
                self._spawn(number)

        asyncio.get_running_loop().call_later(delay, again)

    def sweep(self) -> None:
        """Release the slots of workers that are gone but were not reaped here: those of
        a generation before this one whose supervisor died."""
        ours = {w.slot for w in self.processes.values()}
        for slot in range(MAX_SLOTS - 1):
            if slot in ours:
                continue
            with self.segment.locked():
                pid, started, _ = self.segment.slot(slot)
            if pid and process_start(pid) != started:
                released = reap(self.segment, slot)
                log.info("released %d counts of a worker that is gone (pid %d)", released, pid)

    async def reload(self, snapshot: Snapshot) -> list[str]:
        """Send ``snapshot`` to every worker that serves and wait for their answers;
        what each one that could not apply it said (a worker still starting gets it
        once ready)."""
        self.snapshot = snapshot
        loop = asyncio.get_running_loop()
        waiting = []
        for worker in list(self.processes.values()):
            if worker.channel is None or not worker.state.ready:
                continue  # starting: it gets the new snapshot with its INIT
            worker.reload_answer = loop.create_future()
            worker.snapshot = snapshot
            worker.channel.send(encode(RELOAD, snapshot), force=True)
            waiting.append(worker)
        refused = []
        for worker in waiting:
            assert worker.reload_answer is not None
            try:
                async with asyncio.timeout(RELOAD_TIMEOUT):
                    error = await asyncio.shield(worker.reload_answer)
            except TimeoutError:
                error = "no answer"
            if error is not None and not worker.exited.done():
                refused.append(f"worker {worker.state.number}: {error}")
        return refused
