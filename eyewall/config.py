"""Settings: one typed object, loaded from a TOML file and command-line options.

Every timeout and limit has a name, a default, a unit, a command-line flag and a line of
help; the settings table in the README is generated from these declarations
(``./scripts/generate-docs``) and a test keeps the two equal.  Loading checks types and
ranges and reports every problem at once, each naming the setting, the file and the
line (``eyewall.toml:12: timeouts.client_header: must be greater than 0``); an unknown
key suggests the nearest known one.  Relative paths in a file are relative to that
file.

This module imports nothing else from eyewall: what settings *mean* (rules compiled,
users read, directories checked) is the application's business (`eyewall.app`).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "Endpoint",
    "Settings",
    "Timeouts",
    "annotate",
    "in_file_order",
    "iter_settings",
    "load_settings",
    "locate",
    "parse_endpoint",
    "restart_settings",
]


class ConfigError(ValueError):
    """Settings are invalid.  ``errors`` lists every problem, one line each, starting
    with the setting's path (or ``FILE:LINE: path``); ``str()`` joins them."""

    def __init__(self, errors: str | list[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        # what could be read anyway (invalid values replaced by defaults), when the
        # settings file was read: later checks (rules, paths) still report their errors
        self.settings: Settings | None = None
        super().__init__("\n".join(self.errors))


Check = Callable[[Any], str | None]


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _at_least(minimum: int) -> Check:
    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be at least {minimum}"

    return check


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None,
    unit: str = "",
    check: Check | None = None,
    path: bool = False,
    restart: bool = False,
) -> Any:
    """A setting's declaration: ``path`` marks a file or directory (relative paths in
    a file are taken relative to it); ``restart`` marks a setting a reload cannot
    change."""
    return field(
        default=default,
        metadata={
            "help": help,
            "flag": flag,
            "unit": unit,
            "check": check,
            "path": path,
            "restart": restart,
        },
    )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A listening address: ``host`` (an IP literal or name, IPv6 without brackets) and
    ``port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """Whether the host is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def parse_endpoint(text: str) -> Endpoint:
    """``HOST:PORT``, ``[V6]:PORT`` or a bare ``PORT`` (meaning 127.0.0.1)."""
    text = text.strip()
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [IPV6]:PORT, got {text!r}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"invalid port in {text!r}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"listen host must be an IP address, got {host!r}") from None
    return Endpoint(host, int(port_text))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The ``timeouts.*`` settings: seconds each phase of a connection may last (see
    docs/design.md, "Time limits")."""

    client_header: float = setting(
        10.0,
        "A client has this long to send a whole request head, counted from its first byte"
        " (a new connection: from accept). Slowloris guard; answered with 408. On Linux a new"
        " connection that sends nothing at all is held by the kernel (TCP_DEFER_ACCEPT) and"
        " dropped there, silently, some seconds after this.",
        flag="--client-header-timeout",
        unit="s",
        check=_positive,
    )
    keepalive_idle: float = setting(
        60.0,
        "An idle client connection between requests is closed after this long.",
        flag="--keepalive-idle-timeout",
        unit="s",
        check=_positive,
    )
    upstream_connect: float = setting(
        10.0,
        "Name resolution plus TCP (and TLS) connection to the origin; then 504.",
        flag="--upstream-connect-timeout",
        unit="s",
        check=_positive,
    )
    upstream_head: float = setting(
        60.0,
        "From the end of the request to the origin's response head; then 504.",
        flag="--upstream-head-timeout",
        unit="s",
        check=_positive,
    )
    body_idle: float = setting(
        60.0,
        "Longest pause in a request or response body in either direction (a stalled"
        " reader or writer); the exchange is then abandoned.",
        flag="--body-idle-timeout",
        unit="s",
        check=_positive,
    )
    tunnel_idle: float = setting(
        600.0,
        "A CONNECT or WebSocket tunnel with no bytes either way for this long is closed.",
        flag="--tunnel-idle-timeout",
        unit="s",
        check=_positive,
    )
    drain: float = setting(
        10.0,
        "On SIGTERM/SIGINT, how long in-flight requests and tunnels may run before"
        " they are closed.",
        flag="--drain-timeout",
        unit="s",
        check=_at_least(0),
    )
    drain_grace: float = setting(
        3.0,
        "On SIGTERM, /healthz answers 503 at once but the listeners keep serving for this"
        " long before draining starts, so a load balancer stops sending new traffic"
        " first (0: drain at once; SIGINT never waits).",
        flag="--drain-grace",
        unit="s",
        check=_at_least(0),
    )
    addon_hook: float = setting(
        30.0,
        "Longest an addon hook may run; then it is cancelled (async) or stopped"
        " (plain) and counts as a failed hook (a policy addon fails the request)."
        " Also bounds loading an addon file. Never blamed on the origin.",
        flag="--addon-hook-timeout",
        unit="s",
        check=_positive,
    )


@dataclass(frozen=True, slots=True)
class Limits:
    """The ``limits.*`` settings: sizes (bytes) and counts that bound what one client can make
    the proxy hold."""

    max_header_size: int = setting(
        65536,
        "Request line plus header section; a larger request head is answered with 431"
        " (or 414 when the request line alone is too long).",
        flag="--max-header-size",
        unit="bytes",
        check=_at_least(1024),
    )
    max_target_length: int = setting(
        8192,
        "Longest request target (URL); a longer one is answered with 414.",
        flag="--max-target-length",
        unit="bytes",
        check=_at_least(64),
    )
    max_connections: int = setting(
        10000,
        "Client connections open at once. Beyond it a new client is answered with 503"
        " and closed (it does not wait in the backlog).",
        flag="--max-connections",
        check=_at_least(1),
    )


@dataclass(frozen=True, slots=True)
class Pool:
    """The ``pool.*`` settings: upstream keep-alive connections kept for reuse."""

    idle_per_origin: int = setting(
        256,
        "Idle keep-alive connections kept per origin (scheme, host, port); enough for"
        " the busiest origin's concurrency, or connections are closed and reopened.",
        flag="--pool-idle-per-origin",
        check=_at_least(0),
    )
    idle_timeout: float = setting(
        30.0,
        "An idle pooled origin connection is closed after this long.",
        flag="--pool-idle-timeout",
        unit="s",
        check=_positive,
    )


def _workers(value: Any) -> str | None:
    if value == "auto" or (isinstance(value, int) and 1 <= value <= 256):
        return None
    return "must be a number of processes (1-256) or auto"


def _networks(values: Any) -> str | None:
    for value in values:
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            return f"not a network: {value!r}"
    return None


def _ports(values: Any) -> str | None:
    for value in values:
        low, sep, high = value.strip().partition("-")
        parts = (low, high) if sep else (low,)
        if not all(p.isascii() and p.isdigit() for p in parts):
            return f"not a port or range: {value!r}"
        if not 0 < int(low) <= int(parts[-1]) < 65536:
            return f"ports must be 1-65535: {value!r}"
    return None


@dataclass(frozen=True, slots=True)
class Access:
    """The ``access.*`` settings: which clients may connect and which destinations they may
    reach."""

    allow_clients: tuple[str, ...] = setting(
        (),
        "Client networks (CIDR) that may use the proxy; others get 403. Empty means"
        " loopback only, and then every listener must be on loopback: listening elsewhere"
        " without naming the clients fails at start-up (no open proxy by accident).",
        flag="--allow-client",
        check=_networks,
    )
    allow_private: bool = setting(
        False,
        "Allow destinations in protected ranges (loopback, private, link-local and"
        " metadata, CGNAT, unique-local, multicast, ...). Off by default: SSRF guard.",
        flag="--allow-private",
    )
    connect_ports: tuple[str, ...] = setting(
        ("443",),
        "Ports CONNECT may reach (ranges like 8000-8100) unless a rule allows others.",
        flag="--connect-port",
        check=_ports,
    )
    default: str = setting(
        "allow",
        "Action when no rule matches: allow or deny.",
        flag="--default-action",
        check=lambda v: None if v in ("allow", "deny") else "must be allow or deny",
    )


@dataclass(frozen=True, slots=True)
class Auth:
    """The ``auth.*`` settings: proxy authentication (RFC 9110 §11.7, Basic) and its brute-force
    throttle."""

    htpasswd: str = setting(
        "",
        "htpasswd file of user:bcrypt-hash lines. Any user (here or in auth.users) turns"
        " proxy authentication (Basic) on for every request, CONNECT included. Re-read"
        " when it changes.",
        flag="--htpasswd",
        path=True,
    )
    users: tuple[tuple[str, str], ...] = setting(
        (), "Inline users: a table of name = bcrypt hash.", flag=None
    )
    groups: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        (), "Groups for rules: a table of group = [user, ...].", flag=None
    )
    realm: str = setting("eyewall", "Realm named in Proxy-Authenticate.", flag="--auth-realm")
    cache_ttl: float = setting(
        300.0,
        "How long verified credentials are remembered (bcrypt is slow on purpose).",
        flag="--auth-cache-ttl",
        unit="s",
        check=_at_least(0),
    )


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The ``rate_limits.*`` settings: per-client and per-user request rates and concurrent
    tunnels."""

    client_rps: float = setting(
        0.0,
        "Requests per second per client address (token bucket); 0: no limit. Beyond it:"
        " 429 with Retry-After.",
        flag="--client-rps",
        check=_at_least(0),
    )
    client_burst: int = setting(
        0, "Burst for client_rps; 0: twice the rate.", flag="--client-burst", check=_at_least(0)
    )
    user_rps: float = setting(
        0.0, "Requests per second per user; 0: no limit.", flag="--user-rps", check=_at_least(0)
    )
    user_burst: int = setting(
        0, "Burst for user_rps; 0: twice the rate.", flag="--user-burst", check=_at_least(0)
    )
    client_connections: int = setting(
        256,
        "Connections open at once per client address; 0: no limit. Beyond it: 429, closed."
        " A browser opens a few dozen at most; the default keeps one client holding"
        " half-sent heads from taking every slot of max_connections.",
        flag="--client-connections",
        check=_at_least(0),
    )
    client_tunnels: int = setting(
        0,
        "Tunnels open at once per client address; 0: no limit.",
        flag="--client-tunnels",
        check=_at_least(0),
    )
    user_tunnels: int = setting(
        0,
        "Tunnels open at once per user; 0: no limit.",
        flag="--user-tunnels",
        check=_at_least(0),
    )


def _listen_or_off(value: Any) -> str | None:
    if value == "off":
        return None
    try:
        parse_endpoint(value)
    except ValueError as e:
        return str(e)
    return None


@dataclass(frozen=True, slots=True)
class Admin:
    """The ``admin.*`` settings: the admin listener (metrics, health, dashboard, flows API) and
    its token."""

    listen: str = setting(
        "127.0.0.1:8480",
        'Admin listener (metrics, health, dashboard, flows API), or "off". Anywhere but'
        " loopback it requires admin.token.",
        flag="--admin-listen",
        check=_listen_or_off,
        restart=True,
    )
    token: str = setting(
        "",
        "Secret required by the admin listener (Bearer header, or cookie set by"
        " /login?token=...). Never logged.",
        flag="--admin-token",
    )


@dataclass(frozen=True, slots=True)
class Flows:
    """The ``flows.*`` settings: flow recording (where, how much body, how long kept)."""

    enabled: bool = setting(
        True,
        "Record flows (heads, timings, sizes, decisions) to flows.path; --no-flows turns"
        " recording off.",
        flag="--no-flows",
        restart=True,
    )
    path: str = setting(
        "",
        "SQLite file for recorded flows; empty means flows.sqlite3 in the user's data"
        " directory ($XDG_DATA_HOME/eyewall, or ~/.local/share/eyewall).",
        flag="--flows",
        path=True,
        restart=True,
    )
    credentials: bool = setting(
        False,
        "Record credentials (Authorization, cookies, API-key and token fields, token query"
        " parameters); off: they are recorded as [redacted] (Proxy-Authorization always"
        " is).",
        flag="--flows-credentials",
    )
    body_limit: int = setting(
        0,
        "Bytes of each request and response body to record (0: none).",
        flag="--flows-body-limit",
        unit="bytes",
        check=_at_least(0),
    )
    max_count: int = setting(
        100_000,
        "Recorded flows kept (oldest removed first).",
        flag="--flows-max-count",
        check=_at_least(1),
    )
    max_age: float = setting(
        7 * 86400.0,
        "Recorded flows older than this are removed.",
        flag="--flows-max-age",
        unit="s",
        check=_positive,
    )
    max_bytes: int = setting(
        1 << 30,
        "Recorded flows kept at most this many bytes of database (oldest removed first;"
        " at least 1 MiB).",
        flag="--flows-max-bytes",
        unit="bytes",
        check=_at_least(1 << 20),
    )
    memory: int = setting(
        2000,
        "Most recent flows kept in memory for the dashboard and the flows API.",
        flag="--flows-memory",
        check=_at_least(0),
    )
    memory_bytes: int = setting(
        64 << 20,
        "Memory those recent flows may take at most (heads and captured bodies; at least 1 MiB).",
        flag="--flows-memory-bytes",
        unit="bytes",
        check=_at_least(1 << 20),
    )


@dataclass(frozen=True, slots=True)
class Tls:
    """The ``tls.*`` settings: HTTPS proxy listeners and opt-in TLS interception."""

    listen: tuple[Endpoint, ...] = setting(
        (),
        "Addresses of HTTPS proxy listeners: clients speak TLS to the proxy itself"
        " (curl --proxy https://..., browsers' HTTPS proxies), then the usual requests"
        " and CONNECTs inside. Needs tls.certificate and tls.key.",
        flag="--tls-listen",
        restart=True,
    )
    certificate: str = setting(
        "",
        "PEM certificate chain the HTTPS proxy listeners present.",
        flag="--tls-certificate",
        path=True,
        restart=True,
    )
    key: str = setting(
        "",
        "PEM private key of tls.certificate (keep it readable only by the proxy's user).",
        flag="--tls-key",
        path=True,
        restart=True,
    )
    ca_dir: str = setting(
        "",
        "Directory of the interception CA (ca.pem, ca.key), made by eyewall ca init;"
        " empty: ca/ in the user's data directory. Used only by intercept rules.",
        flag="--ca-dir",
        path=True,
    )
    upstream_ca_bundle: str = setting(
        "",
        "PEM file of CAs trusted for origin certificates; empty: the system store.",
        flag="--upstream-ca-bundle",
        path=True,
    )
    handshake_timeout: float = setting(
        10.0,
        "Time a client has to complete the TLS handshake of an intercepted tunnel.",
        flag="--tls-handshake-timeout",
        unit="s",
        check=_positive,
    )
    certificate_cache: int = setting(
        1024,
        "Minted host certificates kept in memory (least recently used dropped).",
        flag="--certificate-cache",
        check=_at_least(16),
    )
    passthrough_pinned: bool = setting(
        False,
        "When a client refuses the interception certificate for a host (certificate"
        " pinning), tunnel that host without interception for the next hour, for that"
        " client address and user only.",
        flag="--passthrough-pinned",
    )


# --- a fleet of nodes behind a load balancer (docs/fleet.md) ----------------------------


def _token(value: Any) -> str | None:
    ok = all(c.isalnum() or c in "-._" for c in value) and len(value) <= 64
    return None if ok else "must be a token of at most 64 letters, digits, - . _"


def _url(*schemes: str) -> Check:
    def check(value: Any) -> str | None:
        if not value:
            return None
        scheme = value.partition("://")[0].lower()
        if "://" not in value or scheme not in schemes:
            return f"must be empty or a URL starting {' or '.join(s + '://' for s in schemes)}"
        return None

    return check


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be {', '.join(choices[:-1])} or {choices[-1]}"

    return check


@dataclass(frozen=True, slots=True)
class Fleet:
    """The ``fleet.*`` settings: this node among several behind a load balancer
    (docs/fleet.md)."""

    node: str = setting(
        "",
        "This node's name: the node label of eyewall_node_info, /healthz, and the node"
        " of each flow in a shared flow database. Empty: the host name.",
        flag="--node",
        check=_token,
        restart=True,
    )


@dataclass(frozen=True, slots=True)
class ProxyProtocol:
    """The ``proxy_protocol.*`` settings: which peers must begin their connections with
    a PROXY protocol header (HAProxy's specification, versions 1 and 2), and how long
    they have for it."""

    trusted: tuple[str, ...] = setting(
        (),
        "Load balancer networks (CIDR) whose connections must start with a PROXY"
        " protocol header (v1 or v2); the header's source becomes the client address for"
        " rules, limits and logs. A trusted peer without a header, or another peer with"
        " one, is refused. Empty: the PROXY protocol is off.",
        flag="--proxy-protocol-trusted",
        check=_networks,
    )
    listeners: tuple[Endpoint, ...] = setting(
        (),
        "Which of listen and tls.listen expect PROXY headers from trusted peers;"
        " empty: all of them. On the others a trusted peer is an ordinary client.",
        flag="--proxy-protocol-listener",
    )
    header_timeout: float = setting(
        3.0,
        "A trusted peer has this long from accept to send the whole PROXY header;"
        " then the connection is closed.",
        flag="--proxy-protocol-timeout",
        unit="s",
        check=_positive,
    )


@dataclass(frozen=True, slots=True)
class SharedLimits:
    """The ``shared_limits.*`` settings: the limits kept in Redis for every node of a
    fleet, the bounds on waiting for it, and what decides while it does not answer."""

    redis: str = setting(
        "",
        "Redis URL (redis://HOST:PORT/DB, rediss:// for TLS, unix:///PATH?db=DB) where"
        " every node keeps the rate limits, connection and tunnel caps and failed-login"
        " counts together; empty: each node keeps its own.",
        flag="--shared-limits-redis",
        check=_url("redis", "rediss", "unix"),
        restart=True,
    )
    when_down: str = setting(
        "local",
        "When Redis does not answer in time: local (this node applies the limits alone),"
        " open (no limits) or closed (refuse with 503).",
        flag="--shared-limits-when-down",
        check=_one_of("local", "open", "closed"),
    )
    connect_timeout: float = setting(
        0.25,
        "Opening a connection to Redis; a limit check waits at most this plus command_timeout.",
        flag="--shared-limits-connect-timeout",
        unit="s",
        check=_positive,
        restart=True,
    )
    command_timeout: float = setting(
        0.25,
        "Redis's answer to one limit check.",
        flag="--shared-limits-command-timeout",
        unit="s",
        check=_positive,
        restart=True,
    )
    retry_after: float = setting(
        1.0,
        "After Redis failed to answer, checks go straight to when_down for this long"
        " before Redis is tried again (0: try every time).",
        flag="--shared-limits-retry-after",
        unit="s",
        check=_at_least(0),
        restart=True,
    )
    lease_ttl: float = setting(
        30.0,
        "A connection or tunnel counted in Redis stays counted this long after its node"
        " last refreshed it (a crashed node's count expires); refreshed every third of it.",
        flag="--shared-limits-lease-ttl",
        unit="s",
        check=_at_least(3),
        restart=True,
    )
    prefix: str = setting(
        "eyewall",
        "First part of every Redis key (several fleets can share one Redis).",
        flag="--shared-limits-prefix",
        check=_token,
        restart=True,
    )


@dataclass(frozen=True, slots=True)
class SharedFlows:
    """The ``shared_flows.*`` settings: flows of every node recorded to one PostgreSQL
    database, and the bounds on waiting for it (retention is ``flows.*``)."""

    postgresql: str = setting(
        "",
        "PostgreSQL URL (postgresql://USER@HOST:PORT/DB; the password from PGPASSFILE or"
        " ~/.pgpass) that every node records its flows to, and that the flows API, HAR"
        " export and dashboard read; empty: flows.path (SQLite, this node only).",
        flag="--shared-flows-postgresql",
        check=_url("postgresql", "postgres"),
        restart=True,
    )
    connect_timeout: float = setting(
        5.0,
        "Opening a connection to PostgreSQL.",
        flag="--shared-flows-connect-timeout",
        unit="s",
        check=_positive,
        restart=True,
    )
    command_timeout: float = setting(
        10.0,
        "Writing one batch of flows, or one read of the flows API; a batch that takes"
        " longer is dropped and counted.",
        flag="--shared-flows-command-timeout",
        unit="s",
        check=_positive,
        restart=True,
    )
    max_pending: int = setting(
        8 << 20,
        "Flows waiting to be written may take this much memory; beyond it new flows are"
        " dropped and counted (traffic never waits for the database).",
        flag="--shared-flows-max-pending",
        unit="bytes",
        check=_at_least(1 << 20),
        restart=True,
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, with its default, help text, command-line flag and check; built by
    `load_settings` from embedded defaults, a TOML file and flags, in that order of
    precedence (last wins)."""

    listen: tuple[Endpoint, ...] = setting(
        (Endpoint("127.0.0.1", 8080),),
        "Addresses the proxy listens on (repeat the flag for several; IPv6 as [::1]:8080).",
        flag="--listen",
        restart=True,
    )
    log_level: str = setting(
        "info",
        "Level of operational log messages: debug, info, warning, error.",
        flag="--log-level",
        check=lambda v: (
            None
            if v in ("debug", "info", "warning", "error")
            else "must be one of debug, info, warning, error"
        ),
    )
    access_log: str = setting(
        "-",
        'Where access lines go: "-" for stderr, a file path, or "off".',
        flag="--access-log",
        path=True,
    )
    log_format: str = setting(
        "auto",
        "Access line format: json, text, squid (native), common or combined (CLF);"
        " auto is text on a terminal, json otherwise.",
        flag="--log-format",
        check=lambda v: (
            None
            if v in ("auto", "json", "text", "squid", "common", "combined")
            else "must be auto, json, text, squid, common or combined"
        ),
    )
    event_loop: str = setting(
        "auto",
        "Event loop: uvloop (faster), asyncio, or auto (uvloop when installed).",
        flag="--event-loop",
        restart=True,
        check=lambda v: (
            None if v in ("auto", "uvloop", "asyncio") else "must be auto, uvloop or asyncio"
        ),
    )
    workers: int | str = setting(
        1,
        "Worker processes serving the listeners: a number, or auto (one per CPU this"
        " process may run on). Above 1, a supervisor starts them, restarts one that"
        " dies, and keeps one set of limits, access log, flow store, metrics and admin"
        " listener for all of them (docs/scaling.md).",
        flag="--workers",
        check=_workers,
        restart=True,
    )
    via: str = setting(
        "eyewall",
        "Pseudonym this proxy adds to Via fields and names itself by in Proxy-Status.",
        flag="--via",
        check=lambda v: (
            None
            if v and all(c.isalnum() or c in "-._" for c in v)
            else "must be a token (letters, digits, - . _)"
        ),
    )
    pid_file: str = setting(
        "",
        "File to write the process id to (for eyewall reload and service managers).",
        flag="--pid-file",
        path=True,
        restart=True,
    )
    watch_config: bool = setting(
        False,
        "Reload the configuration file when it changes (as on SIGHUP).",
        flag="--watch-config",
    )
    addons: tuple[str, ...] = setting(
        (),
        "Addon files (Python) whose hooks observe or change traffic (docs/hooks.md).",
        flag="--addon",
        path=True,
        restart=True,
    )
    policy_addons: tuple[str, ...] = setting(
        (),
        "Addon files that enforce policy: an exception in one fails the request (502)"
        " instead of being logged and ignored.",
        flag="--policy-addon",
        path=True,
        restart=True,
    )
    rules: tuple[Mapping[str, Any], ...] = setting(
        (),
        "Destination rules, as [[rules]] tables, first match wins (see docs/policy.md).",
        flag=None,
    )
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    pool: Pool = field(default_factory=Pool)
    access: Access = field(default_factory=Access)
    auth: Auth = field(default_factory=Auth)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    admin: Admin = field(default_factory=Admin)
    flows: Flows = field(default_factory=Flows)
    tls: Tls = field(default_factory=Tls)
    fleet: Fleet = field(default_factory=Fleet)
    proxy_protocol: ProxyProtocol = field(default_factory=ProxyProtocol)
    shared_limits: SharedLimits = field(default_factory=SharedLimits)
    shared_flows: SharedFlows = field(default_factory=SharedFlows)


# --- loading ---------------------------------------------------------------------------


def _coerce(path: str, hint: Any, value: Any) -> Any:
    """``value`` as the declared type; raises ConfigError naming ``path``."""
    if hint in ("float", float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: must be a number (got {value!r})")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number")
        return float(value)
    if hint in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer (got {value!r})")
        return value
    if hint in ("str", str):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string (got {value!r})")
        return value
    if hint in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false (got {value!r})")
        return value
    if hint == "int | str":  # a count or a word: workers = 4, workers = "auto"
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{path}: must be a number or a word (got {value!r})")
        return value
    if hint == "tuple[str, ...]":
        items = [value] if isinstance(value, str | int) else value
        if not isinstance(items, list) or not all(isinstance(v, str | int) for v in items):
            raise ConfigError(f"{path}: must be a list of strings")
        return tuple(str(v) for v in items)
    if hint == "tuple[tuple[str, str], ...]":
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{path}: must be a table of name = string")
        return tuple(value.items())
    if hint == "tuple[tuple[str, tuple[str, ...]], ...]":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: must be a table of name = [strings]")
        out = []
        for name, members in value.items():
            out.append((name, _coerce(f"{path}.{name}", "tuple[str, ...]", members)))
        return tuple(out)
    if hint == "tuple[Mapping[str, Any], ...]":
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError(f"{path}: must be an array of tables ([[{path}]])")
        return tuple(dict(v) for v in value)
    if hint == "tuple[Endpoint, ...]":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{path}: must be a list of HOST:PORT strings")
        try:
            return tuple(parse_endpoint(str(v)) for v in items)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
    raise AssertionError(f"no loader for {hint!r}")


def _build(cls: Any, data: Mapping[str, Any], prefix: str, errors: list[str]) -> Any:
    """An instance of ``cls`` from ``data``; problems go to ``errors`` (and the
    default is kept for that setting)."""
    if not isinstance(data, Mapping):
        errors.append(f"{prefix.rstrip('.') or 'config'}: must be a table")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in data.items():
        path = prefix + name
        f = fields.get(name)
        if f is None:
            near = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            errors.append(f"{path}: unknown setting{hint}")
            continue
        if f.default_factory is not dataclasses.MISSING:  # a nested section
            values[name] = _build(f.default_factory, value, path + ".", errors)
            continue
        try:
            converted = _coerce(path, f.type, value)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        check = f.metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            errors.append(f"{path}: {problem} (got {value!r})")
            continue
        values[name] = converted
    return cls(**values)


def _path_settings() -> set[str]:
    return {s.path for s in iter_settings() if s.is_path}


def _anchor(data: dict[str, Any], base: Path) -> None:
    """Make the relative paths of a file's settings relative to its directory."""
    for dotted in _path_settings():
        *parents, leaf = dotted.split(".")
        node: Any = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node[leaf]
        if isinstance(value, str):
            node[leaf] = _anchored(value, base)
        elif isinstance(value, list):
            node[leaf] = [_anchored(v, base) if isinstance(v, str) else v for v in value]


def _anchored(value: str, base: Path) -> str:
    if value in ("", "-", "off") or os.path.isabs(value):
        return value
    return os.path.normpath(base / value)  # as the file's own path: no "x/../" in messages


def locate(text: str, dotted: str) -> int | None:
    """The line (1-based) of the TOML key ``dotted`` in ``text`` — ``timeouts.body_idle``,
    ``rules[2].hosts`` (the third ``[[rules]]``) — or of its table; best effort (keys
    written as inline tables are not found); None if not found."""
    names: list[str] = []
    wanted: dict[str, int] = {}  # array-of-tables name -> index asked for
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        if part.startswith("["):
            wanted[".".join(names)] = int(part[1:-1])
        else:
            names.append(part)
    table: list[str] = []
    seen: dict[str, int] = {}  # array-of-tables name -> index of the current one
    header_line = None
    inside = None  # the first key under ``dotted`` (``timeout.client_header = 3``)
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        header = re.fullmatch(r"\[\[\s*([^\]]+?)\s*\]\]|\[\s*([^\]]+?)\s*\]", line)
        if header:
            name = (header.group(1) or header.group(2)).strip()
            table = name.split(".")
            if header.group(1):
                seen[name] = seen.get(name, -1) + 1
            if table == names and _right_entry(name, seen, wanted) and header_line is None:
                header_line = number
            continue
        key = re.match(r'([A-Za-z0-9_.\-"]+)\s*=', line)
        full = [*table, *key.group(1).replace('"', "").split(".")] if key else None
        if full == names and _right_entry(".".join(table), seen, wanted):
            return number
        if (
            full
            and full[: len(names)] == names
            and inside is None
            and _right_entry(".".join(table), seen, wanted)
        ):
            inside = number
    if header_line is None:
        header_line = inside
    if header_line is None and "." in dotted:  # a key that is missing: its table's line
        return locate(text, dotted.rsplit(".", 1)[0])
    return header_line


def _right_entry(table: str, seen: dict[str, int], wanted: dict[str, int]) -> bool:
    return table not in wanted or seen.get(table) == wanted[table]


def load_settings(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Settings from a TOML file (if given) with ``overrides`` (dotted paths, from
    flags) on top.  Raises ConfigError listing every problem, each with its setting
    (as the flag when it came from one) and, for the file, its line."""
    data: dict[str, Any] = {}
    text = ""
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8", errors="replace")
            data = tomllib.loads(text)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            where = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
            message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
            if where:
                message = f"{where.group(1)}: invalid TOML: {message} (column {where.group(2)})"
            else:
                message = f" invalid TOML: {message}"
            raise ConfigError(f"{path}:{message}") from None
        _anchor(data, Path(os.path.abspath(path)).parent)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    errors: list[str] = []
    settings: Settings = _build(Settings, data, "", errors)
    if not errors:
        errors.extend(_exposure_problems(settings))
        errors.extend(_fleet_problems(settings))
    if errors:
        error = ConfigError(
            in_file_order([_where(e, path, text, overrides or {}) for e in dict.fromkeys(errors)])
        )
        error.settings = settings  # defaults in place of the invalid values
        raise error
    return settings


def annotate(
    errors: list[str], path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> list[str]:
    """Prefix each ``setting: message`` with ``FILE:LINE:`` (or name the flag when the
    setting came from one), for errors found after loading (rules, files)."""
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            pass
    return in_file_order([_where(e, path, text, overrides or {}) for e in dict.fromkeys(errors)])


_LINE = re.compile(r"^\S*?:(\d+): ")


def in_file_order(errors: list[str]) -> list[str]:
    """``errors`` sorted by their ``FILE:LINE:`` (stable; those without a line first)."""

    def line(error: str) -> int:
        found = _LINE.match(error)
        return int(found.group(1)) if found else 0

    return sorted(errors, key=line)


def _where(error: str, path: str | Path | None, text: str, overrides: Mapping[str, Any]) -> str:
    setting_path = error.partition(":")[0]
    leaf = re.sub(r"\[\d+\].*", "", setting_path)
    if setting_path in overrides or leaf in overrides:
        flags = {s.path: s.flag for s in iter_settings()}
        flag = flags.get(setting_path) or flags.get(leaf)
        if flag:
            return f"{flag}{error[len(setting_path) :]}"
        return error
    if path is None:
        return error
    line = locate(text, setting_path)
    return f"{path}:{line}: {error}" if line else f"{path}: {error}"


def _exposure_problems(settings: Settings) -> list[str]:
    """Refuse to be an open proxy, or an open dashboard, by accident."""
    problems = []
    admin = settings.admin
    if admin.listen != "off" and not parse_endpoint(admin.listen).is_loopback and not admin.token:
        problems.append(
            f"admin.token: required when the admin listener is on {admin.listen}"
            " (it shows all traffic): set a token, or listen on loopback"
        )
    tls = settings.tls
    if tls.listen and not (tls.certificate and tls.key):
        problems.append("tls.certificate: required (with tls.key) by tls.listen")
    if not settings.access.allow_clients:
        exposed = [str(e) for e in (*settings.listen, *tls.listen) if not e.is_loopback]
        if exposed:
            problems.append(
                f"access.allow_clients: required when listening on {', '.join(exposed)}:"
                " name the client networks that may use the proxy (anyone who can reach"
                " an unrestricted proxy can use it)"
            )
    return problems


def _fleet_problems(settings: Settings) -> list[str]:
    """PROXY protocol listeners must be listeners."""
    listeners = (*settings.listen, *settings.tls.listen)
    return [
        f"proxy_protocol.listeners: {e} is not in listen or tls.listen"
        for e in settings.proxy_protocol.listeners
        if e not in listeners
    ]


def restart_settings(old: Settings, new: Settings) -> list[str]:
    """The settings that differ between ``old`` and ``new`` but need a restart."""
    changed = []
    for s in iter_settings():
        if s.restart and _get(old, s.path) != _get(new, s.path):
            changed.append(s.path)
    return changed


def _get(settings: Settings, dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# --- reference -------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingInfo:
    """One setting's declaration, for flags, the reference table and the loader."""

    path: str  # dotted TOML path
    flag: str | None
    type: str
    default: Any
    unit: str
    help: str
    check: Check | None
    is_path: bool = False
    restart: bool = False


def iter_settings(cls: Any = Settings, prefix: str = "") -> Iterator[SettingInfo]:
    """Every leaf setting of ``cls`` (default: `Settings`) as a `SettingInfo`, with dotted names
    (``timeouts.client_header``), in declaration order."""
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            yield from iter_settings(f.default_factory, f"{prefix}{f.name}.")
            continue
        m = f.metadata
        yield SettingInfo(
            prefix + f.name,
            m["flag"],
            str(f.type),
            f.default,
            m["unit"],
            m["help"],
            m["check"],
            m["path"],
            m["restart"],
        )


def _show_default(info: SettingInfo) -> str:
    if isinstance(info.default, tuple):
        return ", ".join(str(e) for e in info.default)
    if isinstance(info.default, float) and info.default.is_integer():
        return str(int(info.default))
    return str(info.default)


def reference_table() -> str:
    """The Markdown settings table for the README; a setting a reload cannot change
    says so ("Restart to change.")."""
    rows = ["| setting (TOML) | flag | default | meaning |", "|---|---|---|---|"]
    for s in iter_settings():
        default = _show_default(s) + (f" {s.unit}" if s.unit else "")
        flag = f"`{s.flag}`" if s.flag else "(file only)"
        meaning = f"{s.help} **Restart to change.**" if s.restart else s.help
        rows.append(f"| `{s.path}` | {flag} | {default or '(none)'} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_table())
