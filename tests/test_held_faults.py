"""Held outcomes with real processes and a real PostgreSQL (issue 9, items 4 and 5).

(a) The database becomes unreachable in the middle of a pass (a TCP proxy in front of
    PostgreSQL is cut; the cluster itself is never touched), tokend gets SIGTERM and,
    should it still run 10 s later, SIGKILL; the database comes back and tokend is
    started again.
(b) The database turns read-only under the running daemon (a failover to a standby:
    ``default_transaction_read_only`` and its sessions ended, so the pool reconnects
    into it), then writable again.

After each: every rotated refresh token is in the database, every grant ``ok`` with the
provider's current token, no refresh token used twice.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text

import faultlib as fl
from conftest import PG_URL
from tokend.config import load_config
from tokend.store import open_store
from tokend.testing import free_port, make_key_file, reset_pg, seed_grants, write_config

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

N = 240
LATENCY = 0.1  # 8 workers: about 80 refreshes a second, a pass of about 3 s


class Proxy:
    """A TCP forwarder to PostgreSQL that can be cut (connections refused, open ones
    reset) and restored on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    continue
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for s in conns:  # reset, as a server that died would (shutdown wakes the pumps)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)


class Setup:
    """The fake provider as a process, a config for tokend, and direct SQL for the test."""

    def __init__(self, workdir: Path, pg: str, daemon_url: str) -> None:
        self.workdir = workdir
        self.pg = pg
        key = make_key_file(workdir / "tokend-key")
        self.fake = fl.FakeProcess(workdir, latency=LATENCY)
        self.config_path = write_config(
            workdir / "tokend.toml", db_url=daemon_url, token_url=self.fake.token_url,
            key_file=key, concurrency=8, interval="2s")
        self.config = load_config(self.config_path, env={"TOKEND_DATABASE__URL": pg})
        self.store = open_store(self.config, auto_upgrade=True)
        self.sql = fl.Sql(pg)
        self.spool = self.config.state_dir() / "spool"
        self.daemons: list[fl.Daemon] = []

    def seed(self, n: int) -> None:
        seed_grants(self.store, self.fake.issue(n), self.config.schedule,
                    age=timedelta(hours=23))

    def daemon(self, name: str) -> fl.Daemon:
        d = fl.Daemon(self.config_path, "run", log=self.workdir / f"{name}.log")
        self.daemons.append(d)
        return d

    def spooled(self) -> list[str]:
        return sorted(p.name for p in self.spool.glob("*.json")) if self.spool.exists() else []

    def wait_for_requests(self, at_least: int, d: fl.Daemon) -> None:
        fl.wait_until(lambda: (d.running or _died(d))
                      and self.fake.stats()["token_requests"] >= at_least, 60, interval=0.01,
                      what=f"{at_least} refreshes")

    def check(self) -> None:
        """Every grant ok, holding the provider's current token; nothing used twice."""
        rows = self.sql.rows("SELECT id, user_id, status, reason, refresh_token "
                             "FROM grants ORDER BY id")
        assert len(rows) == N
        pairs = [(int(r[1]), self.store.cipher.decrypt(r[4], grant_id=r[0])) for r in rows]
        validity = self.fake.validity(pairs)
        lost = [r[0] for r, v in zip(rows, validity, strict=True) if not all(v)]
        assert not lost, f"{len(lost)} grants lost their rotated token: {lost[:10]}"
        bad = [(r[0], r[2], r[3]) for r in rows if (r[2], r[3]) != ("ok", None)]
        assert not bad, bad[:5]
        stats = self.fake.stats()
        assert stats["reuse_count"] == 0, stats
        assert stats["errors_by_code"] == {}, stats["errors_by_code"]

    def close(self) -> None:
        for d in self.daemons:
            d.reap()
        self.fake.reap()
        self.store.close()
        self.sql.close()


def _died(d: fl.Daemon) -> Any:
    raise AssertionError(f"tokend exited ({d.popen.returncode}):\n{d.output()}")


def _events(d: fl.Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in d.log_events() if e.get("event") == name]


@pytest.fixture
def pg(pg_url: str) -> Iterator[str]:
    reset_pg(pg_url)
    yield pg_url
    reset_pg(pg_url)


def test_sigterm_and_sigkill_during_a_database_outage_lose_no_rotated_token(
        tmp_path: Path, pg: str) -> None:
    url = make_url(pg)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False)
    s = Setup(tmp_path, pg, through_proxy)
    try:
        s.seed(N)
        first = s.daemon("first")
        s.wait_for_requests(N // 3, first)
        proxy.cut()  # the database is gone, refreshes are in flight
        fl.wait_until(lambda: _events(first, "save_failed_retrying"), 20, interval=0.1,
                      what="a rotated token held")
        time.sleep(1.0)
        first.signal(signal.SIGTERM)
        code = first.wait(10)
        if code is None:  # systemd's TimeoutStopSec: SIGKILL
            first.signal(signal.SIGKILL)
            first.wait(10)
        s.fake.wait_idle(20)
        spooled = s.spooled()
        proxy.restore()

        second = s.daemon("second")
        fl.wait_until(lambda: _events(second, "pass_done") or (not second.running and _died(second)), 60,
                      interval=0.2, what="the first pass after the restart")
        s.fake.wait_idle(20)
        second.signal(signal.SIGTERM)
        assert second.wait(20) == 0, second.output()
        s.check()
        assert s.spooled() == []
        # dropped: its save had committed when the connection broke (the answer was lost)
        replayed = _events(second, "held_outcome_saved") + _events(second, "held_outcome_dropped")
        assert len(replayed) == len(spooled) > 0, (replayed, spooled)
        assert code == 0, f"SIGTERM with everything spooled must exit 0:\n{first.output()}"
        assert _events(first, "held_outcomes_spooled"), first.output()
    finally:
        proxy.cut()
        s.close()


def test_a_read_only_database_loses_no_rotated_token(tmp_path: Path, pg: str) -> None:
    name = make_url(pg).database
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")

    def sessions_end() -> None:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": name})

    def read_only(on: bool) -> None:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = '
                              + ("on" if on else "off")))

    s = Setup(tmp_path, pg, pg)
    try:
        s.seed(N)
        started = datetime.now(UTC)
        d = s.daemon("read-only")
        s.wait_for_requests(N // 3, d)
        read_only(True)
        sessions_end()  # the pool reconnects, into read-only sessions
        fl.wait_until(lambda: _events(d, "save_failed_retrying")
                      or _events(d, "grant_attempt_crashed"), 20, interval=0.1,
                      what="a save refused after a rotation")
        time.sleep(10)  # longer than the workers' own retries: the background replay
        assert d.running, d.output()
        read_only(False)  # the pool's read-only sessions must be dropped by tokend itself
        fl.wait_until(lambda: s.sql.scalar(
            "SELECT count(*) FROM grants WHERE lease_owner IS NULL AND obtained_at >= :t",
            t=started) == N, 120, interval=0.5, what="every grant refreshed and saved")
        fl.wait_until(lambda: s.spooled() == [], 30, what="the spool emptied")
        d.signal(signal.SIGTERM)
        assert d.wait(20) == 0, d.output()
        s.check()
        assert s.fake.stats()["rotations"] == N
        assert _events(d, "save_handed_over") and _events(d, "held_outcome_saved")
    finally:
        with contextlib.suppress(Exception):
            read_only(False)
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" RESET default_transaction_read_only'))
        admin.dispose()
        s.close()
