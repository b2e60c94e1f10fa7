"""The pure decisions, as tables of cases."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tokend import events, policy
from tokend.config import ScheduleConfig
from tokend.durations import Duration
from tokend.errors import ErrorKind, ProviderError
from tokend.model import AttemptResult, Grant, GrantType, Status, TokenResponse

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = ScheduleConfig()  # interval 60s, refresh_before 6h, retry_max 15m, reconsent_before 7d
MONTH = Duration(months=1)


def grant(**kw: object) -> Grant:
    base = Grant(
        id=7, client="main", grant_type="authorization_code", user_id="1", tenant_id="2",
        status=Status.OK, reason=None,
        access_expires_at=NOW + timedelta(hours=12), refresh_expires_at=NOW + timedelta(days=20),
        obtained_at=NOW - timedelta(hours=12), consented_at=NOW - timedelta(days=10),
        failure_count=0, last_error=None, next_attempt_at=None, in_doubt=False,
        token_version=1, has_refresh_token=True, created_at=NOW, updated_at=NOW,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def resp(refresh: str | None = "new-refresh", expires_in: float = 86400,
         sent: datetime = NOW) -> TokenResponse:
    return TokenResponse(access_token="new-access", refresh_token=refresh, expires_in=expires_in,
                         token_type="Bearer", sent_at=sent)


def test_jitter_is_fixed_per_grant_and_within_ten_percent() -> None:
    values = [policy.jitter_fraction(i) for i in range(1, 5001)]
    assert all(0 <= v < 0.10 for v in values)
    assert policy.jitter_fraction(42) == policy.jitter_fraction(42)
    # spread out: a bulk import does not come due at one instant
    assert len({round(v, 4) for v in values}) > 900
    assert 0.04 < sum(values) / len(values) < 0.06


@pytest.mark.parametrize(("access_left", "due"), [
    (timedelta(hours=12), False),
    (timedelta(hours=6, minutes=37), False),   # jitter of grant 7 is < 10 %: not yet
    (timedelta(hours=6), True),
    (timedelta(minutes=1), True),
    (-timedelta(minutes=1), True),             # already expired: refresh now
])
def test_due_for_refresh(access_left: timedelta, due: bool) -> None:
    g = grant(access_expires_at=NOW + access_left, obtained_at=NOW + access_left - timedelta(days=1))
    assert policy.needs_refresh(g, NOW, S) is due


def test_no_access_token_means_due_now() -> None:
    assert policy.needs_refresh(grant(access_expires_at=None), NOW, S)


def test_short_lived_tokens_refresh_at_half_life_not_every_pass() -> None:
    # 30 s access tokens with refresh_before 6h would otherwise be due on every pass
    g = grant(obtained_at=NOW, access_expires_at=NOW + timedelta(seconds=30))
    at = policy.refresh_at(g, S.refresh_before)
    assert at is not None
    assert NOW + timedelta(seconds=13) < at <= NOW + timedelta(seconds=15)


@pytest.mark.parametrize(("refresh_left", "age", "max_age", "expected"), [
    (timedelta(days=20), timedelta(days=10), None, (Status.OK, None)),
    (timedelta(days=7, seconds=1), timedelta(days=10), None, (Status.OK, None)),
    (timedelta(days=7), timedelta(days=10), None, (Status.RECONSENT_DUE, "refresh_token_expiring")),
    (timedelta(hours=1), timedelta(days=10), None, (Status.RECONSENT_DUE, "refresh_token_expiring")),
    (timedelta(0), timedelta(days=10), None, (Status.RECONSENT_REQUIRED, "refresh_token_expired")),
    (-timedelta(days=1), timedelta(days=10), None,
     (Status.RECONSENT_REQUIRED, "refresh_token_expired")),
    (timedelta(days=20), timedelta(days=95), Duration(months=3), (Status.RECONSENT_DUE, "max_age")),
    (timedelta(days=20), timedelta(days=80), Duration(months=3), (Status.OK, None)),
])
def test_lifecycle(refresh_left: timedelta, age: timedelta, max_age: Duration | None,
                   expected: tuple[Status, str | None]) -> None:
    s = replace(S, max_grant_age=max_age)
    g = grant(refresh_expires_at=NOW + refresh_left, consented_at=NOW - age)
    assert policy.lifecycle(g, NOW, s) == expected


@pytest.mark.parametrize("status", [Status.DISABLED, Status.RECONSENT_REQUIRED])
def test_lifecycle_keeps_statuses_that_dates_did_not_set(status: Status) -> None:
    g = grant(status=status, reason="operator", refresh_expires_at=NOW + timedelta(days=1))
    assert policy.lifecycle(g, NOW, S) == (status, "operator")


def test_client_credentials_never_need_reconsent() -> None:
    g = grant(grant_type="client_credentials", user_id=None, refresh_expires_at=None,
              has_refresh_token=False)
    assert policy.lifecycle(g, NOW, S) == (Status.OK, None)


def test_calendar_month_window() -> None:
    # a refresh token obtained Jan 31 ends Feb 28 (league P1M), the window opens Feb 21
    s = replace(S, reconsent_before=Duration(delta=timedelta(days=7)))
    obtained = datetime(2026, 1, 31, 9, 0, tzinfo=UTC)
    end = MONTH.after(obtained)
    assert end == datetime(2026, 2, 28, 9, 0, tzinfo=UTC)
    g = grant(refresh_expires_at=end)
    assert policy.lifecycle(g, datetime(2026, 2, 21, 8, 59, tzinfo=UTC), s)[0] == Status.OK
    assert policy.lifecycle(g, datetime(2026, 2, 21, 9, 0, tzinfo=UTC), s)[0] == \
        Status.RECONSENT_DUE


def test_next_attempt_is_the_earliest_piece_of_work() -> None:
    g = grant(access_expires_at=NOW + timedelta(days=1), obtained_at=NOW,
              refresh_expires_at=NOW + timedelta(days=7, hours=3))
    # the re-consent window opens (in 3h) before the refresh is due (in ~17.4h)
    assert policy.next_attempt(g, NOW, S) == NOW + timedelta(hours=3)
    due = replace(g, status=Status.RECONSENT_DUE)
    assert policy.next_attempt(due, NOW, S) == policy.refresh_at(due, S.refresh_before)
    assert policy.next_attempt(replace(g, status=Status.DISABLED), NOW, S) is None
    assert policy.next_attempt(replace(g, status=Status.RECONSENT_REQUIRED), NOW, S) is None


@pytest.mark.parametrize(("failures", "rand", "retry_after", "expected"), [
    (1, 1.0, None, timedelta(seconds=60)),
    (2, 1.0, None, timedelta(seconds=120)),
    (4, 1.0, None, timedelta(seconds=480)),
    (5, 1.0, None, timedelta(minutes=15)),      # capped at retry_max
    (50, 1.0, None, timedelta(minutes=15)),
    (1, 0.0, None, timedelta(seconds=30)),      # equal jitter: half fixed
    (3, 0.5, None, timedelta(seconds=180)),
    (1, 1.0, 300.0, timedelta(seconds=300)),    # Retry-After is a floor
    (5, 1.0, 3600.0, timedelta(hours=1)),       # ... even above retry_max
    (5, 1.0, 10.0, timedelta(minutes=15)),
])
def test_backoff(failures: int, rand: float, retry_after: float | None,
                 expected: timedelta) -> None:
    assert policy.backoff(failures, S, retry_after=retry_after, rand=rand) == expected


def test_client_fault_retries_slowly() -> None:
    assert policy.backoff(1, S, kind=ErrorKind.CLIENT) == S.retry_max


def test_success_with_rotation_slides_refresh_expiry_from_send_time() -> None:
    sent = NOW - timedelta(seconds=2)
    g = grant(refresh_expires_at=NOW + timedelta(days=3), status=Status.RECONSENT_DUE,
              reason="refresh_token_expiring", failure_count=3, in_doubt=True)
    out = policy.after_success(g, resp(sent=sent), NOW, S, MONTH, previous_refresh="old")
    assert out.refresh_token == "new-refresh"
    assert out.refresh_expires_at == MONTH.after(sent)
    assert out.access_expires_at == sent + timedelta(days=1)
    assert out.obtained_at == sent
    # pushed out of the window: back to ok; failures and doubt cleared
    assert (out.status, out.reason, out.failure_count, out.in_doubt) == (Status.OK, None, 0, False)
    assert events.event_for(g.status, out.status) == "recovered"


@pytest.mark.parametrize("returned", [None, "old"])
def test_success_without_new_refresh_token_keeps_token_and_expiry(returned: str | None) -> None:
    g = grant(refresh_expires_at=NOW + timedelta(days=3))
    out = policy.after_success(g, resp(refresh=returned), NOW, S, MONTH, previous_refresh="old")
    assert out.refresh_token is None  # nothing to write
    assert out.refresh_expires_at == NOW + timedelta(days=3)
    assert (out.status, out.reason) == (Status.RECONSENT_DUE, "refresh_token_expiring")


def test_success_of_client_credentials() -> None:
    g = grant(grant_type="client_credentials", user_id=None, refresh_expires_at=None,
              has_refresh_token=False, access_expires_at=None, obtained_at=None)
    out = policy.after_success(g, resp(refresh=None, expires_in=2678400), NOW, S, MONTH,
                               previous_refresh=None)
    assert out.status == Status.OK
    assert out.refresh_expires_at is None
    assert out.access_expires_at == NOW + timedelta(seconds=2678400)


def err(kind: ErrorKind, code: str, **kw: object) -> ProviderError:
    return ProviderError(kind, code, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("g", "e", "status", "reason", "retry"), [
    (grant(), err(ErrorKind.TRANSIENT, "http_503", status=503), Status.OK, None, True),
    (grant(), err(ErrorKind.TRANSIENT, "timeout"), Status.OK, None, True),
    (grant(), err(ErrorKind.CLIENT, "invalid_client", status=401), Status.OK, None, True),
    (grant(), err(ErrorKind.PERMANENT, "invalid_grant", status=400),
     Status.RECONSENT_REQUIRED, "invalid_grant", False),
    (grant(), err(ErrorKind.PERMANENT, "invalid_request", status=401),
     Status.RECONSENT_REQUIRED, "invalid_request", False),
    (grant(in_doubt=True), err(ErrorKind.PERMANENT, "invalid_request", status=400),
     Status.RECONSENT_REQUIRED, "rotation_lost", False),
    (grant(refresh_expires_at=NOW - timedelta(seconds=1)),
     err(ErrorKind.PERMANENT, "invalid_request", status=400),
     Status.RECONSENT_REQUIRED, "refresh_token_expired", False),
    # a transient failure never flags a grant, but its refresh token really expiring does
    (grant(refresh_expires_at=NOW - timedelta(seconds=1)), err(ErrorKind.TRANSIENT, "http_500"),
     Status.RECONSENT_REQUIRED, "refresh_token_expired", False),
    (grant(refresh_expires_at=NOW + timedelta(days=2)), err(ErrorKind.TRANSIENT, "http_500"),
     Status.RECONSENT_DUE, "refresh_token_expiring", True),
    # client credentials: a permanent-looking error is the client's fault, never re-consent
    (grant(grant_type="client_credentials", user_id=None, refresh_expires_at=None),
     err(ErrorKind.PERMANENT, "invalid_scope"), Status.OK, None, True),
])
def test_after_failure(g: Grant, e: ProviderError, status: Status, reason: str | None,
                       retry: bool) -> None:
    out = policy.after_failure(g, e, NOW, S)
    assert (out.status, out.reason) == (status, reason)
    assert (out.next_attempt_at is not None) is retry
    assert out.failure_count == g.failure_count + 1
    assert out.access_token is None


def test_ambiguous_failure_marks_grant_in_doubt_until_success() -> None:
    g = grant()
    out = policy.after_failure(g, err(ErrorKind.TRANSIENT, "timeout", maybe_applied=True), NOW, S)
    assert out.in_doubt
    g2 = replace(g, in_doubt=True, failure_count=1)
    out2 = policy.after_failure(g2, err(ErrorKind.TRANSIENT, "http_502"), NOW, S)
    assert out2.in_doubt
    out3 = policy.after_success(g2, resp(), NOW, S, MONTH, previous_refresh="old")
    assert not out3.in_doubt


def test_retry_after_is_honoured_in_the_next_attempt() -> None:
    out = policy.after_failure(grant(), err(ErrorKind.TRANSIENT, "rate_limited",
                                            retry_after=120.0), NOW, S, rand=0.0)
    assert out.next_attempt_at == NOW + timedelta(seconds=120)


@pytest.mark.parametrize(("old", "new", "event"), [
    (Status.OK, Status.RECONSENT_DUE, "reconsent_due"),
    (Status.OK, Status.RECONSENT_REQUIRED, "reconsent_required"),
    (Status.RECONSENT_DUE, Status.RECONSENT_REQUIRED, "reconsent_required"),
    (Status.RECONSENT_DUE, Status.OK, "recovered"),
    (Status.RECONSENT_REQUIRED, Status.OK, "recovered"),
    (Status.OK, Status.OK, None),
    (Status.RECONSENT_DUE, Status.RECONSENT_DUE, None),
    (Status.DISABLED, Status.OK, None),
    (Status.OK, Status.DISABLED, None),
])
def test_events(old: Status, new: Status, event: str | None) -> None:
    assert events.event_for(old, new) == event


def test_initial_and_enable() -> None:
    g = grant(refresh_expires_at=NOW - timedelta(days=1))
    assert policy.initial(g, NOW, S)[:2] == (Status.RECONSENT_REQUIRED, "refresh_token_expired")
    status, reason, next_at = policy.on_enable(grant(status=Status.DISABLED), NOW, S)
    assert (status, reason, next_at) == (Status.OK, None, NOW)


# ---------------------------------------------------------------------- policy.plan

BLOCKED = policy.Blocked(until=NOW + timedelta(minutes=15), note="client_blocked: held")
CC = {"grant_type": GrantType.CLIENT_CREDENTIALS, "refresh_expires_at": None,
      "has_refresh_token": False}
DUE = {"access_expires_at": NOW + timedelta(minutes=5)}  # within refresh_before
NOT_DUE = {"access_expires_at": NOW + timedelta(hours=12)}
ENDED = {"refresh_expires_at": NOW - timedelta(seconds=1)}
WINDOW = {"refresh_expires_at": NOW + timedelta(days=3), "status": Status.OK}


@pytest.mark.parametrize(
    ("g", "known", "tokens_error", "has_refresh", "blocked", "priority", "expected"), [
        # unknown client: fails as a client fault, whatever else holds
        ({**DUE}, False, None, True, None, False, ("fail", AttemptResult.CLIENT)),
        ({**DUE}, False, "bad key", False, BLOCKED, True, ("fail", AttemptResult.CLIENT)),
        # due: refreshed
        ({**DUE}, True, None, True, None, False, ("refresh", None)),
        # not due, not asked for: a status change only (here: none), nothing sent
        ({**NOT_DUE}, True, None, True, None, False, ("save", AttemptResult.SKIPPED)),
        # ... even when the tokens cannot be read or there is no refresh token
        ({**NOT_DUE}, True, "bad key", False, None, False, ("save", AttemptResult.SKIPPED)),
        ({**NOT_DUE}, True, None, False, BLOCKED, False, ("save", AttemptResult.SKIPPED)),
        # an application waits (on demand): refreshed though not due
        ({**NOT_DUE}, True, None, True, None, True, ("refresh", None)),
        # refresh token ended: re-consent, never sent (not even on demand)
        ({**DUE, **ENDED}, True, None, True, None, True, ("save", AttemptResult.SKIPPED)),
        # entering the re-consent window while due: still refreshed
        ({**DUE, **WINDOW}, True, None, True, None, False, ("refresh", None)),
        # due but the tokens cannot be read: kept, looked at again later
        ({**DUE}, True, "bad key", False, None, False, ("save", AttemptResult.INTERNAL)),
        ({**DUE}, True, "bad key", False, BLOCKED, False, ("save", AttemptResult.INTERNAL)),
        # due, no refresh token stored: needs re-consent
        ({**DUE}, True, None, False, None, False, ("save", AttemptResult.PERMANENT)),
        ({**DUE}, True, None, False, BLOCKED, False, ("save", AttemptResult.PERMANENT)),
        # due, its client blocked: held unsent
        ({**DUE}, True, None, True, BLOCKED, False, ("save", AttemptResult.HELD)),
        ({**NOT_DUE}, True, None, True, BLOCKED, True, ("save", AttemptResult.HELD)),
        # client credentials: no dates, no refresh token; always sent unless blocked
        ({**CC, **NOT_DUE}, True, None, False, None, False, ("refresh", None)),
        ({**CC}, True, None, False, BLOCKED, False, ("save", AttemptResult.HELD)),
        ({**CC}, True, "bad key", False, None, False, ("save", AttemptResult.INTERNAL)),
        ({**CC}, False, None, False, None, False, ("fail", AttemptResult.CLIENT)),
    ])
def test_plan(g: dict[str, object], known: bool, tokens_error: str | None, has_refresh: bool,
              blocked: policy.Blocked | None, priority: bool,
              expected: tuple[str, AttemptResult | None]) -> None:
    d = policy.plan(grant(**g), NOW, S, client_known=known, tokens_error=tokens_error,
                    has_refresh=has_refresh, blocked=blocked, priority=priority)
    if isinstance(d, policy.Fail):
        got: tuple[str, AttemptResult | None] = ("fail", AttemptResult(d.error.kind.value))
    elif isinstance(d, policy.Save):
        got = ("save", d.result)
    else:
        assert isinstance(d, policy.Refresh)
        got = ("refresh", None)
    assert got == expected


def plan_save(**kw: object) -> policy.Save:
    args: dict[str, object] = {"client_known": True, "tokens_error": None,
                               "has_refresh": True, "blocked": None, "priority": False}
    g = kw.pop("g", grant(**DUE))
    args.update(kw)
    d = policy.plan(g, NOW, S, **args)  # type: ignore[arg-type]
    assert isinstance(d, policy.Save), d
    return d


def test_plan_outcomes() -> None:
    # a status change only: the lifecycle status, next due at its next piece of work
    g = grant(**NOT_DUE, **WINDOW, failure_count=2, last_error="x", in_doubt=True)
    o = plan_save(g=g).outcome
    assert (o.status, o.reason, o.failure_count, o.last_error, o.in_doubt) == (
        Status.RECONSENT_DUE, "refresh_token_expiring", 2, "x", True)
    assert o.next_attempt_at == policy.next_attempt(
        replace(g, status=o.status, reason=o.reason), NOW, S)
    # ended: re-consent, never looked at again by itself
    o = plan_save(g=grant(**DUE, **ENDED)).outcome
    assert (o.status, o.reason, o.next_attempt_at) == (
        Status.RECONSENT_REQUIRED, "refresh_token_expired", None)
    # undecryptable: status kept, one more failure, back after retry_max, error bounded
    g = grant(**DUE, status=Status.RECONSENT_DUE, reason="max_age", failure_count=1)
    d = plan_save(g=g, tokens_error="e" * 900, has_refresh=False)
    o = d.outcome
    assert (d.why, o.status, o.reason, o.failure_count, o.next_attempt_at) == (
        policy.SAVE_UNDECRYPTABLE, Status.RECONSENT_DUE, "max_age", 2, NOW + S.retry_max)
    assert o.last_error is not None and len(o.last_error) == 500
    # no refresh token: re-consent, not in doubt
    o = plan_save(g=grant(**DUE, in_doubt=True), has_refresh=False).outcome
    assert (o.status, o.reason, o.next_attempt_at, o.last_error, o.in_doubt) == (
        Status.RECONSENT_REQUIRED, "invalid_grant", None, "no refresh token stored", False)
    # blocked: held until the circuit says, with its note, not counted as a failure
    g = grant(**DUE, **WINDOW, failure_count=3)
    o = plan_save(g=g, blocked=BLOCKED).outcome
    assert (o.status, o.next_attempt_at, o.last_error, o.failure_count) == (
        Status.RECONSENT_DUE, BLOCKED.until, BLOCKED.note, 3)


@pytest.mark.parametrize(("admitted", "left", "expected"), [
    (True, None, policy.REFRESH),
    (True, timedelta(minutes=10), policy.REFRESH),
    (True, timedelta(seconds=1), policy.Release(policy.RELEASE_LEASE_TOO_SHORT)),
    (True, timedelta(seconds=-5), policy.Release(policy.RELEASE_LEASE_TOO_SHORT)),
    (False, timedelta(minutes=10), policy.Release(policy.RELEASE_STOPPING)),
    (False, None, policy.Release(policy.RELEASE_STOPPING)),
])
def test_send_now(admitted: bool, left: timedelta | None,
                  expected: policy.Refresh | policy.Release) -> None:
    assert policy.send_now(admitted=admitted, lease_left=left,
                           timeout=timedelta(seconds=10)) == expected
