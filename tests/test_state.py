"""The state directory: where it is, and that `run` refuses to start without one."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tokend import state
from tokend.config import Config, load_config, render
from tokend.errors import ConfigError

PG = 'url = "postgresql+psycopg://tokend@db.example/tokend"'


def load(tmp_path: Path, database: str = "", state_dir: str = "",
         env: dict[str, str] | None = None) -> Config:
    text = f"[database]\n{database}\n" if database else ""
    if state_dir:
        text += f'[state]\ndir = "{state_dir}"\n'
    path = tmp_path / "etc" / "tokend.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return load_config(path, env=env or {})


@pytest.mark.parametrize(("database", "state_dir", "env", "expected", "origin"), [
    # systemd's StateDirectory= wins over everything (a list: the first one)
    (PG, "/srv/x", {"STATE_DIRECTORY": "/var/lib/tokend:/var/lib/other"},
     "/var/lib/tokend", "$STATE_DIRECTORY"),
    (PG, "/srv/tokend-state", {}, "/srv/tokend-state", "[state] dir"),
    # relative to the config file, like secret files
    (PG, "state", {}, "{tmp}/etc/state", "[state] dir"),
    ('url = "sqlite:////data/tokend/grants.db"', "", {}, "/data/tokend",
     "the SQLite file's directory"),
])
def test_where_the_state_directory_is(tmp_path: Path, database: str, state_dir: str,
                                      env: dict[str, str], expected: str, origin: str) -> None:
    config = load(tmp_path, database, state_dir, env)
    assert config.state.dir == Path(expected.format(tmp=tmp_path))
    assert config.state.origin == origin
    assert f'dir = "{expected.format(tmp=tmp_path)}"  # from {origin}' in render(config)


def test_the_default_sqlite_database_keeps_state_beside_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None, env={}).state.dir == tmp_path


def test_postgresql_without_a_state_directory_cannot_run(tmp_path: Path) -> None:
    config = load(tmp_path, PG)
    assert "not set" in render(config)
    with pytest.raises(ConfigError, match=r"^state\.dir: required with PostgreSQL"):
        state.prepare(config)


def test_prepare_creates_a_private_directory(tmp_path: Path) -> None:
    config = load(tmp_path, PG, str(tmp_path / "var" / "tokend"))
    path = state.prepare(config, "owners")
    assert path == tmp_path / "var" / "tokend" / "owners" and path.is_dir()
    assert oct(path.stat().st_mode & 0o777) == "0o700"


def test_an_unwritable_state_directory_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = load(tmp_path, PG, str(blocker / "sub"))
    with pytest.raises(ConfigError, match=r"^state\.dir: cannot create .*sub: Not a directory$"):
        state.prepare(config)
