"""The HAR export's ``host`` filter (API and CLI): hosts as flows record them."""

from __future__ import annotations

import pytest

from eyewall.observe.har import har_query, host_filter


@pytest.mark.parametrize(
    ("given", "recorded"),
    [
        ("Example.COM", "example.com"),
        (" example.com. ", "example.com"),
        ("[::1]", "::1"),
        ("[0:0::1]", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("", ""),
        (None, ""),
    ],
)
def test_a_host_filter_is_spelled_as_recorded(given: str | None, recorded: str) -> None:
    assert host_filter(given) == recorded


def test_no_host_selects_every_host() -> None:
    where, params = har_query(10.0, host_filter(""))
    assert "host" not in where and params == (10.0,)
    where, params = har_query(10.0, host_filter("A.example"))
    assert where.endswith("host = ?") and params == (10.0, "a.example")


def test_connects_are_no_har_entries_refused_or_not() -> None:
    """HAR wants an absolute URL; a CONNECT names an authority (and a refused one is
    recorded as kind http)."""
    from eyewall.observe.har import is_exchange

    base = {"kind": "http", "method": "GET"}
    assert is_exchange(base)
    assert not is_exchange({**base, "method": "CONNECT"})  # refused: kind http
    assert not is_exchange({**base, "kind": "tunnel", "method": "CONNECT"})
    assert not is_exchange({**base, "method": ""})  # a head that named no method
    where, _ = har_query(0.0, "")
    assert "'CONNECT'" in where
