"""`tokend status`: what every replica reported, read from the database, on both backends."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import CLIENT_ID
from tokend import circuit, heartbeat
from tokend.cli import main
from tokend.config import load_config
from tokend.daemon import Daemon
from tokend.fake import FakeJustimmo
from tokend.model import NewGrant
from tokend.policy import initial
from tokend.status import replica_state
from tokend.store import Store
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
