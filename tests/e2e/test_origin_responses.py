"""Faulty origin responses: what curl reads from the origin directly, and what it reads
through the proxy.

This is the evidence for the decisions in `eyewall.http1.response` and
`eyewall.http1.framing.body_framing` (the table in docs/http.md, which also has what
Chromium does): each response is served by a raw socket origin, fetched by curl
directly and through Eyewall.  Where curl reads it, the proxy repairs it and curl reads
the same body through the proxy.  The rows where the two disagree are deliberate and
say why: the proxy reads a few heads curl refuses (Chromium reads them, and the RFC
allows the repair), and refuses a few curl reads (framing that recipients disagree
about, or an RFC MUST).
"""

from __future__ import annotations

import gzip
import shutil
import socket
import subprocess

import pytest

from tests.conftest import ProxyProcess
from tests.origins import RawOrigin

if shutil.which("curl") is None:
    pytest.skip("curl is not installed", allow_module_level=True)

GZ = gzip.compress(b"hello", mtime=0)
CL2 = b"Content-Length: 2\r\n\r\nok"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# id, response the origin sends (then it closes), and the body curl reads directly and
# through the proxy.
REPAIRED = [
    ("space before colon", b"HTTP/1.1 200 OK\r\nX-Frame-Note : yes\r\n" + CL2, b"ok"),
    ("tab before colon", b"HTTP/1.1 200 OK\r\nX-A\t: yes\r\n" + CL2, b"ok"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: a\r\n  b\r\n" + CL2, b"ok"),
    ("invalid name", b"HTTP/1.1 200 OK\r\nX(A): yes\r\n" + CL2, b"ok"),
    ("obs-text name", b"HTTP/1.1 200 OK\r\nX\xe9: yes\r\n" + CL2, b"ok"),
    ("empty name", b"HTTP/1.1 200 OK\r\n: yes\r\n" + CL2, b"ok"),
    ("control in value", b"HTTP/1.1 200 OK\r\nX-A: a\x01b\x7f\r\n" + CL2, b"ok"),
    ("bare CR in value", b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\n" + CL2, b"ok"),
    ("no reason", b"HTTP/1.1 200\r\n" + CL2, b"ok"),
    ("lower-case version", b"http/1.1 200 OK\r\n" + CL2, b"ok"),
    ("two spaces", b"HTTP/1.1  200 OK\r\n" + CL2, b"ok"),
    ("no space before reason", b"HTTP/1.1 200OK\r\n" + CL2, b"ok"),
    ("control in reason", b"HTTP/1.1 200 O\x01K\r\n" + CL2, b"ok"),
    ("bare CR in reason", b"HTTP/1.1 200 O\rK\r\n" + CL2, b"ok"),
    ("status 600", b"HTTP/1.1 600 X\r\n" + CL2, b"ok"),
    ("HTTP/2.0 status line", b"HTTP/2.0 200 OK\r\n" + CL2, b"ok"),
    (
        "chunked on two lines",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk(b"ok")
        + b"0\r\n\r\n",
        b"ok",
    ),
    (
        "chunked, chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"ok",
    ),
    (
        "gzip, chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunk(GZ) + b"0\r\n\r\n",
        b"hello",
    ),
    ("gzip until close", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + GZ, b"hello"),
    ("identity", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nhello", b"hello"),
    ("empty Transfer-Encoding", b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n\r\nhello", b"hello"),
    (
        "Content-Length and chunked",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk(b"ok")
        + b"0\r\n\r\n",
        b"ok",
    ),
]
# id, response, curl's exit code directly, why the proxy reads what curl refuses
READ_THOUGH_CURL_REFUSES = [
    (
        "no colon",
        b"HTTP/1.1 200 OK\r\nX-A yes\r\n" + CL2,
        8,
        "Chromium drops the line and reads the response",
    ),
    (
        "space before the first field",
        b"HTTP/1.1 200 OK\r\n X-A: a\r\n" + CL2,
        43,
        "RFC 9112 §2.2 lets a recipient ignore the line; Chromium does",
    ),
    ("tab after version", b"HTTP/1.1\t200 OK\r\n" + CL2, 1, "Chromium reads it"),
]
# id, response, curl's exit code directly (0: it reads the response), why the proxy
# answers 502 anyway when curl reads it
REFUSED = [
    ("NUL in value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n" + CL2, 8, ""),
    ("NUL in reason", b"HTTP/1.1 200 O\x00K\r\n" + CL2, 8, ""),
    ("status 099", b"HTTP/1.1 099 X\r\n" + CL2, 1, ""),
    ("Content-Length without a colon", b"HTTP/1.1 200 OK\r\nContent-Length 2\r\n\r\nok", 8, ""),
    ("status 2000", b"HTTP/1.1 2000 X\r\n" + CL2, 1, ""),
    (
        "chunked, gzip",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        61,
        "",
    ),
    (
        "space before the colon of Content-Length",
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nokEXTRA",
        0,
        "curl ignores that field and reads to the close, Chromium obeys it and reads 2"
        " bytes: recipients disagree about the framing",
    ),
    (
        "chunked in HTTP/1.0",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        0,
        "RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message MUST be treated as faulty"
        " (Chromium does not decode it: recipients disagree)",
    ),
]


def serve(raw_origin, response: bytes) -> RawOrigin:
    def handler(sock: socket.socket) -> None:
        origin.read_head(sock)
        sock.sendall(response)
        sock.shutdown(socket.SHUT_WR)

    origin = raw_origin(handler)
    return origin


def curl(url: str, *args: str) -> tuple[int, bytes, bytes]:
    """curl's exit code, response head and body for ``url``."""
    done = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "10", *args, url],
        capture_output=True,
        timeout=30,
        check=False,
    )
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    return done.returncode, head, body


@pytest.mark.parametrize(
    ("response", "body"), [case[1:] for case in REPAIRED], ids=[case[0] for case in REPAIRED]
)
def test_responses_curl_reads_pass_through_the_proxy(
    proxy: ProxyProcess, raw_origin, response, body
):
    origin = serve(raw_origin, response)
    code, _, direct = curl(origin.url + "/")
    assert (code, direct) == (0, body)
    code, head, proxied = curl(origin.url + "/", "-x", proxy.url)
    assert code == 0, head
    assert head.split(b" ", 2)[1] == response.split(b"\n")[0].split()[1][:3]
    assert proxied == body


@pytest.mark.parametrize(
    ("response", "direct_code", "why"),
    [case[1:] for case in READ_THOUGH_CURL_REFUSES],
    ids=[case[0] for case in READ_THOUGH_CURL_REFUSES],
)
def test_responses_the_proxy_reads_though_curl_refuses(
    proxy: ProxyProcess, raw_origin, response, direct_code, why
):
    origin = serve(raw_origin, response)
    assert curl(origin.url + "/")[0] == direct_code != 0
    assert why
    code, head, body = curl(origin.url + "/", "-x", proxy.url)
    assert (code, body) == (0, b"ok"), head
    assert head.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    ("response", "direct_code", "why"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_responses_the_proxy_refuses(proxy: ProxyProcess, raw_origin, response, direct_code, why):
    origin = serve(raw_origin, response)
    assert curl(origin.url + "/")[0] == direct_code
    assert bool(why) == (direct_code == 0)  # a refusal of what curl reads is explained
    code, head, body = curl(origin.url + "/", "-x", proxy.url)
    assert code == 0 and head.startswith(b"HTTP/1.1 502 "), head
    assert b"request id" in body


def test_repaired_fields_reach_the_client_repaired(proxy: ProxyProcess, raw_origin):
    origin = serve(
        raw_origin,
        b"HTTP/1.1 200 OK\r\nX-Frame-Note : yes\r\nX-Fold: a\r\n b\r\nX(A): 1\r\nX-CR: a\rb\r\n"
        + CL2,
    )
    _, head, _ = curl(origin.url + "/", "-x", proxy.url)
    lines = head.split(b"\r\n")[1:]
    assert b"X-Frame-Note: yes" in lines
    assert b"X-Fold: a b" in lines
    assert b"X-CR: a b" in lines
    assert not any(line.startswith(b"X(A)") for line in lines)


@pytest.mark.parametrize("until_close", [False, True])
def test_transfer_codings_are_forwarded_or_refused_by_client_version(
    proxy: ProxyProcess, raw_origin, until_close
):
    body = GZ if until_close else chunk(GZ) + b"0\r\n\r\n"
    coding = b"gzip" if until_close else b"gzip, chunked"
    origin = serve(
        raw_origin, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n" + body
    )
    # HTTP/1.1 client: the gzip coding travels on, with the proxy's own chunked framing.
    code, head, data = curl(origin.url + "/", "-x", proxy.url)
    assert code == 0 and data == b"hello"
    assert b"Transfer-Encoding: gzip, chunked" in head.split(b"\r\n")
    # HTTP/1.0 client: it cannot receive a transfer coding (RFC 9112 §6.1).
    code, head, data = curl(origin.url + "/", "-x", proxy.url, "--http1.0")
    assert code == 0 and head.startswith(b"HTTP/1.1 502 "), head
    assert b"gzip cannot be sent to an HTTP/1.0 client" in data
