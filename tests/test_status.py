"""`tokend status`: what every replica reported, read from the database, on both backends."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import CLIENT_ID
from tokend import circuit, heartbeat, planner
from tokend.cli import main
from tokend.config import load_config
from tokend.daemon import Daemon
from tokend.fake import FakeJustimmo
from tokend.model import NewGrant, Stats
from tokend.policy import initial
from tokend.status import render, replica_state, summary
from tokend.store import Store, open_store
from tokend.testing import write_config


def test_status_shows_replicas_grants_deadlines_and_blocked_clients(
        tmp_path: Path, db_url: str, key_file: Path, fake: FakeJustimmo,
        store_for: Callable[..., Store], capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path / "tokend.toml", db_url=db_url, token_url=fake.token_url, key_file=key_file)
    config = load_config(path, env={})
    store = store_for(config)
    now = datetime.now(UTC)
    issued = fake.issue_many(CLIENT_ID, 3, user_id_start=1)
    store.insert_grants([NewGrant(
        client="main", grant_type="authorization_code", access_token=t.access_token,
        access_expires_at=now + timedelta(minutes=30), obtained_at=now - timedelta(hours=4),
        refresh_token=t.refresh_token, refresh_expires_at=t.refresh_expires_at,
        user_id=str(t.user_id)) for t in issued], lambda g: initial(g, now, config.schedule))

    daemon = Daemon(config, store)
    result = daemon.run_pass()
    assert result is not None and result.refreshed == 3

    capsys.readouterr()  # the pass's log lines
    assert main(["--config", str(path), "status", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["grants"] == {"main": {"ok": 3}}
    assert s["backlog"]["due_now"] == 0
    assert len(s["refresh_token_deadlines"]) == 3
    [r] = s["replicas"]
    assert r["state"] == "running" and r["owner"] == daemon.maintenance.owner
    assert r["last_pass"]["refreshed"] == 3 and r["last_pass"]["ok"] is True
    assert s["held_outcomes"] == 0 and s["blocked_clients"] == []
    # the pass planned: no rate limit in this config, three grants
    assert s["capacity"]["limit"] == 0 and s["capacity"]["grants"] == 3
    assert s["capacity"]["words"].startswith("capacity: no rate limit set; 3 grants")

    # a blocked client, as the replica reports it after its next pass
    daemon.maintenance.circuits["main"] = circuit.Circuit(circuit.State.OPEN, 1, now)
    heartbeat.write(store, heartbeat.row(daemon.maintenance, daemon.started_at,
                                         datetime.now(UTC), result))
    capsys.readouterr()
    assert main(["--config", str(path), "status"]) == 0
    text = capsys.readouterr().out
    assert "blocked clients: main" in text
    assert "main: ok 3" in text and "refreshed 3, failed 0" in text
    for t in issued:
        assert t.access_token not in text and t.refresh_token not in text

    daemon.scheduler.start(paused=True)  # as after start(), without a second pass
    daemon.stop()
    capsys.readouterr()  # the pass's log lines
    assert main(["--config", str(path), "status", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["replicas"][0]["state"] == "stopped" and s["blocked_clients"] == []


def test_replica_state() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    minute = timedelta(minutes=1)
    cases = [
        ({"updated_at": now, "stopped_at": None}, "running"),
        ({"updated_at": now - 4 * minute, "stopped_at": None}, "running"),
        ({"updated_at": now - 5 * minute, "stopped_at": None}, "silent"),
        ({"updated_at": now, "stopped_at": now}, "stopped"),
    ]
    for row, want in cases:
        assert replica_state(row, now, minute) == want


# ---------------------------------------------------------------- capacity (issue 13)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
MIN = timedelta(minutes=1)


def replica(owner: str, c: planner.Capacity | None, planned_at: datetime = NOW - MIN, *,
            updated_at: datetime = NOW - MIN, stopped_at: datetime | None = None,
            report: object = None) -> dict[str, object]:
    """A ``replicas`` row as the store returns it, its last pass carrying the plan's report."""
    last: dict[str, object] = {"ok": True, "claimed": 0, "refreshed": 0, "failed": 0,
                               "skipped": 0, "failures": {}, "duration_s": 0.1}
    if c is not None:
        last["capacity"] = heartbeat.capacity(c, planned_at)
    if report is not None:
        last["capacity"] = report
    return {"owner": owner, "host": f"host-{owner}", "pid": 100, "version": "1",
            "started_at": NOW - HOUR, "last_pass_at": updated_at, "last_pass": json.dumps(last),
            "held_outcomes": 0, "open_circuits": "[]", "updated_at": updated_at,
            "stopped_at": stopped_at}


def cap(limit: float, needed: float, grants: int, margin: timedelta = 6 * HOUR) -> planner.Capacity:
    return planner.Capacity(limit=limit, needed=needed, margin=margin, aim=6 * HOUR,
                            floor=10 * MIN, grants=grants)


@pytest.mark.parametrize(("c", "want", "says", "never"), [
    pytest.param(cap(5.0, 1.0, 86_400), {"limit": 5.0, "needed": 1.0, "ratio": 0.2,
                                          "margin_s": 21600.0, "grants": 86_400},
                 ["capacity: 86400 grants need 1.00 of 5 refreshes/s (20% of the limit)"],
                 ["shrunk", "near capacity", "OVER"], id="under capacity"),
    pytest.param(cap(5.0, 4.0, 300_000), {"ratio": 0.8, "margin_s": 21600.0},
                 ["(80% of the limit)"], ["near capacity", "OVER"], id="at 80 %: no warning yet"),
    pytest.param(cap(5.0, 4.3, 370_000, margin=2 * HOUR),
                 {"limit": 5.0, "needed": 4.3, "ratio": 0.86, "margin_s": 7200.0},
                 ["4.30 of 5 refreshes/s (86% of the limit)",
                  "refresh margin shrunk to 2h (aim 6h, floor 10m) to stay within the limit",
                  "near capacity (alert above 80%)"], ["OVER"], id="near capacity"),
    pytest.param(cap(5.0, 6.0, 520_000, margin=10 * MIN),
                 {"ratio": 1.2, "margin_s": 600.0},
                 ["(120% of the limit)", "refresh margin shrunk to 10m",
                  "OVER CAPACITY: some access tokens will expire before their refresh"],
                 ["near capacity"], id="over the limit"),
    pytest.param(cap(0.0, 3.25, 250_000), {"limit": 0.0, "needed": 3.25, "ratio": None},
                 ["capacity: no rate limit set; 250000 grants need about 3.25 refreshes/s"],
                 ["% of the limit", "OVER"], id="no rate limit set"),
    pytest.param(cap(5.0, 0.0, 0), {"limit": 5.0, "needed": 0.0, "ratio": 0.0, "grants": 0},
                 ["capacity: 0 grants need 0.00 of 5 refreshes/s (0% of the limit)"],
                 ["near capacity", "OVER"], id="empty table"),
    pytest.param(None, {"limit": None, "needed": None, "ratio": None, "margin_s": None,
                        "planned_at": None, "planned_by": None},
                 ["capacity: not known: no replica has reported a plan yet"], ["grants need"],
                 id="no replica has planned"),
])
def test_capacity_in_words(c: planner.Capacity | None, want: dict[str, object],
                           says: list[str], never: list[str]) -> None:
    s = summary(Stats(), [], [replica("a", c)], NOW, MIN)
    got = json.loads(json.dumps(s))["capacity"]  # as `status --json` prints it
    assert {k: got[k] for k in want} == want
    if c is not None:
        assert got["planned_at"] == "2026-03-01T11:59:00Z"
        assert got["planned_by"] == {"host": "host-a", "pid": 100, "state": "running"}
    text = render(s)
    for phrase in says:
        assert phrase in got["words"] and phrase in text
    for phrase in never:
        assert phrase not in text
    assert ("(planned at 2026-03-01T11:59:00Z by host-a pid 100, running)" in text) == (
        c is not None)


def test_capacity_is_the_newest_plan_reported() -> None:
    rows = [
        replica("old", cap(5.0, 1.0, 10), planned_at=NOW - 30 * MIN),
        replica("new", cap(5.0, 2.0, 20), planned_at=NOW - 2 * MIN,
                stopped_at=NOW - MIN),  # stopped a minute ago: its plan is still the newest
        replica("odd", None, report={"limit": "fast", "planned_at": "yesterday"}),
        replica("naive", None, report=heartbeat.capacity(cap(5.0, 9.0, 90),
                                                         NOW.replace(tzinfo=None))),
        replica("gone", cap(5.0, 3.0, 30), planned_at=NOW - MIN,
                updated_at=NOW - 3 * 24 * HOUR, stopped_at=NOW - 2 * 24 * HOUR),  # not listed
    ]
    got = summary(Stats(), [], rows, NOW, MIN)["capacity"]
    assert (got["grants"], got["planned_by"]["host"], got["planned_by"]["state"]) == (
        20, "host-new", "stopped")


def test_cli_status_says_the_capacity_of_the_last_plan(
        tmp_path: Path, key_file: Path, fake: FakeJustimmo,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Through the real `tokend status` on SQLite: the plan of a daemon's pass, as written
    to its heartbeat, is what status says (the same figures as the gauges)."""
    path = write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{tmp_path / 'tokend.db'}",
                        token_url=fake.token_url, key_file=key_file, rate_limit=2,
                        schedule_extra='refresh_before = "30m"\nrefresh_margin_min = "5m"')
    config = load_config(path, env={})
    capsys.readouterr()
    assert main(["--config", str(path), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["capacity"]["planned_at"] is None

    daemon = Daemon(config, open_store(config))
    try:
        now = datetime.now(UTC)
        issued = fake.issue_many(CLIENT_ID, 40, user_id_start=1)
        # one-hour tokens ending together in 40 minutes: not due, but planned
        daemon.store.insert_grants([NewGrant(
            client="main", grant_type="authorization_code", access_token=t.access_token,
            access_expires_at=now + 40 * MIN, obtained_at=now - 20 * MIN,
            refresh_token=t.refresh_token, refresh_expires_at=t.refresh_expires_at,
            user_id=str(t.user_id)) for t in issued],
            lambda g: initial(g, now, config.schedule))
        result = daemon.run_pass()
        assert result is not None and result.claimed == 0
        planned = daemon.maintenance.capacity
        assert planned is not None and planned.grants == 40
        gauge = daemon.metrics.registry.get_sample_value("tokend_refresh_rate_needed")
        assert gauge == planned.needed
    finally:
        daemon.close()
        daemon.store.close()

    capsys.readouterr()
    assert main(["--config", str(path), "status", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["capacity"]
    assert (c["limit"], c["grants"], c["margin_s"], c["aim_s"], c["floor_s"]) == (
        2.0, 40, 1800.0, 1800.0, 300.0)
    assert c["needed"] == pytest.approx(planned.needed, abs=1e-3)
    assert c["ratio"] == pytest.approx(planned.needed / 2, abs=1e-3)
    assert c["words"] == planner.describe(planned)
    assert c["planned_by"]["state"] == "running"

    assert main(["--config", str(path), "status"]) == 0
    text = capsys.readouterr().out
    assert f"capacity: 40 grants need {planned.needed:.2f} of 2 refreshes/s" in text
    assert "(planned at " in text
