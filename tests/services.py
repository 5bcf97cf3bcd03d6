"""Real servers for the fleet tests: redis-server, PostgreSQL and HAProxy, each started
as an ordinary child process on loopback with a random free port, found ready by
polling a condition, and stopped by its PID.

The session fixtures (`redis_server`, `postgres_server`) start each server once; the
`haproxy` fixture starts one HAProxy per call with a generated configuration
(`haproxy_config`).  They are registered for the tests under tests/fleet/ by that
folder's conftest.

A missing binary skips the tests that need it, with the reason, unless the
environment sets ``EYEWALL_REQUIRE_TOOLS=1`` (CI does): then it fails them, so that
nothing is skipped without anyone noticing.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import io
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

REQUIRE_TOOLS = "EYEWALL_REQUIRE_TOOLS"
START_TIMEOUT = 30.0  # seconds; a guard against a hang, not a measure of speed
T = TypeVar("T")

# How long each server took to start, for the summary at the end of the run.
START_TIMES: dict[str, float] = {}


def missing_tool(tool: str, package: str) -> None:
    """Skip, or fail under EYEWALL_REQUIRE_TOOLS=1, because ``tool`` is not installed."""
    reason = f"{tool} is not installed (Debian package: {package})"
    if os.environ.get(REQUIRE_TOOLS) == "1":
        pytest.fail(f"{reason}; {REQUIRE_TOOLS}=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def find_tool(tool: str, package: str, directory: str | None = None) -> str:
    """The path of ``tool``: in ``directory`` if given, else on PATH."""
    found = shutil.which(tool, path=directory) if directory else shutil.which(tool)
    if found is None:
        missing_tool(tool, package)
    assert found is not None
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry on a clash)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    condition: Callable[[], T | None],
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> T:
    """Poll ``condition`` until it returns a true value, and return that value.

    Raises RuntimeError, with the tail of ``log``, if ``process`` exits first or the
    deadline passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: exited with {process.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout} s{_tail(log)}")
        time.sleep(0.005)


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``process`` by its PID, wait for it, kill it if it lingers."""
    if process.poll() is None:
        os.kill(process.pid, sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the test run dies without stopping us
    (Linux's PR_SET_PDEATHSIG).  The fixtures stop their servers by PID as usual; this
    only keeps a killed run from leaving servers behind."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def short_tempdir(prefix: str) -> Path:
    """A fresh directory with a short path: unix socket paths must fit in 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix))


# -- Redis ------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` and on ``unix_socket``, without persistence."""

    process: subprocess.Popen[bytes]
    directory: Path
    port: int
    unix_socket: Path
    started_in: float  # seconds from spawn to the first PONG

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_socket}?db=0"

    @classmethod
    def start(cls) -> RedisServer:
        binary = find_tool("redis-server", "redis-server")
        directory = short_tempdir("ew-redis-")
        for _ in range(5):
            port = free_port()
            log = directory / "redis.log"
            began = time.monotonic()
            options = {
                "port": str(port),
                "bind": "127.0.0.1",
                "unixsocket": str(directory / "redis.sock"),
                "unixsocketperm": "700",
                "save": "",  # no snapshots
                "appendonly": "no",
                "dir": str(directory),
                "logfile": str(log),
                "daemonize": "no",
            }
            process = subprocess.Popen(
                [binary, *(arg for k, v in options.items() for arg in (f"--{k}", v))],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
            try:
                wait_for(functools.partial(_redis_pong, port), "redis-server", process, log)
            except RuntimeError:
                stop_process(process)
                if "Address already in use" in _tail(log):
                    continue
                shutil.rmtree(directory, ignore_errors=True)
                raise
            return cls(process, directory, port, directory / "redis.sock", time.monotonic() - began)
        raise RuntimeError("redis-server: no free port after 5 tries")

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)


def _redis_pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# -- PostgreSQL ------------------------------------------------------------------------------


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster: ``postgres`` listening on 127.0.0.1:``port`` and on
    a unix socket in ``socket_dir``, durability off for speed (fsync, synchronous commit
    and full page writes).  Tests connect over TCP as ``user``/``password`` (password
    checked, SCRAM) to ``database``, which that role owns."""

    process: subprocess.Popen[bytes]
    directory: Path
    port: int
    socket_dir: Path
    started_in: float  # seconds from initdb to the database and role being created
    psql_binary: str
    user: str = "eyewall"
    password: str = "eyewall-test-password"
    database: str = "eyewall"
    superuser: str = "postgres"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @classmethod
    def start(cls) -> PostgresServer:
        bindir = _postgres_bindir()
        initdb = find_tool("initdb", "postgresql", bindir)
        postgres = find_tool("postgres", "postgresql", bindir)
        psql = find_tool("psql", "postgresql-client", bindir)
        began = time.monotonic()
        directory = short_tempdir("ew-pg-")
        as_user = _unprivileged_user()
        if as_user is not None:  # PostgreSQL refuses to run as root
            os.chown(directory, as_user.pw_uid, as_user.pw_gid)
        run_as = {}
        if as_user is not None:
            run_as = {"user": as_user.pw_uid, "group": as_user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "TZ": "UTC"}
        data, log = directory / "data", directory / "postgres.log"
        settings = [  # durability off: a throwaway cluster
            "listen_addresses=127.0.0.1",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=60",
            "shared_buffers=32MB",
            "logging_collector=off",
        ]
        options = [arg for setting in settings for arg in ("-c", setting)]
        initdb_flags = ["--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256"]
        subprocess.run(
            [
                initdb,
                "-D",
                str(data),
                "-U",
                cls.superuser,
                "-E",
                "UTF8",
                "--locale=C",
                *initdb_flags,
            ],
            cwd=directory,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
            **run_as,  # type: ignore[arg-type]
        )
        for _ in range(5):
            port = free_port()
            with open(log, "ab") as out:
                process = subprocess.Popen(
                    [postgres, "-D", str(data), "-p", str(port), "-k", str(directory), *options],
                    cwd=directory,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                    **run_as,  # type: ignore[arg-type]
                )
            try:
                wait_for(lambda: _postgres_ready(data), "postgres", process, log)
            except RuntimeError:
                stop_process(process, signal.SIGINT)
                if "already in use" in _tail(log):
                    continue
                shutil.rmtree(directory, ignore_errors=True)
                raise
            break
        else:
            raise RuntimeError("postgres: no free port after 5 tries")
        server = cls(process, directory, port, directory, 0.0, psql)
        server.psql(
            f"CREATE ROLE {server.user} LOGIN PASSWORD '{server.password}'",
            f"CREATE DATABASE {server.database} OWNER {server.user}",
        )
        server.started_in = time.monotonic() - began
        return server

    def psql(self, *statements: str, database: str = "postgres") -> str:
        """Run ``statements`` as the superuser over the unix socket, in ``database``;
        their output."""
        where = ["-h", str(self.socket_dir), "-p", str(self.port), "-U", self.superuser]
        where += ["-d", database]
        args = [self.psql_binary, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *where]
        for statement in statements:
            args += ["-c", statement]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout

    def stop(self) -> None:
        stop_process(self.process, signal.SIGINT)  # "fast" shutdown: ends client sessions
        shutil.rmtree(self.directory, ignore_errors=True)


def _postgres_bindir() -> str | None:
    """Where the server binaries are: Debian and Ubuntu keep them off PATH, in the
    directory that ``pg_config --bindir`` names."""
    if shutil.which("postgres"):
        return None
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as when we are root: ``postgres``, else ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a postgres nor a nobody account exists")


def _postgres_ready(data: Path) -> bool:
    # postmaster.pid's 8th line is the server's state; "ready" once it takes connections.
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready"


# -- HAProxy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One ``server`` line of the generated configuration."""

    name: str
    port: int
    host: str = "127.0.0.1"
    options: str = "send-proxy-v2 check inter 100ms fall 1 rise 1"


def haproxy_config(
    directory: Path,
    bind: str,
    backends: list[Backend],
    *,
    frontend_lines: tuple[str, ...] = (),
) -> str:
    """A TCP-mode configuration: one frontend on ``bind`` ("127.0.0.1:PORT" or
    "[::1]:PORT"), one round-robin backend of ``backends``, and an admin stats socket
    in ``directory``."""
    servers = "\n".join(f"    server {b.name} {b.host}:{b.port} {b.options}" for b in backends)
    frontend_extra = "".join(f"    {line}\n" for line in frontend_lines)
    return f"""\
global
    stats socket {directory}/stats.sock mode 600 level admin
    maxconn 512

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend fleet
    bind {bind}
{frontend_extra}    default_backend nodes

backend nodes
    balance roundrobin
{servers}
"""


@dataclass
class HAProxy:
    """``haproxy -db`` (foreground) on a generated configuration."""

    process: subprocess.Popen[bytes]
    directory: Path
    config: str
    started_in: float  # seconds from spawn to the stats socket answering
    log: Path = field(repr=False, default=Path())

    @property
    def frontend(self) -> tuple[str, int]:
        """(host, port) of the configuration's first ``bind`` line."""
        for line in self.config.splitlines():
            if line.strip().startswith("bind "):
                host, _, port = line.split()[1].rpartition(":")
                return host.strip("[]"), int(port)
        raise ValueError("no bind line")

    @classmethod
    def start(cls, make_config: Callable[[Path], str]) -> HAProxy:
        """Run HAProxy on ``make_config(directory)``.  ``make_config`` picks its ports
        (`free_port`); it is called again, for new ones, if a port was taken meanwhile."""
        binary = find_tool("haproxy", "haproxy")
        for _ in range(5):
            directory = short_tempdir("ew-haproxy-")
            config = make_config(directory)
            (directory / "haproxy.cfg").write_text(config)
            log = directory / "haproxy.log"
            check = subprocess.run(
                [binary, "-c", "-q", "-f", str(directory / "haproxy.cfg")],
                capture_output=True,
                text=True,
                check=False,
            )
            if check.returncode != 0:
                raise RuntimeError(f"haproxy rejects the configuration:\n{check.stderr}\n{config}")
            began = time.monotonic()
            with open(log, "ab") as out:
                process = subprocess.Popen(
                    [binary, "-db", "-f", str(directory / "haproxy.cfg")],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
            server = cls(process, directory, config, 0.0, log)
            try:
                wait_for(server._answers, "haproxy", process, log)
            except RuntimeError as exc:  # its message ends with the log's tail
                server.stop()
                if "cannot bind socket" in str(exc):
                    continue
                raise
            server.started_in = time.monotonic() - began
            return server
        raise RuntimeError("haproxy: no free port after 5 tries")

    def _answers(self) -> bool:
        try:
            return "Name: HAProxy" in self.command("show info")
        except OSError:
            return False

    def command(self, line: str) -> str:
        """One command on the admin stats socket, and its answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.directory / "stats.sock"))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_status(self, backend: str, server: str) -> str:
        """The health of ``backend/server`` as HAProxy's stats show it: "UP", "DOWN", ..."""
        text = self.command("show stat").lstrip("# ")
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] == backend and row["svname"] == server:
                return row["status"]
        raise KeyError(f"{backend}/{server}")

    def wait_status(self, backend: str, server: str, status: str) -> None:
        """Wait until health checks have brought ``backend/server`` to ``status``."""
        wait_for(
            lambda: self.server_status(backend, server).startswith(status),
            f"haproxy {backend}/{server} {status}",
            self.process,
            self.log,
        )

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests keep to their own keys."""
    server = RedisServer.start()
    START_TIMES["redis-server"] = server.started_in
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole run, with a database and a password role."""
    server = PostgresServer.start()
    START_TIMES["postgresql (initdb + start + role)"] = server.started_in
    yield server
    server.stop()


@pytest.fixture
def haproxy() -> Iterator[Callable[[Callable[[Path], str]], HAProxy]]:
    """Start HAProxy with ``make_config(directory)``; stopped when the test ends."""
    started: list[HAProxy] = []

    def start(make_config: Callable[[Path], str]) -> HAProxy:
        server = HAProxy.start(make_config)
        START_TIMES.setdefault("haproxy", server.started_in)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
