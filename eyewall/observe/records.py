"""Flows as plain records (dicts): the one shape the store writes, the admin API serves
and HAR export reads.  Pure functions."""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import unquote_plus

from eyewall.flow import Flow
from eyewall.http1.parse import Headers
from eyewall.http1.target import redact_userinfo

__all__ = ["COLUMNS", "detail", "is_credential_field", "record_of", "redact_url", "summary"]

Record = dict[str, Any]
Row = tuple[Any, ...]  # a record's values in `COLUMNS` order

COLUMNS = (
    "id",
    "started",
    "kind",
    "client",
    "client_port",
    "user",
    "method",
    "url",
    "host",
    "port",
    "status",
    "upstream",
    "reused",
    "bytes_in",
    "bytes_out",
    "duration",
    "ttfb",
    "connect",
    "rule",
    "error",
    "error_detail",
    "intercepted",
    "request_version",
    "request_headers",
    "response_version",
    "reason",
    "response_headers",
    "request_body",
    "response_body",
    "worker",
)


# What holds a credential, recorded as "[redacted]" unless the operator asks for them
# (flows.credentials); the proxy's own credentials never.  Field names and query
# parameter names are matched by what they say: Authorization, Cookie, Cookie2,
# X-Api-Key, X-Auth-Token, X-Amz-Security-Token, ?access_token=, ?client_secret=...
# The challenges (WWW-Authenticate, Proxy-Authenticate) hold none, nor does a WebSocket
# handshake's nonce (Sec-WebSocket-Key).
_SECRET_NAME = re.compile(
    r"token|secret|passw|passcode|passphrase|api[-_ ]?key|accesskey|privatekey|auth|bearer"
    r"|session|sessid|cookie|credential|signature|jwt|ticket|assertion|verifier"
    r"|(?:^|[-_. ])(?:key|otp|pass|pwd|pw)$",
    re.I,
)
_NOT_SECRET = frozenset({"www-authenticate", "proxy-authenticate", "sec-websocket-key"})
_SECRET_PARAMS = frozenset({"key", "sig", "sid", "code", "pwd", "pw", "pass"})  # short, common
PROXY_CREDENTIALS = frozenset({"proxy-authorization"})
REDACTED = "[redacted]"
# Verdicts on field names, kept for names up to CACHED_NAME characters and at most
# CACHED_NAMES of them: names come from traffic, and one may be as long as a head.
CACHED_NAME = 64
CACHED_NAMES = 4096
_field_verdicts: dict[str, bool] = {}  # lower-cased name -> holds a credential


def is_credential_field(name: str) -> bool:
    """Whether a field named ``name`` (any case) holds a credential."""
    key = name.lower()
    verdict = _field_verdicts.get(key)
    if verdict is None:
        verdict = key not in _NOT_SECRET and _SECRET_NAME.search(key) is not None
        if len(key) <= CACHED_NAME and len(_field_verdicts) < CACHED_NAMES:
            _field_verdicts[key] = verdict
    return verdict


def redact_url(url: str) -> str:
    """``url`` with its userinfo and the values of credential-like parameters replaced:
    query parameters (``access_token``, ``api_key``, ``X-Amz-Signature``, ``sig``...,
    separated by ``&`` or ``;``), path parameters (``;jsessionid=``) and parameters in
    the fragment (``#access_token=``: OAuth's implicit grant answers with them)."""
    url = redact_userinfo(url)
    if "=" not in url:
        return url
    url, hash_, fragment = url.partition("#")
    path, question, query = url.partition("?")
    if ";" in path:
        path = _PATH_PARAM.sub(_redact_param, path)
    if question:
        path = f"{path}?{_QUERY_PARAM.sub(_redact_param, query)}"
    if "=" in fragment:  # a route's own query (``#/cb?code=``) counts as one
        route, question, params = fragment.rpartition("?")
        fragment = f"{route}{question}{_QUERY_PARAM.sub(_redact_param, params)}"
    return f"{path}{hash_}{fragment}"


_PATH_PARAM = re.compile(r"(;)([^=;/]*)=([^;/]*)")
_QUERY_PARAM = re.compile(r"(^|[;&])([^=;&]*)=([^;&]*)")


_BRACKETS = re.compile(r"[\[\]]")


def _redact_param(match: re.Match[str]) -> str:
    # ``pw[]``, ``key[0]`` (arrays), ``user[password]``, ``a[b][token]`` (nested names),
    # ``pw%20``, ``user%255Bpw%255D``, ``api+key``: every part of the name counts
    if match.group(3):
        name = unquote_plus(unquote_plus(match.group(2)))  # encoded twice, "+" a space
        for part in _BRACKETS.split(name.lower()):
            part = part.strip()
            if part and (part in _SECRET_PARAMS or _SECRET_NAME.search(part)):
                return f"{match.group(1)}{match.group(2)}={REDACTED}"
    return match.group(0)


_PLAIN, _CREDENTIAL, _PROXY_CREDENTIAL, _URL = range(4)
# Fields that may carry a URL (or an authority: Host) with userinfo or secret parameters.
_URL_FIELDS = frozenset({"referer", "location", "content-location", "refresh", "link", "host"})
_treatments: dict[str, int] = {}  # field name as received -> how its value is recorded


def _treatment(name: str) -> int:
    treatment = _treatments.get(name)
    if treatment is None:
        key = name.lower()
        if key in PROXY_CREDENTIALS:
            treatment = _PROXY_CREDENTIAL
        elif is_credential_field(key):
            treatment = _CREDENTIAL
        else:
            treatment = _URL if key in _URL_FIELDS else _PLAIN
        if len(name) <= CACHED_NAME and len(_treatments) < CACHED_NAMES:
            _treatments[name] = treatment
    return treatment


def _heads(headers: Headers | None, credentials: bool) -> str | None:
    """Header fields as text, one ``Name: value`` per line; credential values replaced
    by ``[redacted]`` (only the proxy's own when ``credentials``), userinfo and
    credential parameters of URLs in ``Referer`` and ``Location`` too."""
    if headers is None:
        return None
    lines = []
    for n, v in headers.fields:
        treatment = _treatments.get(n)
        if treatment is None:
            treatment = _treatment(n)
        if treatment:
            if treatment == _PROXY_CREDENTIAL or (treatment == _CREDENTIAL and not credentials):
                v = REDACTED
            elif treatment == _URL and not credentials:
                v = redact_url(v)
        lines.append(f"{n}: {v}")
    return "\n".join(lines)


def parse_heads(text: str | None) -> list[list[str]]:
    """The ``[name, value]`` pairs of a stored header text."""
    if not text:
        return []
    return [list(line.partition(": ")[::2]) for line in text.split("\n")]


def row_of(flow: Flow, credentials: bool = False) -> Row:
    """A finished flow as a row of `COLUMNS` (what the store writes); credential fields
    redacted unless ``credentials``."""
    request, response = flow.request, flow.response
    return (
        flow.id,
        flow.started,
        flow.kind,
        flow.client[0],
        flow.client[1],
        flow.user,
        flow.method,
        flow.url if credentials else redact_url(flow.url),
        flow.host,
        flow.port,
        flow.status,
        flow.upstream,
        int(flow.reused),
        flow.bytes_in,
        flow.bytes_out,
        flow.duration,
        flow.t_response,
        flow.connect_time,
        flow.rule,
        flow.error.value if flow.error is not None else None,
        flow.error_detail,
        int(flow.intercepted),
        request.version if request is not None else None,
        _heads(request.headers if request is not None else None, credentials),
        response.version if response is not None else None,
        response.reason if response is not None else None,
        _heads(response.headers if response is not None else None, credentials),
        bytes(flow.request_body) if flow.request_body is not None else None,
        bytes(flow.response_body) if flow.response_body is not None else None,
        flow.worker,
    )


def record_of(flow: Flow, credentials: bool = False) -> Record:
    """A finished flow as a record (headers as text, bodies as bytes or None)."""
    return dict(zip(COLUMNS, row_of(flow, credentials), strict=True))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summary(record: Record) -> dict[str, Any]:
    """The flow summary of the admin API (docs/admin-api.md); with ``node`` when the
    record comes from a fleet's shared flow database."""
    out = {
        "id": record["id"],
        "kind": record["kind"],
        "started": record["started"],
        "client": f"{record['client']}:{record['client_port']}",
        "user": record["user"],
        "method": record["method"],
        "url": record["url"],
        "host": record["host"],
        "port": record["port"],
        "status": record["status"],
        "bytes_in": record["bytes_in"],
        "bytes_out": record["bytes_out"],
        "duration_ms": _ms(record["duration"]),
        "ttfb_ms": _ms(record["ttfb"]),
        "connect_ms": _ms(record["connect"]),
        "upstream": record["upstream"],
        "reused": bool(record["reused"]),
        "rule": record["rule"],
        "error": record["error"],
        "error_detail": record["error_detail"],
        "intercepted": bool(record["intercepted"]),
        "worker": record["worker"] or 0,
    }
    if "node" in record:
        out["node"] = record["node"]
    return out


def _body(data: bytes | None, size: int) -> dict[str, Any]:
    if data is None:
        return {"size": size, "captured": 0, "truncated": size > 0, "text": None, "base64": None}
    text = None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    return {
        "size": size,
        "captured": len(data),
        "truncated": len(data) < size,
        "text": text,
        "base64": None if text is not None else base64.b64encode(data).decode(),
    }


def detail(record: Record) -> dict[str, Any]:
    """A summary plus heads and captured bodies."""
    out = summary(record)
    request_headers = parse_heads(record["request_headers"])
    out["request"] = {
        "method": record["method"],
        "target": record["url"],
        "version": record["request_version"],
        "headers": request_headers,
        "body": _body(record["request_body"], record["bytes_in"]),
    }
    if record["response_headers"] is None:
        out["response"] = None
    else:
        out["response"] = {
            "status": record["status"],
            "reason": record["reason"],
            "version": record["response_version"],
            "headers": parse_heads(record["response_headers"]),
            "body": _body(record["response_body"], record["bytes_out"]),
        }
    return out
