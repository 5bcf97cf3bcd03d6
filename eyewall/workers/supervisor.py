"""The supervisor: one process that owns what must be one, and N workers that serve.

It binds the listening sockets (or takes them from the generation before, see
`eyewall.workers.handover`) and starts ``python -m eyewall.workers.worker`` N times,
each with the sockets, the shared limits segment and a control socket pair.  A fresh
interpreter per worker rather than a fork: the supervisor runs an event loop and
threads (the observers' writer, the log), which a fork must not copy.

What it owns:

* the observers — access log, flow store, metrics, live feed and the admin listener —
  fed by the flows every worker sends (so there is one of each, with every worker's
  traffic, and their disk writes happen off the workers' cores);
* the configuration: loaded and validated here, on start and on SIGHUP or a watched
  file's change, and sent to every worker as a `Snapshot`;
* the signals: SIGTERM (health checks say 503 for ``timeouts.drain_grace``, then the
  workers drain), SIGINT (drain now), a second one (cut what is in flight, recorded), a
  third (close now), SIGHUP (reload), SIGUSR1 (reopen the access log), SIGUSR2 (restart:
  a new generation);
* the pid file and the service manager's notifications;
* the workers themselves (`eyewall.workers.pool`): a worker that exits has its counts in
  the shared limits released before it is started again, after a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from tornado.ioloop import PeriodicCallback

from eyewall import __version__
from eyewall.app import (
    Loaded,
    Loader,
    Observers,
    _mtimes,
    _raise_fd_limit,
    _restart_failed,
    _write_pid_file,
    announce_https,
)
from eyewall.config import ConfigError, Settings, restart_settings
from eyewall.fleet import FleetNode
from eyewall.observe.oplog import DroppingQueueHandler
from eyewall.proxy.server import bind_endpoint
from eyewall.sdnotify import notify, reloading
from eyewall.tls.ca import CertificateAuthority, default_ca_dir
from eyewall.workers.handover import (
    Bound,
    Inherited,
    Restart,
    listener_keys,
    owns_pid_file,
)
from eyewall.workers.limits import TABLES, SharedLimits, create_segment
from eyewall.workers.pool import SWEEP_INTERVAL, WorkerPool
from eyewall.workers.shm import MAX_SLOTS, Segment
from eyewall.workers.snapshot import snapshot_of
from eyewall.workers.stats import WorkerCollector, WorkersStats
from eyewall.workers.wire import STOP, STOP_NOW, encode

__all__ = ["Supervisor"]

log = logging.getLogger("eyewall")

START_TIMEOUT = 60.0  # seconds the workers have to start listening
KILL_MARGIN = 10.0  # seconds past the drain deadline before a worker is killed


class Supervisor:
    """Runs ``count`` workers for ``loaded`` until stopped; `run` returns the exit
    status."""

    def __init__(
        self,
        loader: Loader,
        loaded: Loaded,
        count: int,
        log_handler: DroppingQueueHandler,
        inherited: Inherited | None = None,
    ) -> None:
        self.loader = loader
        self.loaded = loaded
        self.settings = loaded.settings
        self.count = count
        self.log_handler = log_handler
        self.inherited = inherited
        self.pool = pool = WorkerPool(count)
        self.stats = WorkersStats(pool.states.values)
        self.stopping = False
        self.handing_over = False
        self.stop_event = asyncio.Event()
        self.stop_now = asyncio.Event()
        self.stop_signal = 0
        self.shown = ""
        self.reload_lock = asyncio.Lock()
        self.tasks: set[asyncio.Future[Any]] = set()
        self.bound: Bound = pool.bound  # the listening sockets, shared with the workers
        self.admin_sockets: list[socket.socket] = []

    # -- start -------------------------------------------------------------------------

    async def run(self) -> int:
        """Start the workers and serve until stopped (or handed over); the exit status:
        0, 1 when the workers could not start, 2 when a worker found the configuration
        invalid (an addon that does not load).  Raises SystemExit for a listener
        that cannot be bound."""
        settings = self.settings
        _raise_fd_limit()
        self.segment = self.pool.segment = self._segment()
        self.limits_view = SharedLimits(self.segment, MAX_SLOTS - 1)  # statistics only
        taken = self.inherited.take(listener_keys(settings)) if self.inherited else {}
        try:
            self.snapshot = snapshot_of(self.loaded)
            self._bind(taken)
            observers = self.observers = Observers(settings, self.stats, self._ca_pem)
            if observers.admin is not None:
                admin = taken.get(("admin.listen", settings.admin.listen))
                self.pool.protected = observers.admin.start(admin)
                self.admin_sockets = observers.admin.sockets
        except (OSError, ConfigError) as e:
            raise SystemExit(f"eyewall: {getattr(e, 'strerror', None) or e}") from None
        metrics = observers.metrics
        if metrics is not None:
            metrics.track_drops("log", lambda: self.log_handler.dropped + self.stats.log_dropped())
            metrics.track_drops("workers", self.stats.flows_dropped)
            metrics.login_checks = self.stats.login_checks
            metrics.registry.register(
                WorkerCollector(self.count, self.pool.states.values, self.limits_view.statistics)
            )
        self.fleet = FleetNode(settings)  # PostgreSQL flows here; Redis limits: the workers'
        self.fleet.attach(observers, _WorkersGate(self.stats, settings))
        if observers.admin is not None:
            print(f"eyewall admin on {observers.admin.url()}", file=sys.stderr, flush=True)
        self._signals()
        pool = self.pool
        pool.snapshot, pool.publish = self.snapshot, observers.bus.publish
        pool.start()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await pool.started()
        except TimeoutError:
            log.error("the workers did not start within %.0f s", START_TIMEOUT)
            pool.start_failed = True
        if pool.start_failed:
            await self._stop(0.0)
            return pool.start_status
        self._announce()
        await self.fleet.start()
        watcher = self._watch()
        sweeper = PeriodicCallback(pool.sweep, SWEEP_INTERVAL * 1000)
        sweeper.start()
        await self.stop_event.wait()
        watcher.stop()
        sweeper.stop()
        grace = settings.timeouts.drain_grace if self.stop_signal == signal.SIGTERM else 0.0
        if not self.handing_over:
            notify("STOPPING=1")
        await self._stop(grace)
        log.info("stopped")
        return 0

    def _segment(self) -> Segment:
        inherited = self.inherited
        if inherited is not None and inherited.limits_fd is not None:
            try:
                return Segment.attach(inherited.limits_fd, TABLES)
            except (OSError, ValueError) as e:
                log.warning("restart: the limits start afresh (%s)", e)
        try:
            return create_segment()
        except OSError as e:
            raise SystemExit(f"eyewall: cannot create the shared limits: {e.strerror}") from None

    def _bind(self, taken: Bound) -> None:
        """The listening sockets: ``taken`` from the generation before where the
        endpoint is the same, else new ones.  Raises OSError."""
        settings = self.settings
        wanted = [("listen", e) for e in settings.listen]
        wanted += [("tls.listen", e) for e in settings.tls.listen]
        for setting, endpoint in wanted:
            key = (setting, str(endpoint))
            self.bound[key] = taken.get(key) or bind_endpoint(endpoint, setting)
        if settings.tls.listen:
            from eyewall.proxy.server import _server_context

            _server_context(settings.tls.certificate, settings.tls.key)  # fail here, once

    def _ca_pem(self) -> bytes | None:
        ca = self.loaded.ca
        if ca is not None:
            return ca.pem()
        configured = self.settings.tls.ca_dir
        try:
            directory = Path(configured) if configured else default_ca_dir()
            return CertificateAuthority.load(directory).pem()
        except (OSError, ValueError):
            return None

    def _signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._later, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen)
        self.restart = Restart(
            self._listeners,
            self._hand_over,
            self.segment.fd,
            failed=lambda: _restart_failed(self.settings),
        )
        loop.add_signal_handler(signal.SIGUSR2, self.restart.request)

    def _later(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for socks in self.bound.values() for s in socks]

    def _announce(self) -> None:
        shown = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self._addresses())
        self.shown = shown
        self.pool.started_up = True
        if self.settings.pid_file:
            _write_pid_file(self.settings.pid_file)
        pids = ", ".join(f"{s.number} (pid {s.pid})" for s in self.pool.states.values())
        print(f"eyewall workers: {pids}", file=sys.stderr, flush=True)
        print(f"eyewall {__version__} listening on {shown}", file=sys.stderr, flush=True)
        announce_https(self.bound)
        status = f"STATUS=listening on {shown}"  # as a single process says it
        if self.inherited is not None:
            notify(f"MAINPID={os.getpid()}\nREADY=1\n{status}")
            self.inherited.announce_ready()
        else:
            notify(f"READY=1\n{status}")

    # -- workers -----------------------------------------------------------------------

    # -- reload, reopen, restart ------------------------------------------------------

    async def reload(self) -> None:
        """Load and validate the configuration, then send it to every worker (SIGHUP, a
        watched file); a refusal is logged and changes nothing."""
        async with self.reload_lock:
            notify(reloading())
            ok = False
            try:
                ok = await self._reload()
            finally:
                metrics = self.observers.metrics
                if metrics is not None:
                    metrics.reloaded(ok)
                notify(
                    f"STATUS=listening on {self.shown}"
                    if ok
                    else "STATUS=reload refused (see the log); the previous configuration runs"
                )
                notify("READY=1")

    async def _reload(self) -> bool:
        try:
            new = self.loader.load()
            snapshot = snapshot_of(new)
        except ConfigError as e:
            log.error("reload refused, keeping the current configuration: %s", e)
            return False
        old = self.settings
        for name in restart_settings(old, new.settings):
            log.warning("%s changed: it applies after a restart (eyewall restart)", name)
        try:
            self.observers.reconfigure(old, new.settings)
            self.fleet.reconfigure(new.settings)
        except OSError as e:
            log.error("reload refused, keeping the current configuration: %s", e)
            return False
        self.loaded, self.settings, self.snapshot = new, new.settings, snapshot
        refused = await self.pool.reload(snapshot)
        if refused:
            log.error("reload: %s", "; ".join(refused))
            return False
        log.info("configuration reloaded (%d workers)", len(self.pool.processes))
        return True

    def _reopen(self) -> None:
        if self.observers.access is not None:
            self.observers.access.reopen()

    def _listeners(self) -> Bound:
        """What a successor takes over."""
        bound = dict(self.bound)
        if self.admin_sockets:
            bound["admin.listen", self.settings.admin.listen] = self.admin_sockets
        return bound

    def _hand_over(self) -> None:
        self.handing_over = True
        self._on_stop(signal.SIGINT)

    # -- stop --------------------------------------------------------------------------

    def _on_stop(self, sig: int) -> None:
        if self.stop_event.is_set():  # a second signal: cut now; a third: close now
            log.warning("another signal: the workers cut what is in flight now")
            self.stop_now.set()
            self.pool.send_all(encode(STOP_NOW, None))
            return
        self.stop_signal = sig
        self.restart.refused = True
        self.stop_event.set()

    async def _stop(self, grace: float) -> None:
        """Stop every worker (``grace`` seconds of serving first, then the drain), then
        the observers."""
        self.pool.stopping = self.stats.stopping = True
        settings = self.settings
        if not self.handing_over:
            log.info(
                "shutting down; in-flight work has %.0f s to finish%s",
                settings.timeouts.drain,
                f" after {grace:g} s of grace" if grace else "",
            )
        self.pool.send_all(encode(STOP, grace))
        if self.handing_over and self.observers.admin is not None:
            await self.observers.admin.stop()  # the successor serves the admin listener
        if grace:  # a second signal cuts it short
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.stop_now.wait()
        for socks in self.bound.values():
            for sock in socks:
                sock.close()
        waiting = list(self.pool.processes.values())
        deadline = settings.timeouts.drain + KILL_MARGIN
        try:
            async with asyncio.timeout(deadline):
                for worker in waiting:
                    await asyncio.shield(worker.exited)  # a timeout must not cancel it
                    await worker.closed.wait()
        except TimeoutError:
            for worker in waiting:
                if not worker.exited.done():
                    log.error("worker %d did not stop: killing it", worker.state.number)
                    worker.process.kill()
            for worker in waiting:
                await worker.exited
        self.observers.bus.flush()  # the last flows, the fleet's flow writer included
        await self.fleet.stop()
        await self.observers.stop()
        pid_file = settings.pid_file
        if pid_file and owns_pid_file(pid_file):
            Path(pid_file).unlink(missing_ok=True)
        self.segment.close()

    # -- config watch -------------------------------------------------------------------

    def _watch(self) -> PeriodicCallback:
        files = self.loader.watched_files(self.settings)
        seen = _mtimes(files)

        def poll() -> None:
            nonlocal seen, files
            now = _mtimes(files)
            if now != seen:
                seen = now

                async def reload() -> None:
                    nonlocal files, seen
                    await self.reload()
                    files = self.loader.watched_files(self.settings)
                    seen = _mtimes(files)

                self._later(reload)

        watcher = PeriodicCallback(poll, 2000)
        if self.settings.watch_config or self.settings.auth.htpasswd:
            watcher.start()
        return watcher


class _WorkersGate:
    """What `FleetNode.attach` reads of a proxy, from the workers: whether the PROXY
    protocol is on, and its counts summed over the workers (their last reports)."""

    def __init__(self, stats: WorkersStats, settings: Settings) -> None:
        self.proxy_protocol = self
        self.enabled = bool(settings.proxy_protocol.trusted)
        self._stats = stats

    @property
    def counts(self) -> dict[str, int]:
        """PROXY protocol outcomes by result, summed over the workers."""
        return self._stats.summed("proxy_protocol")
