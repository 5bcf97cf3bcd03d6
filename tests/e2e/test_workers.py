"""``--workers 2``: a supervisor and two worker processes on the same listening sockets.

Both workers serve; the limits hold for the proxy as a whole (rate, connections, the
login throttle); a reload reaches every worker; a killed worker is restarted and its
counts released; SIGTERM drains; one access log of whole lines, one admin view and one
/metrics show every worker; a restart under load loses nothing (tests below and
test_restart.py).  Which worker accepts a connection is the kernel's choice: tests that
need both send requests until both have answered (bounded), never rely on a split.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PROXY_ARGS, ROOT, ProxyProcess, read_response
from tests.tools import require_tool

WORKERS = ("--workers", "2", "--log-format", "json", "--drain-grace", "0")


def entries(p: ProxyProcess, wait_for: int = 0) -> list[dict]:
    """The access log as records; every line must be one whole JSON object."""
    return [json.loads(line) for line in p.access_lines(wait_for)]


def request(p: ProxyProcess, url: str, extra: str = "", timeout: float = 10) -> bytes:
    """One GET on a new connection (closed after it); the response."""
    host = url.split("/")[2]
    with socket.create_connection(p.address, timeout=timeout) as s:
        s.sendall(
            f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        return read_response(s)


def refused(p: ProxyProcess, origin_url: str) -> bool:
    """Whether a new connection is refused with 429 (the proxy reads its first bytes
    before it answers: TCP_DEFER_ACCEPT)."""
    with socket.create_connection(p.address, timeout=10) as s:
        s.sendall(f"GET {origin_url}/echo/over HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return read_response(s).startswith(b"HTTP/1.1 429 ")


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def until_both_workers(p: ProxyProcess, send: Callable[[], object], limit: int = 300) -> int:
    """Call ``send`` (one request) until the access log shows both workers; returns how
    many were sent."""
    for sent in range(1, limit + 1):
        send()
        if {e["worker"] for e in entries(p, sent)} >= {1, 2}:
            return sent
    raise AssertionError(f"one worker answered all of {limit} new connections")


def worker_pids(p: ProxyProcess) -> dict[int, int]:
    """Worker number -> pid of its current process, from the supervisor's log."""
    text = p.stderr()
    pids = {int(n): int(pid) for n, pid in re.findall(r"(\d+) \(pid (\d+)\)", text)}
    for n, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", text):
        pids[int(n)] = int(pid)
    return pids


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"no {name} in\n{text}"
    return float(match.group(1))


def poll(condition: Callable[[], object], what: str, timeout: float = 15.0) -> object:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return result


@pytest.fixture
def workers_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def make(*args: str) -> ProxyProcess:
        p = ProxyProcess(tmp_path / f"p{len(started)}", *PROXY_ARGS, *WORKERS, *args)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()
        p.check_clean()


# -- one proxy, many requests: both serve, one log, one admin view, one /metrics ----------


@pytest.fixture(scope="module")
def busy(tmp_path_factory, origin) -> Iterator[tuple[ProxyProcess, int]]:
    """A 2-worker proxy after plain requests from 8 clients at once; (proxy, requests)."""
    p = ProxyProcess(tmp_path_factory.mktemp("workers"), *PROXY_ARGS, *WORKERS)
    sent = until_both_workers(p, lambda: request(p, f"{origin.url}/echo/first"))
    failures: list[str] = []

    def client(n: int) -> None:
        with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
            for i in range(25):
                r = c.get(f"{origin.url}/echo/{n}-{i}?" + "x" * 300)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    yield p, sent + 8 * 25
    p.stop()
    p.check_clean()


def test_both_workers_serve_into_one_access_log_of_whole_lines(busy) -> None:
    p, sent = busy
    records = entries(p, sent)  # json.loads fails on a torn or interleaved line
    assert len(records) == sent
    assert len({r["id"] for r in records}) == sent
    assert {r["worker"] for r in records} == {1, 2}
    assert all(r["status"] == 200 for r in records)
    pids = worker_pids(p)
    assert set(pids) == {1, 2} and len(set(pids.values())) == 2


def test_one_admin_view_shows_every_workers_flows(busy) -> None:
    p, sent = busy
    assert p.admin_url is not None
    with httpx.Client(trust_env=False, timeout=10) as c:
        flows = c.get(p.admin_url + "/api/flows", params={"limit": 1000}).json()["flows"]
        har = c.get(p.admin_url + "/api/har").json()
        health = c.get(p.admin_url + "/healthz")
    assert {f["worker"] for f in flows} == {1, 2}
    assert len(har["log"]["entries"]) == sent
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert isinstance(health.json()["connections"], int)  # counts, as from one process


def test_metrics_count_the_whole_proxy_and_pass_promtool(busy) -> None:
    p, sent = busy
    assert p.admin_url is not None
    text = httpx.get(p.admin_url + "/metrics", trust_env=False, timeout=10).text
    assert metric(text, 'eyewall_requests_total{method="GET",status_class="2xx"}') == sent
    assert metric(text, "eyewall_workers") == 2
    assert metric(text, 'eyewall_worker_up{worker="1"}') == 1
    assert metric(text, 'eyewall_worker_up{worker="2"}') == 1
    assert metric(text, 'eyewall_worker_cpu_seconds_total{worker="2"}') > 0
    assert metric(text, 'eyewall_events_dropped_total{subscriber="workers"}') == 0
    table = (ROOT / "docs" / "monitoring.md").read_text().split("## Metrics", 1)[1]
    documented = {n.removesuffix("_total") for n in re.findall(r"`(eyewall_[a-z_]+)`", table)}
    scraped = {f.name for f in text_string_to_metric_families(text)}
    assert {n for n in scraped if n.startswith("eyewall_")} <= documented
    tool = require_tool("promtool", "prometheus")
    result = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout + result.stderr, result


def test_a_burst_of_connections_is_spread_over_the_workers(workers_proxy, origin) -> None:
    """40 connections that become acceptable at once (their requests are sent together;
    TCP_DEFER_ACCEPT holds each until its bytes arrive): without the accept gate the
    worker awake first took them all."""
    p = workers_proxy()
    sockets = [socket.create_connection(p.address, timeout=10) for _ in range(40)]
    head = f"GET {origin.url}/echo/burst HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for s in sockets:
        s.sendall(head)
    for s in sockets:
        assert read_response(s).startswith(b"HTTP/1.1 200 ")
    ports = {s.getsockname()[1] for s in sockets}
    served = [r["worker"] for r in entries(p, 40) if r["client_port"] in ports]
    assert len(served) == 40
    assert min(served.count(1), served.count(2)) >= 10, served
    for s in sockets:
        s.close()


# -- the limits hold for the proxy as a whole ----------------------------------------


def test_a_client_rate_limit_holds_across_workers(workers_proxy, origin) -> None:
    # 10 tokens and next to no refill: 10 requests pass in all, not 10 per worker.
    p = workers_proxy("--client-rps", "0.001", "--client-burst", "10")
    statuses = [status_of(request(p, f"{origin.url}/echo/{i}")) for i in range(30)]
    sent = 30 + until_both_workers(p, lambda: request(p, f"{origin.url}/echo/more"))
    assert statuses[:10] == [200] * 10
    assert statuses[10:] == [429] * 20
    records = entries(p, sent)
    assert sum(r["status"] == 200 for r in records) == 10
    assert {r["worker"] for r in records if r["status"] == 429} == {1, 2}


def hold(p: ProxyProcess, origin_url: str) -> tuple[socket.socket, int, int]:
    """A keep-alive connection after one request: (socket, its status, its worker, or 0
    when refused)."""
    s = socket.create_connection(p.address, timeout=10)
    s.sendall(f"GET {origin_url}/echo/hold HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    response = read_response(s)
    status = status_of(response)
    if status != 200:
        return s, status, 0
    port = s.getsockname()[1]
    record = poll(lambda: [r for r in entries(p) if r["client_port"] == port], "its access line")
    assert isinstance(record, list)
    return s, status, record[-1]["worker"]


def admitted(p: ProxyProcess, origin_url: str) -> socket.socket | None:
    """A new connection kept open if the proxy served it, else None (closed)."""
    s, status, _ = hold(p, origin_url)
    if status == 200:
        return s
    s.close()
    return None


def held_on_both(p: ProxyProcess, origin_url: str, cap: int) -> list[tuple[socket.socket, int]]:
    """``cap`` open connections, at least one on each worker."""
    held: list[tuple[socket.socket, int]] = []
    for _ in range(100):
        if len(held) == cap:
            return held
        s, status, worker = hold(p, origin_url)
        on = {w for _, w in held} | {worker}
        if status != 200 or (len(held) == cap - 1 and on != {1, 2}):
            s.close()  # refused (a close not yet counted), or no split yet: again
            continue
        held.append((s, worker))
    raise AssertionError("could not hold connections on both workers")


def test_a_connection_cap_holds_across_workers(workers_proxy, origin) -> None:
    p = workers_proxy("--client-connections", "4")
    held = held_on_both(p, origin.url, 4)
    for _ in range(3):  # whichever worker accepts it
        assert refused(p, origin.url)
    held[0][0].close()
    another = poll(lambda: admitted(p, origin.url), "a slot freed by a close")
    assert isinstance(another, socket.socket)
    for s in [another, *(s for s, _ in held[1:])]:
        s.close()


def test_the_login_throttle_holds_across_workers(workers_proxy, origin, tmp_path) -> None:
    users = tmp_path / "htpasswd"
    users.write_text(f"alice:{bcrypt.hashpw(b'right', bcrypt.gensalt(rounds=4)).decode()}\n")
    p = workers_proxy("--htpasswd", str(users))
    p.expected_errors.append("authentication failed")
    wrong = "Proxy-Authorization: Basic " + base64.b64encode(b"alice:wrong").decode() + "\r\n"
    statuses = [status_of(request(p, f"{origin.url}/echo/", wrong)) for _ in range(10)]
    sent = 10 + until_both_workers(p, lambda: request(p, f"{origin.url}/echo/", wrong))
    assert statuses == [407] * 5 + [429] * 5  # 5 failures per source, in all workers
    assert {r["worker"] for r in entries(p, sent) if r["status"] == 429} == {1, 2}


# -- reload, a killed worker, shutdown ----------------------------------------------------


def test_a_reload_reaches_every_worker_and_a_bad_file_changes_nothing(
    workers_proxy, origin, tmp_path
) -> None:
    config = tmp_path / "eyewall.toml"
    config.write_text("")
    p = workers_proxy("--config", str(config))
    assert status_of(request(p, f"{origin.url}/echo/before")) == 200
    config.write_text('[[rules]]\nid = "no-origin"\naction = "deny"\nhosts = ["127.0.0.1"]\n')
    p.signal(signal.SIGHUP)
    p.log_with("configuration reloaded (2 workers)")
    before = len(entries(p, 1))
    sent = until_both_workers_since(p, before, lambda: request(p, f"{origin.url}/echo/after"))
    denied = entries(p, before + sent)[before:]
    assert {(r["status"], r["rule"]) for r in denied} == {(403, "no-origin")}
    config.write_text("[[rules]]\nid = 'broken'\naction = 'maybe'\n")
    p.expected_errors.append("reload refused")
    p.signal(signal.SIGHUP)
    p.log_with("reload refused")
    before = len(entries(p))
    sent = until_both_workers_since(p, before, lambda: request(p, f"{origin.url}/echo/still"))
    assert {r["status"] for r in entries(p, before + sent)[before:]} == {403}


def until_both_workers_since(p: ProxyProcess, before: int, send: Callable[[], object]) -> int:
    for sent in range(1, 301):
        send()
        if {r["worker"] for r in entries(p, before + sent)[before:]} >= {1, 2}:
            return sent
    raise AssertionError("one worker answered all of 300 new connections")


def test_a_killed_worker_is_restarted_and_its_counts_released(workers_proxy, origin) -> None:
    p = workers_proxy("--client-connections", "2")
    p.expected_errors.append("was killed by signal 9")
    (victim, victim_worker), (survivor, _) = held_on_both(p, origin.url, 2)
    assert refused(p, origin.url)
    os.kill(worker_pids(p)[victim_worker], signal.SIGKILL)
    assert victim.recv(10) == b""  # its connection went with it
    p.log_with(f"worker {victim_worker} (pid")
    poll(lambda: f"worker {victim_worker} started" in p.stderr(), "the worker's restart")
    # The dead worker's count is released: one more connection fits, then the cap again.
    replacement = poll(lambda: admitted(p, origin.url), "the slot the worker held")
    assert isinstance(replacement, socket.socket)
    assert refused(p, origin.url)
    assert p.admin_url is not None

    def restarted() -> bool:
        text = httpx.get(p.admin_url + "/metrics", trust_env=False, timeout=10).text
        name = f'eyewall_worker_restarts_total{{worker="{victim_worker}"}}'
        return metric(text, name) == 1 and metric(text, "eyewall_workers") == 2

    poll(restarted, "the restart in /metrics")
    for sock in (victim, survivor, replacement):
        sock.close()


class HeldOrigin:
    """An origin that answers each request only when told to."""

    def __init__(self, raw_origin: Callable[..., object]) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()

        def handler(sock: socket.socket) -> None:
            server.read_head(sock)  # type: ignore[attr-defined]
            self.arrived.set()
            self.release.wait(30)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nheld")

        server = raw_origin(handler)
        self.url = server.url  # type: ignore[attr-defined]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_drains_every_worker(workers_proxy, raw_origin, sig) -> None:
    origin = HeldOrigin(raw_origin)
    p = workers_proxy("--drain-timeout", "20")
    s = socket.create_connection(p.address, timeout=30)
    s.sendall(f"GET {origin.url}/held HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert origin.arrived.wait(10)
    p.signal(sig)

    def closed() -> bool:
        try:
            socket.create_connection(p.address, timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False

    poll(closed, "the listeners to close")
    origin.release.set()
    response = read_response(s)
    assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"held")
    assert b"Connection: close" in response
    assert s.recv(10) == b""
    s.close()
    assert p.process.wait(30) == 0
    assert [r["status"] for r in entries(p)] == [200]
    assert not [pid for pid in worker_pids(p).values() if Path(f"/proc/{pid}").exists()]


def test_sigterm_fails_health_checks_during_the_grace_and_keeps_serving(
    workers_proxy, origin
) -> None:
    p = workers_proxy("--drain-grace", "30")
    assert p.admin_url is not None
    p.signal(signal.SIGTERM)
    poll(
        lambda: httpx.get(p.admin_url + "/healthz", trust_env=False).status_code == 503,
        "/healthz to say 503",
    )
    statuses = {status_of(request(p, f"{origin.url}/echo/{i}")) for i in range(20)}
    assert statuses == {200}
    p.signal(signal.SIGINT)  # a second signal: stop now
    assert p.process.wait(30) == 0


def test_a_worker_that_cannot_start_fails_the_start(tmp_path) -> None:
    addon = tmp_path / "broken.py"
    addon.write_text("raise RuntimeError('this addon is broken')\n")
    addon.chmod(0o644)
    done = subprocess.run(
        [sys.executable, "-m", "eyewall", "--listen", "127.0.0.1:0", "--admin-listen", "off",
         "--access-log", "off", "--no-flows", *WORKERS, "--addon", str(addon)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2  # an invalid configuration: not retried by systemd
    assert "this addon is broken" in done.stderr
    assert "while starting" in done.stderr


def test_a_worker_that_does_not_stop_is_killed_at_the_drain_deadline(
    workers_proxy, origin, tmp_path
) -> None:
    """A worker stuck where nothing can stop it (an addon waiting on a child process)
    is killed once the drain deadline and its margin pass; the supervisor exits and no
    process keeps the listening port — neither a worker nor a program addon code
    started, when it loaded or later."""
    marker = tmp_path / "stuck"
    addon = tmp_path / "stuck.py"
    addon.write_text(
        "import os\nclass Stuck:\n"
        "    def load(self, loader):\n"
        "        os.system('sleep 20 &')  # a program started before the worker serves\n"
        "    def requestheaders(self, flow):\n"
        "        if flow.request.path == '/stuck':\n"
        f"            open({str(marker)!r}, 'w').close()\n"
        "            os.system('sleep 30')\n"
    )
    addon.chmod(0o644)
    p = workers_proxy("--addon", str(addon), "--drain-timeout", "1", "--drain-grace", "0")
    p.expected_errors.append("did not stop: killing it")
    s = socket.create_connection(p.address, timeout=60)
    s.sendall(f"GET {origin.url}/stuck HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    poll(marker.exists, "the request to reach the addon")
    pids = worker_pids(p)
    p.signal(signal.SIGTERM)
    p.process.wait(60)
    p.log_with("did not stop: killing it")
    assert not [pid for pid in pids.values() if Path(f"/proc/{pid}").exists()]
    s.close()
    with socket.socket() as again:  # nothing listens there: a new start can (the
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # proxy's options)
        again.bind(p.address)  # the addon's child, still running, holds no listener
        again.listen()


def test_a_second_signal_cuts_in_flight_work_in_every_worker_and_records_it(
    workers_proxy, raw_origin
) -> None:
    """As for one process: the second SIGINT does not wait out the drain, and each
    cut request is answered 502 and has its access line."""
    gate = threading.Event()

    def handler(sock):
        origin.read_head(sock)
        gate.wait(30)

    origin = raw_origin(handler)
    p = workers_proxy("--drain-timeout", "600", "--drain-grace", "0")
    clients = []
    for i in range(4):
        s = socket.create_connection(p.address, timeout=10)
        s.sendall(f"GET {origin.url}/held/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        clients.append(s)
    poll(lambda: len(origin.requests) == 4, "the requests to reach the origin")
    p.signal(signal.SIGINT)
    p.log_with("shutting down")
    p.signal(signal.SIGINT)
    for s in clients:
        assert read_response(s).startswith(b"HTTP/1.1 502 ")
        s.close()
    assert p.process.wait(30) == 0
    gate.set()
    for i in range(4):
        assert "connection_terminated" in p.access_entry(f"/held/{i}")
