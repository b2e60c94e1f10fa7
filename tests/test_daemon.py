"""`tokend run` as a real process: systemd notify, metrics endpoint, SIGTERM, no secrets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from conftest import CLIENT_ID, CLIENT_SECRET
from tokend.config import Config, load_config
from tokend.fake import FakeJustimmo
from tokend.store import open_store
from tokend.testing import free_port, seed_grants, write_config

CONTRACT_METRICS = [
    "tokend_refresh_attempts_total", "tokend_refresh_failures_total",
    "tokend_refresh_duration_seconds", "tokend_grants",
    "tokend_access_token_expiry_earliest_timestamp_seconds",
    "tokend_refresh_token_expiry_earliest_timestamp_seconds", "tokend_due_grants",
    "tokend_pass_duration_seconds", "tokend_pass_last_success_timestamp_seconds",
    "tokend_notifications_total", "tokend_build_info",
]


def seed(config: Config, fake: FakeJustimmo, n: int) -> list[str]:
    """n due grants; returns every secret string involved."""
    issued = fake.issue_many(CLIENT_ID, n, user_id_start=1)
    now = datetime.now(UTC)
    store = open_store(config, auto_upgrade=True)
    try:
        seed_grants(store, issued, config.schedule, now=now,
                    access_left=timedelta(minutes=30), age=timedelta(hours=3))
    finally:
        store.close()
    return [t.access_token for t in issued] + [t.refresh_token or "" for t in issued]


def stored_secrets(config: Config) -> list[str]:
    store = open_store(config)
    try:
        out = []
        for g in store.iter_grants():
            a, r = store.tokens(store.get(g.id, with_tokens=True))
            out += [x for x in (a, r) if x]
        return out
    finally:
        store.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield sock, path
    sock.close()


def read_messages(sock: socket.socket, until: float, want: str) -> list[str]:
    got: list[str] = []
    while time.monotonic() < until:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if any(want in m for m in got):
            break
    return got


def test_run_notifies_serves_metrics_and_stops_cleanly(
        tmp_path: Path, db_url: str, key_file: Path,
        notify_socket: tuple[socket.socket, str]) -> None:
    sock, sock_path = notify_socket
    port = free_port()
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}, latency=0.002) as fake:
        path = write_config(tmp_path / "tokend.toml", db_url=db_url, token_url=fake.token_url, key_file=key_file,
                            client_extra="client_credentials = true")
        text = path.read_text().replace('listen = ""', f'listen = "127.0.0.1:{port}"')
        path.write_text(text)
        config = load_config(path, env={})
        secrets = [*seed(config, fake, 30), CLIENT_SECRET]
        env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}
        env.pop("WATCHDOG_PID", None)
        proc = subprocess.Popen([sys.executable, "-m", "tokend", "--config", str(path), "run"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            messages = read_messages(sock, time.monotonic() + 20, "READY=1")
            assert any("READY=1" in m for m in messages), messages
            messages += read_messages(sock, time.monotonic() + 5, "WATCHDOG=1")
            assert any("WATCHDOG=1" in m for m in messages), messages
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                body = requests.get(f"{base}/metrics", timeout=5).text
                if 'tokend_grants{client="main",status="ok"} 31.0' in body:
                    break
                time.sleep(0.2)
            assert 'tokend_grants{client="main",status="ok"} 31.0' in body
            for name in CONTRACT_METRICS:
                assert f"\n{name}" in body, name
            stats = fake.stats()
            assert stats["reuse_count"] == 0
            attempts = (f'tokend_refresh_attempts_total{{client="main",'
                        f'grant_type="authorization_code"}} {float(stats["by_grant"]["refresh_token"])}')
            assert attempts in body
            assert 'tokend_refresh_attempts_total{client="main",grant_type="client_credentials"} 1.0' \
                in body
            assert 'tokend_due_grants{client="main"} 0.0' in body
            assert 'tokend_client_blocked{client="main"} 0.0' in body
            assert 'tokend_build_info{version="0.1.0"} 1.0' in body
            health = requests.get(f"{base}/healthz", timeout=5)
            ready = requests.get(f"{base}/readyz", timeout=5)
            assert health.status_code == 200 and ready.status_code == 200
            assert json.loads(ready.text)["database"] is True
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            messages += read_messages(sock, time.monotonic() + 2, "STOPPING=1")
        finally:
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
        assert code == 0, err.decode()[-2000:]
        assert any("STOPPING=1" in m for m in messages), messages
        logs = out.decode() + err.decode()
        lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        events = {line["event"] for line in lines}
        assert {"started", "refreshed", "pass_done", "stopping", "stopped"} <= events
        every_secret = secrets + stored_secrets(config)
        for secret in every_secret:
            assert secret not in logs
            assert secret not in body


def test_run_once_exit_codes(tmp_path: Path, db_url: str, key_file: Path) -> None:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}) as fake:
        path = write_config(tmp_path / "tokend.toml", db_url=db_url, token_url=fake.token_url, key_file=key_file)
        config = load_config(path, env={})
        seed(config, fake, 3)
        cmd = [sys.executable, "-m", "tokend", "--config", str(path), "run", "--once"]
        ok = subprocess.run(cmd, capture_output=True, timeout=60)
        assert ok.returncode == 0, ok.stderr.decode()[-2000:]
        seed(config, fake, 1)
        fake.inject("invalid_client")
        failed = subprocess.run(cmd, capture_output=True, timeout=60)
        assert failed.returncode == 1
        assert b"client_authentication_failed" in failed.stdout + failed.stderr


def test_database_down_at_start_is_waited_for(tmp_path: Path, key_file: Path) -> None:
    path = write_config(tmp_path / "tokend.toml", db_url="postgresql+psycopg://postgres@127.0.0.1:1/none",
                        key_file=key_file)
    proc = subprocess.Popen([sys.executable, "-m", "tokend", "--config", str(path), "run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(3)
        assert proc.poll() is None  # still waiting, not dead
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
    assert b"database_unavailable" in out + err


def test_two_processes_on_postgresql_never_refresh_a_grant_twice(
        tmp_path: Path, pg_url: str, key_file: Path) -> None:
    from tokend.testing import reset_pg

    reset_pg(pg_url)
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}, latency=0.01) as fake:
        path = write_config(tmp_path / "tokend.toml", db_url=pg_url, token_url=fake.token_url, key_file=key_file,
                            schedule_extra="concurrency = 4")
        config = load_config(path, env={})
        seed(config, fake, 400)
        cmd = [sys.executable, "-m", "tokend", "--config", str(path), "run", "--once"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        refreshed = []
        for out, err in outputs:
            done = [json.loads(line) for line in (out + err).decode().splitlines()
                    if line.startswith("{") and '"pass_done"' in line]
            refreshed.append(done[-1]["refreshed"])
        stats = fake.stats()
        assert sum(refreshed) == 400 and min(refreshed) > 0  # both did part of the work
        assert stats["rotations"] == 400 and stats["reuse_count"] == 0
    reset_pg(pg_url)
