"""The systems under test: how each proxy is configured, started and versioned.

Each proxy listens on 127.0.0.1, allows loopback clients, allows CONNECT to
any port, keeps no cache and writes no access log, except Eyewall, which runs
with the observability a user gets by default (JSON access log to a file,
admin listener with metrics, flows recorded to SQLite; all in the temp dir).
Configs are written to a per-start temp directory; the text is kept so the
report can show it. Scenario-specific variants live in system_variants.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from processes import ManagedProcess, child_environment, pinned

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
EYEWALL_CONFIG = BENCH_DIR / "eyewall-bench.toml"
EYEWALL_BASELINE = "eyewall-baseline"  # Eyewall from another checkout (--eyewall-baseline)
MAX_TUNNEL_CLIENTS = 6000
FD_LIMIT = 20000


def find_executable(name: str) -> str | None:
    """`shutil.which`, also looking in the sbin directories (squid, nginx)."""
    extra = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + extra)


def venv_tool(name: str) -> str | None:
    """A tool from the repo's .venv if present, else from PATH."""
    candidate = REPO_DIR / ".venv" / "bin" / name
    return str(candidate) if candidate.exists() else shutil.which(name)


def first_line_of(command: list[str], cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=30, env=child_environment(), cwd=cwd
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


@dataclass
class ProxySystem:
    """Base class: a proxy started from a generated config on a given port."""

    name: str
    executable: str | None
    config_text: str = field(default="", init=False)
    notes: list[str] = field(default_factory=list, init=False)
    last_command: list[str] = field(default_factory=list, init=False)
    # What a client needs besides the port: a Proxy-Authorization value, and the
    # CA of the certificates an intercepting proxy mints (set by command/start).
    proxy_authorization: str | None = field(default=None, init=False)
    proxy_ca: Path | None = field(default=None, init=False)
    cwd: Path = field(default=REPO_DIR, init=False)  # where the proxy is started

    def unavailable_reason(self) -> str | None:
        return None if self.executable else f"{self.name}: executable not found"

    def version(self) -> str:
        raise NotImplementedError

    def command(self, workdir: Path, port: int) -> list[str]:
        """Write any config into `workdir`, return the command line."""
        raise NotImplementedError

    def start(self, workdir: Path, port: int, cpu: int | None) -> ManagedProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        command = pinned(self.command(workdir, port), cpu)
        self.last_command = command
        process = ManagedProcess(
            self.name, command, workdir / f"{self.name}.stderr.log", cwd=self.cwd
        )
        try:
            process.wait_for_port(port)
        except Exception:
            process.stop()
            raise
        return process


class Eyewall(ProxySystem):
    """Eyewall from the repository, with the observability a user gets by
    default (`observability=False`: access log, flows and admin listener off).

    `checkout` is another Eyewall checkout with its own `.venv` (the
    `eyewall-baseline` systems): the same command line and config, run with
    that checkout's Python and from that directory, so `-m eyewall` imports
    its package, not this repository's."""

    def __init__(
        self, name: str = "eyewall", observability: bool = True, checkout: Path = REPO_DIR
    ) -> None:
        if checkout == REPO_DIR:
            python: str | None = venv_tool("python") or sys.executable
        else:
            candidate = checkout / ".venv" / "bin" / "python"
            python = str(candidate) if candidate.exists() else None
        super().__init__(name, python)
        self.observability = observability
        self.checkout = checkout
        self.cwd = checkout
        if name == EYEWALL_BASELINE:
            self.notes.append(
                f"{EYEWALL_BASELINE}: Eyewall from another checkout "
                "(`--eyewall-baseline $EYEWALL_BASELINE`) with its own .venv, started with "
                "exactly eyewall's command line and bench/eyewall-bench.toml, from that "
                "directory; the same rows in scenarios 1-6 and 8 (`eyewall-baseline-obs-off/on`)."
            )
        if name == "eyewall":
            self.notes.append(
                "eyewall: run with the defaults a user gets: JSON access log to a file "
                "(`--log-format` auto = json when not a terminal), admin listener with "
                "metrics on (`--admin-listen 127.0.0.1:0`, so runs do not collide on 9090) "
                "and flows recorded to SQLite (`--flows` a file in the temp dir); "
                "bench/eyewall-bench.toml only opens loopback destinations and CONNECT ports."
            )

    def unavailable_reason(self) -> str | None:
        if not (self.checkout / "eyewall").is_dir():
            return f"{self.name}: package directory eyewall/ not found in {self.checkout}"
        if self.executable is None:
            return f"{self.name}: {self.checkout}/.venv/bin/python not found"
        return None

    def version(self) -> str:
        python = self.executable or sys.executable
        eyewall = first_line_of([python, "-m", "eyewall", "--version"], cwd=self.checkout)
        tornado = first_line_of(
            [python, "-c", "import tornado; print(tornado.version)"], cwd=self.checkout
        )
        git = ["git", "-C", str(self.checkout), "describe", "--always", "--dirty"]
        return f"{eyewall} (tornado {tornado}; git {first_line_of(git)})"

    def eyewall_command(self, *args: str) -> list[str]:
        return [self.executable or sys.executable, "-m", "eyewall", *args]

    def config_file(self, workdir: Path) -> Path:
        """The config to start with (subclasses generate one in `workdir`)."""
        self.config_text = EYEWALL_CONFIG.read_text() if EYEWALL_CONFIG.exists() else ""
        return EYEWALL_CONFIG

    def extra_args(self, workdir: Path) -> list[str]:
        return []

    def observability_args(self, workdir: Path) -> list[str]:
        if not self.observability:
            return ["--access-log", "off", "--no-flows", "--admin-listen", "off"]
        return [
            "--access-log",
            str(workdir / "eyewall-access.log"),
            "--admin-listen",
            "127.0.0.1:0",
            "--flows",
            str(workdir / "eyewall-flows.sqlite3"),
        ]

    def command(self, workdir: Path, port: int) -> list[str]:
        config = self.config_file(workdir)
        return self.eyewall_command(
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
            *self.observability_args(workdir),
            *self.extra_args(workdir),
        )


class Tinyproxy(ProxySystem):
    def __init__(self) -> None:
        super().__init__("tinyproxy", find_executable("tinyproxy"))
        self.notes.append(
            "tinyproxy: closes the client connection after every response (no client-side "
            "keep-alive), so wrk reconnects and counts about one `read` error per request; "
            "its req/s are real completed responses."
        )

    def version(self) -> str:
        return first_line_of([self.executable or "tinyproxy", "-v"])

    def command(self, workdir: Path, port: int) -> list[str]:
        # No ConnectPort line: tinyproxy then allows CONNECT to every port.
        self.config_text = textwrap.dedent(f"""\
            Port {port}
            Listen 127.0.0.1
            Timeout 600
            MaxClients {MAX_TUNNEL_CLIENTS}
            Allow 127.0.0.1
            DisableViaHeader Yes
            LogLevel Critical
            LogFile "{workdir}/tinyproxy.log"
            PidFile "{workdir}/tinyproxy.pid"
            """)
        config = workdir / "tinyproxy.conf"
        config.write_text(self.config_text)
        return [self.executable or "tinyproxy", "-d", "-c", str(config)]


class ProxyPy(ProxySystem):
    def __init__(self) -> None:
        super().__init__("proxy.py", venv_tool("proxy"))
        self.notes.append(
            "proxy.py: --backlog raised 100 -> 1024 (the default drops SYNs at wrk -c500), "
            f"--open-file-limit {FD_LIMIT} (default 1024 cannot hold 5,000 tunnels) and "
            "--timeout 600 (the default 10 s idle timeout closes tunnels while the 5,000 are "
            "still being opened; tinyproxy gets Timeout 600 too)."
        )

    def version(self) -> str:
        return "proxy.py " + first_line_of([self.executable or "proxy", "--version"])

    def command(self, workdir: Path, port: int) -> list[str]:
        command = [
            self.executable or "proxy",
            "--hostname",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-acceptors",
            "1",
            "--log-level",
            "ERROR",
            "--backlog",
            "1024",
            "--open-file-limit",
            str(FD_LIMIT),
            "--timeout",
            "600",
            "--data-dir",
            str(workdir / "proxypy-data"),
        ]
        self.config_text = shlex.join(command[1:])
        return command


class Squid(ProxySystem):
    def __init__(self) -> None:
        super().__init__("squid", find_executable("squid"))
        self.notes.append(
            "squid: started with -N (no daemon, master process is the single worker), "
            "so RSS is one process; the tree is summed anyway."
        )

    def version(self) -> str:
        return first_line_of([self.executable or "squid", "-v"])

    def command(self, workdir: Path, port: int) -> list[str]:
        # Squid drops root privileges to its cache_effective_user, which must
        # be able to write its cache log into the temp dir.
        workdir.chmod(0o777)
        self.config_text = textwrap.dedent(f"""\
            http_port 127.0.0.1:{port}
            acl bench_clients src 127.0.0.1/32 ::1
            http_access allow bench_clients
            http_access deny all
            cache deny all
            cache_mem 8 MB
            access_log none
            cache_store_log none
            cache_log {workdir}/squid-cache.log
            pid_filename {workdir}/squid.pid
            coredump_dir {workdir}
            logfile_rotate 0
            pinger_enable off
            workers 1
            max_filedescriptors {FD_LIMIT}
            shutdown_lifetime 0 seconds
            via off
            forwarded_for delete
            """)
        config = workdir / "squid.conf"
        config.write_text(self.config_text)
        return [self.executable or "squid", "-N", "-f", str(config)]


class Mitmproxy(ProxySystem):
    def __init__(self, executable: str | None) -> None:
        super().__init__("mitmproxy", executable)
        self.notes.append(
            "mitmproxy: --ignore-hosts '.*' (CONNECT tunnels are passed through, not "
            "intercepted, as the other proxies do) and stream_large_bodies=1m (stream the "
            "100 MiB bodies instead of buffering them)."
        )

    def version(self) -> str:
        return first_line_of([self.executable or "mitmdump", "--version"])

    def command(self, workdir: Path, port: int) -> list[str]:
        command = [
            self.executable or "mitmdump",
            "--mode",
            "regular",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
            "--quiet",
            "--ignore-hosts",
            ".*",
            "--set",
            "stream_large_bodies=1m",
            "--set",
            f"confdir={workdir / 'mitmproxy-conf'}",
        ]
        self.config_text = shlex.join(command[1:])
        return command


PEER_NAMES = ("eyewall", "tinyproxy", "proxypy", "squid", "mitmproxy")


def make_systems(
    names: list[str], mitmdump: str | None, eyewall_baseline: Path | None = None
) -> list[ProxySystem]:
    """Build the requested proxies, in the requested order; with a baseline
    checkout, `eyewall-baseline` right after `eyewall` (or first)."""
    factories = {
        "eyewall": Eyewall,
        "tinyproxy": Tinyproxy,
        "proxypy": ProxyPy,
        "squid": Squid,
        "mitmproxy": lambda: Mitmproxy(mitmdump),
    }
    systems = [factories[name]() for name in names]
    if eyewall_baseline is not None:
        at = names.index("eyewall") + 1 if "eyewall" in names else 0
        systems.insert(at, Eyewall(EYEWALL_BASELINE, checkout=eyewall_baseline))
    return systems


def nginx_executable() -> str | None:
    return find_executable("nginx")
