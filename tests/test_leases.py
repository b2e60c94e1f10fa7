"""Leases that end when their owner is gone, and leases that cannot be outrun.

* the pure decisions of :mod:`tokend.leases` (tables);
* owner files (:mod:`tokend.owners`) with real processes killed by SIGKILL;
* the store on both backends: a dead owner's leases are taken over at once (in doubt),
  on PostgreSQL leases are compared by the database's clock (replicas with skewed
  clocks), an operator's ``enable`` never makes a leased grant claimable;
* the engine: a refresh is never sent on a lease too short for it; a pass after a
  predecessor was killed refreshes its leased grants at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import CLIENT_ID, CLIENT_SECRET
from tokend import leases, owners
from tokend.config import Config
from tokend.fake import FakeJustimmo
from tokend.maintenance import Maintenance
from tokend.metrics import Metrics
from tokend.model import AttemptResult, NewGrant, Status
from tokend.policy import initial, on_enable
from tokend.provider import ProviderClient
from tokend.store import Store

S = timedelta(seconds=1)


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(("claimed_at", "lease", "now", "left"), [
    (100.0, 120 * S, 100.0, 120 * S),          # just claimed
    (100.0, 120 * S, 160.5, timedelta(seconds=59.5)),
    (100.0, 120 * S, 220.0, timedelta(0)),      # just over
    (100.0, 120 * S, 250.0, -30 * S),           # long over: negative, not clipped
    (0.0, 30 * S, 29.0, S),
])
def test_remaining_lease(claimed_at: float, lease: timedelta, now: float,
                         left: timedelta) -> None:
    assert leases.remaining(claimed_at, lease, now) == left


@pytest.mark.parametrize(("left", "timeout", "send"), [
    (120 * S, 10 * S, True),   # a fresh lease (2 min) and the default timeout
    (30 * S, 10 * S, True),    # exactly connect + read + margin
    (29 * S, 10 * S, False),   # one second short
    (20 * S, 5 * S, True),
    (19 * S, 5 * S, False),
    (0 * S, 1 * S, False),     # over
    (-5 * S, 1 * S, False),
    (60 * S, 30 * S, False),   # a long timeout needs more than half a default lease
])
def test_a_refresh_is_sent_only_with_room_for_it(left: timedelta, timeout: timedelta,
                                                 send: bool) -> None:
    assert leases.can_send(left, timeout) is send


def test_a_lease_always_has_room_for_one_refresh() -> None:
    from dataclasses import replace

    from tokend.config import ProviderConfig
    from tokend.maintenance import lease_for

    for seconds in (1, 5, 10, 30, 60, 300):
        timeout = timedelta(seconds=seconds)
        config = replace(Config(), provider=replace(ProviderConfig(), timeout=timeout))
        assert leases.can_send(leases.remaining(0.0, lease_for(config), 0.0), timeout)


# --------------------------------------------------------------------------- owner files


def test_owner_strings_are_safe_file_names() -> None:
    owner = owners.new_owner()
    assert owners.check_owner(owner) == owner and len(owner) <= 255
    assert "/" not in owner and not owner.startswith(".")
    for bad in ("", "../x", "a/b", ".hidden", "x" * 300):
        with pytest.raises(ValueError):
            owners.check_owner(bad)


def _hold_lock(directory: Path, owner: str, then: str = "") -> subprocess.Popen[str]:
    """A process that takes its owner lock (then runs ``then``) and sleeps until killed."""
    code = textwrap.dedent(f"""\
        import sys, time
        from pathlib import Path
        from tokend.owners import OwnerLock
        lock = OwnerLock(Path({str(directory)!r}), {owner!r})
        {then}
        print("ready", flush=True)
        time.sleep(600)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"child did not start: {line!r}"
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def test_a_killed_owner_is_dead_a_live_one_is_not(tmp_path: Path) -> None:
    alive = _hold_lock(tmp_path, "host:1:alive")
    killed = _hold_lock(tmp_path, "host:2:killed")
    try:
        with owners.dead(tmp_path, "me") as gone:
            assert gone == []  # both hold their locks
        _kill(killed)
        with owners.dead(tmp_path, "me") as gone:
            assert gone == ["host:2:killed"]
            # while one process takes it over, no other does
            with owners.dead(tmp_path, "someone-else") as also:
                assert also == []
        assert sorted(os.listdir(tmp_path)) == ["host:1:alive"]  # removed after takeover
    finally:
        _kill(alive)


def test_a_failed_takeover_keeps_the_file_for_the_next_try(tmp_path: Path) -> None:
    _kill(_hold_lock(tmp_path, "host:3:killed"))
    with pytest.raises(RuntimeError), owners.dead(tmp_path, "me") as gone:
        assert gone == ["host:3:killed"]
        raise RuntimeError("database down")
    with owners.dead(tmp_path, "me") as gone:
        assert gone == ["host:3:killed"]


def test_a_clean_exit_removes_its_file_and_a_file_being_created_is_not_dead(
        tmp_path: Path) -> None:
    lock = owners.OwnerLock(tmp_path, "host:4:clean")
    with pytest.raises(Exception, match="already in use"):
        owners.OwnerLock(tmp_path, "host:4:clean")
    lock.release()
    assert os.listdir(tmp_path) == []
    # created but not yet locked and written by its (live) owner: not a dead owner's
    (tmp_path / "host:5:starting").touch()
    with owners.dead(tmp_path, "me") as gone:
        assert gone == []
    # ... unless it stays so (its owner died right after creating it)
    old = time.time() - 3600
    os.utime(tmp_path / "host:5:starting", (old, old))
    with owners.dead(tmp_path, "me") as gone:
        assert gone == ["host:5:starting"]


# --------------------------------------------------------------------------- the store


NOW = datetime.now(UTC)


def new(i: int) -> NewGrant:
    return NewGrant(client="main", grant_type="authorization_code", access_token=f"a-{i}",
                    access_expires_at=NOW + timedelta(hours=1), obtained_at=NOW,
                    refresh_token=f"r-{i}", refresh_expires_at=NOW + timedelta(days=30),
                    user_id=str(i), tenant_id="7")


def due_now(_g: object) -> tuple[Status, None, datetime]:
    return Status.OK, None, NOW - S


@pytest.fixture
def store(make_config: Callable[..., Config], store_for: Callable[..., Store]) -> Store:
    return store_for(make_config())


def test_leases_of_a_dead_owner_are_taken_over_at_once_in_doubt(store: Store) -> None:
    store.insert_grants([new(i) for i in range(6)], due_now)
    dead = store.claim_due("host:9:dead", 3, timedelta(minutes=2))
    remote = store.claim_due("otherhost:9:alive", 3, timedelta(minutes=2))
    assert store.claim_due("me", 10, timedelta(minutes=2)) == []  # all leased
    assert store.expire_leases_of(["host:9:dead"]) == 3
    taken = store.claim_due("me", 10, timedelta(minutes=2))
    assert sorted(g.id for g in taken) == sorted(g.id for g in dead)
    assert all(g.in_doubt for g in taken)  # a refresh may have been on the wire
    assert all(store.get(g.id).in_doubt for g in taken)
    # another host's leases keep their full length
    assert store.claim_due("me", 10, timedelta(minutes=2)) == []
    assert {store.get(g.id).lease_owner for g in remote} == {"otherhost:9:alive"}


def test_a_dead_owners_disabled_grant_stays_disabled(store: Store) -> None:
    store.insert_grants([new(1)], due_now)
    [g] = store.claim_due("host:9:dead", 1, timedelta(minutes=2))
    store.set_status(g.id, Status.DISABLED, "operator", None)
    store.expire_leases_of(["host:9:dead"])
    assert store.claim_due("me", 10, timedelta(minutes=2)) == []
    assert store.get(g.id).next_attempt_at is None


def test_enable_during_a_refresh_keeps_the_grant_leased(
        store: Store, make_config: Callable[..., Config]) -> None:
    """``grants enable`` while the daemon's refresh is in flight: before, it set
    next_attempt_at = now, and another replica claimed the grant and presented the
    refresh token the first one was rotating."""
    schedule = make_config().schedule
    store.insert_grants([new(1), new(2)], due_now)
    first, second = store.claim_due("replica-a", 2, timedelta(minutes=2))
    lease = store.get(first.id).next_attempt_at
    for g in (first, second):
        store.set_status(g.id, Status.DISABLED, "operator", None)
    # the operator re-enables one at once, the other after a second disable
    for g in (first, second):
        status, reason, next_at = on_enable(store.get(g.id), store.clock(), schedule)
        store.set_status(g.id, status, reason, next_at)
    assert store.claim_due("replica-b", 10, timedelta(minutes=2)) == []
    assert store.get(first.id).next_attempt_at == lease  # never before the lease's end
    assert store.get(first.id).status == Status.OK
    # once the lease is over (the claimer died), it is claimed, in doubt
    store.expire_leases_of(["replica-a"])
    again = store.claim_due("replica-b", 10, timedelta(minutes=2))
    assert sorted(g.id for g in again) == [first.id, second.id]
    assert all(g.in_doubt for g in again)


def test_enable_of_a_grant_not_leased_makes_it_due_now(
        store: Store, make_config: Callable[..., Config]) -> None:
    [gid] = store.insert_grants([new(1)], due_now)
    store.set_status(gid, Status.DISABLED, "operator", None)
    status, reason, next_at = on_enable(store.get(gid), store.clock(),
                                        make_config().schedule)
    store.set_status(gid, status, reason, next_at)
    [g] = store.claim_due("me", 10, timedelta(minutes=2))
    assert g.id == gid and not g.in_doubt


def test_moments_written_by_set_status_and_takeover_sort_like_time(store: Store) -> None:
    """(SQLite stores ISO text: a moment bound in any other spelling sorts wrongly.)"""
    later = NOW + timedelta(hours=1)
    [gid, other] = store.insert_grants([new(1), new(2)], due_now)
    store.set_status(gid, Status.OK, None, later)
    assert store.get(gid).next_attempt_at == later
    [g] = store.claim_due("host:9:dead", 10, timedelta(minutes=2))  # not the later one
    assert g.id == other
    store.expire_leases_of(["host:9:dead"])
    assert store.get(other).next_attempt_at <= store.clock()  # type: ignore[operator]
    assert [g.id for g in store.claim_due("me", 10, timedelta(minutes=2))] == [other]


def test_leases_are_compared_by_the_database_clock(
        db_url: str, make_config: Callable[..., Config],
        store_for: Callable[..., Store]) -> None:
    """Two replicas whose clocks are 10 minutes apart: neither takes over the other's
    live leases (before, the one ahead claimed every grant leased by the other)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite is one host: every process has the same clock")
    config = make_config()
    ahead = store_for(config, clock=lambda: datetime.now(UTC) + timedelta(minutes=10))
    behind = store_for(config, clock=lambda: datetime.now(UTC) - timedelta(minutes=10))
    ahead.insert_grants([new(i) for i in range(4)],
                        lambda _g: (Status.OK, None, NOW - timedelta(hours=1)))
    b = behind.claim_due("behind", 2, timedelta(minutes=2))
    assert len(b) == 2
    a = ahead.claim_due("ahead", 10, timedelta(minutes=2))
    assert len(a) == 2 and not {g.id for g in a} & {g.id for g in b}
    assert ahead.claim_due("ahead", 10, timedelta(minutes=2)) == []
    assert behind.claim_due("behind", 10, timedelta(minutes=2)) == []
    # a lease that did end (by the database's clock) is taken over, whoever's clock
    ahead.expire_leases_of(["behind"])
    again = ahead.claim_due("ahead", 10, timedelta(minutes=2))
    assert sorted(g.id for g in again) == sorted(g.id for g in b)
    assert all(g.in_doubt for g in again)


# --------------------------------------------------------------------------- the engine


@pytest.fixture
def fake() -> Iterator[FakeJustimmo]:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}) as f:
        yield f


def _seed(fake: FakeJustimmo, store: Store, config: Config, n: int) -> None:
    now = datetime.now(UTC)
    news = [NewGrant(
        client="main", grant_type="authorization_code", access_token=t.access_token,
        access_expires_at=now + timedelta(hours=1), obtained_at=now - timedelta(hours=4),
        refresh_token=t.refresh_token, refresh_expires_at=t.refresh_expires_at,
        user_id=str(t.user_id), tenant_id=str(t.tenant_id))
        for t in fake.issue_many(CLIENT_ID, n, user_id_start=1)]
    store.insert_grants(news, lambda g: initial(g, now, config.schedule))


def test_a_refresh_is_not_sent_on_a_lease_too_short_for_it(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> None:
    config = make_config(fake=fake)  # timeout 5 s: a refresh needs 20 s of lease
    store = store_for(config)
    _seed(fake, store, config, 2)
    with ProviderClient(config.provider) as provider:
        m = Maintenance(config, store, provider, metrics=Metrics())
        try:
            claimed_at = time.monotonic()
            short, fine = store.claim_due(m.owner, 2, m.lease)
            # the first waited (rate limiter, a stalled database) until 15 s were left
            late = claimed_at - (m.lease.total_seconds() - 15)
            assert m.attempt(short, late) is AttemptResult.RELEASED
            assert m.attempt(fine, claimed_at) is AttemptResult.OK
        finally:
            m.close()
    assert fake.stats()["token_requests"] == 1  # nothing was sent for the late one
    g = store.get(short.id)
    assert (g.lease_owner, g.in_doubt, g.next_attempt_at) == (None, False,
                                                             short.next_attempt_at)


def test_a_pass_takes_over_the_leases_of_a_killed_predecessor_at_once(
        make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo, tmp_path: Path) -> None:
    """A process of this host claims grants and is killed (SIGKILL) before it sent
    anything; the next engine refreshes them on its first pass, not 2 minutes later."""
    config = make_config(fake=fake)
    store = store_for(config)
    _seed(fake, store, config, 12)
    directory = tmp_path / "state" / "owners"
    directory.mkdir(parents=True, exist_ok=True)
    claim = (f"from tokend.config import load_config; from tokend.store import open_store; "
             f"from datetime import timedelta; "
             f"s = open_store(load_config({str(config.source)!r}, env={{}})); "
             f"assert len(s.claim_due(lock.owner, 100, timedelta(minutes=2))) == 12")
    _kill(_hold_lock(directory, "testhost:77:crashed", then=claim))
    assert {g.lease_owner for g in store.iter_grants()} == {"testhost:77:crashed"}
    with ProviderClient(config.provider) as provider:
        m = Maintenance(config, store, provider, metrics=Metrics())
        try:
            started = time.monotonic()
            result = m.run_pass()
            took = time.monotonic() - started
        finally:
            m.close()
    assert (result.claimed, result.refreshed, result.failed) == (12, 12, 0), result
    assert took < 30
    for g in store.iter_grants():
        assert (g.status, g.lease_owner, g.in_doubt) == (Status.OK, None, False)
        _, refresh = store.tokens(store.get(g.id, with_tokens=True))
        assert refresh is not None and fake.refresh_token_valid(refresh)
    assert fake.reuse_count() == 0
    assert os.listdir(directory) == []  # the dead one's file is gone, and so is ours
