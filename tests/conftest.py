"""Shared fixtures: a database per backend, configs, and the fake provider.

PostgreSQL: ``TOKEND_TEST_DATABASE_URL`` or the local server. Tests on it are skipped
only when it is unreachable AND ``CI`` is unset; under CI an unreachable server fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tokend.config import Config, load_config
from tokend.fake import FakeJustimmo
from tokend.store import Store, open_store
from tokend.testing import (
    CLIENT_ID,
    CLIENT_SECRET,
    make_key_file,
    pg_database,
    pg_problem,
    reset_pg,
    write_config,
)

PG_URL = os.environ.get("TOKEND_TEST_DATABASE_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of this test session's own (parallel runs never share tables)."""
    problem = pg_problem(PG_URL)
    if problem is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL at {PG_URL} is unreachable under CI: {problem}")
        pytest.skip(f"PostgreSQL unreachable: {problem}")
    with pg_database(PG_URL, f"tokend_test_{os.getpid()}") as url:
        yield url


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
    return make_key_file(tmp_path / "tokend-key")


@pytest.fixture
def make_config(tmp_path: Path, db_url: str, key_file: Path) -> Callable[..., Config]:
    def make(*, fake: FakeJustimmo | None = None, **kwargs: Any) -> Config:
        if fake is not None:
            kwargs["token_url"] = fake.token_url
        path = write_config(tmp_path / "tokend.toml", db_url=db_url, key_file=key_file, **kwargs)
        return load_config(path, env={})

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
