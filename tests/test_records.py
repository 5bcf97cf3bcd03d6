"""What recorded flows keep of credentials (class 17e): fields and query parameters are
matched by what their names say."""

from __future__ import annotations

import pytest

from eyewall.observe.records import is_credential_field, redact_url


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "Proxy-Authorization",
        "Cookie",
        "cookie2",
        "Set-Cookie",
        "X-Api-Key",
        "x-api_key",
        "X-Auth-Token",
        "X-Amz-Security-Token",
        "X-CSRF-Token",
        "X-Session-Id",
        "Client-Secret",
        "X-Goog-Api-Key",
    ],
)
def test_credential_fields(name: str) -> None:
    assert is_credential_field(name)


@pytest.mark.parametrize(
    "name",
    ["Host", "Accept", "WWW-Authenticate", "Proxy-Authenticate", "Sec-WebSocket-Key", "Referer"],
)
def test_ordinary_fields(name: str) -> None:
    assert not is_credential_field(name)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://a/p?q=1", "http://a/p?q=1"),
        ("http://a/p?access_token=x&q=1", "http://a/p?access_token=[redacted]&q=1"),
        ("http://a/p?q=1&key=k#frag", "http://a/p?q=1&key=[redacted]#frag"),
        (
            "http://a/p?X-Amz-Credential=c&X-Amz-Signature=s",
            "http://a/p?X-Amz-Credential=[redacted]&X-Amz-Signature=[redacted]",
        ),
        ("http://a/p?client%5Fsecret=x", "http://a/p?client%5Fsecret=[redacted]"),
        ("http://u:pw@a/p?token=", "http://***@a/p?token="),
        ("http://a/p?sig", "http://a/p?sig"),
        ("/relative?password=x", "/relative?password=[redacted]"),
        # session ids and tokens under other names and separators (the break-it pass)
        ("http://a/app;jsessionid=S1?x=1", "http://a/app;jsessionid=[redacted]?x=1"),
        ("http://a/?a=1;access_token=S2", "http://a/?a=1;access_token=[redacted]"),
        ("http://a/?jwt=S3", "http://a/?jwt=[redacted]"),
        ("http://a/?PHPSESSID=S4", "http://a/?PHPSESSID=[redacted]"),
        ("http://a/?sid=S5", "http://a/?sid=[redacted]"),
        ("http://a/?ticket=ST-S6", "http://a/?ticket=[redacted]"),
        ("http://a/p;v=2/q?page=3", "http://a/p;v=2/q?page=3"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
