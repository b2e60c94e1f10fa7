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
  first, and grants that are not part of a wall keep their moment. Grants already due
  are kept in expiry order too (moved before a later-expiring grant pulled ahead of
  them), without the pace: their order is all the queue needs.
* :class:`Walk` is the one implementation of all three: it takes the grants one at a
  time in that order, so the daemon streams the table through it (a million grants
  never sit in memory at once); the list functions here feed it a sorted list.
* :func:`needed_rate`: what the table needs over the time ahead (steady state at the
  floor, or the backlog up to each deadline, whichever is more), for the gauge and the
  alert; :func:`describe` says it in words (for ``tokend status``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

# Share of what the rate limiter really sends (the limit less its guard, Walk.sends) the
# plan fills: the rest is for retries, code exchanges and on-demand refreshes.
BUDGET = 0.9
ALERT_RATIO = 0.8  # the alert (and describe) warn when the table needs more than this
MOVE_MIN = timedelta(seconds=1)  # smaller moves are not worth a write
MOVE_MIN_S = MOVE_MIN.total_seconds()
# The moments (seconds since the epoch) Python's datetime can hold, with a day to spare
# for rounding: a value outside (edited by hand: SQLite takes year 0, PostgreSQL BC and
# years past 9999) is no time to the claim, which sets its row aside, nor to the plan,
# whose moves must convert back to datetimes.
FIRST_S = datetime(1, 1, 2, tzinfo=UTC).timestamp()
LAST_S = datetime(9999, 12, 30, tzinfo=UTC).timestamp()


def is_moment(seconds: float) -> bool:
    """Whether ``seconds`` since the epoch is a moment the plan can use (NaN is not)."""
    return FIRST_S <= seconds <= LAST_S


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


Lifetimes = Mapping[float, int]  # lifetime in seconds -> grants with it


def steady_rate(lifetimes: Iterable[float] | Lifetimes, margin: float) -> float:
    """Requests/s when every grant is refreshed ``margin`` seconds before expiry (a margin
    never above half the lifetime, as in :func:`tokend.policy.refresh_at`)."""
    pairs = lifetimes.items() if isinstance(lifetimes, Mapping) else ((x, 1) for x in lifetimes)
    return sum(n / (life - min(margin, life / 2)) for life, n in pairs)


def margin_for(lifetimes: Sequence[float] | Lifetimes, limit: float, aim: timedelta,
               floor: timedelta) -> timedelta:
    """The largest margin in [floor, aim] whose steady-state rate fits ``BUDGET * limit``
    (the floor when none does: then the alert says so)."""
    if not isinstance(lifetimes, Mapping):
        lifetimes = Counter(lifetimes)
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


class Point(NamedTuple):
    """A maintained grant as the walk sees it: moments in seconds since the epoch (a
    tuple: a million of them are made per plan of a big table)."""

    id: int
    obtained: float | None
    expires: float
    next_at: float | None


class Walk:
    """The planner over the maintained grants streamed latest access-token expiry first
    (ties: highest id first), in memory that does not grow with the table.

    ``limit``: the configured rate limit (what :class:`Capacity` reports and the
    alert compares with); ``sends``: what the rate limiter really sends per second
    (``1 / interval``: the limit less its guard), the rate the budget and the pace are
    shares of (``limit`` when not given).

    ``total``: how many grants the stream holds (a count taken just before; the k-th
    earliest deadline is the ``total - seen``-th grant of the walk). Each :meth:`step`
    returns the grant's new planned moment if it moves (see :func:`level`: grants due
    already included, so claims go in expiry order); after the
    last, :meth:`capacity` gives the figures (see :func:`needed_rate`, :func:`margin_for`).
    Lifetimes are kept as a histogram in buckets 0.05 % wide (each bucket's mean): a
    table of a million different lifetimes costs at most ~40,000 entries.
    """

    def __init__(self, now: float, limit: float, floor: timedelta, total: int, *,
                 sends: float | None = None) -> None:
        self.now = now
        self.limit = limit
        self.sends = limit if sends is None else sends
        self.floor = floor
        self.total = total
        self.grants = 0
        self._pace = 1 / (BUDGET * self.sends) if self.sends > 0 else 0.0
        self._floor = floor.total_seconds()
        self._shortest = max(self._floor, 1.0)
        self._following: float | None = None
        self._backlog = 0.0
        self._sums: dict[int, float] = {}
        self._counts: Counter[int] = Counter()

    def step(self, p: Point) -> float | None:
        _id, obtained, expires, next_at = p
        k = self.total - self.grants  # this deadline is the k-th earliest
        self.grants += 1
        ahead = expires - self._floor - self.now
        rate = (k if k > 1 else 1) / (ahead if ahead > self._shortest else self._shortest)
        self._backlog = max(self._backlog, rate)
        if obtained is not None and expires > obtained:
            life = expires - obtained
            key = round(math.log(life) * 2000)
            self._sums[key] = self._sums.get(key, 0.0) + life
            self._counts[key] += 1
        if next_at is None:
            return None
        slot = next_at
        if self._following is not None and self._pace and self._following - self._pace < slot:
            slot = self._following - self._pace
        if obtained is not None and obtained > slot:
            slot = obtained  # no refresh before the token exists
        slot = max(slot, FIRST_S)  # pulled back from near year 1: due now all the same
        moved = bool(self._pace) and next_at - slot >= MOVE_MIN_S
        # The grants expiring earlier come a pace before this one's slot or, when it
        # is due already and keeps its moment, just before that moment: among due
        # grants only the order matters (claims go in next_attempt_at order, as fast as
        # the limiter allows), so a backlog in expiry order is not rewritten. The chain
        # never rises (a slot held back at obtained_at does not lift it). With both, a
        # second plan of the table this one leaves moves nothing, however late it comes.
        at = slot if next_at > self.now or moved else next_at
        self._following = at if self._following is None else min(self._following, at)
        return slot if moved else None

    def lifetimes(self) -> dict[float, int]:
        return {self._sums[key] / n: n for key, n in self._counts.items()}

    def needed(self) -> float:
        return max(steady_rate(self.lifetimes(), self._floor), self._backlog)

    def capacity(self, aim: timedelta) -> Capacity:
        return Capacity(limit=self.limit, needed=self.needed(),
                        margin=margin_for(self.lifetimes(), self.sends, aim, self.floor),
                        aim=aim, floor=self.floor, grants=self.grants)


def _walk(rows: Sequence[Row], now: datetime, limit: float, floor: timedelta,
          sends: float | None = None) -> tuple[Walk, dict[int, datetime]]:
    """A list of rows through :class:`Walk`, in its order."""
    points = sorted((Point(r.id, _epoch(r.obtained_at), r.access_expires_at.timestamp(),
                           _epoch(r.next_attempt_at))
                     for r in rows if r.access_expires_at is not None),
                    key=lambda p: (p.expires, p.id), reverse=True)
    walk = Walk(now.timestamp(), limit, floor, len(points), sends=sends)
    moves = {}
    for p in points:
        at = walk.step(p)
        if at is not None:
            moves[p.id] = datetime.fromtimestamp(at, UTC)
    return walk, moves


def _epoch(t: datetime | None) -> float | None:
    return None if t is None else t.timestamp()


def level(rows: Sequence[Row], now: datetime, limit: float) -> dict[int, datetime]:
    """New planned moments: grants pulled earlier so that, in expiry order, no two are
    planned closer than the limit's pace (``1 / (BUDGET * limit)``).

    Walking the grants from the latest expiry to the earliest, each is planned at
    ``min(its own moment, the next one's - pace)``. Moves are only earlier (never later
    than a grant's own moment, so a grant is never planned past the margin it was
    given) and never before the token was obtained; a move of less than ``MOVE_MIN`` is
    left out. A grant that moves into the past is due now, its place in the queue
    (``next_attempt_at`` order) still by expiry. A grant already due moves too when a
    later-expiring one was pulled before it (else the queue would serve the later
    expiry first), but it needs only to come before that one, not a pace before it:
    for a due grant the next one's moment is the one it has, so a backlog already in
    expiry order keeps its moments, and the table one plan leaves gives the next plan
    no moves, however much later it comes.
    """
    return _walk(rows, now, limit, timedelta(0))[1]


def needed_rate(rows: Sequence[Row], now: datetime, floor: timedelta) -> float:
    """Requests/s the table needs to keep every access token alive with ``floor`` left.

    The larger of the steady state (each grant once per ``lifetime - floor``) and the
    backlog: for the k-th earliest deadline (expiry - floor), k refreshes in the time
    until it (at least ``floor``, so an instant backlog does not read as infinite).
    """
    return _walk(rows, now, 0.0, floor)[0].needed()


def plan(rows: Sequence[Row], now: datetime, limit: float, aim: timedelta,
         floor: timedelta, *, sends: float | None = None,
         ) -> tuple[Capacity, dict[int, datetime]]:
    """The margin to plan with, the table's capacity figures, and the moves to write
    (``sends``: what the limiter really sends per second, see :class:`Walk`)."""
    walk, moves = _walk(rows, now, limit, floor, sends)
    return walk.capacity(aim), moves


def claim_now(*, in_flight: int, most: int, batch: int, workers: int = 0,
              rate: float = 0.0, wait: float = 0.0, backlog: float = 0.0,
              ahead: int = 0) -> int:
    """How many due grants to claim now (0: none for now).

    ``most``: claimed but unfinished attempts this process keeps at most (its worker
    pool's queue, already no more than ``rate * wait``); ``batch``: the most one claim
    takes. With a rate limit (``rate`` > 0, all replicas together), a grant claimed now
    must start within ``wait`` seconds: after the ``backlog`` (seconds of slots already
    taken, by all replicas: on PostgreSQL the shared slot row says how far ahead they
    are) and after ``ahead`` claims of this process that hold no slot yet. Each replica
    bounding only its own queue by ``rate * wait`` would let N replicas queue N times
    what the shared budget sends in ``wait``.

    A claim smaller than a batch is only made while a worker would otherwise idle
    (``in_flight < workers``; ``workers`` 0: never): fewer claim round trips, and no
    worker waits for one. Only for the shared limiter, whose slots are handed out in
    the order they are asked for: the in-process one is not first come first served,
    and grants claimed one by one behind a waiting queue could overtake it.
    """
    n = min(batch, most - in_flight)
    if rate > 0:
        n = min(n, math.floor(rate * (wait - backlog)) - ahead)
    if n <= 0:
        return 0
    return n if n >= min(batch, most) or in_flight < workers else 0


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
