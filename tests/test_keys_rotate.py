"""`tokend keys rotate` while the daemon runs: a refresh saved meanwhile always wins.

The rotation reads a batch of ciphertexts, then writes them back re-encrypted. A refresh
saved between the two (PostgreSQL: nothing serialises them) used to be overwritten with
the re-encrypted OLD tokens: the stored refresh token was then a spent one, and the next
refresh presented it again (reuse: league revokes the grant).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, make_url

import faultlib as fl
from tokend.config import Config, Secret, load_config
from tokend.crypto import Cipher, generate_key
from tokend.model import NewGrant, Outcome, Status
from tokend.policy import initial
from tokend.store import Store, open_store
from tokend.testing import reset_pg, write_config

NOW = datetime.now(UTC)


def new(i: int) -> NewGrant:
    return NewGrant(client="main", grant_type="authorization_code",
                    access_token=f"access-{i}", access_expires_at=NOW + timedelta(hours=1),
                    obtained_at=NOW - timedelta(hours=1), refresh_token=f"refresh-{i}",
                    refresh_expires_at=NOW + timedelta(days=30), user_id=str(i))


# --------------------------------------------------------------------------- the store


@pytest.fixture
def store(make_config: Callable[..., Config], store_for: Callable[..., Store]) -> Store:
    return store_for(make_config())



def test_a_consent_under_way_survives_the_old_key_being_dropped(store: Store) -> None:
    """keys rotate also re-encrypts the PKCE verifier of a consent started before it, so
    the person can finish after the old key is gone from the key file."""
    from tokend.consent import Link
    from tokend.consent_store import ConsentStore
    from tokend.pkce import new_pair

    verifier = new_pair().verifier
    ConsentStore(store).begin("state-1", Link(1, NOW + timedelta(hours=1), "m"),
                              "https://app.example/cb", timedelta(minutes=30), verifier)
    new_key = Secret(generate_key())
    Store(store.engine, Cipher((new_key, *store.cipher.keys))).reencrypt()
    only_new = Store(store.engine, Cipher((new_key,)))
    pending = ConsentStore(only_new).take("state-1")
    assert pending is not None and pending.code_verifier == verifier

@pytest.mark.parametrize("daemon_key", ["new", "old"])
def test_a_refresh_saved_between_read_and_write_wins(store: Store, daemon_key: str) -> None:
    """``old``: a daemon not yet restarted saves under the old key; the rotation reads the
    changed row again and re-encrypts the NEW tokens."""
    ids = store.insert_grants([new(i) for i in range(5)], lambda g: (
        Status.OK, None, NOW - timedelta(seconds=1)))
    claimed = {g.id: g for g in store.claim_due("daemon", 5, timedelta(minutes=5))}
    cipher = Cipher((Secret(generate_key()), *store.cipher.keys))  # new key first
    daemon = Store(store.engine, cipher if daemon_key == "new" else store.cipher)
    rotator = Store(store.engine, cipher)
    target = claimed[ids[2]]
    outcome = Outcome(status=Status.OK, reason=None, next_attempt_at=NOW + timedelta(hours=3),
                      failure_count=0, last_error=None, in_doubt=False,
                      access_token="access-rotated", refresh_token="refresh-rotated",
                      access_expires_at=NOW + timedelta(days=1),
                      refresh_expires_at=NOW + timedelta(days=31), obtained_at=NOW)
    saved: list[bool] = []
    saver: threading.Thread | None = None

    def after_read(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # The daemon saves its refresh right after the rotation has read the batch.
        nonlocal saver
        if saver is None and statement.lstrip().upper().startswith("SELECT") \
                and "refresh_token" in statement:
            saver = threading.Thread(
                target=lambda: saved.append(daemon.save(target, outcome, "daemon")))
            saver.start()
            # SQLite serialises writers: a save that cannot start now runs after.
            saver.join(3)

    event.listen(store.engine, "after_cursor_execute", after_read)
    try:
        done = rotator.reencrypt()
    finally:
        event.remove(store.engine, "after_cursor_execute", after_read)
    assert saver is not None
    saver.join(60)
    assert saved == [True]
    # new: the saved row needed nothing more; old: it was rotated on the second round
    assert done == len(ids) - (daemon_key == "new")
    only_new = Store(store.engine, Cipher((cipher.keys[0],)))
    for gid in ids:
        tokens = only_new.tokens(only_new.get(gid, with_tokens=True))
        if gid == target.id:
            assert tokens == ("access-rotated", "refresh-rotated")  # the save won
        else:
            assert tokens == (f"access-{ids.index(gid)}", f"refresh-{ids.index(gid)}")
    assert rotator.reencrypt() == 0


# --------------------------------------------------------------------------- real processes


class SlowProxy:
    """A TCP relay to PostgreSQL that, once its client has read tokens, delays each
    further message of that client by ``delay``.

    It widens the time between the rotation's read of a batch and its write of each
    row from microseconds to a second or two, so the daemon's saves land in it on
    every run (without it the race needs luck). Matched on the first read only: later
    executions may be prepared statements, whose messages carry no SQL text.
    """

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=10)
            server.settimeout(None)
            self.socks += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, self.delay),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, 0.0),
                             daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            armed = False
            while data := src.recv(65536):
                if armed:
                    time.sleep(delay)
                armed = armed or bool(delay and b"SELECT" in data and b"refresh_token" in data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def pg(pg_url: str) -> Iterator[str]:
    reset_pg(pg_url)
    yield pg_url
    reset_pg(pg_url)


def _wait_requests(fake: fl.FakeProcess, at_least: int, timeout: float, d: fl.Daemon) -> None:
    def enough() -> bool:
        if not d.running:
            raise AssertionError(f"tokend exited:\n{d.output()}")
        return int(fake.stats()["token_requests"]) >= at_least

    fl.wait_until(enough, timeout, interval=0.1, what=f"{at_least} token requests")


@pytest.mark.faults
@pytest.mark.postgres
def test_readme_key_rotation_while_the_daemon_refreshes(tmp_path: Path, pg: str) -> None:
    """The README's procedure, step by step, with 100 grants whose access tokens live 12 s
    (each refreshed every ~6 s): new key first in the key file, restart, `keys rotate`
    while the daemon runs, drop the old key. Then every grant is ok with the provider's
    current refresh token, nothing was presented twice, and the new key alone reads all.
    """
    n, ttl = 100, 12.0
    key = tmp_path / "tokend-key"
    old_key = generate_key()
    key.write_text(old_key + "\n")
    key.chmod(0o600)
    fake = fl.FakeProcess(tmp_path, latency=0.02, access_ttl=ttl)
    config_path = write_config(tmp_path / "tokend.toml", db_url=pg,
                                  token_url=fake.token_url, key_file=key, interval="1s")
    url = make_url(pg)
    proxy = SlowProxy((url.host or "127.0.0.1", url.port or 5432), delay=0.02)
    admin_dir = tmp_path / "admin"
    admin_dir.mkdir()
    admin_config = write_config(
        admin_dir / "tokend.toml",
        db_url=url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
        token_url=fake.token_url, key_file=key)
    daemons: list[fl.Daemon] = []
    store: Store | None = None
    try:
        assert fl.tokend(config_path, "db", "upgrade").returncode == 0
        config: Config = load_config(config_path, env={})
        store = open_store(config)
        now = datetime.now(UTC)
        # Obtained over the last half-life: refreshes come evenly, ~17 a second.
        obtained = [now - timedelta(seconds=ttl / 2 * i / n) for i in range(n)]
        store.insert_grants([NewGrant(
            client="main", grant_type="authorization_code", access_token=t["access_token"],
            access_expires_at=at + timedelta(seconds=ttl), obtained_at=at,
            refresh_token=t["refresh_token"],
            refresh_expires_at=datetime.fromisoformat(t["refresh_expires_at"]),
            user_id=str(t["user_id"]), tenant_id=str(t["tenant_id"]))
            for t, at in zip(fake.issue(n), obtained, strict=True)],
            lambda g: initial(g, now, config.schedule))
        store.close()
        store = None

        d1 = fl.Daemon(config_path, "run", log=tmp_path / "before.log")
        daemons.append(d1)
        _wait_requests(fake, n, 60, d1)  # every grant refreshed under the old key

        # 1. `tokend keys generate`, the new key on the first line, the old one below
        generated = fl.tokend(config_path, "keys", "generate")
        assert generated.returncode == 0, generated.stderr
        new_key = generated.stdout.strip()
        key.write_text(f"{new_key}\n{old_key}\n")
        # 2. restart tokend
        d1.signal(signal.SIGTERM)
        assert d1.wait(30) == 0, d1.output()
        d2 = fl.Daemon(config_path, "run", log=tmp_path / "after.log")
        daemons.append(d2)
        fl.wait_until(lambda: any(e.get("event") == "started" for e in d2.log_events()),
                      30, what="the restarted daemon")
        # 3. `tokend keys rotate` while it runs
        started, before = time.monotonic(), int(fake.stats()["token_requests"])
        rotated = fl.tokend(admin_config, "keys", "rotate")
        took, during = time.monotonic() - started, int(fake.stats()["token_requests"]) - before
        assert rotated.returncode == 0, rotated.stderr
        assert "re-encrypted the tokens of" in rotated.stdout
        # 4. remove the old key
        key.write_text(new_key + "\n")

        # Two more refresh rounds: a spent token left behind would be presented now.
        seen = int(fake.stats()["token_requests"])
        _wait_requests(fake, seen + 2 * n, 40, d2)
        d2.signal(signal.SIGTERM)
        assert d2.wait(30) == 0, d2.output()
        stats = fake.stats()
        assert stats["reuse_count"] == 0, stats
        assert stats["errors_by_code"] == {}, stats
        errors = [e for d in daemons for e in d.log_events()
                  if e.get("level") in ("error", "critical")]
        assert not errors, errors[:3]
        only_new = Store(fl.Sql(pg).engine, Cipher((Secret(new_key),)))
        try:
            grants = [only_new.get(g.id, with_tokens=True) for g in only_new.iter_grants()]
            assert len(grants) == n
            pairs = []
            for g in grants:
                assert (g.status, g.lease_owner, g.in_doubt, g.failure_count) == \
                    (Status.OK, None, False, 0), g
                access, refresh = only_new.tokens(g)  # the new key alone reads every token
                assert access and refresh
                pairs.append((int(g.user_id or 0), refresh))
            validity = fake.validity(pairs)
            broken = [g.id for g, v in zip(grants, validity, strict=True) if v != (True, True)]
            assert not broken, f"grants holding a spent refresh token: {broken}"
        finally:
            only_new.close()
        print(f"\nkeys rotate with the daemon running: {rotated.stdout.strip()} in "
              f"{took:.1f}s, {during} refreshes meanwhile")
    finally:
        for d in daemons:
            d.reap()
        fake.reap()
        proxy.close()
        if store is not None:
            store.close()
