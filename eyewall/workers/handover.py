"""Zero-downtime restart: the running generation starts its successor beside it, hands
it the listening sockets, and drains once the successor serves.

``eyewall restart`` (or SIGUSR2) makes the running proxy — a single process or a
supervisor — start ``python -m eyewall`` again with its own arguments: whatever code is
installed now, so this is how an upgrade goes live.  The successor inherits

* the listening sockets, the very ones (not new sockets with ``SO_REUSEPORT``): the
  kernel's accept queue is the socket's, so connections queued while the old
  generation stops accepting are accepted by the new one.  Closing one of several
  ``SO_REUSEPORT`` sockets resets the connections queued on it instead
  (tests/workers/test_sockets.py shows both);
* the admin listener's sockets, likewise (as the ``admin.listen`` setting's);
* the shared limits segment (a supervisor's), so rate limits, counts and the login
  throttle carry over;
* a pipe on which it writes ``ready`` once it serves.

The descriptors are named in the ``EYEWALL_HANDOVER`` environment variable (JSON).  The
successor binds what its configuration adds and ignores what it dropped.  When it is
ready it writes the pid file and writes to the pipe; the old generation tells the
service manager ``MAINPID=`` the successor (systemd follows the new main process) and
drains with no grace (the listeners stay
open in the successor) and exits.  If the successor exits or is not ready within
`READY_TIMEOUT`, the old generation logs why and keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from eyewall.config import Settings
from eyewall.sdnotify import notify
from eyewall.workers.spawn import child_process

__all__ = [
    "ENV",
    "READY_TIMEOUT",
    "Inherited",
    "Restart",
    "Successor",
    "hand_over",
    "listener_keys",
    "owns_pid_file",
    "private",
]

log = logging.getLogger("eyewall")

ENV = "EYEWALL_HANDOVER"
READY_TIMEOUT = 60.0  # seconds a successor has to start serving

Bound = dict[tuple[str, str], list[socket.socket]]  # (setting, endpoint text) -> sockets


@dataclass
class Inherited:
    """What a successor received from the generation before it."""

    listeners: Bound = field(default_factory=dict)  # the admin listener's too
    limits_fd: int | None = None
    ready_fd: int | None = None
    predecessor: int = 0

    @classmethod
    def from_environment(cls) -> Inherited | None:
        """The inherited descriptors, or None when this process was started normally.
        Removes the variable, so that no child of this process sees it.  Raises
        ValueError for a malformed variable."""
        text = os.environ.pop(ENV, None)
        if not text:
            return None
        try:
            data = json.loads(text)
            listeners = {
                (setting, endpoint): [socket.socket(fileno=private(int(fd))) for fd in fds]
                for setting, endpoint, fds in data["listeners"]
            }
            limits = data.get("limits")
            return cls(
                listeners,
                private(int(limits)) if limits is not None else None,
                private(int(data["ready"])),
                int(data["from"]),
            )
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ValueError(f"{ENV}: {e}") from None

    def take(self, wanted: list[tuple[str, str]]) -> Bound:
        """The inherited sockets for ``wanted`` (setting, endpoint) pairs; the others
        are closed here (the old generation keeps its own copies until it stops)."""
        taken = {key: socks for key, socks in self.listeners.items() if key in wanted}
        for key, socks in self.listeners.items():
            if key not in taken:
                for sock in socks:
                    sock.close()
        self.listeners = {}
        return taken

    def announce_ready(self) -> None:
        """Tell the generation before that this one serves (it then drains)."""
        if self.ready_fd is None:
            return
        log.info("restart: this generation serves; pid %d drains", self.predecessor)
        try:
            os.write(self.ready_fd, b"ready\n")
        except OSError:
            pass  # it is gone already
        finally:
            os.close(self.ready_fd)
            self.ready_fd = None


def private(fd: int) -> int:
    """``fd``, no longer inherited by this process's children: a descriptor passed to it
    (a listener, a pipe) must not outlive it in a program an addon starts — a listener
    held by a stray child keeps the port from the next start.  Raises OSError."""
    os.set_inheritable(fd, False)
    return fd


class Successor:
    """A new generation started by this one (`start`), until `ready` says whether it
    serves."""

    def __init__(self, process: subprocess.Popen[bytes], ready_fd: int) -> None:
        self.process = process
        self.ready_fd = ready_fd

    @classmethod
    def start(
        cls,
        listeners: Mapping[tuple[str, str], list[socket.socket]],
        limits_fd: int | None,
    ) -> Successor:
        """Start ``python -m eyewall`` with this process's arguments and the
        descriptors inherited: ``listeners`` by (setting, endpoint text), the admin
        listener's as ("admin.listen", its setting); ``limits_fd``, a supervisor's
        shared limits.  Raises OSError."""
        read, write = os.pipe2(os.O_CLOEXEC)
        fds = [write, *(s.fileno() for socks in listeners.values() for s in socks)]
        if limits_fd is not None:
            fds.append(limits_fd)
        description = {
            "listeners": [
                [setting, endpoint, [s.fileno() for s in socks]]
                for (setting, endpoint), socks in listeners.items()
            ],
            "limits": limits_fd,
            "ready": write,
            "from": os.getpid(),
        }
        env = dict(os.environ, **{ENV: json.dumps(description)})
        argv, env = child_process("eyewall", sys.argv[1:], env)
        try:
            process = subprocess.Popen(argv, pass_fds=fds, env=env)
        except OSError:
            os.close(read)
            raise
        finally:
            os.close(write)
        return cls(process, read)

    async def ready(self, timeout: float = READY_TIMEOUT) -> bool:
        """Whether the successor said it serves within ``timeout`` seconds; if not, it
        is stopped (SIGTERM, then SIGKILL) and the reason logged."""
        loop = asyncio.get_running_loop()
        said: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(self.ready_fd, 64)
            except OSError:
                data = b""
            if not said.done():
                said.set_result(data)

        loop.add_reader(self.ready_fd, readable)
        try:
            async with asyncio.timeout(timeout):
                answer = await said
        except TimeoutError:
            answer = None
        finally:
            loop.remove_reader(self.ready_fd)
            os.close(self.ready_fd)
        if answer and answer.startswith(b"ready"):
            return True
        process = self.process
        if answer is None:
            log.error("restart: the new generation (pid %d) did not start in time", process.pid)
        else:
            code = await loop.run_in_executor(None, _wait, process, 10.0)
            log.error(
                "restart: the new generation (pid %d) exited (status %s) before serving",
                process.pid,
                code,
            )
        await loop.run_in_executor(None, _stop, process)
        return False


def _wait(process: subprocess.Popen[bytes], seconds: float) -> int | None:
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        if _wait(process, 10.0) is None:
            process.kill()
            process.wait()


def listener_keys(settings: Settings) -> list[tuple[str, str]]:
    """The (setting, endpoint text) of every listener ``settings`` asks for, the admin
    listener's included: what a successor takes over."""
    keys = [("listen", str(e)) for e in settings.listen]
    keys += [("tls.listen", str(e)) for e in settings.tls.listen]
    if settings.admin.listen != "off":
        keys.append(("admin.listen", settings.admin.listen))
    return keys


async def hand_over(listeners: Bound, limits_fd: int | None = None) -> bool:
    """Start a successor on ``listeners`` (and a supervisor's ``limits_fd``); True once
    it serves, when this generation should drain.  Failures are logged.

    The service manager is told the successor is the main process now (``MAINPID=``,
    accepted from the current main process without ``NotifyAccess=all``)."""
    log.info("restart: starting a new generation")
    try:
        successor = Successor.start(listeners, limits_fd)
    except OSError as e:
        log.error("restart: cannot start a new generation: %s", e)
        return False
    if not await successor.ready():
        return False
    notify(f"MAINPID={successor.process.pid}")
    return True


def owns_pid_file(path: str) -> bool:
    """Whether the pid file ``path`` names this process (after a restart it names the
    successor, and stays)."""
    try:
        with open(path) as f:
            return int(f.read().strip()) == os.getpid()
    except (OSError, ValueError):
        return False


class Restart:
    """Restarts on request (SIGUSR2), one at a time: ``listeners`` gives what the
    successor takes over, ``limits_fd`` a supervisor's segment; ``serving`` is called
    once the successor serves (this generation then drains), ``failed`` when it did not
    start (this generation keeps serving; the app rewrites its pid file, which tells
    ``eyewall restart`` at once)."""

    def __init__(
        self,
        listeners: Callable[[], Bound],
        serving: Callable[[], None],
        limits_fd: int | None = None,
        failed: Callable[[], None] | None = None,
    ) -> None:
        self.listeners = listeners
        self.serving = serving
        self.limits_fd = limits_fd
        self.failed = failed
        self.task: asyncio.Task[None] | None = None
        self.refused = False  # stopping: no more restarts

    def request(self) -> None:
        """Start a restart unless one runs or this generation is stopping (then it
        logs why not).  Returns at once; the restart goes on in a task."""
        if self.refused or self.task is not None:
            log.warning("restart: already restarting or stopping; ignored")
            return
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            if await hand_over(self.listeners(), self.limits_fd):
                if not self.refused:
                    self.refused = True
                    self.serving()
            elif self.failed is not None and not self.refused:
                self.failed()
        finally:
            self.task = None
