"""A worker process: the proxy on the listening sockets its supervisor bound, with the
limits in shared memory and its finished flows sent to the supervisor.

Started by the supervisor as ``python -m eyewall.workers.worker FD`` with the control
socket on FD (and the listening sockets and the limits segment inherited); the first
frame on it is a `WorkerInit`.  The worker then serves until told to stop:

* ``RELOAD`` applies a validated `Snapshot` (as SIGHUP does to a single process) and
  answers ``RELOADED``;
* ``STOP`` (grace seconds) drains as SIGTERM does; ``STOP_NOW`` closes what is left;
* the control socket closing (the supervisor is gone) drains at once;
* SIGTERM sent to the worker itself drains at once.  SIGINT, SIGHUP, SIGUSR1 and
  SIGUSR2 are ignored: a terminal's Ctrl-C or a signal to the process group is the
  supervisor's to act on.

It reports ``READY`` once listening, and every second its gauges (open connections,
tunnels, idle pooled connections) and drop counters (``STATS``).  Flows leave in
batches every 50 ms (`FlowSender`); the addons run here, in every worker.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from typing import Any, cast

from tornado.ioloop import PeriodicCallback

from eyewall import __version__
from eyewall.addons.hooks import Configure, Done, Running
from eyewall.addons.runner import Addons
from eyewall.config import ConfigError
from eyewall.fleet import FleetNode
from eyewall.flow import Flow
from eyewall.observe.oplog import DroppingQueueHandler, setup_logging
from eyewall.observe.store import summarise
from eyewall.policy.state import AdmissionState
from eyewall.workers.balance import Balancer
from eyewall.workers.channel import Channel, StreamClosedError
from eyewall.workers.handover import private
from eyewall.workers.limits import TABLES, SharedLimits
from eyewall.workers.shm import Segment
from eyewall.workers.snapshot import loaded_of
from eyewall.workers.wire import (
    EXIT_INVALID_CONFIG,
    INIT,
    READY,
    RELOAD,
    RELOADED,
    STATS,
    STOP,
    STOP_NOW,
    WorkerInit,
    decode,
    encode,
    pack,
    read_frame,
)

__all__ = ["FlowSender", "main"]

log = logging.getLogger("eyewall.worker")

FLUSH_INTERVAL = 0.05  # seconds between flow batches
FLUSH_FLOWS = 256  # or as soon as this many wait
STATS_INTERVAL = 1.0
EXIT_START_FAILED = 3  # the supervisor stops a start-up in which a worker exits so


class FlowSender:
    """The worker's only flow observer: finished flows, batched, to the supervisor.
    ``dropped`` counts flows refused by the channel's bound."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.dropped = 0
        self._pending: list[Flow] = []
        self._timer = PeriodicCallback(self.flush, FLUSH_INTERVAL * 1000)
        self._timer.start()

    def __call__(self, flow: Flow) -> None:
        summarise(flow)  # what the store would keep of it, and no more
        self._pending.append(flow)
        if len(self._pending) >= FLUSH_FLOWS:
            self.flush()

    def flush(self) -> None:
        """Send the flows waiting, as one frame (or count them dropped)."""
        if not self._pending:
            return
        flows, self._pending = self._pending, []
        if not self.channel.send(pack(flows)):
            self.dropped += len(flows)

    def close(self) -> None:
        """Stop the timer and send what waits."""
        self._timer.stop()
        self.flush()


class Worker:
    """One worker's proxy and its conversation with the supervisor."""

    def __init__(self, init: WorkerInit, channel: Channel, log_handler: Any) -> None:
        from eyewall.proxy.server import Proxy

        self.init = init
        self.channel = channel
        self.log_handler = log_handler
        loaded = loaded_of(init.snapshot)
        settings = loaded.settings
        self.addons = Addons(settings.addons, settings.policy_addons, settings.timeouts.addon_hook)
        self.addons.load_all()  # ValueError: the supervisor reports the start failed
        self.addons.lifecycle(Configure(settings))
        self.segment = Segment.attach(init.limits_fd, TABLES)
        self.sender = FlowSender(channel)
        # Limits in Redis for a fleet (shared_limits.redis), this machine's shared memory
        # deciding when Redis does not answer; else the shared memory alone.  The shared
        # flows (PostgreSQL) are the supervisor's.
        self.fleet = FleetNode(settings)
        shared = SharedLimits(self.segment, init.slot)
        state = self.fleet.limits_store(cast(AdmissionState, shared))  # what Redis uses of it
        self.proxy = Proxy(
            settings,
            loaded.policy,
            state=state,
            addons=self.addons,
            ca=loaded.ca,
            publish=self.sender,
        )
        proxy = self.proxy
        self.balancer = Balancer(self.segment, init.slot, os.getppid(), lambda: proxy.accepted)
        self.stop_requested = asyncio.Event()
        self.grace = 0.0
        self.shutdown: asyncio.Future[None] | None = None

    def start(self) -> None:
        """Listen on the inherited sockets, start the addons and the timers, and tell
        the supervisor ``READY``."""
        bound = {
            (setting, endpoint): [socket.socket(fileno=fd) for fd in fds]
            for setting, endpoint, fds in self.init.listeners
        }
        self.proxy.accept_gate = self.balancer  # spread new connections (balance.py)
        if self.fleet.limits is not None:
            self.fleet.limits.start()
        self.proxy.start_listening(bound)
        self.balancer.join()
        self.proxy.protect(list(self.init.protected))
        self.addons.lifecycle(Running())
        self.addon_watch = PeriodicCallback(
            lambda: self.addons.reload_changed(self.proxy.settings), 1000
        )
        if self.addons.files:
            self.addon_watch.start()
        self.stats_timer = PeriodicCallback(self.report, STATS_INTERVAL * 1000)
        self.stats_timer.start()
        self.channel.send(encode(READY, {"pid": os.getpid(), "version": __version__}), force=True)
        self.report()

    def report(self) -> None:
        """Send ``STATS``: open connections, tunnels, idle pooled connections, flows and
        log records dropped."""
        proxy = self.proxy
        stats = {
            "connections": len(proxy.connections),
            "tunnels": len(proxy.tunnels),
            "pool_idle": proxy.pool.idle_count(),
            "flows_dropped": self.sender.dropped,
            "log_dropped": self.log_handler.dropped,
            "login_checks": dict(proxy.verifier.checks),
            "proxy_protocol": dict(proxy.proxy_protocol.counts),
        }
        self.channel.send(encode(STATS, stats))

    def stop(self, grace: float) -> None:
        """Drain after ``grace`` seconds of serving (once; later calls do nothing)."""
        if self.shutdown is not None:
            return
        self.grace = grace
        self.stop_requested.set()

    def stop_now(self) -> None:
        """A second stop signal: cut what is in flight now, answered and recorded as at
        the drain deadline (`Proxy.hurry`); a third closes everything at once."""
        if self.shutdown is None:
            self.stop(0.0)
            self.proxy.hurry()
        elif not self.proxy.hurry():
            self.shutdown.cancel()

    async def listen(self) -> None:
        """Control frames from the supervisor, until it goes away."""
        while True:
            try:
                kind, payload = await self.channel.receive()
            except StreamClosedError:
                self.stop(0.0)
                return
            if kind == RELOAD:
                self.channel.send(encode(RELOADED, self.reload(decode(payload))), force=True)
            elif kind == STOP:
                self.stop(float(decode(payload)))
            elif kind == STOP_NOW:
                self.stop_now()

    def reload(self, snapshot: Any) -> str | None:
        """Apply a snapshot; None, or why it could not be applied."""
        try:
            loaded = loaded_of(snapshot)
        except (ConfigError, ValueError) as e:
            log.error("reload refused by this worker: %s", e)
            return str(e)
        self.proxy.reload(loaded.settings, loaded.policy, loaded.ca)
        self.fleet.reconfigure(loaded.settings)
        self.addons.hook_timeout = loaded.settings.timeouts.addon_hook
        self.addons.lifecycle(Configure(loaded.settings))
        return None

    async def run(self) -> None:
        """Serve until told to stop, then drain, say goodbye (the last flows and stats)
        and close the channel."""
        self.start()
        listening = asyncio.ensure_future(self.listen())
        await self.stop_requested.wait()
        proxy = self.proxy
        self.balancer.leave()
        self.shutdown = asyncio.ensure_future(proxy.shutdown(self.grace))
        try:
            await self.shutdown
        except asyncio.CancelledError:
            from eyewall.proxy.server import ProxyStopped

            log.warning("told to stop now: closing everything")
            proxy.stop_listening()
            for relay in list(proxy.tunnels):
                relay.close(ProxyStopped("the proxy was told to stop at once"))
            for conn in list(proxy.connections):
                conn.stream.close()
            await asyncio.sleep(0)
        self.addon_watch.stop()
        self.stats_timer.stop()
        self.addons.lifecycle(Done())
        if self.fleet.limits is not None:
            await self.fleet.limits.close()
        self.sender.close()
        self.report()
        await self.channel.drained()
        listening.cancel()
        self.channel.close()


async def serve(init: WorkerInit, sock: socket.socket, log_handler: DroppingQueueHandler) -> None:
    """Run the worker ``init`` describes over the control socket ``sock``.  Raises
    SystemExit(`EXIT_INVALID_CONFIG` for an addon, `EXIT_START_FAILED` for a socket)
    when it cannot start."""
    channel = Channel(sock)
    try:
        worker = Worker(init, channel, log_handler)
    except (ValueError, OSError) as e:
        # one write: the other workers may be saying the same at the same moment
        os.write(2, f"eyewall: worker {init.worker}: {e}\n".encode(errors="replace"))
        invalid = isinstance(e, ValueError)  # an addon that does not load
        raise SystemExit(EXIT_INVALID_CONFIG if invalid else EXIT_START_FAILED) from None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.stop, 0.0)
    await worker.run()


def main(argv: list[str] | None = None) -> int:
    """``python -m eyewall.workers.worker FD``: run a worker; the exit status."""
    from eyewall.app import _raise_fd_limit, run_loop

    args = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=private(int(args[0])))
    try:
        kind, payload = read_frame(sock)
    except (EOFError, OSError, ValueError) as e:
        print(f"eyewall: worker: no start message from the supervisor: {e}", file=sys.stderr)
        return EXIT_START_FAILED
    if kind != INIT:
        print(f"eyewall: worker: unexpected first message {kind}", file=sys.stderr)
        return EXIT_START_FAILED
    init: WorkerInit = decode(payload)
    # Before any addon code runs (its top level, load, configure): no program it starts
    # may inherit a listener or the shared limits (a stray child would hold the port).
    for _, _, fds in init.listeners:
        for fd in fds:
            private(fd)
    private(init.limits_fd)
    handler, listener = setup_logging(init.snapshot.settings.log_level, f"worker {init.worker}")
    if init.version != __version__:
        log.warning(
            "this worker runs eyewall %s, its supervisor %s: run eyewall restart",
            __version__,
            init.version,
        )
    _raise_fd_limit()
    gc.set_threshold(50_000, 50, 100)  # as a single process does (eyewall.app.run)
    gc.freeze()
    sys.setswitchinterval(0.001)  # the bcrypt threads give the loop its GIL back soon
    try:
        run_loop(serve(init, sock, handler), init.snapshot.settings.event_loop)
    finally:
        listener.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
