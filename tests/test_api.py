"""The public API: what addons import from ``eyewall``.  Changing it is a decision, so
this test names every member (the practice of httpx's test of its exported members)."""

from __future__ import annotations

import dataclasses

import eyewall
from eyewall.addons import hooks
from eyewall.addons.api import Response

EXPECTED = {
    "Client",
    "ClientConnected",
    "ClientDisconnected",
    "Configure",
    "Done",
    "ErrorHook",
    "HTTPFlow",
    "Hook",
    "HttpConnect",
    "Load",
    "Request",
    "RequestHeaders",
    "RequestHook",
    "Response",
    "ResponseHeaders",
    "ResponseHook",
    "Running",
    "TunnelEnd",
    "TunnelStart",
    "__version__",
}


def test_exported_members_are_pinned():
    assert set(eyewall.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(eyewall, name) is not None


def test_every_hook_is_exported_with_its_method_name():
    exported = {getattr(eyewall, n) for n in eyewall.__all__}
    assert set(hooks.HOOKS.values()) <= exported
    names = {h.name for h in hooks.HOOKS.values()}
    assert names == {
        "load",
        "configure",
        "running",
        "done",
        "client_connected",
        "client_disconnected",
        "http_connect",
        "requestheaders",
        "request",
        "responseheaders",
        "response",
        "error",
        "tunnel_start",
        "tunnel_end",
    }


def test_hooks_are_dataclasses_carrying_their_arguments():
    flow = object()
    hook = eyewall.RequestHeaders(flow)  # type: ignore[arg-type]
    assert dataclasses.is_dataclass(hook) and hook.args() == (flow,)
    assert eyewall.Running().args() == ()


def test_a_new_status_brings_its_own_reason_phrase_unless_one_is_set_after() -> None:
    from eyewall.http1.response import parse_response_head

    response = Response(parse_response_head(b"HTTP/1.1 200 Fine Thanks\r\n\r\n"))
    response.status = 200  # the same status: the origin's phrase stays
    assert response.reason == "Fine Thanks"
    response.status = 404
    assert (response.status, response.reason) == (404, "Not Found")
    response.reason = "Gone Fishing"
    assert response.reason == "Gone Fishing"
    response.status = 599  # no standard phrase
    assert response.reason == ""
