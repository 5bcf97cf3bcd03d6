"""The composition root: configuration to a running proxy.

`load` turns the configuration file and flags into settings, a policy and the
interception CA, checking everything start-up would otherwise trip on (every problem
at once, each with its setting and line).  `Observers` wires the access log, flow
store, metrics, live feed and admin listener.  `serve` runs the proxy: listeners,
signals (SIGHUP reload, SIGUSR1 reopen logs, SIGTERM/SIGINT stop), watched files, the
pid file and readiness notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import resource
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eyewall import __version__
from eyewall.addons.hooks import Configure, Done, Running
from eyewall.addons.runner import Addons, unsafe_code
from eyewall.config import (
    ConfigError,
    Settings,
    annotate,
    in_file_order,
    load_settings,
    parse_endpoint,
    restart_settings,
)
from eyewall.fleet import FleetNode
from eyewall.fleet import problems as fleet_problems
from eyewall.observe.oplog import DroppingQueueHandler, setup_logging
from eyewall.policy.auth import HtpasswdError, Users
from eyewall.policy.engine import LimitParameters, Policy
from eyewall.policy.networks import parse_network
from eyewall.policy.rules import Action, Rule, RuleSet, compile_rule, parse_ports
from eyewall.tls.ca import CertificateAuthority, default_ca_dir

__all__ = ["Loaded", "Loader", "Observers", "build_policy", "preflight", "run", "serve"]

if TYPE_CHECKING:
    from eyewall.dashboard.app import AdminServer
    from eyewall.observe.metrics import Metrics
    from eyewall.workers.handover import Inherited

log = logging.getLogger("eyewall")


@dataclass(frozen=True)
class Loaded:
    """A configuration ready to run: settings, the policy built from them, and the
    interception CA (None when no rule intercepts)."""

    settings: Settings
    policy: Policy
    ca: CertificateAuthority | None


def build_policy(settings: Settings, read_text: Callable[[str], str] | None = None) -> Policy:
    """The policy for ``settings``.  Raises ConfigError listing every problem (rules,
    networks, ports, users and groups, including groups and users a rule names but
    nobody defines)."""
    read = read_text or (lambda p: Path(p).read_text())
    errors: list[str] = []
    auth = settings.auth
    text = None
    if auth.htpasswd:
        try:
            text = read(auth.htpasswd)
        except OSError as e:
            errors.append(f"auth.htpasswd: cannot read {auth.htpasswd}: {e.strerror or e}")
    users = Users()
    try:
        users = Users.from_entries(
            dict(auth.users), text, {g: list(m) for g, m in auth.groups}, "auth", auth.htpasswd
        )
    except HtpasswdError as e:
        errors.extend(e.errors)
    except ValueError as e:
        errors.append(str(e))
    groups = {g for g, _ in auth.groups}
    rules: list[Rule] = []
    ids: set[str] = set()  # of every rule, the ones with errors too
    for i, raw in enumerate(settings.rules):
        path = f"rules[{i}]"
        try:
            rule = compile_rule(raw, path)
        except ValueError as e:
            errors.append(str(e))
            given = raw.get("id") if isinstance(raw, Mapping) else None
            if isinstance(given, str):
                if given in ids:
                    errors.append(f"{path}.id: duplicate rule id {given!r}")
                ids.add(given)
            continue
        undefined = sorted(rule.groups - groups)
        if undefined:
            errors.append(f"{path}.groups: undefined group {undefined[0]!r} (auth.groups)")
        unknown = sorted(rule.users - set(users.hashes))
        if unknown and not users.enabled:
            errors.append(f"{path}.users: no users are configured (auth.htpasswd, auth.users)")
        elif unknown:
            # A warning: the file that revokes a user must apply, not be refused for it.
            users.absent.extend(f"{path}.users: no user {name!r}" for name in unknown)
        if rule.id in ids:
            errors.append(f"{path}.id: duplicate rule id {rule.id!r}")
        ids.add(rule.id)
        rules.append(rule)
    if not errors:
        for absent in users.absent:
            log.warning("%s in the user file (it matches nobody)", absent)
        if len(users.costs) > 1:
            log.warning(
                "the user file mixes bcrypt costs (%s): how long a login takes tells which"
                " user names exist; hash every password at one cost",
                ", ".join(map(str, sorted(users.costs))),
            )
    access = settings.access
    try:
        connect_ports = parse_ports(access.connect_ports, "access.connect_ports")
    except ValueError as e:
        errors.append(str(e))
        connect_ports = ((443, 443),)
    clients = []
    for i, network in enumerate(access.allow_clients):
        try:
            clients.append(parse_network(network))
        except ValueError as e:
            errors.append(f"access.allow_clients[{i}]: {e}")
    if errors:
        raise ConfigError(errors)
    r = settings.rate_limits
    limits = LimitParameters(
        r.client_rps,
        r.client_burst,
        r.user_rps,
        r.user_burst,
        r.client_connections,
        r.client_tunnels,
        r.user_tunnels,
    )
    ruleset = RuleSet(tuple(rules), Action(access.default), connect_ports, access.allow_private)
    return Policy(ruleset, tuple(clients), users, limits, auth.cache_ttl)


def _writable_dir(directory: Path) -> str | None:
    if directory.exists() and not directory.is_dir():
        return f"{directory} is not a directory"
    if not directory.is_dir():
        return f"directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable by this user"
    return None


def _writable_file(path: str) -> str | None:
    p = Path(path)
    if p.exists():
        return None if os.access(p, os.W_OK) else f"{p} is not writable by this user"
    return _writable_dir(p.parent)


def preflight(settings: Settings) -> list[str]:
    """What start-up would trip on, as ``setting: problem`` lines: missing or
    unwritable directories and files, unsafe addon files, unreadable certificates."""
    problems = []
    if settings.access_log not in ("-", "off"):
        problem = _writable_file(settings.access_log)
        if problem:
            problems.append(f"access_log: {problem}")
    if settings.pid_file:
        problem = _writable_file(settings.pid_file)
        if problem:
            problems.append(f"pid_file: {problem}")
    if settings.flows.enabled and settings.flows.path:
        problem = _writable_file(settings.flows.path)
        if problem:
            problems.append(f"flows.path: {problem}")
    for key, files in (("addons", settings.addons), ("policy_addons", settings.policy_addons)):
        for i, path in enumerate(files):
            problem = unsafe_code(path)
            if problem:
                problems.append(f"{key}[{i}]: {problem}")
    tls = settings.tls
    unreadable = False
    for key in ("certificate", "key", "upstream_ca_bundle"):
        path = getattr(tls, key)
        if path and not os.access(path, os.R_OK):
            why = "no such file" if not os.path.exists(path) else "permission denied"
            problems.append(f"tls.{key}: cannot read {path} ({why})")
            unreadable = True
    if not unreadable:
        problems.extend(_tls_problems(tls.certificate, tls.key, tls.upstream_ca_bundle))
    for key, secret in (("auth.htpasswd", settings.auth.htpasswd), ("tls.key", tls.key)):
        try:
            mode = os.stat(secret).st_mode if secret else 0
        except OSError:
            continue  # reported where it is read
        if mode & 0o004:
            # A warning, not an error: the proxy works, but every local account can
            # copy the hashes (or the key) for offline guessing.
            log.warning(
                "%s: %s is readable by every local user (mode %04o); chmod o-r it",
                key,
                secret,
                mode & 0o7777,
            )
    return problems


def _tls_problems(certificate: str, key: str, bundle: str) -> list[str]:
    """What loading the HTTPS listeners' certificate and key, and the origins' CA
    bundle, would refuse: each as ``setting: problem`` (files that can be read)."""
    problems = []
    if certificate and key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl.create_default_context(cafile=certificate)  # a PEM certificate, at least
        except (ssl.SSLError, OSError):
            problems.append(f"tls.certificate: {certificate} holds no PEM certificate")
        else:
            asked: list[bool] = []

            def passphrase() -> bytes:  # never a prompt on the terminal
                asked.append(True)
                return b""

            try:
                context.load_cert_chain(certificate, key, password=passphrase)
            except (ssl.SSLError, OSError) as e:
                if asked:
                    problems.append(
                        f"tls.key: {key} is encrypted: give the key without its pass phrase"
                        f" (openssl pkey -in {key} -out plain.key), readable only by the proxy"
                    )
                elif isinstance(e, ssl.SSLError) and e.reason == "KEY_VALUES_MISMATCH":
                    problems.append(
                        f"tls.key: {key} is not the private key of tls.certificate {certificate}"
                    )
                elif isinstance(e, ssl.SSLError):
                    problems.append(f"tls.key: {key} holds no PEM private key")
                else:
                    problems.append(f"tls.key: {key}: {e.strerror or e}")
    if bundle:
        try:
            ssl.create_default_context(cafile=bundle)
        except ssl.SSLError:
            problems.append(f"tls.upstream_ca_bundle: {bundle} holds no PEM certificate")
        except OSError as e:
            problems.append(f"tls.upstream_ca_bundle: {bundle}: {e.strerror or e}")
    return problems


def addon_problems(settings: Settings) -> list[str]:
    """What loading the addon files would refuse — a file that fails to run, a misspelt
    hook (`Addons.check`: each file's top level runs, no hook is called) — for the files
    `preflight` finds safe to run."""
    problems: list[str] = []
    for key, files in (("addons", settings.addons), ("policy_addons", settings.policy_addons)):
        for i, path in enumerate(files):
            if unsafe_code(path) is None:
                found = Addons([path], hook_timeout=settings.timeouts.addon_hook).check()
                problems.extend(f"{key}[{i}]: {problem}" for problem in found)
    return problems


def load_ca(settings: Settings, policy: Policy) -> CertificateAuthority | None:
    """The interception CA when a rule intercepts.  Raises ConfigError."""
    if not any(rule.action is Action.INTERCEPT for rule in policy.rules.rules):
        return None
    directory = Path(settings.tls.ca_dir) if settings.tls.ca_dir else default_ca_dir()
    try:
        return CertificateAuthority.load(directory)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tls.ca_dir: {e}") from None


class Loader:
    """Loads the configuration from ``config`` (a file, or None) and the flags'
    ``overrides``, at start and again on every reload."""

    def __init__(
        self,
        config: str | None,
        overrides: dict[str, Any],
        check_paths: bool = True,
        run_addons: bool = False,
    ) -> None:
        self.config = config
        self.overrides = overrides
        self.check_paths = check_paths  # False: skip the checks of this machine's paths
        # check-config: run each addon file's top level and check its classes (start-up
        # loads them once, later, and reports the same problems then)
        self.run_addons = run_addons and check_paths

    def load(self) -> Loaded:
        """Raises ConfigError listing every problem, each with its setting (as the flag
        when it came from one) and its file and line."""
        errors: list[str] = []
        try:
            settings = load_settings(self.config, self.overrides)
        except ConfigError as e:
            if e.settings is None:
                raise
            # report what the rest of the file has wrong too, in one list
            more = annotate(self._more_problems(e.settings), self.config, self.overrides)
            raise ConfigError(in_file_order(e.errors + more)) from None
        policy = None
        ca = None
        try:
            policy = build_policy(settings)
        except ConfigError as e:
            errors.extend(e.errors)
        if policy is not None and self.check_paths:
            try:
                ca = load_ca(settings, policy)
            except ConfigError as e:
                errors.extend(e.errors)
        if self.check_paths:
            errors.extend(preflight(settings))
        if self.run_addons:
            errors.extend(addon_problems(settings))
        errors.extend(fleet_problems(settings))
        if errors:
            raise ConfigError(annotate(errors, self.config, self.overrides))
        assert policy is not None
        return Loaded(settings, policy, ca)

    def _more_problems(self, settings: Settings) -> list[str]:
        """The rules' and paths' problems of ``settings`` read from an invalid file, as
        far as they can be checked."""
        problems: list[str] = []
        try:
            build_policy(settings)
        except ConfigError as e:
            problems.extend(e.errors)
        except Exception:  # a value the schema already reported
            pass
        if self.check_paths:
            try:
                problems.extend(preflight(settings))
            except Exception:  # as above
                pass
        if self.run_addons:
            try:
                problems.extend(addon_problems(settings))
            except Exception:  # as above
                pass
        return problems

    def watched_files(self, settings: Settings) -> list[str]:
        """Files whose change triggers a reload: the user file (always: `auth.htpasswd`
        says it is re-read when it changes), and the config file with ``watch_config``
        (otherwise only SIGHUP reloads it, so an edit is applied when the operator says,
        after ``check-config``)."""
        config = self.config if settings.watch_config else None
        return [f for f in (config, settings.auth.htpasswd) if f]


def announce_https(bound: Mapping[tuple[str, str], list[socket.socket]]) -> None:
    """Say which of the listening addresses are HTTPS proxy listeners (``tls.listen``),
    on stderr after the "listening on" line (that line lists every listener)."""
    https = [
        sock.getsockname()[:2]
        for (setting, _), sockets in bound.items()
        if setting == "tls.listen"
        for sock in sockets
    ]
    if https:
        shown = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in https)
        print(f"eyewall HTTPS proxy listener (https:// proxy URLs) on {shown}", file=sys.stderr)


def _mtimes(paths: list[str]) -> list[float]:
    out = []
    for p in paths:
        try:
            out.append(os.stat(p).st_mtime)
        except OSError:
            out.append(-1.0)
    return out


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class Observers:
    """Everything that watches the traffic: access log, flow store, metrics, live feed,
    and the admin listener that shows them (metrics and the live feed only exist when
    the admin listener does)."""

    def __init__(self, settings: Settings, stats: Any, ca_pem: Callable[[], bytes | None]) -> None:
        from eyewall.observe.accesslog import AccessLog
        from eyewall.observe.events import EventBus
        from eyewall.observe.store import FlowStore, default_path
        from eyewall.observe.writer import BatchWriter

        self.bus = EventBus()
        self.writer = BatchWriter()
        self.access: AccessLog | None = None
        if settings.access_log != "off":
            self.access = AccessLog(settings.access_log, settings.log_format, self.writer)
            self.bus.subscribe(self.access)
        f = settings.flows
        path = (Path(f.path) if f.path else default_path()) if f.enabled else None
        if settings.shared_flows.postgresql:
            path = None  # recorded to PostgreSQL instead (eyewall.fleet)
        self.store = FlowStore(
            path,
            f.max_count,
            f.max_age,
            f.memory,
            f.memory_bytes,
            self.writer,
            f.max_bytes,
            f.credentials,
        )
        if path is not None or settings.admin.listen != "off":  # else nobody reads it
            self.bus.subscribe(self.store)
        self.metrics: Metrics | None = None
        self.admin: AdminServer | None = None
        if settings.admin.listen != "off":
            self._admin(settings, stats, ca_pem)

    def _admin(self, settings: Settings, stats: Any, ca_pem: Callable[[], bytes | None]) -> None:
        from eyewall.dashboard.app import AdminServer
        from eyewall.observe.live import LiveFeed
        from eyewall.observe.metrics import Metrics
        from eyewall.observe.records import summary

        def prometheus_gauges() -> dict[str, float]:
            g = stats.gauges()
            return {
                "client_connections": g["connections"],
                "tunnels": g["tunnels"],
                "upstream_idle_connections": g["pool_idle"],
            }

        metrics = self.metrics = Metrics(prometheus_gauges)
        self.bus.subscribe(metrics)
        access, store = self.access, self.store
        if access is not None:
            metrics.track_drops("access_log", lambda: access.dropped)
        metrics.track_drops("flows", lambda: store.dropped)

        def recent() -> list[dict[str, Any]]:
            return [summary(r) for r in itertools.islice(store.recent_records(), 200)]

        self.live = LiveFeed(stats.gauges, recent)
        self.bus.subscribe(self.live)
        self.admin = AdminServer(
            stats,
            metrics,
            self.store,
            self.live,
            parse_endpoint(settings.admin.listen),
            settings.admin.token,
            ca_pem=ca_pem,
        )
        self.admin.settle = self.bus.flush

    def reconfigure(self, old: Settings, new: Settings) -> None:
        """Apply what a reload may change: the access log's path and format, the flow
        store's retention, window and redaction, the admin token.  Raises OSError when
        the new access log cannot be opened."""
        self.bus.flush()  # flows that ended before the reload, under the old settings
        if (new.access_log, new.log_format) != (old.access_log, old.log_format):
            from eyewall.observe.accesslog import AccessLog

            if new.access_log == "off" and self.access is not None:
                self.access.close()
                self.bus.subscribers.remove(self.access)
                self.access = None
            elif self.access is not None:
                self.access.configure(new.access_log, new.log_format)
            elif new.access_log != "off":
                self.access = AccessLog(new.access_log, new.log_format, self.writer)
                # first, as at start-up: the flow store caps a refused flow's request
                # line in place, and the access line records it whole
                self.bus.subscribers.insert(0, self.access)
        f = new.flows
        self.store.configure(
            f.max_count, f.max_age, f.max_bytes, f.memory, f.memory_bytes, f.credentials
        )
        if self.admin is not None:
            self.admin.token = new.admin.token

    async def stop(self) -> None:
        """Stop the admin listener, then deliver the flows waiting for their batch, flush
        and close the flow store, access log and writer thread, in that order."""
        if self.admin is not None:
            await self.admin.stop()
        self.bus.flush()
        self.store.close()
        if self.access is not None:
            self.access.close()
        self.writer.close()


class _Stats:
    """The admin listener's view of the proxy (`eyewall.dashboard.app.ProxyStats`)."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    def gauges(self) -> dict[str, float]:
        proxy = self.proxy
        return {
            "connections": len(proxy.connections),
            "tunnels": len(proxy.tunnels),
            "pool_idle": proxy.pool.idle_count(),
        }

    def healthy(self) -> bool:
        return not self.proxy.stopping


def _write_pid_file(path: str) -> None:
    """Write this process's pid to ``path`` whole at once (a new file renamed over the
    old: a reader never sees it empty or half written).  Raises OSError."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    except PermissionError:  # a file the user may write, in a directory they may not
        temporary = ""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        if temporary:
            os.replace(temporary, path)
    except OSError:
        if temporary:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise


def _restart_failed(settings: Settings) -> None:
    """A restart's new generation did not start: the pid file, still naming this
    process, is written again, which ends ``eyewall restart``'s wait at once."""
    if settings.pid_file:
        try:
            _write_pid_file(settings.pid_file)
        except OSError as e:
            log.error("pid_file %s: %s", settings.pid_file, e.strerror)


async def serve(
    loader: Loader,
    loaded: Loaded,
    log_handler: DroppingQueueHandler,
    inherited: Inherited | None = None,
) -> None:
    """Run the proxy until SIGTERM/SIGINT, then drain and stop; on SIGUSR2, start a new
    generation on the same sockets and drain once it serves (``inherited``: what this
    process took over from the generation before; `eyewall.workers.handover`)."""
    from tornado.ioloop import PeriodicCallback

    from eyewall.policy.state import AdmissionState
    from eyewall.proxy.server import Proxy
    from eyewall.sdnotify import notify, reloading
    from eyewall.workers.handover import Restart, listener_keys, owns_pid_file

    settings = loaded.settings
    _raise_fd_limit()
    addons = Addons(settings.addons, settings.policy_addons, settings.timeouts.addon_hook)
    try:
        addons.load_all()
    except ValueError as e:  # a configuration error: exit 2, not retried by systemd
        print(f"eyewall: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    addons.lifecycle(Configure(settings))
    fleet = FleetNode(settings)
    state = fleet.limits_store(AdmissionState())
    proxy: Proxy

    def ca_pem() -> bytes | None:
        ca = proxy.interception.ca
        if ca is not None:
            return ca.pem()
        configured = proxy.settings.tls.ca_dir
        try:
            return CertificateAuthority.load(
                Path(configured) if configured else default_ca_dir()
            ).pem()
        except (OSError, ValueError):
            return None

    stats = _Stats(None)
    try:
        observers = Observers(settings, stats, ca_pem)
    except OSError as e:
        raise SystemExit(f"eyewall: {e}") from None
    proxy = Proxy(
        settings,
        loaded.policy,
        state=state,
        addons=addons,
        ca=loaded.ca,
        publish=observers.bus.publish,
    )
    stats.proxy = proxy
    fleet.attach(observers, proxy)
    metrics = observers.metrics
    if metrics is not None:
        metrics.track_drops("log", lambda: log_handler.dropped)
        metrics.login_checks = lambda: proxy.verifier.checks
        metrics.addon_failures = lambda: addons.failures
    taken = inherited.take(listener_keys(settings)) if inherited else {}
    try:
        addresses = proxy.start_listening(taken)
        if observers.admin is not None:
            admin_addresses = observers.admin.start(
                taken.get(("admin.listen", settings.admin.listen))
            )
            proxy.protect(admin_addresses)
    except OSError as e:
        raise SystemExit(f"eyewall: {e.strerror or e}") from None
    if observers.admin is not None:
        print(f"eyewall admin on {observers.admin.url()}", file=sys.stderr, flush=True)
    addons.lifecycle(Running())
    addon_watch = PeriodicCallback(lambda: addons.reload_changed(proxy.settings), 1000)
    if addons.files:
        addon_watch.start()
    shown = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)

    def reload() -> None:
        notify(reloading())
        ok = False
        try:
            ok = _reload()
        finally:
            if metrics is not None:
                metrics.reloaded(ok)
            notify(
                f"STATUS=listening on {shown}"
                if ok
                else "STATUS=reload refused (see the log); the previous configuration runs"
            )
            notify("READY=1")

    def _reload() -> bool:
        try:
            new = loader.load()
        except ConfigError as e:
            log.error("reload refused, keeping the current configuration: %s", e)
            return False
        old = proxy.settings
        # Against what this process started with, not the last reload: a setting put
        # back to its running value needs no restart.
        for name in restart_settings(settings, new.settings):
            log.warning("%s changed: it applies after a restart", name)
        try:
            observers.reconfigure(old, new.settings)
        except OSError as e:
            log.error("reload refused, keeping the current configuration: %s", e)
            return False
        proxy.reload(new.settings, new.policy, new.ca)
        fleet.reconfigure(new.settings)
        addons.hook_timeout = new.settings.timeouts.addon_hook
        addons.lifecycle(Configure(new.settings))
        log.info("configuration reloaded")
        return True

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_signal: list[int] = []

    def on_stop(sig: int) -> None:
        stop_signal.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, reload)

    def reopen() -> None:
        if observers.access is not None:
            observers.access.reopen()

    loop.add_signal_handler(signal.SIGUSR1, reopen)
    files = loader.watched_files(settings)
    seen = _mtimes(files)

    def poll() -> None:
        nonlocal seen, files
        now = _mtimes(files)
        if now != seen:
            reload()
            files = loader.watched_files(proxy.settings)
            seen = _mtimes(files)

    watcher = PeriodicCallback(poll, 2000)  # a stat of two files at most: always on, so
    watcher.start()  # a reload that turns watch_config or auth.htpasswd on takes effect

    def listeners() -> dict[tuple[str, str], list[socket.socket]]:
        bound = dict(proxy.bound)
        if observers.admin is not None:
            bound["admin.listen", proxy.settings.admin.listen] = observers.admin.sockets
        return bound

    restart = Restart(
        listeners, lambda: on_stop(signal.SIGUSR2), failed=lambda: _restart_failed(proxy.settings)
    )
    loop.add_signal_handler(signal.SIGUSR2, restart.request)
    # The pid file, and readiness, only now that every signal finds its handler: a
    # SIGTERM, SIGHUP or SIGUSR2 sent as soon as either appears is acted on, not fatal.
    if settings.pid_file:
        _write_pid_file(settings.pid_file)
    print(f"eyewall {__version__} listening on {shown}", file=sys.stderr, flush=True)
    announce_https(proxy.bound)
    if inherited is not None:  # the generation before drains once told
        notify(f"MAINPID={os.getpid()}\nREADY=1\nSTATUS=listening on {shown}")
        inherited.announce_ready()
    else:
        notify(f"READY=1\nSTATUS=listening on {shown}")
    await fleet.start()  # after the ready lines: it may log (whether Redis answers)
    await stop.wait()
    restart.refused = True
    watcher.stop()
    if stop_signal[0] != signal.SIGUSR2:  # else the successor is the service now
        notify("STOPPING=1")
    grace = proxy.settings.timeouts.drain_grace if stop_signal[0] == signal.SIGTERM else 0.0
    log.info(
        "shutting down; in-flight work has %.0f s to finish%s",
        proxy.settings.timeouts.drain,
        f" after {grace:g} s of grace" if grace else "",
    )
    shutdown = asyncio.ensure_future(proxy.shutdown(grace))

    def again() -> None:
        if proxy.hurry():  # a second signal: cut what is in flight now, and record it
            log.warning("second signal: cutting what is in flight now (a third stops at once)")
        else:
            shutdown.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, again)
    try:
        await shutdown
    except asyncio.CancelledError:
        log.warning("third signal: closing everything now")
    addon_watch.stop()
    addons.lifecycle(Done())
    observers.bus.flush()  # the last flows, to every observer, the fleet's flow writer too
    await fleet.stop()
    await observers.stop()
    if settings.pid_file and owns_pid_file(settings.pid_file):
        Path(settings.pid_file).unlink(missing_ok=True)
    log.info("stopped")


def run(loader: Loader, loaded: Loaded | None = None, inherited: Inherited | None = None) -> int:
    """Load the configuration (unless ``loaded``) and run the proxy until it is
    stopped; the exit code.  ``workers`` above 1 is `eyewall.workers.launch`'s."""
    if loaded is None:
        try:
            loaded = loader.load()
        except ConfigError as e:
            print("eyewall: invalid configuration:", file=sys.stderr)
            for error in e.errors:
                print(f"  {error}", file=sys.stderr)
            return 2
    handler, listener = setup_logging(loaded.settings.log_level)
    # Every request allocates a few hundred objects and leaves a few reference cycles:
    # collecting the young generation every 700 allocations cost ~10% at 100 clients.
    # Start-up objects are frozen out of collection altogether.
    gc.set_threshold(50_000, 50, 100)
    gc.freeze()
    # The observers' writer thread holds the GIL while it builds rows; the event loop,
    # wanting it back, waits up to the switch interval (5 ms by default): a visible
    # share of the tail latency (bench/results/2026-11-30-loop-stalls.md).
    sys.setswitchinterval(0.001)
    try:
        run_loop(serve(loader, loaded, handler, inherited), loaded.settings.event_loop)
    except KeyboardInterrupt:
        return 130
    finally:
        listener.stop()
    return 0


def run_loop(main: Coroutine[Any, Any, None], choice: str) -> None:
    """Run ``main`` on uvloop when chosen (or, for "auto", when installed)."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("eyewall: event_loop = uvloop, but it is not installed") from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)
