"""Starting the proxy: options, configuration files, their errors, and the docs table."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eyewall.config import ConfigError, Endpoint, load_settings, reference_table
from tests.conftest import ROOT, ProxyProcess, poll, read_response


def run_eyewall(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eyewall", *args],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--client-header-timeout", "-1"], "--client-header-timeout"),
        (["--max-connections", "0"], "--max-connections"),
        (["--max-header-size", "lots"], "--max-header-size"),
        (["--listen", "nonsense"], "--listen"),
        (["--listen", "example.com:80"], "--listen"),
        (["--log-level", "loud"], "--log-level"),
        (["--via", "two words"], "--via"),
    ],
)
def test_invalid_options_are_refused_naming_the_setting(args, named):
    result = run_eyewall(*args)
    assert result.returncode == 2
    assert named in result.stderr


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[timeouts]\nclient_header = "soon"\n', "timeouts.client_header"),
        ("[timeouts]\nclient_header = 0\n", "timeouts.client_header"),
        ("[limits]\nmax_header_size = true\n", "limits.max_header_size"),
        ("[limits]\nmax_headers = 10\n", "limits.max_headers"),
        ("speed = 11\n", "speed"),
        ('listen = ["127.0.0.1:99999"]\n', "listen"),
        ("timeouts = 3\n", "timeouts"),
        ("[timeouts\n", "bad.toml:1: invalid TOML"),
    ],
)
def test_invalid_config_files_are_refused_naming_the_setting(tmp_path, text, named):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_eyewall("--config", str(path))
    assert result.returncode == 2
    assert named in result.stderr
    check = run_eyewall("check-config", str(path))
    assert check.returncode == 1
    assert named in check.stderr


def test_config_file_values_and_flag_overrides(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(
        'listen = ["127.0.0.1:9000", "[::1]:9001"]\nvia = "edge"\n'
        "[timeouts]\nclient_header = 2.5\n[pool]\nidle_per_origin = 4\n"
    )
    settings = load_settings(path, {"timeouts.client_header": 7.0})
    assert settings.listen == (Endpoint("127.0.0.1", 9000), Endpoint("::1", 9001))
    assert settings.via == "edge"
    assert settings.timeouts.client_header == 7.0
    assert settings.pool.idle_per_origin == 4
    assert run_eyewall("check-config", str(path)).stdout.strip().endswith("ok")


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file"):
        load_settings(tmp_path / "absent.toml")


def test_readme_settings_table_is_generated_from_the_code():
    readme = (ROOT / "README.md").read_text()
    assert reference_table() in readme, "regenerate with: ./scripts/generate-docs"


def test_help_lists_every_setting():
    result = run_eyewall("--help")
    assert result.returncode == 0
    for flag in (
        "--listen",
        "--config",
        "--client-header-timeout",
        "--drain-timeout",
        "--max-connections",
        "--pool-idle-timeout",
        "--access-log",
    ):
        assert flag in result.stdout


def test_listens_on_ipv4_and_ipv6(tmp_path):
    p = ProxyProcess(tmp_path, "--listen", "[::1]:0")
    try:
        line = next(x for x in p.stderr().splitlines() if "listening on" in x)
        v6_port = int(line.rsplit(":", 1)[1])
        assert "[::1]:" in line
        with socket.create_connection(("::1", v6_port), timeout=5) as s:
            s.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(s).startswith(b"HTTP/1.1 400")
    finally:
        p.stop()
    p.check_clean()


def test_listen_failure_is_reported(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run_eyewall("--listen", f"127.0.0.1:{port}")
    assert result.returncode != 0
    assert "cannot listen" in result.stderr


def test_max_connections_answers_503(make_proxy):
    p = make_proxy("--max-connections", "2")
    held = [socket.create_connection(p.address) for _ in range(2)]
    for s in held:
        s.sendall(b"GET http://a/ HTTP/1.1\r\n")  # a request begun, never finished
    poll(
        lambda: p.metrics()["eyewall_client_connections"] >= 2,
        what="the proxy to hold both connections",
    )
    try:
        with socket.create_connection(p.address, timeout=5) as s:
            s.sendall(b"GET http://a/ HTTP/1.1\r\n\r\n")
            data = read_response(s)
        assert data.startswith(b"HTTP/1.1 503")
        assert b"too many connections" in data
    finally:
        for s in held:
            s.close()


def test_readme_names_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test" in readme and "./scripts/test" in ci
    assert Path(ROOT / "scripts" / "test").exists()


def test_the_example_configuration_is_valid():
    settings = load_settings(ROOT / "examples" / "eyewall.toml")
    assert [r["id"] for r in settings.rules][:2] == ["no-metadata", "internal-wiki"]
    assert settings.access.allow_clients  # required: it listens beyond loopback


def test_output_into_a_closed_pipe_ends_quietly():
    """`eyewall explain ... | head -c 1` style: the reader is gone before the command
    writes; it exits 1 without a traceback (BrokenPipeError)."""
    read, write = socket.socketpair()
    read.close()  # the reader left
    with write:
        done = subprocess.run(
            [sys.executable, "-m", "eyewall", "explain", "http://127.0.0.1:9/"],
            stdout=write.fileno(),
            stderr=subprocess.PIPE,
            text=True,
            timeout=20,
            cwd=ROOT,
            check=False,
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


@pytest.fixture
def pem_files(ca, tmp_path: Path) -> dict[str, str]:
    """A listener certificate and its key, another key, and a file that is not PEM."""
    from cryptography.hazmat.primitives import serialization

    leaf = ca.issue_cert("proxy.test")
    other = ca.issue_cert("other.test")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    files = {
        "cert": leaf.cert_chain_pems[0].bytes(),
        "key": leaf.private_key_pem.bytes(),
        "encrypted-key": encrypted,
        "other-key": other.private_key_pem.bytes(),
        "junk": b"not a certificate\n",
    }
    paths = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(data)
        path.chmod(0o600)
        paths[name] = str(path)
    return paths


@pytest.mark.parametrize(
    ("cert", "key", "said"),
    [
        ("junk", "key", "tls.certificate: {junk} holds no PEM certificate"),
        ("key", "key", "tls.certificate: {key} holds no PEM certificate"),
        ("cert", "junk", "tls.key: {junk} holds no PEM private key"),
        ("cert", "other-key", "tls.key: {other-key} is not the private key of tls.certificate"),
        ("cert", "encrypted-key", "tls.key: {encrypted-key} is encrypted: give the key without"),
    ],
)
def test_a_listener_certificate_that_cannot_load_is_a_configuration_error(
    tmp_path: Path, pem_files: dict[str, str], cert: str, key: str, said: str
) -> None:
    """check-config refuses what start-up would fail on, naming the setting; start-up
    exits 2 with the same words (not an OpenSSL message naming no setting)."""
    config = tmp_path / "tls.toml"
    config.write_text(
        f'[tls]\nlisten = ["127.0.0.1:0"]\ncertificate = "{pem_files[cert]}"\n'
        f'key = "{pem_files[key]}"\n'
    )
    said = said.format(**pem_files)
    check = run_eyewall("check-config", str(config))
    assert check.returncode == 1 and said in check.stderr, check.stderr
    start = run_eyewall("--config", str(config), "--listen", "127.0.0.1:0", "--no-flows")
    assert start.returncode == 2 and said in start.stderr, start.stderr


def test_an_origin_ca_bundle_that_cannot_load_is_a_configuration_error(
    tmp_path: Path, pem_files: dict[str, str]
) -> None:
    config = tmp_path / "bundle.toml"
    config.write_text(f'[tls]\nupstream_ca_bundle = "{pem_files["junk"]}"\n')
    said = f"tls.upstream_ca_bundle: {pem_files['junk']} holds no PEM certificate"
    check = run_eyewall("check-config", str(config))
    assert check.returncode == 1 and said in check.stderr, check.stderr
    start = run_eyewall("--config", str(config), "--listen", "127.0.0.1:0", "--no-flows")
    assert start.returncode == 2 and said in start.stderr, start.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    "source",
    [
        "class A:\n    def reqeustheaders(self, flow): pass\n",
        "import no_such_module_here\n",
        "while True:\n    pass\n",
    ],
)
def test_an_addon_that_does_not_load_is_a_configuration_error(
    tmp_path: Path, workers: str, source: str
) -> None:
    """Exit status 2 (a service manager does not retry it), the reason said once per
    process that found it."""
    directory = tmp_path / "addons"
    directory.mkdir(mode=0o755)
    addon = directory / "first.py"
    addon.write_text(source)
    addon.chmod(0o644)
    start = run_eyewall(
        "--addon", str(addon), "--addon-hook-timeout", "0.3", "--workers", workers,
        "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-flows",
    )  # fmt: skip
    assert start.returncode == 2, start.stderr
    reported = [line for line in start.stderr.splitlines() if str(addon) in line]
    assert len(reported) == int(workers), start.stderr


def test_a_reload_sent_as_soon_as_the_pid_file_appears_is_not_fatal(tmp_path: Path) -> None:
    """The pid file appears only once every signal has its handler: ``eyewall reload``
    run the moment it exists reloads, instead of killing the proxy (SIGHUP's default)."""
    for attempt in range(10):
        pid_file = tmp_path / f"eyewall-{attempt}.pid"
        proc = subprocess.Popen(
            [sys.executable, "-m", "eyewall", "--listen", "127.0.0.1:0", "--admin-listen",
             "off", "--no-flows", "--access-log", "off", "--pid-file", str(pid_file),
             "--drain-grace", "0"],
            cwd=ROOT, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            poll(pid_file.exists, timeout=30, what="the pid file", interval=0.001)
            os.kill(proc.pid, signal.SIGHUP)
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(30) == 0
            assert proc.stderr is not None and "configuration reloaded" in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()


def test_reload_and_restart_say_what_is_wrong_with_the_pid_file(tmp_path: Path) -> None:
    stale = tmp_path / "stale.pid"
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process has it
    stale.write_text(f"{gone}\n")
    for command in ("reload", "restart"):
        done = run_eyewall(command, "--pid-file", str(stale))
        assert done.returncode == 1
        assert f"names process {gone}, which is not running (a stale pid file" in done.stderr
        missing = run_eyewall(command, "--pid-file", str(tmp_path / "none.pid"))
        assert missing.returncode == 1 and "no pid file" in missing.stderr


def test_check_config_checks_an_addon_file_given_alone(tmp_path: Path) -> None:
    good = ROOT / "examples" / "add_header.py"
    assert run_eyewall("check-config", str(good)).stdout == f"{good}: ok\n"
    bad = tmp_path / "addons" / "typo.py"
    bad.parent.mkdir(mode=0o755)
    bad.write_text("class A:\n    def reqeustheaders(self, flow): pass\n")
    bad.chmod(0o644)
    done = run_eyewall("check-config", str(bad))
    assert done.returncode == 1
    assert "A.reqeustheaders is not a hook; did you mean requestheaders?" in done.stderr
