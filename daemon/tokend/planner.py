"""Capacity planning: when each grant is refreshed so the table never needs more than the
rate limit (issue 13; the reasoning and the simulations are in docs/capacity.md).

Pure functions of the table's rows, ``now`` and the settings:

* :func:`margin_for`: the refresh margin to plan with. ``refresh_before`` while the rate
  budget allows it; otherwise the largest margin whose steady-state rate (each grant
  refreshed once per ``lifetime - margin``) fits the budget, but never below
  ``refresh_margin_min``.
* :func:`level`: a bulk import or an outage backlog must not become a wall of due
  grants. Walking the grants from the latest access-token expiry to the earliest, each
  is planned at ``min(its own moment, the next one's - pace)`` ("as late as possible" at
  the limit's pace), so the refreshes a wall needs start early enough, earliest expiry
  first, and grants that are not part of a wall keep their moment.
* :func:`needed_rate`: what the table needs over the time ahead (steady state at the
  floor, or the backlog up to each deadline, whichever is more), for the gauge and the
  alert; :func:`describe` says it in words (for ``tokend status``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

# Share of the limit the plan fills: the rest is for retries, code exchanges, on-demand
# refreshes and the rate limiter's guard.
BUDGET = 0.9
ALERT_RATIO = 0.8  # the alert (and describe) warn when the table needs more than this
MOVE_MIN = timedelta(seconds=1)  # smaller moves are not worth a write


@dataclass(frozen=True)
class Row:
    """What the planner sees of a maintained grant."""

    id: int
    obtained_at: datetime | None
    access_expires_at: datetime | None
    next_attempt_at: datetime | None


@dataclass(frozen=True)
class Capacity:
    limit: float  # requests/s, 0 = unlimited
    needed: float  # requests/s the table needs (see needed_rate)
    margin: timedelta  # the margin planned with now
    aim: timedelta  # schedule.refresh_before
    floor: timedelta  # schedule.refresh_margin_min
    grants: int  # grants with an access token planned

    @property
    def ratio(self) -> float:
        return self.needed / self.limit if self.limit else 0.0


def lifetime(row: Row) -> float | None:
    """The access token's lifetime in seconds (None: unknown or not positive)."""
    if row.obtained_at is None or row.access_expires_at is None:
        return None
    seconds = (row.access_expires_at - row.obtained_at).total_seconds()
    return seconds if seconds > 0 else None


def steady_rate(lifetimes: Iterable[float], margin: float) -> float:
    """Requests/s when every grant is refreshed ``margin`` seconds before expiry (a margin
    never above half the lifetime, as in :func:`tokend.policy.refresh_at`)."""
    return sum(1.0 / (life - min(margin, life / 2)) for life in lifetimes)


def margin_for(lifetimes: Sequence[float], limit: float, aim: timedelta,
               floor: timedelta) -> timedelta:
    """The largest margin in [floor, aim] whose steady-state rate fits ``BUDGET * limit``
    (the floor when none does: then the alert says so)."""
    if limit <= 0 or not lifetimes or steady_rate(lifetimes, aim.total_seconds()) \
            <= BUDGET * limit:
        return aim
    lo, hi = floor.total_seconds(), aim.total_seconds()
    if lo >= hi or steady_rate(lifetimes, lo) > BUDGET * limit:
        return floor
    for _ in range(40):  # the rate grows with the margin: bisect to well under a second
        mid = (lo + hi) / 2
        if steady_rate(lifetimes, mid) <= BUDGET * limit:
            lo = mid
        else:
            hi = mid
    return timedelta(seconds=int(lo))


def level(rows: Sequence[Row], now: datetime, limit: float) -> dict[int, datetime]:
    """New planned moments: grants pulled earlier so that, in expiry order, no two are
    planned closer than the limit's pace (``1 / (BUDGET * limit)``).

    Only grants planned in the future move, and only earlier (never later than their
    own moment, so a grant is never planned past the margin it was given). A move of
    less than ``MOVE_MIN`` is left out. A grant that would move into the past is due
    now, its place in the queue (``next_attempt_at`` order) still by expiry.
    """
    if limit <= 0:
        return {}
    pace = timedelta(seconds=1 / (BUDGET * limit))
    planned = sorted((r for r in rows if r.access_expires_at is not None
                      and r.next_attempt_at is not None),
                     key=lambda r: (r.access_expires_at, r.id), reverse=True)
    moves: dict[int, datetime] = {}
    following: datetime | None = None  # the slot of the grant expiring next after this one
    for r in planned:
        assert r.next_attempt_at is not None
        slot = r.next_attempt_at if following is None else min(r.next_attempt_at,
                                                               following - pace)
        if r.obtained_at is not None:
            slot = max(slot, r.obtained_at)  # no refresh before the token exists
        if r.next_attempt_at > now and r.next_attempt_at - slot >= MOVE_MIN:
            moves[r.id] = slot
        following = slot
    return moves


def needed_rate(rows: Sequence[Row], now: datetime, floor: timedelta) -> float:
    """Requests/s the table needs to keep every access token alive with ``floor`` left.

    The larger of the steady state (each grant once per ``lifetime - floor``) and the
    backlog: for the k-th earliest deadline (expiry - floor), k refreshes in the time
    until it (at least ``floor``, so an instant backlog does not read as infinite).
    """
    lifetimes = [life for life in map(lifetime, rows) if life is not None]
    steady = steady_rate(lifetimes, floor.total_seconds())
    deadlines = sorted(r.access_expires_at - floor for r in rows
                       if r.access_expires_at is not None)
    shortest = max(floor.total_seconds(), 1.0)
    backlog = 0.0
    for k, deadline in enumerate(deadlines, start=1):
        backlog = max(backlog, k / max((deadline - now).total_seconds(), shortest))
    return max(steady, backlog)


def plan(rows: Sequence[Row], now: datetime, limit: float, aim: timedelta,
         floor: timedelta) -> tuple[Capacity, dict[int, datetime]]:
    """The margin to plan with, the table's capacity figures, and the moves to write."""
    lifetimes = [life for life in map(lifetime, rows) if life is not None]
    margin = margin_for(lifetimes, limit, aim, floor)
    capacity = Capacity(limit=limit, needed=needed_rate(rows, now, floor), margin=margin,
                        aim=aim, floor=floor,
                        grants=sum(1 for r in rows if r.access_expires_at is not None))
    return capacity, level(rows, now, limit)


def describe(c: Capacity) -> str:
    """Capacity in words (one line per fact), for ``tokend status``."""
    if c.limit <= 0:
        return (f"capacity: no rate limit set; {c.grants} grants need about "
                f"{c.needed:.2f} refreshes/s")
    lines = [f"capacity: {c.grants} grants need {c.needed:.2f} of {c.limit:g} refreshes/s "
             f"({c.ratio:.0%} of the limit)"]
    if c.margin < c.aim:
        lines.append(f"refresh margin shrunk to {_span(c.margin)} (aim {_span(c.aim)}, "
                     f"floor {_span(c.floor)}) to stay within the limit")
    if c.ratio > 1:
        lines.append("OVER CAPACITY: some access tokens will expire before their refresh; "
                     "raise provider.rate_limit (if the provider allows) or shed grants")
    elif c.ratio > ALERT_RATIO:
        lines.append(f"near capacity (alert above {ALERT_RATIO:.0%}): plan for more "
                     "rate limit before the table grows")
    return "\n".join(lines)


def _span(d: timedelta) -> str:
    s = int(d.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s" if s < 120 else f"{s // 60}m{s % 60}s"
