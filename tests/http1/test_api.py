"""The public API of the pure HTTP/1 layer, pinned: a change here is a change for every
caller (the I/O layer, addons, observers) and must be deliberate."""

from __future__ import annotations

import importlib
import inspect

import pytest

API = {
    "parse": [
        "Headers",
        "ParseError",
        "RequestHead",
        "ResponseHead",
        "check_field",
        "match_fields",
        "parse_chunk_size",
        "parse_fields",
        "parse_request_head",
    ],
    "response": [
        "MAX_REPAIRS",
        "parse_response_head",
        "parse_response_trailers",
        "repair_response_head",
    ],
    "chunked": ["ChunkedDecoder", "encode_chunk", "last_chunk"],
    "framing": [
        "NO_BODY",
        "BodyKind",
        "Framing",
        "body_framing",
        "content_length",
        "downstream_framing",
        "expects_continue",
        "is_idempotent",
        "keep_alive",
        "websocket_upgrade",
    ],
    "fields": [
        "HOP_BY_HOP",
        "MAX_FORWARDS_CAP",
        "SENSITIVE",
        "max_forwards",
        "render_request",
        "render_response",
        "response_fields",
        "trace_echo",
        "upstream_fields",
    ],
    "target": [
        "Target",
        "TargetError",
        "canonical_host",
        "parse_authority",
        "parse_target",
        "redact_userinfo",
    ],
    "methods": ["REGISTERED", "canonical_method"],
}
SIGNATURES = {
    "chunked.ChunkedDecoder": (
        "(max_line: 'int' = 4096, max_trailers: 'int' = 65536, repair: 'bool' = False) -> 'None'"
    ),
    "chunked.ChunkedDecoder.feed": (
        "(self, data: 'bytes | memoryview') -> 'list[bytes | memoryview]'"
    ),
    "framing.body_framing": (
        "(head: 'RequestHead | ResponseHead', request_method: 'str | None' = None) -> 'Framing'"
    ),
    "framing.keep_alive": "(head: 'RequestHead | ResponseHead') -> 'bool'",
    "framing.expects_continue": "(head: 'RequestHead') -> 'bool'",
    "fields.max_forwards": "(head: 'RequestHead') -> 'int | None'",
    "fields.trace_echo": "(head: 'RequestHead') -> 'bytes'",
    "target.redact_userinfo": "(text: 'str') -> 'str'",
    "target.canonical_host": "(host: 'str') -> 'str'",
    "response.parse_response_head": "(data: 'bytes') -> 'ResponseHead'",
    "response.parse_response_trailers": (
        "(data: 'bytes') -> 'tuple[list[tuple[str, str]], tuple[str, ...]]'"
    ),
}


@pytest.mark.parametrize("module", sorted(API))
def test_each_module_exports_what_it_documents(module):
    mod = importlib.import_module(f"eyewall.http1.{module}")
    assert sorted(mod.__all__) == sorted(API[module])
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module}.{name} has no docstring"


@pytest.mark.parametrize(("path", "signature"), sorted(SIGNATURES.items()))
def test_signatures(path, signature):
    module, _, name = path.partition(".")
    obj = importlib.import_module(f"eyewall.http1.{module}")
    for part in name.split("."):
        obj = getattr(obj, part)
    assert str(inspect.signature(obj)) == signature
