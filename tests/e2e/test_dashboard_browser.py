"""The live dashboard in a real headless Chromium, against a real Eyewall process.

Drives the page with Playwright: flows appear live in the table, the filters narrow it,
a row opens the detail panel, and the charts draw from the `stats` messages.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ProxyProcess
from tests.origins import OriginServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
TIMEOUT_MS = 10_000
XSS = '<img src=x onerror="window.pwned=1">'

if not Path(CHROMIUM).exists():
    pytest.skip("chromium not installed", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
expect = sync_api.expect


def admin_url(proxy: ProxyProcess, timeout: float = 10.0) -> str:
    """The admin listener's URL, from the `eyewall admin on http://…` start-up line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"^eyewall admin on (http://\S+)$", proxy.stderr(), re.MULTILINE)
        if match:
            return match.group(1).rstrip("/")
        time.sleep(0.02)
    raise AssertionError("no 'eyewall admin on' line:\n" + proxy.stderr()[-3000:])


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A page in a fresh headless Chromium profile; fails the test on page errors."""
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            headless=True,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "console",
                lambda msg: errors.append(msg.text) if msg.type == "error" else None,
            )
            yield page
        finally:
            context.close()
    assert not errors, "errors in the page:\n" + "\n".join(errors)


def test_dashboard_live_table_filters_detail_and_charts(
    make_proxy: Callable[..., ProxyProcess],
    origin: OriginServer,
    page: Any,
    tmp_path: Path,
) -> None:
    proxy = make_proxy(
        "--admin-listen",
        "127.0.0.1:0",
        "--flows",
        str(tmp_path / "flows.sqlite3"),
        "--flows-body-limit",
        "4096",
    )
    page.goto(admin_url(proxy) + "/")
    expect(page.locator("#live")).to_have_text("live")  # the WebSocket said hello
    rows = page.locator("#flows tr.flow")
    expect(rows).to_have_count(0)

    # Traffic through the proxy, to two hosts (127.0.0.1 and localhost) and a 404.
    local = origin.url.replace("127.0.0.1", "localhost")
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as client:
        assert client.get(f"{origin.url}/echo/one").status_code == 200
        assert client.get(f"{origin.url}/bytes?n=3000").status_code == 200
        assert client.get(f"{origin.url}/status?code=404").status_code == 404
        probe = {"X-Probe": XSS}  # shown as text, never run
        assert client.post(f"{local}/echo/two", content=b"hello", headers=probe).status_code == 200

    # They arrive live, newest on top, with their status class.
    expect(rows).to_have_count(4)
    expect(rows.nth(0).locator("td.url")).to_have_text(re.compile(r"^localhost:\d+/echo/two$"))
    expect(rows.nth(0).locator("td.method")).to_have_text("POST")
    expect(rows.nth(3).locator("td.url")).to_contain_text("/echo/one")
    # The code parameter is recorded redacted (a credential-like name): rows are found
    # by their path and status.
    not_found = rows.filter(has=page.locator("td.status", has_text="404"))
    expect(not_found.locator("td.url")).to_contain_text("/status?code=")
    expect(not_found.locator("td.status")).to_have_text("404")
    expect(not_found.locator("td.status")).to_have_class(re.compile(r"\bstatus-4xx\b"))
    expect(rows.filter(has_text="/bytes?n=3000").locator("td.status")).to_have_class(
        re.compile(r"\bstatus-2xx\b")
    )

    # Filters: status, then host, then free text; clearing brings everything back.
    page.fill("#filter-status", "404")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("/status?code=")
    page.fill("#filter-status", "2xx")
    expect(rows).to_have_count(3)
    page.fill("#filter-status", "")
    page.fill("#filter-host", "localhost")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("/echo/two")
    page.fill("#filter-host", "127.0.0.1")
    expect(rows).to_have_count(3)
    page.fill("#filter-method", "post")
    expect(rows).to_have_count(0)
    page.fill("#filter-method", "")
    page.fill("#filter-text", "bytes")
    expect(rows).to_have_count(1)

    # A new flow that does not match the filters stays out; one that matches comes in.
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as client:
        client.get(f"{origin.url}/status?code=500")
        client.get(f"{origin.url}/bytes?n=10")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("/bytes?n=10")
    page.fill("#filter-text", "")
    page.fill("#filter-host", "")
    expect(rows).to_have_count(6)

    # The detail panel of the 404: request and response heads, timings, sizes.
    detail = page.locator("#detail")
    expect(detail).to_be_hidden()
    rows.filter(has=page.locator("td.status", has_text="404")).click()
    expect(detail).to_be_visible()
    expect(page.locator("#detail-title")).to_contain_text("/status?code=")
    request_headers = detail.locator("table.request-headers")
    expect(request_headers.locator("th", has_text=re.compile(r"^Host$"))).to_have_count(1)
    expect(request_headers).to_contain_text(origin.authority)
    response_headers = detail.locator("table.response-headers")
    expect(response_headers.locator("th", has_text=re.compile(r"^Content-Length$"))).to_have_count(
        1
    )
    expect(detail).to_contain_text("404 Not Found")
    for label in ("Connect", "First byte", "Total", "To client", "Rule"):
        expect(detail.locator("dt", has_text=re.compile(f"^{label}$"))).to_have_count(1)
    expect(page.locator("#flows tr.flow.selected")).to_have_count(1)

    # Another row replaces it: the recorded request body, and header values as text.
    rows.filter(has_text="/echo/two").click()
    expect(page.locator("#detail-title")).to_contain_text("/echo/two")
    expect(detail.locator("pre").first).to_have_text("hello")
    expect(request_headers.locator("td", has_text="onerror")).to_have_text(XSS)
    expect(detail.locator("img")).to_have_count(0)
    assert page.evaluate("window.pwned") is None
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()
    expect(page.locator("#flows tr.flow.selected")).to_have_count(0)

    # Charts: a `stats` message filled the counters, and the status chart drew the 2xx
    # responses (green pixels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).to_have_text(re.compile(r"^\d+$"))
    expect(page.locator("#count-pool_idle")).to_have_text(re.compile(r"^\d+$"))
    page.wait_for_function(
        """() => {
            const c = document.querySelector('#chart-status');
            const top = Math.ceil(24 * devicePixelRatio);
            const data = c.getContext('2d').getImageData(0, top, c.width, c.height - top).data;
            for (let i = 0; i < data.length; i += 4) {
                if (data[i] < 60 && data[i + 1] > 140 && data[i + 2] < 120) return true;
            }
            return false;
        }""",
        timeout=TIMEOUT_MS,
    )

    # The downloads are plain links.
    expect(page.locator("a", has_text="Download HAR")).to_have_attribute("href", "api/har")
    expect(page.locator("a", has_text="CA certificate")).to_have_attribute("href", "api/ca.pem")

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot))
    assert shot.exists()
    assert shot.stat().st_size > 10_000, shot.stat().st_size
