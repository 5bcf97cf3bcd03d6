"""Access line formats: json, text, squid (native), common and combined (CLF).

Pure functions of a finished `Flow`; each returns one line ending in a newline.  Every
field that comes from a client or an origin (user name, URL, method, header values,
error details) is escaped, so no input can end a line early or forge another: JSON
escapes itself; the other formats escape control characters, non-ASCII, backslash and
the double quote as ``\\xNN`` (as Apache's log formats do).

json fields: time, ts, id, kind, client, client_port, user, method, url, host, port,
upstream, reused, status, bytes_in, bytes_out, duration_ms, ttfb_ms, connect_ms, rule,
error, error_detail, worker (the worker process that served it, 1..N; 0 when a single
process serves).  Durations are milliseconds; ``ttfb_ms`` and ``connect_ms`` are
null when not reached (``connect_ms`` is also null on a reused connection).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

from eyewall.flow import Flow
from eyewall.observe.records import redact_url

__all__ = ["FORMATS", "escape", "format_json", "format_text"]

# ASCII-only JSON: U+2028, U+0085 and DEL are escaped too, so no reader splits a line.
_quote = json.encoder.encode_basestring_ascii
_iso_second: list[object] = [-1, ""]
_clf_second: list[object] = [-1, ""]


def _url(flow: Flow) -> str:
    """The URL as logged: credential-like query values (``access_token=``, ``sig=``...)
    replaced, as in recorded flows; a log is no place for secrets."""
    url = flow.url
    return redact_url(url) if "=" in url else url


def _iso(t: float) -> str:
    second = int(t)
    if _iso_second[0] != second:
        _iso_second[0] = second
        _iso_second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_iso_second[1]}.{int(t * 1000) % 1000:03d}Z"


def _clf_time(t: float) -> str:
    second = int(t)
    if _clf_second[0] != second:
        _clf_second[0] = second
        _clf_second[1] = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(second))
    return str(_clf_second[1])


_UNSAFE = re.compile(r'[^\x21-\x7e]|[\\"]')


def escape(value: str) -> str:
    """``value`` with anything but printable ASCII (space, quote and backslash too)
    as ``\\xNN`` (UTF-8 bytes): one field, one line, whatever the input."""
    return _UNSAFE.sub(lambda m: "".join(f"\\x{b:02x}" for b in m.group().encode()), value)


_esc = escape


def _esc_text(value: str) -> str:
    """Like `_esc`, but spaces stay (free text inside quotes)."""
    return " ".join(_esc(part) for part in value.split(" "))


def _ms(seconds: float | None) -> str:
    return "null" if seconds is None else f"{seconds * 1000:.3f}"


def _str_or_null(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def format_json(flow: Flow) -> str:
    """One JSON object per line for ``flow`` (the ``json`` access-log format; field names in
    docs/monitoring.md)."""
    client_ip, client_port = flow.client
    error = flow.error.value if flow.error is not None else None
    return (
        f'{{"time":"{_iso(flow.started)}","ts":{flow.started:.3f},"id":"{flow.id}",'
        f'"kind":"{flow.kind}","client":{_quote(client_ip)},"client_port":{client_port},'
        f'"user":{_str_or_null(flow.user)},"method":{_quote(flow.method)},'
        f'"url":{_quote(_url(flow))},"host":{_quote(flow.host)},"port":{flow.port},'
        f'"upstream":{_quote(flow.upstream)},"reused":{"true" if flow.reused else "false"},'
        f'"status":{flow.status},"bytes_in":{flow.bytes_in},"bytes_out":{flow.bytes_out},'
        f'"duration_ms":{_ms(flow.duration)},"ttfb_ms":{_ms(flow.t_response)},'
        f'"connect_ms":{_ms(flow.connect_time)},"rule":{_quote(flow.rule)},'
        f'"error":{_str_or_null(error)},"error_detail":{_quote(flow.error_detail)},'
        f'"worker":{flow.worker}}}\n'
    )


def format_text(flow: Flow) -> str:
    """``time client id method url status in out duration up=… [user=…] [rule=…]
    [worker=…] [err=…]``"""
    client = f"{flow.client[0]}:{flow.client[1]}"
    line = (
        f"{_iso(flow.started)} {client} {flow.id} {_esc(flow.method) or '-'}"
        f" {_esc(_url(flow)) or '-'} {flow.status or '-'} in={flow.bytes_in} out={flow.bytes_out}"
        f" {flow.duration * 1000:.1f}ms up={flow.upstream or '-'}"
    )
    if flow.reused:
        line += " reused"
    if flow.user is not None:
        line += f" user={_esc(flow.user)}"
    if flow.rule:
        line += f" rule={flow.rule}"
    if flow.worker:
        line += f" worker={flow.worker}"
    if flow.error is not None:
        line += f' err={flow.error.value} "{_esc_text(flow.error_detail)}"'
    return line + "\n"


def _squid_code(flow: Flow) -> str:
    if flow.error is not None and flow.error.value in (
        "denied",
        "auth_required",
        "proxy_loop_detected",
        "rate_limited",
    ):
        return "TCP_DENIED"
    if flow.kind != "http" and flow.status in (101, 200):
        return "TCP_TUNNEL"
    if flow.error is not None:
        return "TCP_MISS_ABORTED" if flow.status in (0, 499) or flow.status < 400 else "TCP_MISS"
    return "TCP_MISS"


def _content_type(flow: Flow) -> str:
    if flow.response is None:
        return "-"
    value = flow.response.headers.get("content-type")
    return _esc(value.split(";", 1)[0].strip()) or "-" if value else "-"


def format_squid(flow: Flow) -> str:
    """Squid's native format: time elapsed client code/status bytes method URL user
    hierarchy/peer type."""
    peer = (
        f"HIER_DIRECT/{flow.upstream.rsplit(':', 1)[0].strip('[]')}"
        if flow.upstream
        else ("HIER_NONE/-")
    )
    return (
        f"{flow.started:.3f} {int(flow.duration * 1000):6d} {flow.client[0]}"
        f" {_squid_code(flow)}/{flow.status:03d} {flow.bytes_out} {_esc(flow.method) or '-'}"
        f" {_esc(_url(flow)) or '-'} {_esc(flow.user or '') or '-'} {peer} {_content_type(flow)}\n"
    )


def _request_line(flow: Flow) -> str:
    version = flow.request.version if flow.request is not None else "HTTP/1.1"
    return f"{_esc(flow.method) or '-'} {_esc(_url(flow)) or '-'} {version}"


def format_common(flow: Flow) -> str:
    """Common Log Format: host ident user [time] "request" status bytes."""
    return (
        f"{flow.client[0]} - {_esc(flow.user or '') or '-'} {_clf_time(flow.started)}"
        f' "{_request_line(flow)}" {flow.status or "-"} {flow.bytes_out or "-"}\n'
    )


def _header(flow: Flow, name: str) -> str:
    value = flow.request.headers.get(name) if flow.request is not None else None
    return _esc_text(value) if value else "-"


def format_combined(flow: Flow) -> str:
    """Combined Log Format: common plus "referer" "user-agent"."""
    referer, agent = redact_url(_header(flow, "referer")), _header(flow, "user-agent")
    return f'{format_common(flow)[:-1]} "{referer}" "{agent}"\n'


FORMATS: dict[str, Callable[[Flow], str]] = {
    "json": format_json,
    "text": format_text,
    "squid": format_squid,
    "common": format_common,
    "combined": format_combined,
}
