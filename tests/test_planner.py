"""The capacity planner as pure functions (issue 13), with tables of cases, and the
design decisions replayed in virtual time (bench/capacity_sim.py, docs/capacity.md)."""

from __future__ import annotations

import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tokend import planner, policy
from tokend.config import ScheduleConfig
from tokend.durations import Duration
from tokend.model import Grant, Status
from tokend.planner import Row, claim_now

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import itertools

import capacity_sim

T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)


def rows(n: int, *, life: float = 60.0, expiry: float = 60.0, due: float | None = None,
         start: int = 1, obtained: float | None = None) -> list[Row]:
    """n grants whose tokens (lifetime ``life``) end at ``expiry`` s, planned at ``due``."""
    got = expiry - life if obtained is None else obtained
    at = expiry - 20.0 if due is None else due
    return [Row(i, T0 + got * S, T0 + expiry * S, T0 + at * S) for i in range(start, start + n)]


@pytest.mark.parametrize(("lifetimes", "limit", "aim", "floor", "margin"), [
    # fits at refresh_before: keep it
    ([60.0] * 150, 5.0, 20, 6, 20),
    # 270 grants of 60 s at 5/s (budget 4.5/s): needs lifetime - margin >= 60 -> the floor
    ([60.0] * 270, 5.0, 20, 6, 6),
    # 200 grants: 200 / (60 - m) <= 4.5 -> m <= 15.5
    ([60.0] * 200, 5.0, 20, 6, 15),
    # unlimited: the aim
    ([60.0] * 10_000, 0.0, 20, 6, 20),
    # mixed lifetimes: 100 x 60 s + 100 x 120 s need 3.5/s at 20 s: fits
    ([60.0] * 100 + [120.0] * 100, 5.0, 20, 6, 20),
    # 150 x 60 s + 150 x 120 s: 150/(60-m) + 150/(120-m) <= 4.5 -> m <= 11 s
    ([60.0] * 150 + [120.0] * 150, 5.0, 20, 6, 11),
    # the day scale: 400,000 one-day tokens do not fit at 5/s with any margin -> floor
    ([86400.0] * 400_000, 5.0, 6 * 3600, 600, 600),
    # 300,000 one-day tokens: 300000 / (86400 - m) <= 4.5 -> m <= 19733 s (5.5 h)
    ([86400.0] * 300_000, 5.0, 6 * 3600, 600, 19733),
])
def test_margin_adapts_to_the_budget(lifetimes: list[float], limit: float, aim: int,
                                     floor: int, margin: int) -> None:
    got = planner.margin_for(lifetimes, limit, aim * S, floor * S)
    assert abs(got.total_seconds() - margin) <= 1


def test_levelling_a_bulk_import_spreads_it_in_expiry_order() -> None:
    # 250 grants imported together, all ending at 60 s, planned at 40 s.
    table = rows(250, expiry=60.0, due=40.0, obtained=0.0)
    moves = planner.level(table, T0, 5.0)
    pace = 1 / (planner.BUDGET * 5.0)
    # moved ones that are not clamped at the token's start: evenly at the pace (a grant
    # within MOVE_MIN of its moment keeps it: a clump of at most 1 s x the rate)
    ahead = sorted(at for at in moves.values() if at > T0)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(ahead)]
    assert min(gaps) >= pace - 1e-6
    # never later than planned, never before the token was obtained
    assert all(T0 <= at <= T0 + 40 * S for at in moves.values())
    assert len(moves) == 245  # the last four stay within MOVE_MIN of their moment


@pytest.mark.parametrize(("table", "now", "moved"), [
    # steady state, spread 1 s apart at 5/s: nothing moves
    ([Row(i, T0 - 40 * S + i * S, T0 + 20 * S + i * S, T0 + i * S) for i in range(1, 50)],
     T0, 0),
    # outage backlog: 100 overdue grants stay where they are (due now, by expiry);
    # the 20 due in 2 s behind them are pulled into the queue (all but the 5 within
    # MOVE_MIN of their moment)
    (rows(100, expiry=30.0, due=-60.0) + rows(20, expiry=31.0, due=2.0, start=101),
     T0, 15),
    # client credentials (1 h tokens fetched together): the same rule, rows carry dates
    (rows(30, life=3600.0, expiry=3000.0, due=2000.0), T0, 25),
    # unlimited: nothing to level
    (rows(100, expiry=60.0), T0, 0),
])
def test_level_moves(table: list[Row], now: datetime, moved: int) -> None:
    limit = 0.0 if moved == 0 and len(table) == 100 else 5.0
    assert len(planner.level(table, now, limit)) == moved


def test_level_never_moves_a_grant_later() -> None:
    table = rows(50, expiry=600.0, due=100.0) + rows(50, expiry=60.0, due=40.0, start=51)
    for gid, at in planner.level(table, T0, 5.0).items():
        assert at <= next(r.next_attempt_at for r in table if r.id == gid)  # type: ignore[operator]


def _claim_order(table: list[Row], moves: dict[int, datetime], now: datetime) -> list[Row]:
    """The grants due at ``now`` after the moves, in the order claim_due takes them."""
    at = {r.id: moves.get(r.id, r.next_attempt_at) for r in table}
    return sorted((r for r in table if (m := at[r.id]) is not None and m <= now),
                  key=lambda r: at[r.id])  # type: ignore[arg-type, return-value]


H = 3600.0  # one-hour tokens obtained long ago: no move is held back at obtained_at


@pytest.mark.parametrize(("case", "table", "first"), [
    # a wall planned in 20 s pulls the later-expiring grant 3 (planned in 10 s) into the
    # past, 24 s back: grant 1, due 5 s ago and expiring earlier, must stay ahead of it
    ("future wall", rows(200, life=H, expiry=300.0, due=20.0, start=10)
     + rows(1, life=H, expiry=299.0, due=10.0, start=3)
     + rows(1, life=H, expiry=290.0, due=-5.0, start=1), 1),
    # the same behind a wall of due grants (an outage backlog, 30 s overdue)
    ("due wall", rows(200, life=H, expiry=300.0, due=-30.0, start=10)
     + rows(1, life=H, expiry=299.0, due=10.0, start=3)
     + rows(1, life=H, expiry=290.0, due=-5.0, start=1), 1),
    # due grants planned in the reverse of their expiry order (a backlog whose moments
    # were set by other rules): served earliest expiry first
    ("reversed backlog", rows(1, life=H, expiry=300.0, due=-100.0, start=3)
     + rows(1, life=H, expiry=200.0, due=-50.0, start=2)
     + rows(1, life=H, expiry=100.0, due=-1.0, start=1), 1),
])
def test_due_grants_are_claimed_in_expiry_order(case: str, table: list[Row],
                                                 first: int) -> None:
    moves = planner.level(table, T0, 5.0)
    order = _claim_order(table, moves, T0)
    assert order[0].id == first, case
    expiries = [r.access_expires_at for r in order]
    assert expiries == sorted(expiries), case  # type: ignore[type-var]
    # and the order is written once: planning the moved table again moves nothing
    moved = [replace(r, next_attempt_at=moves.get(r.id, r.next_attempt_at)) for r in table]
    assert planner.level(moved, T0, 5.0) == {}, case
    assert planner.level(moved, T0 + 30 * S, 5.0) == {}, case


def test_a_backlog_in_expiry_order_is_not_rewritten() -> None:
    """Due grants need order, not the pace: a backlog in order (here 0.1 s apart, closer
    than the pace of 0.22 s) keeps its moments, and so does one planned all at once."""
    spaced = [Row(i, T0 - H * S, T0 + (100 + i) * S, T0 + (-60 + 0.1 * i) * S)
              for i in range(1, 300)]
    assert planner.level(spaced, T0, 5.0) == {}
    assert planner.level(rows(300, life=H, expiry=100.0, due=-60.0), T0, 5.0) == {}


@pytest.mark.parametrize(("table", "ratio_min", "ratio_max"), [
    (rows(150, expiry=60.0), 0.5, 0.6),  # 0.5 x the limit
    (rows(270, expiry=60.0), 0.95, 1.05),  # 0.9 x: needs all of it at the floor
    (rows(360, expiry=60.0), 1.3, 1.4),  # 1.2 x: over
    # a backlog: 100 grants ending within 10 s need 100 / (10 - 6 -> 6) s
    (rows(100, expiry=10.0, life=3600.0), 3.0, 3.5),
])
def test_needed_rate(table: list[Row], ratio_min: float, ratio_max: float) -> None:
    ratio = planner.needed_rate(table, T0, 6 * S) / 5.0
    assert ratio_min <= ratio <= ratio_max


def test_describe_says_it_in_words() -> None:
    c = planner.Capacity(limit=5.0, needed=4.6, margin=600 * S, aim=6 * 3600 * S,
                         floor=600 * S, grants=400_000)
    text = planner.describe(c)
    assert "400000 grants need 4.60 of 5 refreshes/s (92% of the limit)" in text
    assert "refresh margin shrunk to 10m (aim 6h, floor 10m)" in text
    assert "near capacity" in text
    over = planner.describe(planner.Capacity(5.0, 6.0, 600 * S, 600 * S, 600 * S, 1))
    assert "OVER CAPACITY" in over


# ---------------------------------------------------------------- decided by simulation


@pytest.mark.parametrize(("fraction", "kept"), [(0.5, 0.5), (0.9, 0.9)])
def test_simulation_keeps_every_grant_up_to_the_limit(fraction: float, kept: float) -> None:
    r = capacity_sim.run(capacity_sim.scaled(fraction), 300.0)
    assert r.late == 0
    assert r.kept_ratio == pytest.approx(kept)


def test_simulation_the_old_policy_loses_a_bulk_import() -> None:
    """The issue's measurement: refresh_before x 0-10 % jitter keeps about a third."""
    r = capacity_sim.run(capacity_sim.scaled(0.9, adaptive=False, levelling=False), 300.0)
    assert r.late_grants > 100


def test_simulation_an_adaptive_margin_alone_is_not_enough() -> None:
    """Without levelling, a bulk import is still a wall: the margin is not the cure."""
    r = capacity_sim.run(capacity_sim.scaled(0.9, levelling=False), 300.0)
    assert r.late_grants > 100


def test_simulation_over_the_limit_alerts_before_the_first_expiry() -> None:
    r = capacity_sim.run(capacity_sim.scaled(1.2), 120.0)
    assert r.alert_before_expiry
    assert not capacity_sim.run(capacity_sim.scaled(0.5), 60.0).alert_before_expiry


def test_simulation_mixed_lifetimes_and_an_outage_backlog() -> None:
    # 200 grants of 60 s and 100 of 120 s (0.92 x the limit's budget at the floor), their
    # tokens ending in a mixed order anywhere from 30 to 90 s: the backlog an outage leaves
    lifetimes = [60.0] * 200 + [120.0] * 100
    n = len(lifetimes)
    first = [30.0 + 60.0 * ((i * 7) % n) / n for i in range(n)]
    r = capacity_sim.run(capacity_sim.Sim(lifetimes=lifetimes, rate=5.0, refresh_before=20.0,
                                          margin_min=6.0, first_expiry=first), 400.0)
    assert r.late == 0
    assert r.alert_before_expiry  # near the limit: said before any token ends


# ---------------------------------------------------------------- policy.refresh_due

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SCHED = ScheduleConfig()  # refresh_before 6h, reconsent_before 7d


def grant(**kw: object) -> Grant:
    base = Grant(
        id=7, client="main", grant_type="authorization_code", user_id="1", tenant_id="2",
        status=Status.OK, reason=None,
        access_expires_at=NOW + timedelta(hours=12), refresh_expires_at=NOW + timedelta(days=20),
        obtained_at=NOW - timedelta(hours=12), consented_at=NOW - timedelta(days=10),
        failure_count=0, last_error=None, next_attempt_at=NOW - S, in_doubt=False,
        token_version=1, has_refresh_token=True, created_at=NOW, updated_at=NOW,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("case", "g", "due"), [
    ("margin reached", grant(access_expires_at=NOW + timedelta(hours=5)), True),
    ("moved earlier by the planner", grant(), True),
    ("client credentials moved earlier", grant(grant_type="client_credentials",
                                                refresh_expires_at=None), True),
    ("not due at all (claimed early by a clock skew)", grant(next_attempt_at=NOW + S), False),
    ("due to enter the re-consent window",
     grant(refresh_expires_at=NOW + timedelta(days=7) - S), False),
    ("due for a reminder", grant(refresh_expires_at=NOW + timedelta(days=3) - S), False),
])
def test_refresh_due(case: str, g: Grant, due: bool) -> None:
    s = replace(SCHED, reminders=(Duration(delta=timedelta(days=3)),))
    if case == "due for a reminder":
        g = replace(g, status=Status.RECONSENT_DUE)
    assert policy.refresh_due(g, NOW, s) is due, case


# ---------------------------------------------------------------- the environment, read once


def test_provider_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests' per-request environment lookups cost CPU per refresh (issue 13, item 5):
    the client reads proxies and the CA bundle once, with requests' own rules."""
    from tokend.config import ProviderConfig
    from tokend.provider import ProviderClient

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/custom.pem")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "tokens.example")
    with ProviderClient(ProviderConfig()) as client:
        assert client._session.trust_env is False
        assert client._verify == "/etc/ssl/custom.pem"
        assert client._proxies_for("http://api.example/x")["http"] == "http://proxy.invalid:3128"
        assert "http" not in client._proxies_for("http://tokens.example/x")
        monkeypatch.setenv("HTTP_PROXY", "http://other.invalid:1")  # read once: unchanged
        assert client._proxies_for("http://api.example/x")["http"] == "http://proxy.invalid:3128"
    with ProviderClient(ProviderConfig(verify_tls=False)) as client:
        assert client._verify is False


# ------------------------------------------------------------ the streaming walk


def _oracle(rows: list[Row], now: datetime, limit: float, floor: timedelta,
            ) -> tuple[dict[int, datetime], float]:
    """The planner on a whole sorted list (as first written, before the streaming walk,
    with due grants kept in expiry order since): the walk must give the same moves and
    the same needed rate."""
    moves: dict[int, datetime] = {}
    if limit > 0:
        pace = timedelta(seconds=1 / (planner.BUDGET * limit))
        following: datetime | None = None
        for r in sorted((r for r in rows if r.access_expires_at and r.next_attempt_at),
                        key=lambda r: (r.access_expires_at, r.id), reverse=True):
            assert r.next_attempt_at is not None
            slot = r.next_attempt_at if following is None else min(r.next_attempt_at,
                                                                   following - pace)
            if r.obtained_at is not None:
                slot = max(slot, r.obtained_at)
            if r.next_attempt_at - slot >= planner.MOVE_MIN:
                moves[r.id] = slot
            # due: the next must only come before the moment this one has; and the
            # chain never rises (held back at obtained_at)
            at = slot if r.next_attempt_at > now else moves.get(r.id, r.next_attempt_at)
            following = at if following is None else min(following, at)
    lifetimes = [x for x in map(planner.lifetime, rows) if x is not None]
    steady = planner.steady_rate(lifetimes, floor.total_seconds())
    deadlines = sorted(r.access_expires_at - floor for r in rows if r.access_expires_at)
    shortest = max(floor.total_seconds(), 1.0)
    backlog = max((k / max((d - now).total_seconds(), shortest)
                   for k, d in enumerate(deadlines, start=1)), default=0.0)
    return moves, max(steady, backlog)


@pytest.mark.parametrize("seed", range(30))
def test_the_walk_plans_as_the_whole_list_did(seed: int) -> None:
    import random

    rnd = random.Random(seed)
    table = []
    for i in range(1, rnd.randint(1, 400)):
        life = rnd.choice([60.0, 120.0, 3600.0, rnd.uniform(10, 500)])
        expiry = rnd.uniform(-30, 600)
        at = expiry - rnd.uniform(0, life) if rnd.random() > 0.05 else None
        got = expiry - life if rnd.random() > 0.05 else None
        table.append(Row(i, None if got is None else T0 + got * S, T0 + expiry * S,
                         None if at is None else T0 + at * S))
    limit = rnd.choice([0.0, 0.5, 5.0, 50.0])
    floor = rnd.choice([1, 6, 60]) * S
    capacity, moves = planner.plan(table, T0, limit, 20 * S, floor)
    want_moves, want_needed = _oracle(table, T0, limit, floor)
    assert moves.keys() == want_moves.keys()
    assert all(abs((moves[i] - want_moves[i]).total_seconds()) < 1e-3 for i in moves)
    assert capacity.needed == pytest.approx(want_needed, rel=1e-3)


@pytest.mark.parametrize("seed", range(30))
def test_a_second_plan_moves_nothing(seed: int) -> None:
    """Moves are written once: the table as the first plan left it gives no moves, at
    the same moment or later (grants come due meanwhile), for any table."""
    import random

    rnd = random.Random(seed)
    table = []
    for i in range(1, rnd.randint(2, 400)):
        life = rnd.choice([60.0, 3600.0, rnd.uniform(10, 500)])
        expiry = rnd.uniform(-30, 600)
        at = expiry - rnd.uniform(0, life)
        table.append(Row(i, T0 + (expiry - life) * S, T0 + expiry * S, T0 + at * S))
    limit = rnd.choice([0.5, 5.0, 50.0])
    moves = planner.level(table, T0, limit)
    moved = [replace(r, next_attempt_at=moves.get(r.id, r.next_attempt_at)) for r in table]
    for later in (0.0, 0.5, rnd.uniform(0, 100)):
        assert planner.level(moved, T0 + later * S, limit) == {}


@pytest.mark.parametrize(("limit", "sends", "pace", "margin"), [
    # no guard known: the configured limit
    (5.0, None, 1 / 4.5, 15),
    # the in-process limiter (guard 20 ms) sends 4.90/s: 200 / (60 - m) <= 4.41
    (5.0, 5.0 / 1.02, 1.02 / 4.5, 14),
    # the shared limiter (guard 100 ms) sends 4.55/s: 200 / (60 - m) <= 4.09 -> 11.1
    (5.0, 5.0 / 1.1, 1.1 / 4.5, 11),
])
def test_the_plan_is_a_share_of_what_the_limiter_sends(
        limit: float, sends: float | None, pace: float, margin: int) -> None:
    """BUDGET is a share of what the limiter really sends (its interval carries a
    guard), not of the configured limit; the capacity still reports the configured one."""
    table = rows(200, expiry=60.0, due=40.0, obtained=0.0)
    capacity, moves = planner.plan(table, T0, limit, 20 * S, 6 * S, sends=sends)
    assert capacity.limit == limit
    assert abs(capacity.margin.total_seconds() - margin) <= 1
    ahead = sorted(at for at in moves.values() if at > T0)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(ahead)]
    assert min(gaps) == pytest.approx(pace, abs=2e-6)  # datetimes hold microseconds


@pytest.mark.parametrize(("seconds", "moment"), [
    (0.0, True), (planner.FIRST_S, True), (planner.LAST_S, True),
    (planner.FIRST_S - 1, False), (planner.LAST_S + 1, False),
    (float("inf"), False), (float("-inf"), False), (float("nan"), False),
])
def test_a_moment_is_what_a_datetime_can_hold(seconds: float, moment: bool) -> None:
    assert planner.is_moment(seconds) is moment
    if moment:
        datetime.fromtimestamp(seconds, UTC)


def test_a_move_pulled_back_past_year_one_stays_a_datetime() -> None:
    """A grant planned (by hand) at the first moment, without obtained_at, is followed by
    grants that level pulls before it: they are due now, at a moment Python can hold."""
    now = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    walk = planner.Walk(now, 0.5, timedelta(minutes=5), 3)
    assert walk.step(planner.Point(3, None, now + 7200, planner.FIRST_S)) is None
    for gid in (2, 1):
        at = walk.step(planner.Point(gid, None, now + 3600, now + 1800))
        assert at == planner.FIRST_S
        datetime.fromtimestamp(at, UTC)


@pytest.mark.parametrize(("kw", "claim"), [
    # no rate limit: a full batch whenever there is room for one
    ({"in_flight": 0, "most": 31, "batch": 16, "workers": 8}, 16),
    ({"in_flight": 16, "most": 31, "batch": 16, "workers": 8}, 0),
    ({"in_flight": 15, "most": 31, "batch": 16, "workers": 8}, 16),
    # one process's limiter (backlog 0): at most rate x wait claimed ahead, whole
    ({"in_flight": 0, "most": 7, "batch": 16, "rate": 5, "wait": 1.5}, 7),
    ({"in_flight": 5, "most": 7, "batch": 16, "rate": 5, "wait": 1.5}, 0),
    # shared: less than a batch, but a worker would idle otherwise
    ({"in_flight": 5, "most": 7, "batch": 16, "workers": 8, "rate": 5, "wait": 1.5}, 2),
    ({"in_flight": 7, "most": 7, "batch": 16, "workers": 8, "rate": 5, "wait": 1.5}, 0),
    ({"in_flight": 4, "most": 31, "batch": 16, "workers": 4, "rate": 100, "wait": 1.5}, 16),
    # shared: the slots all replicas have taken come first
    ({"in_flight": 0, "most": 7, "batch": 16, "workers": 8, "rate": 5, "wait": 1.5,
      "backlog": 1.0}, 2),
    ({"in_flight": 0, "most": 7, "batch": 16, "workers": 8, "rate": 5, "wait": 1.5,
      "backlog": 1.4}, 0),
    ({"in_flight": 0, "most": 7, "batch": 16, "workers": 8, "rate": 5, "wait": 1.5,
      "backlog": 4.3}, 0),
    # ...and this process's claims that hold no slot yet
    ({"in_flight": 9, "most": 30, "batch": 16, "workers": 8, "rate": 10, "wait": 1.5,
      "backlog": 0.5, "ahead": 1}, 0),
    ({"in_flight": 3, "most": 30, "batch": 16, "workers": 4, "rate": 10, "wait": 1.5,
      "backlog": 0.5, "ahead": 0}, 10),
    ({"in_flight": 3, "most": 30, "batch": 16, "workers": 4, "rate": 10, "wait": 1.5,
      "backlog": 0.5, "ahead": 4}, 6),
])
def test_claim_now(kw: dict[str, float], claim: int) -> None:
    assert claim_now(**kw) == claim  # type: ignore[arg-type]


def test_replicas_claiming_in_turn_queue_no_more_than_the_shared_budget_sends_in_wait() -> None:
    """Three replicas, 8 workers each, whose claims take slots at once: their queue
    together stays within rate x wait (each bounding only its own: three times that)."""
    rate, wait = 5.0, 1.5
    backlog, claimed = 0.0, [0, 0, 0]
    for _ in range(5):
        for i in range(3):
            n = claim_now(in_flight=claimed[i], most=7, batch=16, workers=8, rate=rate,
                          wait=wait, backlog=backlog)
            claimed[i] += n
            backlog += n / rate
    assert sum(claimed) <= rate * wait
    assert sum(claimed) == int(rate * wait)
