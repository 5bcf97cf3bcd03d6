"""Running as a service: the systemd unit, the system user, the service configuration,
log rotation, and the proxy working under the unit's sandbox.

Without a service manager, each piece is checked with the tool that owns its format
(systemd-analyze, systemd-sysusers, logrotate) and the sandbox is rebuilt from the
same kernel features systemd uses: a mount namespace, setpriv(1) and libseccomp
(tests/sandbox.py).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest

from eyewall.config import load_settings
from tests.conftest import ROOT, ProxyProcess
from tests.origins import OriginServer
from tests.tools import require_tool, tools_required

PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "eyewall.service"
CONFIG = PACKAGING / "eyewall.toml"
LOGROTATE = PACKAGING / "logrotate" / "eyewall"
SYSUSERS = PACKAGING / "sysusers.d" / "eyewall.conf"
INSTALLED = "/usr/local/bin/eyewall"


def unit_options(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for each assignment, in order (keys may repeat)."""
    options, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        options.append((section, key.strip(), value.strip()))
    return options


def service_values(key: str) -> list[str]:
    return [v for s, k, v in unit_options(UNIT.read_text()) if s == "Service" and k == key]


def service_value(key: str) -> str:
    values = service_values(key)
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|ms)?", value)
    assert match, value
    number, unit = float(match[1]), match[2] or "s"
    return number * {"s": 1, "min": 60, "ms": 0.001}[unit]


# -- the unit ------------------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = require_tool("systemd-analyze", "systemd")
    eyewall = Path(sys.executable).with_name("eyewall")
    assert eyewall.exists(), "the test environment installs the eyewall console script"
    text = UNIT.read_text()
    assert INSTALLED in text
    # verify checks that the programs exist: point them at this environment's eyewall.
    (tmp_path / "eyewall.service").write_text(text.replace(INSTALLED, str(eyewall)))
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "eyewall.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stderr


def test_unit_is_a_notify_service_reloaded_by_sighup():
    assert service_value("Type") == "notify"
    reload = service_values("ExecReload")
    assert reload[-1] == "/bin/kill -HUP $MAINPID"
    assert service_value("Restart") == "on-failure"
    assert service_value("User") == "eyewall"
    assert int(service_value("LimitNOFILE")) >= 65536


def test_stop_signals_the_supervisor_only():
    # With workers, SIGTERM to every process would make each worker drain at once
    # and skip the grace; the supervisor tells them when (docs/scaling.md).
    assert service_value("KillMode") == "mixed"


def test_stop_timeout_outlasts_drain_grace_and_drain():
    settings = load_settings(CONFIG)
    # timeouts.drain_grace is being added with the SIGTERM health change; until it is,
    # its planned default stands in.
    grace = getattr(settings.timeouts, "drain_grace", 5.0)
    assert seconds(service_value("TimeoutStopSec")) > grace + settings.timeouts.drain


def test_service_config_paths_match_the_unit_directories():
    directories = {
        key: f"{root}/{service_value(key)}"
        for key, root in (
            ("ConfigurationDirectory", "/etc"),
            ("StateDirectory", "/var/lib"),
            ("LogsDirectory", "/var/log"),
            ("RuntimeDirectory", "/run"),
        )
    }
    start = service_value("ExecStart").split()
    assert start[0] == INSTALLED
    config_path = start[start.index("--config") + 1]
    assert config_path == f"{directories['ConfigurationDirectory']}/eyewall.toml"
    settings = load_settings(CONFIG)
    assert Path(settings.flows.path).parent == Path(directories["StateDirectory"])
    assert Path(settings.tls.ca_dir).parent == Path(directories["StateDirectory"])
    assert Path(settings.access_log).parent == Path(directories["LogsDirectory"])
    assert Path(settings.pid_file).parent == Path(directories["RuntimeDirectory"])
    assert str(settings.admin.listen) == "127.0.0.1:8480"
    pattern = LOGROTATE.read_text().split("{", 1)[0].split("\n")[-1].strip()
    assert Path(pattern).parent == Path(directories["LogsDirectory"])
    home = SYSUSERS.read_text().split('"')[-1].split()[0]
    assert home == directories["StateDirectory"]


def test_service_config_passes_check_config():
    result = subprocess.run(
        [sys.executable, "-m", "eyewall", "check-config", "--no-paths", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_sysusers_creates_the_service_user(tmp_path):
    sysusers = require_tool("systemd-sysusers", "systemd")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    entry = next(
        line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
        if line.startswith("eyewall:")
    )
    uid, home, shell = int(entry[2]), entry[5], entry[6]
    assert 0 < uid < 1000 and home == "/var/lib/eyewall" and shell.endswith("nologin")
    groups = (tmp_path / "etc/group").read_text().splitlines()
    assert any(line.startswith("eyewall:") for line in groups)


# -- log rotation ----------------------------------------------------------------------------


def logrotate_config(tmp_path: Path, postrotate: str | None = None) -> Path:
    """The shipped snippet for a log directory in ``tmp_path`` and the current user (the
    eyewall user does not exist here; test_sysusers covers it)."""
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True, check=True).stdout
    text = LOGROTATE.read_text()
    assert text.count("eyewall eyewall") == 2 and "/var/log/eyewall/" in text
    text = text.replace("eyewall eyewall", f"{user.strip()} {group.strip()}")
    text = text.replace("/var/log/eyewall/", f"{tmp_path / 'logs'}/")
    if postrotate is not None:
        text = re.sub(
            r"postrotate\n.*?endscript",
            f"postrotate\n{postrotate}\nendscript",
            text,
            flags=re.DOTALL,
        )
    (tmp_path / "logs").mkdir(exist_ok=True)
    path = tmp_path / "logrotate.conf"
    path.write_text(text)
    return path


def test_logrotate_accepts_the_snippet(tmp_path):
    logrotate = require_tool("logrotate", "logrotate")
    config = logrotate_config(tmp_path)
    (tmp_path / "logs" / "access.log").write_text('{"status": 200}\n')
    result = subprocess.run(
        [logrotate, "-d", "-f", "-s", str(tmp_path / "state"), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error" not in output.lower(), output
    assert f"rotating log {tmp_path / 'logs' / 'access.log'}" in output
    assert "running postrotate script" in output


def test_rotation_and_sigusr1_move_the_access_log_without_losing_lines(tmp_path, origin):
    logrotate = require_tool("logrotate", "logrotate")
    (tmp_path / "logs").mkdir()
    proxy = ProxyProcess(
        tmp_path / "proxy", "--allow-private", "--access-log", str(tmp_path / "logs" / "access.log")
    )
    try:
        # The signal goes to the main PID, as `systemctl kill --kill-whom=main` sends it.
        config = logrotate_config(tmp_path, f"    kill -USR1 {proxy.pid}")
        log = tmp_path / "logs" / "access.log"
        with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as client:
            assert client.get(f"{origin.url}/echo/before").status_code == 200
            wait_for_text(log, "/before")
            result = subprocess.run(
                [logrotate, "-f", "-s", str(tmp_path / "state"), str(config)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            assert client.get(f"{origin.url}/echo/after").status_code == 200
            wait_for_text(log, "/after")
        rotated = (tmp_path / "logs" / "access.log.1").read_text()
        assert "/before" in rotated and "/after" not in rotated
        assert "/before" not in log.read_text()
        assert oct(log.stat().st_mode & 0o777) == "0o640"
    finally:
        proxy.stop()
    proxy.check_clean()


def wait_for_text(path: Path, needle: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and needle in path.read_text()):
        assert time.monotonic() < deadline, f"{needle!r} never reached {path}"
        time.sleep(0.02)


# -- the sandbox -----------------------------------------------------------------------------

SANDBOX = r"""
set -eu
# The unit's directories, bound from the test's directory to /srv/... (config read-only).
mount -t tmpfs -o mode=0755 tmpfs /srv
for d in config state logs runtime; do
    mkdir /srv/$d && mount --bind "$T/$d" /srv/$d
done
cp "$CA_BUNDLE" /srv/config/origin-ca.pem
# ProtectHome=yes. A Python interpreter installed in a home directory (pyenv, say) is
# mounted back, read-only like the rest.
mkdir /srv/python
case "$PY_PREFIX" in /root/*|/home/*) mount --bind "$PY_PREFIX" /srv/python ;; esac
for d in /home /root /run/user; do
    if [ -d $d ]; then mount -t tmpfs -o mode=0755 tmpfs $d; fi
done
case "$PY_PREFIX" in
    /root/*|/home/*) mkdir -p "$PY_PREFIX" && mount --bind /srv/python "$PY_PREFIX" ;;
esac
# PrivateTmp=yes. A checkout or venv under /tmp (a clone in mktemp -d) is mounted back:
# an installed unit's code lives under /opt or /usr, never in its private /tmp.
i=0
for k in $KEEP_TMP; do
    mkdir /srv/keep$i && mount --bind "$k" /srv/keep$i && i=$((i + 1))
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
i=0
for k in $KEEP_TMP; do
    mkdir -p "$k" && mount --bind /srv/keep$i "$k" && i=$((i + 1))
done
# PrivateDevices=yes: pseudo devices only
mkdir /srv/dev && mount --rbind /dev /srv/dev
mount -t tmpfs -o mode=0755,nosuid,noexec tmpfs /dev
for n in null zero full random urandom tty; do
    touch /dev/$n && mount --bind /srv/dev/$n /dev/$n
done
mkdir /dev/shm /dev/pts && mount -t tmpfs -o mode=1777 tmpfs /dev/shm
umount -l /srv/dev
# ProtectProc=invisible (with hidepid, other users' processes are not shown)
mount -t proc -o hidepid=invisible,nosuid,nodev,noexec proc /proc
# ProtectSystem=strict, ProtectKernelTunables, ProtectControlGroups: read-only, except
# the unit's writable directories and the private /tmp.
findmnt -rn -o TARGET | while read -r m; do
    case "$m" in
        /proc|/dev|/dev/*|/tmp|/var/tmp|/srv/state|/srv/logs|/srv/runtime) continue ;;
    esac
    mount -o remount,bind,ro "$m" 2>/dev/null || true
done
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
# LimitNOFILE= (at most the hard limit this test runs under), UMask=
ulimit -n "$NOFILE" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
umask "$UMASK"

confined() {
    setpriv --reuid=nobody --regid=nogroup --clear-groups --no-new-privs \
        --bounding-set=-all --inh-caps=-all -- \
        env -i HOME=/nonexistent LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin \
            NOTIFY_SOCKET="$NOTIFY_SOCKET" \
        "$PY" "$SANDBOX_PY" $SECCOMP -- "$@"
}
# Controls: the restrictions are in force (these must fail).
confined "$PY" -c '
import errno, mmap, socket
def attempt(what, action):
    try:
        action()
        print(what + ":allowed")
    except OSError as e:
        print(what + ":" + errno.errorcode[e.errno])
attempt("mmap-wx", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
attempt("config-write", lambda: open("/srv/config/written", "w"))
attempt("other-process", lambda: open("/proc/1/status", "rb"))
' > /srv/runtime/controls
# `eyewall ca init` as the operator runs it, then the service itself.
confined "$PY" -m eyewall ca init --ca-dir /srv/state/ca > /dev/null
exec setpriv --reuid=nobody --regid=nogroup --clear-groups --no-new-privs \
    --bounding-set=-all --inh-caps=-all -- \
    env -i HOME=/nonexistent LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin \
        NOTIFY_SOCKET="$NOTIFY_SOCKET" \
    "$PY" "$SANDBOX_PY" $SECCOMP -- "$PY" -m eyewall "$@"
"""


# The unit's directories, as the sandbox shows them.
MOVED = {
    "/etc/eyewall": "/srv/config",
    "/var/lib/eyewall": "/srv/state",
    "/var/log/eyewall": "/srv/logs",
    "/run/eyewall": "/srv/runtime",
}


def syscall_set(analyze: str, names: list[str]) -> set[str]:
    """System call names in systemd's groups (@name) and plain names, expanded."""
    out: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            out.add(name)
            continue
        listing = subprocess.run(
            [analyze, "syscall-filter", name], capture_output=True, text=True, check=True
        ).stdout
        members = [
            line.strip()
            for line in listing.splitlines()[1:]
            if line.strip() and not line.strip().startswith("#")
        ]
        out |= syscall_set(analyze, members)
    return out


def seccomp_arguments(analyze: str) -> list[str]:
    """tests/sandbox.py arguments for the unit's seccomp-based options."""
    allow: list[str] = []
    deny: list[str] = []
    for value in service_values("SystemCallFilter"):
        if value.startswith("~"):
            deny += value[1:].split()
        else:
            allow += value.split()
    assert service_value("SystemCallErrorNumber") == "EPERM"
    families = service_value("RestrictAddressFamilies").split()
    expected = {
        "MemoryDenyWriteExecute",
        "RestrictNamespaces",
        "LockPersonality",
        "RestrictSUIDSGID",
    }
    for key in expected:
        assert service_value(key) == "yes", key
    return [
        "--allow",
        *sorted(syscall_set(analyze, allow)),
        "--deny",
        *sorted(syscall_set(analyze, deny)),
        "--families",
        ",".join(families),
        "--mdwe",
        "--namespaces",
        "--personality",
        "--suid",
    ]


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"eyewall-sandbox-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    yield sock, "@" + name
    sock.close()


def next_message(
    sock: socket.socket, wanted: str, process: subprocess.Popen[bytes], log: Path
) -> dict[str, str]:
    """The next notification setting ``wanted``; fails at once if the process exits."""
    deadline = time.monotonic() + 30
    sock.settimeout(0.25)
    while True:
        try:
            datagram = sock.recv(4096)
        except TimeoutError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {wanted}=; the log:\n{log.read_text()}") from None
            continue
        fields = dict(line.split("=", 1) for line in datagram.decode().split("\n"))
        if wanted in fields:
            return fields


def sandbox_available() -> None:
    for tool, package in (
        ("unshare", "util-linux"),
        ("setpriv", "util-linux"),
        ("findmnt", "util-linux"),
    ):
        require_tool(tool, package)
    reason = ""
    if os.geteuid() != 0:
        reason = "needs root (mount namespace, setpriv to another user)"
    else:
        probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            reason = f"cannot create a mount namespace: {probe.stderr.decode().strip()}"
    if reason:
        if tools_required():
            pytest.fail(f"sandbox test {reason}, and EYEWALL_REQUIRE_TOOLS is set")
        pytest.skip(reason)
    private = [d for d in _up_to_root() if not os.stat(d).st_mode & stat.S_IXOTH]
    if private:
        # Where the checkout is, not a missing tool: the unit's user must reach the code,
        # as it would under /opt or /usr; a checkout in a 0700 directory cannot be run so.
        pytest.skip(f"{private[0]} is private (mode 0700?): the unit's user cannot run the code")


def _up_to_root() -> list[str]:
    """Every directory from / down to the checkout and to the venv."""
    dirs: list[str] = []
    for leaf in (str(ROOT.resolve()), os.path.realpath(sys.prefix)):
        path = leaf
        while True:
            dirs.append(path)
            if path == "/":
                break
            path = os.path.dirname(path)
    return list(dict.fromkeys(dirs))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_proxy_works_under_the_units_sandbox(tmp_path, notify_socket, ca_file, tls_origin, workers):
    """ExecStart in the unit's sandbox as an unprivileged user: ca init, plain HTTP with
    Basic auth, a spliced CONNECT tunnel, an intercepted HTTPS request (cryptography,
    uvloop, bcrypt, sqlite all loaded), metrics with process_* values, SIGHUP reload,
    SIGUSR1 reopen, SIGTERM; one process, and a supervisor with two workers (shared
    memory, pidfd, flock and the socket pairs under the system call filter)."""
    sandbox_available()
    analyze = require_tool("systemd-analyze", "systemd")
    sock, notify_address = notify_socket
    for d in ("config", "state", "logs", "runtime"):
        (tmp_path / d).mkdir()
        shutil.chown(tmp_path / d, "nobody", "nogroup")
        (tmp_path / d).chmod(0o755)
    tmp_path.chmod(0o755)
    config = CONFIG.read_text()
    for old, new in MOVED.items():
        config = config.replace(old, new)
    assert "/eyewall" not in config.replace("/eyewall.", "")  # every path was moved
    config += '\n[[rules]]\nid = "inspect"\naction = "intercept"\nhosts = ["localhost"]\n'
    (tmp_path / "config" / "eyewall.toml").write_text(config)
    password = "correct horse"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "config" / "htpasswd").write_text(f"alice:{hashed}\n")

    plain = OriginServer()
    stderr_path = tmp_path / "stderr.log"
    env = {
        **os.environ,
        "T": str(tmp_path),
        "PY": sys.executable,
        "PY_PREFIX": os.path.realpath(sys.base_prefix),
        "KEEP_TMP": " ".join(
            p
            for p in dict.fromkeys((os.path.realpath(sys.prefix), str(ROOT.resolve())))
            if p.startswith(("/tmp/", "/var/tmp/"))
        ),
        "SANDBOX_PY": str(ROOT / "tests" / "sandbox.py"),
        "SECCOMP": " ".join(seccomp_arguments(analyze)),
        "NOTIFY_SOCKET": notify_address,
        "NOFILE": service_value("LimitNOFILE"),
        "UMASK": service_value("UMask"),
        "CA_BUNDLE": ca_file,
    }
    cmd = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "bash",
        "-c",
        SANDBOX,
        "sandbox",
        "--config",
        "/srv/config/eyewall.toml",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--allow-private",
        "--connect-port",
        "1-65535",
        "--htpasswd",
        "/srv/config/htpasswd",
        "--upstream-ca-bundle",
        "/srv/config/origin-ca.pem",
        "--workers",
        workers,
    ]
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(cmd, stderr=stderr, env=env, cwd=ROOT)
    try:
        ready = next_message(sock, "READY", process, stderr_path)
        port = int(ready["STATUS"].rsplit(":", 1)[1])
        controls = (tmp_path / "runtime" / "controls").read_text().split()
        # MemoryDenyWriteExecute, RestrictAddressFamilies, ProtectSystem (the directory
        # belongs to the sandbox user: only the read-only mount stops the write), and
        # ProtectProc=invisible (other users' processes are not even listed).
        assert controls == [
            "mmap-wx:EPERM",
            "netlink:EAFNOSUPPORT",
            "config-write:EROFS",
            "other-process:ENOENT",
        ]
        status = Path(f"/proc/{process.pid}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s", status, re.M), status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        assert re.search(r"^Seccomp:\s+2$", status, re.M)
        assert re.search(r"^CapBnd:\s+0+$", status, re.M)

        admin = next(
            line.split(" on ", 1)[1]
            for line in stderr_path.read_text().splitlines()
            if line.startswith("eyewall admin on ")
        )
        proxy_url = f"http://alice:{password.replace(' ', '%20')}@127.0.0.1:{port}"
        eyewall_ca = str(tmp_path / "state" / "ca" / "ca.pem")
        with httpx.Client(proxy=proxy_url, trust_env=False, timeout=10) as c:
            assert c.get(f"{plain.url}/echo/plain").status_code == 200
        tunnel = subprocess.run(
            [
                "curl",
                "-fsS",
                "--max-time",
                "10",
                "--cacert",
                ca_file,
                "-x",
                proxy_url,
                f"https://127.0.0.1:{tls_origin.port}/echo/tunnelled",
            ],
            capture_output=True,
            check=False,
        )
        assert tunnel.returncode == 0, tunnel.stderr
        # Requests decrypted from an intercepted tunnel are admitted again, credentials
        # included, and curl sends them only on the CONNECT: repeat them inside.
        basic = base64.b64encode(f"alice:{password}".encode()).decode()
        intercepted = subprocess.run(
            [
                "curl",
                "-fsS",
                "--max-time",
                "10",
                "--cacert",
                eyewall_ca,
                "-H",
                f"Proxy-Authorization: Basic {basic}",
                "-x",
                proxy_url,
                f"https://localhost:{tls_origin.port}/echo/intercepted",
            ],
            capture_output=True,
            check=False,
        )
        assert intercepted.returncode == 0, intercepted.stderr
        log = tmp_path / "logs" / "access.log"
        wait_for_text(log, "/intercepted")
        assert '"CONNECT"' in log.read_text()
        assert oct(log.stat().st_mode & 0o777) == "0o640"  # UMask=0027
        assert (tmp_path / "state" / "flows.sqlite3").exists()

        with httpx.Client(trust_env=False, timeout=10) as c:
            assert c.get(f"{admin}/healthz").status_code == 200
            metrics = c.get(f"{admin}/metrics").text
        assert "process_cpu_seconds_total" in metrics  # /proc/stat is readable
        assert 'eyewall_requests_total{method="CONNECT"' in metrics

        process.send_signal(signal.SIGHUP)
        next_message(sock, "RELOADING", process, stderr_path)
        next_message(sock, "READY", process, stderr_path)
        log.rename(tmp_path / "logs" / "access.log.1")
        process.send_signal(signal.SIGUSR1)
        # SIGUSR1 is handled on the event loop and the writer thread reopens: keep
        # sending requests until one of them lands in the new file.
        deadline = time.monotonic() + 10
        with httpx.Client(proxy=proxy_url, trust_env=False, timeout=10) as c:
            while not (log.exists() and "/reopened" in log.read_text()):
                assert time.monotonic() < deadline, "the access log was not reopened"
                assert c.get(f"{plain.url}/echo/reopened").status_code == 200

        process.send_signal(signal.SIGTERM)
        next_message(sock, "STOPPING", process, stderr_path)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        plain.stop()
    text = stderr_path.read_text()
    assert "Traceback" not in text and " ERROR " not in text, text
    assert "configuration reloaded" in text, textwrap.shorten(text, 3000)
