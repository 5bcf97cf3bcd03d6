"""What stalls Eyewall's event loop: wrk -t1 -c10 against Eyewall variants.

    .venv/bin/python bench/loop_stalls.py                     # every variant, 3 runs each
    .venv/bin/python bench/loop_stalls.py --variants on,off,gc-default --runs 5
    .venv/bin/python bench/loop_stalls.py --lag-ms 2 --variants on   # where the stalls come from

Each variant is Eyewall started like bench/run.py starts it (same config,
default observability unless the variant removes a part), but through
bench/stall_probe.py, which records garbage collections, the periodic work
on the loop and the writer threads' busy times (and, with --lag-ms, event-loop
lateness samples). Origins, pinning and the wrk script are the harness's:
proxy on --proxy-cpu, nginx and wrk on --load-cpu. Runs are interleaved
(variant A, B, C, A, B, C, ...) so that other load on the machine is spread
over the variants; each run has a fresh proxy, a warm-up and then a measured
wrk run. Per run it also reads how long the proxy's threads waited for a CPU
(/proc/PID/task/*/schedstat), i.e. how much the machine's other tenants took.

Writes a Markdown summary and the raw numbers (JSON) to --output (default:
a temp dir) and prints the summary.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import http_load
from bench_context import BenchContext, Settings, Target
from origins import SMALL_FILE, start_origins
from processes import free_port, install_cleanup_handlers, pinned, stop_all
from systems import BENCH_DIR, Eyewall, venv_tool

PROBE = BENCH_DIR / "stall_probe.py"
TIMED_CLIENT = BENCH_DIR / "timed_client.py"
OBS_OFF = {"access": False, "flows": False, "admin": False}


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    env: dict[str, str] = field(default_factory=dict)
    parts: dict[str, bool] = field(default_factory=dict)  # observability parts switched off


VARIANTS = [
    Variant("on", "as bench/run.py starts eyewall (JSON access log, admin+metrics, flows)"),
    Variant("off", "observability off (--access-log off --no-flows --admin-listen off)",
            parts=OBS_OFF),
    Variant("no-flows", "on, but --no-flows (no SQLite writer thread)", parts={"flows": False}),
    Variant("no-access", "on, but --access-log off (no access-log thread)",
            parts={"access": False}),
    Variant("no-admin", "on, but --admin-listen off", parts={"admin": False}),
    Variant("gc-default", "on, gc thresholds (700, 10, 10) instead of (50000, 50, 100)",
            env={"EYEWALL_PROBE_GC": "default"}),
    Variant("gc-off", "on, gc.disable() after start-up", env={"EYEWALL_PROBE_GC": "off"}),
    Variant("gc-off-off", "observability off and gc.disable()", env={"EYEWALL_PROBE_GC": "off"},
            parts=OBS_OFF),
    Variant("switch-1ms", "on, sys.setswitchinterval(0.001) (GIL hand-over after 1 ms, not 5)",
            env={"EYEWALL_PROBE_SWITCH": "0.001"}),
    Variant("writers-nice", "on, the writer thread (access log, flows) at nice 19",
            env={"EYEWALL_PROBE_WRITER_NICE": "19"}),
    Variant("writers-cpu1", "on, the writer thread moved to the load generator's core",
            env={"EYEWALL_PROBE_WRITER_CPU": "1"}),
    Variant("flows-small", "on, flow store flushed every 100 ms",
            env={"EYEWALL_PROBE_FLOWS_FLUSH": "0.1"}),
    Variant("flows-small-nice", "flows-small, the writer thread at nice 10",
            env={"EYEWALL_PROBE_FLOWS_FLUSH": "0.1", "EYEWALL_PROBE_WRITER_NICE": "10"}),
    Variant("no-watchdog", "on, watchdog sweep not started", env={"EYEWALL_PROBE_OFF": "watchdog"}),
    Variant("no-live", "on, live-feed 1 s tick not started", env={"EYEWALL_PROBE_OFF": "live"}),
]  # fmt: skip
BY_NAME = {variant.name: variant for variant in VARIANTS}


class ProbedEyewall(Eyewall):
    """Eyewall started through bench/stall_probe.py, with parts of the
    default observability switched off by `variant.parts`."""

    def __init__(self, variant: Variant, probe_out: Path) -> None:
        super().__init__(f"eyewall-{variant.name}")
        self.variant = variant
        self.probe_out = probe_out

    def eyewall_command(self, *args: str) -> list[str]:
        return [self.executable or sys.executable, str(PROBE), *args]

    def observability_args(self, workdir: Path) -> list[str]:
        parts = self.variant.parts
        args = []
        if parts.get("access", True):
            args += ["--access-log", str(workdir / "eyewall-access.log")]
        else:
            args += ["--access-log", "off"]
        args += ["--admin-listen", "127.0.0.1:0" if parts.get("admin", True) else "off"]
        if parts.get("flows", True):
            args += ["--flows", str(workdir / "eyewall-flows.sqlite3")]
        else:
            args += ["--no-flows"]
        return args


def cpu_times_ms(pid: int) -> dict[str, tuple[float, float]]:
    """Per thread ("main" or its name): (ms on a CPU, ms runnable but waiting for one)."""
    out: dict[str, tuple[float, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            on_cpu, waited, _ = (int(x) for x in (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        if name in out:
            name = f"{name}:{task.name}"
        out[name] = (on_cpu / 1e6, waited / 1e6)
    return out


def window(records: list[list[Any]], start: float, end: float, at: int = 1) -> list[list[Any]]:
    return [r for r in records if start <= r[at] <= end]


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def analyse(probe: dict[str, Any], start: float, end: float, stall_ms: float) -> dict[str, Any]:
    seconds = end - start
    gcs = window(probe["gc"], start, end)
    result: dict[str, Any] = {"seconds": seconds}
    for generation in (0, 1, 2):
        pauses = [r[2] * 1000 for r in gcs if r[0] == generation]
        result[f"gc{generation}_per_s"] = len(pauses) / seconds
        result[f"gc{generation}_ms_mean"] = statistics.fmean(pauses) if pauses else 0.0
        result[f"gc{generation}_ms_max"] = max(pauses, default=0.0)
    result["gc_ms_per_s"] = sum(r[2] for r in gcs) * 1000 / seconds
    result["gc_pauses_over_1ms_per_s"] = sum(1 for r in gcs if r[2] > 0.001) / seconds
    calls: dict[str, list[float]] = {}
    for name, _at, duration in window(probe["calls"], start, end):
        calls.setdefault(name, []).append(duration * 1000)
    for name, durations in sorted(calls.items()):
        result[f"{name}_per_s"] = len(durations) / seconds
        result[f"{name}_ms_max"] = max(durations)
    busy: dict[str, list[float]] = {}
    for name, _at, duration in window(probe["busy"], start, end):
        busy.setdefault(name, []).append(duration * 1000)
    for name, durations in sorted(busy.items()):
        result[f"{name}_batches_per_s"] = len(durations) / seconds
        result[f"{name}_busy_ms_mean"] = statistics.fmean(durations)
        result[f"{name}_busy_ms_max"] = max(durations)
    lags = window(probe["lag"], start, end, at=0)
    if lags:
        late = sorted(r[1] * 1000 for r in lags)
        result["lag_main_cpu_wait_ms"] = sum(r[3] for r in lags) * 1000 if len(lags[0]) > 3 else 0
        result["lag_samples"] = len(late)
        result["lag_p50_ms"] = late[len(late) // 2]
        result["lag_p99_ms"] = late[min(len(late) - 1, int(len(late) * 0.99))]
        result["lag_max_ms"] = late[-1]
        result.update(attribute(probe, lags, stall_ms))
    return result


def attribute(probe: dict[str, Any], lags: list[list[float]], stall_ms: float) -> dict[str, Any]:
    """Which recorded activity overlaps each stall (a lag sample later than
    `stall_ms`): a collection, a writer thread's batch, periodic loop work.
    A stall can overlap several; `none` = nothing recorded overlaps it."""
    intervals: list[tuple[str, float, float]] = []
    for generation, at, duration, _ in probe["gc"]:
        intervals.append((f"gc{generation}", at, at + duration))
    for name, at, duration in probe["busy"]:
        intervals.append((name, at, at + duration))
    for name, at, duration in probe["calls"]:
        intervals.append((name, at, at + duration))
    interval = probe["settings"]["lag_interval"]
    stalls = [(woke - late, woke, late) for woke, late, *_ in lags if late * 1000 >= stall_ms]
    # Each stalled sample's span (sleep + lateness) split by the main thread's
    # schedstat: on a CPU, runnable but waiting for a CPU, and the rest asleep
    # (blocked on the GIL or a lock, or idle in epoll for at most the interval).
    split = {"span": 0.0, "on_cpu": 0.0, "cpu_wait": 0.0, "asleep": 0.0}
    for _woke, late, on_cpu, waiting, *_ in (r for r in lags if r[1] * 1000 >= stall_ms):
        span = interval + late
        split["span"] += span * 1000
        split["on_cpu"] += on_cpu * 1000
        split["cpu_wait"] += waiting * 1000
        split["asleep"] += max(0.0, span - on_cpu - waiting) * 1000
    counts: dict[str, int] = {}
    late_ms: dict[str, float] = {}
    for s0, s1, late in stalls:
        causes = {name for name, a0, a1 in intervals if overlap(s0, s1, a0, a1) > 0}
        for cause in causes or {"none"}:
            counts[cause] = counts.get(cause, 0) + 1
            late_ms[cause] = late_ms.get(cause, 0.0) + late * 1000
    return {
        "stalls": len(stalls),
        "stall_ms_total": sum(s[2] for s in stalls) * 1000,
        "stall_causes": counts,
        "stall_cause_ms": {k: round(v, 1) for k, v in late_ms.items()},
        "stall_split_ms": {k: round(v, 1) for k, v in split.items()},
    }


def start_py_spy(args: argparse.Namespace, pid: int, workdir: Path) -> Any:
    """py-spy record over the measured run: raw stacks per thread, by function;
    `cpu`: samples of threads that are running, `gil`: of the thread holding the GIL."""
    if not args.profile:
        return None
    py_spy = venv_tool("py-spy")
    if py_spy is None:
        raise RuntimeError("py-spy not found (pip install py-spy into the venv)")
    command = [py_spy, "record", "--pid", str(pid), "--rate", str(args.profile_rate)]
    command += ["--duration", str(args.duration), "--format", "raw", "--threads"]
    command += ["--nonblocking", "--nolineno", "-o", str(workdir / "py-spy.txt")]
    if args.profile == "gil":
        command.append("--gil")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


PY_SPY_THREADS = {"MainThread": "main", "flows": "flows", "access-log": "access"}


def read_py_spy(
    path: Path, args: argparse.Namespace, stats: dict[str, Any], on_cpu_ms: dict[str, float]
) -> dict[str, Any]:
    """µs per request: per thread, per function (self), per eyewall module (inclusive,
    main thread). With `cpu`, py-spy's samples of a thread are scaled to the CPU
    time the kernel says it had (schedstat): py-spy counts a thread that waits for
    a CPU as active, which on a shared core inflates its numbers."""
    requests = stats["requests_per_s"] * args.duration
    lines = [line.rpartition(" ") for line in path.read_text().splitlines()]
    lines = [(stack, int(count)) for stack, _, count in lines if stack and count.isdigit()]
    counted: dict[str, int] = {}
    for stack, count in lines:
        thread = stack.split(";")[0].partition(": ")[2]
        counted[thread] = counted.get(thread, 0) + count
    thread_scale: dict[str, float] = {}
    for thread, count in counted.items():
        cpu_ms = on_cpu_ms.get(PY_SPY_THREADS.get(thread, ""))
        if args.profile == "cpu" and cpu_ms is not None and requests:
            thread_scale[thread] = cpu_ms * 1000 / requests / count
        else:
            thread_scale[thread] = 1e6 / args.profile_rate / requests if requests else 0.0
    threads: dict[str, float] = {}
    functions: dict[str, float] = {}
    modules: dict[str, float] = {}
    for stack, count in lines:
        frames = stack.split(";")
        thread = frames[0].partition(": ")[2] or frames[0]
        us = count * thread_scale[thread]
        threads[thread] = threads.get(thread, 0.0) + us
        leaf = f"{thread}: {frames[-1]}"
        functions[leaf] = functions.get(leaf, 0.0) + us
        if thread == "MainThread":
            seen = set()
            for frame in frames[1:]:
                module = frame.rpartition("(")[2].rstrip(")")
                if module.startswith("eyewall/") and module not in seen:
                    seen.add(module)
                    modules[module] = modules.get(module, 0.0) + us
    top = sorted(functions.items(), key=lambda item: -item[1])[:25]
    return {
        "kind": args.profile,
        "us_per_request_by_thread": {k: round(v, 2) for k, v in threads.items()},
        "top_self_us_per_request": {k: round(v, 2) for k, v in top},
        "main_inclusive_us_per_request_by_module": {
            k: round(v, 2) for k, v in sorted(modules.items(), key=lambda item: -item[1])
        },
    }


def latency_stats(timed: dict[str, Any], command: str) -> dict[str, Any]:
    latencies = sorted(latency for _, latency in timed["samples"])
    seconds = timed["end"] - timed["start"]

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": pick(0.5),
        "p90_ms": pick(0.9),
        "p99_ms": pick(0.99),
        "errors_total": timed["errors"],
        "command": command,
    }


CAUSES = ("other processes", "own writer threads", "gc", "periodic loop work", "asleep")


def attribute_requests(samples: list[list[float]], probe: dict[str, Any]) -> dict[str, Any]:
    """The slowest 1% of requests laid beside what the proxy did meanwhile.

    For each request [sent, sent + latency], from the lag sampler's records
    (proportionally to how much of each sample's span overlaps it): time the
    loop thread waited for a CPU while the writer threads ran (own writer
    threads), the rest of its CPU wait (other processes on its core), and time
    it slept although it was late (asleep: GIL or lock waits); plus the overlap
    with collections and with the loop's periodic work (flushes, live tick,
    watchdog sweep). A request's cause is its largest component; `unexplained`
    when none reaches a third of its excess over the median. The same overlaps
    for a sample of all requests give the base rates."""
    interval = probe["settings"]["lag_interval"]
    spans = sorted(
        (woke - interval - late, woke, rest) for woke, late, *rest in probe["lag"] if len(rest) == 3
    )
    starts = [span[0] for span in spans]
    gcs = [(at, at + duration) for _, at, duration, _ in probe["gc"]]
    calls = [(at, at + duration) for _, at, duration in probe["calls"]]
    busy = [(at, at + duration) for _, at, duration in probe["busy"]]

    def components(t0: float, t1: float) -> dict[str, float]:
        out = dict.fromkeys(CAUSES, 0.0)
        out["writers busy"] = 0.0
        index = max(0, bisect.bisect_left(starts, t0 - 1.0))
        while index < len(spans) and spans[index][0] < t1:
            s0, s1, (on_cpu, waiting, writers) = spans[index]
            index += 1
            share = overlap(t0, t1, s0, s1) / (s1 - s0) if s1 > s0 else 0.0
            if share <= 0:
                continue
            own = min(waiting, writers)
            out["own writer threads"] += own * share
            out["other processes"] += (waiting - own) * share
            late = max(0.0, (s1 - s0) - interval)
            out["asleep"] += min(late, max(0.0, (s1 - s0) - on_cpu - waiting)) * share
        out["gc"] = sum(overlap(t0, t1, a, b) for a, b in gcs)
        out["periodic loop work"] = sum(overlap(t0, t1, a, b) for a, b in calls)
        out["writers busy"] = sum(overlap(t0, t1, a, b) for a, b in busy)
        return {key: value * 1000 for key, value in out.items()}

    ordered = sorted(samples, key=lambda sample: sample[1])
    if not ordered:
        return {}
    median = ordered[len(ordered) // 2][1] * 1000
    slow = ordered[int(len(ordered) * 0.99) :]
    every = ordered[:: max(1, len(ordered) // 2000)]
    result: dict[str, Any] = {"slow": len(slow), "median_ms": median}
    dominant: dict[str, int] = {}
    for name, group in (("slow", slow), ("all", every)):
        sums: dict[str, float] = {}
        touched: dict[str, int] = {}
        for sent, latency in group:
            parts = components(sent, sent + latency)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
                touched[key] = touched.get(key, 0) + (value > 0.2)
            if name == "slow":
                excess = latency * 1000 - median
                cause = max(CAUSES, key=lambda c: parts[c])
                cause = cause if parts[cause] >= excess / 3 else "unexplained"
                dominant[cause] = dominant.get(cause, 0) + 1
        result[f"{name}_mean_ms"] = {k: round(v / len(group), 3) for k, v in sums.items()}
        result[f"{name}_touched"] = {k: round(v / len(group), 3) for k, v in touched.items()}
    result["slow_mean_latency_ms"] = statistics.fmean(lat for _, lat in slow) * 1000
    result["dominant"] = dominant
    return result


def run_once(
    variant: Variant, ctx: BenchContext, cpu: int | None, index: int, args: argparse.Namespace
) -> dict[str, Any]:
    workdir = ctx.workdir / f"{variant.name}-{index}"
    probe_out = workdir / "probe.json"
    system = ProbedEyewall(variant, probe_out)
    env = {"EYEWALL_PROBE_OUT": str(probe_out), "EYEWALL_PROBE_LAG_MS": str(args.lag_ms)}
    env.update(variant.env)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        process = system.start(workdir, (port := free_port()), cpu)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    target = Target(system.name, port, process)
    timed: dict[str, Any] | None = None
    try:
        if args.client == "wrk":
            http_load.run_wrk(ctx, target, args.connections, args.warmup)
            before = cpu_times_ms(process.pid)
            profiler = start_py_spy(args, process.pid, workdir)
            start = time.monotonic()
            stats = http_load.run_wrk(ctx, target, args.connections, args.duration)
            end = time.monotonic()
            after = cpu_times_ms(process.pid)
            if profiler is not None:
                profiler.wait(timeout=60)
        else:
            timed_out = workdir / "timed.json"
            origin = f"127.0.0.1:{ctx.origins.nginx_port}"
            command = [sys.executable, str(TIMED_CLIENT), str(port), origin, f"/{SMALL_FILE}"]
            command += [str(args.connections), str(args.duration), str(args.warmup)]
            client = subprocess.Popen(pinned([*command, str(timed_out)], ctx.load_cpu))
            time.sleep(args.warmup)
            before = cpu_times_ms(process.pid)
            client.wait(timeout=args.duration + args.warmup + 60)
            after = cpu_times_ms(process.pid)
            timed = json.loads(timed_out.read_text())
            start, end = timed["start"], timed["end"]
            stats = latency_stats(timed, shlex.join(command))
    finally:
        process.stop(grace=10)
    probe = json.loads(probe_out.read_text()) if probe_out.exists() else None
    result: dict[str, Any] = {
        "variant": variant.name,
        "run": index,
        "requests_per_s": stats["requests_per_s"],
        "p50_ms": stats["p50_ms"],
        "p90_ms": stats["p90_ms"],
        "p99_ms": stats["p99_ms"],
        "p99_over_p50": stats["p99_ms"] / stats["p50_ms"] if stats["p50_ms"] else None,
        "errors": stats["errors_total"],
        "command": stats["command"],
        "start_command": " ".join(system.last_command),
    }
    result["threads"] = {
        name: {
            "run_ms": run - before.get(name, (0.0, 0.0))[0],
            "wait_ms": wait - before.get(name, (0.0, 0.0))[1],
        }
        for name, (run, wait) in after.items()
    }
    if args.profile and (workdir / "py-spy.txt").exists():
        on_cpu = {name: times["run_ms"] for name, times in result["threads"].items()}
        result["profile"] = read_py_spy(workdir / "py-spy.txt", args, stats, on_cpu)
    if probe is not None:
        result["probe_settings"] = probe["settings"]
        result.update(analyse(probe, start, end, args.stall_ms))
        if timed is not None:
            result["slow_requests"] = attribute_requests(timed["samples"], probe)
    else:
        result["probe"] = "no probe output: " + process.log_tail()
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if isinstance(run.get(key), (int, float))]
    return statistics.median(values) if values else None


def span(runs: list[dict[str, Any]], key: str, digits: int = 2) -> str:
    values = sorted(run[key] for run in runs if isinstance(run.get(key), (int, float)))
    if not values:
        return "—"
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({values[0]:.{digits}f}-{values[-1]:.{digits}f})"


def summary(
    results: list[dict[str, Any]], variants: list[Variant], args: argparse.Namespace
) -> str:
    lines = [
        f"wrk -t1 -c{args.connections} -d{args.duration}s, {args.runs} runs per variant, "
        f"nice {args.nice} "
        "(median, and min-max in brackets); CPU wait = ms the proxy's main thread was "
        "runnable but not running (other tenants on its core), per run.",
        "",
        "| variant | req/s | p50 ms | p99 ms | p99/p50 | gc pauses >1 ms /s | gc ms/s "
        "| max gc ms | main-thread CPU wait ms | what |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant.name]
        for run in runs:
            main = run.get("threads", {}).get("main", {})
            run["main_wait_ms"] = main.get("wait_ms")
            run["max_gc_ms"] = max(run.get(f"gc{g}_ms_max", 0.0) for g in (0, 1, 2))
        lines.append(
            f"| {variant.name} | {span(runs, 'requests_per_s', 0)} | {span(runs, 'p50_ms')} "
            f"| {span(runs, 'p99_ms')} | {span(runs, 'p99_over_p50', 1)} "
            f"| {span(runs, 'gc_pauses_over_1ms_per_s', 1)} | {span(runs, 'gc_ms_per_s', 1)} "
            f"| {span(runs, 'max_gc_ms', 1)} | {span(runs, 'main_wait_ms', 0)} | {variant.what} |"
        )
    if args.lag_ms > 0:
        lines += [
            "",
            f"Event-loop lateness (a task sleeping {args.lag_ms:g} ms); stalls = samples "
            f"≥ {args.stall_ms:g} ms late; causes = what overlapped each stall "
            "(count, summed lateness ms), summed over the runs:",
            "",
            "| variant | lag p50 ms | lag p99 ms | lag max ms | stalls/s "
            "| stalled spans: on CPU / waiting for CPU / asleep (ms) | causes |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant in variants:
            runs = [r for r in results if r["variant"] == variant.name]
            counts: dict[str, int] = {}
            ms: dict[str, float] = {}
            split = {"on_cpu": 0.0, "cpu_wait": 0.0, "asleep": 0.0}
            for run in runs:
                for key in split:
                    split[key] += run.get("stall_split_ms", {}).get(key, 0.0)
                run["stalls_per_s"] = run.get("stalls", 0) / run.get("seconds", 1)
                for cause, n in run.get("stall_causes", {}).items():
                    counts[cause] = counts.get(cause, 0) + n
                    ms[cause] = ms.get(cause, 0.0) + run["stall_cause_ms"][cause]
            causes = ", ".join(
                f"{cause} {counts[cause]} ({ms[cause]:.0f} ms)"
                for cause in sorted(counts, key=lambda c: -ms[c])
            )
            lines.append(
                f"| {variant.name} | {span(runs, 'lag_p50_ms')} | {span(runs, 'lag_p99_ms')} "
                f"| {span(runs, 'lag_max_ms', 1)} | {span(runs, 'stalls_per_s', 1)} "
                f"| {split['on_cpu']:.0f} / {split['cpu_wait']:.0f} / {split['asleep']:.0f} "
                f"| {causes} |"
            )
    if args.client == "timed":
        lines += slow_request_table(results, variants)
    if args.profile:
        lines += profile_table(results, variants)
    return "\n".join(lines) + "\n"


def profile_table(results: list[dict[str, Any]], variants: list[Variant]) -> list[str]:
    """Mean over the runs of py-spy's µs per request."""
    lines = []
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant.name]
        profiles = [r["profile"] for r in runs if "profile" in r]
        if not profiles:
            continue
        kind = profiles[0]["kind"]
        lines += ["", f"py-spy ({kind}) for `{variant.name}`, µs per request, mean of "
                  f"{len(profiles)} runs:", ""]  # fmt: skip
        for key, title in (
            ("us_per_request_by_thread", "thread"),
            ("top_self_us_per_request", "function (self)"),
            ("main_inclusive_us_per_request_by_module", "main-thread module (inclusive)"),
        ):
            merged: dict[str, float] = {}
            for profile in profiles:
                for name, value in profile[key].items():
                    merged[name] = merged.get(name, 0.0) + value / len(profiles)
            ranked = sorted(merged.items(), key=lambda item: -item[1])[:20]
            lines += [f"| {title} | µs/request |", "|---|---|"]
            lines += [f"| {name} | {value:.1f} |" for name, value in ranked]
            lines.append("")
    return lines


def slow_request_table(results: list[dict[str, Any]], variants: list[Variant]) -> list[str]:
    keys = [*CAUSES, "writers busy"]
    lines = [
        "",
        "The slowest 1% of requests (bench/timed_client.py), summed over the runs: the "
        "share whose largest component is each cause, then the mean ms per slow request "
        "(and per request of a sample of all requests) that overlapped: "
        + ", ".join(keys)
        + ". `writers busy` = a writer thread was working on a batch (it overlaps the "
        "other causes).",
        "",
        "| variant | slow requests | their mean ms | largest cause (share) "
        "| mean ms per slow request | mean ms per request |",
        "|---|---|---|---|---|---|",
    ]
    for variant in variants:
        runs = [r["slow_requests"] for r in results if r["variant"] == variant.name]
        runs = [r for r in runs if r]
        if not runs:
            continue
        slow = sum(r["slow"] for r in runs)
        dominant: dict[str, int] = {}
        for r in runs:
            for cause, n in r["dominant"].items():
                dominant[cause] = dominant.get(cause, 0) + n
        shares = ", ".join(
            f"{cause} {n / slow:.0%}" for cause, n in sorted(dominant.items(), key=lambda x: -x[1])
        )
        mean_latency = sum(r["slow_mean_latency_ms"] * r["slow"] for r in runs) / slow

        def means(kind: str, group: list[dict[str, Any]] = runs) -> str:
            return " / ".join(
                f"{statistics.fmean(r[f'{kind}_mean_ms'].get(k, 0.0) for r in group):.2f}"
                for k in keys
            )

        lines.append(
            f"| {variant.name} | {slow} | {mean_latency:.2f} | {shares} "
            f"| {means('slow')} | {means('all')} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default=",".join(BY_NAME), help=",".join(BY_NAME))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--duration", type=int, default=10, help="seconds of measured wrk")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--client",
        choices=("wrk", "timed"),
        default="wrk",
        help="wrk (the harness's), or bench/timed_client.py, which records every request "
        "so the slowest 1%% can be attributed (needs --lag-ms)",
    )
    parser.add_argument("--lag-ms", type=float, default=0.0, help="lag sampler period (0: off)")
    parser.add_argument(
        "--profile",
        choices=("cpu", "gil"),
        default=None,
        help="py-spy over the measured wrk run: cpu (running threads) or gil (GIL holder)",
    )
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples/s")
    parser.add_argument("--stall-ms", type=float, default=3.0, help="lateness counted as stall")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness for this script and everything it starts (proxy, nginx, wrk); "
        "e.g. -10 on a shared machine, so other tenants' processes preempt them less",
    )
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="directory for the results")
    parser.add_argument("--keep-workdir", action="store_true", help="keep probe files and logs")
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = set(names) - set(BY_NAME)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(BY_NAME)}")
    variants = [BY_NAME[name] for name in names]
    if args.client == "timed" and args.lag_ms <= 0:
        parser.error("--client timed needs --lag-ms (e.g. 2)")
    install_cleanup_handlers()
    os.sched_setaffinity(0, {args.load_cpu})
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    workdir = Path(tempfile.mkdtemp(prefix="eyewall-stalls-"))
    workdir.chmod(0o755)  # nginx's worker drops root and must read the files
    output = args.output or workdir
    results: list[dict[str, Any]] = []
    try:
        origins = start_origins(workdir / "origins", free_port(), args.load_cpu)
        ctx = BenchContext(Settings(), origins, args.load_cpu, workdir)
        for index in range(args.runs):
            for variant in variants:
                result = run_once(variant, ctx, args.proxy_cpu, index, args)
                results.append(result)
                if result["errors"]:
                    raise RuntimeError(f"{variant.name}: {result['errors']} errors")
                print(
                    f"{variant.name} #{index}: {result['requests_per_s']:.0f} req/s "
                    f"p50 {result['p50_ms']:.2f} p99 {result['p99_ms']:.2f} ms "
                    f"gc>1ms/s {result.get('gc_pauses_over_1ms_per_s', 0):.1f} "
                    f"stalls {result.get('stalls', '-')}",
                    flush=True,
                )
    finally:
        stop_all()
    output.mkdir(parents=True, exist_ok=True)
    text = summary(results, variants, args)
    (output / "loop-stalls.md").write_text(text)
    (output / "loop-stalls.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)
    print(f"wrote {output}/loop-stalls.md and .json", flush=True)
    if args.output is not None and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"probe files and logs in {workdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
