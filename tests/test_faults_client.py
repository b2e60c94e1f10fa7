"""A fixed client secret works at once, with real processes: ``tokend run`` with a wrong
client secret for a while (its grants wait), stopped, the secret fixed in the config,
``tokend run`` again: every grant refreshed within seconds, none twice."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import faultlib as fl
from tokend.config import load_config
from tokend.crypto import generate_key
from tokend.model import NewGrant
from tokend.policy import initial
from tokend.store import open_store
from tokend.testing import write_config

pytestmark = [pytest.mark.faults]

N = 20
WRONG = 'client_secret = "not-the-secret"'
RIGHT = f'client_secret = "{fl.CLIENT_SECRET}"'


def test_restart_after_fixing_the_secret_refreshes_every_grant_at_once(
        tmp_path: Path, db_url: str) -> None:
    key = tmp_path / "tokend-key"
    key.write_text(generate_key() + "\n")
    key.chmod(0o600)
    fake = fl.FakeProcess(tmp_path)
    daemons: list[fl.Daemon] = []
    try:
        path = write_config(tmp_path / "tokend.toml", db_url=db_url,
                               token_url=fake.token_url, key_file=key, interval="2s",
                               retry_max="15m")
        good = path.read_text()
        assert RIGHT in good
        upgraded = fl.tokend(path, "db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        config = load_config(path, env={})
        store = open_store(config)
        try:
            now = datetime.now(UTC)
            issued = fake.issue(N)
            store.insert_grants([NewGrant(
                client="main", grant_type="authorization_code", access_token=t["access_token"],
                access_expires_at=now + timedelta(minutes=20 + i),
                obtained_at=now - timedelta(hours=23), refresh_token=t["refresh_token"],
                refresh_expires_at=datetime.fromisoformat(t["refresh_expires_at"]),
                user_id=str(t["user_id"]), tenant_id=str(t["tenant_id"]))
                for i, t in enumerate(issued)], lambda g: initial(g, now, config.schedule))
        finally:
            store.close()

        def grants() -> list[tuple[int, str, datetime | None, str | None, int]]:
            s = open_store(config)
            try:
                return [(g.id, g.status.value, g.obtained_at, g.last_error, g.failure_count)
                        for g in s.iter_grants()]
            finally:
                s.close()

        # 1. A wrong secret: the grants wait for their client; one probe per step.
        path.write_text(good.replace(RIGHT, WRONG))
        wrong = fl.Daemon(path, "run", log=tmp_path / "wrong.log")
        daemons.append(wrong)
        fl.wait_until(lambda: all(e for _, _, _, e, _ in grants()), 60,
                      what="every grant to wait for the client")
        time.sleep(7)  # probe steps of 2 s and 4 s go by
        wrong.signal(signal.SIGTERM)
        assert wrong.wait(30) == 0, wrong.output()
        during = fake.stats()
        opened = [e for e in wrong.log_events() if e.get("event") == "client_authentication_failed"]
        backed_off = grants()

        # 2. The operator fixes the secret and restarts.
        path.write_text(good)
        fake.reset_stats()
        restarted = datetime.now(UTC)
        t0 = time.monotonic()
        fixed = fl.Daemon(path, "run", log=tmp_path / "fixed.log")
        daemons.append(fixed)

        def all_refreshed() -> bool:
            rows = grants()
            return all(o is not None and o >= restarted for _, _, o, _, _ in rows)

        fl.wait_until(all_refreshed, 15, interval=0.1,
                      what=f"every grant refreshed after the restart:\n{fixed.output()}")
        took = time.monotonic() - t0
        fixed.signal(signal.SIGTERM)
        assert fixed.wait(30) == 0, fixed.output()

        rows = grants()
        assert all((status, error, failures) == ("ok", None, 0)
                   for _, status, _, error, failures in rows), rows
        after = fake.stats()
        assert after["reuse_count"] == 0 and after["token_requests"] == N, after
        s = open_store(config)
        try:
            pairs = []
            for g in s.iter_grants():
                _, refresh = s.tokens(s.get(g.id, with_tokens=True))
                assert g.user_id is not None and refresh is not None
                pairs.append((int(g.user_id), refresh))
        finally:
            s.close()
        assert all(ok and newest for ok, newest in fake.validity(pairs))
        # While the secret was wrong: one request per probe step, not one per grant.
        assert during["reuse_count"] == 0 and during["rotations"] == 0
        assert 1 <= during["token_requests"] <= 6, (during, backed_off)
        assert len(opened) == 1, wrong.output()
        print(f"\nwrong secret: {during['token_requests']} requests for {N} grants in ~10 s; "
              f"after the fix all {N} refreshed {took:.1f} s after the restart")
    finally:
        for d in daemons:
            d.reap()
        fake.reap()
