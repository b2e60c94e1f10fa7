"""The fake Justimmo provider, exercised the way tokend uses it: real HTTP on 127.0.0.1."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from freezegun import freeze_time

from tokend.durations import Duration
from tokend.fake import FakeJustimmo
from tokend.testing import ManualClock

CLIENT, SECRET = "demo-client", "demo-secret"
REDIRECT = "http://127.0.0.1:8765/callback"
START = datetime(2024, 1, 31, 12, 0, tzinfo=UTC)  # + 1 calendar month = 29 February


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def make_fake(clock: ManualClock) -> Iterator[Callable[..., FakeJustimmo]]:
    started: list[FakeJustimmo] = []

    def make(**kwargs: Any) -> FakeJustimmo:
        kwargs.setdefault("clients", {CLIENT: SECRET, "other": "other-secret"})
        kwargs.setdefault("users", {1234: 5678, 42: 4242})
        kwargs.setdefault("clock", clock)
        fake = FakeJustimmo(**kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def fake(make_fake: Callable[..., FakeJustimmo]) -> FakeJustimmo:
    return make_fake()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def token(
    http: requests.Session, fake: FakeJustimmo, auth: bool = True, **data: str
) -> requests.Response:
    if auth:
        data = {"client_id": CLIENT, "client_secret": SECRET, **data}
    return http.post(fake.token_url, data=data, timeout=5)


def refresh(http: requests.Session, fake: FakeJustimmo, rt: str, **extra: str) -> requests.Response:
    return token(http, fake, grant_type="refresh_token", refresh_token=rt, **extra)


def authorize(http: requests.Session, fake: FakeJustimmo, **params: str) -> dict[str, list[str]]:
    query = {"response_type": "code", "client_id": CLIENT, "redirect_uri": REDIRECT, **params}
    r = http.get(fake.authorize_url, params=query, allow_redirects=False, timeout=5)
    assert r.status_code == 302, r.text
    location = r.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    return parse_qs(urlsplit(location).query)


def user(http: requests.Session, fake: FakeJustimmo, access: str) -> requests.Response:
    return http.get(fake.user_url, headers={"Authorization": f"Bearer {access}"}, timeout=5)


# ---------------------------------------------------------------- grants


def test_authorization_code_flow(fake: FakeJustimmo, http: requests.Session) -> None:
    q = authorize(http, fake, state="s1")
    assert q["state"] == ["s1"]
    code = q["code"][0]
    r = token(http, fake, grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"token_type", "expires_in", "access_token", "refresh_token"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 86400
    assert body["refresh_token"].startswith("def50200")
    assert 700 <= len(body["refresh_token"]) <= 800
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["Pragma"] == "no-cache"
    assert r.headers["Content-Type"].startswith("application/json")
    assert user(http, fake, body["access_token"]).json() == {"id": 1234, "tenant": {"id": 5678}}
    assert fake.current_refresh_token(1234, CLIENT) == body["refresh_token"]

    again = token(http, fake, grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_request"
    assert again.json()["hint"] == "Authorization code has been revoked"
    assert fake.stats()["by_grant"]["authorization_code"] == 2


def test_authorize_picks_user_and_rejects_unknown_client(
    fake: FakeJustimmo, http: requests.Session
) -> None:
    code = authorize(http, fake, user_id="42")["code"][0]
    r = token(http, fake, grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
    assert user(http, fake, r.json()["access_token"]).json() == {"id": 42, "tenant": {"id": 4242}}

    bad = http.get(
        fake.authorize_url,
        params={"response_type": "code", "client_id": "nope", "redirect_uri": REDIRECT},
        allow_redirects=False,
    )
    assert bad.status_code == 401
    assert bad.json()["error"] == "invalid_client"


def test_authorize_denied(fake: FakeJustimmo, http: requests.Session) -> None:
    fake.deny_authorizations()
    r = http.get(
        fake.authorize_url,
        params={
            "response_type": "code",
            "client_id": CLIENT,
            "redirect_uri": REDIRECT,
            "state": "x",
        },
        allow_redirects=False,
    )
    assert r.status_code == 302
    assert r.headers["Location"] == (
        REDIRECT + "?error=access_denied"
        "&message=The+resource+owner+or+authorization+server+denied+the+request."
        "&hint=The+user+denied+the+request&state=x"
    )
    fake.deny_authorizations(False)
    assert "code" in authorize(http, fake)


@pytest.mark.parametrize(("league", "error"), [("5", "invalid_request"), ("9", "invalid_grant")])
def test_code_expiry_client_and_redirect_checks(
    make_fake: Callable[..., FakeJustimmo],
    http: requests.Session,
    clock: ManualClock,
    league: str,
    error: str,
) -> None:
    fake = make_fake(league=league)

    def exchange(code: str, client: str = CLIENT, secret: str = SECRET, **extra: str) -> Any:
        data = {"grant_type": "authorization_code", "code": code, "client_id": client}
        r = http.post(fake.token_url, data={**data, "client_secret": secret, **extra})
        assert r.status_code == 400
        return r.json()

    code = authorize(http, fake)["code"][0]
    assert exchange(code, redirect_uri=REDIRECT + "/x")["hint"] == "Invalid redirect URI"
    assert exchange(code)["hint"] == "Check the `redirect_uri` parameter"
    assert (
        exchange(code, "other", "other-secret", redirect_uri=REDIRECT)["hint"]
        == "Authorization code was not issued to this client"
    )
    clock.advance(61)
    body = exchange(code, redirect_uri=REDIRECT)
    assert (body["error"], body["hint"]) == (error, "Authorization code has expired")


def test_refresh_rotates_revokes_both_and_counts_reuse(
    fake: FakeJustimmo, http: requests.Session
) -> None:
    first = fake.issue(CLIENT)
    assert first.refresh_token is not None
    r = refresh(http, fake, first.refresh_token)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"token_type", "expires_in", "access_token", "refresh_token"}  # no scope
    assert body["refresh_token"] != first.refresh_token
    assert not fake.access_token_valid(first.access_token)
    assert not fake.refresh_token_valid(first.refresh_token)
    assert fake.access_token_valid(body["access_token"])
    assert fake.refresh_token_valid(body["refresh_token"])
    assert fake.current_refresh_token(1234, CLIENT) == body["refresh_token"]
    assert user(http, fake, first.access_token).status_code == 401

    reuse = refresh(http, fake, first.refresh_token)
    assert reuse.status_code == 400
    assert reuse.json()["hint"] == "Token has been revoked"
    assert fake.reuse_count() == 1
    stats = fake.stats()
    assert (stats["rotations"], stats["reuse_count"], stats["successes"]) == (1, 1, 1)
    assert stats["errors_by_code"] == {"invalid_request": 1}
    assert stats["by_grant"]["refresh_token"] == 2


@pytest.mark.parametrize(
    ("league", "status", "error", "keys"),
    [
        ("5", 400, "invalid_request", {"error", "message", "hint"}),
        ("7", 401, "invalid_request", {"error", "message", "hint"}),
        ("8", 401, "invalid_request", {"error", "error_description", "message", "hint"}),
        ("9", 400, "invalid_grant", {"error", "error_description", "hint"}),
    ],
)
def test_bad_refresh_token_by_league(
    make_fake: Callable[..., FakeJustimmo],
    http: requests.Session,
    league: str,
    status: int,
    error: str,
    keys: set[str],
) -> None:
    fake = make_fake(league=league)
    r = refresh(http, fake, "def50200deadbeef")
    assert r.status_code == status
    body = r.json()
    assert set(body) == keys
    assert body["error"] == error
    assert body["hint"] == "Cannot decrypt the refresh token"
    assert body.get("message", body.get("error_description")) == "The refresh token is invalid."


def test_bad_refresh_token_hints(fake: FakeJustimmo, http: requests.Session) -> None:
    def hint(rt: str, **extra: str) -> str:
        r = refresh(http, fake, rt, **extra)
        assert r.status_code == 400
        return str(r.json()["hint"])

    expired, revoked, foreign = (t.refresh_token or "" for t in fake.issue_many(CLIENT, 3))
    fake.expire_refresh_token(expired)
    fake.revoke_refresh_token(revoked)
    assert hint(expired) == "Token has expired"
    assert hint(revoked) == "Token has been revoked"
    assert fake.reuse_count() == 0  # an admin revocation is not a reuse
    other = {"client_id": "other", "client_secret": "other-secret"}
    assert hint(foreign, **other) == "Token is not linked to client"
    assert hint("garbage") == "Cannot decrypt the refresh token"
    missing = token(http, fake, grant_type="refresh_token")
    assert missing.json()["hint"] == "Check the `refresh_token` parameter"


def test_redirect_uri_on_refresh_is_invalid_client(
    fake: FakeJustimmo, http: requests.Session
) -> None:
    rt = fake.issue(CLIENT).refresh_token or ""
    r = refresh(http, fake, rt, redirect_uri=REDIRECT)
    assert r.status_code == 401
    assert r.json() == {"error": "invalid_client", "message": "Client authentication failed"}
    assert fake.refresh_token_valid(rt)  # not rotated


def test_client_auth_basic_post_and_body_wins(fake: FakeJustimmo, http: requests.Session) -> None:
    rt = fake.issue(CLIENT).refresh_token or ""
    basic = http.post(
        fake.token_url,
        data={"grant_type": "refresh_token", "refresh_token": rt},
        auth=(CLIENT, SECRET),
    )
    assert basic.status_code == 200
    rt = basic.json()["refresh_token"]
    # Body credentials override a wrong Basic header...
    r = http.post(
        fake.token_url,
        data={"grant_type": "refresh_token", "refresh_token": rt, "client_secret": SECRET},
        auth=(CLIENT, "wrong"),
    )
    assert r.status_code == 200
    # ...and a wrong body secret overrides a right Basic header.
    r = http.post(
        fake.token_url,
        data={"grant_type": "client_credentials", "client_secret": "wrong"},
        auth=(CLIENT, SECRET),
    )
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_client"
    r = token(http, fake, auth=False, grant_type="client_credentials")
    assert (r.status_code, r.json()["hint"]) == (400, "Check the `client_id` parameter")
    r = token(http, fake, auth=False, grant_type="client_credentials", client_id="x")
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("league", "always"), [("5", True), ("7", True), ("8", False), ("9", False)]
)
def test_www_authenticate_by_league(
    make_fake: Callable[..., FakeJustimmo], http: requests.Session, league: str, always: bool
) -> None:
    fake = make_fake(league=league)
    data = {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": "bad"}
    post = http.post(fake.token_url, data=data)
    assert post.status_code == 401
    assert ("WWW-Authenticate" in post.headers) is always
    basic = http.post(fake.token_url, data={"grant_type": "client_credentials"}, auth=("x", "y"))
    assert basic.status_code == 401
    assert basic.headers["WWW-Authenticate"] == 'Basic realm="OAuth"'
    keys = {"5": {"error", "message"}, "7": {"error", "message"}}
    assert set(basic.json()) == keys.get(
        league, {"error", "error_description"} | ({"message"} if league == "8" else set())
    )


def test_client_credentials(make_fake: Callable[..., FakeJustimmo], http: requests.Session) -> None:
    fake = make_fake(cc_ttl=2678400)
    r = token(http, fake, grant_type="client_credentials")
    assert r.status_code == 200
    assert set(r.json()) == {"token_type", "expires_in", "access_token"}
    assert r.json()["expires_in"] == 2678400
    assert user(http, fake, r.json()["access_token"]).status_code == 403
    assert fake.stats()["by_grant"]["client_credentials"] == 1
    r = token(http, fake, grant_type="password")
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_grant_type")


def test_user_endpoint_rejects_bad_tokens(
    fake: FakeJustimmo, http: requests.Session, clock: ManualClock
) -> None:
    assert http.get(fake.user_url).status_code == 401
    assert user(http, fake, "nonsense").status_code == 401
    access = fake.issue(CLIENT, user_id=7, tenant_id=8).access_token
    assert user(http, fake, access).json() == {"id": 7, "tenant": {"id": 8}}
    clock.advance(timedelta(days=1))
    r = user(http, fake, access)
    assert (r.status_code, r.json()["error"]) == (401, "access_denied")


def test_injected_clock_controls_expiry(
    make_fake: Callable[..., FakeJustimmo], http: requests.Session, clock: ManualClock
) -> None:
    fake = make_fake(access_ttl=30, refresh_ttl=Duration(months=1))
    first = fake.issue(CLIENT)
    assert first.obtained_at == START
    assert first.refresh_expires_at == datetime(2024, 2, 29, 12, 0, tzinfo=UTC)
    assert first.expires_in == 30
    clock.advance(31)
    assert not fake.access_token_valid(first.access_token)
    assert fake.refresh_token_valid(first.refresh_token or "")

    clock.set(datetime(2024, 2, 29, 11, 59, tzinfo=UTC))
    r = refresh(http, fake, first.refresh_token or "")
    assert r.json()["expires_in"] == 30
    second = r.json()["refresh_token"]
    clock.set(datetime(2024, 3, 29, 11, 58, tzinfo=UTC))  # fresh month from the rotation
    assert fake.refresh_token_valid(second)
    clock.advance(60)
    assert not fake.refresh_token_valid(second)
    assert fake.current_refresh_token(1234, CLIENT) is None
    assert refresh(http, fake, second).json()["hint"] == "Token has expired"


def test_default_clock_follows_freezegun(http: requests.Session) -> None:
    with freeze_time("2024-01-31 12:00:00") as frozen, FakeJustimmo() as fake:
        issued = fake.issue(CLIENT)
        assert issued.refresh_expires_at == datetime(2024, 2, 29, 12, 0, tzinfo=UTC)
        frozen.tick(timedelta(days=1))
        assert user(http, fake, issued.access_token).status_code == 401


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "params", "status", "content_type"),
    [
        ("html_500", {}, 503, "text/html"),
        ("html_500", {"status": 502}, 502, "text/html"),
        ("json_500", {}, 500, "application/json"),
        ("rate_limited", {"retry_after": 7}, 429, "application/json"),
        ("invalid_client", {}, 401, "application/json"),
        ("malformed_json", {}, 200, "application/json"),
        ("empty_200", {}, 200, "application/json"),
    ],
)
def test_answering_faults(
    fake: FakeJustimmo,
    http: requests.Session,
    fault: str,
    params: dict[str, Any],
    status: int,
    content_type: str,
) -> None:
    rt = fake.issue(CLIENT).refresh_token or ""
    fake.inject(fault, count=1, **params)
    r = refresh(http, fake, rt)
    assert r.status_code == status
    assert r.headers["Content-Type"].startswith(content_type)
    if fault == "html_500":
        assert r.text.startswith("<!DOCTYPE html>")
    elif fault == "json_500":
        assert r.json()["error"] == "server_error"
    elif fault == "rate_limited":
        assert r.headers["Retry-After"] == "7"
    elif fault == "invalid_client":
        assert r.json()["error"] == "invalid_client"
    else:
        with pytest.raises(ValueError):
            r.json()
    assert fake.refresh_token_valid(rt)  # not processed
    assert refresh(http, fake, rt).status_code == 200  # consumed: the next one is normal
    assert fake.stats()["faults_served"] == 1
    assert fake.stats()["faults_by_kind"] == {fault: 1}


def test_rate_limited_empty_body(fake: FakeJustimmo, http: requests.Session) -> None:
    fake.inject("rate_limited", empty=True)
    r = token(http, fake, grant_type="client_credentials")
    assert (r.status_code, r.content, r.headers["Retry-After"]) == (429, b"", "2")


@pytest.mark.parametrize(("fault", "rotated"), [("drop", False), ("drop_after_rotate", True)])
def test_drop_faults(fake: FakeJustimmo, http: requests.Session, fault: str, rotated: bool) -> None:
    rt = fake.issue(CLIENT).refresh_token or ""
    fake.inject(fault, count=1)
    with pytest.raises(requests.ConnectionError):
        refresh(http, fake, rt)
    assert fake.refresh_token_valid(rt) is not rotated
    assert (fake.current_refresh_token(1234, CLIENT) != rt) is rotated
    assert fake.stats()["rotations"] == int(rotated)
    assert token(http, fake, grant_type="client_credentials").status_code == 200  # same Session


def test_timeout_fault_is_not_processed(fake: FakeJustimmo, http: requests.Session) -> None:
    rt = fake.issue(CLIENT).refresh_token or ""
    fake.inject("timeout", count=1, seconds=0.5)
    with pytest.raises(requests.ReadTimeout):
        http.post(
            fake.token_url,
            data={"grant_type": "refresh_token", "refresh_token": rt},
            auth=(CLIENT, SECRET),
            timeout=0.2,
        )
    assert fake.refresh_token_valid(rt)


def test_timeout_after_rotate_hangs_then_closes(fake: FakeJustimmo, http: requests.Session) -> None:
    rt = fake.issue(CLIENT).refresh_token or ""
    fake.inject("timeout_after_rotate", count=1, seconds=0.3)
    began = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        refresh(http, fake, rt)
    assert time.monotonic() - began >= 0.25
    assert not fake.refresh_token_valid(rt)
    assert fake.current_refresh_token(1234, CLIENT) is not None


def test_faults_fifo_by_count_and_grant_filter(fake: FakeJustimmo, http: requests.Session) -> None:
    fake.inject("json_500", count=1, grant_type="refresh_token")
    fake.inject("html_500", count=2)
    fake.inject("rate_limited", count=1)
    statuses = [token(http, fake, grant_type="client_credentials").status_code for _ in range(4)]
    assert statuses == [503, 503, 429, 200]  # the refresh-only fault is skipped
    rt = fake.issue(CLIENT).refresh_token or ""
    assert refresh(http, fake, rt).status_code == 500
    fake.inject("json_500")  # unlimited until cleared
    assert [token(http, fake, grant_type="client_credentials").status_code for _ in range(3)] == [
        500
    ] * 3
    fake.clear_faults()
    assert refresh(http, fake, rt).status_code == 200
    assert fake.stats()["faults_served"] == 7
    with pytest.raises(ValueError):
        fake.inject("no_such_fault")


# ---------------------------------------------------------------- server behaviour


def test_pause_refuses_connections_and_resume_reuses_port(
    fake: FakeJustimmo, http: requests.Session
) -> None:
    assert token(http, fake, grant_type="client_credentials").status_code == 200
    port = fake.port
    fake.pause()
    with pytest.raises(requests.ConnectionError):
        token(http, fake, grant_type="client_credentials")
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.user_url, timeout=2)
    fake.resume()
    assert fake.port == port
    assert token(http, fake, grant_type="client_credentials").status_code == 200


def test_keep_alive_reuses_one_connection(fake: FakeJustimmo, http: requests.Session) -> None:
    for _ in range(50):
        assert token(http, fake, grant_type="client_credentials").status_code == 200
    stats = fake.stats()
    assert stats["connections"] == 1
    assert stats["requests"] == stats["token_requests"] == stats["successes"] == 50
    assert stats["max_concurrent"] == 1
    times = stats["request_times"]
    assert len(times) == 50
    assert times == sorted(times)


def test_concurrent_clients_with_latency(fake: FakeJustimmo) -> None:
    fake.set_latency(0.05)
    tokens = [t.refresh_token or "" for t in fake.issue_many(CLIENT, 16 * 4)]
    failures: list[int] = []

    def client(chunk: list[str]) -> None:
        with requests.Session() as session:
            for rt in chunk:
                r = refresh(session, fake, rt)
                if r.status_code != 200:
                    failures.append(r.status_code)

    threads = [threading.Thread(target=client, args=(tokens[i::16],)) for i in range(16)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - began
    # A handler counts its request done after writing the answer: the last client can
    # read it a moment before (CI saw in_flight 1 on a loaded machine).
    deadline = time.monotonic() + 5
    while fake.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = fake.stats()
    assert failures == []
    assert stats["rotations"] == 64
    assert stats["connections"] == 16
    assert stats["max_concurrent"] >= 8
    assert stats["in_flight"] == 0
    assert 4 * 0.05 <= elapsed < 2.0  # sequential would take 64 * 0.05 = 3.2 s


def test_request_times_are_bounded(make_fake: Callable[..., FakeJustimmo]) -> None:
    fake = make_fake(request_times_limit=3)
    with requests.Session() as http:
        for _ in range(5):
            token(http, fake, grant_type="client_credentials")
    assert len(fake.stats()["request_times"]) == 3
    assert "request_times" not in fake.stats(request_times=False)


def test_hanging_handler_does_not_block_others_and_stop_is_prompt(
    make_fake: Callable[..., FakeJustimmo],
) -> None:
    fake = make_fake()
    fake.inject("timeout", count=1, seconds=30)
    outcome: list[BaseException] = []

    def hang() -> None:
        try:
            requests.post(fake.token_url, data={"grant_type": "client_credentials"}, timeout=20)
        except requests.RequestException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=hang)
    thread.start()
    deadline = time.monotonic() + 5
    while fake.stats()["in_flight"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with requests.Session() as http:
        assert token(http, fake, grant_type="client_credentials").status_code == 200
    assert fake.stats()["max_concurrent"] == 2
    began = time.monotonic()
    fake.stop()
    assert time.monotonic() - began < 1.0
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(outcome[0], requests.ConnectionError)


def test_latency_is_applied(fake: FakeJustimmo, http: requests.Session) -> None:
    fake.set_latency(0.1)
    began = time.monotonic()
    token(http, fake, grant_type="client_credentials")
    assert time.monotonic() - began >= 0.1


def test_request_times_are_when_requests_arrive(fake: FakeJustimmo,
                                                http: requests.Session) -> None:
    """A provider's rate limit counts requests as they arrive: the times the fake keeps
    (which the benchmarks count per 1-second window) must not include the latency."""
    fake.set_latency(0.5)
    began = time.monotonic()
    token(http, fake, grant_type="client_credentials")
    assert time.monotonic() - began >= 0.5
    [arrived] = fake.stats()["request_times"]
    assert began <= arrived < began + 0.25


def test_issue_many_is_fast_and_distinct(fake: FakeJustimmo) -> None:
    began = time.monotonic()
    issued = fake.issue_many(CLIENT, 20_000, user_id_start=10)
    assert time.monotonic() - began < 2.0
    refresh_tokens = {t.refresh_token for t in issued}
    assert len(refresh_tokens) == 20_000
    assert len({t.access_token for t in issued} & refresh_tokens) == 0
    assert issued[5].user_id == 15
    assert fake.current_refresh_token(15, CLIENT) == issued[5].refresh_token
    assert all(t.refresh_token and t.refresh_token.startswith("def50200") for t in issued[:100])
    cc = fake.issue(CLIENT, user_id=None)
    assert cc.refresh_token is None


# ---------------------------------------------------------------- control over HTTP and CLI


def test_http_control_endpoints(fake: FakeJustimmo, http: requests.Session) -> None:
    ctl = fake.base_url + "/_fake"
    issued = http.post(
        ctl + "/issue", json={"client_id": CLIENT, "n": 3, "user_id_start": 100}
    ).json()
    assert [t["user_id"] for t in issued] == [100, 101, 102]
    assert refresh(http, fake, issued[0]["refresh_token"]).status_code == 200

    r = http.post(
        ctl + "/faults",
        json={"fault": "html_500", "count": 1, "grant_type": None, "params": {"status": 504}},
    )
    assert r.status_code == 200
    assert token(http, fake, grant_type="client_credentials").status_code == 504
    http.post(ctl + "/faults", json={"fault": "json_500"})
    http.post(ctl + "/clear")
    assert token(http, fake, grant_type="client_credentials").status_code == 200
    assert http.post(ctl + "/latency", json={"seconds": 0.01}).status_code == 200

    stats = http.get(ctl + "/stats").json()
    assert stats["rotations"] == 1
    assert stats["faults_served"] == 1
    assert stats["latency"] == 0.01
    assert stats["requests"] == 3  # control requests are not counted
    assert http.post(ctl + "/faults", json={"fault": "bogus"}).status_code == 400
    assert http.post(ctl + "/issue", json={}).status_code == 400


def test_cli_runs_until_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokend.fake",
            "--port",
            "0",
            "--access-ttl",
            "30",
            "--refresh-ttl",
            "3m",
            "--league",
            "9",
            "--client",
            "cli:secret",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        m = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        r = requests.post(
            m.group(1) + "/access_token",
            data={"grant_type": "refresh_token", "refresh_token": "x"},
            auth=("cli", "secret"),
            timeout=5,
        )
        assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
        issued = requests.post(
            m.group(1) + "/_fake/issue", json={"client_id": "cli"}, timeout=5
        ).json()
        assert issued[0]["expires_in"] == 30
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()


def test_authorize_page_lets_a_person_choose_approve_or_deny(
    make_fake: Callable[..., FakeJustimmo], http: requests.Session
) -> None:
    fake = make_fake(consent_page=True)
    query = {"response_type": "code", "client_id": CLIENT, "redirect_uri": REDIRECT,
             "state": 'a"b<c'}
    page = http.get(fake.authorize_url, params=query, allow_redirects=False, timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert 'id="approve"' in page.text and 'id="deny"' in page.text
    assert '<option value="42">' in page.text and "a&quot;b&lt;c" in page.text

    def submit(**form: str) -> dict[str, list[str]]:
        r = http.post(fake.authorize_url, data={**query, **form}, allow_redirects=False,
                      timeout=5)
        assert r.status_code == 302
        assert r.headers["Location"].startswith(REDIRECT + "?")
        return parse_qs(urlsplit(r.headers["Location"]).query)

    approved = submit(user_id="42", decision="approve")
    assert approved["state"] == ['a"b<c']
    r = token(http, fake, grant_type="authorization_code", code=approved["code"][0],
              redirect_uri=REDIRECT)
    assert user(http, fake, r.json()["access_token"]).json()["id"] == 42
    denied = submit(user_id="42", decision="deny")
    assert denied["error"] == ["access_denied"] and "code" not in denied
    # scripted callers naming a user still get the immediate redirect
    assert "code" in authorize(http, fake, user_id="1234")


# ---------------------------------------------------------------- PKCE (RFC 7636), as league

VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"  # RFC 7636 Appendix B
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def pkce_code(http: requests.Session, fake: FakeJustimmo, challenge: str = CHALLENGE,
              method: str | None = "S256") -> str:
    params = {"code_challenge": challenge}
    if method is not None:
        params["code_challenge_method"] = method
    return authorize(http, fake, **params)["code"][0]


def exchange(http: requests.Session, fake: FakeJustimmo, code: str,
             code_verifier: str | None = None) -> requests.Response:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    if code_verifier is not None:
        form["code_verifier"] = code_verifier
    return token(http, fake, True, **form)


@pytest.mark.parametrize("league", ["5", "9"])
def test_pkce_s256_needs_the_matching_verifier(
    make_fake: Callable[..., FakeJustimmo], http: requests.Session, league: str
) -> None:
    fake = make_fake(league=league)
    code = pkce_code(http, fake)
    assert (fake.stats()["last_code_challenge"],
            fake.stats()["last_code_challenge_method"]) == (CHALLENGE, "S256")

    missing = exchange(http, fake, code)
    assert missing.status_code == 400
    assert missing.json()["error"] == "invalid_request"
    assert missing.json()["hint"] == "Check the `code_verifier` parameter"

    wrong = exchange(http, fake, code, code_verifier="x" * 43)
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant"
    assert wrong.json()["hint"] == "Failed to verify `code_verifier`."

    malformed = exchange(http, fake, code, code_verifier="short")
    assert malformed.status_code == 400 and malformed.json()["error"] == "invalid_request"

    # league revokes a code only when it issues tokens: a PKCE failure leaves it usable
    ok = exchange(http, fake, code, code_verifier=VERIFIER)
    assert ok.status_code == 200, ok.text
    assert fake.stats()["errors_by_code"] == {"invalid_request": 2, "invalid_grant": 1}


def test_pkce_plain_and_the_default_method(fake: FakeJustimmo, http: requests.Session) -> None:
    plain = "p" * 43
    code = pkce_code(http, fake, challenge=plain, method=None)  # league's default: plain
    assert fake.stats()["last_code_challenge_method"] == "plain"
    assert exchange(http, fake, code, code_verifier=VERIFIER).json()["error"] == "invalid_grant"
    assert exchange(http, fake, code, code_verifier=plain).status_code == 200


def test_pkce_malformed_challenges_are_refused(fake: FakeJustimmo, http: requests.Session) -> None:
    base = {"response_type": "code", "client_id": CLIENT, "redirect_uri": REDIRECT}
    for params, parameter in (({"code_challenge": CHALLENGE, "code_challenge_method": "S512"},
                               "code_challenge_method"),
                              ({"code_challenge": "too-short", "code_challenge_method": "S256"},
                               "code_challenge")):
        r = http.get(fake.authorize_url, params={**base, **params}, allow_redirects=False,
                     timeout=5)
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", parameter
        assert ("`S256`, `plain`" in r.json()["hint"]) == (parameter == "code_challenge_method")


def test_without_a_challenge_no_verifier_is_needed(
    fake: FakeJustimmo, http: requests.Session
) -> None:
    pkce_code(http, fake)
    code = authorize(http, fake)["code"][0]
    assert fake.stats()["last_code_challenge"] is None
    assert exchange(http, fake, code).status_code == 200


def test_the_authorize_page_carries_the_challenge(
    make_fake: Callable[..., FakeJustimmo], http: requests.Session
) -> None:
    fake = make_fake(consent_page=True)
    query = {"response_type": "code", "client_id": CLIENT, "redirect_uri": REDIRECT,
             "code_challenge": CHALLENGE, "code_challenge_method": "S256"}
    page = http.get(fake.authorize_url, params=query, allow_redirects=False, timeout=5)
    assert f'name="code_challenge" value="{CHALLENGE}"' in page.text
    assert 'name="code_challenge_method" value="S256"' in page.text
