"""Held outcomes (issue 9, items 4, 5, 12): a rotated refresh token whose save fails, for
whatever reason, is spooled, kept and saved later, also by the next process; the spool's
files; SQLite's durability; the log line operators grep for."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from conftest import CLIENT_ID
from faultlib import wait_until
from test_maintenance import Env
from tokend import logs
from tokend.config import Config, Secret
from tokend.crypto import Cipher, generate_key
from tokend.errors import StoreError
from tokend.fake import FakeJustimmo
from tokend.model import Grant, Outcome, Status
from tokend.sdnotify import SystemdNotifier
from tokend.store import SaveItem, Store, make_engine
from tokend.testing import quiet_logs

STATEMENT = "UPDATE grants SET refresh_token=%(p_refresh_token)s WHERE grants.id = %(g_id)s"


def read_only() -> Exception:
    return sa_exc.InternalError(STATEMENT, {}, Exception(
        "cannot execute UPDATE in a read-only transaction"))


def data_error() -> Exception:
    return sa_exc.DataError(STATEMENT, {}, Exception(
        "value too long for type character varying(255)"))


def database_error() -> Exception:
    return sa_exc.DatabaseError(STATEMENT, {}, Exception("database disk image is malformed"))


def pool_timeout() -> Exception:
    return sa_exc.TimeoutError("QueuePool limit of size 10 overflow 10 reached, connection "
                               "timed out, timeout 30.00")


def lost_connection() -> Exception:
    return sa_exc.OperationalError(STATEMENT, {}, Exception("server closed the connection"))


ERRORS: dict[str, Callable[[], Exception]] = {
    "read_only": read_only, "data_error": data_error, "database_error": database_error,
    "pool_timeout": pool_timeout, "lost_connection": lost_connection,
}


class FaultyStore(Store):
    """Its saves fail with the given SQLAlchemy errors first, raised inside the store's
    own transaction (so they cross the store's error boundary like real ones)."""

    def __init__(self, inner: Store, faults: list[Exception] | None = None, *,
                 always: Callable[[], Exception] | None = None) -> None:
        super().__init__(inner.engine, inner.cipher, clock=inner.clock)
        self.faults = faults or []
        self.always = always
        self.calls = 0

    def save_many(self, items: Sequence[SaveItem]) -> list[bool]:
        self.calls += 1
        err = self.faults.pop(0) if self.faults else (self.always() if self.always else None)
        if err is not None:
            with self.tx():
                raise err
        return super().save_many(items)


@pytest.fixture
def env(make_config: Callable[..., Config], store_for: Callable[..., Store],
        fake: FakeJustimmo) -> Iterator[Env]:
    e = Env(make_config(fake=fake, schedule_extra="concurrency = 4"), None, fake)  # type: ignore[arg-type]
    e.store = store_for(e.config)
    yield e
    e.close()


def spool_files(env: Env) -> list[str]:
    path = env.config.state_dir() / "spool"
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def stored_refresh(env: Env, grant_id: int) -> str | None:
    return env.store.tokens(env.store.get(grant_id, with_tokens=True))[1]


def all_current(env: Env) -> bool:
    """Every grant holds a refresh token the provider accepts (its newest)."""
    for g in env.grants():
        token = stored_refresh(env, g.id)
        if token is None or not env.fake.refresh_token_valid(token):
            return False
    return True


def wait(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- item 4


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_every_database_error_while_a_rotated_token_is_held_keeps_it(env: Env,
                                                                     kind: str) -> None:
    """The save fails five times (more than the worker retries); the token is spooled
    before the first retry and saved by the background replay once the database takes it."""
    env.seed(2)
    faulty = FaultyStore(env.store, [ERRORS[kind]() for _ in range(5)])
    m = env.engine(faulty, save_retry=0.01)
    result = m.run_pass()
    assert result.refreshed == 2 and result.failed == 0, result
    wait(lambda: all_current(env), what="the held token saved")
    wait(lambda: spool_files(env) == [], what="the spool emptied")
    assert faulty.calls >= 7  # 5 refused, then both saved
    assert env.fake.reuse_count() == 0
    for g in env.grants():
        assert (g.status, g.lease_owner, g.in_doubt, g.failure_count) == (
            Status.OK, None, False, 0)
    assert env.metric("tokend_held_outcomes") == 0
    # nothing is due again: the saved outcome was the refresh's
    assert env.engine().run_pass().claimed == 0


def test_a_held_token_is_spooled_before_the_first_retry(env: Env) -> None:
    [issued] = env.seed(1)
    seen: list[list[str]] = []

    class Watching(FaultyStore):
        def save_many(self, items: Sequence[SaveItem]) -> list[bool]:
            seen.append(spool_files(env))
            return super().save_many(items)

    store = Watching(env.store, [read_only(), read_only()])
    m = env.engine(store, save_retry=0.01)
    m.run_pass()
    wait_until(lambda: m.held.count() == 0, 10, what="the held outcome saved")
    assert seen[0] == [] and len(seen[1]) == 1 and seen[1][0].endswith(".json")
    assert spool_files(env) == []  # saved at the second retry, then removed
    assert issued.refresh_token is not None
    assert not env.fake.refresh_token_valid(issued.refresh_token)
    assert all_current(env)


def test_the_spool_file_holds_no_token_in_clear(env: Env) -> None:
    env.seed(1)
    m = env.engine(FaultyStore(env.store, always=read_only), save_retry=0.01)
    m.run_pass()
    [name] = spool_files(env)
    raw = (env.config.state_dir() / "spool" / name).read_text()
    data = json.loads(raw)
    assert data["grant_id"] == env.grants()[0].id
    current = env.fake.current_refresh_token(1, CLIENT_ID)
    assert current is not None and current not in raw
    assert data["outcome"]["refresh_token"].startswith("enc:v1:")
    assert os.stat(env.config.state_dir() / "spool" / name).st_mode & 0o777 == 0o600
    assert env.metric("tokend_held_outcomes") == 1
    m.close()


def test_a_held_grant_is_not_refreshed_again_while_held(env: Env) -> None:
    """Its lease runs out while the database refuses its save; the next pass claims it
    again but must not send the spent token it has stored."""
    env.seed(1)
    faulty = FaultyStore(env.store, always=read_only)
    m = env.engine(faulty, save_retry=0.01)
    assert m.run_pass().refreshed == 1
    requests_before = env.fake.stats()["token_requests"]
    with env.store.engine.begin() as conn:  # the lease expired
        conn.execute(text("UPDATE grants SET next_attempt_at = :t, lease_expires_at = :t"),
                     {"t": _db_time(env.store, datetime.now(UTC) - timedelta(seconds=1))})
    result = m.run_pass()
    assert result.claimed == 1 and result.skipped == 1 and result.failed == 0
    assert env.fake.stats()["token_requests"] == requests_before
    faulty.always = None  # the database takes saves again
    wait(lambda: all_current(env), what="the held token saved")
    assert env.fake.reuse_count() == 0
    m.close()


# --------------------------------------------------------------------------- item 5


def test_held_tokens_survive_the_process(env: Env) -> None:
    """A process holding tokens dies (nothing of it runs on); the next one saves them from
    the spool before it claims anything, and refreshes nothing twice."""
    env.seed(3)
    dead = env.engine(FaultyStore(env.store, always=lost_connection), save_retry=0.01)
    assert dead.run_pass().refreshed == 3
    assert len(spool_files(env)) == 3
    dead.held.close()  # as if killed: no settle, no save
    requests = env.fake.stats()["token_requests"]
    assert not all_current(env)

    after = env.engine()
    assert after.held.count() == 0
    result = after.run_pass()
    assert result.claimed == 0  # replayed first; then nothing is due
    assert spool_files(env) == [] and after.held.count() == 0
    assert all_current(env)
    assert env.fake.stats()["token_requests"] == requests
    assert env.fake.reuse_count() == 0
    for g in env.grants():
        assert (g.status, g.lease_owner, g.in_doubt) == (Status.OK, None, False)


def test_a_replay_whose_guard_no_longer_matches_is_dropped(env: Env) -> None:
    """The grant was re-consented (its tokens replaced, token_version moved) meanwhile: the
    spooled outcome is older and must not overwrite it."""
    env.seed(1)
    dead = env.engine(FaultyStore(env.store, always=read_only), save_retry=0.01)
    dead.run_pass()
    dead.held.close()
    [g] = env.grants()
    with env.store.engine.begin() as conn:
        conn.execute(text("UPDATE grants SET token_version = token_version + 1, "
                          "lease_owner = NULL, lease_expires_at = NULL"))
    before = env.store.get(g.id, with_tokens=True)
    with quiet_logs("info") as sink:
        env.engine().held.recover()
    assert spool_files(env) == []
    after = env.store.get(g.id, with_tokens=True)
    assert after.refresh_token_enc == before.refresh_token_enc
    assert "held_outcome_dropped" in sink.getvalue()


def test_a_replay_cannot_apply_twice(env: Env) -> None:
    """A stale copy of an entry that was saved already (e.g. replayed by a second process
    on this host) never matches again, even once the same owner holds a new lease."""
    env.seed(1)
    m = env.engine(FaultyStore(env.store, always=read_only), save_retry=0.01)
    m.run_pass()
    [name] = spool_files(env)
    raw = (env.config.state_dir() / "spool" / name).read_text()
    m.held.close()
    env.engine().held.recover()
    saved = env.store.get(env.grants()[0].id, with_tokens=True)
    assert saved.lease_owner is None and all_current(env)
    (env.config.state_dir() / "spool" / name).write_text(raw)  # the stale copy
    with env.store.engine.begin() as conn:  # its owner leases the grant again
        conn.execute(text("UPDATE grants SET lease_owner = :o"), {"o": json.loads(raw)["owner"]})
    env.engine().held.recover()
    assert env.store.get(saved.id, with_tokens=True).refresh_token_enc == \
        saved.refresh_token_enc
    assert spool_files(env) == []


def test_damaged_and_undecryptable_entries_are_kept_aside(env: Env) -> None:
    env.seed(2)
    dead = env.engine(FaultyStore(env.store, always=read_only), save_retry=0.01)
    dead.run_pass()
    dead.held.close()
    names = spool_files(env)
    assert len(names) == 2
    spool = env.config.state_dir() / "spool"
    # one damaged (truncated), one written with a key this process does not have
    (spool / names[0]).write_text((spool / names[0]).read_text()[:40])
    other = Cipher((Secret(generate_key()),))
    data = json.loads((spool / names[1]).read_text())
    held_grant = data["grant_id"]
    data["outcome"]["refresh_token"] = other.encrypt("x")
    data["outcome"]["access_token"] = other.encrypt("y")
    (spool / names[1]).write_text(json.dumps(data))
    with quiet_logs("info") as sink:
        m = env.engine()
        result = m.run_pass()  # does not crash
    lines = sink.getvalue()
    assert "spool_entry_damaged" in lines and "spool_entry_undecryptable" in lines
    assert sorted(spool_files(env)) == sorted([names[0] + ".bad", names[1]])
    # the undecryptable entry's grant is still held: not refreshed with its spent token
    assert m.held.holds(held_grant) and m.held.count() == 1
    assert env.metric("tokend_held_outcomes") == 1
    assert result.failed == 0
    assert env.fake.reuse_count() == 0


def test_healthy_while_saves_are_refused(env: Env) -> None:
    """A pass never sticks on held tokens (the workers hand them over), so /healthz and
    the watchdog keep going; the held count is reported."""
    from tokend.daemon import Daemon

    env.seed(2)
    faulty = FaultyStore(env.store, always=read_only)
    d = Daemon(env.config, faulty, metrics=env.metrics, provider=env.provider)
    d.maintenance.save_retry = 0.01
    d.maintenance.held.retry = 0.05
    done = threading.Event()

    def one_pass() -> None:
        d.run_pass()
        done.set()

    threading.Thread(target=one_pass, daemon=True).start()
    try:
        assert done.wait(30), "the pass is stuck saving held tokens"
        d.scheduler.start(paused=True)
        ok, detail = d.healthy()
        assert ok and detail["held_outcomes"] == 2 and not detail["pass_stuck"]
        faulty.always = None
        wait(lambda: d.maintenance.held.count() == 0, what="the background replay")
        assert all_current(env) and env.fake.reuse_count() == 0
    finally:
        d.scheduler.shutdown(wait=False)
        d.maintenance.close()


def test_stop_with_held_outcomes_exits_once_all_are_spooled(env: Env) -> None:
    from tokend import daemon as daemon_module

    env.seed(1)
    m = env.engine(FaultyStore(env.store, always=read_only), save_retry=10.0)
    runner = threading.Thread(target=m.run_pass, daemon=True)
    runner.start()
    wait(lambda: spool_files(env), what="the outcome spooled")
    t0 = time.monotonic()
    m.stop()
    runner.join(10)
    assert not runner.is_alive() and time.monotonic() - t0 < 5  # no 10 s retry wait
    m.close()
    assert m.held.settle(5) == 0
    assert daemon_module._stopped(m.held.count(), 0) == 0
    assert daemon_module._stopped(1, 1) == 1
    assert len(spool_files(env)) == 1


def test_stop_asks_systemd_for_time_while_outcomes_are_held(tmp_path: Path) -> None:
    from tokend import daemon as daemon_module

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(3)
    try:
        held = [1]
        with daemon_module._extend_stop_while_held(SystemdNotifier(address=path), lambda: held[0]):
            message = sock.recv(1024).decode()
        assert message == "EXTEND_TIMEOUT_USEC=15000000"
        with daemon_module._extend_stop_while_held(SystemdNotifier(address=path), lambda: 0):
            time.sleep(0.2)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1024)
    finally:
        sock.close()


# --------------------------------------------------------------------------- the spool's files


def _entry(now: datetime, *, refresh: str | None = "def50200" + "ab" * 20) -> Any:
    from tokend.spool import Entry

    outcome = Outcome(status=Status.OK, reason=None, next_attempt_at=now + timedelta(hours=18),
                      failure_count=0, last_error=None, in_doubt=False,
                      access_token="access-1", refresh_token=refresh,
                      access_expires_at=now + timedelta(days=1),
                      refresh_expires_at=now + timedelta(days=30), obtained_at=now,
                      reminder_deadline=now + timedelta(days=30),
                      reminder_point=now + timedelta(days=27))
    grant = Grant(id=7, client="main", grant_type="authorization_code", user_id="42",
                  tenant_id="9", status=Status.RECONSENT_DUE, reason="max_age",
                  access_expires_at=None, refresh_expires_at=None, obtained_at=None,
                  consented_at=None, failure_count=0, last_error=None, next_attempt_at=None,
                  in_doubt=False, token_version=3, has_refresh_token=True, created_at=now,
                  updated_at=now)
    event = {"event": "recovered", "grant_id": 7, "status": "ok"}
    return Entry.of(grant, outcome, "host:1:abc", event, now)


@pytest.mark.parametrize("refresh", ["def50200" + "ab" * 20, None])
def test_entry_round_trip(refresh: str | None) -> None:
    from tokend.spool import dumps, loads

    cipher = Cipher((Secret(generate_key()),))
    entry = _entry(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), refresh=refresh)
    raw = dumps(entry, cipher)
    assert "access-1" not in raw and (refresh is None or refresh not in raw)
    assert loads(raw, cipher, entry.name) == entry
    assert entry.name.startswith("7-3-") and entry.name.endswith(".json")


@pytest.mark.parametrize("damage", [
    lambda raw: raw[:30],
    lambda raw: "[]",
    lambda raw: raw.replace('"format": 1', '"format": 99'),
    lambda raw: raw.replace('"status": "ok"', '"status": "nonsense"'),
    lambda raw: raw.replace('"grant_id": 7', '"grant_id": "seven"'),
    lambda raw: raw.replace("+00:00", ""),  # a naive time
    lambda raw: json.dumps({**json.loads(raw), "event": [1]}),
])
def test_a_damaged_entry_is_a_spool_error(damage: Callable[[str], str]) -> None:
    from tokend.spool import SpoolError, dumps, loads

    cipher = Cipher((Secret(generate_key()),))
    with pytest.raises(SpoolError, match="damaged"):
        loads(damage(dumps(_entry(datetime.now(UTC)), cipher)), cipher, "x.json")


def test_an_entry_of_another_key_is_undecryptable_but_names_its_grant() -> None:
    from tokend.errors import DecryptError
    from tokend.spool import dumps, grant_id_of, loads

    raw = dumps(_entry(datetime.now(UTC)), Cipher((Secret(generate_key()),)))
    with pytest.raises(DecryptError):
        loads(raw, Cipher((Secret(generate_key()),)))
    assert grant_id_of(raw) == 7 and grant_id_of("{") is None


def test_spool_writes_atomically_and_durably(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tokend.spool import Spool

    synced: list[int] = []
    real_fsync = os.fsync
    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    spool = Spool(lambda: tmp_path)
    spool.write("1-0-a.json", "{}")
    assert len(synced) == 2  # the file, then the directory
    assert [p.name for p in tmp_path.iterdir()] == ["1-0-a.json"]  # no temporary left
    assert (tmp_path / "1-0-a.json").stat().st_mode & 0o777 == 0o600
    assert spool.names() == ["1-0-a.json"]
    spool.remove("1-0-a.json")
    spool.remove("1-0-a.json")  # gone already: fine
    assert spool.names() == []


# --------------------------------------------------------------------------- the store's boundary


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_every_database_error_is_a_store_error(make_config: Callable[..., Any],
                                               store_for: Callable[..., Store],
                                               kind: str) -> None:
    store = store_for(make_config())
    with pytest.raises(StoreError, match="database error"), store.tx():
        raise ERRORS[kind]()


def test_a_constraint_is_a_store_conflict(make_config: Callable[..., Any],
                                          store_for: Callable[..., Store]) -> None:
    from tokend.errors import StoreConflict

    store = store_for(make_config())
    assert store.ensure_client_credentials(["main"]) == ["main"]
    with pytest.raises(StoreConflict), store.tx() as conn:
        conn.execute(text("INSERT INTO grants (client, grant_type, status, failure_count, "
                          "in_doubt, token_version, created_at, updated_at) SELECT client, "
                          "grant_type, status, failure_count, in_doubt, token_version, "
                          "created_at, updated_at FROM grants"))
    # a second replica creating the same row is not an error
    assert store.ensure_client_credentials(["main"]) == []


@pytest.mark.postgres
def test_a_read_only_session_is_dropped_from_the_pool(pg_url: str) -> None:
    """After a failover a pooled session stays read-only: it must not be reused."""
    engine = make_engine(pg_url, pool_size=1)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET SESSION default_transaction_read_only = on")
            conn.commit()
            with pytest.raises(sa_exc.InternalError):
                conn.exec_driver_sql("CREATE TEMP TABLE t (x int)")
            assert conn.invalidated
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW default_transaction_read_only").scalar() == "off"
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- item 12


def test_sqlite_commits_are_durable(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'tokend.db'}", pool_size=2)
    try:
        for _ in range(3):  # pooled connections, reused
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- the log masker


def test_flags_of_secret_named_fields_are_shown_but_secrets_masked() -> None:
    with quiet_logs("info") as sink:
        logs.get("t").error("save_failed_retrying", holding_rotated_token=True,
                            refresh_token="abc", client_secret="pw", api_key="k",
                            access_token=None, count_token=3, password="hunter2")
    line = json.loads(sink.getvalue().splitlines()[-1])
    assert line["holding_rotated_token"] is True and line["count_token"] == 3
    assert line["access_token"] is None
    for key in ("refresh_token", "client_secret", "api_key", "password"):
        assert line[key] == logs.MASK, key
    assert "hunter2" not in sink.getvalue()


def _db_time(store: Store, t: datetime) -> Any:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if store.dialect == "sqlite" else t


def test_without_a_writable_spool_the_token_is_held_in_memory(env: Env) -> None:
    """The state directory fails: the outcome is still held (in memory), and a stop saves
    it to the database if it can, or reports it lost."""
    from tokend import daemon as daemon_module
    from tokend.errors import ConfigError
    from tokend.spool import Spool

    def broken() -> Path:
        raise ConfigError("state.dir: /nonexistent is not writable by this user")

    env.seed(1)
    faulty = FaultyStore(env.store, always=read_only)
    m = env.engine(faulty, save_retry=0.01)
    m.held.load()  # read at start-up (without it, nothing is claimed)
    m.held.spool = Spool(broken)
    m.held.retry = 60.0  # the background replay stays out of the way
    with quiet_logs("info") as sink:
        assert m.run_pass().refreshed == 1
        assert m.held.count() == 1 and m.held.unspooled() == 1
        assert m.held.settle(0.2) == 1  # still refused: it would be lost
        faulty.always = None
        assert m.held.settle(5) == 0  # saved straight to the database
    assert "spool_write_failed" in sink.getvalue()
    assert daemon_module._stopped(1, 1) == 1
    assert all_current(env) and env.fake.reuse_count() == 0
    m.close()


def test_nothing_is_claimed_while_the_spool_cannot_be_read(env: Env) -> None:
    """Held outcomes of a dead predecessor may be in it: their grants' stored tokens are
    spent, so no grant is refreshed before the spool was read."""
    from tokend.errors import ConfigError
    from tokend.spool import Spool

    def broken() -> Path:
        raise ConfigError("state.dir: /nonexistent is not writable by this user")

    env.seed(2)
    m = env.engine()
    m.held.spool = Spool(broken)
    with pytest.raises(ConfigError):
        m.run_pass()
    assert env.fake.stats()["token_requests"] == 0
    assert all(g.lease_owner is None for g in env.grants())


def test_run_once_saves_the_spool_before_it_claims(env: Env) -> None:
    import subprocess
    import sys

    env.seed(2)
    dead = env.engine(FaultyStore(env.store, always=read_only), save_retry=0.01)
    dead.run_pass()
    dead.held.close()
    assert len(spool_files(env)) == 2
    requests = env.fake.stats()["token_requests"]
    assert env.config.source is not None
    done = subprocess.run([sys.executable, "-m", "tokend", "--config", str(env.config.source),
                           "run", "--once"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held_outcome_saved" in done.stdout + done.stderr
    assert spool_files(env) == [] and all_current(env)
    assert env.fake.stats()["token_requests"] == requests  # nothing refreshed twice
    assert env.fake.reuse_count() == 0


def _kill_backends(url: str, engine: Any) -> None:
    """End every server process of ``engine``'s pool, as a server restart would."""
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    admin = make_engine(url, pool_size=1)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
            conn.commit()
    finally:
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize(("idle", "fails_once"), [(0.0, False), (3600.0, True)])
def test_a_pooled_connection_is_pinged_after_idling(pg_url: str, idle: float,
                                                     fails_once: bool) -> None:
    """Idle past ``ping_after_idle``: the dead connection is noticed before use and
    replaced. Used a moment ago: its statement fails once (a StoreError, which every
    caller retries) and the pool connects anew for the next."""
    from tokend.db import Database

    engine = make_engine(pg_url, pool_size=1, ping_after_idle=idle)
    db = Database(engine)
    try:
        _kill_backends(pg_url, engine)
        if fails_once:
            with pytest.raises(StoreError), db.tx() as conn:
                conn.exec_driver_sql("SELECT 1")
        with db.tx() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_connections_notice_a_vanished_server(pg_url: str) -> None:
    """TCP keepalives and a user timeout on every pooled connection (a server gone
    without a word would block a save forever); a value given in the URL wins."""
    for url, idle in ((pg_url, "10"), (f"{pg_url}?keepalives_idle=30", "30")):
        engine = make_engine(url, pool_size=1)
        try:
            with engine.connect() as conn:
                params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
            assert params["keepalives"] == "1"
            assert params["keepalives_idle"] == idle
            assert params["tcp_user_timeout"] == "30000"
        finally:
            engine.dispose()
