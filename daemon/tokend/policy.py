"""Decisions as pure functions of (grant, now, settings): no I/O, no clock of their own.

The engine asks: is this grant due, and when next? What status does it have now? What
follows from this response or this error? Each answer is computed here, so each is
tested with tables of cases.

Its size is one concern: every scheduling and status decision of the engine, kept in one
pure module so the tables of cases cover them all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from . import leases
from .config import ScheduleConfig
from .durations import Duration
from .errors import ErrorKind, ProviderError
from .events import event_for
from .model import (
    ACTIVE,
    PERMANENT_ERRORS,
    AttemptResult,
    Grant,
    GrantType,
    Outcome,
    Reason,
    Status,
    TokenResponse,
)

JITTER = 0.10  # each grant refreshes a fixed 0-10 % earlier, so bulk imports spread out


def jitter_fraction(grant_id: int) -> float:
    """A fixed pseudo-random fraction in [0, JITTER) per grant (Knuth's multiplicative hash)."""
    return ((grant_id * 2654435761) % 2**32) / 2**32 * JITTER


def refresh_at(grant: Grant, refresh_before: timedelta) -> datetime | None:
    """When the access token should be renewed; None = it has none, renew now."""
    if grant.access_expires_at is None:
        return None
    lead = refresh_before
    if grant.obtained_at is not None:
        # Never aim earlier than half the token's life: a lifetime shorter than
        # refresh_before would otherwise mean a refresh on every pass.
        lifetime = grant.access_expires_at - grant.obtained_at
        lead = min(lead, max(lifetime / 2, timedelta(0)))
    return grant.access_expires_at - lead * (1 + jitter_fraction(grant.id))


def lifecycle(grant: Grant, now: datetime, s: ScheduleConfig) -> tuple[Status, str | None]:
    """The status a maintained grant has at ``now`` judged by its dates alone.

    A status set by an error (reconsent_required with an OAuth reason) or by an operator
    (disabled) is not a matter of dates and is kept.
    """
    if grant.status not in ACTIVE or grant.grant_type == GrantType.CLIENT_CREDENTIALS:
        return grant.status, grant.reason
    if grant.refresh_expires_at is not None:
        if now >= grant.refresh_expires_at:
            return Status.RECONSENT_REQUIRED, Reason.REFRESH_TOKEN_EXPIRED.value
        if now >= s.reconsent_before.before(grant.refresh_expires_at):
            return Status.RECONSENT_DUE, Reason.REFRESH_TOKEN_EXPIRING.value
    if s.max_grant_age is not None and grant.consented_at is not None \
            and now >= s.max_grant_age.after(grant.consented_at):
        return Status.RECONSENT_DUE, Reason.MAX_AGE.value
    return Status.OK, None


def next_attempt(grant: Grant, now: datetime, s: ScheduleConfig) -> datetime | None:
    """The next moment the daemon has work on this grant (None: never on its own)."""
    if grant.status not in ACTIVE:
        return None
    return min([refresh_at(grant, s.refresh_before) or now, *_status_moments(grant, now, s)])


def _status_moments(grant: Grant, now: datetime, s: ScheduleConfig) -> list[datetime]:
    """The moments a grant has work other than its refresh (status changes, reminders)."""
    moments: list[datetime] = []
    if grant.grant_type != GrantType.CLIENT_CREDENTIALS:
        if grant.refresh_expires_at is not None:
            moments.append(grant.refresh_expires_at)
            if grant.status == Status.OK:
                moments.append(s.reconsent_before.before(grant.refresh_expires_at))
        if s.max_grant_age is not None and grant.consented_at is not None \
                and grant.status == Status.OK:
            moments.append(s.max_grant_age.after(grant.consented_at))
        reminder = next_reminder(grant, now, s)
        if reminder is not None:
            moments.append(reminder)
    return moments


# ---------------------------------------------------------------------- reminders


def reminder_points(deadline: datetime, s: ScheduleConfig) -> list[datetime]:
    """The reminder moments of a refresh token ending at ``deadline``, earliest first.

    A moment at or before the start of the re-consent window is left out: the
    reconsent_due event sent on entering the window covers it.
    """
    window = s.reconsent_before.before(deadline)
    return sorted({p for p in (r.before(deadline) for r in s.reminders)
                   if window < p < deadline})


def _covered(grant: Grant) -> datetime | None:
    """The latest reminder moment already covered for the grant's current deadline."""
    if grant.reminder_deadline is None or grant.reminder_deadline != grant.refresh_expires_at:
        return None
    return grant.reminder_point


def _reminded(grant: Grant) -> bool:
    return (grant.status in ACTIVE and grant.grant_type != GrantType.CLIENT_CREDENTIALS
            and grant.refresh_expires_at is not None)


def next_reminder(grant: Grant, now: datetime, s: ScheduleConfig) -> datetime | None:
    """The next reminder moment still to come (after ``now``), if any."""
    if not _reminded(grant):
        return None
    assert grant.refresh_expires_at is not None
    covered = _covered(grant)
    return next((p for p in reminder_points(grant.refresh_expires_at, s)
                 if p > now and (covered is None or p > covered)), None)


def due_reminder(grant: Grant, now: datetime, s: ScheduleConfig) -> datetime | None:
    """The reminder moment to send now: the latest one passed and not yet covered.

    Moments missed together (the daemon was down) send one reminder, not several.
    """
    if not _reminded(grant):
        return None
    assert grant.refresh_expires_at is not None
    if now >= grant.refresh_expires_at:
        return None
    covered = _covered(grant)
    passed = [p for p in reminder_points(grant.refresh_expires_at, s)
              if p <= now and (covered is None or p > covered)]
    return passed[-1] if passed else None


def remind(grant: Grant, outcome: Outcome, now: datetime,
           s: ScheduleConfig) -> tuple[Outcome, bool]:
    """The outcome with a due reminder marked as covered, and whether to send it.

    Entering reconsent_due in the same step covers the reminder without a second event.
    """
    after = replace(grant, status=outcome.status,
                    refresh_expires_at=outcome.refresh_expires_at or grant.refresh_expires_at)
    point = due_reminder(after, now, s)
    if point is None:
        return outcome, False
    send = event_for(grant.status, outcome.status) is None
    return replace(outcome, reminder_deadline=after.refresh_expires_at,
                   reminder_point=point), send


def needs_refresh(grant: Grant, now: datetime, s: ScheduleConfig) -> bool:
    at = refresh_at(grant, s.refresh_before)
    return at is None or at <= now


def refresh_due(grant: Grant, now: datetime, s: ScheduleConfig) -> bool:
    """Refresh a claimed grant now? When its margin says so, and also when it was due
    for no reason but its refresh: moved earlier by the planner (tokend.planner, which
    spreads a wall of grants at the rate limit's pace), a retry, or an operator's
    enable. Due for a status change or a reminder only, it is not refreshed early."""
    if needs_refresh(grant, now, s):
        return True
    return grant.next_attempt_at is not None and grant.next_attempt_at <= now \
        and due_reminder(grant, now, s) is None \
        and all(m > now for m in _status_moments(grant, now, s))


def backoff(failures: int, s: ScheduleConfig, *, retry_after: float | None = None,
            rand: float = 1.0, kind: ErrorKind = ErrorKind.TRANSIENT) -> timedelta:
    """Delay before the next attempt after ``failures`` consecutive failures.

    Exponential from ``interval``, capped at ``retry_max``, with equal jitter (``rand``
    in [0, 1]: half the delay is fixed, half random). A client fault retries slowly at
    ``retry_max``. ``Retry-After`` is a floor, never shortened.
    """
    if kind is ErrorKind.CLIENT:
        base = s.retry_max
    else:
        exponent = min(max(failures - 1, 0), 32)
        # In seconds: interval * 2**32 overflows timedelta for long intervals.
        seconds = min(s.interval.total_seconds() * 2**exponent, s.retry_max.total_seconds())
        base = timedelta(seconds=seconds)
    delay = base * (0.5 + 0.5 * min(max(rand, 0.0), 1.0))
    if retry_after is not None and retry_after > 0:
        delay = max(delay, timedelta(seconds=retry_after))
    return delay


def after_success(grant: Grant, resp: TokenResponse, now: datetime, s: ScheduleConfig,
                  refresh_ttl: Duration, *, previous_refresh: str | None) -> Outcome:
    """The grant after a successful token response.

    A NEW refresh token gets a fresh expiry counted from when the request was sent; the
    same (or no) refresh token keeps the stored expiry.
    """
    new_refresh = resp.refresh_token
    refresh_expires = grant.refresh_expires_at
    if grant.grant_type == GrantType.CLIENT_CREDENTIALS:
        new_refresh, refresh_expires = None, None
    elif new_refresh is not None and new_refresh != previous_refresh:
        refresh_expires = refresh_ttl.after(resp.sent_at)
    else:
        new_refresh = None  # nothing new to store: keep the token and its expiry
    updated = replace(
        grant,
        access_expires_at=resp.access_expires_at,
        refresh_expires_at=refresh_expires,
        obtained_at=resp.sent_at,
        failure_count=0,
        in_doubt=False,
        status=Status.OK if grant.status in ACTIVE else grant.status,
        reason=None if grant.status in ACTIVE else grant.reason,
    )
    status, reason = lifecycle(updated, now, s)
    updated = replace(updated, status=status, reason=reason)
    # Not before the next pass: a token living less than a pass's turnaround must not
    # be claimed again (and again) within the same pass.
    next_at = next_attempt(updated, now, s)
    if next_at is not None:
        next_at = max(next_at, now + s.interval)
    return Outcome(
        status=status,
        reason=reason,
        next_attempt_at=next_at,
        failure_count=0,
        last_error=None,
        in_doubt=False,
        access_token=resp.access_token,
        refresh_token=new_refresh,
        access_expires_at=resp.access_expires_at,
        refresh_expires_at=refresh_expires,
        obtained_at=resp.sent_at,
    )


def after_failure(grant: Grant, err: ProviderError, now: datetime, s: ScheduleConfig,
                  rand: float = 1.0) -> Outcome:
    """The grant after a failed attempt; only a permanent error ends a user grant."""
    failures = grant.failure_count + 1
    in_doubt = grant.in_doubt or err.maybe_applied
    user_grant = grant.grant_type != GrantType.CLIENT_CREDENTIALS
    if err.kind is ErrorKind.PERMANENT and user_grant:
        reason: str | None
        if grant.in_doubt:
            reason = Reason.ROTATION_LOST.value
        elif grant.refresh_expires_at is not None and now >= grant.refresh_expires_at:
            reason = Reason.REFRESH_TOKEN_EXPIRED.value
        else:
            reason = err.error if err.error in PERMANENT_ERRORS else "invalid_grant"
        return Outcome(status=Status.RECONSENT_REQUIRED, reason=reason, next_attempt_at=None,
                       failure_count=failures, last_error=_bounded(err.summary()),
                       in_doubt=False)
    kind = err.kind if err.kind is not ErrorKind.PERMANENT else ErrorKind.CLIENT
    delay = backoff(failures, s, retry_after=err.retry_after, rand=rand, kind=kind)
    status, current = lifecycle(grant, now, s)
    next_at: datetime | None = now + delay
    if status == Status.RECONSENT_REQUIRED:
        next_at = None
    return Outcome(status=status, reason=current, next_attempt_at=next_at,
                   failure_count=failures, last_error=_bounded(err.summary()),
                   in_doubt=in_doubt)


LAST_ERROR_MAX = 500  # the column's width


def _bounded(text: str) -> str:
    return text if len(text) <= LAST_ERROR_MAX else text[:LAST_ERROR_MAX - 1] + "…"


def initial(grant: Grant, now: datetime, s: ScheduleConfig) -> tuple[Status, str | None,
                                                                     datetime | None]:
    """Status and next attempt of a grant just imported or consented."""
    status, reason = lifecycle(replace(grant, status=Status.OK, reason=None), now, s)
    placed = replace(grant, status=status, reason=reason)
    return status, reason, next_attempt(placed, now, s)


def on_enable(grant: Grant, now: datetime, s: ScheduleConfig) -> tuple[Status, str | None,
                                                                       datetime | None]:
    """An operator resumes a grant: judged by its dates, and looked at on the next pass."""
    status, reason = lifecycle(replace(grant, status=Status.OK, reason=None), now, s)
    return status, reason, (None if status == Status.RECONSENT_REQUIRED else now)


# ---------------------------------------------------------------------- one claimed grant


@dataclass(frozen=True)
class Refresh:
    """Send the refresh (or the client-credentials request)."""


@dataclass(frozen=True)
class Save:
    """Send nothing: save ``outcome``; the attempt ends as ``result``."""

    outcome: Outcome
    result: AttemptResult
    why: str  # one of the SAVE_* names below, for the log and the tests


@dataclass(frozen=True)
class Fail:
    """Send nothing: the attempt fails with ``error``, as if the provider had answered it."""

    error: ProviderError


@dataclass(frozen=True)
class Release:
    """Send nothing: give the grant back unsent, as it was (claimed afresh later)."""

    why: str  # RELEASE_STOPPING or RELEASE_LEASE_TOO_SHORT


@dataclass(frozen=True)
class Blocked:
    """The grant's client is blocked (:mod:`tokend.circuit`, which decides ``until``):
    its grant is held until then, ``note`` kept as its last error."""

    until: datetime
    note: str


Decision = Refresh | Save | Fail | Release
REFRESH = Refresh()
SAVE_STATUS = "status_only"  # due for a status change or a reminder, not a refresh
SAVE_UNDECRYPTABLE = "undecryptable"
SAVE_NO_REFRESH_TOKEN = "no_refresh_token"
SAVE_BLOCKED = "client_blocked"
RELEASE_STOPPING = "stopping"
RELEASE_LEASE_TOO_SHORT = "lease_too_short"


def plan(grant: Grant, now: datetime, s: ScheduleConfig, *, client_known: bool,
         tokens_error: str | None, has_refresh: bool, blocked: Blocked | None,
         priority: bool = False) -> Decision:
    """What to do with a claimed grant before anything is sent.

    ``tokens_error``: why its stored tokens cannot be read (None: they can);
    ``has_refresh``: a refresh token is stored; ``priority``: an application waits for
    it (:mod:`tokend.ondemand`) after a 401, which is reason enough to refresh.
    """
    if not client_known:
        return Fail(ProviderError(ErrorKind.CLIENT, "unknown_client",
                                  description=f"client {grant.client!r} is not configured"))
    is_cc = grant.grant_type == GrantType.CLIENT_CREDENTIALS
    status, reason = lifecycle(grant, now, s)
    if not is_cc and (status == Status.RECONSENT_REQUIRED
                      or (not priority and not refresh_due(grant, now, s))):
        return Save(Outcome(status=status, reason=reason,
                            next_attempt_at=next_attempt(
                                replace(grant, status=status, reason=reason), now, s),
                            failure_count=grant.failure_count, last_error=grant.last_error,
                            in_doubt=grant.in_doubt),
                    AttemptResult.SKIPPED, SAVE_STATUS)
    if tokens_error is not None:
        # The operator's key is wrong or missing: nothing was sent, nothing is lost.
        # Keep the grant as it is and look again after retry_max.
        return Save(Outcome(status=grant.status, reason=grant.reason,
                            next_attempt_at=now + s.retry_max,
                            failure_count=grant.failure_count + 1,
                            last_error=tokens_error[:LAST_ERROR_MAX],
                            in_doubt=grant.in_doubt),
                    AttemptResult.INTERNAL, SAVE_UNDECRYPTABLE)
    if not is_cc and not has_refresh:
        return Save(Outcome(status=Status.RECONSENT_REQUIRED, reason="invalid_grant",
                            next_attempt_at=None, failure_count=grant.failure_count,
                            last_error="no refresh token stored", in_doubt=False),
                    AttemptResult.PERMANENT, SAVE_NO_REFRESH_TOKEN)
    if blocked is not None:
        # Given back unsent: not a failure of the grant.
        return Save(Outcome(status=status, reason=reason, next_attempt_at=blocked.until,
                            failure_count=grant.failure_count, last_error=blocked.note,
                            in_doubt=grant.in_doubt),
                    AttemptResult.HELD, SAVE_BLOCKED)
    return REFRESH


def send_now(*, admitted: bool, lease_left: timedelta | None,
             timeout: timedelta) -> Refresh | Release:
    """After the wait for the rate limiter: send, or give the grant back unsent.

    ``admitted``: the rate limiter let it through (False: tokend is stopping);
    ``lease_left``: what is left of its lease (None: no lease to watch). Sent with too
    little left, it could still be on the wire when another process takes the grant over.
    """
    if not admitted:
        return Release(RELEASE_STOPPING)
    if lease_left is not None and not leases.can_send(lease_left, timeout):
        return Release(RELEASE_LEASE_TOO_SHORT)
    return REFRESH
