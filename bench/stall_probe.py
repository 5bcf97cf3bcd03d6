"""Run Eyewall with instruments for event-loop stalls (bench/loop_stalls.py uses it).

    .venv/bin/python bench/stall_probe.py [eyewall options]

The same process as `python -m eyewall [options]`, plus, chosen by environment
variables (nothing in eyewall/ changes; the probe patches it at start-up):

    EYEWALL_PROBE_OUT=FILE   write what was recorded as JSON at exit:
        gc       every collection: generation, start (time.monotonic), duration,
                 objects collected (gc.callbacks)
        lag      a task sleeping EYEWALL_PROBE_LAG_MS (default 2) and recording how
                 late it woke: (wake time, lateness) of every sample
        calls    duration of the loop's periodic work: watchdog sweep, live-feed
                 tick, access-log and flow-store flushes
        busy     when the writer thread (access log and flows) worked on a batch
    EYEWALL_PROBE_GC=as-is | default | off | T0,T1,T2
        as-is: eyewall's own gc.set_threshold(50_000, 50, 100) + gc.freeze();
        default: CPython's (700, 10, 10), still frozen; off: gc.disable();
        T0,T1,T2: those thresholds, still frozen
    EYEWALL_PROBE_SWITCH=SECONDS   sys.setswitchinterval (CPython's default: 0.005)
    EYEWALL_PROBE_OFF=watchdog,live   periodic work not started
    EYEWALL_PROBE_WRITER_NICE=N   the writer thread (access log, flows) runs at
        niceness N (the loop thread keeps the process's)
    EYEWALL_PROBE_WRITER_CPU=N    the writer thread runs on CPU N (not the loop's)
    EYEWALL_PROBE_FLOWS_FLUSH=SECONDS   the flow store's flush interval (0.25 s)

Time stamps are time.monotonic(), the same clock in every process, so the
driver can cut out the window of its wrk run.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

now = time.monotonic
RECORDED: dict[str, Any] = {"gc": [], "lag": [], "calls": [], "busy": [], "settings": {}}
WRITER_STATS: list[int] = []  # fds of the writer threads' /proc/.../schedstat


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = now()
        try:
            return function(*args, **kwargs)
        finally:
            RECORDED["calls"].append((name, started, now() - started))

    return wrapper


def setup_writer_thread(name: str) -> None:
    """Set the OS thread name (as /proc and perf show it; Python 3.11 does not),
    and the niceness / CPU the environment asks for."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    tid = threading.get_native_id()
    WRITER_STATS.append(os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY))
    nice = os.environ.get("EYEWALL_PROBE_WRITER_NICE")
    if nice:
        os.setpriority(os.PRIO_PROCESS, tid, int(nice))  # per thread on Linux
    cpu = os.environ.get("EYEWALL_PROBE_WRITER_CPU")
    if cpu:
        os.sched_setaffinity(tid, {int(cpu)})


class TrackedQueue:
    """A writer's queue that records when the thread works: from getting a batch to
    asking for the next."""

    def __init__(self, queue: Any, name: str) -> None:
        self.queue, self.name = queue, name
        self.since: float | None = None
        self.named = False

    def put(self, *args: Any, **kwargs: Any) -> Any:
        return self.queue.put(*args, **kwargs)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        if not self.named:
            self.named = True
            setup_writer_thread(self.name.removesuffix("_writer").replace("_", "-"))
        if self.since is not None:
            RECORDED["busy"].append((self.name, self.since, now() - self.since))
            self.since = None
        item = self.queue.get(*args, **kwargs)
        self.since = now() if item else None
        return item


def install_gc_timer() -> None:
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = now()
        else:
            t = started[0]
            RECORDED["gc"].append((info["generation"], t, now() - t, info["collected"]))

    gc.callbacks.append(callback)


def apply_gc_choice(choice: str) -> None:
    if choice in ("", "as-is"):
        return
    if choice == "off":
        gc.disable()
    elif choice == "default":
        gc.set_threshold(700, 10, 10)
    else:
        t0, t1, t2 = (int(x) for x in choice.split(","))
        gc.set_threshold(t0, t1, t2)


def schedstat() -> Callable[[], tuple[int, int]]:
    """This thread's (ns on a CPU, ns runnable but waiting for one), from
    /proc/thread-self/schedstat (one pread per call)."""
    fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def read() -> tuple[int, int]:
        on_cpu, waiting, _ = os.pread(fd, 100, 0).split()
        return int(on_cpu), int(waiting)

    return read


def writers_cpu() -> int:
    """ns the writer threads have run, summed."""
    return sum(int(os.pread(fd, 100, 0).split()[0]) for fd in WRITER_STATS)


async def sample_lag(interval: float) -> None:
    """Each sample: (wake time, lateness, then over the sample's span from going to
    sleep to waking: seconds the main thread was on a CPU, seconds it waited for
    one, seconds the writer threads ran).  The rest of the span the main thread
    slept: idle in epoll (at most `interval`) or blocked, e.g. on the GIL."""
    import asyncio

    lag = RECORDED["lag"]
    read = schedstat()
    while True:
        cpu0, wait0 = read()
        writers0 = writers_cpu()
        due = now() + interval
        await asyncio.sleep(interval)
        woke = now()
        cpu1, wait1 = read()
        writers = (writers_cpu() - writers0) / 1e9
        lag.append((woke, woke - due, (cpu1 - cpu0) / 1e9, (wait1 - wait0) / 1e9, writers))


def patch(off: set[str], lag_interval: float) -> None:
    import eyewall.app as app
    import eyewall.observe.store as store
    from eyewall.observe.accesslog import AccessLog
    from eyewall.observe.live import LiveFeed
    from eyewall.observe.store import FlowStore
    from eyewall.observe.writer import BatchWriter
    from eyewall.proxy.timeouts import Watchdog

    original_run_loop, original_serve = app.run_loop, app.serve

    def run_loop(main: Any, choice: str) -> None:
        apply_gc_choice(os.environ.get("EYEWALL_PROBE_GC", ""))  # after eyewall's own
        switch = os.environ.get("EYEWALL_PROBE_SWITCH")
        if switch:
            sys.setswitchinterval(float(switch))
        RECORDED["settings"].update(
            gc_threshold=gc.get_threshold(),
            gc_enabled=gc.isenabled(),
            gc_frozen=gc.get_freeze_count(),
            switch_interval=sys.getswitchinterval(),
            off=sorted(off),
            lag_interval=lag_interval,
        )
        original_run_loop(main, choice)

    async def serve(*args: Any) -> None:
        import asyncio

        task = asyncio.ensure_future(sample_lag(lag_interval)) if lag_interval > 0 else None
        try:
            await original_serve(*args)
        finally:
            if task is not None:
                task.cancel()

    app.run_loop, app.serve = run_loop, serve  # type: ignore[assignment]

    Watchdog.sweep = timed("watchdog_sweep", Watchdog.sweep)  # type: ignore[method-assign]
    if "watchdog" in off:
        Watchdog.start = lambda self: None  # type: ignore[method-assign]
    LiveFeed.tick = timed("live_tick", LiveFeed.tick)  # type: ignore[method-assign]
    if "live" in off:
        live_init = LiveFeed.__init__

        def init_without_tick(self: LiveFeed, *args: Any) -> None:
            live_init(self, *args)
            self._timer.stop()

        LiveFeed.__init__ = init_without_tick  # type: ignore[method-assign]

    flush = os.environ.get("EYEWALL_PROBE_FLOWS_FLUSH")
    if flush:
        store.FLUSH_INTERVAL = float(flush)
    AccessLog.flush = timed("access_flush", AccessLog.flush)  # type: ignore[method-assign]
    FlowStore.flush = timed("flows_flush", FlowStore.flush)  # type: ignore[method-assign]
    original_thread_run = BatchWriter._run

    def run_tracked(self: BatchWriter) -> None:
        self._queue = TrackedQueue(self._queue, "writer")  # type: ignore[assignment]
        original_thread_run(self)

    BatchWriter._run = run_tracked  # type: ignore[method-assign]


def write_out(path: str) -> None:
    RECORDED["threads"] = [t.name for t in threading.enumerate()]
    with open(path, "w") as out:
        json.dump(RECORDED, out)


def main() -> int:
    out = os.environ.get("EYEWALL_PROBE_OUT")
    off = {name for name in os.environ.get("EYEWALL_PROBE_OFF", "").split(",") if name}
    lag_ms = float(os.environ.get("EYEWALL_PROBE_LAG_MS", "2"))
    install_gc_timer()
    patch(off, lag_ms / 1000)
    if out:
        atexit.register(write_out, out)
    from eyewall.cli import main as eyewall_main

    return eyewall_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
