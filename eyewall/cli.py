"""The command line: argument parsing only; the work is done by `eyewall.app` (run),
`eyewall.explain` and the small commands below.

    eyewall [options]                       run the proxy (every setting has a flag;
                                            flags override the --config file)
    eyewall check-config FILE...            validate configuration (and addon) files
    eyewall reload [--pid-file F | --config F]   ask a running proxy to reload
    eyewall restart [--pid-file F | --config F]  replace it without dropping connections
    eyewall explain [options] URL|HOST:PORT  show what the policy decides, and why
    eyewall ca init|export                  the TLS interception CA
    eyewall har export                      recorded flows as HAR 1.2

Each command has its own ``--help``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eyewall import __version__
from eyewall.config import ConfigError, SettingInfo, iter_settings, load_settings

__all__ = ["main"]

# What the decision depends on: own listeners (self-access), access rules, users, limits.
EXPLAIN_SETTINGS = (
    "listen",
    "admin.listen",
    "access.",
    "auth.htpasswd",
    "rate_limits.",
    "tls.listen",
)


def add_setting_flags(
    parser: argparse.ArgumentParser | Any, only: tuple[str, ...] | None = None
) -> None:
    """One flag per setting that has one (``only``: settings whose path starts so)."""
    for s in iter_settings():
        if s.flag is None or (only is not None and not s.path.startswith(only)):
            continue
        unit = f" [{s.unit}]" if s.unit else ""
        default = _shown_default(s)
        help_text = s.help + unit + (f" (default: {default})" if default else "")
        kwargs: dict[str, Any] = {"dest": s.path, "help": help_text, "default": None}
        if s.type == "bool" and s.flag.startswith("--no-"):
            kwargs.update(action="store_const", const=False)
        elif s.type == "bool":
            kwargs["action"] = "store_true"
        elif s.type.startswith("tuple["):
            kwargs.update(action="append", metavar="VALUE")
        else:
            kwargs["metavar"] = (s.unit or s.type).upper()
        parser.add_argument(s.flag, **kwargs)


def _shown_default(s: SettingInfo) -> str:
    """The default as a user would type it, or "" when there is nothing to show (off,
    empty, or a boolean flag)."""
    value = s.default
    if s.type == "bool" or value in ("", (), None):
        return ""
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).replace("%", "%%")  # argparse formats help with %


def overrides_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The settings given as flags, by dotted path."""
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


class _Parser(argparse.ArgumentParser):
    """No abbreviated options, here and in every subcommand (subparsers are made of the
    parent's class): the top-level parser would claim a subcommand's option as an
    abbreviation of its own (explain --client vs --client-rps), and an abbreviation that
    works today breaks when a longer flag is added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``eyewall`` argument parser: the run options (one per setting, see
    `eyewall.config.iter_settings`) and the subcommands."""
    parser = _Parser(
        prog="eyewall",
        description="An asynchronous HTTP/HTTPS forward proxy. Without a command, runs the"
        " proxy (default 127.0.0.1:8080).",
        epilog="Run 'eyewall COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"eyewall {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    add_setting_flags(parser)
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    check = commands.add_parser(
        "check-config",
        help="validate configuration files (and addon files)",
        description="Validate configuration files, with the addons they name: every"
        " problem is listed with its setting and line; exit status 1 if any file is"
        " invalid. A FILE ending in .py is checked as an addon, as start-up loads one.",
    )
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument(
        "--no-paths",
        action="store_true",
        help="skip the checks of the files and directories it names (a configuration"
        " for another machine, or for a service whose manager creates them at start)",
    )

    reload = commands.add_parser(
        "reload",
        help="ask a running proxy to reload its configuration (SIGHUP)",
        description="Ask a running proxy to reload its configuration (sends SIGHUP).",
    )
    reload.add_argument("--pid-file", help="the running proxy's pid file")
    reload.add_argument("--config", help="read pid_file from this configuration")

    restart = commands.add_parser(
        "restart",
        help="replace a running proxy by a new one without dropping connections (SIGUSR2)",
        description="Start a new generation of a running proxy beside it, on the same"
        " sockets, with the code installed now (an upgrade goes live this way); the old"
        " generation drains once the new one serves. Sends SIGUSR2, then waits until the"
        " pid file names the new process. Exit status 1 if it does not within --wait.",
    )
    restart.add_argument("--pid-file", help="the running proxy's pid file")
    restart.add_argument("--config", help="read pid_file from this configuration")
    restart.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for the new generation (default: %(default)g)",
    )

    explain = commands.add_parser(
        "explain",
        help="show what the policy decides for a request, and why",
        description="Show what the policy decides for a request, and why; sends nothing."
        " Exit status 0 if the request would be let through, 3 if not.",
    )
    explain.add_argument("target", help="a URL (http://host/path) or HOST:PORT for CONNECT")
    explain.add_argument("--config", metavar="FILE", help="TOML configuration file")
    explain.add_argument(
        "--method",
        help="request method (default: GET for http:// URLs, CONNECT for https:// URLs"
        " and HOST:PORT, as clients send them)",
    )
    explain.add_argument("--client", default="127.0.0.1", help="client address")
    explain.add_argument(
        "--user", help="an authenticated user name (its password is assumed right)"
    )
    group = explain.add_argument_group("policy settings (override the file, as for the proxy)")
    add_setting_flags(group, EXPLAIN_SETTINGS)

    ca = commands.add_parser(
        "ca",
        help="create or export the TLS interception CA",
        description="Create or export the TLS interception CA.",
    )
    ca_commands = ca.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("init", "create the CA (key 0600)"),
        ("export", "print the CA certificate"),
    ):
        sub = ca_commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("--ca-dir", help="where the CA lives (default: ca/ in the data dir)")
        sub.add_argument("--config", help="read tls.ca_dir from this configuration")
        if name == "export":
            sub.add_argument("--der", action="store_true", help="DER instead of PEM")

    har = commands.add_parser(
        "har",
        help="export recorded flows as HAR 1.2",
        description="Export recorded flows as HAR 1.2.",
    )
    har_commands = har.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = har_commands.add_parser(
        "export",
        help="write recorded flows as HAR 1.2 to stdout",
        description="Write recorded flows as HAR 1.2 to stdout.",
    )
    export.add_argument("--flows", help="the flows database (default: the user data dir)")
    export.add_argument(
        "--postgresql",
        metavar="URL",
        help="read a fleet's flows from this PostgreSQL database instead",
    )
    export.add_argument(
        "--config", help="read flows.path (or shared_flows.postgresql) from this configuration"
    )
    export.add_argument(
        "--since", type=float, default=0.0, help="epoch seconds, or -N for N seconds ago"
    )
    export.add_argument("--host", help="only flows to this host (any case or address spelling)")
    export.add_argument("--limit", type=int, default=10_000, help="at most this many (newest)")
    return parser


def check_config(files: Sequence[str], check_paths: bool = True, quiet: bool = False) -> int:
    """Load each file as a start-up would (settings, policy, files it names unless
    ``check_paths`` is false, and then the addons: each addon file runs and its classes
    are checked, no hook is called); print every error to stderr, and ``FILE: ok`` to
    stdout unless ``quiet``.  Returns the exit status: 0 when all are valid, 1
    otherwise."""
    from eyewall.addons.runner import Addons, unsafe_code
    from eyewall.app import Loader

    status = 0
    for path in files:
        try:
            if path.endswith(".py"):  # an addon file, checked as start-up loads one
                problem = unsafe_code(path)
                problems = [problem] if problem else Addons([path]).check()
                if problems:
                    raise ConfigError(problems)
                if not quiet:
                    print(f"{path}: ok")
                continue
            Loader(path, {}, check_paths, run_addons=True).load()
        except ConfigError as e:
            status = 1
            print(f"{path}: invalid", file=sys.stderr)
            for error in e.errors:
                print(f"  {error}", file=sys.stderr)
            continue
        if not quiet:
            print(f"{path}: ok")
    return status


def _signal_proxy(args: argparse.Namespace, command: str, sig: int) -> tuple[int, str, int, int]:
    """Send ``sig`` to the proxy named by the pid file (``--pid-file``, or the
    ``--config`` file's pid_file).  With ``--config`` the file is checked first, as
    ``check-config`` would, and nothing is sent when it is invalid.  Returns (status,
    the pid file, the pid, the pid file's modification time in ns before the signal);
    status 0 when sent, 1 no such process, 2 usage or config error (said on stderr)."""
    pid_file = args.pid_file
    if args.config:
        if check_config([args.config], quiet=True) != 0:
            print(f"eyewall {command}: not sent; the proxy keeps running as it is", file=sys.stderr)
            return 2, "", 0, 0
        if pid_file is None:
            pid_file = load_settings(args.config).pid_file
    if not pid_file:
        print(f"eyewall {command}: give --pid-file, or --config with pid_file set", file=sys.stderr)
        return 2, "", 0, 0
    try:
        stamp = os.stat(pid_file).st_mtime_ns
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, sig)
    except ProcessLookupError:
        print(
            f"eyewall {command}: {pid_file} names process {pid}, which is not running"
            " (a stale pid file: the proxy stopped without removing it)",
            file=sys.stderr,
        )
        return 1, pid_file, 0, 0
    except FileNotFoundError:
        print(f"eyewall {command}: no pid file {pid_file}: is the proxy running?", file=sys.stderr)
        return 1, pid_file, 0, 0
    except (OSError, ValueError) as e:
        print(f"eyewall {command}: {pid_file}: {e}", file=sys.stderr)
        return 1, pid_file, 0, 0
    return 0, pid_file, pid, stamp


def reload_command(args: argparse.Namespace) -> int:
    """``eyewall reload``: send SIGHUP to the process in the pid file (from ``--pid-file`` or
    the config).  With ``--config`` the file is checked first, as ``check-config`` would,
    and nothing is sent when it is invalid.  Returns the exit status: 0 sent, 1 no such
    process, 2 usage or config error (not sent)."""
    status, _, pid, _ = _signal_proxy(args, "reload", signal.SIGHUP)
    if status == 0:
        print(f"sent SIGHUP to {pid}; the proxy logs whether the reload was applied")
    return status


def restart_command(args: argparse.Namespace) -> int:
    """``eyewall restart``: send SIGUSR2 to the process in the pid file, then wait up to
    ``--wait`` seconds for the pid file to name its successor.  The running process
    rewrites the file with its own pid when the successor fails to start, which ends the
    wait at once.  Returns the exit status: 0 restarted, 1 no such process, a successor
    that failed or none in time, 2 usage or config error."""
    status, pid_file, old, stamp = _signal_proxy(args, "restart", signal.SIGUSR2)
    if status:
        return status
    print(f"sent SIGUSR2 to {old}", flush=True)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        now = _stamp(pid_file)  # before the read: a file replaced since is read anew
        try:
            new = int(Path(pid_file).read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.1)  # being written: look again
            continue
        if new != old:
            print(f"restarted: {new} serves; {old} drains and exits")
            return 0
        if now not in (stamp, None):  # written again by the running process
            print(
                f"eyewall restart: the new generation failed to start; {old} keeps serving"
                " (the proxy's log says why)",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.1)
    print(
        f"eyewall restart: {pid_file} still names {old} after {args.wait:g} s"
        " (the proxy's log says why)",
        file=sys.stderr,
    )
    return 1


def _stamp(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def har_command(args: argparse.Namespace) -> int:
    """``eyewall har export``: write recorded flows as HAR 1.2 JSON to stdout or ``--output``.
    Returns the exit status (0 written, 1 no flow store, 2 usage error)."""
    import json

    from eyewall.observe.har import har, har_query, host_filter
    from eyewall.observe.store import default_path, read_records

    path = Path(args.flows) if args.flows else None
    postgresql = args.postgresql
    if path is None and postgresql is None and args.config:
        try:
            settings = load_settings(args.config)
        except ConfigError as e:
            print(f"eyewall har: {e}", file=sys.stderr)
            return 2
        configured = settings.flows.path
        path = Path(configured) if configured else None
        postgresql = settings.shared_flows.postgresql or None
    since = args.since if args.since >= 0 else time.time() + args.since
    if postgresql:
        return _har_from_postgresql(postgresql, since, host_filter(args.host), args.limit)
    path = path or default_path()
    if not path.exists():
        print(f"eyewall har: no flows recorded at {path}", file=sys.stderr)
        return 1
    records = read_records(path, *har_query(since, host_filter(args.host)), args.limit)
    json.dump(har(records), sys.stdout)
    sys.stdout.write("\n")
    return 0


def _har_from_postgresql(dsn: str, since: float, host: str, limit: int) -> int:
    """`har_command` for a fleet's flows in PostgreSQL (the ``fleet`` extra)."""
    import asyncio
    import json

    try:
        from eyewall.shared.flow_db import FlowDatabase, FlowDatabaseError
    except ImportError:
        print("eyewall har: PostgreSQL needs: pip install 'eyewall[fleet]'", file=sys.stderr)
        return 2
    from eyewall.observe.har import har

    async def read() -> list[dict[str, Any]]:
        db = FlowDatabase(dsn, "", create=False)
        try:
            return await db.records(since, host, limit)
        finally:
            await db.close()

    try:
        records = asyncio.run(read())
    except FlowDatabaseError as e:
        print(f"eyewall har: reading the flows from PostgreSQL failed: {e}", file=sys.stderr)
        return 1
    json.dump(har(records), sys.stdout)
    sys.stdout.write("\n")
    return 0


INSTALL_HINTS = """\
Trust this CA only on machines whose traffic you mean to inspect:
  Debian/Ubuntu:  sudo cp {pem} /usr/local/share/ca-certificates/eyewall.crt \\
                    && sudo update-ca-certificates
  Fedora/RHEL:    sudo cp {pem} /etc/pki/ca-trust/source/anchors/eyewall.pem \\
                    && sudo update-ca-trust
  macOS:          sudo security add-trusted-cert -d -r trustRoot \\
                    -k /Library/Keychains/System.keychain {pem}
  Windows:        certutil -addstore -f ROOT eyewall.der   (eyewall ca export --der)
  Firefox:        Settings > Privacy & Security > Certificates > Import
  curl / Python / Node:  --cacert {pem} / REQUESTS_CA_BUNDLE / NODE_EXTRA_CA_CERTS
"""


def ca_command(args: argparse.Namespace) -> int:
    """``eyewall ca init|export``: create the interception CA (key file mode 0600; an
    existing one is kept) or print its certificate. Returns the exit status: 0 done, 1
    the CA cannot be written or read, 2 an invalid configuration."""
    from eyewall.tls.ca import CertificateAuthority, default_ca_dir

    directory = args.ca_dir
    if directory is None and args.config:
        try:
            directory = load_settings(args.config).tls.ca_dir or None
        except ConfigError as e:
            print(f"eyewall ca: {e}", file=sys.stderr)
            return 2
    path = Path(directory) if directory else default_ca_dir()
    if args.action == "init":
        try:
            ca = CertificateAuthority.create()
            ca.save(path)
        except FileExistsError:
            # Idempotent, as provisioning wants: the CA that exists is the one to keep.
            try:
                ca = CertificateAuthority.load(path)
            except (OSError, ValueError) as e:
                print(f"eyewall ca init: {path} holds a broken CA: {e}", file=sys.stderr)
                return 1
            print(f"{path / 'ca.pem'} already exists: kept (not replaced)")
            print(f"SHA-256 fingerprint: {ca.fingerprint()}")
            return 0
        except OSError as e:
            print(f"eyewall ca init: cannot write {path}: {e.strerror}", file=sys.stderr)
            return 1
        print(f"created {path / 'ca.pem'} (key: {path / 'ca.key'}, mode 0600)")
        print(f"SHA-256 fingerprint: {ca.fingerprint()}")
        print(INSTALL_HINTS.format(pem=path / "ca.pem"), end="")
        return 0
    try:
        ca = CertificateAuthority.load(path)
    except (OSError, ValueError) as e:
        print(f"eyewall ca export: {e}", file=sys.stderr)
        return 1
    if args.der:
        sys.stdout.buffer.write(ca.der())
    else:
        sys.stdout.write(ca.pem().decode())
        print(INSTALL_HINTS.format(pem=path / "ca.pem"), end="", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``eyewall`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(parser, args)
    except BrokenPipeError:
        # the reader of our output left (`eyewall har export | head`): no traceback,
        # and no second error when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    match args.command:
        case "check-config":
            return check_config(args.files, not args.no_paths)
        case "reload":
            return reload_command(args)
        case "restart":
            return restart_command(args)
        case "ca":
            return ca_command(args)
        case "har":
            return har_command(args)
        case "explain":
            return explain_command(args, overrides_of(args, parser))
    from eyewall.app import Loader
    from eyewall.workers.launch import launch

    return launch(Loader(args.config, overrides_of(args, parser)))


def explain_command(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Exit status 0 (let through), 3 (refused) or 2 (invalid configuration)."""
    from eyewall.app import Loader
    from eyewall.explain import render_explanation

    try:
        loaded = Loader(args.config, overrides).load()
    except ConfigError as e:
        print("eyewall explain: invalid configuration:", file=sys.stderr)
        for error in e.errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    text, allowed = render_explanation(
        loaded.settings, loaded.policy, args.target, args.method, args.client, args.user
    )
    print(text, flush=True)
    return 0 if allowed else 3
