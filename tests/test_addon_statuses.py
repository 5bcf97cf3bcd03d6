"""Statuses addons may give a response (RFC 9110 §15): only final ones.  A 1xx is an
interim response and cannot end an exchange (§15.2), so setting one raises, from
``flow.response.status`` and from ``flow.respond()`` alike."""

from __future__ import annotations

import pytest

from eyewall.addons.api import HTTPFlow, Response, final_status
from eyewall.flow import Flow
from eyewall.http1.parse import Headers, ResponseHead


def response() -> Response:
    return Response(ResponseHead("HTTP/1.1", 200, "OK", Headers([("Content-Length", "5")])))


def flow() -> HTTPFlow:
    return HTTPFlow(Flow("t-1", "http", ("127.0.0.1", 1), 0.0))


@pytest.mark.parametrize("status", [100, 101, 102, 103, 150, 199])
def test_an_interim_status_is_refused_with_the_reason(status):
    r = response()
    with pytest.raises(ValueError, match=r"interim \(1xx\).*RFC 9110 §15\.2"):
        r.status = status
    assert r.status == 200
    f = flow()
    with pytest.raises(ValueError, match=r"interim \(1xx\)"):
        f.respond(status, {}, b"x")
    assert f.answer is None


@pytest.mark.parametrize("status", [0, 99, 600, 1000, -200])
def test_a_status_outside_the_codes_is_refused(status):
    with pytest.raises(ValueError, match="invalid status"):
        final_status(status)


@pytest.mark.parametrize("status", [200, 204, 304, 404, 599])
def test_final_statuses_are_taken(status):
    r = response()
    r.status = status
    assert r.status == status
    f = flow()
    f.respond(status, {"X-A": "1"}, "body")
    assert f.answer is not None and f.answer.status == status
