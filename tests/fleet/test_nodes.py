"""A fleet as docs/fleet.md deploys it, on loopback: Eyewall nodes as subprocesses on
random ports behind a real HAProxy (TCP mode, PROXY protocol v2, health checks on
/healthz of each node's admin listener), sharing a real Redis and PostgreSQL.

Loopback has many addresses, which stand in for the machines: HAProxy connects to the
nodes from 127.0.0.2 (the trusted balancer), each test's client from an address of its
own (so that per-client limits never mix), and strangers from 127.0.0.3.

No sleeping: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from websockets.asyncio.client import connect

from eyewall.proxyproto import ProxyHeader, encode
from tests.conftest import PROXY_ARGS, ProxyProcess
from tests.origins import OriginServer, RawOrigin
from tests.services import HAProxy, PostgresServer, RedisServer, free_port, wait_for

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

BALANCER = "127.0.0.2"  # HAProxy's source address towards the nodes
STRANGER = "127.0.0.3"
ROOT = Path(__file__).resolve().parent.parent.parent


def haproxy_config(directory: Path, port: int, nodes: list[Node]) -> str:
    """docs/fleet.md's HAProxy configuration, on loopback with quick health checks."""
    servers = "\n".join(
        f"    server {n.name} 127.0.0.1:{n.port} check port {n.admin_port} source {BALANCER}"
        for n in nodes
    )
    return f"""\
global
    stats socket {directory}/stats.sock mode 600 level admin
    maxconn 512

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 2s
    retries 3
    option redispatch 1

frontend proxy
    bind 127.0.0.1:{port}
    default_backend eyewall

backend eyewall
    balance leastconn
    option httpchk
    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    default-server send-proxy-v2 inter 100ms fall 1 rise 1
{servers}
"""


class Node(ProxyProcess):
    """``python -m eyewall`` as one node of the fleet."""

    def __init__(self, directory: Path, name: str, *args: str) -> None:
        self.name = name
        super().__init__(directory, *PROXY_ARGS, "--node", name, "--via", name, *args)
        assert self.admin_url is not None
        self.admin_port = int(self.admin_url.rsplit(":", 1)[1])

    def stop(self) -> int | None:
        """SIGINT: no drain grace (SIGTERM's is tested where it matters)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return super().stop()

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.admin_url}{path}", timeout=10) as answer:
            return str(answer.read().decode())

    def metric(self, name: str) -> float:
        """The value of one series (``name{labels}`` as exposed), 0 if absent."""
        for line in self.admin("/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


class Fleet:
    """Nodes started with ``args`` each, then HAProxy in front of them."""

    def __init__(
        self,
        tmp: Path,
        start_haproxy: Callable[[Callable[[Path], str]], HAProxy],
        count: int,
        *args: str,
    ) -> None:
        self.nodes = [Node(tmp / f"node{i}", f"node-{'ab'[i]}", *args) for i in range(count)]
        self.haproxy = start_haproxy(lambda d: haproxy_config(d, free_port(), self.nodes))
        for node in self.nodes:
            self.haproxy.wait_status("eyewall", node.name, "UP")

    @property
    def address(self) -> tuple[str, int]:
        return self.haproxy.frontend

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        for node in self.nodes:
            node.check_clean()


def request(
    address: tuple[str, int], url: str, source: str, header: bytes = b"", timeout: float = 15
) -> tuple[int, dict[str, str], bytes]:
    """One GET through ``address`` from ``source`` on a new connection: (status, fields,
    body); (0, {}, b"") when the connection closed without an answer."""
    with socket.create_connection(address, timeout=timeout, source_address=(source, 0)) as sock:
        head = f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        sock.sendall(header + head.encode())
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), fields, body


def node_of(fields: dict[str, str]) -> str:
    """The node that answered: its pseudonym in Via, or in Proxy-Status on its own pages."""
    if "via" in fields:
        return fields["via"].rsplit(" ", 1)[-1]
    return fields.get("proxy-status", "").split(";", 1)[0]


# -- one fleet for the tests that leave it as they found it ----------------------------


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
) -> Iterator[Fleet]:
    started: list[HAProxy] = []

    def start_haproxy(make_config: Callable[[Path], str]) -> HAProxy:
        server = HAProxy.start(make_config)
        started.append(server)
        return server

    prefix = f"fleet{int(time.time() * 1000)}"
    fleet = Fleet(
        tmp_path_factory.mktemp("fleet"),
        start_haproxy,
        2,
        "--proxy-protocol-trusted",
        f"{BALANCER}/32",
        "--shared-limits-redis",
        redis_server.url,
        "--shared-limits-prefix",
        prefix,
        "--shared-limits-connect-timeout",
        "5",  # a loaded machine must not look like Redis down
        "--shared-limits-command-timeout",
        "5",
        "--shared-flows-postgresql",
        postgres_server.dsn,
        "--client-rps",
        "0.001",  # nothing refills during the tests
        "--client-burst",
        "4",
    )
    yield fleet
    fleet.stop()
    for server in started:
        server.stop()


def test_traffic_spreads_over_the_nodes_with_the_real_client_address(
    fleet: Fleet, origin: OriginServer
) -> None:
    client = "127.0.0.10"
    answers = [request(fleet.address, f"{origin.url}/echo/{i}", client) for i in range(4)]
    assert [status for status, _, _ in answers] == [200] * 4
    assert sorted(node_of(fields) for _, fields, _ in answers) == [
        "node-a",
        "node-a",
        "node-b",
        "node-b",
    ]
    for node in fleet.nodes:
        line = node.access_entry("/echo/")
        assert f" {client}:" in line and f" {BALANCER}:" not in line


def test_a_client_rate_limit_holds_across_the_nodes(fleet: Fleet, origin: OriginServer) -> None:
    # burst 4 for the whole fleet: each node alone would allow 4 (8 in all)
    answers = [request(fleet.address, f"{origin.url}/echo/rl", "127.0.0.20") for _ in range(8)]
    statuses = [status for status, _, _ in answers]
    assert statuses == [200] * 4 + [429] * 4
    assert {node_of(fields) for status, fields, _ in answers if status == 429} == {
        "node-a",
        "node-b",
    }


def test_headers_from_strangers_and_their_absence_from_the_balancer_are_refused(
    fleet: Fleet, origin: OriginServer
) -> None:
    node = fleet.nodes[0]
    url = f"{origin.url}/echo/direct"
    header = encode(ProxyHeader(2, "PROXY", "TCP4", ("198.51.100.1", 1), ("10.0.0.1", 3128)))
    assert request(node.address, url, STRANGER, header) == (0, {}, b"")
    assert request(node.address, url, BALANCER) == (0, {}, b"")
    node.log_with(f"{STRANGER} sent a PROXY protocol header but is not in proxy_protocol.trusted")
    node.log_with(f"{BALANCER} is in proxy_protocol.trusted but did not begin with a PROXY")
    results = 'eyewall_proxy_protocol_connections_total{result="%s"}'
    assert node.metric(results % "untrusted") == 1
    assert node.metric(results % "missing") == 1
    assert node.metric(results % "proxy") >= 1
    # a stranger without a header is an ordinary client
    status, fields, _ = request(node.address, url, STRANGER)
    assert status == 200 and node_of(fields) == "node-a"
    assert node.metric('eyewall_node_info{node="node-a"}') == 1


def test_one_har_export_holds_the_flows_of_every_node(
    fleet: Fleet, origin: OriginServer, postgres_server: PostgresServer
) -> None:
    marker = f"har{time.monotonic_ns()}"
    for i in range(4):
        status, _, _ = request(fleet.address, f"{origin.url}/echo/{marker}/{i}", "127.0.0.30")
        assert status == 200

    def written() -> bool:  # each node writes a batch a second
        flows = json.loads(fleet.nodes[0].admin(f"/api/flows?q={marker}"))["flows"]
        return len(flows) == 4

    wait_for(written, "four flows in PostgreSQL", timeout=30)
    done = subprocess.run(
        [sys.executable, "-m", "eyewall", "har", "export", "--postgresql", postgres_server.dsn],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    har = json.loads(done.stdout)
    jsonschema.validate(har, json.loads((ROOT / "tests/data/har-1.2.schema.json").read_text()))
    mine = [e for e in har["log"]["entries"] if marker in e["request"]["url"]]
    assert sorted(e["_node"] for e in mine) == ["node-a", "node-a", "node-b", "node-b"]
    # every node's admin API shows the fleet's flows too
    for node in fleet.nodes:
        flows = json.loads(node.admin(f"/api/flows?q={marker}"))["flows"]
        assert sorted(f["node"] for f in flows) == ["node-a", "node-a", "node-b", "node-b"]
        entries = json.loads(node.admin("/api/har"))["log"]["entries"]
        assert {e["_node"] for e in entries if marker in e["request"]["url"]} == {
            "node-a",
            "node-b",
        }
        other = next(f for f in flows if f["node"] != node.name)
        # another node's request id finds its flow in the shared database
        found = json.loads(node.admin(f"/api/flows?q={other['id']}"))["flows"]
        assert other["id"] in [f["id"] for f in found]
        assert json.loads(node.admin(f"/api/flows/{other['id']}"))["node"] == other["node"]


def test_the_dashboard_live_table_shows_every_node(fleet: Fleet, origin: OriginServer) -> None:
    a, b = fleet.nodes
    assert a.admin_url is not None
    url = a.admin_url.replace("http://", "ws://") + "/api/live"
    marker = f"live{time.monotonic_ns()}"

    async def watch() -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        async with connect(url, origin=a.admin_url, proxy=None) as ws:
            hello = json.loads(await ws.recv())
            seen: dict[str, dict[str, Any]] = {}
            for node, path in ((b, "from-b"), (a, "from-a")):  # straight to each node
                await asyncio.to_thread(
                    request, node.address, f"{origin.url}/echo/{marker}/{path}", "127.0.0.70"
                )
            while len(seen) < 2:
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if message["type"] == "flow" and marker in message["flow"]["url"]:
                    seen[message["flow"]["url"].rsplit("/", 1)[1]] = message["flow"]
            return [f.get("node", "") for f in hello["flows"]], seen["from-a"], seen["from-b"]

    hello_nodes, from_a, from_b = asyncio.run(watch())
    assert set(hello_nodes) <= {"node-a"}  # this node's recent flows, named
    assert (from_a["node"], from_b["node"]) == ("node-a", "node-b")
    assert from_b["status"] == 200


def test_the_fleet_metrics_are_the_documented_ones(fleet: Fleet) -> None:
    """A node with every fleet part exposes exactly the families of docs/monitoring.md
    and docs/fleet.md's tables, read from the exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    scraped = {
        family.name
        for family in text_string_to_metric_families(fleet.nodes[0].admin("/metrics"))
        if family.name.startswith("eyewall_")
    }

    def table(doc: str, heading: str) -> set[str]:
        text = (ROOT / "docs" / doc).read_text().split(heading, 1)[1].split("\n## ", 1)[0]
        found = re.findall(r"^\| `(eyewall_[a-z_]+)` \|", text, re.MULTILINE)
        return {name.removesuffix("_total") for name in found}

    documented = table("monitoring.md", "## Metrics") | table("fleet.md", "## Metrics and")
    assert scraped == documented


def test_healthz_answers_the_balancer_without_the_token(fleet: Fleet) -> None:
    answer = json.loads(fleet.nodes[1].admin("/healthz"))
    assert answer["status"] == "ok" and answer["node"] == "node-b"


# -- fleets of their own ---------------------------------------------------------------


@pytest.fixture
def own_fleet(
    tmp_path: Path, haproxy: Callable[[Callable[[Path], str]], HAProxy]
) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(count: int, *args: str) -> Fleet:
        fleet = Fleet(tmp_path / f"f{len(made)}", haproxy, count, *args)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        for node in fleet.nodes:
            node.stop()


class HeldOrigin:
    """An origin that holds every request until `release`; ``via`` lists the node each
    came through."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.via: list[str] = []
        self.origin = RawOrigin(self._handle)

    def _handle(self, sock: socket.socket) -> None:
        head = self.origin.read_head(sock).decode("latin-1")
        found = re.search(r"(?im)^via:.* (\S+)\r$", head)
        self.via.append(found[1] if found else "?")
        self.released.wait(30)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def release(self) -> None:
        self.released.set()


def test_killing_a_node_fails_only_its_requests_in_flight(
    own_fleet: Callable[..., Fleet], origin: OriginServer
) -> None:
    fleet = own_fleet(2, "--proxy-protocol-trusted", f"{BALANCER}/32")
    a, b = fleet.nodes
    held = HeldOrigin()
    try:
        with ThreadPoolExecutor(8) as pool:
            in_flight = [
                pool.submit(request, fleet.address, f"{held.origin.url}/held", "127.0.0.40")
                for _ in range(6)
            ]
            wait_for(lambda: len(held.via) == 6, "six requests held at the origin")
            on_b = held.via.count(b.name)
            assert held.via.count(a.name) + on_b == 6 and on_b > 0
            b.process.send_signal(signal.SIGKILL)
            b.process.wait(10)
            # new requests before HAProxy has seen it: redispatched to node a
            later = [request(fleet.address, f"{origin.url}/echo/after", "127.0.0.41")]
            fleet.haproxy.wait_status("eyewall", b.name, "DOWN")
            later += [request(fleet.address, f"{origin.url}/echo/after", "127.0.0.41")]
            held.release()
            results = [future.result(30) for future in in_flight]
    finally:
        held.release()
        held.origin.stop()
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [0] * on_b + [200] * (6 - on_b)
    assert {node_of(fields) for status, fields, _ in results if status == 200} == {a.name}
    assert [(status, node_of(fields)) for status, fields, _ in later] == [(200, a.name)] * 2


def test_sigterm_takes_a_node_out_before_it_stops_serving(
    own_fleet: Callable[..., Fleet], origin: OriginServer
) -> None:
    fleet = own_fleet(2, "--proxy-protocol-trusted", f"{BALANCER}/32", "--drain-grace", "30")
    a, b = fleet.nodes
    b.process.send_signal(signal.SIGTERM)
    # /healthz says 503 during the grace: HAProxy takes the node out while it still serves
    fleet.haproxy.wait_status("eyewall", b.name, "DOWN")
    assert b.process.poll() is None
    answers = [request(fleet.address, f"{origin.url}/echo/grace", "127.0.0.50") for _ in range(4)]
    assert [(status, node_of(fields)) for status, fields, _ in answers] == [(200, a.name)] * 4


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("closed", [200, 503, 503, 503]),
        ("open", [200, 200, 200, 200]),
        ("local", [200, 200, 200, 429]),  # this node's own bucket, full at first
    ],
)
def test_redis_down_behaves_as_configured(
    tmp_path: Path, origin: OriginServer, mode: str, expected: list[int]
) -> None:
    redis = RedisServer.start()  # this test's own, to stop
    node = Node(
        tmp_path,
        "node-a",
        "--shared-limits-redis",
        redis.url,
        "--shared-limits-when-down",
        mode,
        "--client-rps",
        "0.001",
        "--client-burst",
        "2",
    )
    try:
        url = f"{origin.url}/echo/down"
        statuses = [request(node.address, url, "127.0.0.60")[0]]  # one token spent in Redis
        redis.stop()
        statuses += [request(node.address, url, "127.0.0.60")[0] for _ in range(3)]
        assert statuses == expected
        node.log_with("shared limits: Redis does not answer")
        # closed refuses at the connection already (the connection cap is a limit too)
        operation = "acquire" if mode == "closed" else "take"
        outcome = f'{{operation="{operation}",outcome="{mode}"}}'
        assert node.metric(f"eyewall_shared_limits_unavailable_total{outcome}") == 3
        assert node.metric("eyewall_shared_limits_up") == 0
    finally:
        node.stop()
        redis.stop()
    node.check_clean()
