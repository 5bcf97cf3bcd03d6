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
        # keys by other names (a break-it pass)
        "Ocp-Apim-Subscription-Key",
        "X-Functions-Key",
        "X-Access-Key",
        "X-Parse-Master-Key",
        # a fourth pass
        "X-Pass",
        "X-Pwd",
    ],
)
def test_credential_fields(name: str) -> None:
    assert is_credential_field(name)


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "Accept",
        "WWW-Authenticate",
        "Proxy-Authenticate",
        "Sec-WebSocket-Key",
        "Referer",
        "Keep-Alive",
        "X-Keyboard-Layout",
        "X-Bypass",
        "Compass",
    ],
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
        # the fragment, where OAuth's implicit grant puts its tokens, and other spellings
        (
            "https://app/cb#access_token=T1&id_token=T2&state=s",
            "https://app/cb#access_token=[redacted]&id_token=[redacted]&state=s",
        ),
        ("https://app/#/route?token=T3", "https://app/#/route?token=[redacted]"),
        ("https://app/j#/cb?code=T7&x=1", "https://app/j#/cb?code=[redacted]&x=1"),
        ("https://app/j#/cb?sig=T8", "https://app/j#/cb?sig=[redacted]"),
        ("https://app/cb?x=1#code=T4", "https://app/cb?x=1#code=[redacted]"),
        ("https://app/#section=2", "https://app/#section=2"),
        ("//u:T5@h/p?pw=T6", "//***@h/p?pw=[redacted]"),
        # array parameters, padded names, other words for secrets (a second break-it pass)
        (
            "http://a/?pw[]=S1&code[]=S2&key[0]=S3",
            "http://a/?pw[]=[redacted]&code[]=[redacted]&key[0]=[redacted]",
        ),
        ("http://a/?pw%20=S4", "http://a/?pw%20=[redacted]"),
        # encoded twice, "+" for a space, OAuth's assertion and PKCE verifier (a fourth)
        (
            "http://a/?user%255Bpw%255D=E1&api+key=E2&x-pass=E3&client-assertion=E4"
            "&code_verifier=E5&q=1",
            "http://a/?user%255Bpw%255D=[redacted]&api+key=[redacted]&x-pass=[redacted]"
            "&client-assertion=[redacted]&code_verifier=[redacted]&q=1",
        ),
        # nested names (a third pass): any part of the name counts
        (
            "http://a/?user[password]=N1&a[b][token]=N2&user%5Bpw%5D=N3&user[name]=bob",
            "http://a/?user[password]=[redacted]&a[b][token]=[redacted]"
            "&user%5Bpw%5D=[redacted]&user[name]=bob",
        ),
        (
            "http://a/?passcode=S5&otp=S6&bearer=S7",
            "http://a/?passcode=[redacted]&otp=[redacted]&bearer=[redacted]",
        ),
        (
            "http://a/?accesskey=S8&privatekey=S9",
            "http://a/?accesskey=[redacted]&privatekey=[redacted]",
        ),
        ("http://a/?hotpot=1&keyboard=2", "http://a/?hotpot=1&keyboard=2"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_long_field_names_are_judged_but_not_cached() -> None:
    """The verdict caches are bounded in count; a name may be as long as a head, so
    only short names are kept (4,096 names of 60 KB each would hold 240 MB)."""
    from eyewall.http1.parse import Headers
    from eyewall.observe import records

    before = (len(records._treatments), len(records._field_verdicts))
    long_names = [f"X-{i}-" + "a" * 10_000 for i in range(20)]
    text = records._heads(Headers([(n, "v") for n in long_names]), credentials=False)
    assert text is not None and text.count("\n") == 19
    assert is_credential_field("X-Token-" + "a" * 10_000)
    assert (len(records._treatments), len(records._field_verdicts)) == before
    assert all(len(n) <= records.CACHED_NAME for n in records._treatments)


def test_fields_carrying_urls_or_authorities_lose_their_credentials() -> None:
    from eyewall.http1.parse import Headers
    from eyewall.observe import records

    heads = records._heads(
        Headers(
            [
                ("Host", "user:H1@127.0.0.1:9901"),
                ("Refresh", "0; url=http://u:H2@h/"),
                ("Link", "<http://h/?access_token=H3>; rel=next"),
                ("Location", "http://h/?sig=H4"),
                ("X-Pass", "H5"),
            ]
        ),
        credentials=False,
    )
    assert heads is not None and not any(f"H{i}" in heads for i in range(1, 6)), heads
    assert "Host: ***@127.0.0.1:9901" in heads
