"""The public API: what addons import from ``eyewall``.  Changing it is a decision, so
this test names every member (the practice of httpx's test of its exported members)."""

from __future__ import annotations

import dataclasses

import eyewall
from eyewall.addons import hooks

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
