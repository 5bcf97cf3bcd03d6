"""How log lines show a user name: escaped, cut, never able to add a line."""

from __future__ import annotations

from eyewall.proxy.client import SHOWN_USER, shown_user


def test_names_are_escaped_and_cut() -> None:
    assert shown_user(None) == "-"
    assert shown_user("alice") == "alice"
    assert shown_user('a b"c\\d\ne\u2028') == "a\\x20b\\x22c\\x5cd\\x0ae\\xe2\\x80\\xa8"
    long = "x" * 200
    assert shown_user(long) == "x" * SHOWN_USER + "...(200 characters)"
    assert shown_user("y" * SHOWN_USER) == "y" * SHOWN_USER
