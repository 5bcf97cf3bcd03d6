"""Monitoring through the real proxy: access log formats, Prometheus metrics, health,
recorded flows, HAR export, the admin API's guards and the live feed."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from eyewall.observe.records import parse_heads
from tests.conftest import PROXY_ARGS, ROOT, poll, read_response
from tests.origins import pattern

SCHEMA = json.loads((ROOT / "tests" / "data" / "har-1.2.schema.json").read_text())


def through(proxy, url: str, **kwargs) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, timeout=10, trust_env=False) as c:
        return c.request(kwargs.pop("method", "GET"), url, **kwargs)


def admin_get(proxy, path: str, **headers: str) -> httpx.Response:
    with httpx.Client(timeout=10, trust_env=False) as c:
        return c.get(proxy.admin_url + path, headers=headers)


def wait_for(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# -- access logs --------------------------------------------------------------------------


def test_json_access_lines_carry_every_field(make_proxy, origin):
    p = make_proxy("--log-format", "json")
    through(p, f"{origin.url}/bytes?n=321&tag=json")
    line = p.access_entry("tag=json")
    entry = json.loads(line)
    for field in (
        "time",
        "ts",
        "id",
        "kind",
        "client",
        "client_port",
        "user",
        "method",
        "url",
        "host",
        "port",
        "upstream",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "ttfb_ms",
        "connect_ms",
        "rule",
        "error",
        "error_detail",
    ):
        assert field in entry, field
    assert entry["status"] == 200 and entry["bytes_out"] == 321 and entry["method"] == "GET"
    assert entry["upstream"].startswith("127.0.0.1:") and entry["rule"] == "default"
    assert entry["duration_ms"] > 0 and entry["ttfb_ms"] > 0


@pytest.mark.parametrize(
    ("fmt", "shape"),
    [
        (
            "squid",
            r"^\d+\.\d{3} +\d+ 127\.0\.0\.1 TCP_MISS/200 5 GET http://\S+ - "
            r"HIER_DIRECT/127\.0\.0\.1 \S+$",
        ),
        (
            "common",
            r"^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "
            r'"GET http://\S+ HTTP/1\.1" 200 5$',
        ),
        (
            "combined",
            r'^127\.0\.0\.1 - - \[.+\] "GET http://\S+ HTTP/1\.1" 200 5 "-" '
            r'"python-httpx/[\d.]+"$',
        ),
    ],
)
def test_squid_and_clf_formats(make_proxy, origin, fmt, shape):
    import re

    p = make_proxy("--log-format", fmt)
    through(p, f"{origin.url}/bytes?n=5&fmt={fmt}")
    assert re.match(shape, p.access_entry(f"fmt={fmt}").rstrip("\n")), p.access_entry("fmt=")


def test_a_stalled_log_reader_never_stalls_traffic(origin, tmp_path):
    """The access log goes to a pipe nobody reads: requests still flow, drops are
    counted."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "eyewall",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--no-flows",
        *PROXY_ARGS,
    ]
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        admin = ""
        while "listening on" not in (line := process.stderr.readline().decode()):
            admin = line.split(" on ", 1)[1].strip() if line.startswith("eyewall admin") else admin
        # From here nobody reads stderr: its pipe fills after ~64 KiB of log lines.
        with httpx.Client(proxy=f"http://127.0.0.1:{port}", timeout=10, trust_env=False) as c:
            pad = "x" * 7000  # long lines: 4 MiB of them wait for the writer within ~600
            for _ in range(1200):
                assert c.get(f"{origin.url}/bytes?n=1&pad={pad}").status_code == 200
        name = 'eyewall_events_dropped_total{subscriber="access_log"}'

        def dropped() -> float:
            metrics = httpx.get(admin + "/metrics", timeout=5, trust_env=False).text
            lines = [line for line in metrics.splitlines() if line.startswith(name)]
            return float(lines[0].split()[-1]) if lines else 0.0

        poll(dropped, what="access lines counted as dropped")
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


# -- metrics and health -------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_bytes_errors_and_decisions(make_proxy, origin):
    p = make_proxy()
    for _ in range(3):
        through(p, f"{origin.url}/bytes?n=100")
    through(p, f"{origin.url}/status?code=404")
    through(p, "http://127.0.0.1:1/")  # refused: 502
    m = samples(admin_get(p, "/metrics").text)
    assert m[("eyewall_requests_total", (("method", "GET"), ("status_class", "2xx")))] == 3
    assert m[("eyewall_requests_total", (("method", "GET"), ("status_class", "4xx")))] == 1
    assert m[("eyewall_requests_total", (("method", "GET"), ("status_class", "5xx")))] == 1
    assert m[("eyewall_bytes_total", (("direction", "out"),))] >= 300
    assert m[("eyewall_errors_total", (("kind", "connection_refused"),))] == 1
    assert m[("eyewall_policy_decisions_total", (("rule", "default"),))] == 5
    assert m[("eyewall_request_duration_seconds_count", ())] == 5
    assert m[("eyewall_upstream_connect_seconds_count", ())] >= 1
    assert m[("eyewall_upstream_reuse_ratio", ())] > 0
    assert ("eyewall_client_connections", ()) in m and ("process_resident_memory_bytes", ()) in m


def test_health_endpoint(make_proxy):
    p = make_proxy()
    r = admin_get(p, "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_requests_aimed_at_the_admin_listener_are_refused(make_proxy):
    p = make_proxy()
    r = through(p, p.admin_url + "/metrics")
    assert r.status_code == 403 and "proxy itself" in r.text


# -- recorded flows and HAR ---------------------------------------------------------------


def test_flows_are_recorded_with_heads_bodies_and_redacted_proxy_credentials(make_proxy, origin):
    p = make_proxy("--flows-body-limit", "16")
    headers = {"Proxy-Authorization": "Basic c2VjcmV0OnNlY3JldA==", "X-Trace": "t1"}
    r = through(
        p, f"{origin.url}/upload?rec=1", method="POST", content=pattern(1000), headers=headers
    )
    assert r.status_code == 200
    db = p.access_path.parent / "flows.sqlite3"

    def row():
        try:
            with sqlite3.connect(db) as c:
                c.row_factory = sqlite3.Row
                return c.execute("SELECT * FROM flows WHERE url LIKE '%rec=1%'").fetchone()
        except sqlite3.Error:
            return None

    record = wait_for(row)
    assert record is not None
    assert record["status"] == 200 and record["bytes_in"] == 1000
    assert bytes(record["request_body"]) == pattern(16)
    headers = dict(parse_heads(record["request_headers"]))
    assert headers["X-Trace"] == "t1"
    assert headers["Proxy-Authorization"] == "[redacted]"
    assert "c2VjcmV0" not in db.read_bytes().decode("latin-1")
    assert oct(db.stat().st_mode & 0o777) == "0o600"


def test_what_the_admin_shows_includes_the_flow_that_just_ended(make_proxy, origin):
    """Observers take flows in batches: every admin endpoint delivers the waiting ones
    first, so a request is counted and listed as soon as its response is in, with no
    waiting on the reader's side (a scraper, the smoke test, a user's first look)."""
    p = make_proxy()
    line = 'eyewall_requests_total{method="GET",status_class="2xx"}'
    # Clients made first and kept alive: the admin is asked within a millisecond or two
    # of the response, well inside a batch's 20 ms.
    with (
        httpx.Client(proxy=p.url, timeout=10, trust_env=False) as user,
        httpx.Client(base_url=p.admin_url, timeout=10, trust_env=False) as admin,
    ):
        admin.get("/healthz")
        for i in range(1, 6):
            assert user.get(f"{origin.url}/bytes?n=1&now={i}").status_code == 200
            metrics = admin.get("/metrics").text
            counted = next(x for x in metrics.splitlines() if x.startswith(line))
            assert float(counted.split()[-1]) == 2 * i - 1, metrics
            assert user.get(f"{origin.url}/bytes?n=1&again={i}").status_code == 200
            newest = admin.get("/api/flows?limit=1").json()["flows"][0]
            assert newest["url"].endswith(f"again={i}")


def test_flows_api_lists_filters_and_details(make_proxy, origin):
    p = make_proxy()
    through(p, f"{origin.url}/bytes?n=3&api=a")
    through(p, f"{origin.url}/status?code=404&api=b")
    flows = admin_get(p, "/api/flows?status=404").json()["flows"]
    assert [f["status"] for f in flows] == [404]
    everything = admin_get(p, "/api/flows?q=api=").json()["flows"]
    assert [f["url"].rsplit("=", 1)[1] for f in everything] == ["b", "a"]  # newest first
    detail = admin_get(p, f"/api/flows/{flows[0]['id']}").json()
    # the request id an error page shows finds its flow in a search too
    found = admin_get(p, f"/api/flows?q={flows[0]['id'].upper()}").json()["flows"]
    assert [f["id"] for f in found] == [flows[0]["id"]]
    assert ["Host", origin.authority] in detail["request"]["headers"]
    assert detail["response"]["status"] == 404
    assert admin_get(p, "/api/flows/nope-1").status_code == 404
    assert [f["url"] for f in admin_get(p, "/api/flows?limit=1").json()["flows"]] == [
        everything[0]["url"]
    ]
    for bad in ("abc", "-1", "1e3", "%C2%B2"):
        answer = admin_get(p, f"/api/flows?limit={bad}")
        assert answer.status_code == 400, bad
        assert "limit" in answer.text
    assert admin_get(p, "/api/flows?limit=0").json()["flows"] == []
    assert admin_get(p, "/api/har?limit=0").json()["log"]["entries"] == []
    assert admin_get(p, "/api/flows?status=5XX").status_code == 200
    for bad in ("abc", "99", "6xx", "4x"):
        answer = admin_get(p, f"/api/flows?status={bad}")
        assert answer.status_code == 400, bad
        assert "status" in answer.text
    assert admin_get(p, "/api/har?since=nan").status_code == 400
    assert len(admin_get(p, "/api/har?since=0&limit=1").json()["log"]["entries"]) == 1


def test_credentials_are_redacted_in_recorded_flows_by_default(make_proxy, origin):
    """Any local user may read the token-less loopback admin: it must not hand out every
    client's cookies and passwords (flows.credentials opts in)."""
    p = make_proxy()
    through(
        p,
        f"{origin.url}/cookies?x=1&access_token=t0k3n&X-Amz-Signature=s1g",
        headers={
            "Cookie": "session=s3cr3t",
            "Authorization": "Basic dXNlcjpwdw==",
            "X-Api-Key": "ap1k3y",
            "X-Auth-Token": "auth70k",
            "Cookie2": "c00k1e2",
            "Referer": "http://u:r3f3rpw@example.com/page?api_key=r3fk3y&q=ok",
        },
    )
    flows = admin_get(p, "/api/flows").json()["flows"]
    assert flows[0]["url"].endswith(
        "/cookies?x=1&access_token=[redacted]&X-Amz-Signature=[redacted]"
    )
    detail = admin_get(p, f"/api/flows/{flows[0]['id']}").json()
    headers = detail["request"]["headers"]
    for name in ("Cookie", "Authorization", "X-Api-Key", "X-Auth-Token", "Cookie2"):
        assert [name, "[redacted]"] in headers, name
    assert ["Referer", "http://***@example.com/page?api_key=[redacted]&q=ok"] in headers
    secrets = ("s3cr3t", "dXNlcjpwdw", "ap1k3y", "auth70k", "c00k1e2", "r3f3rpw", "r3fk3y")
    secrets += ("t0k3n", "s1g")
    assert not [x for x in secrets if x in admin_get(p, "/api/flows").text]
    assert all(
        value == "[redacted]"
        for name, value in detail["response"]["headers"]
        if name.lower() == "set-cookie"
    )
    har = admin_get(p, "/api/har").text
    assert not [x for x in secrets if x in har]
    db = p.access_path.parent / "flows.sqlite3"
    assert wait_for(
        lambda: (
            db.exists()
            and sqlite3.connect(db).execute("SELECT COUNT(*) FROM flows").fetchone()[0] == 1
        )
    )
    rows = sqlite3.connect(db).execute("SELECT url, request_headers FROM flows").fetchall()
    assert not [x for x in secrets if x in repr(rows)]


def test_har_download_and_cli_export_validate_against_the_har_schema(make_proxy, origin, tmp_path):
    p = make_proxy("--flows-body-limit", "1000", "--flows-credentials")
    through(p, f"{origin.url}/cookies?x=1&y=2", headers={"Cookie": "a=1; b=2"})
    through(p, f"{origin.url}/upload", method="POST", content=b"hello har")
    through(p, f"{origin.url}/bytes?n=700")
    download = admin_get(p, "/api/har")
    assert download.headers["content-disposition"].startswith("attachment")
    with httpx.Client(timeout=10, trust_env=False) as c:  # HEAD: GET's head, no body
        for path in ("/api/har", "/api/flows", "/metrics", "/healthz"):
            head = c.head(p.admin_url + path)
            assert head.status_code == 200 and head.content == b"", path
    head = httpx.head(p.admin_url + "/api/har", trust_env=False, timeout=10)
    assert head.headers["content-disposition"] == download.headers["content-disposition"]
    document = download.json()
    jsonschema.validate(document, SCHEMA)
    entries = document["log"]["entries"]
    assert len(entries) == 3
    first = entries[0]
    assert {"name": "x", "value": "1"} in first["request"]["queryString"]
    assert {"name": "b", "value": "2"} in first["request"]["cookies"]
    assert [c["name"] for c in first["response"]["cookies"]] == ["a", "b"]
    assert entries[1]["request"]["postData"]["text"] == "hello har"
    db = p.access_path.parent / "flows.sqlite3"
    assert wait_for(
        lambda: (
            db.exists()
            and sqlite3.connect(db).execute("SELECT COUNT(*) FROM flows").fetchone()[0] == 3
        )
    )
    exported = subprocess.run(
        [sys.executable, "-m", "eyewall", "har", "export", "--flows", str(db)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=True,
    )
    har = json.loads(exported.stdout)
    jsonschema.validate(har, SCHEMA)
    assert [e["request"]["url"] for e in har["log"]["entries"]] == [
        e["request"]["url"] for e in entries
    ]


def test_har_limits_count_exchanges_not_tunnels(make_proxy, origin, tmp_path):
    """Opaque tunnels are no HAR entries, so they must not use up a --limit."""
    p = make_proxy("--connect-port", "1024-65535")
    through(p, f"{origin.url}/bytes?n=1&i=exchange")
    for _ in range(2):
        with socket.create_connection(p.address, timeout=5) as s:
            s.sendall(f"CONNECT {origin.authority} HTTP/1.1\r\n\r\n".encode())
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    db = p.access_path.parent / "flows.sqlite3"
    assert wait_for(
        lambda: (
            db.exists()
            and sqlite3.connect(db).execute("SELECT COUNT(*) FROM flows").fetchone()[0] == 3
        )
    )
    download = admin_get(p, "/api/har?limit=1").json()
    assert [e["request"]["url"] for e in download["log"]["entries"]] == [
        f"{origin.url}/bytes?n=1&i=exchange"
    ]
    # the host filter takes the host in any spelling the flows API and rules take
    assert origin.authority.startswith("127.0.0.1:")
    for spelling in ("127.0.0.1", "0x7f.1", "[::ffff:127.0.0.1]"):
        entries = admin_get(p, f"/api/har?host={spelling}").json()["log"]["entries"]
        assert len(entries) == 1, spelling
    exported = subprocess.run(
        [sys.executable, "-m", "eyewall", "har", "export", "--flows", str(db), "--limit", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=True,
    )
    assert len(json.loads(exported.stdout)["log"]["entries"]) == 1


def test_retention_keeps_the_newest_flows(make_proxy, origin):
    p = make_proxy("--flows-max-count", "5")
    for i in range(12):
        through(p, f"{origin.url}/bytes?n=1&i={i}")
    db = p.access_path.parent / "flows.sqlite3"
    through(p, f"{origin.url}/bytes?n=1&i=last")

    def kept():
        rows = sqlite3.connect(db).execute("SELECT url FROM flows").fetchall()
        return rows if len(rows) <= 6 and any("i=last" in r[0] for r in rows) else None

    rows = wait_for(kept, timeout=15)
    assert rows, sqlite3.connect(db).execute("SELECT COUNT(*) FROM flows").fetchone()


# -- admin guards ---------------------------------------------------------------------------


def test_dns_rebinding_guard(make_proxy):
    p = make_proxy()
    assert admin_get(p, "/healthz", Host="attacker.example").status_code == 403
    assert admin_get(p, "/healthz", Host="localhost").status_code == 200
    for spelling in ("LocalHost:8480", "127.0.0.1:1", "[::1]:8480", "[::1]"):
        assert admin_get(p, "/healthz", Host=spelling).status_code == 200, spelling
    for spelling in ("[", "[::1", "[::1]x", "localhost.attacker.example"):
        assert admin_get(p, "/healthz", Host=spelling).status_code == 403, spelling


def test_admin_token(make_proxy):
    p = make_proxy("--admin-token", "s3cret-token")
    assert admin_get(p, "/api/flows").status_code == 401
    assert admin_get(p, "/api/flows", Authorization="Bearer wrong").status_code == 401
    assert admin_get(p, "/api/flows", Authorization="Bearer s3cret-token").status_code == 200
    for page in ("/", "/static/app.js", "/api/stats", "/api/flows"):
        refused = admin_get(p, page)  # what a person opening the page sees: how to log in
        assert refused.status_code == 401, page
        assert refused.headers["content-type"].startswith("text/plain"), page
        assert "/login?token=" in refused.text, page
        assert refused.headers["www-authenticate"].startswith("Bearer "), page
    health = admin_get(p, "/healthz")  # a load balancer has no token
    assert health.status_code == 200 and health.json()["node"]  # the host name by default
    with httpx.Client(timeout=10, trust_env=False) as c:
        login = c.get(p.admin_url + "/login?token=s3cret-token")
        assert login.status_code == 302
        assert c.get(p.admin_url + "/api/flows").status_code == 200  # cookie from /login
    assert "s3cret-token" not in p.stderr()


def test_admin_elsewhere_than_loopback_needs_a_token():
    result = subprocess.run(
        [sys.executable, "-m", "eyewall", "--admin-listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2 and "admin.token" in result.stderr


# -- live feed ------------------------------------------------------------------------------


def test_live_feed_pushes_flows_and_stats(make_proxy, origin):
    p = make_proxy()
    url = p.admin_url.replace("http://", "ws://") + "/api/live"

    async def watch() -> tuple[dict, dict, dict]:
        async with connect(url, origin=p.admin_url, proxy=None) as ws:
            hello = json.loads(await ws.recv())
            await asyncio.to_thread(through, p, f"{origin.url}/bytes?n=9&live=1")
            flow = stats = None
            while flow is None or stats is None:
                message = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if message["type"] == "flow":
                    flow = message
                elif message["type"] == "stats":
                    stats = message
            return hello, flow, stats

    hello, flow, stats = asyncio.run(watch())
    assert hello["type"] == "hello"
    assert flow["flow"]["url"].endswith("live=1") and flow["flow"]["status"] == 200
    assert {"connections", "tunnels", "requests_per_s", "status", "latency_ms"} <= set(stats)


def test_live_feed_refuses_other_origins(make_proxy):
    p = make_proxy()
    url = p.admin_url.replace("http://", "ws://") + "/api/live"

    async def attempt() -> None:
        async with connect(url, origin="http://evil.example", proxy=None):
            pass

    with pytest.raises(InvalidStatus) as info:
        asyncio.run(attempt())
    assert info.value.response.status_code == 403


def test_health_says_draining_during_shutdown(make_proxy, origin, raw_origin):
    """On SIGTERM /healthz answers 503 at once; for the drain grace the proxy still
    serves new requests (a load balancer stops sending first); in-flight work ends."""
    import signal
    import threading

    gate = threading.Event()

    def held(sock):  # answers only once the test has seen what it waits for
        slow.read_head(sock)
        gate.wait(30)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    slow = raw_origin(held)
    p = make_proxy("--drain-timeout", "10", "--drain-grace", "3")
    with socket.create_connection(p.address, timeout=10) as s:
        s.sendall(f"GET {slow.url}/held HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        poll(lambda: slow.requests, what="the request to reach the origin")
        p.signal(signal.SIGTERM)
        poll(lambda: admin_get(p, "/healthz").status_code == 503, what="/healthz to say 503")
        assert through(p, f"{origin.url}/bytes?n=3").status_code == 200  # the grace
        gate.set()
        assert read_response(s).startswith(b"HTTP/1.1 200")
    assert p.process.wait(15) == 0


def test_metrics_list_matches_the_docs_and_the_scrape(make_proxy, origin):
    """Every family a scrape shows is in docs/monitoring.md's table, and every documented
    eyewall_ family is in the scrape: read from the exposition, not from source text."""
    from prometheus_client.parser import text_string_to_metric_families

    p = make_proxy()
    through(p, f"{origin.url}/echo/metrics")
    scraped = {
        family.name for family in text_string_to_metric_families(admin_get(p, "/metrics").text)
    }
    scraped = {name for name in scraped if name.startswith("eyewall_")}
    table = Path(ROOT / "docs" / "monitoring.md").read_text().split("## Metrics", 1)[1]
    documented = {
        name.removesuffix("_total")
        for name in re.findall(r"^\| `(eyewall_[a-z_]+)` \|", table, re.MULTILINE)
    }
    assert scraped == documented
