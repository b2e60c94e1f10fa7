"""Fault injection with real processes: the fake provider and ``tokend run`` as processes of
their own, real PostgreSQL, real signals, a real database outage; and a simulated day of
provider outages driven in-process with a controllable clock.

Each test checks the promise that matters to a user of tokend: a rotated refresh token
is never lost (zero reuse at the provider, every stored token the provider's current
one), and no healthy grant is ever flagged for re-consent.

Random moments come from a seeded generator (``FAULTS_SEED``, printed on failure), so a
failing round can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine

import faultlib as fl
from conftest import IN_CI
from tokend.config import Config, load_config
from tokend.crypto import generate_key
from tokend.maintenance import Maintenance
from tokend.metrics import Metrics
from tokend.model import NewGrant, Status
from tokend.policy import initial
from tokend.provider import ProviderClient
from tokend.saver import room_for
from tokend.store import Store, open_store
from tokend.testing import (
    RecordingFake,
    free_port,
    make_key_file,
    quiet_logs,
    reset_pg,
    seed_grants,
    write_config,
)

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

SEED = int(os.environ.get("FAULTS_SEED", "20241128"))
CONCURRENCY = 8
LATENCY = 0.02


# --------------------------------------------------------------------------- the world


@dataclass
class Row:
    id: int
    user_id: int
    status: str
    reason: str | None
    lease_owner: str | None
    in_doubt: bool
    failure_count: int
    refresh_token: str | None
    obtained_at: datetime | None


class World:
    """The fake provider process, a config file, the store (for seeding and reading)."""

    def __init__(self, workdir: Path, db_url: str, *, latency: float = LATENCY,
                 access_ttl: float = 86400.0, **config: Any) -> None:
        self.workdir = workdir
        self.db_url = db_url
        self.key = make_key_file(workdir / "tokend-key")
        self.fake = fl.FakeProcess(workdir, latency=latency, access_ttl=access_ttl)
        self.config_path = write_config(
            workdir / "tokend.toml", db_url=db_url, token_url=self.fake.token_url,
            key_file=self.key, concurrency=CONCURRENCY, **config)
        self.config: Config = load_config(self.config_path, env={})
        upgraded = fl.tokend(self.config_path, "db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        self.store: Store = open_store(self.config)
        self.sql = fl.Sql(db_url)
        self.daemons: list[fl.Daemon] = []

    def seed(self, n: int) -> None:
        seed_grants(self.store, self.fake.issue(n), self.config.schedule,
                    age=timedelta(hours=23))

    def daemon(self, *args: str, name: str) -> fl.Daemon:
        d = fl.Daemon(self.config_path, *args, log=self.workdir / f"{name}.log")
        self.daemons.append(d)
        return d

    def rows(self) -> list[Row]:
        out = []
        for r in self.sql.rows(
                "SELECT id, user_id, status, reason, lease_owner, in_doubt, failure_count, "
                "refresh_token, obtained_at FROM grants ORDER BY id"):
            refresh = self.store.cipher.decrypt(r[7], grant_id=r[0]) if r[7] else None
            out.append(Row(r[0], int(r[1]), r[2], r[3], r[4], bool(r[5]), r[6], refresh, r[8]))
        return out

    def validity(self, rows: list[Row]) -> dict[int, tuple[bool, bool]]:
        """grant id -> (the fake accepts its stored refresh token, it is the newest)."""
        pairs = [(r.user_id, r.refresh_token or "") for r in rows]
        return {r.id: v for r, v in zip(rows, self.fake.validity(pairs), strict=True)}

    def wait_for_requests(self, at_least: int, timeout: float, proc: fl.Proc) -> int:
        """Poll the fake until it has seen ``at_least`` token requests (since the last reset)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = int(self.fake.stats()["token_requests"])
            if seen >= at_least:
                return seen
            if not proc.running:
                raise AssertionError(f"tokend exited early ({proc.popen.returncode}) after "
                                     f"{seen} requests:\n{proc.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {seen} of {at_least} requests after {timeout}s:\n"
                                     f"{proc.output()}")
            time.sleep(0.01)

    def close(self) -> None:
        for d in self.daemons:
            d.reap()
        self.fake.reap()
        self.store.close()
        self.sql.close()


@pytest.fixture
def pg(pg_url: str) -> Iterator[str]:
    reset_pg(pg_url)
    yield pg_url
    reset_pg(pg_url)


def _crashes(d: fl.Daemon) -> list[dict[str, Any]]:
    return [e for e in d.log_events()
            if e.get("event") in ("grant_attempt_crashed", "pass_crashed")
            or e.get("level") in ("critical",)]


# --------------------------------------------------------------------------- 1. SIGTERM


def test_sigterm_during_a_pass_loses_nothing(tmp_path: Path, pg: str) -> None:
    """20 times: a pass of 2,000 refreshes, SIGTERM at a random moment of it.

    tokend must exit 0 promptly, leave no lease behind, and every grant must hold the
    provider's current refresh token (no rotation lost, no token used twice).
    """
    n, rounds = 2000, 20
    rng = random.Random(SEED)
    world = World(tmp_path, pg)
    stop_times: list[float] = []
    refreshed_total = 0
    try:
        world.seed(n)
        for rnd in range(rounds):
            ctx = f"round {rnd} (FAULTS_SEED={SEED})"
            world.sql.mark_all_due()
            world.fake.reset_stats()
            started = datetime.now(UTC)
            target = rng.randint(1, n - 1)
            d = world.daemon("run", name=f"sigterm-{rnd}")
            world.wait_for_requests(target, 60, d)
            d.signal(signal.SIGTERM)
            t0 = time.monotonic()
            code = d.wait(20)
            stop_times.append(time.monotonic() - t0)
            assert code == 0, f"{ctx}: exit {code} after SIGTERM:\n{d.output()}"
            assert stop_times[-1] < 10, f"{ctx}: took {stop_times[-1]:.1f}s to stop"
            assert not _crashes(d), f"{ctx}: {_crashes(d)}"
            assert any(e.get("event") == "stopped" for e in d.log_events()), ctx

            stats = world.fake.stats()
            assert stats["in_flight"] == 0, f"{ctx}: requests still in flight after exit"
            assert stats["reuse_count"] == 0, f"{ctx}: a refresh token was used twice"
            assert stats["errors_by_code"] == {}, f"{ctx}: {stats['errors_by_code']}"
            assert stats["rotations"] == stats["token_requests"] >= target, (ctx, stats)

            rows = world.rows()
            bad = [r for r in rows if (r.status, r.reason, r.lease_owner, r.in_doubt,
                                       r.failure_count) != ("ok", None, None, False, 0)]
            assert not bad, f"{ctx}: {len(bad)} grants not clean after a graceful stop: {bad[:3]}"
            # every rotation the provider made this round was saved ...
            saved = sum(1 for r in rows if r.obtained_at is not None and r.obtained_at >= started)
            assert saved == stats["rotations"], f"{ctx}: {stats['rotations']} rotated, {saved} saved"
            refreshed_total += saved
            # ... and every stored refresh token is the provider's current, valid one
            validity = world.validity(rows)
            broken = [gid for gid, (ok, newest) in validity.items() if not (ok and newest)]
            assert not broken, f"{ctx}: grants holding a dead refresh token: {broken[:10]}"
    finally:
        world.close()
    print(f"\nSIGTERM x{rounds}: {refreshed_total} refreshes saved, stop took "
          f"max {max(stop_times):.2f}s / mean {sum(stop_times) / len(stop_times):.2f}s")


def _refreshed_since(row: Row, moment: datetime) -> bool:
    value: Any = row.obtained_at  # SQLite's raw rows hold text
    if value is None:
        return False
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return bool(value.replace(tzinfo=UTC) >= moment)


def test_sigterm_during_run_once_finishes_and_saves_what_is_in_flight(
        tmp_path: Path, db_url: str) -> None:
    """``run --once`` (cron, a oneshot unit) gets SIGTERM mid-pass: like ``run``, it stops
    claiming, saves the refreshes in flight, gives the rest back, and exits 0; the next
    ``run --once`` refreshes the rest. No rotated token is lost, none used twice."""
    n = 300
    rng = random.Random(SEED + 7)
    world = World(tmp_path, db_url, latency=0.05)
    if db_url.startswith("sqlite"):  # fl.Sql's connect_timeout is psycopg's
        world.sql.engine = create_engine(db_url)
    try:
        world.seed(n)
        started = datetime.now(UTC)
        target = rng.randint(20, n // 2)
        d = world.daemon("run", "--once", name="once-sigterm")
        world.wait_for_requests(target, 60, d)
        d.signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = d.wait(20)
        took = time.monotonic() - t0
        assert code == 0, f"exit {code} after SIGTERM (target {target}):\n{d.output()}"
        assert took < 10, f"took {took:.1f}s to stop"
        assert not _crashes(d), _crashes(d)
        events = [e.get("event") for e in d.log_events()]
        assert "signal_received" in events and "stopped" in events, events

        stats = world.fake.stats()
        assert stats["in_flight"] == 0 and stats["reuse_count"] == 0, stats
        assert stats["errors_by_code"] == {}, stats
        assert target <= stats["rotations"] == stats["token_requests"] < n, stats
        rows = world.rows()
        assert [r for r in rows if (r.status, r.lease_owner, r.in_doubt, r.failure_count)
                != ("ok", None, False, 0)] == []
        saved = sum(1 for r in rows if _refreshed_since(r, started))
        assert saved == stats["rotations"], f"{stats['rotations']} rotated, {saved} saved"
        validity = world.validity(rows)
        assert [gid for gid, v in validity.items() if not all(v)] == []

        # the grants given back unsent are due again: the next run does them
        done = fl.tokend(world.config_path, "run", "--once", timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = world.rows()
        assert all(_refreshed_since(r, started) for r in rows)
        assert world.fake.stats()["reuse_count"] == 0
        assert all(all(v) for v in world.validity(rows).values())
    finally:
        world.close()
    print(f"\nrun --once SIGTERM after {target} requests: {saved} saved, stop took {took:.2f}s")


# --------------------------------------------------------------------------- 2. SIGKILL


def test_sigkill_at_random_moments_loses_at_most_the_refreshes_in_flight(
        tmp_path: Path, pg: str) -> None:
    """20 times: SIGKILL during a pass; then a restart resolves every grant.

    Right after each kill, the fake tells which stored refresh tokens it no longer
    accepts: those grants are lost (the provider rotated, the answer died with the
    process). They must be among the grants the dead process had leased, and at most
    ``saver.room_for(concurrency)`` of them (requests in flight and new tokens waiting for
    their commit). Every other grant must hold the provider's current token.
    After a restart (leases expired), each lost grant is ``reconsent_required`` with
    reason ``rotation_lost`` and every other grant is ``ok`` and refreshed.
    """
    n, rounds = 1000, 20
    rng = random.Random(SEED + 1)
    world = World(tmp_path, pg)
    lost: set[int] = set()
    per_kill: list[int] = []
    try:
        world.seed(n)
        for rnd in range(rounds):
            ctx = f"kill {rnd} (FAULTS_SEED={SEED})"
            # time passes: the dead process's leases run out, every other grant is due
            world.sql.expire_leases()
            world.sql.mark_all_due()
            world.fake.reset_stats()
            due = world.sql.scalar("SELECT count(*) FROM grants WHERE next_attempt_at <= now()")
            target = rng.randint(1, due)
            d = world.daemon("run", name=f"sigkill-{rnd}")
            world.wait_for_requests(target, 60, d)
            d.signal(signal.SIGKILL)
            assert d.wait(10) == -signal.SIGKILL, ctx
            world.fake.wait_idle()

            rows = world.rows()
            validity = world.validity(rows)
            leased = {r.id for r in rows if r.lease_owner is not None}
            dead = {r.id for r in rows if r.status == "ok" and not validity[r.id][0]}
            new = dead - lost
            assert new <= leased, f"{ctx}: grants lost without a lease: {sorted(new - leased)}"
            assert len(new) <= room_for(CONCURRENCY), f"{ctx}: {len(new)} grants lost by one kill"
            per_kill.append(len(new))
            lost |= new
            broken = [r.id for r in rows if r.id not in lost and r.status == "ok"
                      and not all(validity[r.id])]
            assert not broken, f"{ctx}: grants silently broken: {broken[:10]}"
            flagged = {r.id for r in rows if r.status != "ok"}
            assert flagged <= lost, f"{ctx}: healthy grants flagged: {sorted(flagged - lost)}"

        # the restart: leases have expired, one full pass
        unresolved = {r.id for r in world.rows() if r.id in lost and r.status == "ok"}
        world.sql.expire_leases()
        world.sql.mark_all_due()
        world.fake.reset_stats()
        done = fl.tokend(world.config_path, "run", "--once", timeout=120)
        assert done.returncode == (1 if unresolved else 0), done.stderr[-3000:]
        rows = world.rows()
        validity = world.validity(rows)
        for r in rows:
            if r.id in lost:
                assert (r.status, r.reason) == ("reconsent_required", "rotation_lost"), r
            else:
                assert (r.status, r.lease_owner, r.in_doubt) == ("ok", None, False), r
                assert all(validity[r.id]), f"grant {r.id} silently broken after the restart"
        # each lost grant not yet flagged was tried once more with its dead token; no other
        # grant presented a token twice, no other error
        stats = world.fake.stats()
        assert stats["reuse_count"] == len(unresolved), (stats, unresolved)
        expected = {"invalid_request": len(unresolved)} if unresolved else {}
        assert stats["errors_by_code"] == expected, stats
    finally:
        world.close()
    print(f"\nSIGKILL x{rounds}: lost per kill {per_kill} (total {len(lost)} of {n})")


# --------------------------------------------------------------------------- 2b. restart after kill -9


def test_a_restart_after_sigkill_takes_over_the_leases_at_once(tmp_path: Path, pg: str) -> None:
    """30 grants with 12 s access tokens; ``tokend run`` is killed (SIGKILL) while it holds
    leases on them: its requests hang at the provider before rotating, more are queued.
    Restarted on the same host with the same configuration, tokend must take the dead
    process's leases over at once (not after the 2-minute lease, when every access token
    has long expired), refresh them (in doubt, then cleared), and lose nothing.
    """
    n, ttl = 30, 12
    world = World(tmp_path, pg, access_ttl=ttl, interval="2s")
    try:
        now = datetime.now(UTC)
        world.store.insert_grants([NewGrant(
            client="main", grant_type="authorization_code", access_token=t["access_token"],
            access_expires_at=now + timedelta(seconds=ttl), obtained_at=now - timedelta(hours=1),
            refresh_token=t["refresh_token"],
            refresh_expires_at=datetime.fromisoformat(t["refresh_expires_at"]),
            user_id=str(t["user_id"]), tenant_id=str(t["tenant_id"]))
            for t in world.fake.issue(n)], lambda g: initial(g, now, world.config.schedule))
        # every request hangs at the provider before it rotates anything
        world.fake.inject("timeout", seconds=60)
        first = world.daemon("run", name="first")
        world.wait_for_requests(CONCURRENCY, 60, first)
        fl.wait_until(lambda: world.sql.scalar(
            "SELECT count(*) FROM grants WHERE lease_owner IS NOT NULL") > CONCURRENCY, 30,
            what="more grants leased than in flight")
        first.signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        leased = world.sql.scalar("SELECT count(*) FROM grants WHERE lease_owner IS NOT NULL")
        assert leased > CONCURRENCY
        world.fake.clear_faults()
        world.fake.reset_stats()

        restarted = datetime.now(UTC)
        t0 = time.monotonic()
        second = world.daemon("run", name="second")
        fl.wait_until(lambda: world.sql.scalar(
            "SELECT count(*) FROM grants WHERE status = 'ok' AND lease_owner IS NULL "
            "AND NOT in_doubt AND obtained_at >= :t", t=restarted) == n, 30, interval=0.1,
            what=f"all {n} grants refreshed after the restart (the killed process held "
                 f"{leased} leases)")
        took = time.monotonic() - t0
        taken = [e for e in second.log_events()
                 if e.get("event") == "dead_owner_leases_taken_over"]
        assert [e.get("grants") for e in taken] == [leased], taken
        time.sleep(3)  # a few more passes of 12 s tokens
        second.signal(signal.SIGTERM)
        assert second.wait(20) == 0, second.output()
        assert not _crashes(second), _crashes(second)

        stats = world.fake.stats()
        assert stats["reuse_count"] == 0, stats
        assert stats["errors_by_code"] == {}, stats
        rows = world.rows()
        assert all((r.status, r.reason, r.lease_owner, r.in_doubt) == ("ok", None, None, False)
                   for r in rows), [r for r in rows if r.status != "ok" or r.in_doubt][:5]
        validity = world.validity(rows)
        assert all(all(v) for v in validity.values()), \
            [gid for gid, v in validity.items() if not all(v)][:10]
        # the access tokens stored are the provider's, unexpired ones accepted
        probe = requests.Session()
        probe.trust_env = False
        try:
            for gid, exp, token in world.sql.rows(
                    "SELECT id, access_expires_at, access_token FROM grants"):
                if exp > datetime.now(UTC) + timedelta(seconds=1):
                    r = probe.get(world.fake.base_url + "/oauth/user/current", timeout=10,
                                  headers={"Authorization": "Bearer " + world.store.cipher
                                           .decrypt(token, grant_id=gid)})
                    assert r.status_code == 200, (gid, r.status_code, r.text[:200])
        finally:
            probe.close()
    finally:
        world.close()
    print(f"\nkill -9 with {leased} of {n} grants leased: all refreshed {took:.1f}s after "
          "the restart")


# --------------------------------------------------------------------------- 3. PostgreSQL down


def _pg_cluster_or_skip() -> tuple[str, str]:
    cluster = fl.pg_cluster()
    if cluster is None:
        message = "no local PostgreSQL cluster on port 5432 that pg_ctlcluster can stop"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return cluster


def test_database_outage_mid_pass_loses_no_rotated_token(tmp_path: Path, pg: str) -> None:
    """PostgreSQL stops for 30 s in the middle of a pass, then comes back.

    Refreshes in flight when the database goes away rotate at the provider; their new
    tokens must be held and saved once it is back. The daemon keeps running, later
    passes succeed, no grant is flagged, no token is used twice.
    """
    cluster = _pg_cluster_or_skip()
    if "127.0.0.1:5432" not in pg and "localhost:5432" not in pg:
        pytest.skip("TOKEND_TEST_DATABASE_URL is not the local cluster")
    n = 1000
    port = free_port()
    world = World(tmp_path, pg, interval="5s", listen=f"127.0.0.1:{port}")
    probe = requests.Session()
    probe.trust_env = False
    try:
        world.seed(n)
        started = datetime.now(UTC)
        world.fake.reset_stats()
        d = world.daemon("run", name="pg-outage")
        world.wait_for_requests(n // 3, 60, d)
        try:
            fl.pg_ctl("stop", cluster)
            stopped = world.fake.stats()["token_requests"]
            time.sleep(30)
            assert d.running, f"tokend died with the database:\n{d.output()}"
            # no claims without the database: only what was already claimed went out
            during = world.fake.stats()["token_requests"] - stopped
            assert during <= 6 * CONCURRENCY, f"{during} refreshes while the database was down"
        finally:
            fl.pg_ctl("start", cluster)
            fl.wait_until(lambda: fl.pg_ready(pg), 60, interval=0.5, what="PostgreSQL")
            fl.dispose_all_engines()  # pools of this process hold killed connections
        # later passes finish the work
        fl.wait_until(lambda: world.fake.stats()["token_requests"] >= n, 150, interval=0.5,
                      what=f"all {n} grants refreshed after the outage")
        fl.wait_until(lambda: world.sql.scalar(
            "SELECT count(*) FROM grants WHERE lease_owner IS NULL AND obtained_at >= :t",
            t=started) == n, 60, interval=0.5, what="every refresh saved")
        assert d.running, d.output()
        health = probe.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 200, health.text
        fl.wait_until(lambda: probe.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                      .status_code == 200, 30, interval=0.5, what="/readyz 200")

        stats = world.fake.stats()
        assert stats["reuse_count"] == 0
        assert stats["errors_by_code"] == {}
        assert stats["rotations"] == n, stats
        rows = world.rows()
        assert all((r.status, r.reason) == ("ok", None) for r in rows), \
            [r for r in rows if r.status != "ok"][:5]
        validity = world.validity(rows)
        assert all(all(v) for v in validity.values()), \
            [gid for gid, v in validity.items() if not all(v)][:10]
        events = d.log_events()
        held = [e for e in events if e.get("event") == "save_failed_retrying"
                and e.get("holding_rotated_token")]
        assert held, "no rotated token was held in memory: the outage missed the pass"
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0, d.output()
    finally:
        world.close()
        probe.close()
        if not fl.pg_online(cluster):  # never leave the cluster down
            fl.pg_ctl("start", cluster)
            fl.wait_until(lambda: fl.pg_ready(pg), 60, interval=0.5, what="PostgreSQL")
        fl.dispose_all_engines()


# --------------------------------------------------------------------------- 4. a day of outages


def _backoff_floor(failures: int, interval: timedelta, retry_max: timedelta) -> timedelta:
    """The shortest delay exponential backoff with equal jitter allows after ``failures``."""
    return min(interval * int(2 ** min(failures - 1, 32)), retry_max) * 0.5


def _backoff_ceiling(failures: int, interval: timedelta, retry_max: timedelta) -> timedelta:
    return min(interval * int(2 ** min(failures - 1, 32)), retry_max)


def _max_attempts(window: timedelta, interval: timedelta, retry_max: timedelta) -> int:
    """Most attempts one grant can make within ``window`` under that backoff."""
    attempts, spent = 1, timedelta(0)
    while True:
        spent += _backoff_floor(attempts, interval, retry_max)
        if spent > window:
            return attempts
        attempts += 1


def test_a_day_of_provider_outages(tmp_path: Path, pg: str) -> None:
    """A simulated day: 8 h of outages (HTML 5xx, timeouts, connection refused, 429 with
    Retry-After), then normal service; passes every ``interval`` of simulated time.

    Only the grants whose refresh token truly expired during the outage are flagged;
    backoff and Retry-After bound every grant's requests; every grant recovers on its
    first attempt after the outage; no token is used twice.
    """
    rng = random.Random(SEED + 4)
    t0 = fl.utc(2024, 3, 1, 0, 0)
    clock = fl.Clock(t0 - timedelta(days=40))
    interval, retry_max = timedelta(minutes=5), timedelta(hours=1)
    retry_after = 5400  # longer than retry_max: only Retry-After explains such a gap
    key = tmp_path / "tokend-key"
    key.write_text(generate_key() + "\n")
    fake = RecordingFake(clients={fl.CLIENT_ID: fl.CLIENT_SECRET}, clock=clock,
                         request_times_limit=0)
    fake.start()
    path = write_config(tmp_path / "tokend.toml", db_url=pg, token_url=fake.token_url,
                           key_file=key, interval="5m", retry_max="1h", timeout="1s")
    config = load_config(path, env={})
    store = open_store(config, clock=clock, auto_upgrade=True)
    provider = ProviderClient(config.provider, pool_size=CONCURRENCY, clock=clock)
    engine = Maintenance(config, store, provider, metrics=Metrics(), rand=rng.random)
    quiet = quiet_logs()
    quiet.__enter__()

    # 48 healthy grants whose access tokens come due one every 30 min of the day (from
    # 6 h before t0), and 4 whose refresh tokens end 3 h into the outage.
    news: list[NewGrant] = []
    healthy: dict[int, int] = {}  # user id -> index
    for k in range(48):
        clock.set(t0 - timedelta(days=1) + timedelta(minutes=30 * k))
        [t] = fake.issue_many(fl.CLIENT_ID, 1, user_id_start=100 + k)
        healthy[100 + k] = k
        news.append(_new_grant(t))
    expiring: set[int] = set()
    for k in range(4):
        clock.set(t0 + timedelta(hours=3) - timedelta(days=29))  # P1M from here ends t0+3h
        [t] = fake.issue_many(fl.CLIENT_ID, 1, user_id_start=900 + k)
        assert t.refresh_expires_at == t0 + timedelta(hours=3)
        expiring.add(900 + k)
        news.append(_new_grant(t))
    clock.set(t0)
    store.insert_grants(news, lambda g: initial(g, t0, config.schedule))

    outage_end = t0 + timedelta(hours=8)
    phases = [  # (start, what)
        (t0, "html_500"), (t0 + timedelta(hours=2), "timeout"),
        (t0 + timedelta(hours=4), "refused"), (t0 + timedelta(hours=6), "rate_limited"),
        (outage_end, "normal"),
    ]
    # per grant, each attempt seen from the store: (time, "ok" or "fail", phase)
    attempts: dict[int, list[tuple[datetime, str, str]]] = defaultdict(list)
    last = {g.id: (g.failure_count, g.obtained_at) for g in store.iter_grants()}
    phase = None
    try:
        now = t0
        while now <= t0 + timedelta(hours=24):
            clock.set(now)
            current = [what for start, what in phases if start <= now][-1]
            if current != phase:
                fake.clear_faults()
                if phase == "refused":
                    fake.resume()
                if current == "html_500":
                    fake.inject("html_500", status=503)
                elif current == "timeout":
                    fake.inject("timeout", seconds=3)
                elif current == "refused":
                    fake.pause()
                elif current == "rate_limited":
                    fake.inject("rate_limited", retry_after=retry_after)
                phase = current
            result = engine.run_pass()
            assert result.failures.get("internal", 0) == 0, (now, result)
            assert result.failures.get("permanent", 0) == 0, (now, result)
            assert result.failures.get("client", 0) == 0, (now, result)
            for g in store.iter_grants():
                failures, obtained = last[g.id]
                if g.obtained_at != obtained:
                    attempts[g.id].append((now, "ok", current))
                elif g.failure_count > failures:
                    attempts[g.id].append((now, "fail", current))
                last[g.id] = (g.failure_count, g.obtained_at)
            now += interval
    finally:
        fake.clear_faults()
        fake.resume()
        engine.close()
        provider.close()
        quiet.__exit__(None, None, None)

    try:
        grants = {int(g.user_id or 0): store.get(g.id, with_tokens=True)
                  for g in store.iter_grants()}
        # flagged: exactly the grants whose refresh token truly expired
        for uid, g in grants.items():
            _access, refresh = store.tokens(g)
            if uid in expiring:
                assert (g.status, g.reason) == (Status.RECONSENT_REQUIRED,
                                                "refresh_token_expired"), g
                assert refresh is not None and not fake.refresh_token_valid(refresh)
            else:
                assert uid in healthy
                assert (g.status, g.reason, g.in_doubt, g.failure_count) == (
                    Status.OK, None, False, 0), g
                assert refresh is not None and fake.refresh_token_valid(refresh)
                assert fake.current_refresh_token(uid, fl.CLIENT_ID) == refresh
        assert fake.reuse_count() == 0

        # the provider's side: requests per grant within the outage
        bound = _max_attempts(outage_end - t0, interval, retry_max)
        per_user: dict[int | None, int] = defaultdict(int)
        served: dict[tuple[datetime, int | None], int | None] = {}
        for when, _, user, status in fake.log:
            served[(when, user)] = status
            if when < outage_end:
                per_user[user] += 1
        assert None not in per_user
        worst = max(per_user.values())
        assert worst <= bound, f"{worst} requests by one grant in 8 h; backoff allows {bound}"

        # tokend's side: the gap after each failure, Retry-After as a floor
        user_of = {g.id: uid for uid, g in grants.items()}
        hit = gaps = held_back = 0
        for gid, seen in attempts.items():
            failures = 0
            for (t1, r1, _p1), (t2, _r2, _p2) in pairwise(seen):
                if r1 == "ok":
                    failures = 0
                    continue
                failures += 1
                floor = _backoff_floor(failures, interval, retry_max)
                if served.get((t1, user_of[gid])) == 429:
                    floor = max(floor, timedelta(seconds=retry_after))
                    held_back += 1
                ceiling = max(_backoff_ceiling(failures, interval, retry_max), floor) + interval
                assert floor <= t2 - t1 <= ceiling, (gid, failures, t2 - t1, floor, ceiling, seen)
                gaps += 1
            if any(r == "fail" for _t, r, _p in seen) and user_of[gid] in healthy:
                hit += 1
                # recovery: the first attempt after the outage succeeds
                after = [r for t, r, _p in seen if t >= outage_end]
                assert after and after[0] == "ok", (gid, seen)
        assert hit >= 12, f"the outage hit only {hit} grants: too few to prove anything"
        assert gaps >= 50 and held_back >= 5, (gaps, held_back)
        kinds = {p for seen in attempts.values() for _t, r, p in seen if r == "fail"}
        assert kinds == {"html_500", "timeout", "refused", "rate_limited"}, kinds
    finally:
        fake.stop()
        store.close()
    print(f"\nsimulated day: {hit} grants hit by the outage, at most {worst} requests "
          f"per grant in 8 h (backoff allows {bound}), {gaps} retry gaps checked "
          f"({held_back} after a 429), {len(fake.log)} token requests")


def _new_grant(t: Any) -> NewGrant:
    return NewGrant(client="main", grant_type="authorization_code",
                    access_token=t.access_token, access_expires_at=t.access_expires_at,
                    obtained_at=t.obtained_at, refresh_token=t.refresh_token,
                    refresh_expires_at=t.refresh_expires_at, user_id=str(t.user_id),
                    tenant_id=str(t.tenant_id))
