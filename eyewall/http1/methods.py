"""Request methods the proxy knows by name: the IANA HTTP Method Registry.

Method names are case-sensitive (RFC 9110 §9.1), yet common origin frameworks match
them case-insensitively and would serve ``head`` as HEAD.  The proxy's own decisions
compare exact spellings (a HEAD response has no body, CONNECT opens a tunnel, GET may
upgrade to WebSocket, idempotent requests may be retried), so a case-variant of a
registered name would make the proxy and the origin frame the same exchange
differently.  `parse_request_head` refuses such variants; other tokens pass unchanged.
"""

from __future__ import annotations

__all__ = ["REGISTERED", "canonical_method"]

# Source: IANA "Hypertext Transfer Protocol (HTTP) Method Registry",
# https://www.iana.org/assignments/http-methods (RFC 9110 §16.1; initial entries from
# RFC 7237), as published in 2024.  Method name -> (safe, idempotent).
REGISTERED: dict[str, tuple[bool, bool]] = {
    "ACL": (False, True),
    "BASELINE-CONTROL": (False, True),
    "BIND": (False, True),
    "CHECKIN": (False, True),
    "CHECKOUT": (False, True),
    "CONNECT": (False, False),
    "COPY": (False, True),
    "DELETE": (False, True),
    "GET": (True, True),
    "HEAD": (True, True),
    "LABEL": (False, True),
    "LINK": (False, True),
    "LOCK": (False, False),
    "MERGE": (False, True),
    "MKACTIVITY": (False, True),
    "MKCALENDAR": (False, True),
    "MKCOL": (False, True),
    "MKREDIRECTREF": (False, True),
    "MKWORKSPACE": (False, True),
    "MOVE": (False, True),
    "OPTIONS": (True, True),
    "ORDERPATCH": (False, True),
    "PATCH": (False, False),
    "POST": (False, False),
    "PRI": (True, True),
    "PROPFIND": (True, True),
    "PROPPATCH": (False, True),
    "PUT": (False, True),
    "REBIND": (False, True),
    "REPORT": (True, True),
    "SEARCH": (True, True),
    "TRACE": (True, True),
    "UNBIND": (False, True),
    "UNCHECKOUT": (False, True),
    "UNLINK": (False, True),
    "UNLOCK": (False, True),
    "UPDATE": (False, True),
    "UPDATEREDIRECTREF": (False, True),
    "VERSION-CONTROL": (False, True),
}
# Every registered name is upper-case, so upper-casing finds the registered spelling.
_BY_UPPER = {name.upper(): name for name in REGISTERED}


def canonical_method(method: str) -> str | None:
    """The registered spelling ``method`` is a case-variant of, or None.

    ``canonical_method("get") == "GET"``; ``canonical_method("GET") == "GET"``;
    ``canonical_method("BREW") is None``.  ``method`` is a token (ASCII).
    """
    return _BY_UPPER.get(method.upper())
