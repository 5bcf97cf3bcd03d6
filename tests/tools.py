"""System tools some tests drive (promtool, logrotate, systemd-analyze, ...).

A missing tool skips its tests with the reason, so a developer's machine without it can
still run the rest; ./scripts/test installs them and sets EYEWALL_REQUIRE_TOOLS=1, and
then a missing tool fails the test instead: CI never skips one silently.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["require_tool", "tools_required"]


def tools_required() -> bool:
    return os.environ.get("EYEWALL_REQUIRE_TOOLS", "") not in ("", "0")


def require_tool(name: str, package: str) -> str:
    """The tool's path; skips (or fails, under EYEWALL_REQUIRE_TOOLS) without it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path:
        return path
    message = f"{name} is not installed (Debian package {package})"
    if tools_required():
        pytest.fail(f"{message}, and EYEWALL_REQUIRE_TOOLS is set")
    pytest.skip(message)
