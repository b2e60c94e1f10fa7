"""Encryption keys: created for SQLite, required for PostgreSQL, rotated, wrong ones named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokend.crypto import generate_key
from tokend.testing import write_config

IMPORT = [{"client": "main", "access_token": "acc-secret-1", "refresh_token": "ref-secret-1",
           "expires_in": 86400, "user_id": 1}]


def tokend(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokend", "--config", str(config), *args],
                          capture_output=True, text=True, input=stdin, timeout=60)


def test_sqlite_creates_a_private_key_on_first_use(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "tokend-key"
    config = write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{tmp_path / 'tokend.db'}", key_file=key)
    assert not key.exists()
    done = tokend(config, "grants", "import", "-", stdin=json.dumps(IMPORT))
    assert done.returncode == 0, done.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert len(key.read_text().split()) == 1
    assert b"acc-secret-1" not in (tmp_path / "tokend.db").read_bytes()


def test_postgresql_without_a_key_refuses_to_start(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path / "tokend.toml", db_url=pg_url, key_file=tmp_path / "missing-key")
    for args in (("run", "--once"), ("grants", "list")):
        done = tokend(config, *args)
        assert done.returncode == 78
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "missing-key does not exist" in lines[0]
        assert "tokend keys generate" in lines[0]


@pytest.mark.parametrize("content", ["not-a-key\n", "# only a comment\n"])
def test_malformed_key_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    key = tmp_path / "tokend-key"
    key.write_text(content)
    config = write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{tmp_path / 'tokend.db'}", key_file=key)
    done = tokend(config, "check-config")
    assert done.returncode == 78 and "encryption.key_file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_rotation_keeps_every_grant_readable_and_a_wrong_key_is_named(
        tmp_path: Path, db_url: str, key_file: Path) -> None:
    config = write_config(tmp_path / "tokend.toml", db_url=db_url, key_file=key_file)
    if db_url.startswith("postgresql"):
        assert tokend(config, "db", "upgrade").returncode == 0
    records = [dict(IMPORT[0], access_token=f"acc-secret-{i}", refresh_token=f"ref-{i}",
                    user_id=i) for i in range(1, 6)]
    assert tokend(config, "grants", "import", "-", stdin=json.dumps(records)).returncode == 0
    old = key_file.read_text()
    key_file.write_text(generate_key() + "\n" + old)   # new key first, old still decrypts
    done = tokend(config, "keys", "rotate")
    assert done.returncode == 0 and "5 grant(s)" in done.stdout
    key_file.write_text(key_file.read_text().splitlines()[0] + "\n")  # drop the old key
    for i in range(1, 6):
        shown = tokend(config, "token", str(i))
        assert shown.returncode == 0 and shown.stdout.strip() == f"acc-secret-{i}"
    key_file.write_text(generate_key() + "\n")  # a wrong key
    wrong = tokend(config, "token", "3")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == ("tokend: cannot decrypt the tokens of grant 3 with any "
                                    "configured key (wrong or missing key in "
                                    "encryption.key_file?)")
    assert wrong.stdout == ""


def test_keys_generate_needs_no_config(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tokend", "keys", "generate"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert done.returncode == 0 and len(done.stdout.strip()) == 44


@pytest.mark.parametrize("command", [("grants", "list"), ("run", "--once"), ("db", "upgrade"),
                                     ("grants", "import", "-"), ("token", "1")])
def test_a_lost_key_beside_an_existing_database_is_an_error_not_a_new_key(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    key = tmp_path / "tokend-key"
    db = tmp_path / "tokend.db"
    config = write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{db}", key_file=key)
    assert tokend(config, "grants", "import", "-", stdin=json.dumps(IMPORT)).returncode == 0
    key.unlink()  # lost: a restore without it, a typo in key_file, another working directory
    before = db.read_bytes()
    done = tokend(config, *command, stdin=json.dumps([dict(IMPORT[0], user_id=2)]))
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == (f"tokend: encryption.key_file: {key} does not exist, but the "
                           f"database {db} does: restore the key file its tokens were encrypted "
                           "with (a new key is created only together with a new database)\n")
    assert not key.exists() and db.read_bytes() == before


def test_a_new_key_is_durable_before_the_new_database_uses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from tokend.config import load_config
    from tokend.crypto import cipher_for

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    key = tmp_path / "keys" / "tokend-key"
    db = tmp_path / "tokend.db"
    db.touch()  # an empty file holds no token: still a new database
    config = load_config(write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{db}", key_file=key), env={})
    cipher = cipher_for(config, create=True)
    assert cipher.keys[0].value == key.read_text().strip()
    # the key's content (under its temporary name), then the directory that links it
    assert len(synced) == 2 and synced[1] == str(key.parent), synced
    assert synced[0].startswith(str(key.parent / ".tokend-key.")), synced
    assert sorted(p.name for p in key.parent.iterdir()) == ["tokend-key"]
    assert oct(key.stat().st_mode & 0o777) == "0o600"
