"""The admin listener: health, Prometheus metrics, the flows API, HAR download and the
live dashboard (docs/admin-api.md).  Off the data path: it reads the proxy through a
small `ProxyStats` protocol and the observers' own state."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets

from eyewall.config import Endpoint
from eyewall.observe.har import har, har_query, host_filter, is_exchange
from eyewall.observe.live import Client, LiveFeed
from eyewall.observe.metrics import Metrics
from eyewall.observe.records import Record, detail, summary
from eyewall.observe.store import FlowStore, read_records
from eyewall.tls.layers import HANDSHAKE_FAILURE, alert, starts_tls

__all__ = ["AdminServer", "ProxyStats", "SharedFlows"]

T = TypeVar("T")


class ProxyStats(Protocol):
    """What the admin listener reads of the proxy."""

    def gauges(self) -> dict[str, float]:
        """Open client connections, tunnels and idle pooled origin connections:
        ``{"connections": n, "tunnels": n, "pool_idle": n}``."""

    def healthy(self) -> bool:
        """False once the proxy is stopping (health checks answer 503)."""


class SharedFlows(Protocol):
    """The flows of every node of a fleet (`eyewall.shared.flow_db.FlowDatabase`).
    Each method raises an Exception subclass when the database cannot answer."""

    async def records(self, since: float, host: str, limit: int) -> list[Record]:
        """Records (with ``node``) started at or after ``since``, oldest first."""

    async def find(self, flow_id: str) -> Record | None:
        """One record by id."""

    async def summaries(self, query: dict[str, str], limit: int) -> list[dict[str, Any]]:
        """API summaries (with ``node``) matching the API's filters, newest first."""


access_log = logging.getLogger("eyewall.admin")
STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "eyewall_admin"
ADMIN_IDLE = 30.0  # seconds an admin connection may wait for (or send) a request head or body
ADMIN_MAX_HEAD = 64 << 10  # bytes of an admin request head (localhost cookies of other tools)
ADMIN_MAX_BODY = 64 << 10  # bytes of an admin request body (a login form)


CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"


class Guarded:
    """What every admin handler shares: security headers, the Host check, the token."""

    admin: AdminServer
    request: Any

    def set_default_headers(self) -> None:
        """Security headers on every admin response: no Server, nosniff, no referrer, a strict
        CSP."""
        self.clear_header("Server")  # type: ignore[attr-defined]
        self.set_header("X-Content-Type-Options", "nosniff")  # type: ignore[attr-defined]
        self.set_header("Referrer-Policy", "no-referrer")  # type: ignore[attr-defined]
        self.set_header("Content-Security-Policy", CSP)  # type: ignore[attr-defined]
        self.set_header("Cache-Control", "no-cache")  # type: ignore[attr-defined]

    def check_access(self) -> None:
        """403 for an unexpected Host (DNS rebinding), 401 without the token when one
        is set."""
        if not self.admin.host_allowed(self.request.host):
            raise tornado.web.HTTPError(403, "unexpected Host (DNS rebinding guard)")
        if self.admin.token and not self.authorized():
            raise tornado.web.HTTPError(
                401,
                "admin token required: send 'Authorization: Bearer TOKEN', or open"
                " /login?token=TOKEN once in a browser",
            )

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        """Log a failed request with its method and path only: its query may hold the
        token (``/login?token=``), and Tornado's own line repeats the whole request,
        headers included (a Bearer token, the cookie)."""
        request = self.request
        where = f"{request.method} {request.path} ({request.remote_ip})"
        if isinstance(value, tornado.web.HTTPError):
            if value.log_message:
                message = value.log_message % value.args if value.args else value.log_message
                access_log.warning("%d %s: %s", value.status_code, where, message)
        else:
            access_log.error("uncaught exception in %s", where, exc_info=value)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """A short plain-text page on every admin route, the dashboard's included: the
        status, and the reason when it helps the user (never anything from the
        request)."""
        self.set_header("Content-Type", "text/plain; charset=utf-8")  # type: ignore[attr-defined]
        if status_code == 401:  # RFC 9110 §11.6.1: a 401 names its challenge
            self.set_header("WWW-Authenticate", 'Bearer realm="eyewall admin"')  # type: ignore[attr-defined]
        error = kwargs.get("exc_info", (None, None))[1]
        hint = error.log_message if isinstance(error, tornado.web.HTTPError) else None
        reason = self._reason  # type: ignore[attr-defined]
        self.finish(f"{status_code} {reason}\n" + (f"{hint}\n" if hint else ""))  # type: ignore[attr-defined]

    def authorized(self) -> bool:
        """The token as a Bearer header, or the cookie /login set (which holds a value
        derived from the token, never the token itself)."""
        token = self.admin.token
        scheme, _, credentials = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110 §11.1)
            return hmac.compare_digest(credentials.strip().encode(), token.encode())
        cookie = self.request.cookies.get(COOKIE)
        offered = cookie.value if cookie else ""
        return hmac.compare_digest(offered.encode(), cookie_value(token).encode())


def cookie_value(token: str) -> str:
    """What the admin cookie holds: an HMAC of a fixed label under the token (hex), so
    the cookie proves the token was shown without containing it."""
    return hmac.new(token.encode(), b"eyewall admin session", "sha256").hexdigest()


class Base(Guarded, tornado.web.RequestHandler):
    """A JSON/text admin endpoint: the guard runs before every method."""

    def initialize(self, admin: AdminServer) -> None:
        self.admin = admin

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        self.guard()
        self.admin.settle()  # flows that ended are counted and listed before any answer

    def guard(self) -> None:
        """Refuse the request (HTTPError) unless it may be answered: the Host check and
        the token, as `check_access`; endpoints that reveal no traffic check less."""
        self.check_access()

    def count_argument(self, name: str, default: int, most: int) -> int:
        """Query argument ``name`` as a whole number, at most ``most`` (larger values are
        clamped); 400 for anything but ASCII digits."""
        text = self.get_query_argument(name, None)
        if text is None:
            return default
        if not (text.isascii() and text.isdigit()):
            raise tornado.web.HTTPError(400, f"{name} must be a whole number")
        return min(most, int(text))

    async def head(self, *args: str) -> None:
        """As GET, without the body (RFC 9110 §9.3.2: the fields a GET would send, the
        Content-Length included; Tornado drops the body of a HEAD)."""
        answered = self.get(*args)
        if inspect.isawaitable(answered):
            await answered

    def write_json(self, value: Any) -> None:
        """Finish with ``value`` as an ``application/json`` body."""
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value))


class Login(Base):
    """``/login?token=``: trade the admin token for a session cookie."""

    def guard(self) -> None:
        """The Host check only: the token is what this endpoint checks."""
        if not self.admin.host_allowed(self.request.host):
            raise tornado.web.HTTPError(403, "unexpected Host (DNS rebinding guard)")

    def get(self) -> None:
        """Exchange ``?token=`` for a session cookie and go to the dashboard."""
        offered = self.get_query_argument("token", "")
        token = self.admin.token
        if not token or not hmac.compare_digest(offered.encode(), token.encode()):
            raise tornado.web.HTTPError(401, "wrong token")
        self.set_cookie(COOKIE, cookie_value(token), httponly=True, samesite="Strict")
        self.redirect("/")


class Health(Base):
    """Readiness for load balancers and probes: 200, or 503 once the proxy is stopping
    (from SIGTERM on: the drain grace).  It reveals no traffic, so it needs no token
    (the Host check still applies); a node of a fleet names itself (``node``)."""

    def guard(self) -> None:
        """The Host check only: readiness reveals no traffic."""
        if not self.admin.host_allowed(self.request.host):
            raise tornado.web.HTTPError(403, "unexpected Host (DNS rebinding guard)")

    def get(self) -> None:
        admin = self.admin
        proxy = admin.proxy
        healthy = proxy.healthy()
        if not healthy:
            self.set_status(503)
        gauges = proxy.gauges()
        answer: dict[str, Any] = {"status": "ok" if healthy else "draining"}
        if admin.node:
            answer["node"] = admin.node
        answer["uptime_s"] = round(time.monotonic() - admin.started, 3)
        answer["connections"] = int(gauges["connections"])  # summed over workers
        answer["tunnels"] = int(gauges["tunnels"])
        self.write_json(answer)


class MetricsPage(Base):
    """``/metrics``: the Prometheus text exposition (version 0.0.4); no token needed from
    this host (loopback), the token from anywhere else."""

    def guard(self) -> None:
        """Metrics reveal no traffic: a scraper on this host needs no token (the Host
        check still applies); from elsewhere the token is required as for the API."""
        if ipaddress.ip_address(self.request.remote_ip).is_loopback:
            if not self.admin.host_allowed(self.request.host):
                raise tornado.web.HTTPError(403, "unexpected Host (DNS rebinding guard)")
            return
        self.check_access()

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.admin.metrics.exposition())


# A Host field (RFC 9110 §7.2): a reg-name or an IPv4 literal, or an IP literal in
# brackets, and an optional port.
_HOST_FIELD = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]*)(?::[0-9]*)?")
_STATUS_FILTER = re.compile(r"[0-9]{3}|[1-5]xx")


def _status_matches(status: int, wanted: str) -> bool:
    wanted = wanted.strip().lower()
    if len(wanted) == 3 and wanted.endswith("xx"):
        return str(status).startswith(wanted[0])
    return str(status) == wanted


def matches(s: dict[str, Any], query: dict[str, str]) -> bool:
    """Whether a flow summary passes the API's filters."""
    if query.get("host") and query["host"].lower() not in (s["host"] or "").lower():
        return False
    if query.get("status") and not _status_matches(s["status"], query["status"]):
        return False
    if query.get("method") and (s["method"] or "").upper() != query["method"].upper():
        return False
    if query.get("user") and (s["user"] or "") != query["user"]:
        return False
    text = query.get("q", "").lower()
    return not text or any(
        text in (s[k] or "").lower() for k in ("id", "url", "host", "error", "error_detail")
    )


class FlowList(Base):
    """``/api/flows``: recent flow summaries, newest first, at most ``limit`` (0..5000,
    default 200); ``host``, ``status`` (a code or a class: 400 for anything else),
    ``method``, ``user`` and ``q`` filter.  In a
    fleet with a shared flow database: every node's flows, each with its ``node``."""

    async def get(self) -> None:
        limit = self.count_argument("limit", 200, 5000)
        names = ("host", "status", "method", "user", "q")
        query = {k: self.get_query_argument(k, "") for k in names}
        wanted = query["status"].strip().lower()
        if wanted and not _STATUS_FILTER.fullmatch(wanted):
            raise tornado.web.HTTPError(400, "status must be a code (404) or a class (5xx)")
        if not limit:
            self.write_json({"flows": []})
            return
        shared = self.admin.shared
        if shared is not None:
            self.write_json({"flows": await _shared(shared.summaries(query, limit))})
            return
        out = []
        for record in self.admin.store.recent_records():
            s = summary(record)
            if matches(s, query):
                out.append(s)
                if len(out) >= limit:
                    break
        self.write_json({"flows": out})


class FlowDetail(Base):
    """``/api/flows/ID``: one recorded flow, heads and captured bodies; 404 when unknown."""

    async def get(self, flow_id: str) -> None:
        store = self.admin.store
        record = store.find_recent(flow_id)
        shared = self.admin.shared
        if record is None and shared is not None:
            record = await _shared(shared.find(flow_id))
        elif record is None:
            loop = asyncio.get_running_loop()
            record = await loop.run_in_executor(None, store.find_stored, flow_id)
        if record is None:
            raise tornado.web.HTTPError(404, "no such flow")
        self.write_json(detail(record))


class Stats(Base):
    """``/api/stats``: counters and gauges as JSON, for the dashboard's header."""

    def get(self) -> None:
        admin = self.admin
        self.write_json(
            {
                **admin.gauges(),
                "uptime_s": round(time.monotonic() - admin.started, 3),
                "requests_total": sum(admin.metrics.requests.values()),
                "series": list(admin.live.series),
            }
        )


class HarDownload(Base):
    """``/api/har``: recorded flows as a HAR 1.2 download."""

    async def get(self) -> None:
        since = self.count_argument("since", 0, 2**40)  # a Unix time, seconds
        host = host_filter(self.get_query_argument("host", ""))
        limit = self.count_argument("limit", 10_000, 100_000)
        records = await self.admin.records(since, host, limit)
        self.set_header("Content-Type", "application/json")
        self.set_header("Content-Disposition", 'attachment; filename="eyewall.har"')
        self.finish(json.dumps(har(records)))


class CACertificate(Base):
    """``/api/ca.pem``: the interception CA's certificate (404 without interception)."""

    def get(self) -> None:
        pem = self.admin.ca_pem() if self.admin.ca_pem is not None else None
        if pem is None:
            raise tornado.web.HTTPError(404, "no interception CA (eyewall ca init)")
        self.set_header("Content-Type", "application/x-pem-file")
        self.set_header("Content-Disposition", 'attachment; filename="eyewall-ca.pem"')
        self.finish(pem)


class Live(Guarded, tornado.websocket.WebSocketHandler):
    """``/api/live``: the dashboard's WebSocket feed of flows and per-second stats."""

    def initialize(self, admin: AdminServer) -> None:
        self.admin = admin
        self.client: Client | None = None

    def prepare(self) -> None:
        self.check_access()

    def check_origin(self, origin: str) -> bool:
        """Only the dashboard's own origin (cross-site WebSocket hijacking guard)."""
        try:
            return bool(urlsplit(origin).netloc.lower() == self.request.host.lower())
        except ValueError:  # an Origin that is no URL ("http://[")
            return False

    def open(self, *args: Any, **kwargs: Any) -> None:
        self.admin.settle()
        self.client = self.admin.live.attach(self)
        self.pump = asyncio.ensure_future(self._pump(self.client))

    async def _pump(self, client: Client) -> None:
        try:
            await client.run()
        except tornado.websocket.WebSocketClosedError:
            pass
        finally:
            self.admin.live.detach(client)

    def on_message(self, message: str | bytes) -> None:
        pass  # the feed is one-way

    def on_close(self) -> None:
        if self.client is not None:
            self.admin.live.detach(self.client)


async def _shared(call: Awaitable[T]) -> T:
    """A read of the fleet's flow database; 503 when it cannot answer."""
    try:
        return await call
    except Exception as e:
        logging.getLogger("eyewall.flows").warning("reading the flow database failed: %s", e)
        raise tornado.web.HTTPError(503, "the flow database does not answer") from None


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Debug-level request log without query strings (they may carry the token)."""
    if access_log.isEnabledFor(logging.DEBUG):
        request = handler.request
        access_log.debug("%d %s %s", handler.get_status(), request.method, request.path)


class _AdminHTTPServer(HTTPServer):
    """Tornado's HTTP server, answering a TLS handshake at once (with an alert and a log
    line: the admin listener speaks plain HTTP) instead of holding it as a head that
    never ends."""

    sniffing: set[asyncio.Task[None]] = set()  # the tasks below, kept alive

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        """Look at the first bytes, then serve the connection as HTTP."""
        task = asyncio.ensure_future(self._sniff(stream, address))
        self.sniffing.add(task)
        task.add_done_callback(self.sniffing.discard)

    async def _sniff(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        try:
            first = await asyncio.wait_for(
                stream.read_bytes(5, partial=True), self.conn_params.header_timeout
            )
        except (TimeoutError, StreamClosedError):
            stream.close()
            return
        if starts_tls(first):
            access_log.warning(
                "%s spoke TLS to the admin listener: it speaks plain HTTP (http://...)",
                address[0],
            )
            try:
                await stream.write(alert(HANDSHAKE_FAILURE))
            except StreamClosedError:
                pass
            stream.close()
            return
        stream._read_buffer[0:0] = first  # back in front of the head, for the parser
        stream._read_buffer_size += len(first)
        super().handle_stream(stream, address)


class AdminServer:
    """The admin listener: routes, the Host guard and token, the live feed. Loopback by default;
    elsewhere only with a token (checked at start-up)."""

    def __init__(
        self,
        proxy: ProxyStats,
        metrics: Metrics,
        store: FlowStore,
        live: LiveFeed,
        endpoint: Endpoint,
        token: str,
        ca_pem: Any = None,
    ) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.store = store
        self.live = live
        self.endpoint = endpoint
        self.token = token
        self.ca_pem = ca_pem
        self.node = ""  # this node's name in a fleet (/healthz)
        # Delivers finished flows still waiting for their batch to the observers
        # (`eyewall.observe.events.EventBus.flush`); called before every answer.
        self.settle: Callable[[], None] = lambda: None
        self.shared: SharedFlows | None = None  # the fleet's flows, instead of this node's
        self.started = time.monotonic()
        self.idle = ADMIN_IDLE  # seconds for a request head or body (tests shorten it)
        args = {"admin": self}
        self.app = tornado.web.Application(
            [
                (r"/", IndexPage, {"path": str(STATIC), "default_filename": "index.html"}),
                (r"/static/(.*)", StaticFiles, {"path": str(STATIC)}),
                (r"/login", Login, args),
                (r"/healthz", Health, args),
                (r"/metrics", MetricsPage, args),
                (r"/api/flows", FlowList, args),
                (r"/api/flows/([A-Za-z0-9-]+)", FlowDetail, args),
                (r"/api/stats", Stats, args),
                (r"/api/har", HarDownload, args),
                (r"/api/ca.pem", CACertificate, args),
                (r"/api/live", Live, args),
            ],
            admin=self,
            log_function=_log_request,
            compress_response=True,
            websocket_max_message_size=1 << 16,
        )
        self.server: HTTPServer | None = None
        self.sockets: list[socket.socket] = []  # the listening sockets (a restart passes them on)
        self.address: tuple[str, int] | None = None
        self.addresses: list[tuple[str, int]] = []

    def start(self, bound: list[socket.socket] | None = None) -> list[tuple[str, int]]:
        """Listen (on ``bound``, sockets already bound for the endpoint, when given);
        returns every bound (host, port) (``localhost`` binds IPv4 and IPv6).  Raises
        OSError naming the address and the setting."""
        try:
            sockets = bound or bind_sockets(self.endpoint.port, self.endpoint.host)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot listen on {self.endpoint} (admin.listen): {e.strerror}"
            ) from None
        self.sockets = sockets
        self.server = _AdminHTTPServer(
            self.app,
            xheaders=False,
            idle_connection_timeout=self.idle,  # also bounds the wait for a head
            body_timeout=self.idle,
            max_header_size=ADMIN_MAX_HEAD,
            max_body_size=ADMIN_MAX_BODY,
        )
        self.server.add_sockets(sockets)
        self.addresses = [s.getsockname()[:2] for s in sockets]
        self.address = self.addresses[0]
        return self.addresses

    async def stop(self) -> None:
        """Stop listening, close live feeds and wait for them to end."""
        self.live.stop()
        if self.server is not None:
            self.server.stop()
            await self.server.close_all_connections()

    def url(self) -> str:
        """The base URL of the first bound address, e.g. ``http://127.0.0.1:8480``."""
        assert self.address is not None
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def host_allowed(self, host_header: str) -> bool:
        """Whether a request's Host header names this listener (an IP literal, ``localhost`` or
        a configured name): the DNS-rebinding guard."""
        match = _HOST_FIELD.fullmatch(host_header)
        if match is None:  # "[", "[::1", "a]", "[::1]x": no host at all
            return False
        host = match.group(1).strip("[]").lower()
        if host in ("localhost", self.endpoint.host):
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True

    def gauges(self) -> dict[str, float]:
        """Current gauges (connections, tunnels, pool sizes) from the proxy."""
        return self.proxy.gauges()

    async def records(self, since: float, host: str, limit: int) -> list[Record]:
        """Recorded HTTP exchanges for HAR, oldest first: the database, plus what is still in
        memory waiting to be written."""

        def wanted(r: Record) -> bool:
            return r["started"] >= since and (not host or r["host"] == host) and is_exchange(r)

        stored: list[Record] = []
        path = self.store.path
        if self.shared is not None:
            stored = await _shared(self.shared.records(since, host, limit))
        elif path is not None and path.exists():
            where, params = har_query(since, host)
            stored = await asyncio.get_running_loop().run_in_executor(
                None, read_records, path, where, params, limit
            )
        seen = {r["id"] for r in stored}
        pending = [r for r in self.store.recent_records() if r["id"] not in seen and wanted(r)]
        merged = sorted(stored + pending, key=lambda r: r["started"])
        return merged[-limit:] if limit else []


class IndexPage(Guarded, tornado.web.StaticFileHandler):
    """The dashboard page, behind the same guards as the API."""

    def prepare(self) -> None:
        self.admin = self.application.settings["admin"]
        self.check_access()

    async def get(self, path: str = "", include_body: bool = True) -> None:
        await super().get("index.html", include_body)


class StaticFiles(Guarded, tornado.web.StaticFileHandler):
    """``/static/``: the dashboard's own files, behind the same guard."""

    def prepare(self) -> None:
        self.admin = self.application.settings["admin"]
        self.check_access()
