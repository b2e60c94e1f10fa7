"""The ``tokend`` command line, run for real: exit codes, stderr, and the grant commands.

Where the exit code or the exact stderr matters the CLI runs as a subprocess
(``python -m tokend``); the longer flows call ``tokend.cli.main`` in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from conftest import CLIENT_SECRET
from tokend.cli import main
from tokend.testing import write_config

# Distinctive token strings: none of them may ever show up in list/show output.
TOKENS = {
    "alice_at": "AT-alice-7f3a9c1e-never-print",
    "alice_rt": "RT-alice-0b2d4f6a-never-print",
    "bob_at": "AT-bob-5e6f7a8b-never-print",
    "bob_rt": "RT-bob-9c0d1e2f-never-print",
    "cc_at": "AT-cc-3a4b5c6d-never-print",
}
GRANT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": int, "client": str, "grant_type": str, "user_id": (str, type(None)),
    "tenant_id": (str, type(None)), "status": str, "reason": (str, type(None)),
    "access_expires_at": (str, type(None)), "refresh_expires_at": (str, type(None)),
    "failure_count": int, "last_error": (str, type(None)),
    "next_attempt_at": (str, type(None)),
}
OTHER_CLIENT = '\n[clients.other]\nclient_id = "other-id"\nclient_secret = "other-secret"\n'


def tokend(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """``python -m tokend ARGS`` in a clean environment (no TOKEND_* of the caller)."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("TOKEND_") and k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "tokend", *args], input=stdin, text=True,
                          capture_output=True, env={**clean, **(env or {})}, timeout=120,
                          check=False)


def one_line(stderr: str) -> str:
    """The error output is exactly one line and no traceback."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``tokend ARGS`` in-process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def records(now: datetime) -> list[dict[str, Any]]:
    return [
        {"client": "main", "grant_type": "authorization_code", "access_token": TOKENS["alice_at"],
         "refresh_token": TOKENS["alice_rt"], "expires_in": 86400, "user_id": 1001,
         "tenant_id": 7},
        {"client": "main", "access_token": TOKENS["bob_at"], "refresh_token": TOKENS["bob_rt"],
         "access_expires_at": (now + timedelta(hours=12)).isoformat(), "user_id": "1002",
         "tenant_id": "7", "token_type": "Bearer"},
        {"client": "other", "grant_type": "client_credentials", "access_token": TOKENS["cc_at"],
         "expires_in": 2678400},
    ]


@pytest.fixture
def config(tmp_path: Path, db_url: str, key_file: Path,
           capsys: pytest.CaptureFixture[str]) -> Path:
    """A config on the backend under test, schema upgraded, two clients."""
    path = write_config(tmp_path / "tokend.toml", db_url=db_url, key_file=key_file, extra=OTHER_CLIENT)
    assert main(["--config", str(path), "db", "upgrade"]) == 0
    capsys.readouterr()
    return path


# --------------------------------------------------------------------------- no database


def test_check_config_prints_settings_with_secrets_masked(tmp_path: Path, key_file: Path) -> None:
    (tmp_path / "hook").write_text("hook-secret-value\n")
    path = write_config(tmp_path / "tokend.toml", db_url="postgresql://tokend:db-pass-value@db.example/tokend",
                        key_file=key_file,
                        extra='\n[notify]\nwebhook_url = "https://hooks.example/x"\n'
                              'webhook_secret_file = "hook"\n')
    r = tokend("--config", str(path), "check-config")
    assert (r.returncode, r.stderr) == (0, "")
    for secret in (CLIENT_SECRET, "hook-secret-value", "db-pass-value",
                   key_file.read_text().strip()):
        assert secret not in r.stdout
    settings = tomllib.loads(r.stdout)  # what it prints is TOML again
    assert settings["clients"]["main"]["client_secret"] == "********"
    assert settings["clients"]["main"]["client_id"] == "demo-client"
    assert settings["notify"]["webhook_secret"] == "********"
    assert settings["database"]["url"] == "postgresql+psycopg://tokend:********@db.example/tokend"
    assert settings["provider"]["timeout"] == "5s"
    assert settings["schedule"]["interval"] == "1m"
    assert settings["provider"]["refresh_token_ttl"] == "P1M"
    assert "1 key(s) loaded" in r.stdout


def test_check_config_masks_passwords_and_webhook_paths(tmp_path: Path, key_file: Path) -> None:
    path = write_config(tmp_path / "tokend.toml", db_url="postgresql://u:pa/ss#w?rd@db.example/tokend",
                        key_file=key_file,
                        extra='\n[notify]\nwebhook_url = "https://hooks.example/T0/hook-secret"\n'
                              '[clients.other]\nclient_id = "o"\nclient_secret = "s"\n'
                              'redirect_uri = "http://u:redirect-secret@127.0.0.1:8765/cb"\n')
    r = tokend("--config", str(path), "check-config")
    assert (r.returncode, r.stderr) == (0, "")
    for secret in ("pa/ss", "ss#w", "w?rd", "hook-secret", "redirect-secret"):
        assert secret not in r.stdout
    settings = tomllib.loads(r.stdout)
    assert settings["database"]["url"] == "postgresql+psycopg://u:********@db.example/tokend"
    assert settings["notify"]["webhook_url"] == "https://hooks.example/********"
    assert settings["clients"]["other"]["redirect_uri"] == "http://********@127.0.0.1:8765/cb"


def test_check_config_without_a_file_shows_the_justimmo_defaults(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "tokend", "check-config"], cwd=tmp_path,
                       capture_output=True, text=True, check=False,
                       env={k: v for k, v in os.environ.items() if not k.startswith("TOKEND_")})
    assert r.returncode == 0, r.stderr
    assert "built-in defaults" in r.stdout
    assert tomllib.loads(r.stdout)["provider"]["token_url"] == \
        "https://auth.justimmo.at/access_token"


@pytest.mark.parametrize(("extra", "env", "message"), [
    ("[metrics]\nlisten = 'x'\n", {}, "is not valid TOML"),  # [metrics] twice
    ("", {"TOKEND_SCHEDULE__CONCURRENCY": "0"}, "schedule.concurrency: must be at least 1"),
    ("[nope]\n", {}, "unknown section [nope]"),
    ("[logging]\nlevel = \n", {}, "is not valid TOML"),
    ("[clients.x]\nclient_id = 'x'\nclient_secret_file = 'absent'\n", {},
     "clients.x.client_secret_file: "),
    ("", {"TOKEND_SCHEDULE__INTERVAL": "often"}, "schedule.interval: invalid duration"),
    ("", {"TOKEND_PROVIDER__USER_URL": "http://[::1"}, "provider.user_url: must be an http(s)"),
    ("", {"TOKEND_PROVIDER__TIMEOUT": "500ms"}, "provider.timeout: must be at least 1s"),
    ("", {"TOKEND_PROVIDER__REFRESH_TOKEN_TTL": "3000000d"},
     "provider.refresh_token_ttl: duration '3000000d' is too long"),
    ("", {"TOKEND_SCHEDULE__RETRY_MAX": "P999Y999999D"}, "schedule.retry_max: duration"),
])
@pytest.mark.parametrize("command", [["check-config"], ["grants", "list"]])
def test_a_bad_config_is_one_line_and_exit_78(tmp_path: Path, key_file: Path, extra: str,
                                              env: dict[str, str], message: str,
                                              command: list[str]) -> None:
    path = write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{tmp_path / 'db.sqlite'}", key_file=key_file)
    path.write_text(path.read_text() + extra)
    r = tokend("--config", str(path), *command, env=env)
    assert r.returncode == 78
    line = one_line(r.stderr)
    assert line.startswith("tokend: ") and message in line
    assert r.stdout == ""
    assert not (tmp_path / "db.sqlite").exists()  # nothing was touched


def test_a_missing_config_file_is_exit_78(tmp_path: Path) -> None:
    r = tokend("--config", str(tmp_path / "absent.toml"), "check-config")
    assert r.returncode == 78
    assert "absent.toml does not exist" in one_line(r.stderr)
    r = tokend("check-config", env={"TOKEND_CONFIG": str(tmp_path / "gone.toml")})
    assert r.returncode == 78
    assert "gone.toml does not exist" in one_line(r.stderr)


@pytest.mark.parametrize(("args", "message"), [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
    (["grants"], "the following arguments are required: ACTION"),
    (["grants", "show", "abc"], "grant id must be a whole number, not 'abc'"),
    (["grants", "show", "0"], "grant id must be positive"),
    (["grants", "delete", "1.5"], "grant id must be a whole number"),
    (["grants", "show"], "the following arguments are required: id"),
    (["token", "x"], "grant id must be a whole number"),
    (["grants", "list", "--status", "broken"], "argument --status: invalid choice: 'broken'"),
    (["grants", "list", "--bogus"], "unrecognized arguments: --bogus"),
    (["db", "downgrade"], "invalid choice: 'downgrade'"),
    (["keys", "generate", "extra"], "unrecognized arguments: extra"),
])
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    r = tokend(*args)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert line.startswith("tokend") and message in line
    assert r.stdout == ""


def test_keys_generate_prints_a_fernet_key() -> None:
    first, second = tokend("keys", "generate"), tokend("keys", "generate")
    assert (first.returncode, first.stderr) == (0, "")
    key = first.stdout.strip()
    assert first.stdout == key + "\n"
    token = Fernet(key.encode()).encrypt(b"x")  # a usable key
    assert Fernet(key.encode()).decrypt(token) == b"x"
    assert second.stdout.strip() != key


def test_keys_generate_needs_no_valid_config(tmp_path: Path) -> None:
    r = tokend("--config", str(tmp_path / "absent.toml"), "keys", "generate")
    assert r.returncode == 0
    Fernet(r.stdout.strip().encode())


def test_version() -> None:
    r = tokend("--version")
    assert r.returncode == 0 and r.stdout.startswith("tokend ")


# --------------------------------------------------------------------------- database


def test_db_upgrade_twice(tmp_path: Path, db_url: str, key_file: Path) -> None:
    path = write_config(tmp_path / "tokend.toml", db_url=db_url, key_file=key_file)
    first = tokend("--config", str(path), "db", "upgrade")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("database schema upgraded from nothing to ")
    head = first.stdout.split()[-1]
    second = tokend("--config", str(path), "db", "upgrade")
    assert second.returncode == 0, second.stderr
    assert second.stdout == f"database schema is current ({head})\n"


def test_a_schema_newer_than_this_tokend_says_so(config: Path, db_url: str) -> None:
    """A replica not yet upgraded meets a database a newer tokend migrated: it must say
    to upgrade tokend (``db upgrade`` cannot help) and exit, not wait or retry forever."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, text

    from tokend.store import _alembic_config

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
    engine.dispose()
    expected = (f"tokend: database schema is at 0099_future, newer than this tokend (which "
                f"knows up to {head}): upgrade tokend on this host")
    for args in (("grants", "list"), ("db", "upgrade"), ("run",), ("run", "--once")):
        r = tokend("--config", str(config), *args)
        assert r.returncode == 78, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert r.stderr.splitlines()[-1] == expected, (args, r.stderr[-2000:])
        assert "db upgrade" not in r.stderr, (args, r.stderr[-2000:])


def test_grants_commands(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> None:
    c = str(config)
    now = datetime.now(UTC)
    seen: list[str] = []  # every output, checked for tokens at the end

    def run(*args: str) -> tuple[int, str, str]:
        code, out, err = cli(capsys, "--config", c, *args)
        seen.extend((out, err))
        return code, out, err

    def listing(*args: str) -> list[dict[str, Any]]:
        code, out, _ = run("grants", "list", "--json", *args)
        assert code == 0
        data = json.loads(out)
        assert isinstance(data, list)
        return data

    assert listing() == []
    assert run("grants", "list") == (0, "ID\tCLIENT\tTYPE\tUSER\tTENANT\tSTATUS\tREASON\t"
                                        "ACCESS_EXPIRES\tREFRESH_EXPIRES\n", "")

    import_file = tmp_path / "grants.json"
    import_file.write_text(json.dumps(records(now), indent=2))
    code, out, err = run("grants", "import", str(import_file))
    assert (code, err) == (0, "")
    assert out.startswith("imported 3 grant(s) (ids ")

    grants = listing()
    assert len(grants) == 3
    for g in grants:
        for name, kind in GRANT_FIELDS.items():
            assert isinstance(g[name], kind), (name, g)
    alice, bob, cc = grants
    assert [g["id"] for g in grants] == sorted(g["id"] for g in grants)
    assert (alice["client"], alice["grant_type"], alice["user_id"], alice["tenant_id"]) == (
        "main", "authorization_code", "1001", "7")
    assert (bob["user_id"], bob["tenant_id"]) == ("1002", "7")
    assert (cc["client"], cc["grant_type"], cc["user_id"], cc["tenant_id"]) == (
        "other", "client_credentials", None, None)
    for g in grants:
        assert (g["status"], g["reason"], g["failure_count"], g["last_error"]) == (
            "ok", None, 0, None)
        assert g["access_expires_at"].endswith("Z")
        assert g["next_attempt_at"] is not None  # the daemon has work planned
    assert cc["refresh_expires_at"] is None and alice["refresh_expires_at"].endswith("Z")
    access = datetime.fromisoformat(bob["access_expires_at"])
    assert abs(access - (now + timedelta(hours=12))) < timedelta(seconds=1)

    # the plain listing: a header and one tab-separated line per grant, "-" for nothing
    code, out, _ = run("grants", "list")
    lines = [line.split("\t") for line in out.splitlines()]
    assert lines[0][0] == "ID" and len(lines) == 4
    assert lines[1][:7] == [str(alice["id"]), "main", "authorization_code", "1001", "7", "ok", "-"]
    assert lines[3][:7] == [str(cc["id"]), "other", "client_credentials", "-", "-", "ok", "-"]
    assert lines[3][8] == "-"

    # filters
    assert [g["id"] for g in listing("--client", "main")] == [alice["id"], bob["id"]]
    assert [g["id"] for g in listing("--client", "other")] == [cc["id"]]
    assert listing("--client", "nobody") == []
    assert len(listing("--status", "ok")) == 3
    assert listing("--status", "disabled") == []

    # show
    code, out, _ = run("grants", "show", str(bob["id"]), "--json")
    shown = json.loads(out)
    assert code == 0 and {k: shown[k] for k in bob} == bob
    code, out, _ = run("grants", "show", str(bob["id"]))
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["id"] == str(bob["id"]) and fields["user_id"] == "1002"
    assert fields["reason"] == "-"

    # token
    code, out, _ = run("token", str(alice["id"]))
    assert (code, out) == (0, TOKENS["alice_at"] + "\n")
    del seen[-2:]  # the one command whose job is to print a token

    # disable / enable
    code, out, _ = run("grants", "disable", str(alice["id"]))
    assert (code, out) == (0, f"grant {alice['id']} disabled\n")
    assert [g["id"] for g in listing("--status", "disabled")] == [alice["id"]]
    assert [g["id"] for g in listing("--status", "ok", "--client", "main")] == [bob["id"]]
    assert listing("--status", "disabled")[0]["next_attempt_at"] is None
    code, _, err = run("token", str(alice["id"]))
    assert code == 1 and one_line(err) == f"tokend: grant {alice['id']} is disabled"
    code, out, _ = run("grants", "enable", str(alice["id"]))
    assert code == 0 and out.startswith(f"grant {alice['id']} enabled (ok)")
    assert len(listing("--status", "ok")) == 3
    code, out, _ = run("grants", "enable", str(alice["id"]))
    assert (code, out) == (0, f"grant {alice['id']} is already ok\n")

    # delete
    code, out, _ = run("grants", "delete", str(bob["id"]))
    assert (code, out) == (0, f"grant {bob['id']} deleted\n")
    assert [g["id"] for g in listing()] == [alice["id"], cc["id"]]
    code, _, err = run("grants", "show", str(bob["id"]))
    assert code == 1 and one_line(err) == f"tokend: grant {bob['id']} not found"

    everything = "".join(seen)
    for token in TOKENS.values():
        assert token not in everything


@pytest.mark.parametrize("command", [
    ["grants", "show", "999"], ["grants", "show", "999", "--json"], ["grants", "disable", "999"],
    ["grants", "enable", "999"], ["grants", "delete", "999"], ["token", "999"],
])
def test_a_missing_grant_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str],
                                                config: Path, command: list[str]) -> None:
    code, out, err = cli(capsys, "--config", str(config), *command)
    assert (code, out) == (1, "")
    assert one_line(err) == "tokend: grant 999 not found"


def test_a_missing_grant_as_a_process(config: Path) -> None:
    r = tokend("--config", str(config), "grants", "show", "424242")
    assert r.returncode == 1 and r.stdout == ""
    assert one_line(r.stderr) == "tokend: grant 424242 not found"


def test_import_from_stdin_and_list_as_a_process(config: Path) -> None:
    now = datetime.now(UTC)
    lines = "\n".join(json.dumps(r) for r in records(now)) + "\n"
    r = tokend("--config", str(config), "grants", "import", "-", stdin=lines)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("imported 3 grant(s)")
    r = tokend("--config", str(config), "grants", "list", "--json")
    assert r.returncode == 0
    grants = json.loads(r.stdout)
    assert [g["user_id"] for g in grants] == ["1001", "1002", None]
    for token in TOKENS.values():
        assert token not in r.stdout
    r = tokend("--config", str(config), "token", str(grants[2]["id"]))
    assert (r.returncode, r.stdout) == (0, TOKENS["cc_at"] + "\n")


def test_an_unknown_client_in_the_filter_lists_nothing(capsys: pytest.CaptureFixture[str],
                                                       config: Path) -> None:
    assert cli(capsys, "--config", str(config), "grants", "list", "--client", "x") == (
        0, "ID\tCLIENT\tTYPE\tUSER\tTENANT\tSTATUS\tREASON\tACCESS_EXPIRES\tREFRESH_EXPIRES\n",
        "")


def test_a_damaged_database_is_one_line_and_exit_1(config: Path, db_url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:  # the schema says "current", but the table is gone
        conn.execute(text("DROP TABLE grants"))
    engine.dispose()
    r = tokend("--config", str(config), "grants", "show", "1")
    assert r.returncode == 1 and r.stdout == ""
    line = one_line(r.stderr)
    assert line.startswith("tokend: database error: ") and "grants" in line
