"""A refused client secret blocks the client, not each grant (tokend.circuit), on both
backends against the fake provider: one request per probe step, and after the secret is
fixed (a restart, or the provider taking it back) all grants at once, earliest expiry
first."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from conftest import CLIENT_ID, CLIENT_SECRET
from tokend import circuit
from tokend.config import Config, Secret
from tokend.maintenance import Maintenance
from tokend.metrics import Metrics
from tokend.model import NewGrant, Status
from tokend.policy import initial
from tokend.provider import ProviderClient
from tokend.store import G, Store
from tokend.testing import ManualClock, RecordingFake, quiet_logs, seed_grants

PROVIDER_SECRET = "rotated-at-the-provider"
STEPS = [60, 120, 240, 480, 900, 900, 900]  # seconds: interval doubling up to retry_max


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def fake(clock: ManualClock) -> Iterator[RecordingFake]:
    # The provider has a new secret; tokend's configuration still holds CLIENT_SECRET.
    with RecordingFake(clients={CLIENT_ID: PROVIDER_SECRET}, clock=clock) as f:
        yield f


def with_secret(config: Config, secret: str, **schedule: Any) -> Config:
    """The same configuration with another client secret (as after an operator's edit)."""
    main = replace(config.clients["main"], client_secret=Secret(secret))
    return replace(config, clients={**config.clients, "main": main},
                   schedule=replace(config.schedule, **schedule))


class World:
    def __init__(self, config: Config, store: Store, fake: RecordingFake,
                 clock: ManualClock) -> None:
        self.config, self.store, self.fake, self.clock = config, store, fake, clock
        self.provider = ProviderClient(config.provider, pool_size=8, clock=clock)
        self.engines: list[Maintenance] = []

    def engine(self, config: Config, metrics: Metrics) -> Maintenance:
        metrics.init_clients(((c.name, c.client_credentials) for c in config.clients.values()),
                             config.schedule.interval.total_seconds())
        m = Maintenance(config, self.store, self.provider, metrics=metrics, rand=lambda: 1.0)
        self.engines.append(m)
        return m

    def seed(self, n: int) -> dict[int, datetime]:
        """``n`` due grants whose access tokens expire in an order unlike their ids';
        returns user id -> access expiry."""
        issued = self.fake.issue_many(CLIENT_ID, n, user_id_start=1)
        now = self.clock()
        expiry = {t.user_id: now + timedelta(minutes=30 + (t.user_id or 0) * 7 % n)
                  for t in issued}
        seed_grants(self.store, issued, self.config.schedule,
                    now=now, access_left=lambda t: expiry[t.user_id] - now,
                    age=timedelta(hours=23))
        return {k: v for k, v in expiry.items() if k is not None}

    def requests(self) -> int:
        return int(self.fake.stats()["token_requests"])

    def all_refreshed(self) -> None:
        for g in self.store.iter_grants():
            assert g.status == Status.OK and g.last_error is None and g.failure_count == 0, g
            access, refresh = self.store.tokens(self.store.get(g.id, with_tokens=True))
            assert access is not None and self.fake.access_token_valid(access)
            if g.grant_type == "authorization_code":
                assert refresh is not None and self.fake.refresh_token_valid(refresh)
        assert self.fake.reuse_count() == 0
        assert self.store.events() == []

    def close(self) -> None:
        for m in self.engines:
            m.close()
        self.provider.close()


@pytest.fixture
def world(make_config: Callable[..., Config], store_for: Callable[..., Store],
          fake: RecordingFake, clock: ManualClock) -> Iterator[World]:
    config = make_config(fake=fake, schedule_extra='concurrency = 4\nretry_max = "15m"')
    w = World(config, store_for(config, clock=clock), fake, clock)
    yield w
    w.close()


def blocked(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("tokend_client_blocked", {"client": "main"})


def events(sink: Any, name: str) -> list[dict[str, Any]]:
    out = []
    for line in sink.getvalue().splitlines():
        item = json.loads(line)
        if item.get("event") == name:
            out.append(item)
    return out


def test_wrong_secret_one_request_per_probe_step_then_a_restart_refreshes_all(
        world: World) -> None:
    n = 12
    expiry = world.seed(n)
    metrics = Metrics()
    with quiet_logs("info") as sink:
        wrong = world.engine(world.config, metrics)
        at_start = blocked(metrics)
        result = wrong.run_pass()
        # One probe, refused; the other grants are held back unsent, not failed.
        assert world.requests() == 1, world.fake.log
        assert (result.failures["client"], result.skipped) == (1, n - 1), result
        assert at_start == 0  # the series exists from start-up
        assert blocked(metrics) == 1
        assert wrong.run_pass().claimed == 0 and world.requests() == 1
        t = world.clock()
        for k, step in enumerate(STEPS, start=2):
            world.clock.set(t + timedelta(seconds=step - 1))
            wrong.run_pass()
            assert world.requests() == k - 1, f"probe before its step {k}"
            world.clock.set(t + timedelta(seconds=step))
            wrong.run_pass()
            wrong.run_pass()
            assert world.requests() == k, f"step {k}: {world.fake.log}"
            t = world.clock()
        assert all(r.status == 401 for r in world.fake.log)
        grants = list(world.store.iter_grants())
        assert all(g.status == Status.OK and g.reason is None for g in grants)
        assert all(g.last_error and g.last_error.startswith(circuit.MARKERS) for g in grants)
        assert sum(g.failure_count for g in grants) == 1 + len(STEPS)  # probes only
        assert world.store.events() == []
        assert blocked(metrics) == 1
    assert len(events(sink, "client_authentication_failed")) == 1
    assert len(events(sink, "client_probe_refused")) == len(STEPS)
    assert PROVIDER_SECRET not in sink.getvalue() and CLIENT_SECRET not in sink.getvalue()
    wrong.close()

    # The operator fixes the secret and restarts: the first pass refreshes everything,
    # earliest access-token expiry first, long before any backoff would have ended.
    world.fake.log.clear()
    world.clock.advance(5)
    fixed = with_secret(world.config, PROVIDER_SECRET, concurrency=1)
    metrics = Metrics()
    with quiet_logs("info") as sink:
        result = world.engine(fixed, metrics).run_pass()
    assert (result.refreshed, result.failed) == (n, 0), (result, sink.getvalue()[-2000:])
    users = [r.user_id for r in world.fake.log]
    assert users == sorted(expiry, key=lambda u: expiry[u]), (users, expiry)
    assert all(r.status == 200 for r in world.fake.log)
    world.all_refreshed()
    assert blocked(metrics) == 0
    [restored] = events(sink, "client_authentication_restored")
    assert restored["released"] == n - 1


def test_client_credentials_share_the_circuit_and_a_fix_at_the_provider_reopens_it(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: RecordingFake, clock: ManualClock) -> None:
    config = make_config(fake=fake, client_extra="client_credentials = true",
                         schedule_extra="concurrency = 4")
    w = World(config, store_for(config, clock=clock), fake, clock)
    try:
        w.seed(5)
        metrics = Metrics()
        with quiet_logs("info"):
            m = w.engine(config, metrics)
            first = m.run_pass()
            # The client-credentials row (no token yet) is the most urgent: it probes.
            assert [r[1:] for r in w.fake.log] == [("client_credentials", None, 401)]
            assert (first.failures["client"], first.skipped) == (1, 5)
            clock.advance(60)
            m.run_pass()
            assert len(w.fake.log) == 2 and blocked(metrics) == 1
            # The provider takes the configured secret again (no restart): the next probe
            # is accepted, the circuit closes and everything is refreshed in that pass.
            w.fake.clients[CLIENT_ID] = CLIENT_SECRET
            clock.advance(60)
            assert m.run_pass().claimed == 0  # the second step is 120 s
            clock.advance(60)
            result = m.run_pass()
        assert (result.refreshed, result.failed) == (6, 0), result
        assert w.fake.log[2][1:] == ("client_credentials", None, 200)
        assert sorted(r.grant_type for r in w.fake.log[3:]) == ["refresh_token"] * 5
        assert blocked(metrics) == 0
        w.all_refreshed()
    finally:
        w.close()


def test_a_refused_grant_of_a_working_client_does_not_block_it(world: World) -> None:
    """league checks the client first: invalid_grant on a probe proves the client good."""
    world.fake.clients[CLIENT_ID] = CLIENT_SECRET
    issued = world.fake.issue_many(CLIENT_ID, 1, user_id_start=50)
    world.seed(4)
    assert issued[0].refresh_token is not None
    world.fake.revoke_refresh_token(issued[0].refresh_token)
    now = world.clock()
    world.store.insert_grants([NewGrant(
        client="main", grant_type="authorization_code", access_token=issued[0].access_token,
        access_expires_at=now + timedelta(minutes=1), obtained_at=now - timedelta(hours=23),
        refresh_token=issued[0].refresh_token, refresh_expires_at=issued[0].refresh_expires_at,
        user_id="50")], lambda g: initial(g, now, world.config.schedule))
    metrics = Metrics()
    with quiet_logs():
        result = world.engine(world.config, metrics).run_pass()
    assert world.fake.log[0][1:3] == ("refresh_token", 50)  # the probe: earliest expiry
    assert (result.refreshed, result.failures["permanent"]) == (4, 1), result
    assert blocked(metrics) == 0


def test_probe_claims_no_live_lease_and_release_spares_leased_grants(world: World) -> None:
    world.seed(3)
    now = world.clock()
    lease = timedelta(minutes=2)
    [first] = world.store.claim_due("other-replica", 1, lease)
    probe = world.store.claim_probe("main", circuit.MARKERS, "me", lease)
    assert probe is not None and probe.id != first.id and probe.lease_owner == "me"
    # Held grants (not due) are found by their last_error, the leased one is not.
    with world.store.engine.begin() as conn:
        conn.execute(update(G).where(G.c.lease_owner.is_(None)).values(
            last_error=circuit.HELD, next_attempt_at=now + timedelta(minutes=15)))
    assert world.store.claim_due("x", 10, lease) == []
    again = world.store.claim_probe("main", circuit.MARKERS, "me2", lease)
    assert again is not None and again.id not in (first.id, probe.id)
    assert world.store.claim_probe("main", circuit.MARKERS, "me3", lease) is None
    assert world.store.release_held("main", circuit.MARKERS, circuit.release_order) == 0
    world.store.release(again, "me2", again.next_attempt_at)
    assert world.store.release_held("main", circuit.MARKERS, circuit.release_order) == 1
    [due] = world.store.claim_due("y", 10, lease)
    assert due.id == again.id
