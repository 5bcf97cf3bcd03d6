"""Eyewall: an asynchronous HTTP/HTTPS forward proxy on Tornado.

The addon API is importable from here: `HTTPFlow` with its `Request` and `Response`,
`Client`, and the hook classes (docs/hooks.md).  ``tests/test_api.py`` pins it.
"""

__version__ = "0.2.0.dev0"

from eyewall.addons.api import Client, HTTPFlow, Request, Response
from eyewall.addons.hooks import (
    ClientConnected,
    ClientDisconnected,
    Configure,
    Done,
    ErrorHook,
    Hook,
    HttpConnect,
    Load,
    RequestHeaders,
    RequestHook,
    ResponseHeaders,
    ResponseHook,
    Running,
    TunnelEnd,
    TunnelStart,
)

__all__ = [
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
]
