"""The maintenance pass against the fake provider, on both backends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conftest import CLIENT_ID, CLIENT_SECRET
from faultlib import wait_until
from tokend.config import ClientConfig, Config
from tokend.errors import NotSent, StoreError
from tokend.fake import FakeJustimmo, IssuedTokens
from tokend.maintenance import Maintenance
from tokend.metrics import Metrics
from tokend.model import Grant, Status, TokenResponse
from tokend.provider import ProviderClient
from tokend.store import SaveItem, Store
from tokend.testing import seed_grants


@pytest.fixture
def league() -> str:
    return "5"


@pytest.fixture
def fake(league: str) -> Iterator[FakeJustimmo]:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}, league=league) as f:  # type: ignore[arg-type]
        yield f


class Env:
    def __init__(self, config: Config, store: Store, fake: FakeJustimmo) -> None:
        self.config = config
        self.store = store
        self.fake = fake
        self.metrics = Metrics()
        self.provider = ProviderClient(config.provider, pool_size=8)
        self.engines: list[Maintenance] = []

    def engine(self, store: Store | None = None, **kw: Any) -> Maintenance:
        m = Maintenance(self.config, store or self.store, self.provider, metrics=self.metrics,
                        rand=lambda: 1.0, **kw)
        self.engines.append(m)
        return m

    def seed(self, n: int, *, due: bool = True, **kw: Any) -> list[IssuedTokens]:
        issued = self.fake.issue_many(CLIENT_ID, n, user_id_start=1, **kw)
        now = datetime.now(UTC)
        # due: the access token has less than refresh_before left
        seed_grants(self.store, issued, self.config.schedule,
                    now=now, access_left=timedelta(hours=1) if due else timedelta(hours=20))
        return issued

    def grants(self) -> list[Grant]:
        return list(self.store.iter_grants())

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def close(self) -> None:
        for m in self.engines:
            m.close()
        self.provider.close()


@pytest.fixture
def env(make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> Iterator[Env]:
    e = Env(make_config(fake=fake, schedule_extra="concurrency = 4"), None, fake)  # type: ignore[arg-type]
    e.store = store_for(e.config)
    yield e
    e.close()


def test_pass_refreshes_due_grants_and_saves_rotated_tokens(env: Env) -> None:
    env.seed(20)
    env.seed(5, due=False)
    result = env.engine().run_pass()
    assert (result.claimed, result.refreshed, result.failed) == (20, 20, 0)
    stats = env.fake.stats()
    assert stats["reuse_count"] == 0 and stats["rotations"] == 20
    for g in env.grants():
        _, refresh = env.store.tokens(env.store.get(g.id, with_tokens=True))
        assert refresh is not None and env.fake.refresh_token_valid(refresh)
        assert g.status == Status.OK and g.failure_count == 0
        assert g.next_attempt_at is not None and g.next_attempt_at > datetime.now(UTC)
    # nothing is due any more: a second pass does nothing
    assert env.engine().run_pass().claimed == 0
    assert env.metric("tokend_refresh_attempts_total", client="main",
                      grant_type="authorization_code") == 20


@pytest.mark.parametrize("league", ["5", "7", "8", "9"])
def test_dead_refresh_token_flags_reconsent_in_every_league_version(env: Env,
                                                                    league: str) -> None:
    [tokens] = env.seed(1)
    assert tokens.refresh_token is not None
    env.fake.revoke_refresh_token(tokens.refresh_token)
    result = env.engine().run_pass()
    assert result.failures["permanent"] == 1
    [g] = env.grants()
    expected = "invalid_grant" if league == "9" else "invalid_request"
    assert (g.status, g.reason, g.next_attempt_at) == (Status.RECONSENT_REQUIRED, expected, None)
    [event] = env.store.events()
    assert event["event"] == "reconsent_required"
    assert env.metric("tokend_refresh_failures_total", client="main",
                      grant_type="authorization_code", kind="permanent", error=expected) == 1


def test_invalid_client_does_not_flag_grants(env: Env) -> None:
    env.seed(3)
    env.fake.inject("invalid_client")
    result = env.engine().run_pass()
    # One probe is refused; the other two are held back unsent (circuit open).
    assert result.failures["client"] == 1 and result.skipped == 2
    for g in env.grants():
        assert g.status == Status.OK and g.reason is None and g.failure_count <= 1
        assert g.next_attempt_at is not None
        assert g.next_attempt_at >= datetime.now(UTC) + env.config.schedule.retry_max * 0.9
    assert sorted(g.failure_count for g in env.grants()) == [0, 0, 1]
    assert env.store.events() == []
    assert env.metric("tokend_refresh_failures_total", client="main",
                      grant_type="authorization_code", kind="client", error="invalid_client") == 1


@pytest.mark.parametrize("fault", ["html_500", "json_500", "rate_limited", "drop"])
def test_provider_outage_is_transient(env: Env, fault: str) -> None:
    env.seed(4)
    env.fake.inject(fault)
    result = env.engine().run_pass()
    assert result.failures["transient"] == 4
    for g in env.grants():
        assert g.status == Status.OK and g.failure_count == 1
    env.fake.clear_faults()
    assert env.fake.reuse_count() == 0


def test_retry_after_is_honoured(env: Env) -> None:
    env.seed(1)
    env.fake.inject("rate_limited", retry_after=600)
    env.engine().run_pass()
    [g] = env.grants()
    assert g.next_attempt_at is not None
    assert g.next_attempt_at >= datetime.now(UTC) + timedelta(seconds=590)


def test_rotation_lost_when_the_answer_never_arrived(env: Env) -> None:
    env.seed(1)
    env.fake.inject("drop_after_rotate", count=1)
    result = env.engine().run_pass()
    assert result.failures["transient"] == 1
    [g] = env.grants()
    assert g.status == Status.OK and g.in_doubt  # recorded: the server may have rotated
    env.store.set_status(g.id, Status.OK, None, datetime.now(UTC) - timedelta(seconds=1))
    env.engine().run_pass()
    [g] = env.grants()
    assert (g.status, g.reason) == (Status.RECONSENT_REQUIRED, "rotation_lost")


def test_server_error_leaves_doubt_until_a_success(env: Env) -> None:
    # league revokes the old tokens before it persists the new ones: a 5xx on a refresh
    # may have consumed the refresh token
    env.seed(1)
    env.fake.inject("html_500", count=1)
    env.engine().run_pass()
    [g] = env.grants()
    assert g.in_doubt and g.status == Status.OK
    env.store.set_status(g.id, Status.OK, None, datetime.now(UTC) - timedelta(seconds=1))
    assert env.engine().run_pass().refreshed == 1
    [g] = env.grants()
    assert g.failure_count == 0 and g.last_error is None and not g.in_doubt


def test_crashed_attempt_is_retried_once_and_judged_in_doubt(env: Env) -> None:
    [tokens] = env.seed(1)
    # another replica claimed it, rotated the token at the provider, then died
    crashed = env.store.claim_due("crashed-replica", 10, timedelta(seconds=-1))
    assert len(crashed) == 1 and tokens.refresh_token
    env.fake.revoke_refresh_token(tokens.refresh_token)
    env.engine().run_pass()
    [g] = env.grants()
    assert (g.status, g.reason) == (Status.RECONSENT_REQUIRED, "rotation_lost")


def test_crashed_attempt_that_did_not_rotate_recovers(env: Env) -> None:
    env.seed(1)
    env.store.claim_due("crashed-replica", 10, timedelta(seconds=-1))
    assert env.engine().run_pass().refreshed == 1
    [g] = env.grants()
    assert g.status == Status.OK and not g.in_doubt


def test_racing_passes_never_refresh_a_grant_twice(env: Env,
                                                   store_for: Callable[..., Store]) -> None:
    env.seed(150)
    env.fake.set_latency(0.005)
    engines = [env.engine(store_for(env.config)) for _ in range(3)]
    results: list[Any] = []
    threads = [threading.Thread(target=lambda m=m: results.append(m.run_pass())) for m in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.refreshed for r in results) == 150
    assert sum(r.failed for r in results) == 0
    stats = env.fake.stats()
    assert stats["reuse_count"] == 0 and stats["rotations"] == 150


def test_client_credentials_are_kept(make_config: Callable[..., Config],
                                     store_for: Callable[..., Store], fake: FakeJustimmo) -> None:
    e = Env(make_config(fake=fake, client_extra="client_credentials = true"), None, fake)  # type: ignore[arg-type]
    e.store = store_for(e.config)
    try:
        assert e.engine().run_pass().refreshed == 1
        [g] = e.grants()
        assert g.grant_type == "client_credentials" and g.status == Status.OK
        access, refresh = e.store.tokens(e.store.get(g.id, with_tokens=True))
        assert refresh is None and access is not None and fake.access_token_valid(access)
        assert g.access_expires_at is not None
        assert g.next_attempt_at is not None and g.next_attempt_at < g.access_expires_at
        assert e.engine().run_pass().claimed == 0  # not due again yet
    finally:
        e.close()


def test_reconsent_window_is_flagged_without_a_refresh(env: Env) -> None:
    now = datetime.now(UTC)
    env.seed(1, due=False)
    [g] = env.grants()
    # the refresh token now ends in 3 days: inside reconsent_before (7d)
    with env.store.engine.begin() as conn:
        from sqlalchemy import text
        conn.execute(text("UPDATE grants SET refresh_expires_at = :t, next_attempt_at = :n"),
                     {"t": _db_time(env.store, now + timedelta(days=3)),
                      "n": _db_time(env.store, now - timedelta(seconds=1))})
    result = env.engine().run_pass()
    assert (result.claimed, result.refreshed) == (1, 0)
    assert env.fake.stats()["token_requests"] == 0
    [g] = env.grants()
    assert (g.status, g.reason) == (Status.RECONSENT_DUE, "refresh_token_expiring")
    assert [e["event"] for e in env.store.events()] == ["reconsent_due"]


def _db_time(store: Store, t: datetime) -> Any:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if store.dialect == "sqlite" else t


class FlakyStore(Store):
    """A store whose database goes away for the first ``failures`` saves."""

    def __init__(self, inner: Store, failures: int) -> None:
        super().__init__(inner.engine, inner.cipher, clock=inner.clock)
        self.failures = failures
        self.attempts = 0

    def save_many(self, items: Sequence[SaveItem]) -> list[bool]:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise StoreError("database error: connection refused")
        return super().save_many(items)


def test_rotated_token_is_held_until_the_database_is_back(env: Env) -> None:
    env.seed(1)
    flaky = FlakyStore(env.store, failures=3)
    m = env.engine(flaky, save_retry=0.01)
    result = m.run_pass()
    assert result.refreshed == 1
    # the saver's commit failed: held, and the background replay retries until it saves
    wait_until(lambda: m.held.count() == 0, 10, what="the held outcome saved")
    assert flaky.attempts == 4
    [g] = env.grants()
    _, refresh = env.store.tokens(env.store.get(g.id, with_tokens=True))
    assert refresh is not None and env.fake.refresh_token_valid(refresh)


class SlowCommits(Store):
    """Each commit of outcomes takes 0.2 s (a busy database); notes each one's size."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner.engine, inner.cipher, clock=inner.clock)
        self.commits: list[int] = []

    def save_many(self, items: Sequence[SaveItem]) -> list[bool]:
        time.sleep(0.2)
        self.commits.append(len(items))
        return super().save_many(items)


def test_new_tokens_that_queue_during_a_commit_share_the_next_one(env: Env) -> None:
    """A worker hands its new tokens to the saver and takes its next grant; what queues
    while a commit is written goes in one transaction; the pass ends once all are in."""
    env.seed(12)
    slow = SlowCommits(env.store)
    result = env.engine(slow).run_pass()
    assert result.refreshed == 12
    assert sum(slow.commits) == 12 and len(slow.commits) < 12, slow.commits
    grants = env.grants()
    assert all(g.lease_owner is None and g.token_version == 1 for g in grants)
    for g in grants:
        _, refresh = env.store.tokens(env.store.get(g.id, with_tokens=True))
        assert refresh is not None and env.fake.refresh_token_valid(refresh)


def test_the_plan_after_the_start_up_probe_sees_the_probe_saved(env: Env) -> None:
    """The first pass probes each client with one grant, then plans: the probe's grant,
    refreshed and saved, is planned with the others (not left out as still leased)."""
    env.seed(3)
    m = env.engine(SlowCommits(env.store))
    assert m.run_pass().refreshed == 3
    assert m.capacity is not None and m.capacity.grants == 3


class ReleaseFails(Store):
    """Releasing a client's waiting grants (when its circuit closes, after the first
    answer that accepts it) fails with an unexpected error."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner.engine, inner.cipher, clock=inner.clock)
        self.calls = 0

    def release_held(self, *args: Any, **kw: Any) -> int:
        self.calls += 1
        raise ValueError("a bug after the answer")


def test_an_error_after_the_answer_does_not_lose_the_new_tokens(env: Env) -> None:
    """Whatever fails once the provider has rotated the token, the new one is saved."""
    [issued] = env.seed(1)
    store = ReleaseFails(env.store)
    result = env.engine(store).run_pass()
    assert store.calls >= 1  # the failure did happen, after the answer
    assert result.claimed == 1
    [g] = env.grants()
    _, refresh = env.store.tokens(env.store.get(g.id, with_tokens=True))
    assert refresh is not None and env.fake.refresh_token_valid(refresh)
    assert issued.refresh_token is not None
    assert not env.fake.refresh_token_valid(issued.refresh_token)


def test_stop_releases_unstarted_grants(env: Env) -> None:
    env.seed(10)
    m = env.engine()
    m.stop()
    result = m.run_pass()
    assert result.claimed == 0  # a stopped engine claims nothing
    assert all(g.lease_owner is None for g in env.grants())


class StoppedAtTheGate(ProviderClient):
    """Stopping while a request waited for a new slot at the send gate (tokend.sendgate)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.stop = threading.Event()

    def refresh(self, client: ClientConfig, refresh_token: str) -> TokenResponse:
        self.stop.set()
        raise NotSent("stopping")


def test_a_request_not_sent_at_the_gate_gives_its_grant_back(env: Env) -> None:
    env.seed(2)
    provider = StoppedAtTheGate(env.config.provider)
    try:
        result = Maintenance(env.config, env.store, provider, metrics=env.metrics,
                             stop=provider.stop).run_pass()
    finally:
        provider.close()
    # the first (the client's start-up probe) stops the engine: nothing more is claimed
    assert (result.claimed, result.skipped, result.failed) == (1, 1, 0)
    assert env.fake.stats()["token_requests"] == 0
    assert all(g.lease_owner is None and not g.in_doubt and g.failure_count == 0
               for g in env.grants())


def test_a_wrong_key_leaves_the_grant_alone(env: Env) -> None:
    from tokend.config import Secret
    from tokend.crypto import Cipher, generate_key

    env.seed(1)
    wrong = Store(env.store.engine, Cipher((Secret(generate_key()),)))
    result = env.engine(wrong).run_pass()
    assert result.failures == {"internal": 1}
    assert env.fake.stats()["token_requests"] == 0
    [g] = env.grants()
    assert g.status == Status.OK and g.lease_owner is None and not g.in_doubt
    assert g.last_error is not None and "cannot decrypt the tokens of grant" in g.last_error
    assert g.next_attempt_at is not None
    assert g.next_attempt_at > datetime.now(UTC) + timedelta(minutes=14)
    assert env.engine().run_pass().claimed == 0  # not retried before retry_max


class WatchedStore(Store):
    """Notes how many log entries were made when each save returned; ``discard``: the
    grant is deleted just before its save (as if deleted during the attempt)."""

    def __init__(self, inner: Store, entries: list[Any], *, discard: bool) -> None:
        super().__init__(inner.engine, inner.cipher, clock=inner.clock)
        self.entries = entries
        self.discard = discard
        self.saves: list[tuple[bool, int]] = []

    def save_many(self, items: Sequence[SaveItem]) -> list[bool]:
        if self.discard:
            for grant, *_ in items:
                self.delete(grant.id)
        saved = super().save_many(items)
        self.saves += [(one, len(self.entries)) for one in saved]
        return saved


@pytest.mark.parametrize("discard", [False, True])
def test_status_changed_is_logged_only_after_its_save(env: Env, discard: bool) -> None:
    from structlog.testing import capture_logs

    now = datetime.now(UTC)
    env.seed(1, due=False)
    # the refresh token now ends in 3 days: inside reconsent_before (7d), a status change
    with env.store.engine.begin() as conn:
        from sqlalchemy import text
        conn.execute(text("UPDATE grants SET refresh_expires_at = :t, next_attempt_at = :n"),
                     {"t": _db_time(env.store, now + timedelta(days=3)),
                      "n": _db_time(env.store, now - timedelta(seconds=1))})
    with capture_logs() as entries:
        watched = WatchedStore(env.store, entries, discard=discard)
        env.engine(watched).run_pass()
    changed = [i for i, e in enumerate(entries) if e["event"] == "status_changed"]
    assert watched.saves == [(not discard, watched.saves[0][1])]
    if discard:
        assert changed == []
        assert env.grants() == []
    else:
        [at] = changed
        assert at >= watched.saves[0][1]  # made after the save returned
        assert entries[at]["new"] == "reconsent_due"
