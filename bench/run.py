"""Eyewall benchmark harness: every system side by side in one run.

    python bench/run.py                      # full run (about 15 min on 2 cores)
    python bench/run.py --quick              # smoke run (about 3 min)
    python bench/run.py --only small_requests,ttfb --peers eyewall,squid
    python bench/run.py --only policy_cost,observability_cost,intercept --peers eyewall,mitmproxy
    python bench/run.py --eyewall-baseline ../eyewall-old   # + eyewall-baseline (before/after)

The proxy under test is pinned to --proxy-cpu, origins and load generators
to --load-cpu. Results go to bench/results/<date>[-quick].md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import resource
import shlex
import shutil
import ssl
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import tunnel_load
from bench_context import BenchContext, Settings, Target
from origins import start_origins
from processes import free_port, install_cleanup_handlers, stop_all
from report import DIRECT, format_number, write_results
from scenarios import SCENARIO_KEYS, SCENARIOS, Scenario
from systems import (
    EYEWALL_BASELINE,
    PEER_NAMES,
    REPO_DIR,
    ProxySystem,
    first_line_of,
    make_systems,
    nginx_executable,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run (fewer, shorter runs)"
    )
    parser.add_argument("--only", default=",".join(SCENARIO_KEYS), help="comma-separated scenarios")
    parser.add_argument(
        "--peers", default=None, help=f"comma-separated systems from {','.join(PEER_NAMES)}"
    )
    parser.add_argument(
        "--mitmdump",
        default=os.environ.get("EYEWALL_BENCH_MITMDUMP") or shutil.which("mitmdump"),
        help="mitmdump executable (default: $EYEWALL_BENCH_MITMDUMP or PATH)",
    )
    parser.add_argument(
        "--eyewall-baseline",
        metavar="DIR",
        type=Path,
        default=os.environ.get("EYEWALL_BENCH_BASELINE") or None,
        help=f"another Eyewall checkout with its own .venv (e.g. a git worktree of an older "
        f"commit): adds the system {EYEWALL_BASELINE}, started like eyewall but from DIR "
        "(default: $EYEWALL_BENCH_BASELINE)",
    )
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and configs in /tmp")
    args = parser.parse_args()
    args.only = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = set(args.only) - set(SCENARIO_KEYS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {SCENARIO_KEYS}")
    if args.peers is None:
        args.peers = [name for name in PEER_NAMES if name != "mitmproxy" or args.mitmdump]
    else:
        args.peers = [
            name.strip().replace("proxy.py", "proxypy")
            for name in args.peers.split(",")
            if name.strip()
        ]
        unknown = set(args.peers) - set(PEER_NAMES)
        if unknown:
            parser.error(f"unknown peer(s) {sorted(unknown)}; choose from {PEER_NAMES}")
    if args.eyewall_baseline is not None:
        args.eyewall_baseline = Path(args.eyewall_baseline).expanduser().resolve()
        if not (args.eyewall_baseline / "eyewall").is_dir():
            parser.error(f"--eyewall-baseline: no eyewall/ package in {args.eyewall_baseline}")
        if not (args.eyewall_baseline / ".venv" / "bin" / "python").exists():
            parser.error(f"--eyewall-baseline: no .venv/bin/python in {args.eyewall_baseline}")
    return args


def choose_cpus(args: argparse.Namespace, notes: list[str]) -> tuple[int | None, int | None]:
    available = sorted(os.sched_getaffinity(0))
    if (
        args.proxy_cpu in available
        and args.load_cpu in available
        and args.proxy_cpu != args.load_cpu
    ):
        os.sched_setaffinity(0, {args.load_cpu})  # the harness itself is a load generator
        return args.proxy_cpu, args.load_cpu
    notes.append(
        f"CPU pinning disabled: cores {available} cannot host "
        f"proxy={args.proxy_cpu}, load={args.load_cpu}."
    )
    return None, None


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine_info(fd_limit: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return {
        "nproc": os.cpu_count(),
        "cpu": models[0] if models else platform.processor() or "unknown",
        "kernel": " ".join(platform.uname()[0:3:2]),
        "os": first_line_of(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "harness python": f"{python} ({sys.executable})",
        "load generator event loop": tunnel_load.LOOP_NAME,
        "load generator TLS": ssl.OPENSSL_VERSION,
        "fd limit": fd_limit,
    }


def tool_versions(systems: list[ProxySystem]) -> dict:
    versions = {
        "nginx": first_line_of([nginx_executable() or "nginx", "-v"]),
        "wrk": first_line_of(["wrk", "-v"]),
        "curl": first_line_of(["curl", "--version"]),
    }
    for system in systems:
        versions[system.name] = (
            system.version() if not system.unavailable_reason() else "not available"
        )
    return versions


@contextlib.contextmanager
def running(
    system: ProxySystem | None, ctx: BenchContext, cpu: int | None, label: str
) -> Iterator[Target]:
    """A Target for `system` (None = direct), stopping the proxy afterwards."""
    if system is None:
        yield Target(DIRECT, None, None)
        return
    reason = system.unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    port = free_port()
    process = system.start(ctx.workdir / f"{system.name}-{label}", port, cpu)
    try:
        yield Target(system.name, port, process, system.proxy_authorization, system.proxy_ca)
        if not process.alive():
            raise RuntimeError(f"{system.name} died during the run: {process.log_tail()}")
    finally:
        process.stop()


def measure_safely(scenario: Scenario, ctx: BenchContext, target: Target, variant: object) -> dict:
    try:
        result = scenario.measure(ctx, target, variant)
    except Exception as error:  # a broken peer must not stop the run
        traceback.print_exc(limit=3)
        return {"failed": f"{type(error).__name__}: {error}"}
    if target.process is not None and not target.process.alive():
        result["failed"] = f"process exited: {target.process.log_tail()}"
    return result


def scenario_systems(
    scenario: Scenario, ctx: BenchContext, peers: list[ProxySystem]
) -> list[ProxySystem]:
    if scenario.prepare is not None:
        scenario.prepare(ctx)
    return scenario.systems(ctx, peers) if scenario.systems is not None else peers


def run_scenario(
    scenario: Scenario, ctx: BenchContext, peers: list[ProxySystem], cpu: int | None
) -> tuple[dict, list[ProxySystem]]:
    """The scenario's results, and the systems it ran."""
    variants = scenario.variants(ctx.settings)
    results: dict[str, dict[str, dict]] = {str(variant): {} for variant in variants}
    try:
        systems = scenario_systems(scenario, ctx, peers)
    except Exception as error:
        traceback.print_exc(limit=3)
        failed = {"failed": f"setup: {type(error).__name__}: {error}"}
        return {"title": scenario.title, "results": {v: {DIRECT: failed} for v in results}}, []
    if not systems and scenario.systems is not None:
        print(f"  [{scenario.key}] no system to run (needs eyewall in --peers)", flush=True)
    candidates: list[ProxySystem | None] = [None] if scenario.includes_direct else []
    candidates += systems
    for system in candidates:
        name = system.name if system else DIRECT
        groups = (
            [[variant] for variant in variants] if scenario.fresh_proxy_per_variant else [variants]
        )
        for group in groups:
            label = f"{scenario.key}-{group[0]}"
            try:
                with running(system, ctx, cpu, label) as target:
                    for variant in group:
                        started = time.monotonic()
                        result = measure_safely(scenario, ctx, target, variant)
                        results[str(variant)][name] = result
                        print(
                            f"  [{scenario.key} {variant}] {name}: {summary(result)} "
                            f"({time.monotonic() - started:.0f}s)",
                            flush=True,
                        )
            except Exception as error:
                for variant in group:
                    results[str(variant)].setdefault(
                        name, {"failed": f"{type(error).__name__}: {error}"}
                    )
                print(f"  [{scenario.key}] {name}: FAILED {error}", flush=True)
    return {"title": scenario.title, "results": results}, systems


def summary(result: dict) -> str:
    if "failed" in result:
        return f"FAILED {result['failed'][:200]}"
    shown = [
        f"{key}={value:.1f}"
        for key, value in result.items()
        if isinstance(value, float) and key != "open_seconds"
    ]
    return " ".join(shown[:4]) + (
        f" errors={result['errors_total']}" if result.get("errors_total") else ""
    )


def collect_notes(run: dict, systems: list[ProxySystem]) -> None:
    for system in systems:
        run["notes"].extend(system.notes)
    for key, scenario in run["scenarios"].items():
        for variant, by_system in scenario["results"].items():
            for name, result in by_system.items():
                if "failed" in result:
                    run["notes"].append(f"{key} [{variant}] {name} failed: {result['failed']}")
                    continue
                for kind in ("errors", "remarks"):
                    value = result.get(kind)
                    if value and (not isinstance(value, dict) or any(value.values())):
                        text = format_number(value, 0)
                        run["notes"].append(f"{key} [{variant}] {name} {kind}: {text}")


def main() -> int:
    args = parse_args()
    install_cleanup_handlers()
    settings = Settings.quick() if args.quick else Settings()
    started = datetime.datetime.now()
    run: dict = {
        "date": started.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "notes": [],
        "commands": {},
        "configs": {},
    }
    proxy_cpu, load_cpu = choose_cpus(args, run["notes"])
    fd_limit = raise_fd_limit()
    systems = make_systems(args.peers, args.mitmdump, args.eyewall_baseline)
    run["machine"] = machine_info(fd_limit)
    run["versions"] = tool_versions(systems)
    run["settings"] = dataclasses.asdict(settings)
    run["layout"] = [
        f"proxy under test pinned to core {proxy_cpu} (taskset -c {proxy_cpu}); "
        f"origins (nginx, origin.py), wrk, curl and the Python clients on core {load_cpu}",
        "systems run one after another; each proxy is restarted for every scenario "
        "(and for every tunnel count in scenario 5)",
        "scenarios 3-5 use the harness's own Python clients (bench/tunnel_load.py, "
        f"{tunnel_load.LOOP_NAME}) against bench/origin.py; 1, 2, 6, 7 and 8 use wrk and "
        "curl; 9 uses bench/tls_load.py against a second nginx serving HTTPS",
        "scenarios 7 and 8 compare Eyewall configurations (run when eyewall is among the "
        "peers); 9 compares the peers that can intercept TLS (eyewall, mitmproxy)",
    ]
    run["notes"].append(
        "Upload origin: nginx `return 200` answers before it has read the body (curl's "
        "time_starttransfer ≈ 0.15 ms on a 100 MiB POST) and discards the rest afterwards, so "
        "a proxy could finish early or cut the upload; origin.py's HTTP sink reads the full "
        "Content-Length first."
    )
    workdir = Path(tempfile.mkdtemp(prefix="eyewall-bench-"))
    workdir.chmod(0o755)  # squid drops root and must reach its per-start dir
    print(f"workdir {workdir}; systems: direct, {', '.join(s.name for s in systems)}", flush=True)
    try:
        origins = start_origins(workdir / "origins", free_port(), load_cpu)
        ctx = BenchContext(settings, origins, load_cpu, workdir)
        run["configs"]["nginx.conf"] = origins.nginx_config
        run["scenarios"] = {}
        used: list[ProxySystem] = list(systems)
        for scenario in SCENARIOS:
            if scenario.key in args.only:
                print(f"== {scenario.title}", flush=True)
                data, ran = run_scenario(scenario, ctx, systems, proxy_cpu)
                run["scenarios"][scenario.key] = data
                used += [new for new in ran if all(new is not old for old in used)]
        if ctx.tls_origin is not None:
            run["configs"]["nginx-tls.conf (intercept origin)"] = ctx.tls_origin.nginx_config
        for system in used:
            if system.config_text:
                run["configs"][system.name] = system.config_text
        record_commands(run, used)
    finally:
        stop_all()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    run["elapsed_s"] = round((datetime.datetime.now() - started).total_seconds())
    collect_notes(run, used)
    stem = run["date"] + ("-quick" if args.quick else "")
    paths = {str(workdir): "$WORKDIR", str(workdir.resolve()): "$WORKDIR"}
    checkouts = [str(REPO_DIR)]
    if args.eyewall_baseline is not None:
        paths[str(args.eyewall_baseline)] = "$EYEWALL_BASELINE"
        checkouts.append(str(args.eyewall_baseline))
    for system in used:
        executable = system.executable or ""
        if os.path.isabs(executable) and not executable.startswith(tuple(checkouts)):
            paths[executable] = Path(executable).name
    specs = [s.as_table_spec(args.eyewall_baseline is not None) for s in SCENARIOS]
    markdown, raw = write_results(args.output_dir, stem, run, specs, paths)
    print(f"wrote {markdown} and {raw} in {run['elapsed_s']}s", flush=True)
    return 0


def record_commands(run: dict, systems: list[ProxySystem]) -> None:
    """One direct and one proxied command line per scenario (every system's in
    the scenarios that compare configurations), plus how each proxy was started
    (the port and temp paths differ from start to start)."""
    own_systems = {scenario.key for scenario in SCENARIOS if scenario.systems is not None}
    for key, scenario in run["scenarios"].items():
        for variant, by_system in scenario["results"].items():
            with_command = [name for name, result in by_system.items() if result.get("command")]
            proxied = [name for name in with_command if name != DIRECT]
            for name in [DIRECT, *(proxied if key in own_systems else proxied[:1])]:
                command = by_system.get(name, {}).get("command")
                if command:
                    label = "direct" if name == DIRECT else f"via a proxy ({name} shown)"
                    if key in own_systems and name != DIRECT:
                        label = name
                    run["commands"][f"{key} [{variant}], {label}"] = command
    for system in systems:
        if system.last_command:
            run["commands"][f"start {system.name}"] = shlex.join(system.last_command)


if __name__ == "__main__":
    sys.exit(main())
