"""The pass plans (issue 13): walls are pulled earlier in the store, a grant pulled earlier
is refreshed when claimed, and the capacity gauges are set (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import cast

import pytest
from sqlalchemy import Table, text, update

from conftest import CLIENT_ID, CLIENT_SECRET
from tokend.config import Config
from tokend.fake import FakeJustimmo
from tokend.maintenance import Maintenance
from tokend.metrics import Metrics
from tokend.model import NewGrant
from tokend.policy import initial
from tokend.provider import ProviderClient
from tokend.schema import GrantRow
from tokend.store import Store
from tokend.testing import quiet_logs

G = cast(Table, GrantRow.__table__)


@pytest.fixture
def fake() -> Iterator[FakeJustimmo]:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}) as f:
        yield f


def seed(store: Store, config: Config, fake: FakeJustimmo, n: int, *,
         expires_in: timedelta, life: timedelta) -> list[int]:
    now = datetime.now(UTC)
    issued = fake.issue_many(CLIENT_ID, n, user_id_start=1)
    news = [NewGrant(
        client="main", grant_type="authorization_code", access_token=t.access_token,
        access_expires_at=now + expires_in, obtained_at=now + expires_in - life,
        refresh_token=t.refresh_token, refresh_expires_at=t.refresh_expires_at,
        user_id=str(t.user_id), tenant_id=str(t.tenant_id)) for t in issued]
    return store.insert_grants(news, lambda g: initial(g, now, config.schedule))


def limited(config: Config, rate: float = 2.0) -> Config:
    return replace(config, provider=replace(config.provider, rate_limit=rate))


def engine(config: Config, store: Store, metrics: Metrics) -> Maintenance:
    return Maintenance(config, store, ProviderClient(config.provider), metrics=metrics,
                       rand=lambda: 1.0)


def test_a_wall_is_spread_at_the_limits_pace_in_the_store(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> None:
    config = limited(make_config(fake=fake, schedule_extra='refresh_before = "30m"\n'
                                                    'refresh_margin_min = "5m"'))
    store = store_for(config)
    # 60 one-hour tokens ending together in 40 min: all planned ~10 min from now
    ids = seed(store, config, fake, 60, expires_in=timedelta(minutes=40),
               life=timedelta(hours=1))
    before = {g.id: at for g in store.iter_grants() if (at := g.next_attempt_at)}
    metrics = Metrics()
    m = engine(config, store, metrics)
    try:
        m._plan()
        after = {g.id: at for g in store.iter_grants() if (at := g.next_attempt_at)}
        pace = 1 / (0.9 * 2)
        moved = [gid for gid in ids if after[gid] != before[gid]]
        assert len(moved) >= 50
        assert all(after[gid] < before[gid] for gid in moved)
        planned = sorted(after[gid] for gid in moved)
        assert min((b - a).total_seconds() for a, b in pairwise(planned)) >= pace - 0.01
        # planned at the pace the limiter really sends (its guard: 1.96/s in-process,
        # 1.82/s shared), so the budget is a share of what can be sent...
        sends = 1 / m.limiter.interval
        assert min((b - a).total_seconds() for a, b in pairwise(planned)) \
            >= 1 / (0.9 * sends) - 0.001
        # ...while the gauge and the capacity show the configured limit
        assert m.capacity is not None and m.capacity.limit == 2
        assert metrics.registry.get_sample_value("tokend_refresh_rate_limit") == 2
        needed = metrics.registry.get_sample_value("tokend_refresh_rate_needed")
        assert needed is not None and needed > 0
        assert m.capacity is not None and m.capacity.grants == 60
    finally:
        m.close()


def test_a_grant_pulled_earlier_is_refreshed_when_claimed(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> None:
    config = make_config(fake=fake, schedule_extra='refresh_before = "30m"')
    store = store_for(config)
    [gid] = seed(store, config, fake, 1, expires_in=timedelta(hours=2), life=timedelta(hours=3))
    # the planner (of this or another replica) moved it 1 h before its margin
    with store.tx() as conn:
        conn.execute(update(G).where(G.c.id == gid).values(
            next_attempt_at=datetime.now(UTC) - timedelta(seconds=1)))
    m = engine(config, store, Metrics())
    try:
        m._plan_after = float("inf")  # this pass does not plan: only the claim is tested
        result = m.run_pass()
        assert (result.claimed, result.refreshed) == (1, 1)
        assert fake.stats()["rotations"] == 1
    finally:
        m.close()


def test_a_leased_grant_is_not_moved(make_config: Callable[..., Config],
                                     store_for: Callable[..., Store],
                                     fake: FakeJustimmo) -> None:
    config = limited(make_config(fake=fake, schedule_extra='refresh_before = "30m"\n'
                                                    'refresh_margin_min = "5m"'))
    store = store_for(config)
    ids = seed(store, config, fake, 30, expires_in=timedelta(minutes=40),
               life=timedelta(hours=1))
    points = list(store.plan_points(datetime.now(UTC)))
    assert len(points) == 30
    with store.tx() as conn:  # one grant is in flight in another replica
        conn.execute(update(G).where(G.c.id == ids[0]).values(
            lease_owner="other", lease_expires_at=datetime.now(UTC) + timedelta(minutes=5)))
    moves = {p.id: (stored, datetime.now(UTC)) for p, stored in points}
    assert store.replan(moves) == 29  # the leased one keeps its moment and is not counted
    now = datetime.now(UTC)
    after = {g.id: at for g in store.iter_grants() if (at := g.next_attempt_at)}
    assert after[ids[0]] > now + timedelta(minutes=5)
    assert all(after[i] <= now for i in ids[1:])
    with store.plan_snapshot(datetime.now(UTC)) as (total, _):
        assert total == 29
    assert len(list(store.plan_points(datetime.now(UTC)))) == 29


def test_the_plan_streams_the_table_and_skips_rows_that_are_not_times(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> None:
    """plan_points gives what the list planner would be given (latest expiry first, epochs
    exact to the millisecond), leaves out a row whose expiry is not a time (edited by
    hand; the claim sets it aside), and streams in batches smaller than the table."""
    config = make_config(fake=fake)
    store = store_for(config)
    ids = seed(store, config, fake, 25, expires_in=timedelta(minutes=40),
               life=timedelta(hours=1))
    grants = {g.id: g for g in store.iter_grants()}
    if store.dialect == "sqlite":
        with store.tx() as conn:
            conn.execute(text("UPDATE grants SET access_expires_at = 'soon' WHERE id = :i"),
                         {"i": ids[3]})
        kept = [i for i in ids if i != ids[3]]
    else:
        kept = ids
    now = datetime.now(UTC)
    points = [p for p, _ in store.plan_points(now, batch=7)]
    assert [p.id for p in points] == sorted(
        kept, key=lambda i: (grants[i].access_expires_at, i), reverse=True)
    for p in points:
        g = grants[p.id]
        assert g.access_expires_at is not None and g.next_attempt_at is not None
        assert abs(p.expires - g.access_expires_at.timestamp()) < 0.002
        assert abs(cast(float, p.next_at) - g.next_attempt_at.timestamp()) < 0.002
    with store.plan_snapshot(now) as (total, stream):
        assert total == len(kept) == len(list(stream))  # what is counted is what comes


def test_moments_python_cannot_hold_do_not_stop_the_plan(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> None:
    """Moments edited by hand that the database takes as times but Python's datetime cannot
    hold (SQLite year 0; PostgreSQL BC or past 9999) are left out of the plan, as the claim
    sets such rows aside: a move computed from them must not fail the plan of the whole
    table (it did, every pass: plan_failed error=ValueError, the wall never spread)."""
    config = limited(make_config(fake=fake, schedule_extra='refresh_before = "30m"\n'
                                                    'refresh_margin_min = "5m"'))
    store = store_for(config)
    ids = seed(store, config, fake, 60, expires_in=timedelta(minutes=40),
               life=timedelta(hours=1))
    parked = ids[:2]
    with store.tx() as conn:
        if store.dialect == "sqlite":
            # the latest expiry, planned in year 0, and no row knows its obtained_at
            conn.execute(text("UPDATE grants SET obtained_at = NULL"))
            conn.execute(text(
                "UPDATE grants SET next_attempt_at = '0000-06-01T00:00:00.000000Z', "
                "access_expires_at = '2999-01-01T00:00:00.000000Z' WHERE id = :i"),
                {"i": parked[0]})
            parked = parked[:1]
        else:
            # two grants "parked" in year 20000, the later-expiring one planned earlier
            for gid, days, year in ((parked[0], 2, "20000-01-01"), (parked[1], 1, "20000-06-01")):
                conn.execute(text(
                    "UPDATE grants SET access_expires_at = access_expires_at + "
                    f"interval '{days} days', next_attempt_at = '{year}' WHERE id = :i"),
                    {"i": gid})
    before = {g.id: at for g in store.iter_grants() if (at := g.next_attempt_at)}
    m = engine(config, store, Metrics())
    try:
        with quiet_logs("info") as sink:
            m._plan()
        assert "plan_failed" not in sink.getvalue()
        assert m.capacity is not None and m.capacity.grants == 60 - len(parked)
        after = {g.id: at for g in store.iter_grants() if (at := g.next_attempt_at)}
        wall = [gid for gid in ids if gid not in parked]
        assert sum(after[gid] < before[gid] for gid in wall) >= 50
    finally:
        m.close()


def test_an_earlier_expiring_due_grant_is_claimed_before_one_a_wall_pulled_ahead(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> None:
    """A wall pulls a later-expiring grant far into the past: the grant expiring earlier,
    due a moment ago, must still be claimed first (it was left at its own moment, behind
    the pulled one, and could expire while the queue served the later expiry)."""
    config = limited(make_config(fake=fake, schedule_extra='refresh_before = "30m"\n'
                                                    'refresh_margin_min = "5m"'))
    store = store_for(config)
    wall = seed(store, config, fake, 60, expires_in=timedelta(minutes=40),
                life=timedelta(hours=1))
    [later] = seed(store, config, fake, 1, expires_in=timedelta(minutes=39),
                   life=timedelta(hours=1))
    [earlier] = seed(store, config, fake, 1, expires_in=timedelta(minutes=38),
                     life=timedelta(hours=1))
    now = datetime.now(UTC)
    with store.tx() as conn:  # 60 x 0.56 s at 2/s: the wall's plan starts 23 s ago
        conn.execute(update(G).where(G.c.id.in_(wall)).values(
            next_attempt_at=now + timedelta(seconds=10)))
        conn.execute(update(G).where(G.c.id == later).values(
            next_attempt_at=now + timedelta(seconds=5)))
        conn.execute(update(G).where(G.c.id == earlier).values(
            next_attempt_at=now - timedelta(seconds=2)))
    m = engine(config, store, Metrics())
    try:
        m._plan()
        after = {g.id: at for g in store.iter_grants() if (at := g.next_attempt_at)}
        assert after[earlier] < after[later] < now
        [first] = store.claim_due(m.owner, 1, m.lease)
        assert first.id == earlier
    finally:
        m.close()
