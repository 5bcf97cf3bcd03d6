"""Unit tests for eyewall.http1.target: the request targets a forward proxy accepts
(RFC 9112 §3.2) and the authority it connects to."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eyewall.http1.parse import ParseError
from eyewall.http1.target import (
    Target,
    TargetError,
    canonical_host,
    parse_authority,
    parse_target,
    redact_userinfo,
)
from tests.http1.scaling import LINEAR, doubling_ratio

LONG_HOST = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters, the longest name

# method, target, (scheme, host, port, authority, path)
VALID = [
    ("GET", "http://example.com/", ("http", "example.com", 80, "example.com", "/")),
    ("GET", "http://example.com:8080/x", ("http", "example.com", 8080, "example.com:8080", "/x")),
    ("GET", "https://example.com/", ("https", "example.com", 443, "example.com", "/")),
    ("GET", "https://example.com:8443/", ("https", "example.com", 8443, "example.com:8443", "/")),
    ("GET", "http://127.0.0.1:8080/", ("http", "127.0.0.1", 8080, "127.0.0.1:8080", "/")),
    ("GET", "http://[::1]/", ("http", "::1", 80, "[::1]", "/")),
    (
        "GET",
        "http://[2001:db8::1]:8080/p",
        ("http", "2001:db8::1", 8080, "[2001:db8::1]:8080", "/p"),
    ),
    ("GET", "http://[2001:DB8::A]/", ("http", "2001:db8::a", 80, "[2001:db8::a]", "/")),
    ("GET", "http://[::ffff:10.0.0.1]/", ("http", "10.0.0.1", 80, "10.0.0.1", "/")),
    ("GET", "HTTP://EXAMPLE.COM/Path", ("http", "example.com", 80, "example.com", "/Path")),
    ("GET", "HtTpS://Ex.Com:444/", ("https", "ex.com", 444, "ex.com:444", "/")),
    ("GET", "http://example.com", ("http", "example.com", 80, "example.com", "/")),
    ("GET", "http://example.com?q", ("http", "example.com", 80, "example.com", "/?q")),
    ("GET", "http://example.com:81?q=1", ("http", "example.com", 81, "example.com:81", "/?q=1")),
    ("GET", "http://[::1]?q", ("http", "::1", 80, "[::1]", "/?q")),
    ("OPTIONS", "http://example.com", ("http", "example.com", 80, "example.com", "*")),
    ("OPTIONS", "http://example.com:81", ("http", "example.com", 81, "example.com:81", "*")),
    ("OPTIONS", "http://[::1]", ("http", "::1", 80, "[::1]", "*")),
    ("OPTIONS", "http://example.com/", ("http", "example.com", 80, "example.com", "/")),
    ("OPTIONS", "http://example.com?q", ("http", "example.com", 80, "example.com", "/?q")),
    (
        "GET",
        "http://e.com/a%20b?c=%2F+d&e=%zz",
        ("http", "e.com", 80, "e.com", "/a%20b?c=%2F+d&e=%zz"),
    ),
    ("GET", "http://e.com/A/./b/../C//d?", ("http", "e.com", 80, "e.com", "/A/./b/../C//d?")),
    ("GET", "http://e.com/p@q:r", ("http", "e.com", 80, "e.com", "/p@q:r")),
    ("GET", "http://under_score.test/", ("http", "under_score.test", 80, "under_score.test", "/")),
    ("GET", "http://e.com:65535/", ("http", "e.com", 65535, "e.com:65535", "/")),
    ("GET", "http://e.com:1/", ("http", "e.com", 1, "e.com:1", "/")),
    ("GET", f"http://{LONG_HOST}/", ("http", LONG_HOST, 80, LONG_HOST, "/")),
    ("CONNECT", "example.com:443", ("", "example.com", 443, "example.com:443", "")),
    ("CONNECT", "EXAMPLE.com:8443", ("", "example.com", 8443, "example.com:8443", "")),
    ("CONNECT", "[::1]:443", ("", "::1", 443, "[::1]:443", "")),
    ("CONNECT", "10.0.0.1:22", ("", "10.0.0.1", 22, "10.0.0.1:22", "")),
]


@pytest.mark.parametrize(("method", "target", "expected"), VALID)
def test_valid_targets(method, target, expected):
    t = parse_target(method, target)
    assert (t.scheme, t.host, t.port, t.authority, t.path) == expected


# method, target, origin_form
ERRORS = [
    ("GET", "/x", True),
    ("GET", "/", True),
    ("OPTIONS", "*", True),
    ("GET", "*", True),
    ("GET", "http://e.com/#frag", False),
    ("GET", "http://e.com/p#", False),
    ("GET", "http://e.com#", False),
    ("GET", "http://user@e.com/", False),
    ("GET", "http://user:pw@e.com:80/", False),
    ("GET", "http://@e.com/", False),
    ("GET", "http://e.com:0/", False),
    ("GET", "http://e.com:00/", False),
    ("GET", "http://e.com:65536/", False),
    ("GET", "http://e.com:99999/", False),
    ("GET", "http://e.com:123456/", False),
    ("GET", "http://e.com:8o/", False),
    ("GET", "http://e.com:-1/", False),
    ("GET", "http://e.com: 80/", False),
    ("GET", "http://e.com:80:80/", False),
    ("GET", "http://[::1/", False),
    ("GET", "http://[::1", False),
    ("GET", "http://[::g]/", False),
    ("GET", "http://[1.2.3.4]/", False),
    ("GET", "http://[::1]x/", False),
    ("GET", "http://[]/", False),
    ("GET", "http://::1/", False),
    ("GET", "http://[fe80::1%25eth0]/", False),
    ("GET", "http://[fe80::1%eth0]:80/", False),
    ("GET", "http://-e.com/", False),
    ("GET", "http://e.com-/", False),
    ("GET", "http://.e.com/", False),
    ("GET", "http://a..b/", False),
    ("GET", "http://a.b../", False),
    ("GET", "http:///p", False),
    ("GET", "http://", False),
    ("GET", "http://:80/", False),
    ("GET", "http://?q", False),
    ("GET", "http://e com/", False),
    ("GET", "http://ex\u00e4mple.com/", False),
    ("GET", f"http://{LONG_HOST}b/", False),
    ("GET", "ftp://e.com/", False),
    ("GET", "ws://e.com/", False),
    ("GET", "wss://e.com/", False),
    ("GET", "e.com/", False),
    ("GET", "http:/e.com/", False),
    ("GET", "http:e.com", False),
    ("GET", "", False),
    ("CONNECT", "e.com", False),
    ("CONNECT", "e.com:", False),
    ("CONNECT", ":443", False),
    ("CONNECT", "e.com:0", False),
    ("CONNECT", "e.com:65536", False),
    ("CONNECT", "http://e.com:443", False),
    ("CONNECT", "u@e.com:443", False),
    ("CONNECT", "[::1]", False),
    ("CONNECT", "::1:443", False),
    ("CONNECT", "e.com:443/", False),
    ("CONNECT", "/x", False),
]


@pytest.mark.parametrize(("method", "target", "origin_form"), ERRORS)
def test_invalid_targets(method, target, origin_form):
    with pytest.raises(TargetError) as info:
        parse_target(method, target)
    assert info.value.origin_form is origin_form
    assert info.value.status == 400
    assert isinstance(info.value, ParseError)


def test_a_trailing_dot_names_the_same_host():
    # RFC 3986 §3.2.2 allows it and DNS resolves "e.com." as "e.com": rules and the pool
    # must see one host, while the origin still gets the Host the client wrote.
    for target in ("http://e.com./x", "http://E.com.:8080/x"):
        t = parse_target("GET", target)
        assert t.host == "e.com"
        assert t.authority.startswith("e.com.")
    assert parse_target("CONNECT", "e.com.:443").host == "e.com"


@pytest.mark.parametrize("scheme", ["http\u017f", "HTTP\u017f"])
def test_non_ascii_scheme_is_a_target_error(scheme):
    # U+017F LATIN SMALL LETTER LONG S case-folds to "s".
    with pytest.raises(TargetError):
        parse_target("GET", f"{scheme}://example.com/")


def test_parse_authority_ports():
    assert parse_authority("e.com", default_port=80).port == 80
    assert parse_authority("e.com:81", default_port=80).port == 81
    assert parse_authority("[::1]", default_port=443).authority == "[::1]"
    with pytest.raises(TargetError, match="no port"):
        parse_authority("e.com")
    with pytest.raises(TargetError, match="host:port"):
        parse_authority("e.com", default_port=80, require_port=True)


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("HTTP://A.com:81/p?q", "http://a.com:81/p?q"),
        ("https://[::1]", "https://[::1]/"),
        ("http://10.1.2.3/", "http://10.1.2.3/"),
    ],
)
def test_target_url(target, url):
    assert parse_target("GET", target).url() == url


def test_connect_target_url_is_the_authority():
    assert parse_target("CONNECT", "A.com:443").url() == "a.com:443"


# -- properties ---------------------------------------------------------------------------

LABEL = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=12).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)
HOST = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
PATH = st.sampled_from(["", "/", "?q", "/a/b?c=d&e", "/%7Euser/+x?y=%zz"]) | st.text(
    string.ascii_letters + string.digits + "/?%+=&;:@!$'()*,-._~", max_size=30
).map(lambda s: "/" + s)


def expected_path(method: str, path: str) -> str:
    if path.startswith("/"):
        return path
    return ("*" if method == "OPTIONS" and not path else "/") + path


@settings(max_examples=300, database=None)
@given(
    st.sampled_from(["http", "https", "HTTP", "Https"]),
    HOST,
    st.none() | st.integers(1, 65535),
    PATH,
    st.sampled_from(["GET", "OPTIONS", "POST"]),
)
def test_generated_targets(scheme, host, port, path, method):
    authority = host if port is None else f"{host}:{port}"
    t = parse_target(method, f"{scheme}://{authority}{path}")
    default = 443 if scheme.lower() == "https" else 80
    assert t.scheme == scheme.lower()
    written = canonical_host(host.lower())  # an address in its one spelling ("0": 0.0.0.0)
    assert t.host == written
    assert t.port == (default if port is None else port)
    assert t.authority == (written if port is None else f"{written}:{port}")
    assert t.path == expected_path(method, path)
    # The general parser (parse_authority) agrees with the fast path.
    slow = parse_authority(authority, default_port=default)
    assert (slow.host, slow.port, slow.authority) == (t.host, t.port, t.authority)
    if port is None:
        # An empty port sends the target down the general path: same result.
        assert parse_target(method, f"{scheme}://{host}:{path}") == t


ANY_HOST = st.text(string.ascii_letters + string.digits + "-._", min_size=0, max_size=20)


@settings(max_examples=300, database=None)
@given(ANY_HOST, st.none() | st.integers(0, 70000), st.sampled_from(["", "/", "?x", "/p"]))
def test_fast_and_general_paths_accept_the_same_hosts(host, port, path):
    authority = host if port is None else f"{host}:{port}"
    try:
        general: Target | None = parse_authority(authority, default_port=80)
    except TargetError:
        general = None
    try:
        t: Target | None = parse_target("GET", f"http://{authority}{path}")
    except TargetError:
        t = None
    if general is None:
        assert t is None
    else:
        assert t is not None
        assert (t.host, t.port, t.authority) == (general.host, general.port, general.authority)


FRAGMENTS = [
    "http://",
    "HTTPS://",
    "ftp://",
    "[",
    "]",
    ":",
    "::1",
    "%25",
    "@",
    "#",
    "/",
    "?",
    "a",
    "Z",
    "0",
    "-",
    ".",
    "80",
    "65536",
    "*",
    " ",
    "\u00e9",
    "\u017f",
    "\u212a",
]
ANY_TARGET = st.text(max_size=60) | st.lists(st.sampled_from(FRAGMENTS), max_size=15).map("".join)


@settings(max_examples=500, database=None)
@given(st.sampled_from(["GET", "OPTIONS", "CONNECT"]), ANY_TARGET)
def test_any_string_parses_or_raises_target_error(method, target):
    try:
        t = parse_target(method, target)
    except TargetError:
        return
    assert t.host == t.host.lower()
    assert 0 < t.port < 65536
    assert t.host in t.authority
    assert (t.path == "") == (method == "CONNECT")


# -- OPTIONS and the asterisk (RFC 9112 §3.2.4) ------------------------------------------

HOSTS = [  # authority, host, port (None: the scheme's default)
    ("e.com", "e.com", None),
    ("E.COM", "e.com", None),
    ("e.com.", "e.com", None),
    ("e.com:8080", "e.com", 8080),
    ("E.com.:8080", "e.com", 8080),
    ("e.com:", "e.com", None),
    ("10.0.0.1", "10.0.0.1", None),
    ("10.0.0.1:81", "10.0.0.1", 81),
    ("[::1]", "::1", None),
    ("[::1]:8080", "::1", 8080),
    ("[2001:DB8::1]", "2001:db8::1", None),
    ("[2001:db8::1]:443", "2001:db8::1", 443),
]
SCHEMES = ["http", "HTTP", "Http", "https", "HTTPS"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("authority", "host", "port"), HOSTS)
@pytest.mark.parametrize(
    ("rest", "path"),
    [("", "*"), ("?x", "/?x"), ("?", "/?"), ("/", "/"), ("/*", "/*"), ("/?x", "/?x")],
)
def test_options_to_an_empty_path_asks_for_asterisk(scheme, authority, host, port, rest, path):
    # "OPTIONS http://host:port" goes on as "OPTIONS *"; with a query there is a path
    # to send, "/" (RFC 9112 §3.2.1); any other method gets "/" for an empty path.
    t = parse_target("OPTIONS", f"{scheme}://{authority}{rest}")
    if port is None:
        port = 443 if scheme.lower() == "https" else 80
    assert (t.scheme, t.host, t.port, t.path) == (scheme.lower(), host, port, path)
    assert t.authority == authority.lower().removesuffix(":")
    other = parse_target("GET", f"{scheme}://{authority}{rest}")
    assert other.path == ("/" if path == "*" else path)


def test_options_asterisk_is_origin_form_at_a_proxy():
    with pytest.raises(TargetError) as info:
        parse_target("OPTIONS", "*")
    assert info.value.origin_form


# -- redacting userinfo for logs -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://user:pass@host/", "http://***@host/"),
        ("HTTPS://u:p@h:8443/x?y@z#f", "HTTPS://***@h:8443/x?y@z#f"),
        ("http://u:p@ss@word@h/", "http://***@h/"),
        ("http://u:p a s s@h?q", "http://***@h?q"),
        ("http://@h/", "http://***@h/"),
        ("http://u:p@[::1]:80", "http://***@[::1]:80"),
        ("http://u:p@h#x@y", "http://***@h#x@y"),
        ("http://u:p@h\\x@y", "http://***@h\\x@y"),
        ("ftp://u:p@h/", "ftp://***@h/"),
        ("user:pw@host:443", "***@host:443"),
        ("http://host/p@q:r", "http://host/p@q:r"),
        ("/p@q", "/p@q"),
        ("*", "*"),
        ("http://host/", "http://host/"),
        ("", ""),
        ("@", "***@"),
        ("://@", "://***@"),
        ("a http://u:p@h/ b https://v:q@i c", "a http://***@h/ b https://***@i c"),
        # spellings browsers read as http:// and scheme-relative references
        ("http:\\\\u:S@h/", "http:\\\\***@h/"),
        ("HTTP:/u:S@h/", "HTTP:/***@h/"),
        ("//u:S@h/p", "//***@h/p"),
        ("\\\\u:S@h/p", "\\\\***@h/p"),
        ("/p?next=//u:S@h", "/p?next=//***@h"),
        ("/p?next=http:/u:S@h", "/p?next=http:/***@h"),
    ],
)
def test_redact_userinfo(text, shown):
    assert redact_userinfo(text) == shown


@settings(max_examples=300, database=None)
@given(
    st.sampled_from(["http", "https", "HTTP", "x"]),
    st.text(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:% @", min_size=1),
    HOST,
    PATH,
)
def test_redacted_targets_hold_no_credentials(scheme, userinfo, host, path):
    text = f"{scheme}://{userinfo}@{host}{path}"
    shown = redact_userinfo(text)
    assert shown == f"{scheme}://***@{host}{path}"
    assert redact_userinfo(shown) == shown


@settings(max_examples=500, database=None)
@given(ANY_TARGET)
def test_redact_userinfo_takes_any_text(text):
    shown = redact_userinfo(text)
    assert isinstance(shown, str)
    assert redact_userinfo(shown) == shown
    if "@" not in text:
        assert shown == text


def test_redact_userinfo_takes_linear_time():
    def make(n):
        text = "a://" * n + "@"
        return lambda: redact_userinfo(text)

    assert doubling_ratio(make, 20_000) < LINEAR


SPELLINGS = [  # written, as the proxy reaches it
    ("93.184.215.14", "93.184.215.14"),
    ("1572394766", "93.184.215.14"),
    ("93.12113678", "93.184.215.14"),
    ("0x5db8d70e", "93.184.215.14"),
    ("0x5d.0xb8.0xd7.0x0e", "93.184.215.14"),
    ("0135.0270.0327.016", "93.184.215.14"),
    ("127.1", "127.0.0.1"),
    ("0177.0.0.5", "127.0.0.5"),
    ("0", "0.0.0.0"),
    ("::ffff:127.0.0.5", "127.0.0.5"),
    ("::ffff:7f00:6", "127.0.0.6"),
    ("0:0:0:0:0:0:0:1", "::1"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
    ("example.com", "example.com"),
    ("1.2.3.4.example", "1.2.3.4.example"),
    ("x1", "x1"),
    ("0x", "0x"),
    ("1.2.3.4.5", "1.2.3.4.5"),
]


@pytest.mark.parametrize(("written", "canonical"), SPELLINGS)
def test_an_address_has_one_spelling_in_every_target_form(written: str, canonical: str) -> None:
    """Rules, logs and the proxy's own checks see the address a connection reaches,
    however the client wrote it (inet_aton's forms, IPv4-mapped IPv6)."""
    assert canonical_host(written.lower()) == canonical
    literal = f"[{written}]" if ":" in written else written
    shown = f"[{canonical}]" if ":" in canonical else canonical
    for method, target in (("GET", f"http://{literal}:81/p"), ("CONNECT", f"{literal}:81")):
        t = parse_target(method, target)
        assert (t.host, t.port, t.authority) == (canonical, 81, f"{shown}:81")
    t = parse_target("GET", f"http://{literal}/p")  # the fast path
    assert (t.host, t.authority) == (canonical, shown)
