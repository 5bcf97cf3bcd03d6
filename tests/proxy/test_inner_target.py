"""Where a request read inside an intercepted tunnel goes: always to the tunnel's host
and port, whatever the request names.  Origin-form takes the Host field's spelling only
when it names the tunnel's host; absolute-form naming another host, and CONNECT, are
refused (a client must not reach a second host through the first one's tunnel)."""

from __future__ import annotations

import pytest

from eyewall.http1.parse import parse_request_head
from eyewall.http1.target import TargetError, parse_authority
from eyewall.proxy.client import inner_target

TUNNEL = parse_authority("shop.example:443")


def head(line: str, *fields: str) -> bytes:
    return (line + "\r\n" + "".join(f"{f}\r\n" for f in fields) + "\r\n").encode()


@pytest.mark.parametrize(
    ("request_bytes", "authority", "path"),
    [
        (head("GET /cart HTTP/1.1", "Host: shop.example"), "shop.example", "/cart"),
        (head("GET /cart HTTP/1.1", "Host: SHOP.example:443"), "shop.example:443", "/cart"),
        (head("GET /cart HTTP/1.1", "Host: other.example"), "shop.example:443", "/cart"),
        (head("GET /cart HTTP/1.1", "Host: shop.example:8443"), "shop.example:443", "/cart"),
        (head("GET /cart HTTP/1.1", "Host: bad host"), "shop.example:443", "/cart"),
        (head("GET /cart HTTP/1.1"), "shop.example:443", "/cart"),
        (head("OPTIONS * HTTP/1.1", "Host: shop.example"), "shop.example", "*"),
        (head("GET https://shop.example/a?b HTTP/1.1", "Host: x"), "shop.example", "/a?b"),
    ],
    ids=[
        "host",
        "host-with-port",
        "other-host",
        "other-port",
        "bad-host",
        "no-host",
        "asterisk",
        "absolute-form",
    ],
)
def test_requests_go_to_the_tunnels_host(request_bytes, authority, path):
    target = inner_target(TUNNEL, parse_request_head(request_bytes))
    assert (target.scheme, target.host, target.port) == ("https", "shop.example", 443)
    assert (target.authority, target.path) == (authority, path)


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (head("GET https://other.example/ HTTP/1.1", "Host: shop.example"), "another host"),
        (head("GET https://shop.example:8443/ HTTP/1.1"), "another host"),
        (head("CONNECT other.example:443 HTTP/1.1"), "CONNECT inside"),
    ],
    ids=["other-host", "other-port", "connect"],
)
def test_a_request_naming_another_destination_is_refused(request_bytes, reason):
    with pytest.raises(TargetError, match=reason):
        inner_target(TUNNEL, parse_request_head(request_bytes))
