"""``tokend grants import``: formats, stored values, every invalid record, all or nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from tokend.cli import main
from tokend.config import Config, load_config
from tokend.store import Store
from tokend.testing import write_config

NOW = datetime(2024, 1, 31, 12, 0, tzinfo=UTC)  # the end of a long month, in a leap year
OTHER_CLIENT = '\n[clients.other]\nclient_id = "other-id"\nclient_secret = "other-secret"\n'


def good(n: int = 0, **changes: Any) -> dict[str, Any]:
    record = {"client": "main", "access_token": f"AT-{n}-secret",
              "refresh_token": f"RT-{n}-secret", "expires_in": 86400, "user_id": n}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


@pytest.fixture
def config_path(tmp_path: Path, key_file: Path) -> Path:
    """SQLite: for what does not depend on the backend (validation happens before the store)."""
    return write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{tmp_path / 'tokend.db'}", key_file=key_file,
                        extra=OTHER_CLIENT)


@pytest.fixture
def backend_config(tmp_path: Path, db_url: str, key_file: Path,
                   capsys: pytest.CaptureFixture[str]) -> Path:
    path = write_config(tmp_path / "tokend.toml", db_url=db_url, key_file=key_file, extra=OTHER_CLIENT)
    assert main(["--config", str(path), "db", "upgrade"]) == 0
    capsys.readouterr()
    return path


def run_import(capsys: pytest.CaptureFixture[str], config: Path, text: str,
               ) -> tuple[int, str, str]:
    source = config.parent / "import.json"
    source.write_text(text)
    code = main(["--config", str(config), "grants", "import", str(source)])
    out, err = capsys.readouterr()
    return code, out, err


def listed(capsys: pytest.CaptureFixture[str], config: Path) -> list[dict[str, Any]]:
    assert main(["--config", str(config), "grants", "list", "--json"]) == 0
    data: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return data


def lines(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("layout", ["array", "array-pretty", "lines", "lines-blank-crlf",
                                    "one-line", "bom"])
def test_json_array_and_json_lines(capsys: pytest.CaptureFixture[str], config_path: Path,
                                   layout: str) -> None:
    recs = [good(1), good(2), good(3)]
    text = {
        "array": json.dumps(recs),
        "array-pretty": "\n" + json.dumps(recs, indent=4) + "\n",
        "lines": lines(*recs),
        "lines-blank-crlf": "\r\n".join(["", json.dumps(recs[0]), "", json.dumps(recs[1]),
                                         "   ", json.dumps(recs[2]), ""]),
        "one-line": lines(recs[0]) + lines(recs[1]) + json.dumps(recs[2]),  # no final newline
        "bom": "\ufeff" + lines(*recs),
    }[layout]
    code, out, err = run_import(capsys, config_path, text)
    assert (code, err) == (0, "")
    assert out == "imported 3 grant(s) (ids 1-3)\n"
    assert [g["user_id"] for g in listed(capsys, config_path)] == ["1", "2", "3"]


def test_import_accumulates(capsys: pytest.CaptureFixture[str], config_path: Path) -> None:
    assert run_import(capsys, config_path, lines(good(1)))[1] == "imported 1 grant(s) (ids 1-1)\n"
    assert run_import(capsys, config_path, lines(good(2), good(3)))[1] == \
        "imported 2 grant(s) (ids 2-3)\n"
    assert len(listed(capsys, config_path)) == 3


# --------------------------------------------------------------------------- values


def test_stored_values(capsys: pytest.CaptureFixture[str], backend_config: Path,
                       store_for: Callable[[Config], Store]) -> None:
    recs = [
        # 1: all defaults: obtained now, refresh token lives one calendar month
        good(1, user_id=1234, tenant_id=56),
        # 2: an absolute expiry in another zone; obtained_at given
        good(2, expires_in=None, access_expires_at="2024-02-01T00:00:00+01:00",
             obtained_at="2024-01-29T08:00:00Z", user_id="u-2", tenant_id="t-2"),
        # 3: an explicit refresh expiry, a fractional expires_in, "Z" with fractions
        good(3, expires_in=3600.5, obtained_at="2024-01-31T11:00:00.250Z",
             refresh_expires_at="2024-03-15T00:00:00Z", token_type="Bearer",
             consented_at="2024-01-01T00:00:00Z"),
        # 4: client credentials: no refresh token, no user
        {"client": "other", "grant_type": "client_credentials", "access_token": "AT-cc-secret",
         "expires_in": 2678400, "tenant_id": 9},
    ]
    with freeze_time(NOW):
        code, _, err = run_import(capsys, backend_config, json.dumps(recs))
    assert (code, err) == (0, ""), err
    store = store_for(load_config(backend_config, env={}))
    grants = list(store.iter_grants())
    assert len(grants) == 4
    g1, g2, g3, g4 = (store.get(g.id, with_tokens=True) for g in grants)

    assert (g1.client, g1.grant_type, g1.user_id, g1.tenant_id) == (
        "main", "authorization_code", "1234", "56")
    assert g1.obtained_at == NOW
    assert g1.access_expires_at == NOW + timedelta(days=1)
    assert g1.refresh_expires_at == datetime(2024, 2, 29, 12, 0, tzinfo=UTC)  # P1M, not 30 d
    assert g1.consented_at == NOW
    assert store.tokens(g1) == ("AT-1-secret", "RT-1-secret")

    assert (g2.user_id, g2.tenant_id) == ("u-2", "t-2")
    assert g2.access_expires_at == datetime(2024, 1, 31, 23, 0, tzinfo=UTC)
    assert g2.obtained_at == datetime(2024, 1, 29, 8, 0, tzinfo=UTC)
    assert g2.refresh_expires_at == datetime(2024, 2, 29, 8, 0, tzinfo=UTC)

    assert g3.user_id == "3" and g3.tenant_id is None
    assert g3.obtained_at == datetime(2024, 1, 31, 11, 0, 0, 250000, tzinfo=UTC)
    assert g3.access_expires_at == datetime(2024, 1, 31, 12, 0, 0, 750000, tzinfo=UTC)
    assert g3.refresh_expires_at == datetime(2024, 3, 15, tzinfo=UTC)
    assert g3.consented_at == datetime(2024, 1, 1, tzinfo=UTC)

    assert (g4.client, g4.grant_type, g4.user_id, g4.tenant_id) == (
        "other", "client_credentials", None, "9")
    assert g4.refresh_expires_at is None and not g4.has_refresh_token
    assert g4.access_expires_at == NOW + timedelta(days=31)
    assert store.tokens(g4) == ("AT-cc-secret", None)

    for g in (g1, g2, g3, g4):
        assert g.status.value == "ok" and g.failure_count == 0 and g.next_attempt_at is not None


def test_refresh_expiry_follows_the_configured_ttl(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path, key_file: Path) -> None:
    path = write_config(tmp_path / "tokend.toml", db_url=f"sqlite:///{tmp_path / 'db.sqlite'}", key_file=key_file,
                        provider_extra='refresh_token_ttl = "P1Y"')
    with freeze_time(datetime(2024, 2, 29, 6, 0, tzinfo=UTC)):
        assert run_import(capsys, path, lines(good(1)))[0] == 0
    (g,) = listed(capsys, path)
    assert g["refresh_expires_at"] == "2025-02-28T06:00:00Z"


def test_expired_refresh_token_is_flagged_on_import(capsys: pytest.CaptureFixture[str],
                                                    config_path: Path) -> None:
    with freeze_time(NOW):
        code, _, _ = run_import(capsys, config_path, lines(
            good(1, obtained_at="2023-12-01T00:00:00Z"),  # refresh token ended 2024-01-01
            good(2, refresh_expires_at="2024-02-03T00:00:00Z")))  # within reconsent_before
    assert code == 0
    g1, g2 = listed(capsys, config_path)
    assert (g1["status"], g1["reason"]) == ("reconsent_required", "refresh_token_expired")
    assert (g2["status"], g2["reason"]) == ("reconsent_due", "refresh_token_expiring")


# --------------------------------------------------------------------------- invalid records


INVALID_RECORDS = [
    (42, "must be a JSON object"),
    ("a string", "must be a JSON object"),
    ([good()], "must be a JSON object"),
    (None, "must be a JSON object"),
    (good(scope="all"), "unknown field 'scope'"),
    (good(client=None), "field 'client' is required"),
    (good(client="nope"), "field 'client': unknown client 'nope' (clients: main, other)"),
    (good(client=5), "field 'client' must be a non-empty string"),
    (good(grant_type="password"), "field 'grant_type' must be authorization_code or "
                                  "client_credentials, not 'password'"),
    (good(access_token=None), "field 'access_token' is required"),
    (good(access_token=""), "field 'access_token' must be a non-empty string"),
    (good(access_token="   "), "field 'access_token' must be a non-empty string"),
    (good(access_token=12345), "field 'access_token' must be a non-empty string"),
    (good(access_token="x" * 16385), "field 'access_token' is too long"),
    (good(refresh_token=None), "field 'refresh_token' is required for authorization_code"),
    (good(grant_type="authorization_code", refresh_token=None),
     "field 'refresh_token' is required for authorization_code"),
    (good(grant_type="client_credentials", user_id=None),
     "field 'refresh_token': client_credentials grants have none"),
    (good(grant_type="client_credentials", refresh_token=None),
     "field 'user_id': client_credentials grants have no user"),
    (good(grant_type="client_credentials", refresh_token=None, user_id=None,
          refresh_expires_at="2024-03-01T00:00:00Z"),
     "field 'refresh_expires_at' without a refresh_token"),
    (good(access_expires_at="2024-02-01T00:00:00Z"),
     "give either 'expires_in' or 'access_expires_at', not both"),
    (good(expires_in=None), "field 'expires_in' or 'access_expires_at' is required"),
    (good(expires_in=-1), "field 'expires_in' must be a positive number of seconds"),
    (good(expires_in=0), "field 'expires_in' must be a positive number of seconds"),
    (good(expires_in=10**12), "field 'expires_in' must be a positive number of seconds"),
    (good(expires_in=10 * 365 * 86400 + 1), "field 'expires_in' must be a positive number"),
    (good(expires_in=True), "field 'expires_in' must be a positive number of seconds"),
    (good(expires_in="3600"), "field 'expires_in' must be a positive number of seconds"),
    (good(expires_in=[3600]), "field 'expires_in' must be a positive number of seconds"),
    (good(expires_in=None, access_expires_at="2024-02-01T00:00:00"),
     "field 'access_expires_at' needs a time zone"),
    (good(expires_in=None, access_expires_at="2024-02-01"),
     "field 'access_expires_at' needs a time zone"),
    (good(expires_in=None, access_expires_at="tomorrow"),
     "field 'access_expires_at' is not an ISO 8601 time: 'tomorrow'"),
    (good(expires_in=None, access_expires_at="2024-02-30T00:00:00Z"),
     "field 'access_expires_at' is not an ISO 8601 time"),
    (good(expires_in=None, access_expires_at=1706745600),
     "field 'access_expires_at' must be an ISO 8601 string"),
    (good(obtained_at="2024-01-31T11:00:00"), "field 'obtained_at' needs a time zone"),
    (good(obtained_at="last week"), "field 'obtained_at' is not an ISO 8601 time"),
    (good(obtained_at="2024-01-31T13:00:00Z"), "field 'obtained_at' is in the future"),
    (good(obtained_at="0001-01-01T00:00:00+01:00"), "field 'obtained_at' is out of range"),
    (good(obtained_at="1969-12-31T23:59:59Z"), "field 'obtained_at' is out of range"),
    (good(expires_in=None, access_expires_at="9999-12-31T23:59:59Z"),
     "field 'access_expires_at' is out of range"),
    (good(refresh_expires_at="2024-03-01"), "field 'refresh_expires_at' needs a time zone"),
    (good(refresh_expires_at=False), "field 'refresh_expires_at' must be an ISO 8601 string"),
    (good(consented_at="soon"), "field 'consented_at' is not an ISO 8601 time"),
    (good(user_id=1.5), "field 'user_id' must be a non-empty string or integer"),
    (good(user_id=True), "field 'user_id' must be a non-empty string or integer"),
    (good(user_id=""), "field 'user_id' must be a non-empty string or integer"),
    (good(user_id="u" * 256), "field 'user_id' is too long"),
    (good(tenant_id={"id": 1}), "field 'tenant_id' must be a non-empty string or integer"),
    # the provider client sends only RFC 6749 VSCHAR: such a grant could never be refreshed
    (good(access_token="AT-\u00fc-secret"), "field 'access_token' is not printable ASCII text"),
    (good(refresh_token="RT-\u00a0-secret"), "field 'refresh_token' is not printable ASCII text"),
    (good(refresh_token="RT-\u20ac-secret"), "field 'refresh_token' is not printable ASCII text"),
    (good(refresh_token="RT-\U0001f511"), "field 'refresh_token' is not printable ASCII text"),
    # max_grant_age counts from it; a far future date overflowed there
    (good(consented_at="8999-01-01T00:00:00Z"), "field 'consented_at' is in the future"),
]


@pytest.mark.parametrize(("bad", "message"), INVALID_RECORDS,
                         ids=[m.split(" must")[0][:40] for _, m in INVALID_RECORDS])
@pytest.mark.parametrize("layout", ["array", "lines"])
def test_an_invalid_record_imports_nothing(capsys: pytest.CaptureFixture[str],
                                           config_path: Path, bad: object, message: str,
                                           layout: str) -> None:
    recs = [good(1), good(2), bad]
    text = json.dumps(recs) if layout == "array" else lines(*recs)
    with freeze_time(NOW):
        code, out, err = run_import(capsys, config_path, text)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tokend: import: record 3: {message}")
    for secret in ("AT-1-secret", "RT-1-secret", "AT-2-secret", "AT-0-secret", "RT-0-secret"):
        assert secret not in err  # an error never echoes a token
    assert listed(capsys, config_path) == []


@pytest.mark.parametrize(("text", "message"), [
    ("", "import: the input is empty"),
    ("  \n\n\t", "import: the input is empty"),
    ("[]", "import: no records"),
    ("[\n]\n", "import: no records"),
    ('[{"client": "main"', "import: not valid JSON: "),
    ("[" + json.dumps(good(1)) + ",]", "import: not valid JSON: "),
    ('[{"client": "main"}] trailing', "import: not valid JSON: Extra data"),
    (lines(good(1)) + "{not json}\n", "import: line 2 is not valid JSON"),
    (lines(good(1)) + "\n\n" + json.dumps(good(2))[:-1] + "\n", "import: line 4 is not valid"),
    (json.dumps(good(1), indent=2), "import: line 1 is not valid JSON"),  # one object, pretty
    (lines(good(1)) + "NaN\n", "import: record 2: must be a JSON object"),
    (lines(good(1), good(2, expires_in=1)).replace('"expires_in": 1', '"expires_in": NaN'),
     "import: record 2: field 'expires_in' must be a positive number"),
    (lines(good(1, expires_in=1)).replace('"expires_in": 1', '"expires_in": 1e400'),
     "import: record 1: field 'expires_in' must be a positive number"),
    (lines({"client": "other", "grant_type": "client_credentials", "access_token": "a",
            "expires_in": 60}, good(1),
           {"client": "other", "grant_type": "client_credentials", "access_token": "b",
            "expires_in": 60}),
     "import: record 3: field 'client': a second client_credentials grant for 'other' "
     "(the first is record 1)"),
    # one refresh token is one chain at the provider: two grants would spend it twice
    (lines(good(1), good(2), good(3, refresh_token="RT-1-secret")),
     "import: record 3: field 'refresh_token': the same refresh token as record 1 "
     "(a refresh token can be used only once)"),
    (lines(good(1), good(2, client="other"), good(3, client="other", refresh_token="RT-2-secret")),
     "import: record 3: field 'refresh_token': the same refresh token as record 2"),
    (lines(good(1), good(2), good(3, user_id=1)),
     "import: record 3: field 'user_id': a second grant of client 'main' for user '1' "
     "(the first is record 1)"),
    (lines(good(1), good(2, user_id="7"), good(3), good(4, user_id=7)),
     "import: record 4: field 'user_id': a second grant of client 'main' for user '7' "
     "(the first is record 2)"),
])
def test_invalid_input_imports_nothing(capsys: pytest.CaptureFixture[str], config_path: Path,
                                       text: str, message: str) -> None:
    code, out, err = run_import(capsys, config_path, text)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith(f"tokend: {message}")
    assert listed(capsys, config_path) == []


def test_an_unreadable_file(capsys: pytest.CaptureFixture[str], config_path: Path) -> None:
    missing = config_path.parent / "absent.json"
    assert main(["--config", str(config_path), "grants", "import", str(missing)]) == 1
    assert capsys.readouterr().err == f"tokend: import: {missing} does not exist\n"
    binary = config_path.parent / "binary.json"
    binary.write_bytes(b"\xff\xfe[]")
    assert main(["--config", str(config_path), "grants", "import", str(binary)]) == 1
    assert capsys.readouterr().err == f"tokend: import: {binary} cannot be read: not UTF-8 text\n"


def test_a_bad_record_after_many_good_ones_imports_nothing(
        capsys: pytest.CaptureFixture[str], backend_config: Path) -> None:
    text = lines(*(good(n) for n in range(1, 3001)), good(3001, expires_in=-5))
    code, _, err = run_import(capsys, backend_config, text)
    assert code == 1
    assert err == ("tokend: import: record 3001: field 'expires_in' must be a positive number "
                   f"of seconds (at most {10 * 365 * 86400})\n")
    assert listed(capsys, backend_config) == []


def test_a_conflict_in_the_database_rolls_back_the_whole_file(
        capsys: pytest.CaptureFixture[str], backend_config: Path) -> None:
    cc = {"client": "other", "grant_type": "client_credentials", "access_token": "AT-cc",
          "expires_in": 3600}
    assert run_import(capsys, backend_config, lines(cc))[0] == 0
    # The second batch is valid on its own, but a client has one client_credentials grant.
    code, out, err = run_import(capsys, backend_config,
                                lines(*(good(n) for n in range(1, 2500)), cc))
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith("tokend: import: a client_credentials grant of a client in the file "
                          "is already stored")
    assert [g["grant_type"] for g in listed(capsys, backend_config)] == ["client_credentials"]


def test_a_user_who_already_has_a_grant_is_refused_and_nothing_is_imported(
        capsys: pytest.CaptureFixture[str], backend_config: Path) -> None:
    assert run_import(capsys, backend_config, lines(good(1), good(2)))[0] == 0
    # The same user of another client, and grants without a user, are no duplicates.
    assert run_import(capsys, backend_config, lines(
        good(5, client="other", user_id=2), good(6, user_id=None), good(7, user_id=None)))[0] == 0
    code, out, err = run_import(capsys, backend_config,
                                lines(good(3), good(9, user_id=2), good(4)))
    assert (code, out) == (1, "")
    assert err == ("tokend: import: record 2: field 'user_id': user '2' of client 'main' "
                   "already has grant 2 (delete it first, or re-consent with tokend authorize); "
                   "nothing was imported\n")
    assert "RT-9-secret" not in err
    assert [g["id"] for g in listed(capsys, backend_config)] == [1, 2, 3, 4, 5]
    assert main(["--config", str(backend_config), "grants", "delete", "2"]) == 0
    capsys.readouterr()
    code, out, _ = run_import(capsys, backend_config, lines(good(3), good(9, user_id=2)))
    assert (code, out) == (0, "imported 2 grant(s) (ids 6-7)\n")


def test_import_from_stdin(tmp_path: Path, config_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEND_")}
    r = subprocess.run([sys.executable, "-m", "tokend", "--config", str(config_path),
                        "grants", "import", "-"], input=lines(good(1), good(2)), text=True,
                       capture_output=True, env=env, check=False, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "imported 2 grant(s) (ids 1-2)\n", "")
    r = subprocess.run([sys.executable, "-m", "tokend", "--config", str(config_path),
                        "grants", "import", "-"], input=lines(good(3), {"client": "main"}),
                       text=True, capture_output=True, env=env, check=False, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "tokend: import: record 2: field 'access_token' is required\n"


# --------------------------------------------------------------------------- volume


@pytest.mark.slow
def test_import_100k_grants_in_one_transaction(tmp_path: Path, config_path: Path) -> None:
    n = 100_000
    source = tmp_path / "many.jsonl"
    with source.open("w") as fh:
        for i in range(1, n + 1):
            fh.write(json.dumps({"client": "main", "access_token": f"AT-{i:06d}-xxxxxxxxxxxx",
                                 "refresh_token": f"RT-{i:06d}-xxxxxxxxxxxx",
                                 "expires_in": 86400, "user_id": i, "tenant_id": i % 97}))
            fh.write("\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEND_")}
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tokend", "--config", str(config_path),
                        "grants", "import", str(source)], capture_output=True, text=True,
                       env=env, check=False, timeout=300)
    imported = time.monotonic() - started
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"imported {n} grant(s) (ids 1-{n})\n"
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tokend", "--config", str(config_path),
                        "grants", "list", "--json"], capture_output=True, text=True, env=env,
                       check=False, timeout=300)
    listing = time.monotonic() - started
    assert r.returncode == 0
    grants = json.loads(r.stdout)
    assert len(grants) == n
    assert [g["id"] for g in grants] == list(range(1, n + 1))
    assert grants[-1]["user_id"] == str(n)
    print(f"\n100k import: {imported:.1f} s, list --json: {listing:.1f} s")
    assert imported < 60
