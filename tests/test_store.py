"""The store contract: the same suite on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tokend.config import Config, Secret
from tokend.crypto import Cipher, generate_key
from tokend.errors import DecryptError, GrantNotFound, StoreError
from tokend.model import NewGrant, Outcome, Status
from tokend.store import SaveItem, Store

NOW = datetime.now(UTC).replace(microsecond=123456)


def new(i: int, **kw: object) -> NewGrant:
    fields: dict[str, object] = dict(
        client="main", grant_type="authorization_code", access_token=f"access-{i}-secret",
        access_expires_at=NOW + timedelta(hours=i), obtained_at=NOW - timedelta(hours=1),
        refresh_token=f"def50200refresh-{i}-secret", refresh_expires_at=NOW + timedelta(days=30),
        user_id=str(1000 + i), tenant_id="7")
    fields.update(kw)
    return NewGrant(**fields)  # type: ignore[arg-type]


def due_now(_g: object) -> tuple[Status, None, datetime]:
    return Status.OK, None, NOW - timedelta(seconds=1)


def not_due(_g: object) -> tuple[Status, None, datetime]:
    return Status.OK, None, NOW + timedelta(hours=1)


@pytest.fixture
def store(make_config: Callable[..., Config], store_for: Callable[..., Store]) -> Store:
    return store_for(make_config())


def test_schema_is_created_and_current(store: Store) -> None:
    assert store.revision() == store.head()
    store.check_schema(auto_upgrade=False)  # no error


def test_sqlite_file_is_private(tmp_path: Path, key_file: Path,
                                store_for: Callable[..., Store]) -> None:
    from tokend.config import load_config
    from tokend.testing import write_config

    path = tmp_path / "sub" / "tokend.db"
    store_for(load_config(write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{path}", key_file=key_file), env={}))
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_round_trip_keeps_aware_utc(store: Store) -> None:
    [gid] = store.insert_grants([new(1)], not_due)
    g = store.get(gid)
    assert g.access_expires_at == NOW + timedelta(hours=1)
    assert g.access_expires_at is not None and g.access_expires_at.tzinfo is not None
    assert g.access_expires_at.utcoffset() == timedelta(0)
    assert (g.user_id, g.tenant_id, g.status, g.has_refresh_token) == ("1001", "7", Status.OK, True)
    assert g.access_token_enc is None  # listings never carry tokens
    full = store.get(gid, with_tokens=True)
    assert store.tokens(full) == ("access-1-secret", "def50200refresh-1-secret")


def test_import_is_all_or_nothing(store: Store) -> None:
    calls = 0

    def explode_late(_g: object) -> tuple[Status, None, datetime]:
        nonlocal calls
        calls += 1
        if calls == 4500:
            raise ValueError("bad record")
        return due_now(_g)

    with pytest.raises(ValueError):
        store.insert_grants([new(i) for i in range(5000)], explode_late)
    assert list(store.iter_grants()) == []


def test_iter_filters_and_pages(store: Store) -> None:
    store.insert_grants([new(i) for i in range(25)], not_due)
    store.insert_grants([new(100, client="other")], not_due)
    assert len(list(store.iter_grants(page=7))) == 26
    assert [g.client for g in store.iter_grants(client="other")] == ["other"]
    assert list(store.iter_grants(status="disabled")) == []


def test_tokens_are_never_stored_in_clear(store: Store) -> None:
    store.insert_grants([new(i) for i in range(3)], not_due)
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT access_token, refresh_token FROM grants")).all()
    for access, refresh in rows:
        assert "secret" not in access and "secret" not in refresh
        assert access.startswith("enc:v1:") and refresh.startswith("enc:v1:")


def test_claim_leases_and_hides_claimed_grants(store: Store) -> None:
    store.insert_grants([new(i) for i in range(5)], due_now)
    store.insert_grants([new(9)], not_due)
    first = store.claim_due("a", 3, timedelta(minutes=5))
    second = store.claim_due("b", 10, timedelta(minutes=5))
    assert len(first) == 3 and len(second) == 2
    assert not {g.id for g in first} & {g.id for g in second}
    assert store.claim_due("c", 10, timedelta(minutes=5)) == []
    g = store.get(first[0].id)
    assert g.lease_owner == "a"
    assert g.next_attempt_at == g.lease_expires_at


def test_one_claim_statement_serves_every_clock(store: Store) -> None:
    """The claim SELECT is built once per batch size (built anew for every claim it cost
    ~0.5 ms of CPU): the moment is a parameter, so a later claim sees what came due."""
    store.insert_grants([new(1)], not_due)
    store.clock = lambda: NOW
    assert store.claim_due("a", 5, timedelta(minutes=5)) == []
    template, values = store._claim(NOW, 5, ())
    later = NOW + timedelta(hours=1, seconds=1)
    store.clock = lambda: later
    [claimed] = store.claim_due("a", 5, timedelta(minutes=5))
    again, later_values = store._claim(later, 5, ())
    assert again is template and (values, later_values) == ({"c_now": NOW}, {"c_now": later})
    assert claimed.lease_owner == "a"


def test_expired_lease_comes_back_in_doubt(store: Store) -> None:
    store.insert_grants([new(1)], due_now)
    [claimed] = store.claim_due("crashed", 1, timedelta(seconds=-1))  # already expired
    assert not claimed.in_doubt
    [again] = store.claim_due("survivor", 1, timedelta(minutes=5))
    assert again.id == claimed.id and again.in_doubt
    assert store.get(again.id).in_doubt


def test_save_is_guarded_by_lease_or_token_version(store: Store) -> None:
    store.insert_grants([new(1)], due_now)
    [g] = store.claim_due("me", 1, timedelta(minutes=5))
    ok = Outcome(status=Status.OK, reason=None, next_attempt_at=NOW + timedelta(hours=3),
                 failure_count=0, last_error=None, in_doubt=False, access_token="access-2",
                 refresh_token="refresh-2", access_expires_at=NOW + timedelta(days=1),
                 refresh_expires_at=NOW + timedelta(days=31), obtained_at=NOW)
    assert store.save(g, ok, "me")
    saved = store.get(g.id, with_tokens=True)
    assert store.tokens(saved) == ("access-2", "refresh-2")
    assert (saved.lease_owner, saved.token_version) == (None, g.token_version + 1)
    # a stale attempt (tokens moved on, lease gone) cannot overwrite newer tokens
    assert not store.save(g, ok, "someone-else")


def test_save_many_writes_each_outcome_guarded_in_one_transaction(store: Store) -> None:
    """The saver's group commit: one result per outcome, in the order given (rows are
    locked in id order); an event only for an outcome written; a write the database
    refuses takes the others of its transaction with it."""
    store.insert_grants([new(i) for i in range(1, 7)], due_now)
    a, b, c, d = sorted(store.claim_due("me", 4, timedelta(minutes=5)), key=lambda g: g.id)
    ok = Outcome(status=Status.OK, reason=None, next_attempt_at=NOW + timedelta(hours=3),
                 failure_count=0, last_error=None, in_doubt=False, access_token="access-2",
                 refresh_token="refresh-2", access_expires_at=NOW + timedelta(days=1),
                 refresh_expires_at=NOW + timedelta(days=31), obtained_at=NOW)
    assert store.save(b, ok, "me")  # b's tokens moved on: a stale attempt is refused
    event = {"event": "reconsent_due", "grant_id": 0}
    items: list[SaveItem] = [(d, ok, "me", None), (b, ok, "someone-else", dict(event)),
                             (a, ok, "me", dict(event)), (c, ok, "me", None)]
    assert store.save_many(items) == [True, False, True, True]
    assert [e["grant_id"] for e in store.events()] == [a.id]
    for g in (a, c, d):
        saved = store.get(g.id, with_tokens=True)
        assert store.tokens(saved) == ("access-2", "refresh-2")
        assert (saved.lease_owner, saved.token_version) == (None, g.token_version + 1)
    e, f = store.claim_due("me", 2, timedelta(minutes=5))
    bad = Outcome(status=Status.OK, reason=None, next_attempt_at=None,
                  failure_count=None,  # type: ignore[arg-type]  # NOT NULL
                  last_error=None, in_doubt=False)
    with pytest.raises(StoreError):
        store.save_many([(e, ok, "me", None), (f, bad, "me", None)])
    assert store.get(e.id).lease_owner == "me"  # e's write was not kept either


def test_save_keeps_refresh_token_when_none_returned(store: Store) -> None:
    store.insert_grants([new(1)], due_now)
    [g] = store.claim_due("me", 1, timedelta(minutes=5))
    out = Outcome(status=Status.OK, reason=None, next_attempt_at=None, failure_count=0,
                  last_error=None, in_doubt=False, access_token="access-2", refresh_token=None,
                  access_expires_at=NOW, refresh_expires_at=NOW, obtained_at=NOW)
    assert store.save(g, out, "me")
    assert store.tokens(store.get(g.id, with_tokens=True)) == ("access-2",
                                                                "def50200refresh-1-secret")


def test_status_changes_write_their_event_atomically(store: Store) -> None:
    store.insert_grants([new(1)], due_now)
    [g] = store.claim_due("me", 1, timedelta(minutes=5))
    out = Outcome(status=Status.RECONSENT_REQUIRED, reason="invalid_grant", next_attempt_at=None,
                  failure_count=1, last_error="x", in_doubt=False)
    assert store.save(g, out, "me", {"event": "reconsent_required", "grant_id": g.id})
    [event] = store.events()
    assert event["event"] == "reconsent_required" and event["grant_id"] == g.id
    assert [e[0] for e in store.due_events()] == [event["id"]]
    store.event_failed(event["id"], "HTTP 500", NOW + timedelta(hours=1))
    assert store.due_events() == []
    store.event_delivered(event["id"])
    assert store.events()[0]["delivered_at"] is not None


def test_consent_replaces_the_users_grant(store: Store) -> None:
    [gid] = store.insert_grants([new(1)], due_now)
    store.set_status(gid, Status.RECONSENT_REQUIRED, "invalid_grant", None)
    got, previous = store.consent(new(1, access_token="fresh"), not_due)
    assert (got, previous) == (gid, Status.RECONSENT_REQUIRED)
    g = store.get(gid, with_tokens=True)
    assert g.status == Status.OK and store.tokens(g)[0] == "fresh"
    other, previous = store.consent(new(2), not_due)
    assert other != gid and previous is None


def test_operator_actions_and_missing_grants(store: Store) -> None:
    [gid] = store.insert_grants([new(1)], not_due)
    assert store.set_status(gid, Status.DISABLED, "operator", None).status == Status.DISABLED
    store.delete(gid)
    with pytest.raises(GrantNotFound):
        store.get(gid)
    with pytest.raises(GrantNotFound):
        store.delete(gid)


def test_client_credentials_rows_are_unique(store: Store) -> None:
    assert store.ensure_client_credentials(["main", "other"]) == ["main", "other"]
    assert store.ensure_client_credentials(["main", "other"]) == []
    rows = list(store.iter_grants())
    assert {(g.client, g.grant_type, g.access_expires_at) for g in rows} == {
        ("main", "client_credentials", None), ("other", "client_credentials", None)}


def test_stats_aggregate_without_loading_rows(store: Store) -> None:
    store.insert_grants([new(i) for i in range(1, 4)], due_now)
    [gid] = store.insert_grants([new(5, client="other")], not_due)
    store.set_status(gid, Status.DISABLED, "operator", None)
    st = store.stats(["main", "idle"])
    assert st.counts == {("main", "ok"): 3, ("other", "disabled"): 1}
    assert st.access_earliest == {"main": NOW + timedelta(hours=1)}
    assert st.refresh_earliest == {"main": NOW + timedelta(days=30)}
    assert st.due == {"main": 3}


def test_concurrent_claimers_never_share_a_grant(make_config: Callable[..., Config],
                                                 store_for: Callable[..., Store]) -> None:
    config = make_config()
    seed = store_for(config)
    seed.insert_grants([new(i) for i in range(300)], due_now)
    seen: list[int] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        s = store_for(config)
        while claims := s.claim_due(name, 7, timedelta(minutes=5)):
            with lock:
                seen.extend(g.id for g in claims)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 300


def test_due_query_uses_the_index(store: Store) -> None:
    far = [new(i) for i in range(3000)]
    store.insert_grants(far, not_due)
    store.insert_grants([new(i) for i in range(20)], due_now)
    if store.dialect == "postgresql":
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE grants"))
    plan = store.due_query_plan(NOW)
    assert "ix_grants_next_attempt_at" in plan, plan
    assert "SCAN grants" not in plan and "Seq Scan" not in plan, plan


def test_key_rotation_reencrypts_everything(store: Store) -> None:
    store.insert_grants([new(i) for i in range(7)], not_due)
    old_key = store.cipher
    new_cipher = Cipher((Secret(generate_key()), *old_key.keys))  # newest first
    rotated = Store(store.engine, new_cipher)
    assert rotated.reencrypt(batch=3) == 7
    assert rotated.reencrypt(batch=3) == 0  # resumable: nothing left to do
    only_new = Store(store.engine, Cipher((new_cipher.keys[0],)))
    for g in only_new.iter_grants():
        assert only_new.tokens(only_new.get(g.id, with_tokens=True))[0].startswith("access-")
    with pytest.raises(DecryptError, match="grant"):
        store.tokens(store.get(1, with_tokens=True))  # only the old key: cannot read


def test_clear_rows_are_migrated_by_rotation(store: Store) -> None:
    [gid] = store.insert_grants([new(1)], not_due)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE grants SET access_token = 'clear-access' WHERE id = :i"),
                     {"i": gid})
    assert store.tokens(store.get(gid, with_tokens=True))[0] == "clear-access"
    assert store.reencrypt() == 1
    with store.engine.connect() as conn:
        raw = conn.execute(text("SELECT access_token FROM grants")).scalar_one()
    assert raw.startswith("enc:v1:")


def test_unreachable_database_is_a_store_error(tmp_path: Path) -> None:
    from tokend.store import make_engine

    s = Store(make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none"),
              Cipher((Secret(generate_key()),)))
    with pytest.raises(StoreError, match="database"):
        s.claim_due("x", 1, timedelta(minutes=1))


def test_disable_during_an_attempt_is_kept(store: Store) -> None:
    store.insert_grants([new(1)], due_now)
    [g] = store.claim_due("me", 1, timedelta(minutes=5))
    store.set_status(g.id, Status.DISABLED, "operator", None)  # the operator, meanwhile
    ok = Outcome(status=Status.OK, reason=None, next_attempt_at=NOW + timedelta(hours=3),
                 failure_count=0, last_error=None, in_doubt=False, access_token="access-2",
                 refresh_token="refresh-2", access_expires_at=NOW + timedelta(days=1),
                 refresh_expires_at=NOW + timedelta(days=31), obtained_at=NOW)
    assert store.save(g, ok, "me")
    saved = store.get(g.id, with_tokens=True)
    assert (saved.status, saved.reason, saved.next_attempt_at) == (Status.DISABLED, "operator",
                                                                   None)
    assert store.tokens(saved) == ("access-2", "refresh-2")  # the rotated token is kept


def test_ids_are_never_reused(store: Store) -> None:
    """A refresh of a deleted grant still in flight must never land in a new one: its
    save is guarded by the id, so a new grant never gets a deleted grant's id."""
    first, newest = store.insert_grants([new(1), new(2)], not_due)
    claimed = store.get(newest, with_tokens=True)
    store.delete(newest)
    [imported] = store.insert_grants([new(3)], not_due)
    assert imported not in (first, newest)
    # the deleted grant's in-flight refresh finishes now: its save must find nothing
    outcome = Outcome(status=Status.OK, reason=None, next_attempt_at=NOW, failure_count=0,
                      last_error=None, in_doubt=False, access_token="spent-access",
                      refresh_token="rotated-for-the-deleted-user", access_expires_at=NOW,
                      refresh_expires_at=NOW, obtained_at=NOW)
    assert store.save(claimed, outcome, "someone") is False
    assert store.tokens(store.get(imported, with_tokens=True))[1] == "def50200refresh-3-secret"
    # single inserts (the client-credentials rows) skip deleted ids as well
    store.delete(imported)
    assert store.ensure_client_credentials(["main"]) == ["main"]
    [cc] = [g.id for g in store.iter_grants(client="main")
            if g.grant_type == "client_credentials"]
    assert cc > imported


def test_migration_0002_keeps_rows_and_stops_id_reuse(tmp_path: Path, key_file: Path) -> None:
    """An existing SQLite database of revision 0001 is rebuilt with AUTOINCREMENT."""
    from alembic import command

    from tokend.config import load_config
    from tokend.store import _alembic_config, make_engine, open_store
    from tokend.testing import write_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with engine.begin() as conn:
        for gid in (1, 2, 3):
            conn.execute(text(
                "INSERT INTO grants (id, client, grant_type, status, failure_count, in_doubt,"
                " token_version, created_at, updated_at) VALUES (:id, 'main',"
                " 'authorization_code', 'ok', 0, 0, 0, '2026-01-01T00:00:00Z',"
                " '2026-01-01T00:00:00Z')"), {"id": gid})
    engine.dispose()
    config = load_config(write_config(tmp_path / "tokend.toml", db_url=url, key_file=key_file), env={})
    store = open_store(config, auto_upgrade=True)
    try:
        assert store.revision() == store.head()
        assert sorted(g.id for g in store.iter_grants()) == [1, 2, 3]
        store.delete(3)
        [gid] = store.insert_grants([new(9)], not_due)
        assert gid == 4
    finally:
        store.close()


def test_find_is_one_select_for_a_grant_of_a_client(store: Store) -> None:
    from sqlalchemy import event

    from tokend.model import GrantType, UnreadableGrant

    ids = store.insert_grants([new(i) for i in range(1, 30)] + [new(5, tenant_id="8")], not_due)
    store.ensure_client_credentials(["main"])
    [cc] = [g.id for g in store.iter_grants(client="main")
            if g.grant_type == "client_credentials"]
    statements: list[str] = []

    def count(_conn: object, _cur: object, stmt: str, *_a: object) -> None:
        if stmt.lstrip().upper().startswith("SELECT"):
            statements.append(stmt)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        found = store.find("main", "1005", GrantType.AUTHORIZATION_CODE)
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert len(statements) == 1, statements
    assert found is not None and not isinstance(found, UnreadableGrant)
    assert (found.id, found.tenant_id) == (ids[-1], "8")  # the newest of that user
    cc_found = store.find("main", None, GrantType.CLIENT_CREDENTIALS)
    assert cc_found is not None and cc_found.id == cc
    assert store.find("main", "1005", GrantType.CLIENT_CREDENTIALS) is None
    assert store.find("main", "9999", GrantType.AUTHORIZATION_CODE) is None
    assert store.find("other", "1005", GrantType.AUTHORIZATION_CODE) is None
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE grants SET status = 'bogus' WHERE id = {ids[-1]}"))
    found = store.find("main", "1005", GrantType.AUTHORIZATION_CODE)
    assert found is not None and found.id == ids[4]  # the readable one
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE grants SET status = 'bogus' WHERE id = {ids[4]}"))
    found = store.find("main", "1005", GrantType.AUTHORIZATION_CODE)
    assert isinstance(found, UnreadableGrant) and found.id == ids[-1]


def test_the_schema_probe_of_an_unreachable_database_is_a_store_error(db_url: str, tmp_path: Path) -> None:
    """The schema probe (``tokend db upgrade``, readiness) says what is wrong in tokend's
    own error, like every other statement, not SQLAlchemy's."""
    from tokend.store import make_engine
    from tokend.testing import free_port

    if db_url.startswith("sqlite"):
        (tmp_path / "blocker").write_text("")  # a file where the directory should be
        url = f"sqlite:///{tmp_path / 'blocker' / 'tokend.db'}"
        engine = create_engine(url)
    else:
        url = db_url.rsplit("@", 1)[0] + f"@127.0.0.1:{free_port()}/nothing"
        engine = make_engine(url)
    store = Store(engine, Cipher((Secret(generate_key()),)))
    try:
        with pytest.raises(StoreError, match="cannot reach the database"):
            store.revision()
        with pytest.raises(StoreError, match="cannot reach the database"):
            store.upgrade()
    finally:
        store.close()
