"""The ``workers`` setting (a number or auto, from TOML or the flag; a restart applies
it) and the supervisor's restart back-off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eyewall.config import ConfigError, Settings, load_settings, restart_settings
from eyewall.workers import worker_count
from eyewall.workers.pool import MAX_BACKOFF, backoff


def test_one_process_by_default() -> None:
    assert worker_count(Settings().workers) == 1


@pytest.mark.parametrize(("text", "expected"), [("workers = 4", 4), ('workers = "auto"', "auto")])
def test_a_number_or_auto_from_a_file(tmp_path: Path, text: str, expected: object) -> None:
    config = tmp_path / "eyewall.toml"
    config.write_text(text + "\n")
    assert load_settings(config).workers == expected


def test_the_flag_gives_a_number_or_auto() -> None:
    assert load_settings(None, {"workers": "3"}).workers == 3
    assert load_settings(None, {"workers": "auto"}).workers == "auto"


def test_auto_is_the_cpus_this_process_may_use() -> None:
    assert worker_count("auto") == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["0", "257", "many", "-1"])
def test_anything_else_is_refused_with_the_flag_named(value: str) -> None:
    with pytest.raises(ConfigError, match=r"--workers: must be a number of processes"):
        load_settings(None, {"workers": value})


def test_a_boolean_is_not_a_count(tmp_path: Path) -> None:
    config = tmp_path / "eyewall.toml"
    config.write_text("workers = true\n")
    with pytest.raises(ConfigError, match="workers"):
        load_settings(config)


def test_a_reload_names_it_as_needing_a_restart() -> None:
    assert restart_settings(Settings(), load_settings(None, {"workers": "2"})) == ["workers"]


def test_backoff_restarts_at_once_then_doubles_to_a_bound() -> None:
    delays = [backoff(n) for n in range(1, 12)]
    assert delays[:5] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert delays[-1] == MAX_BACKOFF
    assert delays == sorted(delays)
