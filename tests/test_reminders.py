"""Deadline reminders through the maintenance pass and the outbox, on both backends."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import CLIENT_ID, CLIENT_SECRET
from test_reconsent import WEBHOOK_SECRET, Receiver
from tokend import consent, notify, policy
from tokend.config import Config
from tokend.fake_provider import FakeJustimmo, ManualClock
from tokend.maintenance import Maintenance
from tokend.metrics import Metrics
from tokend.model import GrantType, NewGrant, Status
from tokend.provider import ProviderClient
from tokend.store import Store

LINK_KEY = "reminder-test-link-key-0123456789abcdef"
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def config(make_config: Callable[..., Config], receiver: Receiver) -> Config:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}) as fake:  # never called here
        return make_config(fake=fake, extra=(
            f'\n[notify]\nwebhook_url = "{receiver.url}"\nwebhook_secret = "{WEBHOOK_SECRET}"\n'
            f'\n[consent]\npublic_url = "https://tokend.example"\nlink_key = "{LINK_KEY}"\n'
            'reminders = ["7d", "3d", "1d"]\n'))


def test_reminders_once_per_grant_and_deadline(config: Config,
                                               store_for: Callable[..., Store],
                                               receiver: Receiver) -> None:
    clock = ManualClock(T0)
    store = store_for(config, clock=clock)
    deadline = T0 + 10 * DAY
    new = NewGrant(client="main", grant_type=GrantType.AUTHORIZATION_CODE.value,
                   access_token="a" * 40, access_expires_at=T0 + 11 * DAY, obtained_at=T0,
                   refresh_token="r" * 40, refresh_expires_at=deadline, user_id="1234",
                   tenant_id="5678", consented_at=T0)
    [gid] = store.insert_grants([new], lambda g: policy.initial(g, T0, config.schedule))
    assert store.get(gid).next_attempt_at == deadline - 7 * DAY
    metrics = Metrics()
    metrics.init_clients([("main", False)], 60)
    assert metrics.registry.get_sample_value(
        "tokend_notifications_total",
        {"event": "reconsent_reminder", "outcome": "delivered"}) == 0
    provider = ProviderClient(config.provider)
    engine = Maintenance(config, store, provider, metrics=metrics)

    def at(moment: datetime) -> int:
        clock.set(moment)
        return engine.run_pass().claimed

    try:
        assert at(deadline - 7 * DAY - timedelta(minutes=1)) == 0
        assert at(deadline - 7 * DAY + timedelta(seconds=1)) == 1  # enters reconsent_due
        # the next attempt is the 3d reminder, earlier than the next refresh
        assert store.get(gid).next_attempt_at == deadline - 3 * DAY
        assert at(deadline - 3 * DAY - timedelta(seconds=1)) == 0
        assert at(deadline - 3 * DAY) == 1  # 3d reminder, on time
        assert at(deadline - 3 * DAY + timedelta(hours=1)) == 0  # once
        assert store.get(gid).next_attempt_at == deadline - DAY
        assert at(deadline - DAY + timedelta(seconds=5)) == 1  # 1d reminder
        assert at(deadline - timedelta(hours=1)) == 0
        assert store.get(gid).next_attempt_at == deadline
    finally:
        engine.close()
        provider.close()
    events = [json.loads(e["payload"]) for e in store.events()]
    assert [e["event"] for e in events] == ["reconsent_due", "reconsent_reminder",
                                            "reconsent_reminder"]
    for e in events:
        assert (e["grant_id"], e["status"], e["user_id"]) == (gid, "reconsent_due", "1234")
        assert e["refresh_expires_at"] == deadline.isoformat().replace("+00:00", "Z")
        token = e["consent_url"].removeprefix("https://tokend.example/consent/")
        link = consent.verify(LINK_KEY, token, deadline - timedelta(hours=2))
        assert link.grant_id == gid
    assert events[1]["consent_url"] != events[2]["consent_url"]  # a fresh link each time
    g = store.get(gid)
    assert (g.reminder_deadline, g.reminder_point) == (deadline, deadline - DAY)

    notifier = notify.Notifier(config, store, metrics)
    assert notifier.deliver_due() == 3
    assert [e["event"] for e in receiver.events] == [e["event"] for e in events]
    assert metrics.registry.get_sample_value(
        "tokend_notifications_total",
        {"event": "reconsent_reminder", "outcome": "delivered"}) == 2


def test_a_new_deadline_gets_its_own_reminders(config: Config,
                                               store_for: Callable[..., Store]) -> None:
    clock = ManualClock(T0)
    store = store_for(config, clock=clock)
    deadline = T0 + 2 * DAY + timedelta(hours=12)  # already inside the 3d point
    new = NewGrant(client="main", grant_type=GrantType.AUTHORIZATION_CODE.value,
                   access_token="a" * 40, access_expires_at=T0 + 5 * DAY, obtained_at=T0,
                   refresh_token="r" * 40, refresh_expires_at=deadline, user_id="1",
                   consented_at=T0)
    [gid] = store.insert_grants([new], lambda g: policy.initial(g, T0, config.schedule))
    g = store.get(gid)
    assert g.status == Status.RECONSENT_DUE
    # imported into the window: the 1d reminder is the next piece of work
    assert g.next_attempt_at == deadline - DAY
    provider = ProviderClient(config.provider)
    engine = Maintenance(config, store, provider)
    try:
        clock.set(deadline - DAY)
        assert engine.run_pass().claimed == 1
        # the refresh token is extended (say by a provider-side change): new deadline
        later = deadline + 4 * DAY
        with store.engine.begin() as conn:
            from sqlalchemy import text

            value = (later.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if store.dialect == "sqlite"
                     else later)
            conn.execute(text("UPDATE grants SET refresh_expires_at = :t"), {"t": value})
        clock.set(later - 3 * DAY)
        g = store.get(gid)
        assert policy.due_reminder(g, later - 3 * DAY, config.schedule) == later - 3 * DAY
    finally:
        engine.close()
        provider.close()
    assert [json.loads(e["payload"])["event"] for e in store.events()] == [
        "reconsent_reminder"]


def test_migration_0003_keeps_rows_and_ids(tmp_path: Path, db_url: str, key_file: Path) -> None:
    """A database of revision 0002 gains consent_states and the reminder columns."""
    from alembic import command
    from sqlalchemy import inspect, text

    from conftest import write_config
    from tokend.config import load_config
    from tokend.store import _alembic_config, make_engine, open_store

    engine = make_engine(db_url)
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    with engine.begin() as conn:
        for gid in (1, 2, 3):
            conn.execute(text(
                "INSERT INTO grants (id, client, grant_type, status, failure_count, in_doubt,"
                " token_version, created_at, updated_at, refresh_expires_at) VALUES (:id,"
                " 'main', 'authorization_code', 'ok', 0, false, 0, :t, :t, :t)"),
                {"id": gid, "t": "2026-01-01T00:00:00.000000Z" if engine.dialect.name ==
                 "sqlite" else T0})
    engine.dispose()
    config = load_config(write_config(tmp_path, db_url, key_file=key_file), env={})
    store = open_store(config, auto_upgrade=True)
    try:
        assert store.revision() == store.head()  # all migrations after 0002 ran
        grants = list(store.iter_grants())
        assert [(g.id, g.reminder_deadline, g.reminder_point) for g in grants] == [
            (1, None, None), (2, None, None), (3, None, None)]
        assert "consent_states" in inspect(store.engine).get_table_names()
        if store.dialect == "sqlite":
            store.delete(3)
            new = NewGrant(client="main", grant_type="authorization_code", access_token="a",
                           access_expires_at=T0, obtained_at=T0, user_id="9")
            [gid] = store.insert_grants([new], lambda g: (Status.OK, None, None))
            assert gid == 4  # AUTOINCREMENT kept: ids are still never reused
    finally:
        store.close()
