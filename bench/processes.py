"""Starting, pinning, probing and stopping the processes the benchmark owns.

Every process is started in its own session (so its process-group id is its
own PID) and remembered in a registry; `stop_all` (also run from atexit and
on SIGTERM/SIGINT) terminates exactly those process groups and nothing else.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

_RUNNING: list[ManagedProcess] = []
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def child_environment() -> dict[str, str]:
    """The environment for children: no proxy variables leak into curl & co."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy") and key.lower() != "no_proxy"
    }


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """Prefix `command` with ``taskset -c CPU`` when pinning is possible (None: not
    pinned, it runs on the CPUs the harness may use)."""
    taskset = shutil.which("taskset")
    if cpu is None or taskset is None:
        return command
    return [taskset, "-c", str(cpu), *command]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ManagedProcess:
    """A child process (and its descendants) owned by the benchmark."""

    def __init__(
        self,
        name: str,
        command: list[str],
        log_path: Path,
        cwd: Path | None = None,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        with open(log_path, "ab") as log:  # the child keeps its own copy
            self.popen = subprocess.Popen(
                command,
                cwd=cwd,
                env=child_environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                start_new_session=True,
            )
        _RUNNING.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_port(self, port: int, timeout: float = 20.0) -> None:
        """Poll `port` with TCP connects until it accepts or we give up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with code {self.popen.returncode}: {self.log_tail()}"
                )
            if port_accepts(port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not accept on port {port} within {timeout:.0f}s")

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def process_tree(self) -> list[int]:
        """This PID plus all descendants (found by scanning /proc/*/stat)."""
        parents: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
        tree, pending = [], [self.pid]
        while pending:
            pid = pending.pop()
            tree.append(pid)
            pending.extend(parents.get(pid, []))
        return tree

    def rss_kib(self) -> tuple[int, int]:
        """(summed VmRSS in KiB over the process tree, number of processes)."""
        total, count = 0, 0
        for pid in self.process_tree():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    count += 1
        return total, count

    def stop(self, grace: float = 5.0) -> None:
        if self in _RUNNING:
            _RUNNING.remove(self)
        if self.alive():
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        # Descendants (squid kids, proxy.py acceptors) share the process group.
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        if self.popen.stdout:
            self.popen.stdout.close()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def stop_all() -> None:
    for process in reversed(list(_RUNNING)):
        process.stop(grace=2.0)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def install_cleanup_handlers() -> None:
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)


def run_command(
    command: list[str], timeout: float, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived tool (curl, wrk, ...) and capture its output."""
    return subprocess.run(
        command,
        env={**child_environment(), **(extra_env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
