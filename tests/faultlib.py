"""Helpers of the fault-injection suite (``tests/test_faults.py``, ``tests/test_fuzz.py``).

* :class:`FakeProcess`: the fake Justimmo (:class:`tokend.fake.FakeJustimmo`)
  as a process of its own, driven over its ``/_fake/*`` HTTP control API. Run as
  ``python tests/faultlib.py fake ...`` it is the stock fake plus one read-only control
  endpoint, ``POST /_fake/valid``, that answers for a list of (user id, refresh token)
  pairs whether each token is still accepted and is the newest of its chain, so a test
  can check every stored token without spending it.
* :class:`Daemon`: a ``tokend`` process (``run``, ``run --once``, ...) with its log in a
  file, signalled and reaped by its own pid only.
* PostgreSQL helpers: a direct SQL connection to the test database and stop/start of the
  local cluster (always restarted by the caller's ``finally``).
* :class:`ScriptedServer`: a tiny HTTP server that answers each request with whatever
  the test put in its queue (status, headers, body, or raw bytes / a hang-up).

Every wait here is bounded in time; every process is started by us and ended by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import Engine, create_engine, text

from tokend.testing import CLIENT_ID, CLIENT_SECRET, ManualClock

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
TOKEND = str(Path(PYTHON).with_name("tokend")) if Path(PYTHON).with_name("tokend").exists() \
    else (shutil.which("tokend") or "tokend")


def wait_until(predicate: Callable[[], Any], timeout: float, *, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: no TOKEND_* settings leak in from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TOKEND_") and k != "CREDENTIALS_DIRECTORY"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# --------------------------------------------------------------------------- processes


class Proc:
    """A child process with its output in a file; ended only through its own pid."""

    def __init__(self, argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in reap()
        self.popen = subprocess.Popen(
            self.argv, stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else clean_env(), cwd=cwd)
        self.pid = self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def reap(self, timeout: float = 10.0) -> int:
        """End the process (SIGTERM, then SIGKILL) if it still runs; its exit code."""
        if self.running:
            self.signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.signal(signal.SIGKILL)
                self.popen.wait(10)
        self._fh.close()
        return int(self.popen.returncode)

    def output(self, lines: int = 40) -> str:
        self._fh.flush()
        return tail(self.log, lines)


class FakeProcess(Proc):
    """The fake provider in its own process (see the module docstring)."""

    def __init__(self, workdir: Path, *, latency: float = 0.0, access_ttl: float = 86400.0,
                 league: str = "5", request_times: int = 0) -> None:
        log = workdir / "fake.log"
        super().__init__([PYTHON, str(Path(__file__).resolve()), "fake",
                          "--latency", str(latency), "--access-ttl", str(access_ttl),
                          "--league", league, "--client", f"{CLIENT_ID}:{CLIENT_SECRET}",
                          "--request-times", str(request_times)],
                         log)
        self.session = requests.Session()
        self.session.trust_env = False  # never a proxy: loopback only
        line = wait_until(lambda: self._listening(), 20, what="the fake provider to listen")
        self.base_url = line
        self.token_url = f"{self.base_url}/access_token"

    def _listening(self) -> str | None:
        if not self.running:
            raise AssertionError(f"fake provider exited: {self.output()}")
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("listening on "):
                return line.split()[-1]
        return None

    def _post(self, path: str, payload: Any, timeout: float = 30.0) -> Any:
        r = self.session.post(self.base_url + path, json=payload, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def stats(self, *, times: bool = False) -> dict[str, Any]:
        r = self.session.get(self.base_url + "/_fake/stats", timeout=10)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        if not times:
            data.pop("request_times", None)
        return data

    def issue(self, n: int, *, user_id_start: int = 1) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._post(
            "/_fake/issue", {"client_id": CLIENT_ID, "n": n, "user_id_start": user_id_start})
        return out

    def inject(self, fault: str, *, count: int | None = None, **params: Any) -> None:
        self._post("/_fake/faults", {"fault": fault, "count": count, "params": params})

    def clear_faults(self) -> None:
        self._post("/_fake/clear", {})

    def reset_stats(self) -> None:
        self._post("/_fake/reset_stats", {})

    def set_latency(self, seconds: float) -> None:
        self._post("/_fake/latency", {"seconds": seconds})

    def validity(self, pairs: Sequence[tuple[int, str]]) -> list[tuple[bool, bool]]:
        """For each (user id, refresh token): (accepted now, newest of its chain)."""
        data = self._post("/_fake/valid", {"client_id": CLIENT_ID,
                                           "grants": [list(p) for p in pairs]}, timeout=60)
        return [(bool(a), bool(b)) for a, b in data]

    def wait_idle(self, timeout: float = 10.0, quiet: float = 0.2) -> None:
        """Until no request is being handled and none arrived for ``quiet`` seconds.

        A killed client's requests still complete here (and rotate), including one it
        wrote into the socket just before dying that the fake has not read yet.
        """
        def settled() -> bool:
            first = self.stats()
            if first["in_flight"]:
                return False
            time.sleep(quiet)
            second = self.stats()
            return bool(second["in_flight"] == 0 and second["requests"] == first["requests"])

        wait_until(settled, timeout, what="the fake provider to finish requests in flight")


class Daemon(Proc):
    """A ``tokend`` process."""

    def __init__(self, config: Path, *args: str, log: Path,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__([TOKEND, "--config", str(config), *args], log,
                         env=env if env is not None else clean_env())

    def log_events(self) -> list[dict[str, Any]]:
        self._fh.flush()
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
        return out


def tokend(config: Path, *args: str, timeout: float = 120.0,
           env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one ``tokend`` command to completion."""
    return subprocess.run([TOKEND, "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=dict(env) if env is not None else clean_env(), check=False)


# --------------------------------------------------------------------------- config


# --------------------------------------------------------------------------- PostgreSQL


class Sql:
    """Direct SQL on the test database, for arranging and inspecting the grant table."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, pool_pre_ping=True,
                                            connect_args={"connect_timeout": 5})

    def run(self, sql: str, **params: Any) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(text(sql), params).rowcount)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.begin() as conn:
            return list(conn.execute(text(sql), params).all())

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.begin() as conn:
            return conn.execute(text(sql), params).scalar()

    def mark_all_due(self, where: str = "status = 'ok' AND lease_owner IS NULL") -> int:
        """Make grants due as if a day had passed: the access token has 1 h left."""
        return self.run(
            "UPDATE grants SET access_expires_at = now() + interval '1 hour', "
            "obtained_at = now() - interval '23 hours', "
            f"next_attempt_at = now() - interval '1 second' WHERE {where}")

    def expire_leases(self) -> int:
        """As if the lease of a dead process had run out (the owner is kept: in doubt)."""
        return self.run(
            "UPDATE grants SET lease_expires_at = now() - interval '1 second', "
            "next_attempt_at = now() - interval '1 minute' WHERE lease_owner IS NOT NULL")

    def close(self) -> None:
        self.engine.dispose()


def pg_cluster() -> tuple[str, str] | None:
    """(version, name) of the local cluster on port 5432, if pg_ctlcluster can drive it."""
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        return None
    out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True,
                         timeout=30, check=False).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "5432":
            return parts[0], parts[1]
    return None


def pg_ctl(action: str, cluster: tuple[str, str]) -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster[0], cluster[1],
                    action], check=True, timeout=120, capture_output=True)


def pg_ready(url: str) -> bool:
    engine = create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


def dispose_all_engines() -> int:
    """Drop the pooled connections of every SQLAlchemy engine in this process.

    A PostgreSQL restart kills every open connection, and an engine without
    ``pool_pre_ping`` hands the dead one out again: conftest's session-scoped admin
    engine (``pg_url``) would then fail the session's ``DROP DATABASE`` at teardown.
    Disposing only empties the pools; each engine reconnects on its next use.
    """
    import gc

    engines = [obj for obj in gc.get_objects() if isinstance(obj, Engine)]
    for engine in engines:
        engine.dispose()
    return len(engines)


def pg_online(cluster: tuple[str, str]) -> bool:
    out = subprocess.run(["pg_lsclusters", "--no-header", cluster[0], cluster[1]],
                         capture_output=True, text=True, timeout=30, check=False).stdout
    return "online" in out


# --------------------------------------------------------------------------- logs


# --------------------------------------------------------------------------- time


# The fake's settable clock, shared by the fake, the store and the provider client.
Clock = ManualClock


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# --------------------------------------------------------------------------- scripted HTTP


@dataclass
class Scripted:
    """One answer of :class:`ScriptedServer`: a response, or raw bytes, or a hang-up."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    raw: bytes | None = None  # written as is, then the connection is closed
    hang_up: bool = False  # close without a byte


class ScriptedServer:
    """Answers each request with the next :class:`Scripted` of its queue (then 599)."""

    def __init__(self) -> None:
        self.queue: deque[Scripted] = deque()
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append({"path": self.path, "body": body,
                                       "headers": dict(self.headers)})
                answer = outer.queue.popleft() if outer.queue else Scripted(599)
                if answer.hang_up or answer.raw is not None:
                    self.close_connection = True
                    if answer.raw:
                        with contextlib.suppress(OSError):
                            self.wfile.write(answer.raw)
                            self.wfile.flush()
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response_only(answer.status)
                names = {k.lower() for k, _ in answer.headers}
                for k, v in answer.headers:
                    self.send_header(k, v)
                if "content-length" not in names and "transfer-encoding" not in names:
                    self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(answer.body)

            do_GET = do_POST

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up: normal
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/access_token"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --------------------------------------------------------------------------- the fake, run as a process


def _fake_main(argv: Sequence[str]) -> int:
    import argparse

    from tokend.fake import FakeJustimmo, json_response

    class CheckingFake(FakeJustimmo):
        def _control(self, method: str, path: str, payload: Any) -> Any:
            if method == "POST" and path == "/_fake/valid" and isinstance(payload, dict):
                client_id = str(payload.get("client_id", CLIENT_ID))
                out = []
                for user_id, token in payload.get("grants", []):
                    valid = self.refresh_token_valid(token)
                    head = self.current_refresh_token(user_id, client_id)
                    out.append([valid, head == token])
                return json_response(200, out)
            return super()._control(method, path, payload)

    p = argparse.ArgumentParser(prog="faultlib fake")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--access-ttl", type=float, default=86400.0)
    p.add_argument("--league", default="5")
    p.add_argument("--request-times", type=int, default=0)  # kept for stats(times=True)
    p.add_argument("--client", default=f"{CLIENT_ID}:{CLIENT_SECRET}")
    args = p.parse_args(argv)
    cid, _, secret = args.client.partition(":")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fake = CheckingFake(clients={cid: secret}, latency=args.latency,
                        access_ttl=args.access_ttl, league=args.league,
                        request_times_limit=args.request_times).start()
    print(f"listening on {fake.base_url}", flush=True)
    try:
        # bounded: a fake left behind by a crashed test run ends by itself within an hour
        stop.wait(3600)
    finally:
        fake.stop()
    return 0


def iter_chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fake":
        sys.exit(_fake_main(sys.argv[2:]))
    sys.exit("usage: faultlib.py fake [--latency S] [--access-ttl S] [--league N]")
