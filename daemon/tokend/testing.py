"""Helpers for tokend's tests, benchmarks and demo: what each of them needs to stand up a
provider, a database and a daemon configuration, written once.

Public and small on purpose (like ``structlog.testing``); nothing here runs in the daemon.

- :class:`ManualClock`: a settable UTC clock for the fake, the store and the provider client.
- :func:`free_port`: a TCP port nobody listens on right now.
- :func:`write_config`: a tokend config file; every knob the callers turn is a parameter;
  :func:`make_key_file` a key for it.
- :func:`seed_grants`: grants in the store for tokens the fake provider issued.
- :func:`quiet_logs`: tokend's logs into a buffer (or ``/dev/null``), restored afterwards.
- :class:`RecordingFake`: the in-process fake provider, logging each token request.
- :func:`pg_problem`, :func:`pg_database`, :func:`reset_pg`: PostgreSQL reachability, a
  database of one's own, and emptying one.
"""

from __future__ import annotations

import contextlib
import io
import socket
import textwrap
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple, TextIO

from sqlalchemy import create_engine, make_url, text

from tokend.config import ScheduleConfig
from tokend.crypto import generate_key
from tokend.fake import FakeJustimmo, IssuedTokens
from tokend.model import Grant, NewGrant, Status
from tokend.policy import initial
from tokend.store import Decide, Store

CLIENT_ID, CLIENT_SECRET = "demo-client", "demo-secret"


class ManualClock:
    """A settable UTC clock for ``FakeJustimmo(clock=...)``, ``Store(clock=...)`` and
    ``ProviderClient(clock=...)``; thread-safe; ``calls`` counts its readings."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2024, 1, 31, 12, 0, tzinfo=UTC)
        self._lock = threading.Lock()
        self.calls = 0

    def __call__(self) -> datetime:
        with self._lock:
            self.calls += 1
            return self._now

    def advance(self, delta: timedelta | float) -> datetime:
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        with self._lock:
            self._now += step
            return self._now

    def set(self, moment: datetime) -> None:
        with self._lock:
            self._now = moment


class TokenRequest(NamedTuple):
    at: datetime  # the fake's clock
    grant_type: str
    user_id: int | None  # of the refresh token sent, if the fake knows it
    status: int | None  # the HTTP status answered; None: no answer (a fault)


class RecordingFake(FakeJustimmo):
    """The in-process fake, logging a :class:`TokenRequest` per token request in ``log``."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.log: list[TokenRequest] = []

    def _token_request(self, form: Any, authorization: str | None, *,
                       arrived: float | None = None) -> Any:
        with self._lock:
            rec = self._refresh.get(form.get("refresh_token", ""))
            user = rec.user_id if rec is not None else None
        outcome = super()._token_request(form, authorization, arrived=arrived)
        status = outcome.response.status if outcome.response is not None else None
        with self._lock:
            self.log.append(TokenRequest(self._now(), form.get("grant_type", ""), user, status))
        return outcome


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (someone may take it meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- config


def write_config(
    path: Path,
    *,
    db_url: str,
    key_file: Path | str,
    token_url: str = "http://127.0.0.1:9/access_token",  # noqa: S107 - a URL, no secret
    client: str = "main",
    client_id: str = CLIENT_ID,
    client_secret: str | None = CLIENT_SECRET,
    client_secret_file: str | None = None,
    redirect_uri: str = "http://127.0.0.1:8765/callback",
    rate_limit: float = 0,
    timeout: str = "5s",
    interval: str = "60s",
    retry_max: str | None = None,
    concurrency: int | None = None,
    listen: str = "",
    log_format: Literal["json", "console", "auto"] = "json",
    level: str = "info",
    state_dir: Path | str | None = "state",
    provider_extra: str = "",
    client_extra: str = "",
    schedule_extra: str = "",
    extra: str = "",
    header: str = "",
) -> Path:
    """Write a tokend config to ``path`` and return it.

    The authorize and user URLs sit beside ``token_url`` (as on the fake). A relative
    ``state_dir`` is taken from ``path``'s folder; ``None`` leaves ``[state]`` out (the
    SQLite file's folder then). ``*_extra`` are lines added to that section; ``extra`` is
    appended (more sections). Keys left at ``None`` are not written: tokend's default holds.
    """
    base = token_url.rsplit("/", 1)[0]
    secret = (f'client_secret_file = "{client_secret_file}"' if client_secret_file is not None
              else f'client_secret = "{client_secret}"' if client_secret is not None else "")
    schedule = [f'interval = "{interval}"']
    if retry_max is not None:
        schedule.append(f'retry_max = "{retry_max}"')
    if concurrency is not None:
        schedule.append(f"concurrency = {concurrency}")
    state = ""
    if state_dir is not None:
        state = f'[state]\ndir = "{path.parent / state_dir}"\n\n'

    def lines(*items: str) -> str:
        return "\n".join(textwrap.dedent(i).strip() for i in items if i.strip())

    path.write_text(
        header
        + f'[database]\nurl = "{db_url}"\n\n'
        + "[provider]\n"
        + lines(f'authorize_url = "{base}/authorize"', f'token_url = "{token_url}"',
                f'user_url = "{base}/oauth/user/current"', f"rate_limit = {rate_limit}",
                f'timeout = "{timeout}"', provider_extra)
        + f"\n\n[clients.{client}]\n"
        + lines(f'client_id = "{client_id}"', secret, f'redirect_uri = "{redirect_uri}"',
                client_extra)
        + "\n\n[schedule]\n"
        + lines(*schedule, schedule_extra)
        + f'\n\n[metrics]\nlisten = "{listen}"\n\n'
        + f'[logging]\nformat = "{log_format}"\nlevel = "{level}"\n\n'
        + state
        + f'[encryption]\nkey_file = "{key_file}"\n'
        + extra
    )
    return path


def make_key_file(path: Path) -> Path:
    """A Fernet key file at ``path`` (0600), made unless it is there already."""
    if not path.exists():
        path.write_text(generate_key() + "\n")
        path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- grants


def issued_tokens(issued: IssuedTokens | Mapping[str, Any]) -> IssuedTokens:
    """Tokens from the fake in-process, or as its ``/_fake/issue`` answered (JSON)."""
    if isinstance(issued, IssuedTokens):
        return issued
    refresh_exp = issued.get("refresh_expires_at")
    return IssuedTokens(
        access_token=str(issued["access_token"]),
        refresh_token=issued.get("refresh_token"),
        expires_in=int(issued["expires_in"]),
        obtained_at=datetime.fromisoformat(issued["obtained_at"]),
        access_expires_at=datetime.fromisoformat(issued["access_expires_at"]),
        refresh_expires_at=datetime.fromisoformat(refresh_exp) if refresh_exp else None,
        user_id=issued.get("user_id"),
        tenant_id=issued.get("tenant_id"),
        client_id=str(issued.get("client_id", "")),
    )


def seed_grants(
    store: Store,
    issued: Iterable[IssuedTokens | Mapping[str, Any]],
    decide: Decide | ScheduleConfig,
    *,
    now: datetime | None = None,
    access_left: timedelta | Callable[[IssuedTokens], timedelta] = timedelta(hours=1),
    age: timedelta = timedelta(hours=4),
    client: str = "main",
) -> list[int]:
    """Store an authorization-code grant of ``client`` for each of ``issued`` (one
    transaction) and return their ids. The access token has ``access_left`` (a duration,
    or one per token), it was obtained ``age`` ago; ``decide`` is the store's decision
    for new rows, or a schedule: then the daemon's own (``policy.initial`` at ``now``)."""
    at = now or datetime.now(UTC)
    if isinstance(decide, ScheduleConfig):
        schedule = decide

        def decide(grant: Grant) -> tuple[Status, str | None, datetime | None]:
            return initial(grant, at, schedule)

    tokens = [issued_tokens(t) for t in issued]
    news = [NewGrant(
        client=client, grant_type="authorization_code", access_token=t.access_token,
        access_expires_at=at + (access_left(t) if callable(access_left) else access_left),
        obtained_at=at - age, refresh_token=t.refresh_token,
        refresh_expires_at=t.refresh_expires_at, user_id=str(t.user_id),
        tenant_id=str(t.tenant_id)) for t in tokens]
    return store.insert_grants(news, decide)


# --------------------------------------------------------------------------- logs


@contextlib.contextmanager
def quiet_logs(level: str = "error", *, sink: TextIO | None = None) -> Iterator[TextIO]:
    """tokend's in-process logs (JSON, ``level`` and up) into ``sink`` (a fresh buffer if
    none is given), the logging set-up restored afterwards."""
    import logging

    import structlog

    from tokend import logs
    from tokend.config import LoggingConfig

    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    previous = structlog.get_config()
    out: TextIO = sink if sink is not None else io.StringIO()
    logs.configure(LoggingConfig(format="json", level=level), stream=out)
    try:
        yield out
    finally:
        structlog.configure(**previous)
        root.handlers[:] = handlers
        root.setLevel(root_level)


# --------------------------------------------------------------------------- PostgreSQL


def pg_problem(url: str, *, connect_timeout: int = 3) -> str | None:
    """Why the server of ``url`` cannot be used, or ``None`` when it answers."""
    try:
        engine = create_engine(url, connect_args={"connect_timeout": connect_timeout})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return str(exc).splitlines()[0]


@contextlib.contextmanager
def pg_database(admin_url: str, name: str, *,
                on_drop_error: Callable[[Exception], None] | None = None) -> Iterator[str]:
    """A new, empty database ``name`` on the server of ``admin_url`` (dropped first if a
    crashed run left it); its URL is yielded, and it is dropped afterwards. A failing drop
    raises, or goes to ``on_drop_error``."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            except Exception as exc:
                if on_drop_error is None:
                    raise
                on_drop_error(exc)
    finally:
        admin.dispose()


def reset_pg(url: str) -> None:
    """Drop tokend's tables from the database of ``url`` (the next test migrates afresh)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS grants, events, consent_states, replicas, "
                          "rate_slots, alembic_version CASCADE"))
    engine.dispose()
