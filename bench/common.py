"""Shared helpers for the benchmarks in ``bench/``.

* :class:`Fake` runs the fake Justimmo (``python -m tokend.fake``) in its OWN
  process on a local port, so its CPU never counts as tokend's, and drives it through its
  HTTP control endpoints (``/_fake/stats``, ``/_fake/issue``, ...).
* :func:`database` gives a fresh database per benchmark: a SQLite file in a temp dir, or
  a ``bench_*`` database on the local PostgreSQL, dropped afterwards.
* :func:`write_config` writes a tokend TOML config for it; :func:`open_bench_store`
  opens tokend's real store on it (schema through tokend's own migrations).
* :func:`seed_due` stores grants holding LIVE refresh tokens issued by the fake;
  :func:`bulk_fill` adds not-due filler rows with SQL only (fast enough for 10^6 rows).

Everything talks to 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))  # works from a plain checkout too

from tokend import testing  # noqa: E402
from tokend.config import Config, load_config  # noqa: E402
from tokend.model import Status  # noqa: E402
from tokend.store import Store, open_store  # noqa: E402
from tokend.testing import CLIENT_ID, CLIENT_SECRET, make_key_file  # noqa: E402

PY = sys.executable
TOKEND = str(Path(sys.executable).with_name("tokend"))
PG_ADMIN_URL = os.environ.get("TOKEND_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")
TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # tokend's SQLite timestamp text (tokend.schema)


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_args(doc: str | None, extra: Callable[[argparse.ArgumentParser], None] | None = None,
               ) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller smoke run")
    p.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    if extra is not None:
        extra(p)
    return p.parse_args()


def backends(args: argparse.Namespace) -> list[str]:
    wanted = list(BACKENDS) if args.backend == "both" else [args.backend]
    if "postgresql" in wanted and not pg_available():
        print("postgresql: unreachable, skipped", flush=True)
        wanted.remove("postgresql")
    return wanted


def banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    pg = "unreachable"
    if pg_available():
        from sqlalchemy import create_engine

        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            pg = str(conn.execute(text("SHOW server_version")).scalar())
        engine.dispose()
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "postgresql": pg}


def ratio_line(name: str, value: float, op: str, target: float) -> str:
    ok = value <= target if op == "<=" else value >= target if op == ">=" else (
        value < target if op == "<" else value > target)
    return f"RATIO {name} = {value:.3f} (target {op} {target}) {'PASS' if ok else 'MISS'}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------- the fake provider


class Fake:
    """The fake provider in a separate process; controlled over HTTP."""

    def __init__(self, *, latency: float = 0.0, access_ttl: float = 86400.0) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "tokend.fake", "--port", "0", "--latency", str(latency),
             "--access-ttl", str(access_ttl), "--client", f"{CLIENT_ID}:{CLIENT_SECRET}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "daemon")},
        )
        assert self.proc.stdout is not None
        line = _readline_within(self.proc.stdout, 30.0)
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"fake provider did not start: {line!r}")
        self.base_url = line.split()[-1]
        self.token_url = f"{self.base_url}/access_token"
        self.http = requests.Session()

    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        r = self.http.post(f"{self.base_url}/_fake/{path}", json=payload, timeout=120)
        r.raise_for_status()
        return r.json()

    def stats(self) -> dict[str, Any]:
        r = self.http.get(f"{self.base_url}/_fake/stats", timeout=30)
        r.raise_for_status()
        return dict(r.json())

    def reset_stats(self) -> None:
        self._post("reset_stats", {})

    def set_latency(self, seconds: float) -> None:
        self._post("latency", {"seconds": seconds})

    def issue(self, n: int, *, user_id_start: int = 1) -> list[dict[str, Any]]:
        """``n`` live grants (users user_id_start...), issued in chunks."""
        out: list[dict[str, Any]] = []
        for start in range(0, n, 5000):
            k = min(5000, n - start)
            out += self._post("issue", {"client_id": CLIENT_ID, "n": k,
                                        "user_id_start": user_id_start + start})
        return out

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Fake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline_within(stream: Any, timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return box[0].strip() if box else ""


def max_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most request starts inside any half-open window of ``window`` seconds."""
    ts = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(ts):
        while ts[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


# ---------------------------------------------------------------------- processes


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class ChildResult:
    returncode: int
    wall: float
    cpu: float  # user + sys of the child
    maxrss_mb: float
    log: Path


# Runs the command and writes its rusage. Why a launcher: Linux carries a process's peak
# RSS across exec(), so a child forked from this (large) benchmark process would report
# at least OUR resident size as its ru_maxrss. The launcher is small; what its child
# reports (RUSAGE_CHILDREN) is the command's own peak.
_LAUNCHER = """
import json, resource, subprocess, sys, time
t0 = time.monotonic()
code = subprocess.call(sys.argv[2:])
wall = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime,
               "maxrss_kb": ru.ru_maxrss}, f)
"""


def run_child(cmd: Sequence[str], *, log: Path, timeout: float,
              env: dict[str, str] | None = None) -> ChildResult:
    """Run a command to completion: its exit code, wall time, CPU and peak RSS."""
    report = log.with_suffix(".rusage.json")
    with open(log, "w") as out:
        proc = subprocess.Popen([PY, "-c", _LAUNCHER, str(report), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{cmd[0]} did not finish within {timeout}s (log: {log})") \
                from None
    r = json.loads(report.read_text())
    return ChildResult(r["code"], r["wall"], r["cpu"], r["maxrss_kb"] / 1024, log)


def tokend_cmd(config: Path, *args: str) -> list[str]:
    return [TOKEND, "--config", str(config), *args]


# ---------------------------------------------------------------------- databases


def pg_available(wait: float = 30.0) -> bool:
    """Reachable now or within ``wait`` seconds (other suites restart the server)."""
    deadline = time.monotonic() + wait
    while testing.pg_problem(PG_ADMIN_URL) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


@contextlib.contextmanager
def database(backend: str, name: str, workdir: Path) -> Iterator[str]:
    """A fresh, empty database URL; removed afterwards."""
    if backend == "sqlite":
        path = workdir / f"{name}.db"
        yield f"sqlite:///{path}"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{path}{suffix}").unlink()
        return
    db = f"bench_{name}_{os.getpid()}"

    def warn(exc: Exception) -> None:
        print(f"warning: could not drop database {db}: {exc}", file=sys.stderr)

    pg_available(wait=120.0)
    with testing.pg_database(PG_ADMIN_URL, db, on_drop_error=warn) as url:
        yield url


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"tokend-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_config(directory: Path, db_url: str, *, name: str = "tokend.toml", **kw: Any) -> Path:
    """:func:`tokend.testing.write_config` as the benchmarks use it: the key beside the
    config (made once), a 10 s provider timeout unless told otherwise."""
    kw.setdefault("timeout", "10s")
    return testing.write_config(directory / name, db_url=db_url,
                                key_file=make_key_file(directory / "tokend-key"), **kw)


def load(config_path: Path) -> Config:
    return load_config(config_path, env={})


def open_bench_store(config: Config, **kw: Any) -> Store:
    kw.setdefault("auto_upgrade", True)
    return open_store(config, **kw)


def seed_due(store: Store, fake: Fake, n: int, *, user_id_start: int = 1) -> list[int]:
    """``n`` grants holding live refresh tokens from the fake, all due now."""
    if n <= 0:
        return []
    now = utcnow()
    due_at = now - timedelta(seconds=1)
    return testing.seed_grants(store, fake.issue(n, user_id_start=user_id_start),
                               lambda _g: (Status.OK, None, due_at), now=now)


def dummy_tokens(store: Store) -> tuple[str, str]:
    """Encrypted tokens of realistic size (league's ~750-char refresh tokens)."""
    return (store.cipher.encrypt("fjat_" + "a" * 40),
            store.cipher.encrypt("def50200" + "b" * 744))


def bulk_fill(store: Store, n: int, *, user_id_start: int, due: int = 0,
              chunk: int = 100_000) -> float:
    """Add ``n`` rows with SQL only; ``due`` of them, spread evenly through the table as
    in real life, are due now (dummy tokens: a refresh of them would fail), the rest come
    due over the next 20 days. Returns the seconds it took."""
    t0 = time.monotonic()
    access, refresh = dummy_tokens(store)
    now = utcnow()
    pg = store.dialect == "postgresql"
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        params = {"k": k, "off": start, "uid": user_id_start + start,
                  "stride": n // due if due else n + 1, "acc": access, "ref": refresh}
        if pg:
            params["now"] = now
            sql = """
                INSERT INTO grants (client, grant_type, user_id, tenant_id, access_token,
                    access_expires_at, refresh_token, refresh_expires_at, obtained_at,
                    consented_at, status, failure_count, next_attempt_at, in_doubt,
                    token_version, created_at, updated_at)
                SELECT 'main', 'authorization_code', (:uid + x - 1)::text, '5678', :acc,
                    t + interval '6 hours', :ref, :now + interval '25 days', :now, :now,
                    'ok', 0, t, false, 0, :now, :now
                FROM generate_series(1, :k) AS x,
                LATERAL (SELECT CASE WHEN (:off + x) % :stride = 0
                    THEN :now - make_interval(secs => (:off + x) % 600 + 1)
                    ELSE :now + make_interval(secs => 3600 + ((:off + x)::bigint * 7919) % 1728000)
                    END AS t) AS d
            """
        else:
            params["now"] = now.strftime("%Y-%m-%d %H:%M:%S")
            sql = """
                WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :k),
                d(x, t) AS (SELECT x, CASE WHEN (:off + x) % :stride = 0
                    THEN datetime(:now, '-' || ((:off + x) % 600 + 1) || ' seconds')
                    ELSE datetime(:now, '+' || (3600 + ((:off + x) * 7919) % 1728000)
                                  || ' seconds') END FROM c)
                INSERT INTO grants (client, grant_type, user_id, tenant_id, access_token,
                    access_expires_at, refresh_token, refresh_expires_at, obtained_at,
                    consented_at, status, failure_count, next_attempt_at, in_doubt,
                    token_version, created_at, updated_at)
                SELECT 'main', 'authorization_code', CAST(:uid + x - 1 AS TEXT), '5678', :acc,
                    strftime('%Y-%m-%dT%H:%M:%S.000000Z', t, '+6 hours'), :ref,
                    strftime('%Y-%m-%dT%H:%M:%S.000000Z', :now, '+25 days'),
                    strftime('%Y-%m-%dT%H:%M:%S.000000Z', :now),
                    strftime('%Y-%m-%dT%H:%M:%S.000000Z', :now),
                    'ok', 0, strftime('%Y-%m-%dT%H:%M:%S.000000Z', t), 0, 0,
                    strftime('%Y-%m-%dT%H:%M:%S.000000Z', :now),
                    strftime('%Y-%m-%dT%H:%M:%S.000000Z', :now)
                FROM d
            """
        with store.engine.begin() as conn:
            conn.execute(text(sql), params)
    if pg:
        with store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE grants"))
    return time.monotonic() - t0


def count_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM grants")).scalar_one())
