"""Flows as plain records (dicts): the one shape the store writes, the admin API serves
and HAR export reads.  Pure functions."""

from __future__ import annotations

import base64
import json
from typing import Any

from eyewall.observe.flow import Flow

__all__ = ["COLUMNS", "detail", "record_of", "summary"]

Record = dict[str, Any]

COLUMNS = (
    "id", "started", "kind", "client", "client_port", "user", "method", "url", "host",
    "port", "status", "upstream", "reused", "bytes_in", "bytes_out", "duration", "ttfb",
    "connect", "rule", "error", "error_detail", "intercepted", "request_version",
    "request_headers", "response_version", "reason", "response_headers", "request_body",
    "response_body",
)  # fmt: skip


def _redacted(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The proxy's own credentials are never recorded."""
    return [(n, "[redacted]" if n.lower() == "proxy-authorization" else v) for n, v in fields]


def record_of(flow: Flow) -> Record:
    """A finished flow as a record (headers as JSON text, bodies as bytes or None).

    ``Proxy-Authorization`` values are replaced by ``[redacted]``."""
    request, response = flow.request, flow.response
    return {
        "id": flow.id,
        "started": flow.started,
        "kind": flow.kind,
        "client": flow.client[0],
        "client_port": flow.client[1],
        "user": flow.user,
        "method": flow.method,
        "url": flow.url,
        "host": flow.host,
        "port": flow.port,
        "status": flow.status,
        "upstream": flow.upstream,
        "reused": int(flow.reused),
        "bytes_in": flow.bytes_in,
        "bytes_out": flow.bytes_out,
        "duration": flow.duration,
        "ttfb": flow.t_response,
        "connect": flow.connect_time,
        "rule": flow.rule,
        "error": flow.error.value if flow.error is not None else None,
        "error_detail": flow.error_detail,
        "intercepted": int(flow.intercepted),
        "request_version": request.version if request is not None else None,
        "request_headers": (
            json.dumps(_redacted(request.headers.fields)) if request is not None else None
        ),
        "response_version": response.version if response is not None else None,
        "reason": response.reason if response is not None else None,
        "response_headers": json.dumps(response.headers.fields) if response is not None else None,
        "request_body": bytes(flow.request_body) if flow.request_body is not None else None,
        "response_body": bytes(flow.response_body) if flow.response_body is not None else None,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summary(record: Record) -> dict[str, Any]:
    """The flow summary of the admin API (docs/admin-api.md)."""
    return {
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
    }


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
    request_headers = json.loads(record["request_headers"] or "[]")
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
            "headers": json.loads(record["response_headers"]),
            "body": _body(record["response_body"], record["bytes_out"]),
        }
    return out
