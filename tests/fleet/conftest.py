"""The fleet tests run against real servers: the fixtures of tests/services.py."""

from __future__ import annotations

import pytest

from tests.services import START_TIMES, haproxy, postgres_server, redis_server

__all__ = ["haproxy", "postgres_server", "redis_server"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How long each real server took to start: the fixtures must stay quick."""
    if START_TIMES:
        started = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in START_TIMES.items())
        terminalreporter.write_line(f"fleet servers started in: {started}")
