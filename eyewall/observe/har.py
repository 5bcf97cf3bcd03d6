"""HAR 1.2 export of recorded flows (http://www.softwareishard.com/blog/har-12-spec/).

Pure: records in, a JSON-ready dict out.  Tunnels that were not decrypted carry no HTTP
messages and are left out (`har_query` leaves them out of the selection, so a limit
counts entries); the count of any such flows handed in is given in the log comment.
"""

from __future__ import annotations

import base64
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from eyewall import __version__
from eyewall.http1.target import canonical_host
from eyewall.observe.records import Record, parse_heads

__all__ = ["har", "har_query", "host_filter", "is_exchange"]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _headers(text: str | None) -> list[dict[str, str]]:
    return [{"name": n, "value": v} for n, v in parse_heads(text)]


def _find(headers: list[dict[str, str]], name: str) -> str:
    for h in headers:
        if h["name"].lower() == name:
            return h["value"]
    return ""


def _cookies(headers: list[dict[str, str]], name: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for h in headers:
        if h["name"].lower() != name:
            continue
        parts = h["value"].split(";")
        pairs = parts[:1] if name == "set-cookie" else parts  # attributes are not cookies
        for pair in pairs:
            key, eq, value = pair.strip().partition("=")
            if eq and key:
                out.append({"name": key, "value": value})
    return out


def _content(body: bytes | None, size: int, mime: str) -> dict[str, Any]:
    content: dict[str, Any] = {"size": size, "mimeType": mime or "x-unknown"}
    if body:
        try:
            content["text"] = body.decode("utf-8")
        except UnicodeDecodeError:
            content["text"] = base64.b64encode(body).decode()
            content["encoding"] = "base64"
        if len(body) < size:
            content["comment"] = f"only the first {len(body)} bytes were recorded"
    return content


def _entry(r: Record) -> dict[str, Any]:
    request_headers = _headers(r["request_headers"])
    response_headers = _headers(r["response_headers"])
    url = r["url"]
    version = r["request_version"] or "HTTP/1.1"
    request: dict[str, Any] = {
        "method": r["method"],
        "url": url,
        "httpVersion": version,
        "cookies": _cookies(request_headers, "cookie"),
        "headers": request_headers,
        "queryString": [
            {"name": k, "value": v}
            for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)
        ],
        "headersSize": -1,
        "bodySize": r["bytes_in"],
    }
    if r["bytes_in"] or r["request_body"]:
        body = r["request_body"] or b""
        post: dict[str, Any] = {"mimeType": _find(request_headers, "content-type") or ""}
        try:
            post["text"] = body.decode("utf-8")
        except UnicodeDecodeError:
            post["text"] = base64.b64encode(body).decode()
            post["comment"] = "base64-encoded"
        request["postData"] = post
    connect = r["connect"]
    ttfb = r["ttfb"]
    total = (r["duration"] or 0.0) * 1000
    wait = max(0.0, (ttfb or r["duration"] or 0.0) * 1000 - (connect or 0.0) * 1000)
    timings = {
        "blocked": -1,
        "dns": -1,
        "connect": round(connect * 1000, 3) if connect is not None else -1,
        "send": 0,
        "wait": round(wait, 3),
        "receive": round(max(0.0, total - (ttfb or 0.0) * 1000), 3) if ttfb is not None else 0,
        "ssl": -1,
    }
    entry: dict[str, Any] = {
        "startedDateTime": _iso(r["started"]),
        "time": round(sum(v for v in timings.values() if v > 0), 3),
        "request": request,
        "response": {
            "status": r["status"],
            "statusText": r["reason"] or "",
            "httpVersion": r["response_version"] or version,
            "cookies": _cookies(response_headers, "set-cookie"),
            "headers": response_headers,
            "content": _content(
                r["response_body"], r["bytes_out"], _find(response_headers, "content-type")
            ),
            "redirectURL": _find(response_headers, "location"),
            "headersSize": -1,
            "bodySize": r["bytes_out"],
        },
        "cache": {},
        "timings": timings,
        "connection": r["id"],
        "comment": f"eyewall flow {r['id']}" + (f"; error: {r['error']}" if r["error"] else ""),
    }
    if r.get("node"):
        entry["_node"] = r["node"]  # the fleet node that recorded it (a custom field)
    if r["upstream"]:
        entry["serverIPAddress"] = r["upstream"].rsplit(":", 1)[0].strip("[]")
    return entry


def is_exchange(r: Record) -> bool:
    """Whether ``r`` is an HTTP exchange (a HAR entry): not a tunnel, nor a CONNECT
    refused before it became one (HAR wants an absolute URL; a CONNECT has an
    authority), nor a head that named no method."""
    return r["kind"] != "tunnel" and bool(r["method"]) and r["method"] != "CONNECT"


def host_filter(text: str | None) -> str:
    """A ``host`` filter as flows record hosts: lower case, without IPv6 brackets or a
    final dot, an IP address in its one written form (`canonical_host`); "" for none."""
    host = (text or "").strip().lower().removesuffix(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return canonical_host(host)


def har_query(since: float, host: str | None) -> tuple[str, tuple[Any, ...]]:
    """The flow-store selection (a WHERE clause and its parameters) of HAR entries
    started at or after ``since`` (Unix time, seconds), to ``host`` when given."""
    where = "started >= ? AND kind != 'tunnel' AND method NOT IN ('', 'CONNECT')"
    params: list[Any] = [since]
    if host:
        where += " AND host = ?"
        params.append(host)
    return where, tuple(params)


def har(records: list[Record]) -> dict[str, Any]:
    """A HAR 1.2 log of the HTTP flows among ``records`` (oldest first)."""
    entries = [_entry(r) for r in records if is_exchange(r)]
    skipped = sum(1 for r in records if r["kind"] == "tunnel")
    return {
        "log": {
            "version": "1.2",
            "creator": {"name": "eyewall", "version": __version__},
            "entries": entries,
            "comment": f"{skipped} opaque tunnels not included" if skipped else "",
        }
    }
