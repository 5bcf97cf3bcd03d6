"""Addons loaded from files change what real origins and real clients see."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from eyewall.addons.hooks import reference
from tests.conftest import ROOT, poll
from tests.origins import pattern


def write(tmp_path: Path, name: str, code: str) -> str:
    path = tmp_path / name
    path.write_text(code)
    return str(path)


def through(proxy, url: str, **kwargs) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, timeout=10, trust_env=False) as c:
        return c.request(kwargs.pop("method", "GET"), url, **kwargs)


def test_header_addon_changes_what_origin_and_client_see(make_proxy, origin):
    p = make_proxy("--addon", str(ROOT / "examples" / "add_header.py"))
    r = through(p, f"{origin.url}/echo")
    assert r.headers["x-inspected-by"] == "eyewall"
    assert ["X-Forwarded-By", "eyewall"] in r.json()["headers"]


def test_blocking_addon_answers_with_its_page(make_proxy, origin):
    before = len(origin.seen_connections)
    p = make_proxy("--addon", str(ROOT / "examples" / "block_pattern.py"))
    r = through(p, f"{origin.url}/ads/banner.js?x=1&y=2")
    assert r.status_code == 403
    assert "This address is blocked" in r.text and "x=1&amp;y=2" in r.text  # escaped
    assert int(r.headers["content-length"]) == len(r.content)
    assert len(origin.seen_connections) == before  # the origin never saw it
    assert through(p, f"{origin.url}/bytes?n=3").content == pattern(3)


BODY_ADDON = """
class Rewrite:
    def requestheaders(self, flow):
        flow.request.buffer(1 << 20)
        if flow.request.path.startswith("/echo/old"):
            flow.request.path = "/echo/new"

    def request(self, flow):
        if flow.request.body is not None:
            flow.request.body = flow.request.body.upper() + b"!"

    def responseheaders(self, flow):
        flow.response.buffer(1 << 20)

    async def response(self, flow):
        if flow.response.body is not None and flow.request.path.startswith("/bytes"):
            flow.response.body = b"<" + flow.response.body[:4] + b">"
            flow.response.headers.set("X-Rewritten", "yes")
"""


def test_bodies_are_buffered_changed_and_reframed(make_proxy, origin, tmp_path):
    p = make_proxy("--addon", write(tmp_path, "rewrite.py", BODY_ADDON))
    r = through(p, f"{origin.url}/upload", method="POST", content=b"hello")
    assert r.json() == {"size": 6, "sha256": hashlib.sha256(b"HELLO!").hexdigest()}

    def chunks():
        yield b"abc"
        yield b"def"

    r = through(p, f"{origin.url}/upload", method="POST", content=chunks())  # chunked in
    assert r.json()["sha256"] == hashlib.sha256(b"ABCDEF!").hexdigest()
    r = through(p, f"{origin.url}/bytes?n=1000&chunked=1&piece=100")
    assert r.content == b"<" + pattern(4) + b">"
    assert r.headers["content-length"] == "6" and "transfer-encoding" not in r.headers
    assert r.headers["x-rewritten"] == "yes"
    r = through(p, f"{origin.url}/echo/old")
    assert r.json()["uri"] == "/echo/new"


OVER_CAP = """
class Small:
    def requestheaders(self, flow):
        flow.request.buffer(100)

    def request(self, flow):
        flow.metadata["truncated"] = flow.request.truncated

    def responseheaders(self, flow):
        flow.response.headers.set("X-Request-Truncated", str(flow.metadata["truncated"]))
        flow.response.buffer(10)

    def response(self, flow):
        assert flow.response.body is None and flow.response.truncated
"""


def test_bodies_over_the_cap_keep_streaming(make_proxy, origin, tmp_path):
    p = make_proxy("--addon", write(tmp_path, "small.py", OVER_CAP))
    body = pattern(300_000)
    r = through(p, f"{origin.url}/upload", method="POST", content=body)
    assert r.headers["x-request-truncated"] == "True"
    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()

    def chunks():
        for i in range(30):
            yield pattern(1000 + i)

    sent = b"".join(pattern(1000 + i) for i in range(30))
    r = through(p, f"{origin.url}/upload", method="POST", content=chunks())
    assert r.json()["sha256"] == hashlib.sha256(sent).hexdigest()
    for query in ("n=5000", "n=5000&chunked=1&piece=64"):
        assert through(p, f"{origin.url}/bytes?{query}").content == pattern(5000)


CRASHING = """
class Crash:
    def requestheaders(self, flow):
        raise RuntimeError("addon bug")
"""


def test_a_crashing_addon_does_not_stop_traffic(make_proxy, origin, tmp_path):
    p = make_proxy("--addon", write(tmp_path, "crash.py", CRASHING))
    p.expected_errors.append("addon crash.Crash failed in requestheaders")
    r = through(p, f"{origin.url}/bytes?n=7&token=s3cret")
    assert r.content == pattern(7)
    # the line names the request: its id (as on error pages and in the access log)
    line = p.log_with("addon crash.Crash failed in requestheaders")
    flow_id = p.access_entry("/bytes?n=7").split()[2]  # time client id method url ...
    assert f"of request {flow_id} (GET {origin.url}/bytes?n=7&token=[redacted])" in line
    p.log_with("RuntimeError: addon bug")


def test_a_crashing_policy_addon_fails_closed(make_proxy, origin, tmp_path):
    p = make_proxy("--policy-addon", write(tmp_path, "crash.py", CRASHING))
    p.expected_errors.append("addon crash.Crash failed in requestheaders")
    r = through(p, f"{origin.url}/bytes?n=7")
    assert r.status_code == 502 and "addon crash.Crash failed" in r.text


HOOK_LOG = """
import json, os
LOG = os.environ["EYEWALL_TEST_HOOK_LOG"]

class Recorder:
    def _note(self, *parts):
        with open(LOG, "a") as f:
            f.write(json.dumps(parts) + "\\n")

    def load(self, loader):
        self._note("load", loader.path.name)

    def running(self):
        self._note("running")

    def client_connected(self, client):
        self._note("client_connected", client.address[0])

    async def http_connect(self, flow):
        self._note("http_connect", flow.request.host)
        if flow.request.port == 4444:
            flow.respond(403, {"Content-Type": "text/plain"}, "no 4444 here")

    def tunnel_start(self, flow):
        self._note("tunnel_start", flow.request is None)

    def tunnel_end(self, flow):
        self._note("tunnel_end", flow.bytes_in, flow.bytes_out)

    def error(self, flow):
        self._note("error", flow.error)
"""


def test_connect_tunnel_and_error_hooks(make_proxy, origin, raw_origin, tmp_path, monkeypatch):
    import socket

    from tests.conftest import read_response

    log = tmp_path / "hooks.log"
    monkeypatch.setenv("EYEWALL_TEST_HOOK_LOG", str(log))
    p = make_proxy("--addon", write(tmp_path, "recorder.py", HOOK_LOG))

    def echo(sock):
        while data := sock.recv(100):
            sock.sendall(data)

    upstream = raw_origin(echo)
    with socket.create_connection(p.address, timeout=5) as s:
        s.sendall(f"CONNECT {upstream.authority} HTTP/1.1\r\n\r\n".encode())
        assert read_response(s, head_only=True).startswith(b"HTTP/1.1 200")
        s.sendall(b"ping")
        assert s.recv(10) == b"ping"
    with socket.create_connection(p.address, timeout=5) as s:
        s.sendall(b"CONNECT 127.0.0.1:4444 HTTP/1.1\r\n\r\n")
        refused = read_response(s)
    assert refused.startswith(b"HTTP/1.1 403") and refused.endswith(b"no 4444 here")
    through(p, "http://127.0.0.1:1/")  # refused by the origin: the error hook runs

    def entries():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    poll(lambda: any(e[0] == "tunnel_end" for e in entries()), what="the tunnel_end hook")
    names = [e[0] for e in entries()]
    assert names[:2] == ["load", "running"]
    assert "client_connected" in names and "http_connect" in names
    assert ["tunnel_end", 4, 4] in entries()
    assert ["error", "connection_refused"] in entries()


def test_addons_reload_when_their_file_changes(make_proxy, origin, tmp_path):
    path = tmp_path / "live.py"
    path.write_text(
        "class Tag:\n    def responseheaders(self, flow):\n"
        "        flow.response.headers.set('X-Version', '1')\n"
    )
    p = make_proxy("--addon", str(path))
    assert through(p, f"{origin.url}/bytes?n=1").headers["x-version"] == "1"
    path.write_text(path.read_text().replace("'1'", "'2'"))
    os.utime(path, (time.time() + 5, time.time() + 5))
    poll(
        lambda: through(p, f"{origin.url}/bytes?n=1").headers["x-version"] == "2",
        what="the addon to be reloaded",
        interval=0.2,
    )
    p.expected_errors.append("failed to load")
    path.write_text("this is not python(")
    os.utime(path, (time.time() + 10, time.time() + 10))
    p.log_with("live.py failed to load: SyntaxError", timeout=10)
    assert through(p, f"{origin.url}/bytes?n=1").headers["x-version"] == "2"  # old one kept


def test_an_addon_that_fails_to_load_stops_start_up(tmp_path):
    bad = write(tmp_path, "bad.py", "import does_not_exist\n")
    result = subprocess.run(
        [sys.executable, "-m", "eyewall", "--addon", bad, "--admin-listen", "off"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2  # an invalid configuration: not retried by systemd
    assert "bad.py failed to load (line 1): ModuleNotFoundError" in result.stderr
    assert result.stderr.count("bad.py") == 1  # said once


def test_json_logging_example(make_proxy, origin, monkeypatch):
    monkeypatch.setenv("EYEWALL_API_HOST", "127.0.0.1")
    p = make_proxy("--addon", str(ROOT / "examples" / "log_json_bodies.py"))
    r = through(p, f"{origin.url}/echo/api", method="POST", json={"b": 1, "a": [1, 2]})
    assert r.status_code == 200
    p.log_with('"a": [1, 2], "b": 1')
    log = p.log_with("response http://127.0.0.1")  # its own line, which may come later
    assert "request http://127.0.0.1" in log and '{"a": [1, 2], "b": 1}' in log
    assert '"method": "POST"' in log


def test_hook_reference_is_generated_from_the_code():
    assert (ROOT / "docs" / "hooks.md").read_text() == reference()
