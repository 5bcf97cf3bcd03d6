"""Docs that run: every fenced code block in README.md and docs/*.md is checked.

    sh, bash   run with bash -euo pipefail, in a scratch directory that links the
               checkout's top-level files (so `examples/...` works and nothing is written
               into the checkout), with `eyewall` on PATH and a scratch HOME
    toml       `eyewall check-config`, then the proxy starts with it (on port 0) and
               must say READY=1: a log path that cannot be opened fails here
    json       parsed
    python     compiled
    haproxy    `haproxy -c`
    yaml       `promtool check config` (Prometheus configuration)

A block that cannot or should not run gets a marker in an HTML comment on the line
before it (the reason shows in pytest's summary of skips):

    <!-- docs-test: skip: needs the internet -->
    <!-- docs-test: fragment -->      (toml: part of a file; parsed, not run)

Any other block without a marker fails test_every_block_is_run_or_marked.
`python tests/test_docs.py` lists the blocks and what happens to each.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNERS = {"sh", "bash", "toml", "json", "python", "haproxy", "yaml"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|fragment)\s*(?::\s*(.*?))?\s*-->")
FENCE = re.compile(r"^(`{3,})\s*([\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence
    lang: str
    text: str
    marker: str  # "", "skip" or "fragment"
    reason: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}:{self.lang or 'plain'}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, lang, start = opening[1], opening[2].lower(), i
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            i += 1
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = MARKER.search(previous)
        found.append(
            Block(
                path,
                start + 1,
                lang,
                "\n".join(lines[start + 1 : i]) + "\n",
                marker[1] if marker else "",
                (marker[2] or "") if marker else "",
            )
        )
        i += 1
    return found


ALL = [b for path in DOCS for b in blocks(path)]


def disposition(block: Block) -> str:
    """What the runner does with a block: "run", "parse", or "skip: reason"."""
    if block.marker == "skip":
        return f"skip: {block.reason or 'no reason given'}"
    if block.marker == "fragment":
        return "parse" if block.lang == "toml" else "skip: a fragment marker is for toml"
    return "run" if block.lang in RUNNERS else f"unmarked {block.lang or 'plain'} block"


def test_every_block_is_run_or_marked():
    bad = [
        f"{b.name}: {disposition(b)}"
        for b in ALL
        if disposition(b).startswith(("unmarked", "skip: no reason", "skip: a fragment"))
    ]
    assert not bad, (
        "give each block a language the runner knows (" + ", ".join(sorted(RUNNERS)) + ")"
        " or a marker such as <!-- docs-test: skip: REASON --> on the line before:\n"
        + "\n".join(bad)
    )


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A working directory that shows the checkout without being it."""
    work = tmp_path / "work"
    work.mkdir()
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (work / entry.name).symlink_to(entry)
    return work


def environment(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("NOTIFY_SOCKET", None)
    return env


def check_toml(block: Block, scratch: Path, tmp_path: Path) -> None:
    try:
        tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as e:
        pytest.fail(f"{block.name}: not TOML: {e}")
    if block.marker == "fragment":
        return
    config = tmp_path / "config.toml"
    config.write_text(block.text)
    env = environment(tmp_path)
    check = subprocess.run(
        [sys.executable, "-m", "eyewall", "check-config", str(config)],
        capture_output=True,
        text=True,
        cwd=scratch,
        env=env,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, f"{block.name}: {check.stderr}"
    # Start it: check-config cannot know whether a log file can be opened.
    name = f"eyewall-docs-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        manager.settimeout(0.25)
        env["NOTIFY_SOCKET"] = "@" + name
        log = tmp_path / "proxy.log"
        with open(log, "wb") as stderr:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "eyewall",
                    "--config",
                    str(config),
                    "--listen",
                    "127.0.0.1:0",
                    "--admin-listen",
                    "127.0.0.1:0",
                ],
                stderr=stderr,
                cwd=scratch,
                env=env,
            )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if b"READY=1" in manager.recv(4096):
                        break
                except TimeoutError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{block.name}: the proxy did not start:\n{log.read_text()}")
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(5)


def run_tool(block: Block, tmp_path: Path, suffix: str, command: list[str]) -> None:
    from tests.tools import require_tool

    tool = require_tool(command[0], {"haproxy": "haproxy", "promtool": "prometheus"}[command[0]])
    path = tmp_path / f"block{suffix}"
    path.write_text(block.text)
    result = subprocess.run(
        [tool, *command[1:], str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"{block.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("block", ALL, ids=lambda b: b.name)
def test_block(block: Block, scratch: Path, tmp_path: Path) -> None:
    what = disposition(block)
    if what.startswith("skip"):
        pytest.skip(f"{block.name}: {what[6:]}")
    if what.startswith("unmarked"):
        pytest.skip(f"{block.name}: unmarked (test_every_block_is_run_or_marked fails)")
    if block.lang in ("sh", "bash"):
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.text],
            capture_output=True,
            text=True,
            cwd=scratch,
            env=environment(tmp_path),
            timeout=120,
            check=False,
        )
        if result.returncode == 127 and "command not found" in result.stderr:
            from tests.tools import tools_required

            if not tools_required():  # as require_tool does for the tests' own tools
                pytest.skip(f"{block.name}: {result.stderr.strip().splitlines()[-1]}")
        assert result.returncode == 0, (
            f"{block.name} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    elif block.lang == "toml":
        check_toml(block, scratch, tmp_path)
    elif block.lang == "json":
        json.loads(block.text)
    elif block.lang == "python":
        compile(block.text, block.name, "exec")
    elif block.lang == "haproxy":
        run_tool(block, tmp_path, ".cfg", ["haproxy", "-c", "-q", "-f"])
    elif block.lang == "yaml":
        run_tool(block, tmp_path, ".yml", ["promtool", "check", "config"])


if __name__ == "__main__":
    for b in ALL:
        print(f"{b.name:<40} {disposition(b)}")
    counts: dict[str, int] = {}
    for b in ALL:
        key = disposition(b).split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
