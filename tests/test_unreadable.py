"""One bad row never stops the daemon: it is set aside, the others are maintained.

A status that is no status, or a timestamp Python cannot read (SQLite keeps any text:
``'0000-bad'`` sorts before every real time, so it is always "due"; PostgreSQL has
``'-infinity'``) used to fail the claim after its lease committed, or inside it, every
time; ``grants list`` tracebacked.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from conftest import CLIENT_ID
from tokend.cli import main
from tokend.config import Config
from tokend.daemon import Daemon
from tokend.errors import GrantUnreadable
from tokend.fake import FakeJustimmo
from tokend.model import GrantType, NewGrant, Status, UnreadableGrant
from tokend.provider import ProviderClient
from tokend.store import Store
from tokend.testing import quiet_logs, seed_grants

N = 12


def seed(store: Store, config: Config, fake: FakeJustimmo, n: int = N) -> list[int]:
    """n grants, all due now (the access token has an hour left)."""
    issued = fake.issue_many(CLIENT_ID, n, user_id_start=1)
    now = datetime.now(UTC)
    return seed_grants(store, issued, config.schedule, now=now)


def corrupt(store: Store, ids: list[int]) -> dict[int, str]:
    """Break some rows by hand as an operator's bad UPDATE would; id -> broken column."""
    broken = {ids[2]: "status", ids[5]: "next_attempt_at", ids[7]: "next_attempt_at",
              ids[9]: "access_expires_at"}
    # SQLite keeps any text; PostgreSQL has timestamps Python cannot hold. Either way
    # one sorts before every real time (always due), one after (never due).
    first, last = ("0000-bad", "garbage") if store.dialect == "sqlite" \
        else ("-infinity", "infinity")
    statements = [
        f"UPDATE grants SET status = 'bogus' WHERE id = {ids[2]}",
        f"UPDATE grants SET next_attempt_at = '{first}' WHERE id = {ids[5]}",
        f"UPDATE grants SET next_attempt_at = '{last}' WHERE id = {ids[7]}",
        f"UPDATE grants SET access_expires_at = '{first}' WHERE id = {ids[9]}",
    ]
    with store.engine.begin() as conn:
        for sql in statements:
            conn.execute(text(sql))
    return broken


def raw(store: Store, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    with store.engine.connect() as conn:
        listed = ",".join(str(i) for i in ids)
        rows = conn.execute(text(f"SELECT * FROM grants WHERE id IN ({listed})")).all()
    return {r[0]: tuple(r) for r in rows}


@pytest.fixture
def world(make_config: Callable[..., Config], store_for: Callable[..., Store],
          fake: FakeJustimmo) -> Iterator[tuple[Config, Store, list[int], dict[int, str]]]:
    config = make_config(fake=fake, schedule_extra="concurrency = 4\nbatch_size = 3")
    store = store_for(config)
    ids = seed(store, config, fake)
    broken = corrupt(store, ids)
    yield config, store, ids, broken


def test_claims_set_bad_rows_aside_and_keep_claiming(world: Any) -> None:
    _config, store, ids, broken = world
    before = raw(store, list(broken))
    claimed: list[int] = []
    with quiet_logs("warning") as sink:
        for _ in range(3 * N):  # one at a time: a bad row sorting first must not block
            got = store.claim_due("me", 1, timedelta(minutes=5))
            if not got:
                break
            claimed += [g.id for g in got]
    due_bad = {i for i, col in broken.items() if i != ids[7]}  # 'garbage' sorts last: not due
    assert sorted(claimed) == sorted(set(ids) - set(broken))
    assert set(store.unreadable) == due_bad
    assert raw(store, list(broken)) == before  # untouched: no lease, nothing written
    events = [json.loads(line) for line in sink.getvalue().splitlines()]
    logged = [e for e in events if e["event"] == "grant_unreadable"]
    assert sorted(e["grant_id"] for e in logged) == sorted(due_bad)  # once each
    for e in logged:
        assert broken[e["grant_id"]] in e["error"] and e["level"] == "warning"
    assert "bogus" in store.unreadable[ids[2]]


def test_claim_stays_an_index_range_scan_with_rows_set_aside(world: Any) -> None:
    _config, store, _ids, broken = world
    now = datetime.now(UTC)
    later = now + timedelta(hours=5)
    store.insert_grants([NewGrant(
        client="main", grant_type="authorization_code", access_token=f"a{i}",
        access_expires_at=now + timedelta(hours=6), obtained_at=now, refresh_token=f"r{i}",
        refresh_expires_at=now + timedelta(days=30), user_id=str(10_000 + i))
        for i in range(3000)], lambda g: (Status.OK, None, later))
    skipping = store.claim_query(now, 10, list(broken)).compile(
        dialect=store.engine.dialect, compile_kwargs={"literal_binds": True})
    prefix = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN "
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            conn.execute(text("ANALYZE grants"))
        plan = "\n".join(" ".join(str(x) for x in r)
                         for r in conn.exec_driver_sql(prefix + str(skipping)).all())
    assert "ix_grants_next_attempt_at" in plan, plan
    assert "SCAN grants" not in plan and "Seq Scan" not in plan, plan


def test_a_row_fixed_by_hand_comes_back(world: Any) -> None:
    _config, store, ids, _broken = world
    while store.claim_due("me", 5, timedelta(minutes=5)):
        pass
    assert ids[2] in store.unreadable
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE grants SET status = 'ok' WHERE id = {ids[2]}"))
    store.recheck_unreadable()
    assert ids[2] not in store.unreadable
    assert [g.id for g in store.claim_due("me", 5, timedelta(minutes=5))] == [ids[2]]


def test_the_daemon_maintains_every_other_grant(world: Any, fake: FakeJustimmo) -> None:
    config, store, ids, broken = world
    before = raw(store, list(broken))
    provider = ProviderClient(config.provider, pool_size=4)
    daemon = Daemon(config, store, provider=provider)
    try:
        with quiet_logs("warning") as sink:
            first = daemon.run_pass()
            second = daemon.run_pass()
    finally:
        daemon.maintenance.close()
        provider.close()
    assert first is not None and second is not None, sink.getvalue()
    good = set(ids) - set(broken)
    assert (first.refreshed, first.failed) == (len(good), 0), first
    assert (second.claimed, second.failed) == (0, 0), second  # nothing left leased or due
    rows = {g.id: g for g in store.iter_grants()}
    for gid in good:
        g = rows[gid]
        assert (g.status, g.lease_owner, g.in_doubt, g.token_version) == \
            (Status.OK, None, False, 1), g
    assert fake.stats()["reuse_count"] == 0
    assert raw(store, list(broken)) == before
    events = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert not [e for e in events if e["event"] in ("pass_crashed", "pass_failed",
                                                     "grant_attempt_crashed",
                                                     "gauges_not_updated")], events
    due_bad = {i for i in broken if i != ids[7]}
    sample = daemon.metrics.registry.get_sample_value
    assert sample("tokend_grants_unreadable") == len(due_bad)
    assert sample("tokend_due_grants", {"client": "main"}) == 0  # not a backlog
    assert sample("tokend_grants", {"client": "main", "status": "ok"}) == N - 1


def test_grants_list_and_show_name_the_unreadable_row(
        world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    config, store, ids, broken = world
    assert config.source is not None
    path = str(config.source)
    assert main(["--config", path, "grants", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + N
    cells = {int(line.split("\t")[0]): line.split("\t") for line in out[1:]}
    for gid, column in broken.items():
        assert cells[gid][5] == "unreadable" and column in cells[gid][6], cells[gid]
    assert cells[ids[0]][5] == "ok"

    assert main(["--config", path, "grants", "list", "--json"]) == 0
    listed = {d["id"]: d for d in json.loads(capsys.readouterr().out)}
    assert len(listed) == N
    bad = listed[ids[2]]
    assert bad["status"] == "unreadable" and "status 'bogus' is not a status" in bad["error"]

    assert main(["--config", path, "grants", "show", str(ids[2]), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"id": ids[2], "status": "unreadable", "error": bad["error"]}
    assert main(["--config", path, "grants", "show", str(ids[2])]) == 0
    text_out = capsys.readouterr().out
    assert "unreadable" in text_out and "bogus" in text_out
    with pytest.raises(GrantUnreadable):
        store.get(ids[2])
    assert [g.id for g in store.iter_grants()] == sorted(set(ids) - set(broken))
    assert all(isinstance(r, UnreadableGrant) == (r.id in broken) for r in store.iter_rows())


def test_the_runbook_repairs_a_bad_status(world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/alerts.md#tokendgrantsunreadable: `grants disable` then `grants enable`."""
    from tokend.api import GrantUnavailable, TokenStore

    config, store, ids, _broken = world
    while store.claim_due("me", 5, timedelta(minutes=5)):
        pass
    assert ids[2] in store.unreadable
    with TokenStore(config, store=store) as api, \
            pytest.raises(GrantUnavailable, match=f"grant {ids[2]} is unreadable"):
        api.access_token(client="main", user_id=3)
    path = str(config.source)
    assert main(["--config", path, "grants", "disable", str(ids[2])]) == 0
    assert main(["--config", path, "grants", "enable", str(ids[2])]) == 0
    capsys.readouterr()
    store.recheck_unreadable()
    assert ids[2] not in store.unreadable
    assert store.get(ids[2]).status == Status.OK


def test_an_unknown_grant_type_is_an_unreadable_row(world: Any) -> None:
    # Grant.grant_type is a GrantType: a row no tokend wrote is named, not maintained as
    # whatever a string comparison would make of it.
    _config, store, ids, broken = world
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE grants SET grant_type = 'password' WHERE id = {ids[0]}"))
    with pytest.raises(GrantUnreadable, match="grant_type 'password' is not a grant type"):
        store.get(ids[0])
    assert [g.id for g in store.iter_grants()] == sorted(set(ids) - set(broken) - {ids[0]})
    assert store.get(ids[1]).grant_type is GrantType.AUTHORIZATION_CODE


@pytest.mark.postgres
def test_lenient_timestamps_keep_psycopgs_own_loader(pg_url: str) -> None:
    """The lenient loader wraps the loader psycopg would use (the C one of psycopg-binary)
    rather than subclassing the pure-Python one, which cost ~7 us a value (a tenth of a
    claim's CPU): same values, the same loader underneath, text for what cannot load."""
    from psycopg.pq import Format

    from tokend.db import make_engine

    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            dbapi = conn.connection.driver_connection
            oid = dbapi.adapters.types["timestamptz"].oid
            loader = dbapi.adapters.get_loader(oid, Format.TEXT)(oid, dbapi)
            default = type(psycopg_default_loader(oid))
            assert type(loader._load.__self__) is default
            rows = conn.execute(text(
                "SELECT '2026-12-02 10:00:00+00'::timestamptz, 'infinity'::timestamptz")).one()
    finally:
        engine.dispose()
    assert rows == (datetime(2026, 12, 2, 10, tzinfo=UTC), "infinity")


def psycopg_default_loader(oid: int) -> Any:
    from psycopg import adapters
    from psycopg.pq import Format

    return adapters.get_loader(oid, Format.TEXT)(oid)  # type: ignore[misc]
