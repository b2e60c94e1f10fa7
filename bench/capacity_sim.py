"""A discrete simulation in virtual time of tokend's refresh planning (issue 13).

It replays :mod:`tokend.planner` and :func:`tokend.policy.refresh_at` against a modelled
rate limiter: one request start per ``(1 + guard) / rate`` seconds, due grants served
in ``next_attempt_at`` order (as ``claim_due`` does), a grant seen by the first pass at
or after its due moment, the planner run every ``plan_every`` seconds. Each refresh
gives the grant a new token living ``lifetime`` from the moment it was sent.

Used by ``bench/bench_capacity.py`` (the day-scale run) and by tests/test_planner.py
(the decisions about the design, see docs/capacity.md).
"""

from __future__ import annotations

import heapq
import math
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from tokend import planner
from tokend.model import Grant, GrantType, Status
from tokend.policy import refresh_at

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Sim:
    lifetimes: list[float]  # seconds, one per grant
    rate: float
    refresh_before: float
    margin_min: float
    interval: float = 1.0
    guard: float = 0.02
    plan_every: float = 1.0
    levelling: bool = True  # False: the margin adapts but walls are not spread
    adaptive: bool = True  # False: the old policy (refresh_before x 0-10 % jitter)
    # grants' first expiry in seconds after start (default: all imported fresh at 0)
    first_expiry: list[float] | None = None
    buckets: Counter[int] = field(default_factory=Counter)  # refreshes per bucket
    bucket: float = 60.0


@dataclass
class Result:
    grants: int
    refreshes: int
    late: int  # refreshes sent after the access token had expired
    late_grants: int  # grants refreshed late at least once
    kept_ratio: float  # grants never late / (rate x mean lifetime)
    min_margin: float  # smallest time left at a refresh (s)
    peak_to_mean: float  # refreshes per bucket after the first lifetime: peak / mean
    first_needed_ratio: float  # needed / limit seen by the first plan
    alert_before_expiry: bool  # needed > 0.8 x limit seen before the first expiry


def _grant(i: int, obtained: float, expiry: float) -> Grant:
    return Grant(id=i + 1, client="c", grant_type=GrantType.AUTHORIZATION_CODE,
                 user_id=None, tenant_id=None, status=Status.OK, reason=None,
                 access_expires_at=T0 + timedelta(seconds=expiry), refresh_expires_at=None,
                 obtained_at=T0 + timedelta(seconds=obtained), consented_at=None,
                 failure_count=0, last_error=None, next_attempt_at=None, in_doubt=False,
                 token_version=0, has_refresh_token=True, created_at=T0, updated_at=T0)


def _secs(moment: datetime) -> float:
    return (moment - T0).total_seconds()


def run(sim: Sim, duration: float) -> Result:
    n = len(sim.lifetimes)
    expiry = list(sim.first_expiry or sim.lifetimes)
    obtained = [min(0.0, e - life) for e, life in zip(expiry, sim.lifetimes, strict=True)]
    obtained = [max(o, e - life) for o, e, life in zip(obtained, expiry, sim.lifetimes,
                                                        strict=True)]
    margin = sim.refresh_before
    aim, floor = timedelta(seconds=sim.refresh_before), timedelta(seconds=sim.margin_min)

    def planned(i: int) -> float:
        at = refresh_at(_grant(i, obtained[i], expiry[i]), timedelta(seconds=margin))
        assert at is not None
        return _secs(at)

    def replan(now: float) -> float:
        nonlocal margin
        rows = [planner.Row(i + 1, T0 + timedelta(seconds=obtained[i]),
                            T0 + timedelta(seconds=expiry[i]),
                            T0 + timedelta(seconds=due[i])) for i in range(n)]
        # planned with what the modelled limiter sends, as the daemon plans
        capacity, moves = planner.plan(rows, T0 + timedelta(seconds=now), sim.rate, aim,
                                       floor, sends=sim.rate / (1 + sim.guard))
        if sim.adaptive:
            margin = capacity.margin.total_seconds()
        if sim.levelling and moves:
            for gid, at in moves.items():
                due[gid - 1] = _secs(at)
                version[gid - 1] += 1
            # rebuilt rather than pushed onto: a big plan moves most of the table
            heap[:] = [(due[i], i, version[i]) for i in range(n)]
            heapq.heapify(heap)
        return capacity.ratio

    due = [0.0] * n
    version = [0] * n
    heap: list[tuple[float, int, int]] = []
    for i in range(n):
        due[i] = planned(i)
    heap = [(due[i], i, 0) for i in range(n)]
    heapq.heapify(heap)
    first_ratio = replan(0.0) if sim.adaptive or sim.levelling else 0.0
    if not (sim.adaptive or sim.levelling):
        rows = [planner.Row(i + 1, T0 + timedelta(seconds=obtained[i]),
                            T0 + timedelta(seconds=expiry[i]), None) for i in range(n)]
        first_ratio = planner.needed_rate(rows, T0, floor) / sim.rate
    alert = first_ratio > planner.ALERT_RATIO and min(expiry) > 0
    step = (1 + sim.guard) / sim.rate
    free = 0.0
    next_plan = sim.plan_every
    late = refreshes = 0
    late_ids: set[int] = set()
    min_margin = math.inf
    while heap:
        at, i, v = heapq.heappop(heap)
        if v != version[i]:
            continue
        seen = math.ceil(at / sim.interval - 1e-9) * sim.interval
        t = max(free, seen)
        if t >= duration:
            break
        while (sim.adaptive or sim.levelling) and next_plan <= t:
            heapq.heappush(heap, (at, i, v))  # back in: the plan may move it
            replan(next_plan)
            next_plan += sim.plan_every
            at, i, v = heapq.heappop(heap)
            while v != version[i]:
                at, i, v = heapq.heappop(heap)
            seen = math.ceil(at / sim.interval - 1e-9) * sim.interval
            t = max(free, seen)
        free = t + step
        refreshes += 1
        left = expiry[i] - t
        min_margin = min(min_margin, left)
        if left < 0:
            late += 1
            late_ids.add(i)
        sim.buckets[int(t // sim.bucket)] += 1
        obtained[i], expiry[i] = t, t + sim.lifetimes[i]
        due[i] = planned(i)
        version[i] += 1
        heapq.heappush(heap, (due[i], i, version[i]))
    mean_life = sum(sim.lifetimes) / n
    steady = [c for b, c in sim.buckets.items() if b * sim.bucket >= max(sim.lifetimes)
              and (b + 1) * sim.bucket <= duration]
    peak = max(steady) / (sum(steady) / len(steady)) if steady else 0.0
    return Result(grants=n, refreshes=refreshes, late=late, late_grants=len(late_ids),
                  kept_ratio=(n - len(late_ids)) / (sim.rate * mean_life),
                  min_margin=min_margin, peak_to_mean=peak, first_needed_ratio=first_ratio,
                  alert_before_expiry=alert)


def scaled(fraction: float, **kw: float | bool) -> Sim:
    """The time-scaled case of the issue: 60 s tokens, 5/s, margin 20 s aimed, 6 s floor."""
    n = int(fraction * 5 * 60)
    base = Sim(lifetimes=[60.0] * n, rate=5.0, refresh_before=20.0, margin_min=6.0,
               bucket=5.0)
    return replace(base, **kw)  # type: ignore[arg-type]
