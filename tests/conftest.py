"""Shared fixtures: a database per backend, configs, and the fake provider.

PostgreSQL: ``TOKEND_TEST_DATABASE_URL`` or the local server. Tests on it are skipped
only when it is unreachable AND ``CI`` is unset; under CI an unreachable server fails.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text

from tokend.config import Config, load_config
from tokend.crypto import generate_key
from tokend.fake_provider import FakeJustimmo
from tokend.store import Store, open_store

PG_URL = os.environ.get("TOKEND_TEST_DATABASE_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CLIENT_ID, CLIENT_SECRET = "demo-client", "demo-secret"


def _pg_reachable() -> str | None:
    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return str(exc).splitlines()[0]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of this test session's own (parallel runs never share tables)."""
    problem = _pg_reachable()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL at {PG_URL} is unreachable under CI: {problem}")
        pytest.skip(f"PostgreSQL unreachable: {problem}")
    name = f"tokend_test_{os.getpid()}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@contextmanager
def own_database(base_url: str, suffix: str) -> Iterator[str]:
    """A further database beside the session's, for fixtures that must not share tables."""
    name = f"{make_url(base_url).database}_{suffix}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def reset_pg(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS grants, events, consent_states, rate_slots, alembic_version CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tokend.db'}"
        return
    url = request.getfixturevalue("pg_url")
    reset_pg(url)
    yield url
    reset_pg(url)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokend-key"
    path.write_text(generate_key() + "\n")
    path.chmod(0o600)
    return path


def write_config(tmp_path: Path, db_url: str, *, fake: FakeJustimmo | None = None,
                 extra: str = "", schedule: str = "", provider: str = "",
                 client: str = "", key_file: Path | None = None) -> Path:
    token_url = fake.token_url if fake else "http://127.0.0.1:9/access_token"
    authorize_url = fake.authorize_url if fake else "http://127.0.0.1:9/authorize"
    user_url = fake.user_url if fake else "http://127.0.0.1:9/oauth/user/current"
    path = tmp_path / "tokend.toml"
    path.write_text(textwrap.dedent(f"""\
        [database]
        url = "{db_url}"

        [provider]
        authorize_url = "{authorize_url}"
        token_url = "{token_url}"
        user_url = "{user_url}"
        rate_limit = 0
        timeout = "5s"
        {provider}

        [clients.main]
        client_id = "{CLIENT_ID}"
        client_secret = "{CLIENT_SECRET}"
        redirect_uri = "http://127.0.0.1:8765/callback"
        {client}

        [schedule]
        interval = "60s"
        {schedule}

        [metrics]
        listen = ""

        [logging]
        format = "json"
        level = "info"

        [state]
        dir = "{tmp_path / 'state'}"

        [encryption]
        key_file = "{key_file or tmp_path / 'tokend-key'}"
        """) + extra)
    return path


@pytest.fixture
def make_config(tmp_path: Path, db_url: str, key_file: Path) -> Callable[..., Config]:
    def make(**kwargs: Any) -> Config:
        return load_config(write_config(tmp_path, db_url, key_file=key_file, **kwargs), env={})

    return make


@pytest.fixture
def fake() -> Iterator[FakeJustimmo]:
    with FakeJustimmo(clients={CLIENT_ID: CLIENT_SECRET}) as f:
        yield f


@pytest.fixture
def store_for() -> Iterator[Callable[[Config], Store]]:
    opened: list[Store] = []

    def make(config: Config, **kwargs: Any) -> Store:
        kwargs.setdefault("auto_upgrade", True)
        s = open_store(config, **kwargs)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()
