"""The hooks an addon may implement: one small dataclass per event, named after it.

The proxy calls ``addons.call(RequestHeaders(flow))``; an addon implements a method
with the hook's `name` (``def requestheaders(self, flow)``), plain or ``async``.  A
misspelt hook class in the proxy is a NameError and a mypy error; a method in an addon
whose name is close to a hook's but not one (``reqeustheaders``) is refused when the
addon loads.  Hooks return nothing — an addon decides by changing the flow (its heads,
its body, ``flow.respond(...)``, ``flow.kill()``).

The classes' docstrings are the hook reference: `reference` makes docs/hooks.md
(``./scripts/generate-docs``), and a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from eyewall.addons.api import Client, HTTPFlow

__all__ = [
    "DATA_HOOKS",
    "HOOKS",
    "LIFECYCLE_HOOKS",
    "ClientConnected",
    "ClientDisconnected",
    "Configure",
    "Done",
    "ErrorHook",
    "Hook",
    "HttpConnect",
    "Load",
    "RequestHeaders",
    "RequestHook",
    "ResponseHeaders",
    "ResponseHook",
    "Running",
    "TunnelEnd",
    "TunnelStart",
    "reference",
]


@dataclass
class Hook:
    """An event an addon may handle with a method called `name`."""

    name: ClassVar[str] = ""
    lifecycle: ClassVar[bool] = False

    def args(self) -> tuple[Any, ...]:
        """The arguments the addon's method is called with, in field order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


# -- lifecycle, in the order they happen to an addon ----------------------------------


@dataclass
class Load(Hook):
    """The addon was loaded (again, after its file changed). `loader.log` is a logger
    named after the addon."""

    name = "load"
    lifecycle = True
    loader: Any


@dataclass
class Configure(Hook):
    """After `load`, and after every configuration reload: the settings now in
    force."""

    name = "configure"
    lifecycle = True
    settings: Any


@dataclass
class Running(Hook):
    """The proxy is listening (or the addon was reloaded while it was)."""

    name = "running"
    lifecycle = True


@dataclass
class Done(Hook):
    """The addon is being unloaded: the proxy stops, or its file changed."""

    name = "done"
    lifecycle = True


# -- traffic, in the order they happen to an exchange ---------------------------------


@dataclass
class ClientConnected(Hook):
    """A client connected and may use the proxy (its address passed
    `access.allow_clients`)."""

    name = "client_connected"
    client: Client


@dataclass
class ClientDisconnected(Hook):
    """The client's connection closed."""

    name = "client_disconnected"
    client: Client


@dataclass
class HttpConnect(Hook):
    """A CONNECT request was admitted by the policy, before the proxy connects upstream.
    `flow.respond()` refuses it with that answer; `flow.kill()` drops the connection."""

    name = "http_connect"
    flow: HTTPFlow


@dataclass
class RequestHeaders(Hook):
    """A request head was read and admitted, before the proxy contacts the origin.
    Change `flow.request` (method, path, headers), answer it yourself with
    `flow.respond()`, `flow.kill()` it, or call `flow.request.buffer(max_bytes)` to
    receive the whole body in `request`.  An `https://` request comes here only when
    its tunnel is intercepted: to refuse a host for HTTPS too, refuse its CONNECT in
    `http_connect`."""

    name = "requestheaders"
    flow: HTTPFlow


@dataclass
class RequestHook(Hook):
    """The request is about to be sent. If the body was buffered, `flow.request.body`
    holds it and may be replaced (Content-Length is fixed up); if it was larger than
    asked for, `flow.request.truncated` is true and the body streams unchanged.
    Otherwise the body streams after this hook."""

    name = "request"
    flow: HTTPFlow


@dataclass
class ResponseHeaders(Hook):
    """The origin's response head arrived, before anything is sent to the client.
    Change `flow.response` (status, reason, headers), replace it with `flow.respond()`,
    `flow.kill()` it, or call `flow.response.buffer(max_bytes)` to receive the whole
    body in `response`."""

    name = "responseheaders"
    flow: HTTPFlow


@dataclass
class ResponseHook(Hook):
    """With a buffered body: before the response is sent; `flow.response.body` may be
    replaced (Content-Length is fixed up). Otherwise after the response was streamed to
    the client (`body` is None)."""

    name = "response"
    flow: HTTPFlow


@dataclass
class ErrorHook(Hook):
    """The exchange failed: `flow.error` names the kind (e.g.
    `connection_read_timeout`), `flow.error_detail` says more."""

    name = "error"
    flow: HTTPFlow


@dataclass
class TunnelStart(Hook):
    """A CONNECT tunnel (or an upgraded WebSocket) started relaying bytes the proxy does
    not read."""

    name = "tunnel_start"
    flow: HTTPFlow


@dataclass
class TunnelEnd(Hook):
    """The tunnel closed; `flow.bytes_in` and `flow.bytes_out` count what crossed it."""

    name = "tunnel_end"
    flow: HTTPFlow


LIFECYCLE_HOOKS: tuple[type[Hook], ...] = (Load, Configure, Running, Done)
DATA_HOOKS: tuple[type[Hook], ...] = (
    ClientConnected,
    ClientDisconnected,
    HttpConnect,
    RequestHeaders,
    RequestHook,
    ResponseHeaders,
    ResponseHook,
    ErrorHook,
    TunnelStart,
    TunnelEnd,
)
HOOKS: dict[str, type[Hook]] = {h.name: h for h in (*LIFECYCLE_HOOKS, *DATA_HOOKS)}


def _signature(hook: type[Hook]) -> str:
    arguments = {
        "loader": "loader: Loader",
        "settings": "settings: Settings",
        "client": "client: Client",
        "flow": "flow: HTTPFlow",
    }
    return ", ".join(arguments[f.name] for f in dataclasses.fields(hook))


def _doc(hook: type[Hook]) -> str:
    return " ".join(line.strip() for line in (hook.__doc__ or "").strip().splitlines())


def reference() -> str:
    """docs/hooks.md."""
    lines = [
        "# Addon hooks",
        "",
        "<!-- generated by ./scripts/generate-docs from eyewall/addons/hooks.py; do not edit -->",
        "",
        "An addon is a Python file given with `--addon FILE` (or `--policy-addon FILE`, or",
        "`addons`/`policy_addons` in the configuration). Eyewall loads every class defined",
        "in it that has at least one hook method, or the objects in a module-level `addons`",
        "list. A hook may be a plain method or `async`; it returns nothing. An exception in",
        "a hook is logged with the addon's name and traffic goes on; in a policy addon it",
        "fails the exchange closed (502). An `async` hook that runs longer than",
        "`timeouts.addon_hook` is cancelled and counts as a failed hook (every failed hook is",
        "logged and counted in `eyewall_addon_failures_total`); one that ignores its",
        "cancellation is abandoned a second later. A plain hook runs",
        "on the event loop, so every connection waits while it runs: one that takes more",
        "than 0.1 s is reported in the log, and one still running after",
        "`timeouts.addon_hook` is stopped (a timer signal raises an exception in it that,",
        "like `KeyboardInterrupt`, `except Exception` does not catch; a call that does not",
        "return to Python, such as `os.system`, is stopped when it returns) and counts as",
        "a failed hook — do slow work in an `async` hook, awaiting it. The",
        "code of an `async` hook between two awaits runs on the event loop too, and is",
        "stopped the same way (a synchronous HTTP call or `time.sleep` in it). The same limit",
        "holds for a file's top-level code and its classes' `__init__` — a file that does",
        "not finish loading in time fails to load: at start-up (exit status 2), in",
        "`eyewall check-config`, on a reload (which keeps the version loaded before; traffic",
        "waits while a file loads) — and for the lifecycle hooks, which then count as",
        "failed hooks (the addon stays loaded, as when `load` raises). So an endless loop",
        "in an addon never hangs the proxy. A hook that cannot take its arguments",
        "(`def request(self)`) is refused at load time, and so by `eyewall check-config`",
        "(which checks an addon file given alone too: `eyewall check-config my_addon.py`);",
        "so is a method whose name is a near miss of a hook's (`reqeustheaders`,",
        "`request_headers`, `responses`), with the hook it resembles: start the names of",
        "helper methods with `_`: a method named exactly like a hook (`error`, `load`) is",
        "that hook. Addon code that catches even the stop (a bare `except:` in a loop)",
        "holds the event loop for good: once it has ignored the stop for as long as it was",
        "allowed to run, the process exits with status 70, for the service manager (or a",
        "supervisor's worker restart) to start it afresh. Code an addon schedules itself",
        "(`loop.create_task`, `call_later`) has no limit: await work in the hook instead;",
        "nor has addon code once an addon uses SIGALRM itself (`signal.alarm`, its own",
        "handler), which the log says when a file sets a handler.",
        "Complete addons to start from are in `examples/`.",
        "Files are reloaded when they change (their content, mode or owner). A file is",
        "refused when it is writable by group or others or owned by another user, or when",
        "a directory on its way lets someone else replace it (owned by another user, or",
        "writable by group or others without the sticky bit), as ssh refuses such keys.",
        "Files are compiled from their source each time: no bytecode cache is used.",
        "A file deleted while loaded keeps running as loaded (the log says so once) and",
        "is loaded again when it comes back; remove it from the settings and reload to",
        "stop it.",
        "",
        "The hook classes are importable for type checking: `from eyewall import",
        "RequestHeaders, HTTPFlow`.",
        "",
    ]
    for section, hooks in (("Lifecycle", LIFECYCLE_HOOKS), ("Traffic", DATA_HOOKS)):
        lines += [f"## {section}", ""]
        if section == "Traffic":
            lines += ["In the order they happen to an exchange.", ""]
        for hook in hooks:
            lines += [f"### `{hook.name}({_signature(hook)})` — `{hook.__name__}`", ""]
            lines += [_doc(hook), ""]
    lines += [
        "## The flow",
        "",
        "| attribute | meaning |",
        "|---|---|",
        "| `flow.id` | the request id (also in access lines and error pages) |",
        "| `flow.kind` | `http`, `tunnel` or `websocket` |",
        "| `flow.client` | (address, port) of the client; `flow.user` the authenticated user |",
        "| `flow.intercepted` | true inside a TLS-intercepted tunnel |",
        "| `flow.request` | `method`, `url` (read-only), `host`, `port`, `path`, `version`, "
        "`headers` (case-insensitive, order kept: `get`, `get_all`, `set`, `add`, "
        "`remove`), `body`, `truncated`, `buffer(max_bytes)` |",
        "| `flow.response` | None until `responseheaders`; then `status`, `reason`, "
        "`version`, `headers`, `body`, `truncated`, `buffer(max_bytes)` |",
        "| `flow.respond(status, headers=(), body=b'')` | answer (or replace the response) |",
        "| `flow.kill()` | close the client connection without an answer |",
        "| `flow.error`, `flow.error_detail` | set when the exchange failed |",
        "| `flow.metadata` | a dict for the addon's own notes |",
        "",
        "A status an addon sets (`flow.response.status`, `flow.respond()`) must be a final "
        "one, 200 to 599: a 1xx is an interim response and cannot end an exchange (RFC 9110 "
        "§15.2), so it raises ValueError. A new status brings its own reason phrase "
        "(`404 Not Found`); set `flow.response.reason` after the status for another. "
        "A 204 or 304 goes out without a body and without "
        "Content-Length or Transfer-Encoding (RFC 9110 §6.4.1); the origin's body is "
        "dropped. A response to HEAD never has a body.",
        "",
    ]
    return "\n".join(lines)
