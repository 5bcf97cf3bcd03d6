"""Command line: ``eyewall [options]`` runs the proxy; ``eyewall check-config FILE``
validates a configuration file.  Every setting has a flag; flags override the file."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
from collections.abc import Sequence
from typing import Any

from eyewall import __version__
from eyewall.config import ConfigError, Settings, iter_settings, load_settings
from eyewall.observe.accesslog import AccessLog
from eyewall.observe.events import EventBus
from eyewall.proxy.server import Proxy

__all__ = ["main"]

log = logging.getLogger("eyewall")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eyewall",
        description="An asynchronous HTTP/HTTPS forward proxy.",
        epilog="Subcommands: 'eyewall check-config FILE' validates a configuration file.",
    )
    parser.add_argument("--version", action="version", version=f"eyewall {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    for s in iter_settings():
        unit = f" [{s.unit}]" if s.unit else ""
        kwargs: dict[str, Any] = {"dest": s.path, "help": s.help + unit, "default": None}
        if s.path == "listen":
            kwargs.update(action="append", metavar="HOST:PORT")
        else:
            kwargs["metavar"] = (s.unit or s.type).upper()
        parser.add_argument(s.flag, **kwargs)
    return parser


def _overrides(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in iter_settings():
        value = getattr(args, s.path)
        if value is None:
            continue
        if s.type in ("float", "int"):
            try:
                value = float(value) if s.type == "float" else int(value)
            except ValueError:
                parser.error(f"{s.flag}: expected a number, got {value!r}")
        out[s.path] = value
    return out


def build_settings(argv: Sequence[str]) -> Settings:
    parser = _parser()
    args = parser.parse_args(argv)
    overrides = _overrides(args, parser)
    try:
        return load_settings(args.config, overrides)
    except ConfigError as e:
        message = str(e)
        path = message.partition(":")[0]
        flags = {s.path: s.flag for s in iter_settings()}
        if path in overrides:
            message = flags[path] + message[len(path) :]
        parser.exit(2, f"eyewall: invalid setting: {message}\n")


def check_config(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: eyewall check-config FILE", file=sys.stderr)
        return 2
    try:
        load_settings(argv[0])
    except ConfigError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    print(f"{argv[0]}: ok")
    return 0


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


async def serve(settings: Settings) -> None:
    _raise_fd_limit()
    bus = EventBus()
    access = AccessLog(settings.access_log) if settings.access_log != "off" else None
    if access is not None:
        bus.subscribe(access)
    proxy = Proxy(settings, bus)
    try:
        addresses = proxy.start_listening()
    except OSError as e:
        raise SystemExit(f"eyewall: cannot listen: {e.strerror or e}") from None
    shown = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)
    print(f"eyewall {__version__} listening on {shown}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if access is not None:
        loop.add_signal_handler(signal.SIGUSR1, access.reopen)
    await stop.wait()
    log.info("shutting down; in-flight work has %.0f s to finish", settings.timeouts.drain)
    shutdown = asyncio.ensure_future(proxy.shutdown())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.cancel)  # a second signal: stop now
    try:
        await shutdown
    except asyncio.CancelledError:
        log.warning("second signal: closing everything now")
    if access is not None:
        access.close()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "check-config":
        return check_config(argv[1:])
    settings = build_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("tornado.general").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 130
    return 0
