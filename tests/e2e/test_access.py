"""Access control through the real proxy: authentication, rules, SSRF guard, CONNECT
ports, rate limits, client networks, live reload and explain."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import bcrypt
import httpx
import pytest

from tests.conftest import ROOT, ProxyProcess, poll, raw_request, read_response

PASSWORD = "correct horse"


def htpasswd(tmp_path: Path, users: dict[str, str]) -> str:
    path = tmp_path / "htpasswd"
    lines = [
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for u, p in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get(proxy, url: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return raw_request(proxy.address, f"GET {url} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())


def status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


# -- authentication ---------------------------------------------------------------------


@pytest.fixture
def auth_proxy(make_proxy, tmp_path):
    return make_proxy("--htpasswd", htpasswd(tmp_path, {"alice": PASSWORD, "bob": "hunter2"}))


def test_407_then_success_with_credentials(auth_proxy, origin):
    first = get(auth_proxy, f"{origin.url}/echo")
    assert status(first) == 407
    assert b'Proxy-Authenticate: Basic realm="eyewall"' in first
    ok = get(auth_proxy, f"{origin.url}/echo", f"Proxy-Authorization: {basic('alice', PASSWORD)}")
    assert status(ok) == 200
    seen = json.loads(ok.partition(b"\r\n\r\n")[2])
    assert "Proxy-Authorization" not in [n for n, _ in seen["headers"]]  # never forwarded
    assert "user=alice" in auth_proxy.access_entry(" 200 ")


def test_curl_and_httpx_authenticate(auth_proxy, origin):
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-x",
            auth_proxy.url,
            "--proxy-user",
            f"alice:{PASSWORD}",
            f"{origin.url}/bytes?n=7",
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0 and len(result.stdout) == 7
    proxy_url = auth_proxy.url.replace("http://", "http://bob:hunter2@")
    with httpx.Client(proxy=proxy_url, timeout=10, trust_env=False) as c:
        assert c.get(f"{origin.url}/bytes?n=3").status_code == 200


def test_connect_requires_authentication_too(auth_proxy, tls_origin):
    data = raw_request(
        auth_proxy.address, f"CONNECT {tls_origin.authority} HTTP/1.1\r\n\r\n".encode()
    )
    assert status(data) == 407
    with socket.create_connection(auth_proxy.address, timeout=5) as s:
        s.sendall(
            f"CONNECT {tls_origin.authority} HTTP/1.1\r\n"
            f"Proxy-Authorization: {basic('alice', PASSWORD)}\r\n\r\n".encode()
        )
        assert read_response(s, head_only=True).startswith(b"HTTP/1.1 200")


def test_failed_logins_are_logged_with_the_client_and_never_the_password(auth_proxy, origin):
    for _ in range(2):
        data = get(
            auth_proxy, f"{origin.url}/", f"Proxy-Authorization: {basic('alice', 'wrong-pw')}"
        )
        assert status(data) == 407
    log = auth_proxy.log_with("authentication failed from 127.0.0.1 for user alice: wrong")
    assert "wrong-pw" not in log + "\n".join(auth_proxy.access_lines())
    assert PASSWORD not in log


def test_refusals_after_login_name_the_user(make_proxy, origin, tmp_path):
    """Who tried to reach what and was refused: the audit question of an egress proxy."""
    users = htpasswd(tmp_path, {"alice": PASSWORD, "bob": "hunter2"})
    config = write_config(
        tmp_path / "x.toml",
        '[[rules]]\nid = "no-bob"\naction = "deny"\nusers = ["bob"]\n',
    )
    p = make_proxy("--config", config, "--htpasswd", users)
    denied = get(p, f"{origin.url}/echo?who=bob", f"Proxy-Authorization: {basic('bob', 'hunter2')}")
    assert status(denied) == 403
    assert "user=bob" in p.access_entry("who=bob")
    unresolvable = "http://no-such-host.invalid/"
    failed = get(p, unresolvable, f"Proxy-Authorization: {basic('alice', PASSWORD)}")
    assert status(failed) == 502
    assert "user=alice" in p.access_entry("no-such-host.invalid")
    anonymous = get(p, f"{origin.url}/echo?who=nobody")
    assert status(anonymous) == 407
    assert "user=" not in p.access_entry("who=nobody").replace("user=-", "")


# -- rules ------------------------------------------------------------------------------


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


RULES = """
[access]
allow_private = true
connect_ports = ["443", "1024-65535"]

[[rules]]
id = "no-admin"
action = "deny"
message = "The admin pages are off limits."
hosts = ["localhost"]

[[rules]]
id = "no-delete"
action = "deny"
methods = ["DELETE"]
"""


def test_denied_request_names_the_rule_and_its_message(make_proxy, origin, tmp_path):
    p = make_proxy("--config", write_config(tmp_path / "rules.toml", RULES))
    port = origin.url.rsplit(":", 1)[1]
    data = get(p, f"http://localhost:{port}/echo")
    assert status(data) == 403
    body = data.partition(b"\r\n\r\n")[2].decode()
    assert "denied by rule no-admin: The admin pages are off limits." in body
    assert "rule=no-admin" in p.access_entry("localhost")
    deleted = raw_request(
        p.address, f"DELETE {origin.url}/echo HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert status(deleted) == 403 and b"no-delete" in deleted
    assert status(get(p, f"{origin.url}/echo")) == 200


# -- SSRF guard -------------------------------------------------------------------------


@pytest.fixture
def guarded(tmp_path):
    """A proxy on plain defaults: private destinations refused."""
    p = ProxyProcess(tmp_path / "guarded")
    yield p
    p.stop()
    p.check_clean()


def test_private_destinations_are_refused_by_default(guarded, origin):
    port = int(origin.url.rsplit(":", 1)[1])
    for host in (
        "127.0.0.1",
        "localhost",
        "2130706433",
        "0177.0.0.1",
        "0x7f.0.0.1",
        "127.1",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "169.254.169.254",
        "0.0.0.0",
    ):
        data = get(guarded, f"http://{host}:{port}/echo")
        assert status(data) == 403, host
        assert b"private-destination" in data, host
    assert origin.seen_connections  # the origin is reachable, just not through the proxy


def test_a_redirect_to_a_private_address_is_checked_again(origin, raw_origin, tmp_path):
    def redirector(sock):
        r.read_head(sock)
        location = f"Location: {origin.url}/echo\r\n"
        sock.sendall(f"HTTP/1.1 302 Found\r\n{location}Content-Length: 0\r\n\r\n".encode())

    r = raw_origin(redirector)
    config = f"""
[[rules]]
id = "redirector"
action = "allow"
networks = ["127.0.0.1/32"]
ports = ["{r.port}"]
"""
    # Not make_proxy: its defaults allow private destinations, and this needs the guard.
    p = ProxyProcess(tmp_path / "redir", "--config", write_config(tmp_path / "r.toml", config))
    try:
        with httpx.Client(proxy=p.url, timeout=10, trust_env=False, follow_redirects=True) as c:
            response = c.get(f"{r.url}/start")
        assert response.status_code == 403  # the client's second request was checked
        assert b"private-destination" in response.content
        assert len(response.history) == 1 and response.history[0].status_code == 302
    finally:
        p.stop()
    p.check_clean()


def test_connect_only_to_443_by_default(tmp_path, raw_origin):
    upstream = raw_origin(lambda s: s.recv(10))
    p = ProxyProcess(tmp_path / "ports", "--allow-private")
    try:
        data = raw_request(p.address, f"CONNECT {upstream.authority} HTTP/1.1\r\n\r\n".encode())
        assert status(data) == 403 and b"connect-port" in data
    finally:
        p.stop()
    p.check_clean()


# -- limits and client networks -----------------------------------------------------------


def test_request_rate_limit_answers_429_with_retry_after(make_proxy, origin):
    p = make_proxy("--client-rps", "2", "--client-burst", "3")
    codes = []
    with socket.create_connection(p.address, timeout=5) as s:
        for _ in range(8):
            s.sendall(f"GET {origin.url}/bytes?n=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            response = read_response(s)
            codes.append(status(response))
            if codes[-1] == 429:
                assert b"Retry-After: " in response
    assert codes[:3] == [200, 200, 200]
    assert 429 in codes
    assert "rate limit client_rps reached for 127.0.0.1" in p.access_entry(" 429 ")


def test_concurrent_tunnels_per_client_are_limited(make_proxy, raw_origin):
    def echo(sock):
        while data := sock.recv(100):
            sock.sendall(data)

    upstream = raw_origin(echo)
    p = make_proxy("--client-tunnels", "2")
    held = []
    try:
        for _ in range(2):
            s = socket.create_connection(p.address, timeout=5)
            s.sendall(f"CONNECT {upstream.authority} HTTP/1.1\r\n\r\n".encode())
            assert read_response(s, head_only=True).startswith(b"HTTP/1.1 200")
            held.append(s)
        third = raw_request(p.address, f"CONNECT {upstream.authority} HTTP/1.1\r\n\r\n".encode())
        assert status(third) == 429
        held.pop().close()
        # The slot is given back before the tunnel's access line is written.
        p.access_entry(f"CONNECT {upstream.authority} 200")
        again = socket.create_connection(p.address, timeout=5)
        again.sendall(f"CONNECT {upstream.authority} HTTP/1.1\r\n\r\n".encode())
        assert read_response(again, head_only=True).startswith(b"HTTP/1.1 200")
        held.append(again)
    finally:
        for s in held:
            s.close()


def test_clients_outside_the_allowed_networks_are_refused(make_proxy, origin):
    p = make_proxy("--allow-client", "10.0.0.0/8")
    data = get(p, f"{origin.url}/echo")
    assert status(data) == 403
    assert b"may not use this proxy" in data


def test_listening_beyond_loopback_requires_allowed_clients():
    result = subprocess.run(
        [sys.executable, "-m", "eyewall", "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert "access.allow_clients" in result.stderr


# -- reload -------------------------------------------------------------------------------


def test_reload_under_load_drops_nothing(make_proxy, origin, tmp_path):
    config = tmp_path / "live.toml"
    config.write_text("[access]\nallow_private = true\n")
    pid_file = tmp_path / "eyewall.pid"
    p = make_proxy("--config", str(config), "--pid-file", str(pid_file))
    failures: list[object] = []
    done = threading.Event()
    count = [0]

    def load() -> None:
        with httpx.Client(proxy=p.url, timeout=10, trust_env=False) as c:
            while not done.is_set():
                try:
                    r = c.get(f"{origin.url}/bytes?n=100")
                    if r.status_code != 200:
                        failures.append(r.status_code)
                    count[0] += 1
                except httpx.HTTPError as e:
                    failures.append(e)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    poll(lambda: count[0] >= 10 or failures, what="the load to get going")
    config.write_text(
        '[access]\nallow_private = true\n[[rules]]\nid = "no-echo"\naction = "deny"\n'
        'host_regex = "^never-matches$"\n'
    )
    reload = subprocess.run(
        [sys.executable, "-m", "eyewall", "reload", "--pid-file", str(pid_file)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        check=False,
    )
    assert reload.returncode == 0, reload.stderr
    p.log_with("configuration reloaded")  # `eyewall reload` only sends the signal
    config.write_text("[access\nbroken = ")  # invalid: refused, old policy stays
    p.expected_errors.append("reload refused")
    p.signal(signal.SIGHUP)
    p.log_with("reload refused, keeping the current configuration")
    after = count[0]
    poll(lambda: count[0] >= after + 10 or failures, what="requests after the reloads")
    done.set()
    for w in workers:
        w.join()
    assert failures == []
    assert count[0] > 20
    p.log_with("configuration reloaded")
    p.log_with("reload refused, keeping the current configuration")
    assert status(get(p, f"{origin.url}/echo")) == 200


def test_reload_command_checks_the_file_before_signalling(make_proxy, origin, tmp_path):
    pid_file = tmp_path / "eyewall.pid"
    config = tmp_path / "live.toml"
    config.write_text(f'pid_file = "{pid_file}"\n[access]\nallow_private = true\n')
    p = make_proxy("--config", str(config))

    def reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "eyewall", "reload", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=ROOT,
            check=False,
        )

    config.write_text(f'pid_file = "{pid_file}"\n[access]\nallow_privat = true\n')
    refused = reload()
    assert refused.returncode == 2
    assert "did you mean access.allow_private" in refused.stderr and "not sent" in refused.stderr
    config.write_text(
        f'pid_file = "{pid_file}"\n[access]\nallow_private = true\n'
        '[[rules]]\nid = "block-all"\naction = "deny"\n'
    )
    sent = reload()
    assert sent.returncode == 0, sent.stderr
    p.log_with("configuration reloaded")
    assert p.stderr().count("configuration reloaded") == 1
    assert status(get(p, f"{origin.url}/echo")) == 403


def test_restart_settings_are_named_against_what_runs(make_proxy, tmp_path):
    """A restart-only setting changed by a reload is named; put back to the running
    value, it is not (the process never stopped using it)."""
    config = tmp_path / "c.toml"
    running, other = tmp_path / "a.pid", tmp_path / "b.pid"
    config.write_text(f'pid_file = "{running}"\n')
    p = make_proxy("--config", str(config))
    config.write_text(f'pid_file = "{other}"\n')
    p.signal(signal.SIGHUP)
    p.log_with("pid_file changed: it applies after a restart")
    config.write_text(f'pid_file = "{running}"\n')
    p.signal(signal.SIGHUP)
    poll(lambda: p.stderr().count("configuration reloaded") >= 2, what="the second reload")
    assert p.stderr().count("configuration reloaded") == 2
    assert p.stderr().count("pid_file changed") == 1
    assert running.read_text().strip() == str(p.pid) and not other.exists()


def test_reload_applies_new_rules_to_new_requests(make_proxy, origin, tmp_path):
    config = tmp_path / "rules.toml"
    config.write_text("[access]\nallow_private = true\n")
    p = make_proxy("--config", str(config))
    assert status(get(p, f"{origin.url}/echo")) == 200
    config.write_text(
        '[access]\nallow_private = true\n[[rules]]\nid = "block-all"\naction = "deny"\n'
    )
    p.signal(signal.SIGHUP)
    p.log_with("configuration reloaded")
    data = get(p, f"{origin.url}/echo")
    assert status(data) == 403 and b"block-all" in data


def test_a_reload_applies_flow_recording_settings_and_a_restart_keeps_the_list(
    make_proxy, origin, tmp_path
):
    """flows.credentials and the in-memory window's bounds change on reload (turning
    redaction on must not wait for a restart); after a restart the dashboard's and the
    API's list starts from the recorded flows, not empty."""
    config = tmp_path / "flows.toml"
    config.write_text("[access]\nallow_private = true\n[flows]\ncredentials = true\n")
    p = make_proxy("--config", str(config))

    def listed(proxy: ProxyProcess = p) -> list[dict]:
        with httpx.Client(timeout=10, trust_env=False) as admin:
            return admin.get(proxy.admin_url + "/api/flows").json()["flows"]

    for i in range(3):
        assert status(get(p, f"{origin.url}/echo?access_token=kept-{i}")) == 200
    poll(lambda: len(listed()) == 3, what="three recorded flows")
    assert "access_token=kept-2" in listed()[0]["url"]  # credentials recorded, as configured
    config.write_text("[access]\nallow_private = true\n[flows]\ncredentials = false\nmemory = 2\n")
    p.signal(signal.SIGHUP)
    p.log_with("configuration reloaded")
    assert len(listed()) == 2  # the window shrank at once
    assert status(get(p, f"{origin.url}/echo?access_token=hidden")) == 200
    poll(lambda: "[redacted]" in listed()[0]["url"], what="the flow after the reload")
    flows = listed()
    assert len(flows) == 2 and "hidden" not in json.dumps(flows)
    ids = [f["id"] for f in flows]
    p.stop()
    again = make_proxy("--config", str(config), "--flows", str(tmp_path / "p0" / "flows.sqlite3"))
    assert [f["id"] for f in listed(again)] == ids


# -- explain ------------------------------------------------------------------------------


def explain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eyewall", "explain", *args],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        check=False,
    )


def test_explain_names_the_rule_and_the_resolved_address(tmp_path):
    config = write_config(tmp_path / "x.toml", RULES)
    denied = explain("--config", config, "http://localhost:8000/")
    assert denied.returncode == 3
    assert "rule no-admin (deny): matches" in denied.stdout
    assert "403 Forbidden by no-admin: The admin pages are off limits." in denied.stdout
    allowed = explain("--config", config, "--method", "GET", "http://127.0.0.1:8000/")
    assert allowed.returncode == 0
    assert "rule no-admin (deny): no match (host differs)" in allowed.stdout
    assert "ALLOW by default" in allowed.stdout


def test_explain_shows_the_ssrf_guard_and_connect_ports():
    result = explain("http://169.254.169.254/latest/meta-data/")
    assert result.returncode == 3
    assert "link-local (cloud metadata)" in result.stdout
    result = explain("--allow-private", "example.com:25")
    assert "connect-port" in result.stdout


def test_explain_explains_the_connect_a_client_sends_for_an_https_url():
    """curl, browsers and libraries send CONNECT host:443 for https:// URLs through a
    forward proxy: that is what explain decides unless told --method."""
    sent = explain("https://93.184.216.34:8443/x")
    assert sent.returncode == 3, sent.stdout
    assert sent.stdout.startswith("request   CONNECT 93.184.216.34:8443 ")
    assert "connect-port" in sent.stdout
    assert explain("https://93.184.216.34/x").stdout.startswith(
        "request   CONNECT 93.184.216.34:443"
    )
    inner = explain("--method", "GET", "https://93.184.216.34:8443/x")
    assert inner.returncode == 0 and inner.stdout.startswith("request   GET https://")


def test_explain_takes_client_and_user_after_the_command(tmp_path):
    """``--client`` and ``--user`` belong to explain; the top-level parser must not claim
    them as abbreviations of its own --client-rps or --user-burst."""
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (tmp_path / "htpasswd").write_text(f"alice:{hashed}\nbob:{hashed}\n")
    config = write_config(
        tmp_path / "x.toml",
        '[access]\nallow_clients = ["10.0.0.0/8"]\nallow_private = true\n'
        '[auth]\nhtpasswd = "htpasswd"\n'
        '[[rules]]\nid = "no-bob"\naction = "deny"\nusers = ["bob"]\n',
    )
    known = explain(
        "--config", config, "--client", "10.1.2.3", "--user", "alice", "http://127.0.0.1:9/"
    )
    assert known.returncode == 0, known.stderr
    assert "from 10.1.2.3 as user alice" in known.stdout
    assert "alice is a known user" in known.stdout
    labels = [line.split()[0] for line in known.stdout.splitlines() if line[:1] != " "]
    assert labels.count("client") == 1 and labels.count("limits") == 1, known.stdout
    unknown = explain(
        "--config", config, "--client=10.1.2.3", "--user=carol", "http://127.0.0.1:9/"
    )
    assert unknown.returncode == 3
    assert "carol is not a known user" in unknown.stdout
    assert "407" in unknown.stdout
    denied = explain(
        "--config", config, "--client", "10.1.2.3", "--user", "bob", "http://127.0.0.1:9/"
    )
    assert denied.returncode == 3 and "403 Forbidden by no-bob" in denied.stdout
    outside = explain("--config", config, "--client", "192.0.2.1", "http://127.0.0.1:9/")
    assert outside.returncode == 3 and "192.0.2.1" in outside.stdout
    abbreviated = explain("--config", config, "--cli", "10.1.2.3", "http://127.0.0.1:9/")
    assert abbreviated.returncode == 2 and "unrecognized arguments: --cli" in abbreviated.stderr


def test_explain_of_a_rule_without_a_message_ends_at_the_rule(tmp_path):
    config = write_config(
        tmp_path / "x.toml",
        '[[rules]]\nid = "quiet"\naction = "deny"\nhosts = ["127.0.0.1"]\n'
        "[access]\nallow_private = true\n",
    )
    denied = explain("--config", config, "http://127.0.0.1:8000/")
    assert denied.returncode == 3, denied
    line = next(x for x in denied.stdout.splitlines() if x.startswith("decision"))
    assert line.rstrip() == "decision  403 Forbidden by quiet", line


SPELLINGS = ["127.0.0.1", "127.1", "0177.0.0.1", "2130706433", "0x7f000001", "[::ffff:127.0.0.1]"]


def test_a_rule_naming_an_address_holds_for_every_spelling_live_and_in_explain(
    make_proxy, origin, tmp_path
):
    """A client cannot write its way past a rule: 127.1, 2130706433 or ::ffff:127.0.0.1
    reach 127.0.0.1, so a rule on 127.0.0.1 covers them; explain says the same."""
    config = write_config(
        tmp_path / "x.toml",
        '[access]\nallow_private = true\nconnect_ports = ["1-65535"]\n'
        '[[rules]]\nid = "block-ip"\naction = "deny"\nhosts = ["127.0.0.1"]\n',
    )
    p = make_proxy("--config", config)
    port = origin.url.rsplit(":", 1)[1]
    for host in SPELLINGS:
        answer = get(p, f"http://{host}:{port}/echo/x")
        assert status(answer) == 403 and b"block-ip" in answer, (host, answer[:200])
        connect = raw_request(p.address, f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode())
        assert status(connect) == 403, (host, connect[:200])
        told = explain("--config", config, f"http://{host}:{port}/")
        assert told.returncode == 3 and "403 Forbidden by block-ip" in told.stdout, told.stdout
    for host in ("0", "0.0.0.0"):  # unspecified: reaches this host, so 127.0.0.1's rule
        assert status(get(p, f"http://{host}:{port}/echo/x")) == 403, host
        told = explain("--config", config, f"http://{host}:{port}/")
        assert told.returncode == 3 and "403 Forbidden by block-ip" in told.stdout, told.stdout
    poll(lambda: len(p.access_lines()) == 2 * len(SPELLINGS) + 2, what="every refusal logged")
    logged = [line.split()[3:5] for line in p.access_lines()]  # method, URL: as reached
    assert logged.count(["GET", f"http://127.0.0.1:{port}/echo/x"]) == len(SPELLINGS), logged
    assert logged.count(["CONNECT", f"127.0.0.1:{port}"]) == len(SPELLINGS), logged
