"""Command line.

eyewall [options]                 run the proxy (every setting has a flag; flags
                                  override the --config file)
eyewall check-config FILE         validate a configuration file
eyewall reload [--pid-file F | --config F]   ask a running proxy to reload
eyewall explain [options] URL|HOST:PORT      show what the policy decides, and why
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eyewall import __version__, sdnotify
from eyewall.config import ConfigError, Settings, iter_settings, load_settings
from eyewall.observe.accesslog import AccessLog
from eyewall.observe.events import EventBus
from eyewall.observe.oplog import DroppingQueueHandler, setup_logging
from eyewall.policy.engine import Policy, PolicyError

if TYPE_CHECKING:
    from eyewall.proxy.server import Proxy

__all__ = ["main"]

log = logging.getLogger("eyewall")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    for s in iter_settings():
        if s.flag is None:
            continue
        unit = f" [{s.unit}]" if s.unit else ""
        kwargs: dict[str, Any] = {"dest": s.path, "help": s.help + unit, "default": None}
        if s.type == "bool" and s.flag.startswith("--no-"):
            kwargs.update(action="store_const", const=False)
        elif s.type == "bool":
            kwargs["action"] = "store_true"
        elif s.type.startswith("tuple["):
            kwargs.update(action="append", metavar="VALUE")
        else:
            kwargs["metavar"] = (s.unit or s.type).upper()
        parser.add_argument(s.flag, **kwargs)


def _overrides(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in iter_settings():
        value = getattr(args, s.path, None) if s.flag else None
        if value is None:
            continue
        if s.type in ("float", "int"):
            try:
                value = float(value) if s.type == "float" else int(value)
            except ValueError:
                parser.error(f"{s.flag}: expected a number, got {value!r}")
        out[s.path] = value
    return out


class Loader:
    """Builds settings and policy from the config file plus flags, again on reload."""

    def __init__(self, config: str | None, overrides: dict[str, Any]) -> None:
        self.config = config
        self.overrides = overrides

    def load(self) -> tuple[Settings, Policy]:
        """Raises ConfigError naming the setting (as a flag when it came from one)."""
        try:
            settings = load_settings(self.config, self.overrides)
            return settings, Policy.from_settings(settings)
        except (ConfigError, PolicyError) as e:
            message = str(e)
            path = message.partition(":")[0]
            flags = {s.path: s.flag for s in iter_settings()}
            if path in self.overrides and flags.get(path):
                message = f"{flags[path]}{message[len(path) :]}"
            raise ConfigError(message) from None

    def watched_files(self, settings: Settings) -> list[str]:
        return [f for f in (self.config, settings.auth.htpasswd) if f]


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _mtimes(paths: list[str]) -> list[float]:
    out = []
    for p in paths:
        try:
            out.append(os.stat(p).st_mtime)
        except OSError:
            out.append(-1.0)
    return out


def _ca_pem(proxy: Proxy) -> bytes | None:
    """The interception CA certificate, if there is one, for the dashboard to offer."""
    from eyewall.tls.ca import CertificateAuthority, default_ca_dir

    if proxy.policy.ca is not None:
        return proxy.policy.ca.pem()
    configured = proxy.settings.tls.ca_dir
    try:
        return CertificateAuthority.load(Path(configured) if configured else default_ca_dir()).pem()
    except (OSError, ValueError):
        return None


class Observers:
    """Everything that watches the traffic: access log, metrics, flow store, live feed,
    and the admin listener that shows them."""

    def __init__(self, settings: Settings, proxy: Proxy) -> None:
        from eyewall.observe.live import LiveFeed
        from eyewall.observe.metrics import Metrics
        from eyewall.observe.records import record_of, summary
        from eyewall.observe.store import FlowStore, default_path

        bus = proxy.bus
        self.access = None
        if settings.access_log != "off":
            self.access = AccessLog(settings.access_log, settings.log_format)
            bus.subscribe(self.access)
        f = settings.flows
        path = (Path(f.path) if f.path else default_path()) if f.enabled else None
        self.store = FlowStore(path, f.max_count, f.max_age, f.memory)
        bus.subscribe(self.store)

        def gauges() -> dict[str, float]:
            return {
                "connections": len(proxy.connections),
                "tunnels": len(proxy.tunnels),
                "pool_idle": proxy.pool.idle_count(),
            }

        def prometheus_gauges() -> dict[str, float]:
            g = gauges()
            return {
                "client_connections": g["connections"],
                "tunnels": g["tunnels"],
                "upstream_idle_connections": g["pool_idle"],
            }

        self.metrics = Metrics(prometheus_gauges)
        bus.subscribe(self.metrics)
        access = self.access
        if access is not None:
            self.metrics.track_drops("access_log", lambda: access.dropped)
        self.metrics.track_drops("flows", lambda: self.store.dropped)

        def recent() -> list[dict[str, Any]]:
            return [summary(record_of(f)) for f in list(self.store.recent)[-200:][::-1]]

        self.live = LiveFeed(gauges, recent)
        bus.subscribe(self.live)
        self.admin = None
        if settings.admin.listen != "off":
            from eyewall.config import parse_endpoint
            from eyewall.observe.admin import AdminServer

            self.admin = AdminServer(
                proxy, self.metrics, self.store, self.live,
                parse_endpoint(settings.admin.listen), settings.admin.token,
                ca_pem=lambda: _ca_pem(proxy),
            )  # fmt: skip

    def start(self, proxy: Proxy) -> None:
        if self.admin is not None:
            try:
                address = self.admin.start()
            except OSError as e:
                raise SystemExit(f"eyewall: cannot listen for admin: {e.strerror or e}") from None
            proxy.protect(address)
            print(f"eyewall admin on {self.admin.url()}", file=sys.stderr, flush=True)

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        else:
            self.live.stop()
        self.store.close()
        if self.access is not None:
            self.access.close()


async def serve(
    loader: Loader, settings: Settings, policy: Policy, log_handler: DroppingQueueHandler
) -> None:
    from tornado.ioloop import PeriodicCallback

    from eyewall.addons.runner import Addons
    from eyewall.proxy.server import Proxy

    _raise_fd_limit()
    addons = Addons(settings.addons, settings.policy_addons)
    try:
        addons.load_all()
    except ValueError as e:
        raise SystemExit(f"eyewall: {e}") from None
    addons.lifecycle("configure", settings)
    proxy = Proxy(settings, policy, EventBus(), addons)
    observers = Observers(settings, proxy)
    observers.metrics.track_drops("log", lambda: log_handler.dropped)
    try:
        addresses = proxy.start_listening()
    except OSError as e:
        raise SystemExit(f"eyewall: cannot listen: {e.strerror or e}") from None
    observers.start(proxy)
    addons.lifecycle("running")
    addon_watch = PeriodicCallback(lambda: addons.reload_changed(proxy.settings), 1000)
    if addons.files:
        addon_watch.start()
    access = observers.access
    if settings.pid_file:
        Path(settings.pid_file).write_text(f"{os.getpid()}\n")
    shown = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)
    print(f"eyewall {__version__} listening on {shown}", file=sys.stderr, flush=True)

    def reload() -> None:
        sdnotify.notify(sdnotify.reloading())
        try:
            apply_reload()
        finally:
            sdnotify.notify("READY=1")

    def apply_reload() -> None:
        try:
            new_settings, new_policy = loader.load()
        except ConfigError as e:
            log.error("reload refused, keeping the current configuration: %s", e)
            sdnotify.notify("STATUS=reload refused (see the log); the previous configuration runs")
            return
        old = proxy.settings
        if (new_settings.admin.listen, new_settings.flows) != (old.admin.listen, old.flows):
            log.warning("admin listener and flow recording settings apply after a restart")
        if observers.admin is not None:
            observers.admin.token = new_settings.admin.token
        proxy.reload(new_settings, new_policy)
        addons.lifecycle("configure", new_settings)
        log.info("configuration reloaded")
        sdnotify.notify(f"STATUS=listening on {shown}")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if access is not None:
        loop.add_signal_handler(signal.SIGUSR1, access.reopen)
    watcher = None
    if settings.watch_config and loader.config:
        files = loader.watched_files(settings)
        seen = _mtimes(files)

        def poll() -> None:
            nonlocal seen
            now = _mtimes(files)
            if now != seen:
                seen = now
                reload()

        watcher = PeriodicCallback(poll, 2000)
        watcher.start()
    # Ready once the listeners accept and the signal handlers are in place (a stop sent
    # right after READY=1 must drain, not kill).
    sdnotify.notify(f"READY=1\nSTATUS=listening on {shown}")
    await stop.wait()
    sdnotify.notify("STOPPING=1")
    if watcher is not None:
        watcher.stop()
    log.info("shutting down; in-flight work has %.0f s to finish", proxy.settings.timeouts.drain)
    shutdown = asyncio.ensure_future(proxy.shutdown())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.cancel)  # a second signal: stop now
    try:
        await shutdown
    except asyncio.CancelledError:
        log.warning("second signal: closing everything now")
    addon_watch.stop()
    addons.lifecycle("done")
    await observers.stop()
    if settings.pid_file:
        Path(settings.pid_file).unlink(missing_ok=True)
    log.info("stopped")


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="eyewall",
        description="An asynchronous HTTP/HTTPS forward proxy.",
        epilog="Other commands: eyewall check-config FILE | eyewall reload | eyewall explain",
    )
    parser.add_argument("--version", action="version", version=f"eyewall {__version__}")
    add_setting_flags(parser)
    args = parser.parse_args(argv)
    loader = Loader(args.config, _overrides(args, parser))
    try:
        settings, policy = loader.load()
    except ConfigError as e:
        parser.exit(2, f"eyewall: invalid setting: {e}\n")
    handler, listener = setup_logging(settings.log_level)
    # Every request allocates a few hundred objects and leaves a few reference cycles:
    # collecting the young generation every 700 allocations cost ~10% at 100 clients.
    # Start-up objects are frozen out of collection altogether.
    gc.set_threshold(50_000, 50, 100)
    gc.freeze()
    try:
        run_loop(serve(loader, settings, policy, handler), settings.event_loop)
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


def check_config(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: eyewall check-config FILE", file=sys.stderr)
        return 2
    try:
        Loader(argv[0], {}).load()
    except ConfigError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    print(f"{argv[0]}: ok")
    return 0


def reload_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="eyewall reload", description="Ask a running proxy to reload its configuration."
    )
    parser.add_argument("--pid-file", help="the running proxy's pid file")
    parser.add_argument("--config", help="read pid_file from this configuration")
    args = parser.parse_args(argv)
    pid_file = args.pid_file
    if pid_file is None and args.config:
        try:
            pid_file = load_settings(args.config).pid_file
        except ConfigError as e:
            parser.exit(2, f"eyewall reload: {e}\n")
    if not pid_file:
        parser.exit(2, "eyewall reload: give --pid-file, or --config with pid_file set\n")
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        parser.exit(1, f"eyewall reload: {pid_file}: {e}\n")
    print(f"sent SIGHUP to {pid}")
    return 0


def har_command(argv: Sequence[str]) -> int:
    import json

    from eyewall.observe.har import har
    from eyewall.observe.store import default_path, read_records

    parser = argparse.ArgumentParser(
        prog="eyewall har export", description="Write recorded flows as HAR 1.2 to stdout."
    )
    parser.add_argument("action", choices=["export"])
    parser.add_argument("--flows", help="the flows database (default: the user data dir)")
    parser.add_argument("--config", help="read flows.path from this configuration")
    parser.add_argument(
        "--since", type=float, default=0.0, help="epoch seconds, or -N for N seconds ago"
    )
    parser.add_argument("--host", help="only flows to this host")
    parser.add_argument("--limit", type=int, default=10_000, help="at most this many (newest)")
    args = parser.parse_args(argv)
    path = Path(args.flows) if args.flows else None
    if path is None and args.config:
        try:
            configured = load_settings(args.config).flows.path
        except ConfigError as e:
            parser.exit(2, f"eyewall har: {e}\n")
        path = Path(configured) if configured else None
    path = path or default_path()
    if not path.exists():
        parser.exit(1, f"eyewall har: no flows recorded at {path}\n")
    since = args.since if args.since >= 0 else time.time() + args.since
    where, params = "started >= ?", [since]
    if args.host:
        where += " AND host = ?"
        params.append(args.host)
    records = read_records(path, where, tuple(params), args.limit)
    json.dump(har(records), sys.stdout)
    sys.stdout.write("\n")
    return 0


INSTALL_HINTS = """\
Trust this CA only on machines whose traffic you mean to inspect:
  Debian/Ubuntu:  sudo cp ca.pem /usr/local/share/ca-certificates/eyewall.crt \\
                    && sudo update-ca-certificates
  Fedora/RHEL:    sudo cp ca.pem /etc/pki/ca-trust/source/anchors/eyewall.pem \\
                    && sudo update-ca-trust
  macOS:          sudo security add-trusted-cert -d -r trustRoot \\
                    -k /Library/Keychains/System.keychain ca.pem
  Windows:        certutil -addstore -f ROOT eyewall.der   (eyewall ca export --der)
  Firefox:        Settings > Privacy & Security > Certificates > Import
  curl / Python / Node:  --cacert ca.pem / REQUESTS_CA_BUNDLE / NODE_EXTRA_CA_CERTS
"""


def ca_command(argv: Sequence[str]) -> int:
    from eyewall.tls.ca import CertificateAuthority, default_ca_dir

    parser = argparse.ArgumentParser(
        prog="eyewall ca", description="Create or export the TLS interception CA."
    )
    parser.add_argument("action", choices=["init", "export"])
    parser.add_argument("--ca-dir", help="where the CA lives (default: ca/ in the data dir)")
    parser.add_argument("--config", help="read tls.ca_dir from this configuration")
    parser.add_argument("--der", action="store_true", help="export DER instead of PEM")
    args = parser.parse_args(argv)
    directory = args.ca_dir
    if directory is None and args.config:
        try:
            directory = load_settings(args.config).tls.ca_dir or None
        except ConfigError as e:
            parser.exit(2, f"eyewall ca: {e}\n")
    path = Path(directory) if directory else default_ca_dir()
    if args.action == "init":
        try:
            ca = CertificateAuthority.create()
            ca.save(path)
        except FileExistsError as e:
            parser.exit(1, f"eyewall ca init: {e} (keeping it)\n")
        print(f"created {path / 'ca.pem'} (key: {path / 'ca.key'}, mode 0600)")
        print(f"SHA-256 fingerprint: {ca.fingerprint()}")
        print(INSTALL_HINTS, end="")
        return 0
    try:
        ca = CertificateAuthority.load(path)
    except (OSError, ValueError) as e:
        parser.exit(1, f"eyewall ca export: {e}\n")
    if args.der:
        sys.stdout.buffer.write(ca.der())
    else:
        sys.stdout.write(ca.pem().decode())
        print(INSTALL_HINTS, end="", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "check-config":
        return check_config(argv[1:])
    if argv and argv[0] == "reload":
        return reload_command(argv[1:])
    if argv and argv[0] == "ca":
        return ca_command(argv[1:])
    if argv and argv[0] == "har":
        return har_command(argv[1:])
    if argv and argv[0] == "explain":
        from eyewall.explain import explain_command

        return explain_command(argv[1:])
    return run(argv)
