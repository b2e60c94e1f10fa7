"""One circuit per client: a refused client secret is the client's fault, not each grant's.

When the provider answers ``invalid_client`` the client's credentials are wrong, so
every grant of that client would fail the same way. The circuit of that client opens:
its grants are no longer sent one by one (they are held, unsent, uncounted), and one
probe goes out per backoff step, a normal refresh of the client's earliest-expiring
grant (league checks the client before the refresh token, so a refused probe spends
nothing). An accepted probe closes the circuit and makes the held grants due at once.

A process starts with every circuit ``unknown``: the first attempt of each client goes
out alone at the start of the first pass, so a restart after fixing the secret is
noticed within seconds (grants backed off because of the client fault are found by
their ``last_error``, see :data:`MARKERS`).

Decisions here are pure functions of data and ``now``; the I/O is in
:mod:`tokend.maintenance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from .config import ScheduleConfig
from .errors import ErrorKind, ProviderError
from .model import Grant
from .policy import backoff

REFUSED_ERROR = "invalid_client"
# The last_error of a grant whose own attempt was refused (ProviderError.summary()).
REFUSED = ProviderError(ErrorKind.CLIENT, REFUSED_ERROR).summary()
# The last_error of a grant given back unsent while its client's circuit is open.
HELD = ("client_blocked: not sent while the provider refuses the client's credentials "
        f"({REFUSED_ERROR}); retried as soon as a probe is accepted")
# Grants whose last_error starts with one of these wait for their client's circuit.
MARKERS = (REFUSED, "client_blocked:")
# Spacing of the due times given to released grants (their order: earliest expiry first).
RELEASE_STEP = timedelta(milliseconds=1)


class State(StrEnum):
    UNKNOWN = "unknown"  # nothing decisive seen since start-up: probe first
    CLOSED = "closed"
    OPEN = "open"


class Verdict(StrEnum):
    ACCEPTED = "accepted"  # the provider accepted the client's credentials
    REFUSED = "refused"  # invalid_client
    UNDECIDED = "undecided"  # no answer about the client (timeout, 5xx, 429, ...)


@dataclass(frozen=True)
class Circuit:
    state: State = State.UNKNOWN
    refusals: int = 0  # consecutive refused probes, counting the refusal that opened it
    next_probe_at: datetime | None = None  # set while open

    @property
    def blocked(self) -> bool:
        return self.state is State.OPEN


def verdict(err: ProviderError | None) -> Verdict:
    """What an attempt's answer says about the client's credentials (None: success)."""
    if err is None:
        return Verdict.ACCEPTED
    if err.kind is ErrorKind.CLIENT and err.error == REFUSED_ERROR:
        return Verdict.REFUSED
    if err.kind is ErrorKind.PERMANENT:
        # invalid_grant and friends come after the client check: the client is fine.
        return Verdict.ACCEPTED
    return Verdict.UNDECIDED


def probe_due(c: Circuit, now: datetime) -> bool:
    """Whether a probe of this client goes out at the start of a pass."""
    if c.state is State.UNKNOWN:
        return True
    return c.state is State.OPEN and (c.next_probe_at is None or c.next_probe_at <= now)


def admits(c: Circuit) -> bool:
    """Whether a grant of this client that is not the probe may be sent."""
    return c.state is not State.OPEN


def after(c: Circuit, v: Verdict, now: datetime, s: ScheduleConfig, *, probe: bool,
          rand: float = 1.0) -> Circuit:
    """The circuit after an attempt of one of its grants was answered.

    A refusal of an attempt sent before the circuit opened (``probe`` False while open)
    changes nothing: the step was already taken. The probe steps grow from
    ``interval`` to ``retry_max`` with jitter (``rand`` in [0, 1], see policy.backoff).
    """
    if v is Verdict.ACCEPTED:
        return Circuit(State.CLOSED)
    if v is Verdict.REFUSED:
        if c.state is State.OPEN and not probe:
            return c
        refusals = c.refusals + 1
        return Circuit(State.OPEN, refusals, now + backoff(refusals, s, rand=rand))
    if c.state is State.OPEN and probe:
        # No verdict on the client: try again after the same step.
        return replace(c, next_probe_at=now + backoff(max(c.refusals, 1), s, rand=rand))
    return c


def nothing_to_probe(c: Circuit) -> Circuit:
    """No grant of the client could be probed: an unknown client has nothing to send."""
    return Circuit(State.CLOSED) if c.state is State.UNKNOWN else c


def opened(old: Circuit, new: Circuit) -> bool:
    return not old.blocked and new.blocked


def closed(old: Circuit, new: Circuit) -> bool:
    """The client was accepted after being refused or unknown (an answer to
    :func:`after`): its held grants are released."""
    return old.state is not State.CLOSED and new.state is State.CLOSED


def hold_until(grant: Grant, now: datetime, s: ScheduleConfig) -> datetime:
    """When a held grant comes due again by itself (its circuit's close releases it
    earlier): after ``retry_max``, or when its refresh token ends, if that is sooner, so
    the status change is not late."""
    until = now + s.retry_max
    end = grant.refresh_expires_at
    if end is not None and now < end < until:
        until = end
    return until


def release_order(held: Sequence[tuple[int, datetime | None]],
                  now: datetime) -> list[tuple[int, datetime]]:
    """Due times for released grants ``(id, access expiry)``: all at or before ``now``,
    earliest access-token expiry first (none at all: first of all), then by id."""
    ranked = sorted(held, key=lambda h: (h[1] is not None, h[1] or now, h[0]))
    n = len(ranked)
    return [(gid, now - RELEASE_STEP * (n - i)) for i, (gid, _) in enumerate(ranked)]
