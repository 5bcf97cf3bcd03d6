"""End-to-end tests: the proxy as users run it, a subprocess (``python -m eyewall``) with
real clients and origins.  All are marked ``slow``: ``pytest -m "not slow"`` runs the
in-process suite alone in seconds; ``./scripts/test`` runs everything."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
