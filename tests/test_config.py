"""Loading settings: every problem at once with its key and line, nearest-key hints,
paths relative to the file, the exposure checks, and what a reload cannot change."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from eyewall.app import Loader, build_policy, preflight
from eyewall.config import (
    ConfigError,
    annotate,
    iter_settings,
    load_settings,
    locate,
    restart_settings,
)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def test_every_problem_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "eyewall.toml"
    path.write_text(
        'log_level = "loud"\n'
        "[timeouts]\n"
        "client_header = -1\n"
        "keepalive_idel = 3\n"
        "[limits]\n"
        'max_connections = "many"\n'
    )
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    errors = raised.value.errors
    assert len(errors) == 4, errors
    assert errors[0].startswith(f"{path}:1: log_level:")
    assert errors[1].startswith(f"{path}:3: timeouts.client_header: must be greater than 0")
    assert errors[2] == (
        f"{path}:4: timeouts.keepalive_idel: unknown setting (did you mean"
        " timeouts.keepalive_idle?)"
    )
    assert errors[3].startswith(f"{path}:6: limits.max_connections: must be an integer")


def test_unknown_sections_and_keys_suggest_the_nearest(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[timeout]\nclient_header = 1\n[auth]\nhtpassword = 'x'\nlisten2 = 1\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    text = "\n".join(raised.value.errors)
    assert "timeout: unknown setting (did you mean timeouts?)" in text
    assert "auth.htpassword: unknown setting (did you mean auth.htpasswd?)" in text


def test_relative_paths_in_a_file_are_relative_to_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "eyewall.toml"
    conf.parent.mkdir()
    conf.write_text(
        'access_log = "logs/access.log"\npid_file = "/run/abs.pid"\n'
        'addons = ["addons/a.py"]\n[auth]\nhtpasswd = "htpasswd"\n'
        '[flows]\npath = "../var/flows.sqlite3"\n'
    )
    settings = load_settings(conf, {"tls.ca_dir": "relative-from-cwd"})
    base = conf.parent
    assert settings.access_log == str(base / "logs/access.log")
    assert settings.pid_file == "/run/abs.pid"
    assert settings.addons == (str(base / "addons/a.py"),)
    assert settings.auth.htpasswd == str(base / "htpasswd")
    assert settings.flows.path == str(tmp_path / "var" / "flows.sqlite3")  # normalised
    assert settings.tls.ca_dir == "relative-from-cwd"  # flags are relative to the cwd
    dash = tmp_path / "dash.toml"
    dash.write_text('access_log = "-"\n')
    assert load_settings(dash).access_log == "-"


def test_start_up_problems_are_caught_before_start(tmp_path: Path) -> None:
    """Directories that do not exist, files that cannot be read, unsafe addons: each a
    line naming the key and the line, all at once (check-config says the same)."""
    addon = tmp_path / "addon.py"
    addon.write_text("class A:\n    def request(self, flow):\n        pass\n")
    addon.chmod(0o666)
    conf = tmp_path / "c.toml"
    conf.write_text(
        'access_log = "/nonexistent/eyewall/access.log"\n'
        'pid_file = "missing-dir/eyewall.pid"\n'
        'addons = ["addon.py"]\n'
        "[auth]\n"
        'htpasswd = "no-such-htpasswd"\n'
        "[flows]\n"
        'path = "/nonexistent/flows.sqlite3"\n'
        "[[rules]]\n"
        'id = "x"\n'
        'action = "allow"\n'
        'groups = ["admins"]\n'
    )
    with pytest.raises(ConfigError) as raised:
        Loader(str(conf), {}).load()
    errors = raised.value.errors
    expected = [
        (5, "auth.htpasswd: cannot read"),
        (11, "rules[0].groups: undefined group 'admins'"),
        (1, "access_log: directory /nonexistent/eyewall does not exist"),
        (2, "pid_file: directory"),
        (7, "flows.path: directory /nonexistent does not exist"),
        (3, "addons[0]:"),
    ]
    for line, text in expected:
        assert any(e.startswith(f"{conf}:{line}: {text}") for e in errors), (text, errors)
    assert any("writable by group or others" in e for e in errors)


def test_intercept_rules_need_a_ca(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[tls]\nca_dir = "{tmp_path / "ca"}"\n[[rules]]\nid = "i"\naction = "intercept"\n'
        'hosts = ["x.example"]\n'
    )
    with pytest.raises(ConfigError, match=r"tls\.ca_dir: no interception CA.*eyewall ca init"):
        Loader(str(conf), {}).load()


@pytest.mark.parametrize(
    ("dotted", "line"),
    [
        ("timeouts.body_idle", 3),
        ("rules[1].hosts", 9),
        ("rules[0]", 5),
        ("auth.users.bob", 11),
        ("rules[0].action", 5),  # missing: the line of its table
        ("rules[1].id", 8),
    ],
)
def test_locate_finds_keys_tables_and_array_entries(dotted: str, line: int) -> None:
    text = (
        'listen = ["127.0.0.1:1"]\n[timeouts]\nbody_idle = 3  # s\n\n[[rules]]\nid = "a"\n'
        '[[rules]]\nid = "b"\nhosts = ["x"]\n[auth.users]\nbob = "h"\n'
    )
    assert locate(text, dotted) == line


def test_a_misspelt_table_written_as_a_dotted_key_has_its_line(tmp_path: Path) -> None:
    """``timeout.client_header = 3`` (a dotted key, no ``[timeout]`` header) names its line
    as the table header form does."""
    assert locate('listen = ["127.0.0.1:1"]\ntimeout.client_header = 3\n', "timeout") == 2
    conf = tmp_path / "c.toml"
    conf.write_text('listen = ["127.0.0.1:1"]\n\ntimeout.client_header = 3\n')
    with pytest.raises(ConfigError, match=r"c\.toml:3: timeout: unknown setting"):
        Loader(str(conf), {}).load()


def test_settings_a_reload_cannot_change_are_named() -> None:
    old = load_settings(overrides={"listen": ["127.0.0.1:1"]})
    new = load_settings(
        overrides={"listen": ["127.0.0.1:2"], "admin.listen": "off", "timeouts.body_idle": 5.0}
    )
    assert restart_settings(old, new) == ["listen", "admin.listen"]


def test_listen_and_admin_defaults() -> None:
    settings = load_settings()
    assert [str(e) for e in settings.listen] == ["127.0.0.1:8080"]
    assert settings.admin.listen == "127.0.0.1:8480"  # not 9090, Prometheus's own port
    assert settings.rate_limits.client_connections == 256


# --- configuration checks ----------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", "192.168.1.10:3128"])
def test_listening_beyond_loopback_requires_allow_clients(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"access\.allow_clients: required"):
        load_settings(overrides={"listen": [listen]})
    settings = load_settings(overrides={"listen": [listen], "access.allow_clients": "10.0.0.0/8"})
    assert settings.access.allow_clients == ("10.0.0.0/8",)


def test_loopback_listeners_need_no_allow_clients() -> None:
    assert load_settings(overrides={"listen": ["127.0.0.1:3128", "[::1]:3128", "localhost:1"]})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("access.allow_clients", ["not-a-network"]),
        ("access.allow_clients", ["10.0.0.0/33"]),
        ("access.allow_clients", [{"cidr": "10.0.0.0/8"}]),
        ("access.connect_ports", ["0"]),
        ("access.connect_ports", ["70000"]),
        ("access.connect_ports", ["9-1"]),
        ("access.connect_ports", ["x"]),
        ("access.default", "maybe"),
        ("access.default", True),
        ("access.allow_private", "yes"),
    ],
)
def test_invalid_access_settings_name_the_setting(key: str, value: Any, tmp_path: Path) -> None:
    """Named by the flag when the value came from one, by key and line from a file."""
    flag = {s.path: s.flag for s in iter_settings()}[key]
    with pytest.raises(ConfigError) as raised:
        settings = load_settings(overrides={"access.allow_clients": ["10.0.0.0/8"], key: value})
        build_policy(settings)
    assert raised.value.errors[0].startswith(f"{flag}:") or raised.value.errors[0].startswith(key)
    section, _, name = key.partition(".")
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n# a comment\n{name} = {_toml(value)}\n")
    with pytest.raises(ConfigError) as raised:
        build_policy(load_settings(path))
    message = (
        annotate(raised.value.errors, path)[0]
        if raised.value.errors[0].startswith(key)
        else raised.value.errors[0]
    )
    assert message.startswith(f"{path}:3: {key}:"), message


def test_preflight_warns_of_secrets_others_can_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    users = tmp_path / "htpasswd"
    users.write_text("alice:$2b$04$" + "a" * 53 + "\n")
    conf = tmp_path / "c.toml"
    conf.write_text('[auth]\nhtpasswd = "htpasswd"\n')
    settings = load_settings(str(conf), {})
    users.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="eyewall"):
        assert preflight(settings) == []
    assert not caplog.records
    users.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="eyewall"):
        assert preflight(settings) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"auth.htpasswd: {users} is readable by every local user (mode 0644); chmod o-r it"
    ]


def test_preflight_tells_a_file_from_a_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    settings = load_settings(None, {"access_log": str(tmp_path / "file" / "access.log")})
    assert preflight(settings) == [f"access_log: {tmp_path / 'file'} is not a directory"]


def test_the_config_file_is_watched_only_when_asked(tmp_path: Path) -> None:
    """The user file is re-read when it changes; the config file only with watch_config
    (otherwise an edit waits for SIGHUP, after the operator's check-config)."""
    (tmp_path / "htpasswd").write_text("")
    conf = tmp_path / "c.toml"
    conf.write_text('[auth]\nhtpasswd = "htpasswd"\n')
    loader = Loader(str(conf), {})
    settings = load_settings(str(conf), {})
    assert loader.watched_files(settings) == [str(tmp_path / "htpasswd")]
    watching = load_settings(str(conf), {"watch_config": True})
    assert loader.watched_files(watching) == [str(conf), str(tmp_path / "htpasswd")]
    assert Loader(None, {}).watched_files(load_settings(None, {"watch_config": True})) == []


def test_every_problem_of_a_file_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    """A value the schema refuses does not hide the rules' problems, nor a rule that
    fails to compile the duplicate of its id further down."""
    conf = tmp_path / "m.toml"
    conf.write_text(
        "[access]\nallow_private = true\n\n"
        '[[rules]]\nid = "no-secret"\naction = "deny"\nnetworks = ["10.0.0.0/33"]\n\n'
        '[[rules]]\nid = "no-secret"\naction = "deny"\nhosts = ["x"]\n\n'
        '[limits]\nmax_connections = 0\naccess_log = "/nonexistent-dir/x.log"\n'
    )
    with pytest.raises(ConfigError) as e:
        Loader(str(conf), {}).load()
    lines = [error.split(": ", 1)[0] for error in e.value.errors]
    assert lines == [f"{conf}:7", f"{conf}:10", f"{conf}:15", f"{conf}:16"], e.value.errors
    assert "rules[0].networks" in e.value.errors[0]
    assert "duplicate rule id 'no-secret'" in e.value.errors[1]
    assert "limits.max_connections" in e.value.errors[2]
